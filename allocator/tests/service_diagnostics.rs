//! Issue 20, remote diagnostics, with a real allocator process: the ask is
//! a signed instruction; a signed answer is stored and shown (API and
//! `shardctl diagnostics`); a forged answer (another key), an oversized
//! one, one naming another device and one nobody asked for are refused and
//! counted, and change nothing.

mod service_common;

use service_common::*;
use shardline_shared::diag::{DiagStatus, Diagnostics, MAX_DIAGNOSTICS_BYTES};
use shardline_shared::msg::{AckOutcome, Operation, Presence};
use shardline_shared::topics;
use std::time::Duration;

fn answer(dev: &Device, seq: u64, lines: Vec<String>) -> Diagnostics {
    Diagnostics {
        device: dev.id.clone(),
        request_seq: seq,
        at_ms: now_ms(),
        status: DiagStatus {
            agent_version: "test".into(),
            uptime_s: 12,
            arch: "x86_64".into(),
            shards: vec![],
            capture_source: "ring".into(),
            broker_connected: true,
            last_errors: vec!["WARN capture: fell back to the ring".into()],
        },
        log_lines: lines,
        truncated: false,
    }
}

async fn publish(dev: &Device, bytes: Vec<u8>) {
    dev.client
        .publish(
            topics::diagnostics(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            bytes,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_answer_is_shown_and_forged_or_oversized_ones_are_refused() {
    let dir = TempDir::new("diag");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = device_key(1);
    let (st, v) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "dg-1", "public_key": hex::encode(key.public_key()), "tier": "basic"})),
    );
    assert_eq!(st, 200, "{v}");
    let mut dev = Device::connect("dg-1", key, alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;

    // Nothing yet.
    let (st, _) = alloc.api("GET", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 400);
    // An answer nobody asked for is refused.
    publish(&dev, answer(&dev, 1, vec!["x".into()]).seal(&dev.key)).await;
    alloc.wait_metric(
        "shardline_diagnostics_refused_total",
        1.0,
        Duration::from_secs(10),
    );

    // The ask: a signed instruction carrying the request.
    let (st, v) = alloc.api("POST", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 200, "{v}");
    let seq = v["instruction_seq"].as_u64().unwrap();
    let (instr, _) = dev
        .next_instruction(&alloc.public_key, Duration::from_secs(10))
        .await
        .expect("the ask arrives signed");
    assert_eq!(instr.seq, seq);
    assert_eq!(
        instr.ops,
        vec![Operation::RequestDiagnostics { max_lines: 200 }]
    );
    dev.ack(seq, AckOutcome::Applied).await;

    // Forged: signed by another key.
    publish(
        &dev,
        answer(&dev, seq, vec!["forged".into()]).seal(&device_key(9)),
    )
    .await;
    // Oversized: more than the cap, refused before decoding.
    let mut big = answer(&dev, seq, vec![]).seal(&dev.key);
    big.resize(MAX_DIAGNOSTICS_BYTES + 1, 0);
    publish(&dev, big).await;
    // Naming another device (signed by this one's key).
    let mut other = answer(&dev, seq, vec!["other".into()]);
    other.device = shardline_shared::DeviceId::new("dg-2").unwrap();
    publish(&dev, other.seal(&dev.key)).await;
    alloc.wait_metric(
        "shardline_diagnostics_refused_total",
        4.0,
        Duration::from_secs(10),
    );
    let (st, _) = alloc.api("GET", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 400, "nothing stored from refused answers");

    // The real answer.
    let lines: Vec<String> = (0..3).map(|i| format!("INFO line {i}")).collect();
    publish(&dev, answer(&dev, seq, lines.clone()).seal(&dev.key)).await;
    alloc.wait_metric(
        "shardline_diagnostics_received_total",
        1.0,
        Duration::from_secs(10),
    );
    let (st, v) = alloc.api("GET", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["request_seq"], seq);
    assert_eq!(v["log_lines"], serde_json::json!(lines));
    assert_eq!(v["truncated"], false);
    assert_eq!(v["status"]["capture_source"], "ring");
    // Replayed: not newer than the answer kept.
    publish(
        &dev,
        answer(&dev, seq, vec!["replay".into()]).seal(&dev.key),
    )
    .await;
    alloc.wait_metric(
        "shardline_diagnostics_refused_total",
        5.0,
        Duration::from_secs(10),
    );
    let out = alloc.shardctl(&["diagnostics", "dg-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("INFO line 2") && text.contains("capture ring"),
        "{text}"
    );

    // Kept across a restart (the store).
    drop(dev);
    let mut alloc = alloc;
    alloc.kill9();
    alloc.spawn();
    let (st, v) = alloc.api("GET", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["log_lines"], serde_json::json!(lines));

    // Unenrolled: its diagnostics go too (re-enrolled, it has none).
    let (st, v) = alloc.api("DELETE", "/v1/devices/dg-1", None);
    assert_eq!(st, 200, "{v}");
    alloc.kill9();
    alloc.spawn();
    let (st, v) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "dg-1", "public_key": hex::encode(device_key(1).public_key()), "tier": "basic"})),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = alloc.api("GET", "/v1/devices/dg-1/diagnostics", None);
    assert_eq!(st, 400, "{v}");
}
