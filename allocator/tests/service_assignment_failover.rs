//! The regional assignment on a broker read without shared subscriptions
//! (issue 19): two real allocator processes share one real PostgreSQL
//! store behind one real mosquitto with `[broker] uplink = "routed"` and two
//! groups. Each group is assigned to one instance; simulated devices send
//! signed reports on their group's routed topics. The instance owning a
//! group is SIGKILLed while its devices keep reporting: the survivor
//! publishes a new version naming itself within the stated bound
//! (heartbeat timeout 3 s + one 200 ms tick, + 1.8 s for a lead takeover
//! when the victim led and for this test's own polling, each round of which
//! waits up to 100 ms per device: 5 s), subscribes to the group's routed
//! filter and accepts its reports; no instruction sequence number is reused
//! and each device's new numbers only grow.

mod service_common;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use service_common::*;
use shardline_shared::assign::{decode_assignment, GroupId};
use shardline_shared::msg::{AckOutcome, Presence};
use shardline_shared::sign::{self, Domain};
use shardline_shared::topics::{self, TopicKind};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const GROUPS: [&str; 2] = ["acme.eu-west.vpn", "acme.eu-west.qos"];
const PER_GROUP: usize = 2;
/// The bound this test holds the takeover to (module docs).
const TAKEOVER_BOUND: Duration = Duration::from_secs(5);

fn extra(id: &str) -> String {
    format!(
        r#"uplink = "routed"
[instance]
id = "{id}"
region = "eu-west"
capacity_reports_per_s = 15
endpoints = ["mqtt://127.0.0.1:1883"]
[assignment]
enabled = true
ttl_s = 60
period_s = 5
unsubscribe_grace_s = 2
[assignment.engine]
heartbeat_interval_ms = 1000
heartbeat_timeout_ms = 3000
min_dwell_ms = 0
[[assignment.groups]]
tenant = "acme"
region = "eu-west"
capability = "vpn"
expected_reports_per_s = 10
[[assignment.groups]]
tenant = "acme"
region = "eu-west"
capability = "qos"
expected_reports_per_s = 10
"#
    )
}

/// Instruction numbers seen per device; panics on a number reused for
/// other content or a new number below one already seen.
#[derive(Default)]
struct Seen(BTreeMap<usize, BTreeMap<u64, Vec<u8>>>);

impl Seen {
    fn record(&mut self, d: usize, seq: u64, payload: Vec<u8>) {
        let per = self.0.entry(d).or_default();
        match per.get(&seq) {
            Some(prev) => assert_eq!(
                prev, &payload,
                "device {d}: sequence {seq} reused for another instruction"
            ),
            None => {
                let max = per.keys().next_back().copied().unwrap_or(0);
                assert!(
                    seq > max,
                    "device {d}: new instruction {seq} after {max}: numbers must grow"
                );
                per.insert(seq, payload);
            }
        }
    }
}

