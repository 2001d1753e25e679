//! The embedded broker (rumqttd 0.20, `allocator/src/service/broker.rs`)
//! against hostile neighbours (issue 14): its 1 MiB packet cap and its
//! logins, exercised with plain MQTT clients and the real agent binary
//! logging in with its password file. rumqttd runs in this test process on
//! its own thread (it has no shutdown; the process ending stops it).
//!
//! The last check documents why the service puts `broker_acl` in front of
//! rumqttd: rumqttd 0.20 alone has no topic authorization, so a logged-in
//! device can publish on another device's topics (the front's own test is
//! `allocator/tests/service_hardening.rs`). If a later rumqttd closes that
//! gap, this test fails and SECURITY.md must change with it.

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};
use shardline_allocator::service::broker;
use shardline_allocator::service::config::BrokerConfig;
use shardline_tests::kit::proc::free_tcp_port;
use shardline_tests::{profile_dir, wait_until, workspace_root};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PW_A: &str = "gw-a-password-0123456789";
const PW_B: &str = "gw-b-password-9876543210";
const PW_ALLOC: &str = "allocator-password-abcdef";

/// A plain client: connects once (no reconnect), reports what happened.
struct Peer {
    client: Client,
    conn: Connection,
}

impl Peer {
    fn connect(port: u16, client_id: &str, login: Option<(&str, &str)>) -> Result<Peer, String> {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            // What the allocator's own client accepts with the default
            // max_payload: max(4 x 64 KiB, 1 MiB) + 1 KiB.
            .set_max_packet_size((1 << 20) + 1024, 4 << 20);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut conn) = Client::new(o, 100);
        match conn.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok(Peer { client, conn }),
            Ok(Ok(other)) => Err(format!("unexpected {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no CONNACK within 5 s".into()),
        }
    }

    /// Events until `window` passes or the connection ends (then `Err`).
    fn events(&mut self, window: Duration) -> Result<Vec<Event>, (Vec<Event>, String)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.conn.recv_timeout(left) {
                Ok(Ok(ev)) => out.push(ev),
                Ok(Err(e)) => return Err((out, e.to_string())),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    fn messages(&mut self, window: Duration) -> Vec<(String, usize)> {
        let evs = match self.events(window) {
            Ok(evs) => evs,
            Err((evs, e)) => panic!("connection lost: {e} (after {evs:?})"),
        };
        evs.into_iter()
            .filter_map(|ev| match ev {
                Event::Incoming(Packet::Publish(p)) => Some((p.topic.clone(), p.payload.len())),
                _ => None,
            })
            .collect()
    }
}

/// The agent binary of this run, built if a previous step did not.
fn agent_binary() -> PathBuf {
    let bin = profile_dir().join("shardline-agent");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["build", "-p", "shardline-agent", "--bin", "shardline-agent"])
            .env("CARGO_TARGET_DIR", profile_dir().parent().unwrap())
            .status()
            .expect("cargo build");
        assert!(st.success(), "building the agent");
    }
    bin
}

fn agent_status(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("state/status.json")).ok()
}

fn counter(dir: &Path, field: &str) -> u64 {
    let text = agent_status(dir).unwrap_or_default();
    // status.json is one line of JSON written by the agent; read one field.
    text.split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

struct KillOnDrop(Child, PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ----\n{}",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
    }
}

