//! A persistent MQTT session is resumed across a restart (issue 19): a real
//! allocator on a real mosquitto, `[broker] persistent_session = true` and
//! no `client_id` configured, so the id is the one it derives from
//! `[instance] id`. A device's report published (and PUBACKed by the broker)
//! while the allocator is SIGKILLed is queued in the allocator's session and
//! accepted after the restart: with a per-process id the new process would
//! open a new session and the report would stay stranded in the old one.

mod service_common;

use service_common::{device_key, Allocator, BrokerMode, Device, Mosquitto, TempDir};
use std::time::{Duration, Instant};

fn last_report_seq(a: &Allocator, device: &str) -> u64 {
    let (st, v) = a.api("GET", &format!("/v1/devices/{device}"), None);
    assert_eq!(st, 200, "{v}");
    v["last_report_seq"].as_u64().unwrap_or(0)
}

fn wait_seq(a: &Allocator, device: &str, seq: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let last = last_report_seq(a, device);
        if last >= seq {
            assert_eq!(last, seq);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "report {seq} not accepted within {within:?} (holds {last}); log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_allocator_resumes_its_session_under_the_derived_client_id() {
    let dir = TempDir::new("session-resume");
    let Some(m) = Mosquitto::start(&dir.0) else {
        return;
    };
    let clean = "uplink = \"plain\"\n[instance]\nid = \"alloc-r\"\n";
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    // The test helper's first start has a configured id and a clean session
    // (so the broker keeps no session under that id); from the restart on,
    // a persistent session and no configured id: the allocator derives it.
    let mut a = Allocator::start(&dir.0, BrokerMode::External(url), clean);
    a.kill9();
    a.extra_config = format!("persistent_session = true\n{clean}");
    a.fixed_client_id = false;
    a.spawn();
    assert!(
        a.log().contains("shardline-allocator-alloc-r"),
        "the derived client id is logged; log:\n{}",
        a.log()
    );

    let k = device_key(7);
    let (st, body) = a.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({
            "device": "sess-1", "public_key": hex::encode(k.public_key()), "tier": "standard"
        })),
    );
    assert_eq!(st, 200, "{body}");
    let mut dev = Device::connect("sess-1", k, m.port).await;
    // The allocator's subscriptions are in place once a report is taken.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seq = 0;
    while last_report_seq(&a, "sess-1") == 0 {
        assert!(
            Instant::now() < deadline,
            "no report accepted; log:\n{}",
            a.log()
        );
        seq = dev.send_report().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_seq(&a, "sess-1", seq, Duration::from_secs(5));

    // Down: the broker queues what the device sends for the session.
    a.kill9();
    let queued = dev.send_report().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.spawn();
    wait_seq(&a, "sess-1", queued, Duration::from_secs(15));
}
