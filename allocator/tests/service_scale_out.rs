//! Scale-out: two real allocator processes share one real PostgreSQL store
//! behind one real mosquitto, reading reports through the shared
//! subscription. Devices enrolled through one instance are served by both;
//! no instruction sequence number is ever used twice for different content,
//! even though either instance may handle any device; after one instance is
//! SIGKILLed the other serves every device, takes over the fleet-wide work,
//! and continues each device's numbering above everything already sent.

mod service_common;

use service_common::*;
use shardline_shared::msg::{AckOutcome, Presence};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const DEVICES: usize = 6;

/// seq ⇒ signed payload per device; panics on a number reused for other content.
#[derive(Default)]
struct Seen(BTreeMap<usize, BTreeMap<u64, Vec<u8>>>);

impl Seen {
    fn record(&mut self, d: usize, seq: u64, payload: Vec<u8>) {
        let per = self.0.entry(d).or_default();
        if let Some(prev) = per.get(&seq) {
            assert_eq!(
                prev, &payload,
                "device {d}: sequence {seq} reused for another instruction"
            );
        }
        per.insert(seq, payload);
    }
    fn max(&self, d: usize) -> u64 {
        self.0
            .get(&d)
            .and_then(|m| m.keys().next_back().copied())
            .unwrap_or(0)
    }
}

/// Takes every instruction that arrives within `wait` of the previous one,
/// acks it applied, and records it.
async fn drain(dev: &mut Device, key: &[u8; 32], seen: &mut Seen, d: usize, wait: Duration) {
    while let Some((instr, payload)) = dev.next_instruction(key, wait).await {
        seen.record(d, instr.seq, payload);
        dev.ack(instr.seq, AckOutcome::Applied).await;
    }
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_allocators_share_one_postgres_store_and_one_survives_the_other() {
    let dir = TempDir::new("scale-out");
    let Some(mosquitto) = Mosquitto::start(&dir.0) else {
        return;
    };
    let pg = match xtask::kit::postgres::TestPostgres::start(&dir.0.join("pg")) {
        Ok(pg) => pg,
        Err(e) => {
            println!("SKIP: no PostgreSQL server can be started here: {e}");
            return;
        }
    };
    let broker = BrokerMode::External(format!("mqtt://127.0.0.1:{}", mosquitto.port));
    let mut a = Allocator::start_on_shared_store(&dir.0.join("a"), broker.clone(), &pg.url(), None);
    let b = Allocator::start_on_shared_store(&dir.0.join("b"), broker, &pg.url(), Some(&a));
    let key = a.public_key;

    // Enrol through A only; B learns of the devices from the store.
    let mut devs = Vec::new();
    for d in 0..DEVICES {
        let k = device_key(d as u8);
        let (st, body) = a.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({
                "device": format!("scale-{d}"), "public_key": hex::encode(k.public_key()), "tier": "standard"
            })),
        );
        assert_eq!(st, 200, "{body}");
        devs.push((d, k));
    }
    wait_until("B to know every device", Duration::from_secs(10), || {
        (0..DEVICES).all(|d| b.api("GET", &format!("/v1/devices/scale-{d}"), None).0 == 200)
    });
    let mut devices = Vec::new();
    for (d, k) in devs {
        let dev = Device::connect(&format!("scale-{d}"), k, mosquitto.port).await;
        dev.publish_status(Presence::Online).await;
        devices.push(dev);
    }

    // Several rounds of reports: the broker spreads them over both instances.
    let mut seen = Seen::default();
    for _round in 0..8 {
        for dev in devices.iter_mut() {
            dev.send_report().await;
        }
        for (d, dev) in devices.iter_mut().enumerate() {
            drain(dev, &key, &mut seen, d, Duration::from_millis(150)).await;
        }
    }
    let accepted = |x: &Allocator| x.metric("shardline_reports_accepted_total");
    let (on_a, on_b) = (accepted(&a), accepted(&b));
    assert!(
        on_a >= 1.0 && on_b >= 1.0,
        "both instances took reports (A {on_a}, B {on_b}); logs:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        on_a + on_b,
        (DEVICES * 8) as f64,
        "every report accepted exactly once across the two instances"
    );
    for d in 0..DEVICES {
        assert!(seen.max(d) >= 1, "device {d} got its activation");
    }

    // Kill A mid-stream; B serves everything and leads the fleet-wide work.
    for dev in devices.iter_mut() {
        dev.send_report().await;
    }
    a.kill9();
    let before = accepted(&b);
    for _round in 0..4 {
        for dev in devices.iter_mut() {
            dev.send_report().await;
        }
        for (d, dev) in devices.iter_mut().enumerate() {
            drain(dev, &key, &mut seen, d, Duration::from_millis(150)).await;
        }
    }
    // Reports A took but had not acknowledged are redelivered to B or lost
    // with A's session; the four rounds after the kill all reach B.
    b.wait_metric(
        "shardline_reports_accepted_total",
        before + (DEVICES * 4) as f64,
        Duration::from_secs(20),
    );
    // New decisions after the kill: numbering continues above everything
    // either instance ever sent, for every device.
    for (d, dev) in devices.iter_mut().enumerate() {
        let max_before = seen.max(d);
        let (st, body) = b.api("POST", &format!("/v1/devices/scale-{d}/drain"), None);
        assert_eq!(st, 200, "{body}");
        let (instr, payload) = dev
            .next_instruction(&key, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("device {d}: no instruction from B; log:\n{}", b.log()));
        seen.record(d, instr.seq, payload);
        assert!(
            instr.seq > max_before,
            "device {d}: {} is not above {max_before}",
            instr.seq
        );
        dev.ack(instr.seq, AckOutcome::Applied).await;
    }
    // The store holds B's view: every device's applied sequence caught up.
    wait_until("B to record every ack", Duration::from_secs(10), || {
        (0..DEVICES).all(|d| {
            let (_, v) = b.api("GET", &format!("/v1/devices/scale-{d}"), None);
            v["applied_instruction_seq"].as_u64() == Some(seen.max(d))
        })
    });
    println!(
        "scale-out: A accepted {on_a}, B accepted {on_b} before the kill; conflicts on B {}, reloads on B {}",
        b.metric("shardline_store_conflicts_total"),
        b.metric("shardline_store_reloads_total")
    );
}
