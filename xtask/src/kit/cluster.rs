//! A throwaway THREE-node clustered MQTT broker on this machine, for the
//! tests and benches that check Shardline on a broker cluster: NATS 2.9
//! (cluster routes, JetStream, an MQTT listener per node) or RabbitMQ 3.10
//! (three Erlang nodes joined with `rabbitmqctl join_cluster`, the
//! `rabbitmq_mqtt` plugin listening on every node). Everything lives in a
//! temporary directory on free loopback ports; nodes are killed (and the
//! directory removed) on drop. `kill9(node)` kills a node's whole process
//! group with SIGKILL (a crash, not a shutdown); `restart(node)` starts it
//! again on the same ports and data, so it rejoins the cluster.
//!
//! Neither broker is a system service here: nothing depends on the
//! packages' own services (Debian starts them on install), and RabbitMQ
//! gets a private Erlang port mapper (`ERL_EPMD_PORT`) so that other
//! clusters on the machine never see these node names.

use super::proc::{free_stable_tcp_port, signal, Proc, TempDir};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a cluster may take to come up (RabbitMQ's three Erlang nodes
/// and two joins take tens of seconds on a loaded two-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Which broker the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Nats,
    Rabbit,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Nats => "NATS",
            BrokerKind::Rabbit => "RabbitMQ",
        }
    }

    /// Whether its server program is installed (a test that needs it skips,
    /// saying why, when it is not).
    pub fn installed(self) -> bool {
        match self {
            BrokerKind::Nats => nats_bin().is_some(),
            BrokerKind::Rabbit => rabbit_bin("rabbitmq-server").is_some(),
        }
    }
}

#[derive(Debug)]
struct Node {
    proc: Option<Proc>,
    mqtt_port: u16,
    dir: PathBuf,
}

/// A running three-node cluster (killed and removed on drop).
#[derive(Debug)]
pub struct BrokerCluster {
    pub kind: BrokerKind,
    // Field order is drop order: nodes stop before their directory goes.
    nodes: Vec<Node>,
    /// RabbitMQ: the private Erlang port mapper's port (stopped on drop).
    epmd_port: u16,
    dir: TempDir,
}

fn nats_bin() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// RabbitMQ's real scripts (Debian's `/usr/sbin` wrappers switch to the
/// `rabbitmq` user and its home; these run as whoever calls them, and the
/// Erlang VM runs fine as root).
fn rabbit_bin(name: &str) -> Option<PathBuf> {
    let p = Path::new("/usr/lib/rabbitmq/bin").join(name);
    p.is_file().then_some(p)
}

fn epmd_bin() -> Option<PathBuf> {
    if Path::new("/usr/bin/epmd").is_file() {
        return Some("/usr/bin/epmd".into());
    }
    std::fs::read_dir("/usr/lib/erlang")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/epmd"))
        .find(|p| p.is_file())
}

impl BrokerCluster {
    /// Starts a fresh three-node cluster of `kind` and waits (with a
    /// deadline) until every node accepts MQTT connections.
    pub fn start(kind: BrokerKind) -> Result<BrokerCluster, String> {
        let dir = TempDir::new(match kind {
            BrokerKind::Nats => "shardline-nats",
            BrokerKind::Rabbit => "shardline-rabbit",
        })?;
        let mut c = BrokerCluster {
            kind,
            nodes: Vec::new(),
            epmd_port: 0,
            dir,
        };
        match kind {
            BrokerKind::Nats => c.start_nats()?,
            BrokerKind::Rabbit => c.start_rabbit()?,
        }
        Ok(c)
    }