/// Every assignment object published (group, version, server).
async fn watch(port: u16) -> mpsc::UnboundedReceiver<(String, u64, String)> {
    let mut opts = MqttOptions::new("assign-failover-watch", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(topics::ALL_ASSIGNMENTS, QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(env) = sign::parse_envelope(&p.payload, 4096) else {
                        continue;
                    };
                    let Ok(a) = decode_assignment(&env.payload) else {
                        continue;
                    };
                    let m = (a.group.to_string(), a.version, a.server.to_string());
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx
}

async fn send_routed(dev: &mut Device, group: &GroupId) {
    let r = dev.report();
    let bytes = dev.seal_report(&r);
    dev.client
        .publish(
            topics::routed(group, &dev.id, TopicKind::Report),
            QoS::AtLeastOnce,
            false,
            bytes,
        )
        .await
        .unwrap();
}

async fn ack_routed(dev: &mut Device, group: &GroupId, seq: u64) {
    dev.applied = dev.applied.max(seq);
    let ack = shardline_shared::msg::InstructionAck {
        device: dev.id.clone(),
        instruction_seq: seq,
        outcome: AckOutcome::Applied,
        at_ms: now_ms(),
    };
    dev.client
        .publish(
            topics::routed(group, &dev.id, TopicKind::Ack),
            QoS::AtLeastOnce,
            false,
            sign::seal(Domain::Ack, &ack, &[&dev.key]),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_takes_a_killed_instances_group_within_the_bound() {
    failover(false).await;
}

/// The killed instance held the store's lead: the survivor must also take
/// the lead and rebuild the engine from the stored assignments (versions
/// continue above the stored ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_takes_the_killed_leads_group_within_the_bound() {
    failover(true).await;
}

/// Kills the owner of one group: the lead (alloc-a, started first) when
/// `kill_lead`, else the other instance.
async fn failover(kill_lead: bool) {
    let dir = TempDir::new(if kill_lead {
        "assign-failover-lead"
    } else {
        "assign-failover"
    });
    let Some(mosquitto) = Mosquitto::start(&dir.0) else {
        return;
    };
    let pg = match xtask::kit::postgres::TestPostgres::start(&dir.0.join("pg")) {
        Ok(pg) => pg,
        Err(e) => {
            println!("SKIP: no PostgreSQL server can be started here: {e}");
            return;
        }
    };
    let broker = BrokerMode::External(format!("mqtt://127.0.0.1:{}", mosquitto.port));
    let mut rx = watch(mosquitto.port).await;
    let mut a = Allocator::start_on_shared_store_with(
        &dir.0.join("a"),
        broker.clone(),
        &pg.url(),
        None,
        &extra("alloc-a"),
    );
    let mut b = Allocator::start_on_shared_store_with(
        &dir.0.join("b"),
        broker,
        &pg.url(),
        Some(&a),
        &extra("alloc-b"),
    );
    let key = a.public_key;

    // Each group on its own instance (15 reports/s each, 10 per group).
    let deadline = Instant::now() + Duration::from_secs(30);
    let placed = loop {
        let o = a.assignment_owners();
        let servers: std::collections::BTreeSet<&String> = o.values().map(|(s, _)| s).collect();
        if o.len() == 2 && servers.len() == 2 {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "groups not spread over both instances: {o:?}; logs:\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // Devices, enrolled through A, each reporting on its group's routed topics.
    let groups: Vec<GroupId> = GROUPS.iter().map(|g| GroupId::new(*g).unwrap()).collect();
    let mut devices = Vec::new();
    for d in 0..GROUPS.len() * PER_GROUP {
        let k = device_key(d as u8);
        let (st, body) = a.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({
                "device": format!("asg-{d}"), "public_key": hex::encode(k.public_key()), "tier": "standard"
            })),
        );
        assert_eq!(st, 200, "{body}");
        let dev = Device::connect(&format!("asg-{d}"), k, mosquitto.port).await;
        dev.publish_status(Presence::Online).await;
        devices.push((d, d / PER_GROUP, dev));
    }
    // Let the owners subscribe to their groups (one tick) and a former owner
    // drop a moved group (`unsubscribe_grace_s` = 2) before reporting: during
    // that overlap both read the group (harmless: the store's conditional
    // writes let one commit), after it each report is read once.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut seen = Seen::default();
    for _ in 0..6 {
        for (_, g, dev) in devices.iter_mut() {
            send_routed(dev, &groups[*g]).await;
        }
        for (d, g, dev) in devices.iter_mut() {
            while let Some((instr, payload)) =
                dev.next_instruction(&key, Duration::from_millis(200)).await
            {
                seen.record(*d, instr.seq, payload);
                ack_routed(dev, &groups[*g], instr.seq).await;
            }
        }
    }
    let accepted = |x: &Allocator| x.metric("shardline_reports_accepted_total");
    let total = accepted(&a) + accepted(&b);
    assert_eq!(
        total,
        (devices.len() * 6) as f64,
        "every routed report accepted exactly once; logs:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    for d in 0..devices.len() {
        assert!(
            seen.0.get(&d).is_some_and(|m| !m.is_empty()),
            "device {d} got its activation"
        );
    }

    // Kill the owner of the first group while its devices keep reporting.
    // alloc-a started first and took the store's lead (its heartbeat says so).
    let (_, v) = a.api("GET", "/v1/assignments", None);
    let a_leads = v["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["server"] == "alloc-a"))
        .map(|s| s["lead"] == true);
    assert_eq!(a_leads, Some(true), "{v}");
    let victim_id = if kill_lead { "alloc-a" } else { "alloc-b" };
    let group = *GROUPS
        .iter()
        .find(|g| placed[**g].0 == victim_id)
        .expect("the victim owns a group");
    let other = *GROUPS.iter().find(|g| **g != group).unwrap();
    let old_version = placed[group].1;
    let (victim, survivor) = if victim_id == "alloc-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let survivor_id = if victim_id == "alloc-a" {
        "alloc-b"
    } else {
        "alloc-a"
    };
    while rx.try_recv().is_ok() {}
    let before = survivor.metric("shardline_reports_accepted_total");
    victim.kill9();
    let killed_at = Instant::now();
    let mut took_over: Option<Duration> = None;
    let mut reports_after = 0usize;
    while killed_at.elapsed() < TAKEOVER_BOUND + Duration::from_secs(6) {
        for (_, g, dev) in devices.iter_mut() {
            send_routed(dev, &groups[*g]).await;
            reports_after += 1;
        }
        for (d, g, dev) in devices.iter_mut() {
            while let Some((instr, payload)) =
                dev.next_instruction(&key, Duration::from_millis(100)).await
            {
                seen.record(*d, instr.seq, payload);
                ack_routed(dev, &groups[*g], instr.seq).await;
            }
        }
        while let Ok((g, version, server)) = rx.try_recv() {
            if g == group && server == survivor_id && took_over.is_none() {
                assert!(
                    version > old_version,
                    "a new version: {version} > {old_version}"
                );
                took_over = Some(killed_at.elapsed());
            }
        }
        if took_over.is_some_and(|t| killed_at.elapsed() > t + Duration::from_secs(3)) {
            break;
        }
    }
    let took = took_over.unwrap_or_else(|| {
        panic!(
            "the survivor never published {} naming itself; log:\n{}",
            group,
            survivor.log()
        )
    });
    println!(
        "takeover of {} from {victim_id} (it led: {}) by {survivor_id} published {took:?} after the SIGKILL",
        group, kill_lead
    );
    assert!(
        took <= TAKEOVER_BOUND,
        "takeover took {took:?}, bound {TAKEOVER_BOUND:?}"
    );
    // The survivor reads the group's routed topics: the reports sent from
    // the moment it subscribed are accepted there. Let the last ones land.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stored = survivor.assignment_owners();
    assert_eq!(stored[group].0, survivor_id, "{stored:?}");
    assert_eq!(stored[other].0, survivor_id, "{stored:?}");
    let before_last = survivor.metric("shardline_reports_accepted_total");
    for (_, g, dev) in devices.iter_mut() {
        send_routed(dev, &groups[*g]).await;
    }
    let got = survivor.wait_metric(
        "shardline_reports_accepted_total",
        before_last + devices.len() as f64,
        Duration::from_secs(5),
    );
    assert!(got > before, "the survivor accepted reports after the kill");
    assert!(reports_after > 0);
    for (d, g, dev) in devices.iter_mut() {
        while let Some((instr, payload)) =
            dev.next_instruction(&key, Duration::from_millis(300)).await
        {
            seen.record(*d, instr.seq, payload);
            ack_routed(dev, &groups[*g], instr.seq).await;
        }
    }
}
