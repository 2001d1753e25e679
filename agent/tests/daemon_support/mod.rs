//! Shared fixtures of the daemon integration tests: a real mosquitto broker
//! on a free loopback port (persistence on, killable with SIGKILL and
//! restartable on the same port; or with the shipped fleet settings of
//! `packaging/mosquitto/`: logins, ACL, size cap), the real agent binary as
//! a child process, and a "cloud" side that is a plain rumqttc client
//! sealing instructions with a test allocator key.
#![allow(dead_code)]

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shardline_shared::msg::{Activation, InstructionAck, QosReport, ResourceLimits, ShardKind};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::DeviceId;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use xtask::kit::proc::free_stable_tcp_port;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
pub const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";

/// The shipped mosquitto settings (`packaging/mosquitto/`).
pub fn shipped_mosquitto_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/mosquitto")
        .join(name)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The test allocator's signing key.
pub fn allocator_key() -> KeyPair {
    KeyPair::from_seed(&[42; 32])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback port for a server the tests kill and start again on the
/// same port (the [`Broker`]): below the kernel's ephemeral range, where no
/// outgoing connection can take it while the server is down (see
/// [`free_stable_tcp_port`]).
pub fn free_restartable_port() -> u16 {
    let port = free_stable_tcp_port();
    assert_ne!(port, 0, "no free TCP port on loopback");
    port
}

/// A mosquitto process; killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
}

impl Broker {
    /// Starts mosquitto, or returns `None` (after printing why) when it is
    /// not installed.
    pub fn start(dir: &Path) -> Option<Broker> {
        Self::start_with(dir, "")
    }

    /// Like [`Broker::start`], with extra configuration lines (e.g. a TLS
    /// listener) appended.
    pub fn start_with(dir: &Path, extra_conf: &str) -> Option<Broker> {
        if !Path::new(MOSQUITTO).exists() {
            eprintln!("SKIP: {MOSQUITTO} is not installed (apt-get install mosquitto)");
            return None;
        }
        let port = free_restartable_port();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\n\
                 max_inflight_messages 100\nuser root\nlog_dest stderr\n{extra_conf}",
                data.display()
            ),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf,
            log,
        };
        b.restart();
        Some(b)
    }

    /// Starts mosquitto with the shipped fleet settings
    /// (`packaging/mosquitto/shardline.conf` and `shardline.acl`, their
    /// `/etc/mosquitto/` paths moved into `dir`, and the per-listener lines
    /// of `listener.conf.example` on a plain loopback listener) and a
    /// password file holding `users` (made with the real `mosquitto_passwd`).
    /// `acl_extra` is appended to the ACL (e.g. a second allocator-like user).
    pub fn start_shipped(dir: &Path, users: &[(&str, &str)], acl_extra: &str) -> Option<Broker> {
        for bin in [MOSQUITTO, MOSQUITTO_PASSWD] {
            if !Path::new(bin).exists() {
                eprintln!("SKIP: {bin} is not installed (apt-get install mosquitto)");
                return None;
            }
        }
        let etc = dir.join("etc-mosquitto");
        std::fs::create_dir_all(&etc).unwrap();
        let passwd = etc.join("shardline.passwd");
        std::fs::write(&passwd, "").unwrap();
        for (user, password) in users {
            let st = Command::new(MOSQUITTO_PASSWD)
                .arg("-b")
                .arg(&passwd)
                .args([user, password])
                .status()
                .unwrap();
            assert!(st.success(), "mosquitto_passwd {user}");
        }
        let acl = std::fs::read_to_string(shipped_mosquitto_file("shardline.acl")).unwrap();
        std::fs::write(etc.join("shardline.acl"), format!("{acl}\n{acl_extra}\n")).unwrap();
        let conf = std::fs::read_to_string(shipped_mosquitto_file("shardline.conf"))
            .unwrap()
            .replace("/etc/mosquitto/", &format!("{}/", etc.display()));
        // The listener-level settings of the example (not its TLS files).
        let listener: String =
            std::fs::read_to_string(shipped_mosquitto_file("listener.conf.example"))
                .unwrap()
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    !l.is_empty()
                        && !l.starts_with('#')
                        && !["listener ", "certfile ", "keyfile "]
                            .iter()
                            .any(|k| l.starts_with(k))
                })
                .map(|l| format!("{l}\n"))
                .collect();
        assert!(listener.contains("use_username_as_clientid true"));
        let port = free_restartable_port();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(
            &conf_path,
            format!(
                "{conf}\nlistener {port} 127.0.0.1\n{listener}\npersistence true\n\
                 persistence_location {}/\nuser root\nlog_dest stderr\n",
                data.display()
            ),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf: conf_path,
            log: dir.join("mosquitto.log"),
        };
        b.restart();
        Some(b)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGHUP: mosquitto re-reads its password and ACL files.
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    /// Sets a user's password in the password file of [`Broker::start_shipped`]
    /// (takes effect with [`Broker::reload`]).
    pub fn set_password(&self, user: &str, password: &str) {
        let passwd = self
            .conf
            .parent()
            .unwrap()
            .join("etc-mosquitto/shardline.passwd");
        let st = Command::new(MOSQUITTO_PASSWD)
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .unwrap();
        assert!(st.success(), "mosquitto_passwd {user}");
    }

    /// (Re)starts the broker on the same port and waits until it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no clean shutdown, no final persistence save.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A device under test: its directory, config and (when running) process.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub device: DeviceId,
    pub public_key: [u8; 32],
    child: Option<Child>,
    log: PathBuf,
    /// The binary `start` runs: cargo's build for this profile unless a
    /// bench points it at another build.
    pub binary: PathBuf,
}

