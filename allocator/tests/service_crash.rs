//! Crash safety: the real allocator process is SIGKILLed while devices stream
//! reports and instructions are in flight, then restarted on the same store.
//! No instruction sequence number is ever reused for different content, no
//! device state is lost, and the instructions pending at the crash are still
//! delivered (on the device's reconnect status) and then applied.

mod service_common;

use service_common::*;
use shardline_shared::msg::{AckOutcome, Presence};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const DEVICES: usize = 3;

/// seq ⇒ signed payload, per device; panics on a sequence number reused for
/// a different instruction.
#[derive(Default)]
struct Seen(Vec<BTreeMap<u64, Vec<u8>>>);

impl Seen {
    fn record(&mut self, d: usize, seq: u64, payload: Vec<u8>) {
        if let Some(prev) = self.0[d].get(&seq) {
            assert_eq!(
                prev, &payload,
                "device {d}: sequence {seq} reused for another instruction"
            );
        }
        self.0[d].insert(seq, payload);
    }
    fn max(&self, d: usize) -> u64 {
        self.0[d].keys().next_back().copied().unwrap_or(0)
    }
}

async fn drain_instructions(
    dev: &mut Device,
    key: &[u8; 32],
    seen: &mut Seen,
    d: usize,
    ack: bool,
    wait: Duration,
) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some((instr, payload)) = dev.next_instruction(key, wait).await {
        seen.record(d, instr.seq, payload);
        got.push(instr.seq);
        if ack {
            dev.ack(instr.seq, AckOutcome::Applied).await;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_reuses_no_sequence_and_delivers_pending_instructions() {
    let dir = TempDir::new("crash");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = alloc.public_key;
    let mut devs = Vec::new();
    for d in 0..DEVICES {
        let k = device_key(d as u8);
        let (st, body) = alloc.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({
                "device": format!("crash-{d}"), "public_key": hex::encode(k.public_key()), "tier": "standard"
            })),
        );
        assert_eq!(st, 200, "{body}");
        let dev = Device::connect(&format!("crash-{d}"), k, alloc.mqtt_port).await;
        dev.publish_status(Presence::Online).await;
        devs.push(dev);
    }
    // A continuous report stream from every device, across the crash.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for dev in &devs {
        let (client, id, k) = (dev.client.clone(), dev.id.clone(), dev.key.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let r = report_for(&id, seq, 0);
                let bytes =
                    shardline_shared::sign::seal(shardline_shared::sign::Domain::Report, &r, &[&k]);
                // Queued by rumqttc while the broker is down; errors only when full.
                let _ = client.try_publish(
                    shardline_shared::topics::report(&id),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    bytes,
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    let mut seen = Seen(vec![BTreeMap::new(); DEVICES]);
    // Rounds of operator changes (drain / resume), each answered and applied.
    for round in 0..4 {
        for (d, dev) in devs.iter_mut().enumerate() {
            if round > 0 {
                let op = if round % 2 == 1 { "drain" } else { "resume" };
                let (st, body) = alloc.api("POST", &format!("/v1/devices/crash-{d}/{op}"), None);
                assert_eq!(st, 200, "{body}");
            }
            let got =
                drain_instructions(dev, &key, &mut seen, d, true, Duration::from_millis(600)).await;
            assert!(
                !got.is_empty(),
                "round {round}: device {d} got an instruction"
            );
        }
    }
    // One more change per device, received but NOT acknowledged: pending at the crash.
    let mut pending: Vec<BTreeSet<u64>> = Vec::new();
    for (d, dev) in devs.iter_mut().enumerate() {
        let (st, _) = alloc.api("POST", &format!("/v1/devices/crash-{d}/resume"), None);
        assert_eq!(st, 200);
        let got =
            drain_instructions(dev, &key, &mut seen, d, false, Duration::from_millis(600)).await;
        assert!(!got.is_empty());
        pending.push(got.into_iter().collect());
    }
    let mut before = Vec::new();
    for (d, pending_d) in pending.iter().enumerate() {
        let (_, detail) = alloc.api("GET", &format!("/v1/devices/crash-{d}"), None);
        let listed: BTreeSet<u64> = detail["pending_instructions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            pending_d.is_subset(&listed),
            "pending at the allocator: {listed:?} vs {pending_d:?}"
        );
        before.push(detail);
    }
    let max_before: Vec<u64> = (0..DEVICES).map(|d| seen.max(d)).collect();

    // Reports keep streaming; kill -9 now.
    tokio::time::sleep(Duration::from_millis(150)).await;
    alloc.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    alloc.spawn();

    // Devices reconnect (rumqttc retries) and announce themselves online with
    // the last sequence they applied: the allocator re-sends what is pending.
    for dev in devs.iter_mut() {
        dev.publish_status(Presence::Online).await;
    }
    for (d, dev) in devs.iter_mut().enumerate() {
        let mut redelivered = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !pending[d].is_subset(&redelivered) && tokio::time::Instant::now() < deadline {
            if let Some((instr, payload)) =
                dev.next_instruction(&key, Duration::from_millis(500)).await
            {
                seen.record(d, instr.seq, payload);
                redelivered.insert(instr.seq);
            } else {
                // Our status may have been published before the resubscribe.
                dev.publish_status(Presence::Online).await;
            }
        }
        assert!(
            pending[d].is_subset(&redelivered),
            "device {d}: pending {:?} not redelivered (got {redelivered:?}); log:\n{}",
            pending[d],
            alloc.log()
        );
        for seq in &pending[d] {
            dev.ack(*seq, AckOutcome::Applied).await;
        }
    }
    // State survived: enrolment, tier, report sequence, applied sequence, history.
    for (d, before) in before.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (st, after) = alloc.api("GET", &format!("/v1/devices/crash-{d}"), None);
            assert_eq!(st, 200);
            assert_eq!(after["tier"], "standard");
            assert_eq!(after["public_key"], before["public_key"]);
            assert!(after["last_report_seq"].as_u64() >= before["last_report_seq"].as_u64());
            assert!(after["instructions_sent"].as_u64() >= before["instructions_sent"].as_u64());
            assert!(
                !after["policy"]["leases"].as_array().unwrap().is_empty(),
                "leases survived: {after}"
            );
            if after["pending_instructions"].as_array().unwrap().is_empty()
                && after["applied_instruction_seq"].as_u64() >= pending[d].iter().max().copied()
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pending not cleared after acks: {after}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // New instructions after the restart use numbers never used before.
    for (d, dev) in devs.iter_mut().enumerate() {
        let (st, _) = alloc.api("POST", &format!("/v1/devices/crash-{d}/drain"), None);
        assert_eq!(st, 200);
        let got =
            drain_instructions(dev, &key, &mut seen, d, true, Duration::from_millis(800)).await;
        assert!(
            !got.is_empty(),
            "device {d} got an instruction after the restart"
        );
        for seq in got.iter().filter(|s| !pending[d].contains(s)) {
            assert!(
                *seq > max_before[d],
                "device {d}: new seq {seq} <= {} used before the crash",
                max_before[d]
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        alloc.metric("shardline_reports_accepted_total") > 0.0,
        "reports flow after the restart"
    );
}
