//! Issue 19 end to end, with real parts only: a three-node NATS 2.9 cluster
//! (`kit::cluster`), a real PostgreSQL store, TWO real `shardline-allocator`
//! processes sharing it (`[broker] uplink = "routed"`, `[assignment]`
//! enabled, each with its own `[instance]` id, region and endpoints naming
//! different NATS nodes) and real `shardline-agent` processes replaying game
//! traffic (a pcap: no capture privileges needed) that get `qos` shards
//! granted, really run them in shard host processes, and follow their
//! group's signed assignment object.
//!
//! Placement: alloc-a (region eu-west, endpoints node 0 then node 2) starts
//! first and takes the store's lead; alloc-b (eu-central, node 1 then node
//! 2). Group `acme.eu-west.qos` is placed on alloc-a, `acme.eu-central.qos`
//! on alloc-b (the engine's region distance). The agents bootstrap on their
//! region's node (0 or 1) and follow their group's published object (an
//! agent stays on a node the new object still lists).
//!
//! `a_node_and_the_group_owner_die_under_load_and_the_devices_move`: while
//! the agents report (one signed report a second each), node 1 (the
//! eu-central agents' broker) and alloc-b (the eu-central group's owner, not
//! the lead) are killed with SIGKILL. Asserted within [`MOVE_BOUND`]: the
//! lead publishes a new version naming itself and the eu-central agents run
//! on one of its surviving endpoints under that version. The bound is
//! derived from the measured parts (ARCHITECTURE.md: the owner's loss is
//! noticed and republished within 3.24 s, a NATS persistent session is back
//! on a surviving node 8.4 s after its node's kill, the agent leaves a dead
//! endpoint in < 1 s), one after the other 12.6 s, with margin: 20 s
//! (measured 3.5–9.8 s, median 8.7 s). Asserted within [`ANSWER_BOUND`]: their reports
//! are accepted again and an instruction the survivor issues after the kill
//! (a re-grant after an operator drain/resume) is applied (shards running
//! again). After a node's kill NATS delays QoS 1 deliveries to surviving
//! sessions while JetStream elects new leaders (the kit test has seen
//! ~21 s): measured 6.8–34.7 s on the loaded machine (median 10.9 s), so
//! 60 s. No acknowledged message lost, no sequence number reused:
//! every instruction number an agent applied only grows (polled all along),
//! the store's instruction history never gives one number two contents, the
//! store's applied number ends equal to each agent's (every PUBACKed ack
//! reached the store) and each agent's newest PUBACKed report is the one the
//! store holds.
//!
//! `a_node_and_the_lead_die_under_load_and_the_survivor_leads_and_the_devices_move`:
//! the same failover (one helper, [`kill_an_allocator_and_its_node`]) with
//! the LEAD as the victim: alloc-a (holder of the PostgreSQL advisory lock,
//! runner of the assignment engine, owner of the eu-west group) and the
//! node the eu-west agents are on (0, or 2 when node 0 dropped them while
//! the cluster settled) are killed with SIGKILL. Asserted: alloc-b holds
//! the lead within [`LEAD_BOUND`] (3 s; PostgreSQL frees the lock when the
//! dead session's socket closes, then one 200 ms tick: measured 0.02–0.25 s,
//! median 0.14 s over 19 runs); it stores a new version of the eu-west
//! object naming itself within [`LEAD_REPUBLISH_BOUND`] (8 s; the new lead
//! restores its engine from the store, feeds alloc-a's last heartbeat and
//! loses it at `heartbeat_timeout_ms`, 3 s: measured 2.88–3.21 s, median
//! 3.02 s); the eu-west agents run on one of alloc-b's surviving endpoints
//! under that version within [`LEAD_MOVE_BOUND`] (30 s: measured
//! 5.2–20.7 s, median 10.2 s — the object waits for NATS to deliver QoS 1
//! to a session moved off the dead node, up to 17.8 s after it was stored)
//! and are answered again within [`ANSWER_BOUND`] (measured 8.1–30.6 s,
//! median 17.5 s). In both failover tests the group's versions in the
//! store's history only ever grew (the survivor continued from the stored
//! version), no agent's assignment version went back, the other group kept
//! its owner, version and running shards, and the no-loss/no-reuse checks
//! above hold.
//!
//! `a_region_cut_off_keeps_its_profile_until_the_leases_expire_and_reconciles`:
//! the eu-central agents know only node 1 (their bootstrap and their
//! owner's only endpoint); node 1 is killed with SIGKILL (alloc-b lives on,
//! moved to another node). The agents keep their last-known-good profile
//! (shards running) until each lease's own expiry (leases are short here:
//! the tier's `lease_cap_s` in the agreements file, a real operator
//! setting), then release; when node 1 returns they reconcile: reports
//! reach the allocator again and it grants the shards again (new
//! instructions, running again).
//!
//! Skipped, saying why, when nats-server or PostgreSQL is not installed.