impl Agent {
    /// Writes the agent's config (and extra TOML appended verbatim) and
    /// creates its device key through the real `check-config --print-pubkey`.
    pub fn new(dir: &Path, device: &str, broker_url: &str, window_ms: u32, extra: &str) -> Agent {
        Self::new_with_broker(dir, device, broker_url, window_ms, "", extra)
    }

    /// Like [`Agent::new`], with extra lines in the `[broker]` table (e.g.
    /// `password_file`).
    pub fn new_with_broker(
        dir: &Path,
        device: &str,
        broker_url: &str,
        window_ms: u32,
        broker_extra: &str,
        extra: &str,
    ) -> Agent {
        let state = dir.join("state");
        let config = dir.join("agent.toml");
        // Every test agent gets a request socket of its own (the default
        // under /run is one per machine); a test that configures requests
        // names the socket itself.
        let requests = if extra.contains("[requests]") {
            String::new()
        } else {
            format!(
                "\n[requests]\nsocket = \"{}\"\n",
                dir.join("agent.sock").display()
            )
        };
        // `run` refuses a configuration whose shard directory is missing.
        std::fs::create_dir_all(dir.join("shards")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"{device}\"\nkey_file = \"{}\"\n\n\
                 [allocator]\nkeys = [\"{}\"]\n\n\
                 [broker]\nurl = \"{broker_url}\"\nkeep_alive_s = 5\n\
                 reconnect_min_ms = 50\nreconnect_max_ms = 400\n{broker_extra}\n\
                 [monitor]\nwindow_ms = {window_ms}\n\n\
                 [shards]\ndir = \"{}\"\n\n\
                 [state]\ndir = \"{}\"\n{extra}{requests}",
                dir.join("device.key").display(),
                hex::encode(allocator_key().public_key()),
                dir.join("shards").display(),
                state.display(),
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
            .args(["check-config", "--print-pubkey", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hex_key = String::from_utf8(out.stdout).unwrap();
        let public_key: [u8; 32] = hex::decode(hex_key.trim()).unwrap().try_into().unwrap();
        Agent {
            dir: dir.to_owned(),
            config,
            device: DeviceId::new(device).unwrap(),
            public_key,
            child: None,
            log: dir.join("agent.log"),
            binary: PathBuf::from(env!("CARGO_BIN_EXE_shardline-agent")),
        }
    }

    pub fn start(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.binary);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("SHARDLINE_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start the agent"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the process to exit by itself (e.g. the crash hook).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.wait_exit(Duration::from_secs(10))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn state(&self) -> serde_json::Value {
        let p = self.dir.join("state/state.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let p = self.dir.join("state/status.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    pub fn applied_seq(&self) -> u64 {
        self.state()["acceptance"]["last_applied_seq"]
            .as_u64()
            .unwrap()
    }

    pub fn profile_shards(&self) -> Vec<String> {
        self.state()["profile"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                // Format 2 keeps ShardActivations (the primary's ref).
                let shard = if a["primary"].is_object() {
                    &a["primary"]["shard"]
                } else {
                    &a["shard"]
                };
                format!(
                    "{}@{}",
                    shard["id"].as_str().unwrap(),
                    shard["version"].as_str().unwrap()
                )
            })
            .collect()
    }

    pub fn open_report(&self, bytes: &[u8]) -> QosReport {
        let pk = self.public_key;
        sign::open(bytes, Domain::Report, 1 << 20, |_| Some(pk))
            .expect("report signed by the device key")
            .0
    }

    pub fn open_ack(&self, bytes: &[u8]) -> InstructionAck {
        let pk = self.public_key;
        sign::open(bytes, Domain::Ack, 1 << 20, |_| Some(pk))
            .expect("ack signed by the device key")
            .0
    }

    pub fn dump_log_on_failure(&self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.dump_log_on_failure();
        self.kill9();
    }
}

/// The cloud side: a plain MQTT client that sees everything a device says.
pub struct Cloud {
    pub client: AsyncClient,
    rx: mpsc::Receiver<(String, Vec<u8>)>,
    rt: tokio::runtime::Runtime,
}

impl Cloud {
    /// Connects with a persistent session and subscribes (QoS 1) to the
    /// device's report, ack and status topics; waits for the SUBACK.
    pub fn connect(port: u16, device: &DeviceId) -> Cloud {
        Self::connect_as(port, device, None)
    }

    /// Like [`Cloud::connect`], logged in as `(username, password)`.
    pub fn connect_as(port: u16, device: &DeviceId, login: Option<(&str, &str)>) -> Cloud {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = MqttOptions::new(
            format!("test-cloud-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let topics = [
            shardline_shared::topics::report(device),
            shardline_shared::topics::ack(device),
            shardline_shared::topics::status(device),
        ];
        let c2 = client.clone();
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &topics {
                            let _ = c2.subscribe(t.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for _ in 0..3 {
            sub_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("cloud client subscribed");
        }
        Cloud { client, rx, rt }
    }

    pub fn recv(&self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for the next message on a topic ending with `kind`, skipping others.
    pub fn recv_kind(&self, kind: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (topic, payload) = self.recv(left)?;
            if topic.ends_with(kind) {
                return Some(payload);
            }
        }
    }

    /// Drains everything that arrives within `window`.
    pub fn drain(&self, window: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    pub fn send_instruction(&self, device: &DeviceId, bytes: Vec<u8>) {
        let topic = shardline_shared::topics::instr(device);
        self.rt
            .block_on(self.client.publish(topic, QoS::AtLeastOnce, false, bytes))
            .unwrap();
    }
}

pub fn activation(shard: &str, capability: &str, lease_expires_at_ms: u64) -> Activation {
    Activation {
        shard: shard.parse().unwrap(),
        capability: capability.into(),
        kind: ShardKind::Compute,
        sha256: [7; 32],
        config: Vec::new(),
        limits: ResourceLimits {
            cpu_quota_permille: 200,
            cpu_weight: 100,
            memory_max_bytes: 64 << 20,
            nice: 5,
        },
        priority: 1,
        lease_expires_at_ms,
    }
}

/// Polls `f` until it returns `Some` or the timeout passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Appends a line to a file (test diagnostics).
pub fn note(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Writes a classic pcap (Ethernet) with `flows` UDP flows, two packets each
/// (one per direction), spread over one second.
pub fn write_udp_flows_pcap(path: &Path, flows: u32) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut head = Vec::new();
    head.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    head.extend_from_slice(&2u16.to_le_bytes());
    head.extend_from_slice(&4u16.to_le_bytes());
    head.extend_from_slice(&0i32.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&65535u32.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes());
    f.write_all(&head).unwrap();
    let base_s: u32 = 1_800_000_000;
    for i in 0..flows {
        let client = [10, 1, (i >> 8) as u8, i as u8];
        let server = [192, 0, 2, 10];
        let cport = 20_000 + (i % 40_000) as u16;
        for (n, (src, dst, sport, dport)) in [
            (client, server, cport, 5004u16),
            (server, client, 5004u16, cport),
        ]
        .into_iter()
        .enumerate()
        {
            let usec = (u64::from(i) * 1_000_000 / u64::from(flows)) as u32 + n as u32;
            let frame = udp_frame(src, dst, sport, dport, 120);
            let mut rec = Vec::new();
            rec.extend_from_slice(&base_s.to_le_bytes());
            rec.extend_from_slice(&usec.min(999_999).to_le_bytes());
            rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            f.write_all(&rec).unwrap();
            f.write_all(&frame).unwrap();
        }
    }
    f.flush().unwrap();
}

fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut fr = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = 20 + 8 + payload;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10] = (sum >> 8) as u8;
    ip[11] = sum as u8;
    fr.extend_from_slice(&ip);
    let ulen = (8 + payload) as u16;
    fr.extend_from_slice(&sport.to_be_bytes());
    fr.extend_from_slice(&dport.to_be_bytes());
    fr.extend_from_slice(&ulen.to_be_bytes());
    fr.extend_from_slice(&[0, 0]);
    fr.extend(std::iter::repeat_n(0xabu8, payload));
    fr
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// What a [`Peer`]'s connection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Connected,
    /// The broker refused the CONNECT, or the connection ended; the text is
    /// rumqttc's error. A peer never reconnects, so this is its last event.
    Down(String),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
}

/// Another client on the broker (an attacker, a neighbour, a stand-in for
/// the allocator): connects once, never reconnects, reports everything.
pub struct Peer {
    pub client: AsyncClient,
    rx: mpsc::Receiver<PeerEvent>,
    rt: tokio::runtime::Runtime,
    down: Option<String>,
}

impl Peer {
    /// Connects with a clean session; `Err` with the reason when the broker
    /// refuses (or nothing answers within 5 s).
    pub fn connect(
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Peer, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(1000);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 20_000);
        let (tx, rx) = mpsc::channel();
        rt.spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => PeerEvent::Connected,
                    Ok(Event::Incoming(Packet::SubAck(s))) => PeerEvent::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => PeerEvent::Message {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(PeerEvent::Down(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(PeerEvent::Connected) => Ok(Peer {
                client,
                rx,
                rt,
                down: None,
            }),
            Ok(PeerEvent::Down(e)) => Err(e),
            Ok(other) => Err(format!("unexpected first event {other:?}")),
            Err(_) => Err("no CONNACK within 5 s".into()),
        }
    }

    /// Queues a publish (does not wait for the broker).
    pub fn publish(&self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) {
        self.rt
            .block_on(self.client.publish(topic, qos, retain, payload))
            .unwrap();
    }

    /// Subscribes and returns the SUBACK's codes.
    pub fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.rt
            .block_on(self.client.subscribe(filter, QoS::AtLeastOnce))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("SUBACK");
            match self.rx.recv_timeout(left).expect("SUBACK") {
                PeerEvent::SubAck(codes) => return codes,
                PeerEvent::Down(e) => panic!("connection ended before the SUBACK: {e}"),
                _ => {}
            }
        }
    }

    /// Messages received within `window` (and notes a lost connection).
    pub fn drain(&mut self, window: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(PeerEvent::Message { topic, payload }) => out.push((topic, payload)),
                Ok(PeerEvent::Down(e)) => self.down = Some(e),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        out
    }

    /// Waits up to `timeout` for the connection to end; its error, if it did.
    pub fn wait_down(&mut self, timeout: Duration) -> Option<String> {
        if self.down.is_none() {
            self.drain(timeout);
        }
        self.down.clone()
    }
}

/// The agent's `status.json` counter `field` (0 when absent).
pub fn status_counter(agent: &Agent, field: &str) -> u64 {
    agent.status().and_then(|s| s[field].as_u64()).unwrap_or(0)
}