    /// Number of nodes (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s MQTT port on 127.0.0.1.
    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.nodes[i].mqtt_port
    }

    /// `mqtt://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// Every node's URL, node 0 first.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The cluster's directory (configuration, data and logs of each node).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// The last lines of node `i`'s log (for error messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = self.nodes[i].dir.join("node.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Resident memory of node `i` (its whole process group), in KiB; 0
    /// when it is not running.
    pub fn rss_kib(&self, i: usize) -> u64 {
        self.nodes[i]
            .proc
            .as_ref()
            .map_or(0, |p| group_rss_kib(p.pid()))
    }

    /// Kills node `i` with SIGKILL (its whole process group: no shutdown,
    /// no flush) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            signal("KILL", &format!("-{}", p.pid()));
            p.stop(Duration::from_millis(0));
        }
    }

    /// Starts node `i` again (same ports, same data) and waits until it
    /// accepts MQTT connections.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill9(i);
        let proc = match self.kind {
            BrokerKind::Nats => self.spawn_nats(i)?,
            BrokerKind::Rabbit => self.spawn_rabbit(i)?,
        };
        self.nodes[i].proc = Some(proc);
        let deadline = Instant::now() + START_TIMEOUT;
        if self.kind == BrokerKind::Rabbit {
            self.await_rabbit(i, deadline)?;
        }
        self.wait_mqtt(i, deadline)
    }

    fn wait_mqtt(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let port = self.nodes[i].mqtt_port;
        loop {
            if let Some(p) = self.nodes[i].proc.as_mut() {
                if let Some(status) = p.exited() {
                    return Err(format!(
                        "{} node {i} exited ({status}) while starting: {}",
                        self.kind.name(),
                        self.log_tail(i, 20)
                    ));
                }
            }
            if mqtt_probe(port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} node {i} did not accept an MQTT connection on port {port} within {START_TIMEOUT:?}: {}",
                    self.kind.name(),
                    self.log_tail(i, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // ---- NATS ----

    fn start_nats(&mut self) -> Result<(), String> {
        nats_bin().ok_or("nats-server is not installed (Debian package nats-server)")?;
        let client: Vec<u16> = (0..3).map(|_| free_stable_tcp_port()).collect();
        let route: Vec<u16> = (0..3).map(|_| free_stable_tcp_port()).collect();
        let mqtt: Vec<u16> = (0..3).map(|_| free_stable_tcp_port()).collect();
        if client.iter().chain(&route).chain(&mqtt).any(|p| *p == 0) {
            return Err("no free TCP port on loopback".into());
        }
        let routes = route
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        for i in 0..3 {
            let dir = self.dir.path.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("js"))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            // JetStream holds MQTT sessions, retained messages and QoS 1
            // queues; `stream_replicas: 3` replicates them on every node so
            // a session survives the loss of one. `max_ack_pending` bounds
            // the unacknowledged QoS 1 messages per subscription (default
            // 1024): an allocator's subscription carries the whole fleet.
            // NATS refuses (SUBACK failure) a session's subscription once
            // their bounds would add up past 65,535 (MQTT packet ids): at
            // 20,000 an allocator got its first 3 filters and none after
            // (tests/tests/cluster_assignment.rs: the routed lead holds
            // status, 5 plain uplinks and one filter per group). 4,096
            // leaves room for 16.
            let conf = format!(
                "server_name: sl{i}\n\
                 listen: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: shardline, listen: 127.0.0.1:{}, routes: [{routes}] }}\n\
                 mqtt {{ listen: 127.0.0.1:{}, stream_replicas: 3, max_ack_pending: 4096, ack_wait: \"30s\" }}\n",
                client[i],
                dir.join("js").display(),
                route[i],
                mqtt[i],
            );
            std::fs::write(dir.join("nats.conf"), conf)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            self.nodes.push(Node {
                proc: None,
                mqtt_port: mqtt[i],
                dir,
            });
        }
        for i in 0..3 {
            let p = self.spawn_nats(i)?;
            self.nodes[i].proc = Some(p);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for i in 0..3 {
            self.wait_mqtt(i, deadline)?;
        }
        Ok(())
    }

    fn spawn_nats(&self, i: usize) -> Result<Proc, String> {
        let bin = nats_bin().ok_or("nats-server is not installed")?;
        let dir = &self.nodes[i].dir;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(dir.join("nats.conf"));
        Proc::spawn(&format!("nats-{i}"), cmd, &dir.join("node.log"))
    }

    // ---- RabbitMQ ----

    fn node_name(&self, i: usize) -> String {
        // Unique per cluster: the private port mapper already isolates
        // names, this keeps logs from different runs apart.
        format!("sl{}n{i}@localhost", self.epmd_port)
    }

    /// The environment every RabbitMQ script of node `i` runs with.
    fn rabbit_env(&self, cmd: &mut Command, i: usize) {
        let dir = &self.nodes[i].dir;
        cmd.env("HOME", &self.dir.path)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", self.node_name(i))
            .env("RABBITMQ_BASE", dir)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS", "rabbitmq_mqtt")
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            // rabbitmqctl writes erl_crash.dump into the working directory
            // when it cannot reach a node yet.
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .current_dir(dir);
    }

    fn start_rabbit(&mut self) -> Result<(), String> {
        rabbit_bin("rabbitmq-server")
            .ok_or("rabbitmq-server is not installed (Debian package rabbitmq-server)")?;
        self.epmd_port = free_stable_tcp_port();
        // One cookie for the three nodes and rabbitmqctl ($HOME/.erlang.cookie,
        // owner-only or Erlang refuses it).
        let cookie = self.dir.path.join(".erlang.cookie");
        let secret = format!("SHARDLINE{:016X}", super::proc::now_ms() ^ 0x5A5A_1234_9876);
        std::fs::write(&cookie, secret).map_err(|e| format!("{}: {e}", cookie.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| format!("{}: {e}", cookie.display()))?;
        for i in 0..3 {
            let dir = self.dir.path.join(format!("r{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let (amqp, mqtt, dist) = (
                free_stable_tcp_port(),
                free_stable_tcp_port(),
                free_stable_tcp_port(),
            );
            if amqp == 0 || mqtt == 0 || dist == 0 {
                return Err("no free TCP port on loopback".into());
            }
            // Anonymous MQTT clients log in as guest, allowed from anywhere
            // here (loopback only anyway).
            let conf = format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
                 mqtt.allow_anonymous = true\n\
                 loopback_users = none\n\
                 distribution.listener.port_range.min = {dist}\n\
                 distribution.listener.port_range.max = {dist}\n"
            );
            std::fs::write(dir.join("rabbitmq.conf"), conf)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            std::fs::write(dir.join("advanced.config"), "[].\n")
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            self.nodes.push(Node {
                proc: None,
                mqtt_port: mqtt,
                dir,
            });
        }
        for i in 0..3 {
            let p = self.spawn_rabbit(i)?;
            self.nodes[i].proc = Some(p);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for i in 0..3 {
            self.await_rabbit(i, deadline)?;
        }
        let first = self.node_name(0);
        for i in 1..3 {
            self.rabbitmqctl(i, &["stop_app"], deadline)?;
            self.rabbitmqctl(i, &["join_cluster", &first], deadline)?;
            self.rabbitmqctl(i, &["start_app"], deadline)?;
        }
        for i in 0..3 {
            self.wait_mqtt(i, deadline)?;
        }
        Ok(())
    }

    fn spawn_rabbit(&self, i: usize) -> Result<Proc, String> {
        let bin = rabbit_bin("rabbitmq-server").ok_or("rabbitmq-server is not installed")?;
        let mut cmd = Command::new(bin);
        self.rabbit_env(&mut cmd, i);
        Proc::spawn(
            &format!("rabbitmq-{i}"),
            cmd,
            &self.nodes[i].dir.join("node.log"),
        )
    }

    /// Waits until node `i` has booted: `rabbitmqctl await_startup` fails
    /// at once while the node has not registered its name yet, so it is
    /// retried until `deadline`.
    fn await_rabbit(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        loop {
            if let Some(status) = self.nodes[i].proc.as_mut().and_then(Proc::exited) {
                return Err(format!(
                    "RabbitMQ node {i} exited ({status}) while starting: {}",
                    self.log_tail(i, 20)
                ));
            }
            match self.rabbitmqctl(i, &["await_startup"], deadline) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }

    /// `rabbitmqctl -n NODE args…`, bounded by `deadline`.
    fn rabbitmqctl(&self, i: usize, args: &[&str], deadline: Instant) -> Result<(), String> {
        let bin = rabbit_bin("rabbitmqctl").ok_or("rabbitmqctl is not installed")?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        let mut cmd = Command::new(bin);
        self.rabbit_env(&mut cmd, i);
        cmd.args(["-n", &self.node_name(i), "--timeout", &left.to_string()])
            .args(args);
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} on node {i} failed ({}): {} {}\nnode log: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail(i, 20)
            ))
        }
    }
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        if self.kind == BrokerKind::Rabbit && self.epmd_port != 0 {
            // The first node started a private port mapper (a daemon outside
            // our process groups): stop it by its port.
            // It refuses while it still lists a node, and notices the
            // killed nodes' closed connections only shortly after: retry.
            if let Some(epmd) = epmd_bin() {
                for _ in 0..50 {
                    let out = Command::new(&epmd)
                        .args(["-port", &self.epmd_port.to_string(), "-kill"])
                        .output();
                    let Ok(o) = out else { break };
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    // Gone, or never started.
                    if text.contains("Killed") || text.contains("Cannot connect") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Whether an MQTT 3.1.1 CONNECT (clean session) to 127.0.0.1:`port` gets
/// an accepting CONNACK within two seconds. A NATS node only accepts once
/// its JetStream cluster has a leader, a RabbitMQ node once its MQTT
/// plugin runs: an open port alone is not readiness.
pub fn mqtt_probe(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let id = b"shardline-probe";
    let mut pkt = vec![0x10, (10 + 2 + id.len()) as u8];
    pkt.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30]);
    pkt.extend_from_slice(&[0, id.len() as u8]);
    pkt.extend_from_slice(id);
    if s.write_all(&pkt).is_err() {
        return false;
    }
    let mut ack = [0u8; 4];
    let ok = s.read_exact(&mut ack).is_ok() && ack[0] == 0x20 && ack[3] == 0;
    let _ = s.write_all(&[0xE0, 0]);
    ok
}

/// Sum of VmRSS (KiB) of every process in process group `pgid`.
pub fn group_rss_kib(pgid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for e in entries.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state ppid pgrp …
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<u32>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}