use serde_json::Value;
use shardline_allocator::service::http;
use shardline_tests::kit::cluster::{BrokerCluster, BrokerKind};
use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::postgres::{self, TestPostgres};
use shardline_tests::kit::proc::{free_stable_udp_port, free_tcp_port, signal, Proc, TempDir};
use shardline_tests::kit::stack::{catalog_with_digests, install_shards, Bins, ShardPorts};
use shardline_tests::{bins, workspace_root};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The west group (alloc-a's region) and the central one (alloc-b's).
const WEST: &str = "acme.eu-west.qos";
const CENTRAL: &str = "acme.eu-central.qos";
/// Agents per group.
const PER_GROUP: usize = 2;
/// Kill of a node and of the group's owner → the group's agents on a
/// surviving endpoint under the new version (module docs: 12.6 s of
/// measured parts, with margin).
const MOVE_BOUND: Duration = Duration::from_secs(20);
/// … and answered again: a report accepted, a re-grant running (module
/// docs: JetStream's leader election after a node loss delays QoS 1).
const ANSWER_BOUND: Duration = Duration::from_secs(60);
/// Kill of the lead → the survivor holds the store's lead (the PostgreSQL
/// advisory lock is freed when the dead lead's session ends; module docs).
const LEAD_BOUND: Duration = Duration::from_secs(3);
/// Kill of the lead → the survivor's new version of the dead lead's group,
/// naming itself, stored (module docs: the heartbeat timeout, 3 s, rules).
const LEAD_REPUBLISH_BOUND: Duration = Duration::from_secs(8);
/// Kill of the lead and its group's node → that group's agents on a
/// surviving endpoint of the new lead under its new version (module docs:
/// NATS's QoS 1 delivery to a moved session rules).
const LEAD_MOVE_BOUND: Duration = Duration::from_secs(30);
/// Generous bound for setup steps (first placement, first grants).
const SETUP: Duration = Duration::from_secs(40);

/// The two tests each run a NATS cluster, PostgreSQL, two allocators and
/// four agents with shard hosts: together they would starve each other on
/// a 2-core machine and measure the machine, not the failover.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn wait<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(text: &str, n: usize) -> String {
    let l: Vec<&str> = text.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// One allocator instance (its process, config and API).
struct Alloc {
    id: &'static str,
    dir: PathBuf,
    api: String,
    token: String,
    config: PathBuf,
    bin: PathBuf,
    proc: Option<Proc>,
    /// The broker URLs its devices are told to use (`[instance] endpoints`).
    endpoints: Vec<String>,
}

impl Alloc {
    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        self.proc = Some(
            Proc::spawn(self.id, cmd, &self.dir.join("allocator.log")).expect("start allocator"),
        );
        let deadline = Instant::now() + SETUP;
        loop {
            let up = http::request(&self.api, "GET", "/v1/health", None, None)
                .is_ok_and(|r| r.status == 200);
            if up {
                break;
            }
            if let Some(st) = self.proc.as_mut().and_then(Proc::exited) {
                panic!("{} exited ({st}):\n{}", self.id, self.log(40));
            }
            assert!(
                Instant::now() < deadline,
                "{} API not up:\n{}",
                self.id,
                self.log(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.dir.join("api-token"))
            .expect("api token")
            .trim()
            .to_owned();
    }

    /// SIGKILL (no shutdown: its store session and MQTT session just die).
    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            signal("KILL", &format!("-{}", p.pid()));
            p.stop(Duration::ZERO);
        }
    }

    fn log(&self, n: usize) -> String {
        tail(
            &std::fs::read_to_string(self.dir.join("allocator.log")).unwrap_or_default(),
            n,
        )
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        match http::request(&self.api, method, path, Some(&self.token), body) {
            Ok(r) => (
                r.status,
                serde_json::from_str(&r.body).unwrap_or(Value::String(r.body)),
            ),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    fn get(&self, path: &str) -> Value {
        let (st, v) = self.call("GET", path, None);
        assert_eq!(st, 200, "GET {path} on {}: {v}", self.id);
        v
    }

    /// group → (server, version) as stored.
    fn owners(&self) -> BTreeMap<String, (String, u64)> {
        let v = self.get("/v1/assignments");
        v["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                (
                    g["group"].as_str().unwrap_or("").to_owned(),
                    (
                        g["server"].as_str().unwrap_or("").to_owned(),
                        g["version"].as_u64().unwrap_or(0),
                    ),
                )
            })
            .collect()
    }

    fn leads(&self) -> bool {
        let v = self.get("/v1/assignments");
        v["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["server"] == self.id && s["lead"] == true)
    }

    fn device(&self, id: &str) -> Value {
        self.get(&format!("/v1/devices/{id}"))
    }

    /// An operator command on a device; a 409 (another instance committed
    /// the device first: shared-store conflict) is tried again.
    fn operator(&self, device: &str, op: &str) {
        wait(SETUP, &format!("{op} {device} on {}", self.id), || {
            let (st, v) = self.call("POST", &format!("/v1/devices/{device}/{op}"), None);
            assert!(st == 200 || st == 409, "{op} {device}: {st} {v}");
            (st == 200).then_some(())
        });
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.id, self.log(60));
        }
    }
}

