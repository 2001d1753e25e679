//! Overload through the embedded broker, for real: the real allocator
//! process with its embedded rumqttd, flooded by simulated devices with far
//! more signed QoS 1 reports than it can verify. The broker acknowledges
//! every one of them to the devices, so every one must be accounted for:
//! accepted, conflated (a newer report of the same device made it
//! worthless) or shed (counted), never silently lost; each device's newest
//! report is accepted; no ack is dropped.
//!
//! The same flood on group-routed topics (issue 19: `[assignment]` on, the
//! instance serving the group): the embedded broker's ingest gate counts a
//! group's routed uplinks while the link holds the group's filter, so none
//! is lost inside rumqttd either.
//!
//! Before the pre-verification stage (`verifiers.rs`, core `preverify`) the
//! MQTT link waited for the verifier threads, fell behind rumqttd's
//! in-memory log, and rumqttd skipped it ahead: reports it had acknowledged
//! vanished. Reports here are padded (~4 KiB, more traffic classes) so that
//! log overflows in seconds.

mod service_common;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use service_common::*;
use shardline_allocator::service::store::{Batch, DeviceRecord, RedbStore, Store};
use shardline_shared::assign::GroupId;
use shardline_shared::msg::{AckOutcome, InstructionAck, RejectReason};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::topics::{self, TopicKind};
use shardline_shared::DeviceId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICES: usize = 200;
/// Reports per device (sequence 1..=REPORTS).
const REPORTS: usize = 250;
/// Connections the devices' traffic is multiplexed over.
const PUBLISHERS: usize = 4;
/// An instruction sequence the allocator never sent: the ack that refuses
/// it is counted (`not_ours`) and changes nothing.
const NOT_SENT: u64 = 1_000_000;