#[test]
fn embedded_broker_caps_packets_and_requires_logins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let creds = dir.join("broker-credentials");
    std::fs::write(
        &creds,
        format!(
            "# test fleet\ndevice gw-a {PW_A}\ndevice gw-b {PW_B}\nallocator alloc {PW_ALLOC}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_tcp_port();
    let cfg = BrokerConfig {
        listen: ([127, 0, 0, 1], port).into(),
        ..BrokerConfig::default()
    };
    broker::start_embedded_with(&cfg, Some(&creds)).expect("embedded broker starts");

    // Logins.
    assert!(
        Peer::connect(port, "anon", None).is_err(),
        "anonymous refused"
    );
    assert!(
        Peer::connect(
            port,
            "shardline-agent-gw-a",
            Some(("gw-a", "wrong-password-000"))
        )
        .is_err(),
        "wrong password refused"
    );
    assert!(
        Peer::connect(port, "shardline-agent-gw-a", Some(("gw-b", PW_B))).is_err(),
        "gw-b may not use gw-a's client id (session takeover)"
    );
    assert!(
        Peer::connect(port, "shardline-agent-gw-a", Some(("alloc", PW_ALLOC))).is_err(),
        "nor may an allocator"
    );
    let mut alloc = Peer::connect(port, "alloc-1", Some(("alloc", PW_ALLOC))).expect("allocator");
    alloc
        .client
        .subscribe("shardline/v1/dev/+/report", QoS::AtLeastOnce)
        .unwrap();
    alloc
        .client
        .subscribe("shardline/v1/dev/+/status", QoS::AtLeastOnce)
        .unwrap();

    // The real agent logs in with its password file.
    let pw = dir.join("mqtt-password");
    std::fs::write(&pw, format!("{PW_A}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The agent refuses to start without its shard directory (even empty).
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"gw-a\"\nkey_file = \"{}\"\n\n[allocator]\nkeys = [\"{}\"]\n\n\
             [broker]\nurl = \"mqtt://127.0.0.1:{port}\"\npassword_file = \"{}\"\n\
             keep_alive_s = 5\nreconnect_min_ms = 50\nreconnect_max_ms = 400\n\n\
             [monitor]\nwindow_ms = 100\n\n[shards]\ndir = \"{}\"\n\n[state]\ndir = \"{}\"\n\n\
             [requests]\nsocket = \"{}\"\n",
            dir.join("device.key").display(),
            "11".repeat(32),
            pw.display(),
            dir.join("shards").display(),
            dir.join("state").display(),
            dir.join("agent.sock").display(),
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let child = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("SHARDLINE_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the agent");
    let _agent = KillOnDrop(child, log);
    let got_report = wait_until(Duration::from_secs(10), Duration::ZERO, || {
        alloc
            .messages(Duration::from_millis(200))
            .iter()
            .any(|(t, _)| t == "shardline/v1/dev/gw-a/report")
            .then_some(())
    });
    assert!(got_report.is_some(), "the agent logged in and reports");

    // Size: 500 KiB reaches the agent (counted, dropped; it stays
    // connected); 2 MiB costs the publisher its connection.
    let mut evil = Peer::connect(port, "evil-1", Some(("alloc", PW_ALLOC))).unwrap();
    evil.client
        .publish(
            "shardline/v1/dev/gw-a/instr",
            QoS::AtLeastOnce,
            false,
            vec![1u8; 500 << 10],
        )
        .unwrap();
    assert!(
        evil.events(Duration::from_secs(1)).is_ok(),
        "500 KiB is under the cap"
    );
    evil.client
        .publish(
            "shardline/v1/dev/gw-a/instr",
            QoS::AtLeastOnce,
            false,
            vec![2u8; 2 << 20],
        )
        .unwrap();
    assert!(
        evil.events(Duration::from_secs(5)).is_err(),
        "a 2 MiB publish costs its publisher the connection"
    );
    // A retained status just under the cap is readable by the allocator's
    // client; one above it never arrives.
    let mut evil = Peer::connect(port, "evil-2", Some(("alloc", PW_ALLOC))).unwrap();
    evil.client
        .publish(
            "shardline/v1/dev/gw-x/status",
            QoS::AtLeastOnce,
            true,
            vec![3u8; 1000 << 10],
        )
        .unwrap();
    let _ = evil.events(Duration::from_millis(500));
    let mut evil = Peer::connect(port, "evil-3", Some(("alloc", PW_ALLOC))).unwrap();
    evil.client
        .publish(
            "shardline/v1/dev/gw-y/status",
            QoS::AtLeastOnce,
            true,
            vec![4u8; 2 << 20],
        )
        .unwrap();
    assert!(evil.events(Duration::from_secs(5)).is_err());
    let seen = alloc.messages(Duration::from_secs(1));
    assert!(
        seen.iter()
            .any(|(t, n)| t.ends_with("gw-x/status") && *n == 1000 << 10),
        "the allocator's client reads a status just under the cap: {seen:?}"
    );
    assert!(!seen.iter().any(|(t, _)| t.ends_with("gw-y/status")));
    let malformed = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let s = agent_status(dir)?;
        s.contains("\"malformed\":1").then_some(())
    });
    assert!(
        malformed.is_some(),
        "the agent counted the 500 KiB instruction"
    );
    assert_eq!(counter(dir, "connects"), 1, "the agent never reconnected");
    assert_eq!(counter(dir, "link_drops"), 0);

    // The documented limit: no topic authorization in rumqttd 0.20.
    let mut b = Peer::connect(port, "shardline-agent-gw-b", Some(("gw-b", PW_B))).unwrap();
    b.client
        .publish(
            "shardline/v1/dev/gw-a/report",
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .unwrap();
    let _ = b.events(Duration::from_millis(300));
    let seen = alloc.messages(Duration::from_secs(1));
    assert!(
        seen.iter()
            .any(|(t, n)| t == "shardline/v1/dev/gw-a/report" && *n == 6),
        "rumqttd now refuses foreign topics: update SECURITY.md (Limits) and this test"
    );
}