/// One real agent.
struct Agent {
    id: String,
    group: &'static str,
    dir: PathBuf,
    proc: Option<Proc>,
    /// The highest applied instruction number seen so far (must never go back).
    applied_max: u64,
    /// The highest assignment version it held so far (must never go back).
    version_max: u64,
}

impl Agent {
    fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join("state/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The agent's applied number now; panics when it, or the version of
    /// the assignment object it holds, went back.
    fn check_applied(&mut self) -> u64 {
        let Some(s) = self.status() else {
            return self.applied_max;
        };
        let now = s["applied_instruction_seq"].as_u64().unwrap_or(0);
        assert!(
            now >= self.applied_max,
            "{}: applied instruction number went back from {} to {now}",
            self.id,
            self.applied_max
        );
        self.applied_max = now;
        if let Some(v) = s["assignment"]["version"].as_u64() {
            assert!(
                v >= self.version_max,
                "{}: assignment version went back from {} to {v}",
                self.id,
                self.version_max
            );
            self.version_max = v;
        }
        now
    }

    /// capability → shard refs of the agent's profile, and whether each
    /// shard's host reports it running.
    fn running_qos(&self) -> bool {
        let Some(s) = self.status() else {
            return false;
        };
        let profile = s["profile"].as_array().cloned().unwrap_or_default();
        let shards = s["shards"].as_array().cloned().unwrap_or_default();
        !profile.is_empty()
            && profile.iter().all(|p| p["capability"] == "qos")
            && shards
                .iter()
                .filter(|x| x["capability"] == "qos")
                .all(|x| x["state"] == "Running")
            && shards.iter().filter(|x| x["capability"] == "qos").count() == profile.len()
    }

    fn profile_len(&self) -> usize {
        self.status()
            .and_then(|s| s["profile"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    fn assignment(&self) -> Value {
        self.status()
            .map(|s| s["assignment"].clone())
            .unwrap_or_default()
    }

    fn log(&self, n: usize) -> String {
        tail(
            &std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default(),
            n,
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.id, self.log(40));
        }
    }
}

/// The whole setup of one test.
struct World {
    /// After the programs were built: what the test itself takes.
    started: Instant,
    _tmp: TempDir,
    cluster: BrokerCluster,
    _pg: TestPostgres,
    a: Alloc,
    b: Alloc,
    agents: Vec<Agent>,
}

/// Instance settings: (id, region, first node, endpoints).
fn alloc_config(
    dir: &Path,
    id: &str,
    region: &str,
    urls: &[String],
    first: usize,
    endpoints: &[String],
    pg: &str,
) -> (String, u16) {
    let api = free_tcp_port();
    let mut nodes = vec![urls[first].clone()];
    nodes.extend(urls.iter().filter(|u| **u != urls[first]).cloned());
    let list = |v: &[String]| {
        v.iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"[broker]
url = "{first_url}"
urls = [{nodes}]
listen = "127.0.0.1:{mqtt}"
client_id = "shardline-e2e-{id}"
uplink = "routed"
persistent_session = true

[store]
path = "{d}/allocator.redb"
url = "{pg}"

[signer]
key_file = "{d}/../signing.key"

[api]
listen = "127.0.0.1:{api}"
token_file = "{d}/api-token"

[policy]
catalog = "{d}/../catalog.toml"
agreements = "{d}/../tiers.toml"
tick_ms = 200

[policy.engine]
hysteresis_ms = 60000
renew_margin_ms = 4000

[dispatch]
resend_after_ms = 2000

[instance]
id = "{id}"
region = "{region}"
capacity_reports_per_s = 15
endpoints = [{endpoints}]

[assignment]
enabled = true
ttl_s = 60
period_s = 5
unsubscribe_grace_s = 2

[assignment.engine]
heartbeat_interval_ms = 1000
heartbeat_timeout_ms = 3000
min_dwell_ms = 0

[assignment.regions]
unlisted = 3.0

[[assignment.regions.pairs]]
a = "eu-west"
b = "eu-central"
distance = 1.0

[[assignment.groups]]
tenant = "acme"
region = "eu-west"
capability = "qos"
expected_reports_per_s = 10

[[assignment.groups]]
tenant = "acme"
region = "eu-central"
capability = "qos"
expected_reports_per_s = 10
"#,
        first_url = urls[first],
        nodes = list(&nodes),
        endpoints = list(endpoints),
        mqtt = free_tcp_port(),
        d = dir.display(),
    );
    (text, api)
}

fn shardctl(bins: &Bins, a: &Alloc, args: &[&str]) -> String {
    let out = Command::new(&bins.shardctl)
        .arg("--api")
        .arg(&a.api)
        .arg("--token-file")
        .arg(a.dir.join("api-token"))
        .args(args)
        .output()
        .expect("run shardctl");
    assert!(
        out.status.success(),
        "shardctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts everything up to placed groups and agents running their granted
/// `qos` shards on their group's endpoint. `None` (after printing why)
/// when a needed server is not installed. `central_only_node1`: the
/// eu-central agents know node 1 alone (bootstrap and endpoints).
fn world(tag: &str, lease_cap_s: u64, central_only_node1: bool) -> Option<World> {
    if !BrokerKind::Nats.installed() {
        println!("SKIP: nats-server is not installed (cargo xtask test installs it as root)");
        return None;
    }
    if !postgres::installed() {
        println!("SKIP: PostgreSQL is not installed (cargo xtask test installs it as root)");
        return None;
    }
    let bins = bins();
    println!("programs built (or found up to date)");
    let tmp = TempDir::new(&format!("sl-e2e-{tag}")).expect("temp dir");
    let root = tmp.path.clone();
    let t0 = Instant::now();
    let cluster = BrokerCluster::start(BrokerKind::Nats).unwrap_or_else(|e| panic!("{e}"));
    let pg = TestPostgres::start(&root.join("pg")).unwrap_or_else(|e| panic!("postgres: {e}"));
    let urls = cluster.urls();
    println!("cluster and PostgreSQL up in {:?}", t0.elapsed());

    // The shards, installed where every agent reads them, and a catalog
    // carrying their digests; the tiers with a short lease cap.
    let shard_dir = root.join("shards");
    let digests = install_shards(&bins, &shard_dir).expect("install shards");
    let template =
        std::fs::read_to_string(workspace_root().join("allocator/catalog/catalog.toml")).unwrap();
    let catalog = catalog_with_digests(&template, &digests, &ShardPorts::pick()).unwrap();
    std::fs::write(root.join("catalog.toml"), catalog).unwrap();
    let tiers =
        std::fs::read_to_string(workspace_root().join("allocator/catalog/tiers.toml")).unwrap();
    let tiers: String = tiers
        .lines()
        .map(|l| {
            if l.starts_with("lease_cap_s") {
                format!("lease_cap_s = {lease_cap_s}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(root.join("tiers.toml"), tiers).unwrap();
    let key = Command::new(&bins.allocator)
        .args(["keygen", "--out"])
        .arg(root.join("signing.key"))
        .output()
        .expect("keygen");
    assert!(key.status.success(), "{key:?}");
    let public_key = String::from_utf8_lossy(&key.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public_key "))
        .expect("keygen prints the public key")
        .trim()
        .to_owned();

    let mk = |id: &'static str, region: &str, first: usize, endpoints: Vec<String>| {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let (text, api) = alloc_config(&dir, id, region, &urls, first, &endpoints, &pg.url());
        let config = dir.join("allocator.toml");
        std::fs::write(&config, text).unwrap();
        Alloc {
            id,
            dir,
            api: format!("http://127.0.0.1:{api}"),
            token: String::new(),
            config,
            bin: bins.allocator.clone(),
            proc: None,
            endpoints,
        }
    };
    // Node 2 is the fallback of both instances. An agent stays on a node
    // a new object still lists (it is one cluster), so the agents bootstrap
    // on their region's node: the west ones on node 0, the central ones on
    // node 1 (which they leave if alloc-a's first object reaches them
    // before alloc-b's, and come back to with alloc-b's).
    let central_endpoints = if central_only_node1 {
        vec![urls[1].clone()]
    } else {
        vec![urls[1].clone(), urls[2].clone()]
    };
    let mut a = mk(
        "alloc-a",
        "eu-west",
        0,
        vec![urls[0].clone(), urls[2].clone()],
    );
    let mut b = mk("alloc-b", "eu-central", 1, central_endpoints);
    a.spawn();
    wait(SETUP, "alloc-a leads", || a.leads().then_some(()));
    b.spawn();
    let placed = wait(SETUP, "each group placed in its region", || {
        let o = a.owners();
        (o.get(WEST).map(|x| x.0.as_str()) == Some("alloc-a")
            && o.get(CENTRAL).map(|x| x.0.as_str()) == Some("alloc-b"))
        .then_some(o)
    });
    println!("placed {placed:?} {:?} after start", t0.elapsed());

    // The agents: enrolled, their own shaper addresses set, replaying game
    // traffic (qos needed all along).
    let capture = root.join("game.pcap");
    std::fs::write(
        &capture,
        pcap::write_pcap(&pcap::scenario(
            &[
                Phase::Quiet(Duration::from_millis(500)),
                Phase::Gaming(Duration::from_secs(300)),
            ],
            1_700_000_000_000_000_000,
        )),
    )
    .unwrap();
    let mut agents = Vec::new();
    for (g, group) in [WEST, CENTRAL].into_iter().enumerate() {
        for i in 0..PER_GROUP {
            let id = format!("e2e-{g}{i}");
            let dir = root.join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            let bootstrap = if group == CENTRAL {
                urls[1].clone()
            } else {
                urls[0].clone()
            };
            let config = dir.join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    "[device]\nid = \"{id}\"\nkey_file = \"{d}/device.key\"\n\n\
                     [allocator]\nkeys = [\"{public_key}\"]\n\n\
                     [broker]\nurl = \"{bootstrap}\"\nkeep_alive_s = 5\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\n\
                     [monitor]\npcap = \"{pcap}\"\nwindow_ms = 1000\n\n\
                     [shards]\ndir = \"{shards}\"\n\n\
                     [state]\ndir = \"{d}/state\"\n\n\
                     [requests]\nsocket = \"{d}/agent.sock\"\n\n\
                     [assignment]\ngroup = \"{group}\"\n",
                    d = dir.display(),
                    pcap = capture.display(),
                    shards = shard_dir.display(),
                ),
            )
            .unwrap();
            let out = Command::new(&bins.agent)
                .args(["check-config", "--print-pubkey", "--config"])
                .arg(&config)
                .output()
                .expect("agent check-config");
            assert!(out.status.success(), "{out:?}");
            let device_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            shardctl(
                &bins,
                &a,
                &["enroll", &id, &device_key, "--tier", "premium"],
            );
            shardctl(
                &bins,
                &a,
                &[
                    "config",
                    "set",
                    &id,
                    "qos-shaper",
                    &format!("listen=127.0.0.1:{}", free_stable_udp_port()),
                    &format!("forward=127.0.0.1:{}", free_stable_udp_port()),
                ],
            );
            // The agents report this machine's CPU load as their device's,
            // and on a loaded 2-core CI machine that leaves no room for a
            // shard: the operator's pin grants qos whatever the other load
            // (within the tier budget), so the test does not measure the
            // machine. The game traffic still makes the demand real.
            shardctl(&bins, &a, &["pin", &id, "qos-shaper"]);
            let mut cmd = Command::new(&bins.agent);
            cmd.arg("run")
                .arg("--config")
                .arg(&config)
                .env("SHARDLINE_LOG", "info")
                .env_remove("NOTIFY_SOCKET");
            let proc = Proc::spawn(&id, cmd, &dir.join("agent.log")).expect("start agent");
            agents.push(Agent {
                id,
                group,
                dir,
                proc: Some(proc),
                applied_max: 0,
                version_max: 0,
            });
        }
    }
    // Each agent: on its owner's first endpoint under the placed version,
    // routed, and running the granted qos shards.
    let started = Instant::now();
    for ag in agents.iter_mut() {
        let (owner, version) = placed[ag.group].clone();
        // Any of the owner's endpoints (an agent whose node dropped it
        // while the young cluster settled is on the next one, and stays).
        let endpoint: Vec<String> = if owner == "alloc-a" {
            vec![urls[0].clone(), urls[2].clone()]
        } else if central_only_node1 {
            vec![urls[1].clone()]
        } else {
            vec![urls[1].clone(), urls[2].clone()]
        };
        let deadline = Instant::now() + SETUP;
        loop {
            ag.check_applied();
            let s = ag.assignment();
            if s["version"] == version
                && endpoint.iter().any(|e| s["endpoint"] == e.as_str())
                && s["routed"] == true
                && ag.running_qos()
            {
                break;
            }
            if Instant::now() > deadline {
                let view = a.device(&ag.id);
                panic!(
                    "{} not routed to one of {endpoint:?} under v{version} running qos within {SETUP:?}:\n\
                     agent status {}\nthe store's view {}",
                    ag.id,
                    ag.status().unwrap_or_default(),
                    serde_json::to_string(&view["policy"]).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "{} agents on their endpoints running qos {:?} after their start",
        agents.len(),
        started.elapsed()
    );
    Some(World {
        started: t0,
        _tmp: tmp,
        cluster,
        _pg: pg,
        a,
        b,
        agents,
    })
}

/// The store's view of one device and its agent agree: every instruction
/// number the agent applied reached the store (its ack was PUBACKed and
/// stored), the agent's newest report is the one the store holds, and the
/// instruction history never gives one number two contents.
fn no_loss_no_reuse(a: &Alloc, ag: &mut Agent) {
    let agreed = wait(
        Duration::from_secs(20),
        &format!("{}: the store agrees with the agent", ag.id),
        || {
            let applied = ag.check_applied();
            let s = ag.status()?;
            let sent_all = s["outbox_len"] == 0 && s["outbox_unacked"] == 0;
            let last_report = s["last_report_seq"].as_u64()?;
            let d = a.device(&ag.id);
            let stored_applied = d["applied_instruction_seq"].as_u64()?;
            let stored_report = d["last_report_seq"].as_u64()?;
            assert!(
                stored_applied <= applied,
                "{}: the store says {stored_applied} applied, the agent only {applied}",
                ag.id
            );
            (sent_all && stored_applied == applied && stored_report >= last_report).then_some((
                applied,
                last_report,
                stored_report,
            ))
        },
    );
    let h = a.get(&format!(
        "/v1/devices/{}/history?kind=instruction&limit=1000",
        ag.id
    ));
    let mut contents: BTreeMap<u64, String> = BTreeMap::new();
    for e in h["entries"].as_array().into_iter().flatten() {
        let Some(seq) = e["seq"].as_u64() else {
            continue;
        };
        let ops = e["ops"].to_string();
        if e["status"] == "sent" {
            if let Some(prev) = contents.insert(seq, ops.clone()) {
                assert_eq!(prev, ops, "{}: instruction {seq} reused", ag.id);
            }
        }
    }
    println!(
        "{}: applied {} (store agrees), newest report {} (store {}), {} instructions in history",
        ag.id,
        agreed.0,
        agreed.1,
        agreed.2,
        contents.len()
    );
}

/// Which allocator dies, with the broker node its group's devices are on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Victim {
    /// alloc-b: owner of the eu-central group, not the lead.
    Owner,
    /// alloc-a: the store's lead (it runs the assignment engine) and owner
    /// of the eu-west group.
    Lead,
}

/// What a failover took, from the kills.
struct Failover {
    /// The survivor holds the store's lead (`None`: it held it already).
    lead_taken: Option<Duration>,
    /// The survivor's new version of the dead one's group, stored.
    republished: Duration,
    /// Each of the group's agents on a surviving endpoint under it.
    moved: BTreeMap<String, Duration>,
    /// … and answered again (a report accepted, a re-grant running).
    answered: BTreeMap<String, Duration>,
}

/// Under load, SIGKILLs the `victim` allocator and the broker node its
/// group's first agent is on, and waits until that group's agents are
/// answered again by the survivor (panicking after [`ANSWER_BOUND`]);
/// checks along the way that no instruction number or assignment version
/// an agent holds goes back, and after it that the store's history of the
/// group only ever grew in version and that nothing acknowledged was lost
/// or reused. Returns how long each step took (the caller asserts its
/// bounds).
fn kill_an_allocator_and_its_node(w: &mut World, victim: Victim) -> Failover {
    let World {
        a,
        b,
        agents,
        cluster,
        ..
    } = w;
    let urls = cluster.urls();
    assert!(a.leads() && !b.leads(), "alloc-a leads, alloc-b does not");
    let (dead, live, group, other) = match victim {
        Victim::Owner => (b, &*a, CENTRAL, WEST),
        Victim::Lead => (a, &*b, WEST, CENTRAL),
    };
    let (owner, old_version) = live.owners()[group].clone();
    let other_before = live.owners()[other].clone();
    assert_eq!(owner, dead.id, "{group} is placed on {}", dead.id);
    let movers: Vec<usize> = (0..agents.len())
        .filter(|&i| agents[i].group == group)
        .collect();

    // The operator drains the group's devices before the failure (their
    // shards stop): the re-grant after the resume below can then only come
    // from an allocator that lives after the kills.
    for &i in &movers {
        live.operator(&agents[i].id, "drain");
    }
    for &i in &movers {
        let ag = &mut agents[i];
        wait(SETUP, &format!("{} drained", ag.id), || {
            ag.check_applied();
            (ag.profile_len() == 0).then_some(())
        });
    }
    let reports_at_kill: BTreeMap<String, u64> = movers
        .iter()
        .map(|&i| {
            let id = agents[i].id.clone();
            // The owner's view (it handles these devices' reports).
            let r = dead.device(&id)["last_report_seq"].as_u64().unwrap_or(0);
            (id, r)
        })
        .collect();

    // Under load: the first agent's node (its owner's first endpoint, or
    // the second when the first dropped it while the cluster settled) and
    // the owner die.
    let first = agents[movers[0]].assignment()["endpoint"].clone();
    let node = (0..3)
        .find(|&n| first == urls[n].as_str() && dead.endpoints.contains(&urls[n]))
        .unwrap_or_else(|| panic!("{first} is not one of {}'s endpoints", dead.id));
    cluster.kill9(node);
    dead.kill9();
    let killed = Instant::now();
    for &i in &movers {
        live.operator(&agents[i].id, "resume");
    }
    let mut lead_taken = None;
    let mut republished = None;
    let mut moved: BTreeMap<String, Duration> = BTreeMap::new();
    let mut answered: BTreeMap<String, Duration> = BTreeMap::new();
    let new_version = loop {
        let t = killed.elapsed();
        assert!(
            t < ANSWER_BOUND,
            "not all {group} agents answered within {ANSWER_BOUND:?}: lead taken {lead_taken:?}, \
             republished {republished:?}, moved {moved:?}, answered {answered:?}"
        );
        if victim == Victim::Lead && lead_taken.is_none() && live.leads() {
            lead_taken = Some(t);
        }
        let (server, version) = live.owners()[group].clone();
        if server == live.id && version > old_version && republished.is_none() {
            republished = Some((t, version));
        }
        for ag in agents.iter_mut() {
            ag.check_applied();
        }
        if let Some((_, version)) = republished {
            for &i in &movers {
                let ag = &agents[i];
                let s = ag.assignment();
                // The survivor's endpoints but the dead node.
                let on_survivor = live
                    .endpoints
                    .iter()
                    .any(|e| *e != urls[node] && s["endpoint"] == e.as_str());
                if s["version"] == version && on_survivor && s["routed"] == true {
                    moved.entry(ag.id.clone()).or_insert(t);
                }
                let d = live.device(&ag.id);
                let reported = d["last_report_seq"].as_u64().unwrap_or(0) > reports_at_kill[&ag.id];
                if moved.contains_key(&ag.id) && reported && ag.running_qos() {
                    answered.entry(ag.id.clone()).or_insert(t);
                }
            }
            if answered.len() == movers.len() {
                break version;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (republished, _) = republished.unwrap();
    println!(
        "after the kills (node {node}, {}): lead taken {lead_taken:?}, v{new_version} of {group} \
         naming {} stored {republished:?}, agents moved {moved:?}, answered again {answered:?}",
        dead.id, live.id
    );
    // The versions the store ever published for the group, newest first,
    // only ever grew: the survivor continued from the stored version.
    let h = live.get(&format!("/v1/assignments/{group}/history"));
    let versions: Vec<u64> = h["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert!(
        versions.windows(2).all(|p| p[0] > p[1]) && versions.first() == Some(&new_version),
        "{group}'s versions went back or repeat (newest first): {versions:?}"
    );
    assert!(
        versions.contains(&old_version),
        "{versions:?} without v{old_version}"
    );
    // The other group never lost service: same owner, its version kept
    // (a new lead restores it from the store), its agents running.
    let (other_owner, other_version) = live.owners()[other].clone();
    assert!(
        other_owner == other_before.0 && other_version >= other_before.1,
        "{other} was {other_before:?}, now ({other_owner}, {other_version})"
    );
    for ag in agents.iter_mut().filter(|ag| ag.group != group) {
        ag.check_applied();
        assert!(ag.running_qos(), "{} still runs its shards", ag.id);
    }
    for ag in agents.iter_mut() {
        no_loss_no_reuse(live, ag);
    }
    Failover {
        lead_taken,
        republished,
        moved,
        answered,
    }
}

/// Stops the agents and the survivor after a failover test.
fn stop_all(w: &mut World) {
    for ag in w.agents.iter_mut() {
        if let Some(mut p) = ag.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
    w.a.kill9();
    w.b.kill9();
    println!("whole test (after the build) {:?}", w.started.elapsed());
}

#[test]
fn a_node_and_the_group_owner_die_under_load_and_the_devices_move() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut w) = world("move", 3600, false) else {
        return;
    };
    let f = kill_an_allocator_and_its_node(&mut w, Victim::Owner);
    let slowest_move = f.moved.values().max().copied().unwrap();
    assert!(
        slowest_move <= MOVE_BOUND,
        "moved {slowest_move:?} after the kills, bound {MOVE_BOUND:?}"
    );
    let slowest = f.answered.values().max().copied().unwrap();
    assert!(slowest <= ANSWER_BOUND);
    assert!(f.republished <= MOVE_BOUND);
    stop_all(&mut w);
}

#[test]
fn a_node_and_the_lead_die_under_load_and_the_survivor_leads_and_the_devices_move() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut w) = world("lead", 3600, false) else {
        return;
    };
    let f = kill_an_allocator_and_its_node(&mut w, Victim::Lead);
    let lead_taken = f.lead_taken.expect("alloc-b took the lead");
    assert!(
        lead_taken <= LEAD_BOUND,
        "alloc-b led {lead_taken:?} after the kills, bound {LEAD_BOUND:?}"
    );
    assert!(
        f.republished <= LEAD_REPUBLISH_BOUND,
        "alloc-b's version of {WEST} stored {:?} after the kills, bound {LEAD_REPUBLISH_BOUND:?}",
        f.republished
    );
    let slowest_move = f.moved.values().max().copied().unwrap();
    assert!(
        slowest_move <= LEAD_MOVE_BOUND,
        "moved {slowest_move:?} after the kills, bound {LEAD_MOVE_BOUND:?}"
    );
    let slowest = f.answered.values().max().copied().unwrap();
    assert!(slowest <= ANSWER_BOUND);
    stop_all(&mut w);
}
#[test]
fn a_region_cut_off_keeps_its_profile_until_the_leases_expire_and_reconciles() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // 15 s leases (the tier's cap), renewed 5 s before they end.
    let Some(mut w) = world("cut", 15, true) else {
        return;
    };
    let central: Vec<usize> = (0..w.agents.len())
        .filter(|&i| w.agents[i].group == CENTRAL)
        .collect();
    let version = w.a.owners()[CENTRAL].1;

    // The region is cut off: node 1, the only broker its agents know.
    w.cluster.kill9(1);
    let cut = now_ms();
    // status.json is rewritten every second: let it show the last renewal
    // applied before the cut (none can come after it).
    std::thread::sleep(Duration::from_millis(1_500));
    // Each central agent: its profile's size and its leases' first and
    // last end (the last renewal it got before the cut).
    let ends: BTreeMap<String, (usize, u64, u64)> = central
        .iter()
        .map(|&i| {
            let s = w.agents[i].status().expect("status");
            let leases: Vec<u64> = s["profile"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["lease_expires_at_ms"].as_u64())
                .collect();
            let first = *leases.iter().min().expect("a lease");
            let last = *leases.iter().max().expect("a lease");
            (w.agents[i].id.clone(), (leases.len(), first, last))
        })
        .collect();
    println!(
        "cut off; leases end {:?} ms after the cut",
        ends.values()
            .map(|e| (e.1.saturating_sub(cut), e.2.saturating_sub(cut)))
            .collect::<Vec<_>>()
    );
    // Kept whole (shards running) until the first lease ends, empty soon
    // after the last.
    let mut released: BTreeMap<String, i64> = BTreeMap::new();
    let latest_end = ends.values().map(|e| e.2).max().unwrap();
    while released.len() < central.len() {
        let now = now_ms();
        assert!(
            now < latest_end + 5_000,
            "not released within 5 s of the lease end: {released:?}"
        );
        for &i in &central {
            let ag = &mut w.agents[i];
            ag.check_applied();
            let (n, first, last) = ends[&ag.id];
            let len = ag.profile_len();
            if now + 300 < first {
                assert!(
                    len == n && ag.running_qos(),
                    "{}: released {} ms before its lease ended",
                    ag.id,
                    first - now
                );
            }
            if len == 0 {
                released
                    .entry(ag.id.clone())
                    .or_insert(now as i64 - last as i64);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("released (ms after the lease end): {released:?}");
    for (id, late) in &released {
        assert!(
            *late >= -300 && *late <= 3_000,
            "{id}: released {late} ms after the lease end"
        );
    }
    // The west region was not cut: its agents still hold their shards
    // (renewed; a renewal may restart the shard host, so running again
    // within a few seconds).
    for ag in w.agents.iter_mut().filter(|ag| ag.group == WEST) {
        assert!(ag.profile_len() > 0, "{} keeps its profile", ag.id);
        wait(
            Duration::from_secs(10),
            &format!("{} runs its shards", ag.id),
            || {
                ag.check_applied();
                ag.running_qos().then_some(())
            },
        );
    }

    // The region returns: its agents reconcile (reports accepted, shards
    // granted again by new instructions and running).
    let applied_before: BTreeMap<String, u64> = central
        .iter()
        .map(|&i| (w.agents[i].id.clone(), w.agents[i].applied_max))
        .collect();
    let back = Instant::now();
    w.cluster.restart(1).expect("node 1 restarts");
    println!(
        "node 1 serves MQTT again {:?} after its restart began",
        back.elapsed()
    );
    for &i in &central {
        let ag = &mut w.agents[i];
        wait(ANSWER_BOUND, &format!("{} reconciled", ag.id), || {
            let applied = ag.check_applied();
            let s = ag.assignment();
            (applied > applied_before[&ag.id]
                && s["routed"] == true
                && s["version"].as_u64() >= Some(version)
                && ag.running_qos())
            .then_some(())
        });
    }
    println!(
        "reconciled {:?} after node 1's restart began",
        back.elapsed()
    );
    for ag in w.agents.iter_mut() {
        // Each group's owner handles its devices' reports.
        let owner = if ag.group == CENTRAL { &w.b } else { &w.a };
        no_loss_no_reuse(owner, ag);
    }
    for ag in w.agents.iter_mut() {
        if let Some(mut p) = ag.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
    w.b.kill9();
    w.a.kill9();
    println!("whole test (after the build) {:?}", w.started.elapsed());
}