fn key(i: usize) -> KeyPair {
    let mut seed = [9u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    KeyPair::from_seed(&seed)
}

/// A report padded with more traffic classes to about 4 KiB.
fn padded_report(id: &DeviceId, seq: u64, k: &KeyPair) -> Vec<u8> {
    let mut r = report_for(id, seq, 0);
    let class = r.classes[0].clone();
    while r.classes.len() < 160 {
        r.classes.push(class.clone());
    }
    sign::seal(Domain::Report, &r, &[k])
}

/// `[assignment]` with one group, served by this instance.
const ROUTED_EXTRA: &str = r#"
[instance]
id = "alloc-a"
region = "eu-west"
capacity_reports_per_s = 100000
endpoints = ["mqtt://127.0.0.1:1883"]
[assignment]
enabled = true
[[assignment.groups]]
tenant = "acme"
region = "eu-west"
capability = "vpn"
expected_reports_per_s = 10
"#;
const GROUP: &str = "acme.eu-west.vpn";

/// The overload gauges sampled during the flood: the highest value seen of
/// each (`/metrics` read every 20 ms on a thread of its own).
const SAMPLED: [&str; 4] = [
    "shardline_preverify_reports ",
    "shardline_preverify_bytes{kind=\"report\"}",
    "shardline_ingest_gate_behind_bytes ",
    "shardline_ingest_gate_waiting_connections ",
];

fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn sampler(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<[f64; 4]> {
    std::thread::spawn(move || {
        let mut max = [0f64; 4];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(r) =
                shardline_allocator::service::http::request(&url, "GET", "/metrics", None, None)
            {
                for (m, prefix) in max.iter_mut().zip(SAMPLED) {
                    *m = m.max(sample(&r.body, prefix));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    })
}

fn sum(alloc: &Allocator, prefixes: &[&str]) -> u64 {
    prefixes.iter().map(|p| alloc.metric(p)).sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_the_embedded_broker_acknowledged_is_accounted_for() {
    flood(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routed_report_the_embedded_broker_acknowledged_is_accounted_for() {
    flood(true).await;
}

/// The flood, on the plain topics or (`routed`) on the group's.
async fn flood(routed: bool) {
    let dir = TempDir::new(if routed {
        "overload-routed"
    } else {
        "overload-embedded"
    });
    let group = GroupId::new(GROUP).unwrap();
    let topic = |id: &DeviceId, kind: TopicKind| {
        if routed {
            topics::routed(&group, id, kind)
        } else {
            match kind {
                TopicKind::Ack => topics::ack(id),
                _ => topics::report(id),
            }
        }
    };
    let keys: Vec<KeyPair> = (0..DEVICES).map(key).collect();
    let ids: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::new(format!("flood-{i:04}")).unwrap())
        .collect();
    {
        // Enrolled straight into the store the allocator opens.
        let store = RedbStore::open(&dir.0.join("allocator.redb")).unwrap();
        let batch = Batch {
            put_devices: ids
                .iter()
                .zip(&keys)
                .map(|(id, k)| {
                    let mut r = DeviceRecord::new(
                        id.clone(),
                        k.public_key(),
                        "standard".into(),
                        None,
                        now_ms(),
                    );
                    r.version = 1;
                    r
                })
                .collect(),
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }
    // Pre-signed, round by round (every device's n-th report, then the
    // (n+1)-th), on all cores: the flood is then MQTT alone.
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sealed: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let chunks: Vec<_> = (0..threads)
            .map(|part| {
                let (ids, keys) = (&ids, &keys);
                s.spawn(move || {
                    (0..REPORTS)
                        .filter(|v| v % threads == part)
                        .map(|v| {
                            (0..DEVICES)
                                .map(|i| padded_report(&ids[i], v as u64 + 1, &keys[i]))
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut parts: Vec<std::vec::IntoIter<Vec<Vec<u8>>>> = chunks
            .into_iter()
            .map(|h| h.join().unwrap().into_iter())
            .collect();
        (0..REPORTS).map(|v| parts[v % 2].next().unwrap()).collect()
    });
    let size = sealed[0][0].len();
    eprintln!(
        "signed {} reports of {size} bytes in {:.1} s",
        DEVICES * REPORTS,
        t.elapsed().as_secs_f64()
    );
    assert!(size > 3_000, "reports are padded: {size} bytes");

    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::Embedded,
        if routed { ROUTED_EXTRA } else { "" },
    );
    let port = alloc.mqtt_port;
    if routed {
        // The instance leads, places the group on itself and subscribes
        // its filter; the gate counts the group once the broker granted it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !alloc
            .log()
            .contains("ingest gate: counting a group's routed uplinks")
        {
            assert!(
                Instant::now() < deadline,
                "the group's filter was never held; log:\n{}",
                alloc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Publishers count the broker's PUBACKs: what it acknowledged.
    let acked = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let mut opts = MqttOptions::new(format!("flood-{p}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(1000);
        let (client, mut ev) = AsyncClient::new(opts, 10_000);
        let acked = acked.clone();
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut up = Some(up_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = up.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("a publisher lost its connection: {e}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), up_rx)
            .await
            .expect("publisher connects")
            .unwrap();
        pubs.push(client);
    }
    // The overload stages as /metrics shows them: idle before the flood.
    for m in SAMPLED {
        assert_eq!(alloc.metric(m), 0.0, "{m} before the flood");
    }
    assert_eq!(
        alloc.metric("shardline_ingest_gate_held_seconds_total"),
        0.0
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = sampler(alloc.api_url(), stop.clone());
    let t = Instant::now();
    let mut published = 0u64;
    let mut acks = 0u64;
    for (v, round) in sealed.into_iter().enumerate() {
        for (i, bytes) in round.into_iter().enumerate() {
            pubs[i % PUBLISHERS]
                .publish(
                    topic(&ids[i], TopicKind::Report),
                    QoS::AtLeastOnce,
                    false,
                    bytes,
                )
                .await
                .unwrap();
            published += 1;
        }
        if v == REPORTS / 2 {
            // Mid-flood, every device refuses an instruction it was never
            // sent: acks are never conflated or shed, so each must arrive.
            for (i, id) in ids.iter().enumerate() {
                let ack = InstructionAck {
                    device: id.clone(),
                    instruction_seq: NOT_SENT,
                    outcome: AckOutcome::Rejected(RejectReason::BadSignature),
                    at_ms: now_ms(),
                };
                pubs[i % PUBLISHERS]
                    .publish(
                        topic(id, TopicKind::Ack),
                        QoS::AtLeastOnce,
                        false,
                        sign::seal(Domain::Ack, &ack, &[&keys[i]]),
                    )
                    .await
                    .unwrap();
                acks += 1;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < published + acks {
        assert!(
            Instant::now() < deadline,
            "the broker acknowledged {} of {}",
            acked.load(Ordering::Relaxed),
            published + acks
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "published and acknowledged {published} reports and {acks} acks in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Every acknowledged report is accounted for. A report leaves these
    // counters only by being lost; wait until they add up or stop moving.
    let counted = || {
        sum(
            &alloc,
            &[
                "shardline_reports_accepted_total",
                "shardline_reports_conflated_total",
                "shardline_reports_shed_total",
                "shardline_messages_dropped_total{kind=\"report\"",
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut still_since) = (0, Instant::now());
    loop {
        let n = counted();
        if n >= published {
            break;
        }
        if n != last {
            (last, still_since) = (n, Instant::now());
        }
        // Stuck for 5 s with the verifiers idle: the rest is gone.
        if Instant::now() > deadline || still_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let max = sampling.join().unwrap();
    eprintln!("overload gauges, highest seen: {SAMPLED:?} = {max:?}");
    let (accepted, conflated, shed, dropped) = (
        alloc.metric("shardline_reports_accepted_total") as u64,
        alloc.metric("shardline_reports_conflated_total") as u64,
        alloc.metric("shardline_reports_shed_total") as u64,
        alloc.metric("shardline_messages_dropped_total{kind=\"report\"") as u64,
    );
    eprintln!(
        "published {published}: accepted {accepted}, conflated {conflated}, shed {shed}, dropped {dropped}; in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // rumqttd says when it moved a subscriber past messages it dropped.
    let log = alloc.log();
    let jumps: Vec<&str> = log.lines().filter(|l| l.contains("jump")).collect();
    assert_eq!(
        accepted + conflated + shed + dropped,
        published,
        "reports the broker acknowledged were lost: accepted {accepted} + conflated {conflated} + shed {shed} + dropped {dropped} != published {published}; \
         the broker skipped its subscriber ahead {} times: {:?}",
        jumps.len(),
        &jumps[..jumps.len().min(3)]
    );
    assert_eq!(dropped, 0, "genuine, in-order reports are never dropped");
    if routed {
        // The link took the group's publishes off the broker all along:
        // the gate never had to give up on them.
        assert!(
            !log.contains("letting them publish again"),
            "the gate stalled on routed uplinks"
        );
        assert_eq!(
            alloc.metric("shardline_ingest_gate_stall_reopens_total"),
            0.0
        );
        assert_eq!(alloc.metric("shardline_ingest_gate_groups "), 1.0);
    }
    // The overload was visible in /metrics while it lasted: reports
    // waited in the stage, the link fell behind the front and devices
    // were held (the flood is sized to need the gate: without it
    // rumqttd dropped acknowledged reports, ARCHITECTURE.md).
    for (m, v) in SAMPLED.iter().zip(max) {
        assert!(v > 0.0, "{m} never moved during the flood");
    }
    let held = alloc.metric("shardline_ingest_gate_held_seconds_total");
    assert!(held > 0.0, "devices were never held");
    eprintln!("devices held {held:.1} s in all");
    assert!(
        conflated > 0,
        "the flood is meant to exceed what the allocator verifies"
    );
    // Each device's newest report was accepted.
    for id in &ids {
        let (st, view) = alloc.api("GET", &format!("/v1/devices/{id}"), None);
        assert_eq!(st, 200, "{view}");
        assert_eq!(
            view["last_report_seq"].as_u64(),
            Some(REPORTS as u64),
            "{id}'s newest report: {view}"
        );
    }
    // No ack was dropped.
    alloc.wait_metric(
        "shardline_acks_accepted_total",
        acks as f64,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.metric("shardline_acks_accepted_total") as u64, acks);
    assert_eq!(
        alloc.metric("shardline_messages_dropped_total{kind=\"ack\",reason=\"not_ours\"}") as u64,
        acks
    );
    // Everything handled: the stage and the gate are empty again.
    for m in SAMPLED {
        assert_eq!(alloc.metric(m), 0.0, "{m} after the flood");
    }
    for p in pubs {
        let _ = p.disconnect().await;
    }
}
