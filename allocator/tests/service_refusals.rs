//! Issue 15, end to end through the real allocator (embedded broker): a
//! device on a busy machine is refused the vpn for capacity, and the API,
//! `shardctl device` say why, with numbers; the catalog view and its retry
//! command answer.

mod service_common;

use service_common::*;
use shardline_shared::msg::Presence;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_visible_with_its_reason_through_the_api_and_shardctl() {
    let dir = TempDir::new("refusals");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = device_key(3);
    let out = alloc.shardctl(&[
        "enroll",
        "busy-1",
        &hex::encode(key.public_key()),
        "--tier",
        "standard",
    ]);
    assert!(out.status.success(), "shardctl enroll: {out:?}");
    // Configured, so that capacity is what refuses it.
    for args in [
        &["config", "set", "busy-1", "vpn-tunnel", "role=initiator"][..],
        &[
            "config",
            "set",
            "busy-1",
            "vpn-tunnel",
            "bind=127.0.0.1:41001",
        ],
        &[
            "config",
            "set",
            "busy-1",
            "vpn-tunnel",
            "peer=127.0.0.1:41002",
        ],
        &[
            "config",
            "set",
            "busy-1",
            "auth-psk",
            "--secret",
            "psk=5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d",
        ],
    ] {
        let out = alloc.shardctl(args);
        assert!(out.status.success(), "shardctl {args:?}: {out:?}");
    }
    let mut dev = Device::connect("busy-1", key, alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;
    // One core, 98 % busy with other software.
    let mut r = dev.report();
    r.resources.cpu_cores = 1;
    r.resources.cpu_load_permille = 980;
    r.shards.clear();
    let bytes = dev.seal_report(&r);
    dev.publish_raw_report(bytes).await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(10),
    );
    let mut detail = serde_json::Value::Null;
    for _ in 0..50 {
        let (status, d) = alloc.api("GET", "/v1/devices/busy-1", None);
        assert_eq!(status, 200, "{d}");
        detail = d;
        if detail["policy"]["refusal_reasons"]["vpn"].is_string() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let why = detail["policy"]["refusal_reasons"]["vpn"]
        .as_str()
        .unwrap_or_else(|| panic!("a reason for the vpn refusal: {detail}"))
        .to_owned();
    assert!(
        why.starts_with("capacity: cpu needs ") && why.contains("(other load 98 %)"),
        "{why}"
    );
    assert!(
        detail["policy"]["refusals"]["vpn"]["capacity"]["cpu_free_permille"].is_u64(),
        "{detail}"
    );
    // shardctl device, in words.
    let shown = alloc.shardctl(&["device", "busy-1"]);
    assert!(shown.status.success(), "{shown:?}");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("refused") && text.contains(&why), "{text}");
    // The catalog view answers, nothing failing.
    let (status, cat) = alloc.api("GET", "/v1/catalog", None);
    assert_eq!(status, 200, "{cat}");
    assert!(cat
        .as_array()
        .is_some_and(|rows| rows.iter().all(|r| r["failing"] == serde_json::json!([]))));
    let shown = alloc.shardctl(&["catalog"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("auth-psk"));
    let (status, _) = alloc.api("POST", "/v1/catalog/auth-psk/retry", None);
    assert_eq!(status, 200);
    let (status, _) = alloc.api("POST", "/v1/catalog/no-such/retry", None);
    assert_eq!(status, 400);
}
