//! End to end over real MQTT: the real allocator binary with its embedded
//! broker, and with a real mosquitto it does not own. A device (plain rumqttc
//! client, its own key) is enrolled with `shardctl`, reports, receives a
//! signed instruction it verifies, acks it, and the allocator records it as
//! applied. The bootstrap-token flow enrols a device that introduced itself.

mod service_common;

use service_common::*;
use shardline_shared::msg::EnrollRequest;
use shardline_shared::msg::{AckOutcome, Operation, Presence};
use shardline_shared::sign;
use shardline_shared::topics;
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

    // Its vpn ends and key, per device (the vpn shards require them).
    let out = alloc.shardctl(&[
        "config",
        "set",
        "router-1",
        "vpn-tunnel",
        "role=initiator",
        "bind=127.0.0.1:41001",
        "peer=127.0.0.1:41002",
    ]);
    assert!(out.status.success(), "shardctl config set: {out:?}");
    let out = alloc.shardctl(&[
        "config",
        "set",
        "router-1",
        "auth-psk",
        "--secret",
        &format!("psk={}", "5d".repeat(32)),
    ]);
    assert!(
        out.status.success(),
        "shardctl config set --secret: {out:?}"
    );

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
            .any(|op| matches!(op, Operation::ActivateShard(a) if a.capability == "vpn")),
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
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("device router-1") && text.contains("reputation"),
        "{text}"
    );
    // Issue 17: every grant is explained, in the API and in shardctl.
    let decisions = detail["policy"]["decisions"].as_array().unwrap();
    let granted = decisions
        .iter()
        .find(|d| d["kind"] == "grant")
        .unwrap_or_else(|| panic!("a grant decision: {detail}"));
    assert!(
        granted["explanation"]
            .as_str()
            .unwrap()
            .contains("granted: a reported need asks for it"),
        "{granted}"
    );
    assert!(
        text.contains("decisions (newest first):") && text.contains("granted: a reported need"),
        "{text}"
    );
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
            topics::enroll(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            sign::seal_enroll(&bad, &key),
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
    // The right token, signed by a key other than the one it enrols (no
    // proof of possession): refused, and the token is not used up.
    dev.client
        .publish(
            topics::enroll(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            sign::seal_enroll(&good, &device_key(9)),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
        2.0,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.api("GET", "/v1/devices/self-enrolled", None).0, 404);
    dev.client
        .publish(
            topics::enroll(&dev.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            sign::seal_enroll(&good, &key),
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
    let intruder = Device::connect("intruder", other.clone(), alloc.mqtt_port).await;
    intruder
        .client
        .publish(
            topics::enroll(&again.device),
            rumqttc::QoS::AtLeastOnce,
            false,
            sign::seal_enroll(&again, &other),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
        3.0,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.api("GET", "/v1/devices/intruder", None).0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_sends_a_rotation_signed_by_both_keys_and_the_new_key_signs_from_then_on() {
    use shardline_shared::accept::{self, AcceptancePolicy, AcceptanceState, Verdict};
    use shardline_shared::msg::{KeySet, PublicKeyEntry};
    let dir = TempDir::new("e2e-rotate");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = device_key(11);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "rot-1", "public_key": hex::encode(key.public_key()), "tier": "standard"})),
    );
    assert_eq!(st, 200);
    let mut dev = Device::connect("rot-1", key, alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;
    // The device trusts the provisioned key (epoch 0) and runs the real acceptance rules.
    let old = alloc.public_key;
    let mut state = AcceptanceState::new(KeySet {
        epoch: 0,
        keys: vec![PublicKeyEntry {
            key_id: shardline_shared::KeyId::of_public_key(&old),
            public_key: old,
        }],
    });
    let policy = AcceptancePolicy::default();
    dev.send_report().await;
    let raw = tokio::time::timeout(Duration::from_secs(10), dev.instr_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let d = accept::handle_incoming(&state, &dev.id, &raw, now_ms(), &policy);
    let Verdict::Apply(instr) = d.verdict else {
        panic!("first instruction not applied: {:?}", d.verdict)
    };
    state = d.state;
    dev.ack(instr.seq, AckOutcome::Applied).await;
    alloc.wait_metric(
        "shardline_instructions_applied_total",
        1.0,
        Duration::from_secs(10),
    );

    let new_key = dir.0.join("signing-2.key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
        .args(["rotate", "--new-key"])
        .arg(&new_key)
        .arg("--config")
        .arg(dir.0.join("allocator.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let new_hex = text
        .lines()
        .find_map(|l| l.strip_prefix("public_key "))
        .expect("rotate prints the new public key");
    let mut new_pub = [0u8; 32];
    hex::decode_to_slice(new_hex.trim(), &mut new_pub).unwrap();

    let raw = tokio::time::timeout(Duration::from_secs(10), dev.instr_rx.recv())
        .await
        .expect("the rotation reaches the device")
        .unwrap();
    let d = accept::handle_incoming(&state, &dev.id, &raw, now_ms(), &policy);
    assert_eq!(d.verdict, Verdict::Rotated { epoch: 1 });
    state = d.state;

    // The next instruction is signed by the new key, also after a restart.
    alloc.kill9();
    alloc.spawn();
    alloc.wait_metric("shardline_key_epoch", 1.0, Duration::from_secs(5));
    let (st, _) = alloc.api("POST", "/v1/devices/rot-1/drain", None);
    assert_eq!(st, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let raw = tokio::time::timeout_at(deadline, dev.instr_rx.recv())
            .await
            .expect("an instruction after the rotation")
            .unwrap();
        let d = accept::handle_incoming(&state, &dev.id, &raw, now_ms(), &policy);
        match d.verdict {
            Verdict::Apply(i) => {
                assert!(i
                    .ops
                    .iter()
                    .any(|op| matches!(op, Operation::Deactivate { .. })));
                let env = shardline_shared::sign::parse_envelope(&raw, 1 << 20).unwrap();
                assert_eq!(
                    env.signatures[0].key_id,
                    shardline_shared::KeyId::of_public_key(&new_pub)
                );
                break;
            }
            // A repeated rotation after the restart is refused as out of order: fine.
            Verdict::RotationRefused(_) => continue,
            other => panic!("unexpected verdict {other:?}"),
        }
    }
}
