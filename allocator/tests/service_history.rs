//! The device history through the real allocator process: QoS windows,
//! instructions with their fate and the decisions behind them, read back
//! through the API and `shardctl history`, and still there after a
//! `kill -9` and a restart on the same store.

mod service_common;

use service_common::*;
use shardline_shared::msg::{AckOutcome, Presence};
use std::time::{Duration, Instant};

fn entries(alloc: &Allocator, query: &str) -> Vec<serde_json::Value> {
    let (st, body) = alloc.api("GET", &format!("/v1/devices/hist-0/history{query}"), None);
    assert_eq!(st, 200, "{body}");
    body["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_written_read_back_and_survives_kill_9() {
    let dir = TempDir::new("history");
    // QoS windows of 10 s (the shortest allowed) so the test sees one close.
    let mut alloc = Allocator::start(
        &dir.0,
        BrokerMode::Embedded,
        "[history]\nqos_window_s = 10\n",
    );
    let key = alloc.public_key;
    let k = device_key(40);
    let (st, body) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({
            "device": "hist-0", "public_key": hex::encode(k.public_key()), "tier": "standard"
        })),
    );
    assert_eq!(st, 200, "{body}");
    let mut dev = Device::connect("hist-0", k, alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;
    dev.send_report().await;
    let (instr, _) = dev
        .next_instruction(&key, Duration::from_secs(10))
        .await
        .expect("an instruction for the reported need");
    dev.ack(instr.seq, AckOutcome::Applied).await;

    // Reports until a QoS window closed (windows are 10 s, aligned).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        dev.send_report().await;
        if !entries(&alloc, "?kind=qos").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no QoS window in 40 s; log:\n{}",
            alloc.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let all = entries(&alloc, "?limit=500");
    let times: Vec<u64> = all.iter().filter_map(|e| e["at_ms"].as_u64()).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let has = |kind: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        all.iter().any(|e| e["kind"] == kind && pred(e))
    };
    assert!(
        has("instruction", &|e| e["seq"] == instr.seq
            && e["status"] == "sent"
            && e["ops"][0]
                .as_str()
                .is_some_and(|o| o.starts_with("activate "))),
        "{all:#?}"
    );
    assert!(
        has("instruction", &|e| e["seq"] == instr.seq
            && e["status"] == "applied"),
        "{all:#?}"
    );
    assert!(
        has("decision", &|e| e["decision"] == "grant"
            && e["reason"].as_str().is_some_and(|r| r.contains("need"))),
        "{all:#?}"
    );
    assert!(has("qos", &|e| e["mbit"].as_f64().is_some_and(|m| m > 0.0)
        && e["reports"].as_u64() >= Some(1)));
    // Filters and bad input.
    assert!(entries(&alloc, "?kind=decision")
        .iter()
        .all(|e| e["kind"] == "decision"));
    assert_eq!(entries(&alloc, "?limit=1").len(), 1);
    for bad in ["?kind=nope", "?limit=0", "?limit=99999", "?bogus=1"] {
        let (st, body) = alloc.api("GET", &format!("/v1/devices/hist-0/history{bad}"), None);
        assert_eq!(st, 400, "{bad}: {body}");
    }
    let out = alloc.shardctl(&["history", "hist-0", "--kind", "instruction"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("#{} applied", instr.seq)), "{text}");
    assert!(!text.contains("decision "), "only instructions: {text}");

    // An operator named by their token is named in the decision it caused.
    let (st, created) = alloc.api(
        "POST",
        "/v1/operators/tokens",
        Some(serde_json::json!({"name": "alice", "role": "operator"})),
    );
    assert_eq!(st, 200, "{created}");
    let alice = created["token"].as_str().expect("token").to_owned();
    let pinned = shardline_allocator::service::http::request(
        &alloc.api_url(),
        "POST",
        "/v1/devices/hist-0/pin",
        Some(&alice),
        Some(&serde_json::json!({"shard": "qos-shaper"})),
    )
    .unwrap();
    assert_eq!(pinned.status, 200, "{}", pinned.body);
    let decisions = entries(&alloc, "?kind=decision");
    assert!(
        decisions.iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("qos-shaper pinned by alice"))),
        "{decisions:#?}"
    );

    // Acknowledged history is on disk: a kill -9 and a restart keep it.
    let before = entries(&alloc, "?limit=500");
    alloc.kill9();
    alloc.spawn();
    let after = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = http_status(&alloc);
            if r == Some(200) {
                break entries(&alloc, "?limit=500");
            }
            assert!(
                Instant::now() < deadline,
                "allocator did not come back:\n{}",
                alloc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for e in &before {
        assert!(after.contains(e), "lost across the restart: {e}");
    }
}

fn http_status(alloc: &Allocator) -> Option<u16> {
    shardline_allocator::service::http::request(&alloc.api_url(), "GET", "/v1/health", None, None)
        .ok()
        .map(|r| r.status)
}
