//! The shipped mosquitto settings (`packaging/mosquitto/shardline.conf`)
//! load in the real mosquitto and keep an allocator's queued reports: a
//! persistent allocator session that is away while devices publish more than
//! mosquitto's default queue (1000 QoS 1 messages) gets every one of them
//! when it comes back. The same run with the queue lines taken out (the
//! default limits) loses most of them, which is what the shipped lines are
//! for and shows that this test can fail.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";
/// More than mosquitto's default `max_queued_messages` (1000).
const REPORTS: usize = 3_000;
const ALLOCATOR: (&str, &str) = ("shardline-allocator", "allocator-secret");
const DEVICE: (&str, &str) = ("queue-dev-1", "device-secret");

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/mosquitto")
        .join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Mosquitto with the shipped conf and ACL (their `/etc/mosquitto/` paths
/// moved into `dir`), the listener lines of `listener.conf.example` on a
/// plain loopback port, and `keep_queue_lines` = false dropping the
/// `max_queued_*` lines (mosquitto's defaults).
fn start(dir: &Path, keep_queue_lines: bool) -> (Broker, u16) {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let passwd = etc.join("shardline.passwd");
    std::fs::write(&passwd, "").unwrap();
    for (user, password) in [ALLOCATOR, DEVICE] {
        let st = Command::new(MOSQUITTO_PASSWD)
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .unwrap();
        assert!(st.success(), "mosquitto_passwd {user}");
    }
    std::fs::copy(shipped("shardline.acl"), etc.join("shardline.acl")).unwrap();
    let conf: String = std::fs::read_to_string(shipped("shardline.conf"))
        .unwrap()
        .replace("/etc/mosquitto/", &format!("{}/", etc.display()))
        .lines()
        .filter(|l| keep_queue_lines || !l.starts_with("max_queued_"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        conf.contains("password_file"),
        "the shipped conf, not a stand-in"
    );
    let listener: String = std::fs::read_to_string(shipped("listener.conf.example"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('#')
                && !["listener ", "certfile ", "keyfile "]
                    .iter()
                    .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let port = free_port();
    let path = dir.join("mosquitto.conf");
    std::fs::write(
        &path,
        format!("{conf}\nlistener {port} 127.0.0.1\n{listener}\npersistence false\nuser root\nlog_dest stderr\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let broker = Broker(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start with the shipped config: {}",
            std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (broker, port)
}

fn options(who: (&str, &str), port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(who.0, "127.0.0.1", port);
    o.set_credentials(who.0, who.1);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o.set_inflight(100);
    o
}

/// Waits for the ConnAck; returns its session-present flag.
async fn connected(ev: &mut rumqttc::EventLoop) -> bool {
    loop {
        match ev.poll().await.expect("connect") {
            Event::Incoming(Packet::ConnAck(c)) => return c.session_present,
            _ => continue,
        }
    }
}

/// Reports the allocator's persistent session received after being away
/// while the device published [`REPORTS`] of them.
async fn queued_for_away_allocator(port: u16) -> usize {
    // The allocator subscribes (persistent session), then goes away.
    let (alloc, mut ev) = AsyncClient::new(options(ALLOCATOR, port), 100);
    connected(&mut ev).await;
    alloc
        .subscribe("shardline/v1/dev/+/report", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(s)) = ev.poll().await.unwrap() {
            assert!(
                matches!(s.return_codes[0], rumqttc::SubscribeReasonCode::Success(_)),
                "the shipped ACL lets the allocator read reports: {s:?}"
            );
            break;
        }
    }
    alloc.disconnect().await.unwrap();
    while ev.poll().await.is_ok() {}
    drop(ev);

    // A device publishes its reports (QoS 1, every one acked by the broker).
    let (dev, mut dev_ev) = AsyncClient::new(options(DEVICE, port), REPORTS + 10);
    connected(&mut dev_ev).await;
    let payload = vec![0x5a; 600];
    for _ in 0..REPORTS {
        dev.publish(
            format!("shardline/v1/dev/{}/report", DEVICE.0),
            QoS::AtLeastOnce,
            false,
            payload.clone(),
        )
        .await
        .unwrap();
    }
    let mut acked = 0;
    while acked < REPORTS {
        if let Event::Incoming(Packet::PubAck(_)) = dev_ev.poll().await.unwrap() {
            acked += 1;
        }
    }

    // The allocator comes back to its session.
    let (_alloc, mut ev) = AsyncClient::new(options(ALLOCATOR, port), 100);
    assert!(
        connected(&mut ev).await,
        "the allocator's session persisted"
    );
    let mut got = 0;
    while got < REPORTS {
        // Queued messages flow back to back; 3 s of silence means the rest
        // was dropped.
        match tokio::time::timeout(Duration::from_secs(3), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("allocator connection failed: {e}"),
            // Nothing more is coming: the rest was dropped.
            Err(_) => break,
        }
    }
    got
}

#[test]
fn shipped_config_keeps_an_away_allocators_queued_reports() {
    for bin in [MOSQUITTO, MOSQUITTO_PASSWD] {
        if !Path::new(bin).exists() {
            println!("SKIP: {bin} is not installed (apt-get install mosquitto)");
            return;
        }
    }
    let version = Command::new(MOSQUITTO).arg("-h").output().unwrap();
    println!(
        "{}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or_default()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_broker, port) = start(&dir.path().join("shipped"), true);
    let got = rt.block_on(queued_for_away_allocator(port));
    assert_eq!(got, REPORTS, "every queued report reached the allocator");

    // Control: mosquitto's default queue limit drops the rest silently.
    let (_default, port) = start(&dir.path().join("default"), false);
    let got = rt.block_on(queued_for_away_allocator(port));
    assert!(
        got <= 1_100,
        "with the default limits mosquitto keeps ~1000 (got {got}): the test would notice"
    );
}
