//! Issue 14's broker-neighbour attacks on the allocator, run for real: a
//! client with nothing but publish rights on the broker (embedded, and a
//! real mosquitto) sends forged, replayed and unsigned messages on a
//! victim's topics. Only what the victim signed may move its reputation:
//! after the attack its reputation is what it was, every report it sends is
//! still accepted, the allocator keeps serving, and every forgery is counted
//! under its reason.

mod service_common;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use service_common::*;
use shardline_shared::codec;
use shardline_shared::msg::{AckOutcome, DeviceStatus, InstructionAck, Presence, RejectReason};
use shardline_shared::sign::{self, Domain};
use shardline_shared::topics;
use std::time::Duration;

fn dropped(kind: &str, reason: &str) -> String {
    format!("shardline_messages_dropped_total{{kind=\"{kind}\",reason=\"{reason}\"}}")
}

/// A client with publish rights only: not enrolled, no device key.
async fn attacker(port: u16) -> AsyncClient {
    let mut opts = MqttOptions::new("attacker", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(opts, 10_000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("attacker connects");
    client
}

fn reputation(alloc: &Allocator, device: &str) -> f64 {
    alloc.api("GET", &format!("/v1/devices/{device}"), None).1["policy"]["reputation"]
        .as_f64()
        .expect("reputation")
}

async fn forgeries_never_move_the_victims_reputation(alloc: Allocator, port: u16) {
    let k = device_key(7);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "victim", "public_key": hex::encode(k.public_key()), "tier": "standard"})),
    );
    assert_eq!(st, 200);
    let mut dev = Device::connect("victim", k.clone(), port).await;
    dev.publish_status(Presence::Online).await;
    let first = dev.report();
    let first_bytes = dev.seal_report(&first);
    dev.publish_raw_report(first_bytes.clone()).await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(10),
    );
    // The instruction the real report caused, applied.
    let (instr, _) = dev
        .next_instruction(&alloc.public_key, Duration::from_secs(10))
        .await
        .expect("an instruction for the real report");
    dev.ack(instr.seq, AckOutcome::Applied).await;
    alloc.wait_metric(
        "shardline_instructions_applied_total",
        1.0,
        Duration::from_secs(10),
    );
    let before = reputation(&alloc, "victim");

    let evil = attacker(port).await;
    let forger = device_key(200);
    let publish = |topic: String, payload: Vec<u8>, retain: bool| {
        let evil = evil.clone();
        async move {
            evil.publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .expect("attacker publishes");
        }
    };
    // 1. Well-formed reports and acks with bad signatures (each cost the
    //    victim 10 points before).
    for i in 0..5u64 {
        let mut r = first.clone();
        r.seq = 100 + i;
        publish(
            topics::report(&dev.id),
            sign::seal(Domain::Report, &r, &[&forger]),
            false,
        )
        .await;
        let ack = InstructionAck {
            device: dev.id.clone(),
            instruction_seq: instr.seq,
            outcome: AckOutcome::Failed {
                reason: "forged".into(),
            },
            at_ms: now_ms(),
        };
        publish(
            topics::ack(&dev.id),
            sign::seal(Domain::Ack, &ack, &[&forger]),
            false,
        )
        .await;
    }
    // 2. The victim's own old report, replayed (2 points each before).
    for _ in 0..3 {
        publish(topics::report(&dev.id), first_bytes.clone(), false).await;
    }
    // 3. A forged instruction on its topic: the device's honest, signed
    //    refusal of an instruction the allocator never sent (20 points before).
    publish(topics::instr(&dev.id), vec![1, 2, 3, 4], false).await;
    dev.ack(
        instr.seq + 500,
        AckOutcome::Rejected(RejectReason::BadSignature),
    )
    .await;
    // 4. A retained, unsigned "offline" status.
    let offline = DeviceStatus {
        device: dev.id.clone(),
        presence: Presence::Offline,
        applied_instruction_seq: 0,
        agent_version: "forged".into(),
        at_ms: now_ms(),
    };
    publish(topics::status(&dev.id), codec::encode(&offline), true).await;

    alloc.wait_metric(
        &dropped("report", "bad_signature"),
        5.0,
        Duration::from_secs(10),
    );
    alloc.wait_metric(
        &dropped("ack", "bad_signature"),
        5.0,
        Duration::from_secs(10),
    );
    alloc.wait_metric(
        &dropped("report", "duplicate"),
        1.0,
        Duration::from_secs(10),
    );
    alloc.wait_metric(&dropped("ack", "not_ours"), 1.0, Duration::from_secs(10));
    // The victim keeps reporting and every report of its is accepted.
    for n in 2..=4 {
        dev.send_report().await;
        alloc.wait_metric(
            "shardline_reports_accepted_total",
            n as f64,
            Duration::from_secs(10),
        );
    }
    let after = reputation(&alloc, "victim");
    assert!(after >= before, "reputation {before} -> {after}");
    assert_eq!(alloc.metric("shardline_compliance_events_total"), 0.0);
    // Still serving, and the victim is shown online (its signed reports).
    assert_eq!(alloc.api("GET", "/v1/health", None).0, 200);
    let view = alloc.api("GET", "/v1/devices/victim", None).1;
    assert_eq!(view["presence"], "online", "{view}");
    // Clear the retained forgery so the broker is left clean.
    publish(topics::status(&dev.id), Vec::new(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_through_the_embedded_broker_never_move_reputation() {
    let dir = TempDir::new("forge-embedded");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let port = alloc.mqtt_port;
    forgeries_never_move_the_victims_reputation(alloc, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_through_mosquitto_never_move_reputation() {
    let dir = TempDir::new("forge-mosquitto");
    let Some(m) = Mosquitto::start(&dir.0) else {
        return;
    };
    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::External(format!("mqtt://127.0.0.1:{}", m.port)),
        "",
    );
    forgeries_never_move_the_victims_reputation(alloc, m.port).await;
}
