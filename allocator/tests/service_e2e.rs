//! End to end over real MQTT: the real allocator binary with its embedded
//! broker, and with a real mosquitto it does not own. A device (plain rumqttc
//! client, its own key) is enrolled with `shardctl`, reports, receives a
//! signed instruction it verifies, acks it, and the allocator records it as
//! applied. The bootstrap-token flow enrols a device that introduced itself.

mod service_common;

use service_common::*;
use shardline_allocator::service::core::{enroll_topic, EnrollRequest};
use shardline_shared::msg::{AckOutcome, Operation, Presence};
use std::time::Duration;

async fn enrol_report_instruct_ack(alloc: &Allocator, broker_port: u16) {
    let key = device_key(1);
    let out = alloc.shardctl(&[
        "enroll",
        "router-1",
        &hex::encode(key.public_key()),
        "--tier",
        "standard",
    ]);
    assert!(out.status.success(), "shardctl enroll: {out:?}");
    let listed = alloc.shardctl(&["devices"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("router-1"));

    let mut dev = Device::connect("router-1", key, broker_port).await;
    dev.publish_status(Presence::Online).await;
    let seq = dev.send_report().await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(10),
    );

    let (instr, _) = dev
        .next_instruction(&alloc.public_key, Duration::from_secs(10))
        .await
        .expect("an instruction for a device whose traffic needs encryption");
    assert!(instr.seq >= 1);
    assert!(instr.expires_at_ms > now_ms());
    assert!(
        instr
            .ops
            .iter()
            .any(|op| matches!(op, Operation::Activate(a) if a.capability == "vpn")),
        "the vpn capability is activated: {instr:?}"
    );
    dev.ack(instr.seq, AckOutcome::Applied).await;
    alloc.wait_metric(
        "shardline_instructions_applied_total",
        1.0,
        Duration::from_secs(10),
    );

    let (status, detail) = alloc.api("GET", "/v1/devices/router-1", None);
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["last_report_seq"], seq);
    assert_eq!(detail["applied_instruction_seq"], instr.seq);
    let leases = detail["policy"]["leases"].as_array().unwrap();
    assert!(!leases.is_empty(), "the profile shows the leases: {detail}");
    // shardctl shows the same device.
    let shown = alloc.shardctl(&["device", "router-1"]);
    assert!(shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stdout).contains("reputation_history"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_enrol_report_instruction_ack_applied() {
    let dir = TempDir::new("e2e-embedded");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let port = alloc.mqtt_port;
    enrol_report_instruct_ack(&alloc, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_broker_enrol_report_instruction_ack_applied() {
    let dir = TempDir::new("e2e-mosquitto");
    let Some(mosq) = Mosquitto::start(&dir.0) else {
        return;
    };
    let url = format!("mqtt://127.0.0.1:{}", mosq.port);
    let alloc = Allocator::start(&dir.0, BrokerMode::External(url), "");
    // Reports reach it through the shared subscription.
    enrol_report_instruct_ack(&alloc, mosq.port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrols_itself_with_a_bootstrap_token() {
    let dir = TempDir::new("e2e-token");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let out = alloc.shardctl(&["--json", "token", "create", "--tier", "basic"]);
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();

    let key = device_key(7);
    let mut dev = Device::connect("self-enrolled", key.clone(), alloc.mqtt_port).await;
    // A wrong token first: refused.
    let bad = EnrollRequest {
        device: dev.id.clone(),
        public_key: key.public_key(),
        token: "00".repeat(32),
    };
    dev.client
        .publish(
            enroll_topic(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            shardline_shared::codec::encode(&bad),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.api("GET", "/v1/devices/self-enrolled", None).0, 404);

    let good = EnrollRequest {
        token: token.clone(),
        ..bad
    };
    dev.client
        .publish(
            enroll_topic(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            shardline_shared::codec::encode(&good),
        )
        .await
        .unwrap();
    alloc.wait_metric("shardline_enrolments_total", 1.0, Duration::from_secs(10));
    let (status, detail) = alloc.api("GET", "/v1/devices/self-enrolled", None);
    assert_eq!(status, 200);
    assert_eq!(detail["tier"], "basic");
    // Its signed reports are now accepted.
    dev.send_report().await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(10),
    );
    // The token was single-use: another device cannot use it.
    let other = device_key(8);
    let again = EnrollRequest {
        device: shardline_shared::DeviceId::new("intruder").unwrap(),
        public_key: other.public_key(),
        token,
    };
    let intruder = Device::connect("intruder", other, alloc.mqtt_port).await;
    intruder
        .client
        .publish(
            enroll_topic(&again.device),
            rumqttc::QoS::AtLeastOnce,
            false,
            shardline_shared::codec::encode(&again),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
        2.0,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.api("GET", "/v1/devices/intruder", None).0, 404);
}
