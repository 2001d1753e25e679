//! Hostile input over real MQTT: garbage, oversize, wrongly signed, replayed,
//! stale, misaddressed and unknown-device reports, garbage acks and statuses.
//! Each is counted under its reason in /metrics; only what the device itself
//! signed (a report naming another device) costs it reputation; nothing
//! crashes the allocator and a valid report right after all of it is still
//! accepted.

mod service_common;

use service_common::*;
use shardline_shared::msg::Presence;
use shardline_shared::sign::{self, Domain};
use shardline_shared::topics;
use std::time::Duration;

fn dropped(kind: &str, reason: &str) -> String {
    format!("shardline_messages_dropped_total{{kind=\"{kind}\",reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_are_counted_dropped_and_never_stall_ingest() {
    let dir = TempDir::new("bad");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "max_payload = 16384\n");
    let k = device_key(3);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "victim", "public_key": hex::encode(k.public_key()), "tier": "basic"})),
    );
    assert_eq!(st, 200);
    let mut dev = Device::connect("victim", k.clone(), alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;
    let rep0 = alloc.api("GET", "/v1/devices/victim", None).1["policy"]["reputation"]
        .as_f64()
        .unwrap();

    // Garbage, several shapes.
    for junk in [
        vec![],
        vec![0xff; 10],
        vec![1, 2, 3, 4, 5, 6, 7, 8],
        b"{\"json\":true}".to_vec(),
    ] {
        dev.publish_raw_report(junk).await;
    }
    alloc.wait_metric(&dropped("report", "garbage"), 4.0, Duration::from_secs(10));

    // Oversize: above the 16 KiB ingest cap, below the broker's limit.
    dev.publish_raw_report(vec![1u8; 100_000]).await;
    alloc.wait_metric(&dropped("report", "oversize"), 1.0, Duration::from_secs(10));

    // Wrongly signed: a valid report signed by another key.
    let forger = device_key(99);
    let mut r = dev.report();
    dev.publish_raw_report(sign::seal(Domain::Report, &r, &[&forger]))
        .await;
    // Signed by the device but under another domain (an ack signature).
    r.seq += 1;
    dev.seq = r.seq;
    dev.publish_raw_report(sign::seal(Domain::Ack, &r, &[&k]))
        .await;
    alloc.wait_metric(
        &dropped("report", "bad_signature"),
        2.0,
        Duration::from_secs(10),
    );

    // A good one, then its replay (duplicate), then an older one (stale).
    let good = dev.report();
    let good_bytes = dev.seal_report(&good);
    dev.publish_raw_report(good_bytes.clone()).await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(10),
    );
    dev.publish_raw_report(good_bytes).await;
    alloc.wait_metric(
        &dropped("report", "duplicate"),
        1.0,
        Duration::from_secs(10),
    );
    let old = report_for(&dev.id, 1, 0);
    dev.publish_raw_report(dev.seal_report(&old)).await;
    alloc.wait_metric(&dropped("report", "stale"), 1.0, Duration::from_secs(10));

    // Signed by the device, naming another device.
    let mut other = dev.report();
    other.device = shardline_shared::DeviceId::new("someone-else").unwrap();
    dev.publish_raw_report(dev.seal_report(&other)).await;
    alloc.wait_metric(
        &dropped("report", "wrong_device"),
        1.0,
        Duration::from_secs(10),
    );

    // A device that is not enrolled.
    let stranger = shardline_shared::DeviceId::new("stranger").unwrap();
    let sr = report_for(&stranger, 1, 0);
    dev.client
        .publish(
            topics::report(&stranger),
            rumqttc::QoS::AtLeastOnce,
            false,
            sign::seal(Domain::Report, &sr, &[&forger]),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        &dropped("report", "unknown_device"),
        1.0,
        Duration::from_secs(10),
    );

    // Garbage acks and statuses.
    dev.client
        .publish(
            topics::ack(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![9u8; 40],
        )
        .await
        .unwrap();
    dev.client
        .publish(
            topics::status(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![1u8, 200, 3],
        )
        .await
        .unwrap();
    alloc.wait_metric(&dropped("ack", "garbage"), 1.0, Duration::from_secs(10));
    alloc.wait_metric(&dropped("status", "garbage"), 1.0, Duration::from_secs(10));

    // A flood of garbage, then a valid report: still accepted promptly.
    for i in 0..2000u32 {
        dev.publish_raw_report(i.to_le_bytes().repeat(8)).await;
    }
    let accepted = alloc.metric("shardline_reports_accepted_total");
    let t = std::time::Instant::now();
    dev.send_report().await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        accepted + 1.0,
        Duration::from_secs(10),
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "ingest stalled: {:?}",
        t.elapsed()
    );
    assert!(alloc.metric(&dropped("report", "garbage")) >= 2004.0);

    // Every accepted report was exactly the valid ones.
    assert_eq!(alloc.metric("shardline_reports_accepted_total"), 2.0);
    // Forged signatures and replays are not the device's doing (anyone can
    // publish on its topics, issue 14): only the report it signed itself
    // naming another device is a compliance event.
    assert_eq!(alloc.metric("shardline_compliance_events_total"), 1.0);
    let rep1 = alloc.api("GET", "/v1/devices/victim", None).1["policy"]["reputation"]
        .as_f64()
        .unwrap();
    assert!(rep1 < rep0, "reputation {rep0} -> {rep1}");
    // Still alive and serving.
    assert_eq!(alloc.api("GET", "/v1/health", None).0, 200);
}

#[test]
fn the_api_refuses_requests_without_the_bearer_token() {
    let dir = TempDir::new("auth");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let r = shardline_allocator::service::http::request(
        &alloc.api_url(),
        "GET",
        "/v1/devices",
        None,
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let r = shardline_allocator::service::http::request(
        &alloc.api_url(),
        "GET",
        "/v1/devices",
        Some("wrong"),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let out = alloc.shardctl(&["enroll", "x1", "zz", "--tier", "basic"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hex"),
        "{out:?}"
    );
    let out = alloc.shardctl(&["enroll", "x1", &"ab".repeat(32), "--tier", "gold"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown tier"),
        "{out:?}"
    );
}
