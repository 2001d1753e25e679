//! Shared harness for the service tests: starts the real `shardline-allocator`
//! binary (embedded broker or a real mosquitto), drives `shardctl`, and plays
//! devices with plain rumqttc clients that seal reports and acks with their
//! own keys and verify every instruction with the allocator's public key.
#![allow(dead_code)]

use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
};
use shardline_allocator::service::http;
use shardline_shared::msg::*;
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::{codec, topics, DeviceId};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use xtask::kit::proc::free_stable_tcp_port;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback port for a server the tests kill and start again on the
/// same port (the allocator's MQTT and API listeners): below the kernel's
/// ephemeral range, where no outgoing connection can take it while the
/// server is down (see [`free_stable_tcp_port`]).
pub fn free_restartable_port() -> u16 {
    let port = free_stable_tcp_port();
    assert_ne!(port, 0, "no free TCP port on loopback");
    port
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sl-svc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real mosquitto on a free loopback port (killed on drop).
pub struct Mosquitto {
    child: Child,
    pub port: u16,
}

impl Mosquitto {
    /// `None` (with the reason printed) when mosquitto is not installed.
    pub fn start(dir: &Path) -> Option<Self> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(bin) = bin else {
            println!("SKIP: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        };
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 1000\nlog_dest stderr\nlog_type error\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The guard owns the child from here: it is killed and reaped on every path.
        let guard = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(guard);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not start on port {port}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How the allocator under test reaches its broker.
#[derive(Clone, Debug)]
pub enum BrokerMode {
    Embedded,
    External(String),
}

/// A running allocator process (SIGKILLed on drop).
pub struct Allocator {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub mqtt_port: u16,
    pub api_port: u16,
    pub public_key: [u8; 32],
    pub token: String,
    pub mode: BrokerMode,
    pub extra_config: String,
    /// A shared (PostgreSQL) store instead of the embedded file.
    pub store_url: Option<String>,
    /// Write `[broker] client_id` (true unless a test clears it to see the
    /// id the allocator derives itself).
    pub fixed_client_id: bool,
}

pub fn keygen(path: &Path) -> [u8; 32] {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
        .arg("keygen")
        .arg("--out")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen failed: {:?}", out);
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("public_key "))
        .expect("keygen prints the public key");
    let mut pk = [0u8; 32];
    hex::decode_to_slice(hex.trim(), &mut pk).unwrap();
    pk
}

impl Allocator {
    pub fn start(dir: &Path, mode: BrokerMode, extra_config: &str) -> Self {
        let public_key = keygen(&dir.join("signing.key"));
        Self::spawned(dir, mode, extra_config, None, public_key)
    }

    fn spawned(
        dir: &Path,
        mode: BrokerMode,
        extra_config: &str,
        store_url: Option<&str>,
        public_key: [u8; 32],
    ) -> Self {
        let mut a = Self {
            child: None,
            dir: dir.to_owned(),
            // `spawn` restarts the process on these ports.
            mqtt_port: free_restartable_port(),
            api_port: free_restartable_port(),
            public_key,
            token: String::new(),
            mode,
            extra_config: extra_config.to_owned(),
            store_url: store_url.map(str::to_owned),
            fixed_client_id: true,
        };
        a.spawn();
        a
    }

    /// One of several instances on a shared store: `peer` is an instance
    /// whose signing key this one uses (devices pin one fleet key).
    pub fn start_on_shared_store(
        dir: &Path,
        mode: BrokerMode,
        store_url: &str,
        peer: Option<&Allocator>,
    ) -> Self {
        Self::start_on_shared_store_with(dir, mode, store_url, peer, "")
    }

    /// [`Allocator::start_on_shared_store`] with extra configuration
    /// (inserted in `[broker]`; it may open sections of its own).
    pub fn start_on_shared_store_with(
        dir: &Path,
        mode: BrokerMode,
        store_url: &str,
        peer: Option<&Allocator>,
        extra_config: &str,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("signing.key");
        let public_key = match peer {
            Some(p) => {
                std::fs::copy(p.dir.join("signing.key"), &key).unwrap();
                p.public_key
            }
            None => keygen(&key),
        };
        Self::spawned(dir, mode, extra_config, Some(store_url), public_key)
    }

    pub fn config_text(&self) -> String {
        let shipped = manifest_dir().join("catalog");
        let cat = self.dir.join("catalog");
        std::fs::create_dir_all(&cat).expect("catalog dir");
        std::fs::copy(shipped.join("tiers.toml"), cat.join("tiers.toml")).expect("tiers");
        // The shipped catalog asks each device for the qos shaper's own
        // addresses; these tests enrol devices that never run a shard, so
        // the shaper gets fleet-wide placeholders instead (the per-device
        // configuration path has tests of its own).
        let text = std::fs::read_to_string(shipped.join("catalog.toml")).expect("catalog");
        let per_device =
            "config = \"rate_bps = 20000000\"\ndevice_config = [\"listen\", \"forward\"]";
        assert!(
            text.contains(per_device),
            "the shipped catalog's qos-shaper configuration changed: update service_common"
        );
        let text = text.replace(
            per_device,
            r#"config = "rate_bps = 20000000\nlisten = 127.0.0.1:9\nforward = 127.0.0.1:9""#,
        );
        std::fs::write(cat.join("catalog.toml"), text).expect("write catalog");
        let url = match &self.mode {
            BrokerMode::Embedded => String::new(),
            BrokerMode::External(u) => u.clone(),
        };
        let client_id = if self.fixed_client_id {
            format!("client_id = \"allocator-under-test-{}\"", self.api_port)
        } else {
            String::new()
        };
        format!(
            r#"[broker]
url = "{url}"
listen = "127.0.0.1:{mqtt}"
{client_id}
{broker_extra}
[store]
path = "{dir}/allocator.redb"
{store_url}
[signer]
key_file = "{dir}/signing.key"
[api]
listen = "127.0.0.1:{api}"
token_file = "{dir}/api-token"
[policy]
catalog = "{cat}/catalog.toml"
agreements = "{cat}/tiers.toml"
tick_ms = 200
[dispatch]
resend_after_ms = 2000
"#,
            mqtt = self.mqtt_port,
            api = self.api_port,
            dir = self.dir.display(),
            cat = cat.display(),
            broker_extra = self.extra_config,
            store_url = self
                .store_url
                .as_ref()
                .map(|u| format!("url = \"{u}\""))
                .unwrap_or_default(),
        )
    }

    /// Starts (or restarts) the process on the same store, key and ports.
    pub fn spawn(&mut self) {
        let conf = self.dir.join("allocator.toml");
        std::fs::write(&conf, self.config_text()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("allocator.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
            .arg("run")
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http::request(&self.api_url(), "GET", "/v1/health", None, None) {
                if r.status == 200 {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("allocator exited with {status}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "allocator API not up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.dir.join("api-token"))
            .unwrap()
            .trim()
            .to_owned();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("allocator.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// SIGHUP: the allocator reads its configuration again.
    #[allow(dead_code)] // not every test binary reloads
    pub fn sighup(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(st.success());
    }

    /// The stored owner (server) and version of each assignment group, as
    /// this instance's API answers.
    #[allow(dead_code)] // only the assignment tests read it
    pub fn assignment_owners(&self) -> std::collections::BTreeMap<String, (String, u64)> {
        let (st, v) = self.api("GET", "/v1/assignments", None);
        assert_eq!(st, 200, "{v}");
        v["groups"]
            .as_array()
            .map(|a| {
                a.iter()
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
            })
            .unwrap_or_default()
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let r = http::request(
            &self.api_url(),
            method,
            path,
            Some(&self.token),
            body.as_ref(),
        )
        .unwrap();
        let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
        (r.status, v)
    }

    /// Runs the real `shardctl` binary against this allocator.
    pub fn shardctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .arg("--api")
            .arg(self.api_url())
            .arg("--token-file")
            .arg(self.dir.join("api-token"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Sum of the samples of a metric whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        let r = http::request(&self.api_url(), "GET", "/metrics", None, None).unwrap();
        assert_eq!(r.status, 200);
        r.body
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn wait_metric(&self, prefix: &str, at_least: f64, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(prefix);
            if v >= at_least {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix} = {v}, wanted >= {at_least}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A simulated device: its key, an MQTT client, and the instructions it got.
pub struct Device {
    pub id: DeviceId,
    pub key: KeyPair,
    pub client: AsyncClient,
    pub instr_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    pub seq: u64,
    pub applied: u64,
    /// Which of this connection's QoS 1 publishes the broker acknowledged.
    pub publishes: Arc<Mutex<PublishLog>>,
}

/// A connection's QoS 1 publishes in the order they were first written
/// (a resend after a reconnect keeps its packet id) and the packet ids the
/// broker PUBACKed.
#[derive(Default)]
pub struct PublishLog {
    written: Vec<u16>,
    acked: BTreeSet<u16>,
}

impl PublishLog {
    /// The position (0 = first) of the newest acknowledged publish among
    /// this connection's publishes. Valid while it has made fewer than
    /// rumqttc's 100 in-flight packet ids (no id is reused).
    pub fn newest_acked(&self) -> Option<usize> {
        self.written
            .iter()
            .rposition(|pkid| self.acked.contains(pkid))
    }
}

pub fn device_key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n.wrapping_add(100); 32])
}

impl Device {
    /// Connects (clean session, last will Offline) and subscribes to its instr topic.
    pub async fn connect(id: &str, key: KeyPair, port: u16) -> Self {
        Self::connect_as(id, key, port, None).await
    }

    /// Like [`Device::connect`], logging in to a broker that requires it
    /// (the client id the embedded broker binds to a device's login).
    pub async fn connect_with_login(id: &str, key: KeyPair, port: u16, password: &str) -> Self {
        Self::connect_as(id, key, port, Some(password)).await
    }

    async fn connect_as(id: &str, key: KeyPair, port: u16, password: Option<&str>) -> Self {
        let id = DeviceId::new(id).unwrap();
        let client_id = match password {
            Some(_) => format!("shardline-agent-{id}"),
            None => format!("dev-{id}"),
        };
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some(p) = password {
            opts.set_credentials(id.to_string(), p);
        }
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(2 << 20, 2 << 20);
        opts.set_last_will(LastWill::new(
            topics::status(&id),
            codec::encode(&DeviceStatus {
                device: id.clone(),
                presence: Presence::Offline,
                applied_instruction_seq: 0,
                agent_version: "test".into(),
                at_ms: 0,
            }),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut ev) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<()>();
        let instr = topics::instr(&id);
        let c2 = client.clone();
        let publishes = Arc::new(Mutex::new(PublishLog::default()));
        let log = publishes.clone();
        tokio::spawn(async move {
            loop {
                // The connection lives as long as its `Device` (or until
                // `hang_up`): an event loop left running would reconnect
                // under the same client id and throw out the connection
                // that replaced it, again and again.
                let polled = tokio::select! {
                    _ = tx.closed() => return,
                    polled = ev.poll() => polled,
                };
                match polled {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == instr => {
                        if tx.send(p.payload.to_vec()).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.subscribe(instr.clone(), QoS::AtLeastOnce).await;
                        let _ = conn_tx.send(());
                    }
                    // Refused (a NATS node does so while JetStream elects
                    // leaders): asked again a second later, as the agent does.
                    Ok(Event::Incoming(Packet::SubAck(a)))
                        if a.return_codes.contains(&SubscribeReasonCode::Failure) =>
                    {
                        let (c, topic) = (c2.clone(), instr.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = c.subscribe(topic, QoS::AtLeastOnce).await;
                        });
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut log = log.lock().unwrap();
                        if !log.written.contains(&pkid) {
                            log.written.push(pkid);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        log.lock().unwrap().acked.insert(a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), conn_rx.recv())
            .await
            .expect("device connects")
            .unwrap();
        // Give the subscription a moment to be in place.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Self {
            id,
            key,
            client,
            instr_rx: rx,
            seq: 0,
            applied: 0,
            publishes,
        }
    }

    /// Ends this connection without a DISCONNECT (the broker sees it lost),
    /// before the device connects again under the same client id.
    pub fn hang_up(&mut self) {
        self.instr_rx.close();
    }

    pub async fn publish_status(&self, presence: Presence) {
        let st = DeviceStatus {
            device: self.id.clone(),
            presence,
            applied_instruction_seq: self.applied,
            agent_version: "test".into(),
            at_ms: now_ms(),
        };
        self.client
            .publish(
                topics::status(&self.id),
                QoS::AtLeastOnce,
                true,
                codec::encode(&st),
            )
            .await
            .unwrap();
    }

    /// A report whose traffic needs encryption and low latency (⇒ vpn + qos).
    pub fn report(&mut self) -> QosReport {
        self.seq += 1;
        report_for(&self.id, self.seq, self.applied)
    }

    pub fn seal_report(&self, r: &QosReport) -> Vec<u8> {
        sign::seal(Domain::Report, r, &[&self.key])
    }

    pub async fn send_report(&mut self) -> u64 {
        let r = self.report();
        let bytes = self.seal_report(&r);
        self.publish_raw_report(bytes).await;
        r.seq
    }

    pub async fn publish_raw_report(&self, bytes: Vec<u8>) {
        self.client
            .publish(topics::report(&self.id), QoS::AtLeastOnce, false, bytes)
            .await
            .unwrap();
    }

    pub async fn ack(&mut self, seq: u64, outcome: AckOutcome) {
        if outcome == AckOutcome::Applied {
            self.applied = self.applied.max(seq);
        }
        let ack = InstructionAck {
            device: self.id.clone(),
            instruction_seq: seq,
            outcome,
            at_ms: now_ms(),
        };
        self.client
            .publish(
                topics::ack(&self.id),
                QoS::AtLeastOnce,
                false,
                sign::seal(Domain::Ack, &ack, &[&self.key]),
            )
            .await
            .unwrap();
    }

    /// The next instruction, verified with the allocator's key (rotations skipped).
    pub async fn next_instruction(
        &mut self,
        allocator_key: &[u8; 32],
        within: Duration,
    ) -> Option<(Instruction, Vec<u8>)> {
        let kid = shardline_shared::KeyId::of_public_key(allocator_key);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let bytes = tokio::time::timeout_at(deadline, self.instr_rx.recv())
                .await
                .ok()??;
            let env = sign::parse_envelope(&bytes, 1 << 20).expect("instruction envelope");
            if env.domain == Domain::Rotation {
                continue;
            }
            let (instr, signers) =
                sign::open_envelope::<Instruction>(&env, Domain::Instruction, |id| {
                    (id == kid).then_some(*allocator_key)
                })
                .expect("instruction verifies under the allocator key");
            assert_eq!(signers, vec![kid]);
            assert_eq!(
                instr.device, self.id,
                "instruction addressed to this device"
            );
            return Some((instr, env.payload));
        }
    }
}

pub fn report_for(id: &DeviceId, seq: u64, applied: u64) -> QosReport {
    let now = now_ms();
    QosReport {
        device: id.clone(),
        seq,
        window_start_ms: now.saturating_sub(10_000),
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Sensitive,
            bytes: 2_000_000,
            packets: 2_000,
            rate_bps: 1_600_000,
            rtt_p50_us: Some(20_000),
            rtt_p95_us: Some(40_000),
            jitter_us: Some(2_000),
            loss_permille: 5,
            active_flows: 4,
            need: QosNeed {
                latency_sensitive: true,
                bandwidth_heavy: false,
                needs_encryption: true,
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 100,
            mem_total_kib: 4 << 20,
            mem_available_kib: 3 << 20,
            aes_hw: true,
            arch: "x86_64".into(),
        },
        shards: vec![],
        applied_instruction_seq: applied,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}
