//! The agent follows its group's signed assignment object (issue 19), with
//! real parts: up to three mosquitto processes on free ports act as the
//! broker endpoints, the real agent binary runs as a child process, and the
//! test plays the allocator by sealing assignment objects with the key the
//! agent pins and publishing them retained on `assign/{tenant}/{region}/{capability}` of every
//! broker (a cluster's nodes all hold the retained object).
//!
//! Asserted: the agent moves to the assigned endpoint and its reports arrive
//! there on the group-routed topic; an older version is refused, counted,
//! and changes nothing; a SIGKILLed broker under the agent is left for the
//! next endpoint of the object within the stated bound (10 s) with no report
//! lost; an expired object sends the agent back to its bootstrap endpoint
//! and the plain topics; the version floor survives a SIGKILL of the agent
//! (an older object replayed afterwards is refused). After a failover the
//! agent probes its first endpoint and returns to it once it is back, within
//! the stated bound, with a clean DISCONNECT and no report lost; an empty
//! retained message (the allocator's withdrawal) keeps the held object.

mod daemon_support;

use daemon_support::{activation, allocator_key, now_ms, wait_for, Agent, Broker};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shardline_shared::assign::{seal_assignment, Assignment, GroupId, Region, ServerId};
use shardline_shared::codec;
use shardline_shared::msg::{DeviceStatus, Instruction, Operation, Presence};
use shardline_shared::sign::{seal, Domain};
use shardline_shared::topics;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GROUP: &str = "acme.eu-west.vpn";

/// Bound on leaving a dead endpoint (see `daemon::assignment`: at most 5 s
/// of switch delay plus a connection attempt; the first switch is at once).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// `[assignment] home_probe_s` in the return-home test.
const HOME_PROBE_S: u64 = 2;
/// Bound on returning to a first endpoint that is back (see
/// `daemon::assignment`, "Return home"): the probe period in force (at most
/// twice the first when the first probe found it still down) plus a probe
/// and a connection.
const RETURN_BOUND: Duration = Duration::from_secs(2 * HOME_PROBE_S + 6);

fn group() -> GroupId {
    GroupId::new(GROUP).unwrap()
}

fn object(version: u64, issued_at_ms: u64, life_ms: u64, endpoints: &[String]) -> Vec<u8> {
    let a = Assignment {
        group: group(),
        version,
        issued_at_ms,
        expires_at_ms: issued_at_ms + life_ms,
        region: Region::new("eu-west").unwrap(),
        server: ServerId::new("alloc-a").unwrap(),
        endpoints: endpoints.to_vec(),
    };
    seal_assignment(&a, &[&allocator_key()])
}

/// A plain MQTT client on one broker that sees every `shardline/v1/…`
/// message and publishes assignment objects (the allocator's part).
struct Watcher {
    client: AsyncClient,
    rx: mpsc::Receiver<(String, Vec<u8>)>,
    rt: tokio::runtime::Runtime,
}

impl Watcher {
    fn connect(port: u16, name: &str) -> Watcher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = MqttOptions::new(
            format!("watch-{name}-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let c2 = client.clone();
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.subscribe("shardline/v1/#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        sub_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watcher subscribed");
        Watcher { client, rx, rt }
    }

    fn publish(&self, topic: &str, bytes: Vec<u8>, retain: bool) {
        self.rt
            .block_on(self.client.publish(topic, QoS::AtLeastOnce, retain, bytes))
            .unwrap();
    }

    fn publish_object(&self, bytes: Vec<u8>, retain: bool) {
        self.publish(&topics::assignment(&group()), bytes, retain);
    }

    /// The next report (topic, seq) within `timeout`, other messages skipped.
    fn report(&self, agent: &Agent, timeout: Duration) -> Option<(String, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (topic, payload) = self.rx.recv_timeout(left).ok()?;
            if topic.ends_with("/report") {
                return Some((topic, agent.open_report(&payload).seq));
            }
        }
    }

    /// The next report on `topic` within `timeout`.
    fn report_on(&self, agent: &Agent, topic: &str, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (t, seq) = self.report(agent, left)?;
            if t == topic {
                return Some(seq);
            }
        }
    }

    /// Every message received within `window`.
    fn drain(&self, window: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(m) => out.push(m),
                Err(_) => break,
            }
        }
        out
    }

    /// Report sequence numbers received within `window`, with their topics.
    fn reports_for(&self, agent: &Agent, window: Duration) -> Vec<(String, u64)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.report(agent, left) {
                Some(r) => out.push(r),
                None => break,
            }
        }
        out
    }
}

fn broker(dir: &Path, name: &str) -> Option<Broker> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    Broker::start(&d)
}

fn assignment_status(agent: &Agent) -> serde_json::Value {
    agent
        .status()
        .map(|s| s["assignment"].clone())
        .unwrap_or_default()
}

fn routed_report(agent: &Agent) -> String {
    topics::routed(&group(), &agent.device, topics::TopicKind::Report)
}

fn plain_report(agent: &Agent) -> String {
    topics::report(&agent.device)
}

#[test]
fn the_agent_moves_to_its_assigned_endpoint_refuses_rollback_and_fails_over() {
    let tmp = tempfile::tempdir().unwrap();
    let (Some(b0), Some(mut b1), Some(b2)) = (
        broker(tmp.path(), "b0"),
        broker(tmp.path(), "b1"),
        broker(tmp.path(), "b2"),
    ) else {
        return;
    };
    let adir = tmp.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = Agent::new(
        &adir,
        "asg-1",
        &b0.url(),
        100,
        &format!("\n[assignment]\ngroup = \"{GROUP}\"\n"),
    );
    let (w0, w1, w2) = (
        Watcher::connect(b0.port, "b0"),
        Watcher::connect(b1.port, "b1"),
        Watcher::connect(b2.port, "b2"),
    );
    agent.start(&[]);

    // Bootstrap: the configured broker, plain topics.
    w0.report_on(&agent, &plain_report(&agent), Duration::from_secs(10))
        .expect("plain reports on the bootstrap broker");
    assert_eq!(assignment_status(&agent)["source"], "bootstrap");

    // Version 3 names b1 then b2: the agent moves to b1, reports routed;
    // none is lost across the move (plain on b0 before, routed on b1 after).
    let v3 = object(3, now_ms(), 120_000, &[b1.url(), b2.url()]);
    for w in [&w0, &w1, &w2] {
        w.publish_object(v3.clone(), true);
    }
    let first_routed = w1
        .report_on(&agent, &routed_report(&agent), Duration::from_secs(10))
        .expect("routed reports on the assigned endpoint");
    let on_b0 = w0.drain(Duration::from_millis(300));
    let plain: BTreeSet<u64> = on_b0
        .iter()
        .filter(|(t, _)| *t == plain_report(&agent))
        .map(|(_, p)| agent.open_report(p).seq)
        .collect();
    // The move was a clean DISCONNECT: b0 never published the last will.
    let statuses: Vec<Presence> = on_b0
        .iter()
        .filter(|(t, _)| *t == topics::status(&agent.device))
        .map(|(_, p)| codec::decode::<DeviceStatus>(p).unwrap().presence)
        .collect();
    assert!(
        !statuses.contains(&Presence::Offline),
        "the old endpoint announced the device offline: {statuses:?}"
    );
    let last_plain = plain.last().copied().unwrap_or(first_routed);
    let gap: Vec<u64> = (plain.first().copied().unwrap_or(first_routed)..first_routed)
        .filter(|s| !plain.contains(s))
        .collect();
    assert!(gap.is_empty(), "reports lost in the move to b1: {gap:?}");
    assert!(
        last_plain + 1 >= first_routed,
        "plain up to {last_plain}, routed from {first_routed}"
    );
    let st = wait_for(Duration::from_secs(5), || {
        let s = assignment_status(&agent);
        (s["version"] == 3 && s["endpoint"] == b1.url().as_str()).then_some(s)
    })
    .expect("status shows version 3 on b1");
    assert_eq!(st["server"], "alloc-a");
    assert_eq!(st["source"], "assigned");
    assert_eq!(st["routed"], true);

    // An older version (naming b0) is refused, counted, changes nothing.
    w1.publish_object(object(2, now_ms(), 120_000, &[b0.url()]), false);
    wait_for(Duration::from_secs(5), || {
        (assignment_status(&agent)["counters"]["refused"]["rollback"] == 1).then_some(())
    })
    .expect("the rollback was counted");
    let st = assignment_status(&agent);
    assert_eq!(
        (st["version"].as_u64(), st["endpoint"].as_str()),
        (Some(3), Some(b1.url().as_str()))
    );
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(5))
        .expect("still reporting on b1");
    let log = agent.log();
    assert!(
        log.contains("assignment refused") && log.contains("rollback"),
        "{log}"
    );

    // Diagnostics (asked by a signed instruction on b1) come back on the
    // routed topic, their newest log lines naming the assignment in use.
    let now = now_ms();
    let ask = Instruction {
        device: agent.device.clone(),
        seq: 1,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ops: vec![Operation::RequestDiagnostics { max_lines: 50 }],
    };
    w1.publish(
        &topics::instr(&agent.device),
        seal(Domain::Instruction, &ask, &[&allocator_key()]),
        false,
    );
    let diag_topic = topics::routed(&group(), &agent.device, topics::TopicKind::Diagnostics);
    let diag = wait_for(Duration::from_secs(5), || {
        let (t, payload) = w1.rx.recv_timeout(Duration::from_millis(100)).ok()?;
        (t == diag_topic).then(|| shardline_shared::diag::open(&payload, &agent.public_key))
    })
    .expect("diagnostics on the routed topic")
    .expect("diagnostics signed by the device");
    let line = diag
        .log_lines
        .iter()
        .rev()
        .find(|l| l.contains("assignment status"))
        .expect("the assignment status line");
    assert!(
        line.contains(GROUP) && line.contains("version=3") && line.contains(&b1.url()),
        "{line}"
    );

    // SIGKILL the broker under the agent: it moves to b2 within the bound,
    // and every report sequence number arrives (on b1 before, b2 after).
    let before = w1.reports_for(&agent, Duration::from_millis(600));
    let mut seqs: BTreeSet<u64> = before.iter().map(|(_, s)| *s).collect();
    let first = *seqs.first().expect("reports before the kill");
    b1.kill9();
    let killed_at = Instant::now();
    let moved = w2
        .report_on(&agent, &routed_report(&agent), FAILOVER_BOUND)
        .expect("routed reports on b2 within the bound");
    let took = killed_at.elapsed();
    seqs.insert(moved);
    // What b1 delivered to its watcher before dying (kept in its channel).
    seqs.extend(
        w1.reports_for(&agent, Duration::from_millis(200))
            .into_iter()
            .map(|(_, s)| s),
    );
    eprintln!("left the killed endpoint in {took:?}");
    assert!(took <= FAILOVER_BOUND, "{took:?}");
    seqs.extend(
        w2.reports_for(&agent, Duration::from_secs(2))
            .into_iter()
            .map(|(_, s)| s),
    );
    let last = *seqs.last().unwrap();
    let missing: Vec<u64> = (first..=last).filter(|s| !seqs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "reports lost across the switch: {missing:?}"
    );
    let st = assignment_status(&agent);
    assert_eq!(st["endpoint"], b2.url().as_str());
    assert!(
        st["counters"]["endpoint_switches"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert!(agent.log().contains("trying the next one"));

    // Both endpoints dead for 3 s (the agent cycles between them, slowing
    // down), then b1 comes back: reached within the bound again.
    let mut b2 = b2;
    b2.kill9();
    std::thread::sleep(Duration::from_secs(3));
    b1.restart();
    let back_at = Instant::now();
    w1.report_on(&agent, &routed_report(&agent), FAILOVER_BOUND)
        .expect("routed reports on the returned b1 within the bound");
    let took = back_at.elapsed();
    eprintln!("reached the returned endpoint in {took:?}");
    assert!(took <= FAILOVER_BOUND, "{took:?}");
    agent.sigterm();
}

#[test]
fn an_expired_object_falls_back_to_bootstrap_and_the_floor_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (Some(b0), Some(b1)) = (broker(tmp.path(), "b0"), broker(tmp.path(), "b1")) else {
        return;
    };
    let adir = tmp.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = Agent::new(
        &adir,
        "asg-2",
        &b0.url(),
        100,
        &format!("\n[assignment]\ngroup = \"{GROUP}\"\n"),
    );
    let (w0, w1) = (
        Watcher::connect(b0.port, "b0"),
        Watcher::connect(b1.port, "b1"),
    );
    agent.start(&[]);
    w0.report_on(&agent, &plain_report(&agent), Duration::from_secs(10))
        .expect("plain reports on the bootstrap broker");

    // A short-lived version 5 on b1; nobody renews it.
    let issued = now_ms();
    let life = 5_000;
    let v5 = object(5, issued, life, &[b1.url()]);
    w0.publish_object(v5.clone(), true);
    w1.publish_object(v5, true);
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(5))
        .expect("routed reports on b1");
    // Forget the plain reports b0 got before the move (the old link may
    // still flush a few while it disconnects).
    w0.drain(Duration::from_millis(700));

    // At expiry: back on b0, plain topics.
    let back = w0
        .report_on(
            &agent,
            &plain_report(&agent),
            Duration::from_millis(life + 5_000),
        )
        .map(|_| now_ms())
        .expect("plain reports on bootstrap after expiry");
    assert!(back >= issued + life, "fell back before the expiry");
    assert!(
        back <= issued + life + 3_000,
        "fell back {} ms after expiry",
        back - issued - life
    );
    let st = wait_for(Duration::from_secs(3), || {
        let s = assignment_status(&agent);
        (s["source"] == "expired").then_some(s)
    })
    .expect("status shows the expiry");
    assert_eq!(
        (st["version"].as_u64(), st["routed"].as_bool()),
        (Some(5), Some(false))
    );
    assert_eq!(st["endpoint"], b0.url().as_str());
    assert_eq!(st["counters"]["fallbacks"], 1);
    assert!(
        agent
            .log()
            .contains("no fresh object came before its expiry"),
        "the unanswered re-fetch is logged"
    );

    // Nothing reaches b1 any more; forget what it got before the expiry.
    w1.reports_for(&agent, Duration::from_millis(300));

    // SIGKILL the agent; replay an older (still valid) version 4 as the
    // retained object; restart: the floor (5) is on disk, v4 is refused.
    agent.kill9();
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adir.join("state/assignment.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk["current"]["assignment"]["version"], 5);
    w0.publish_object(object(4, now_ms(), 60_000, &[b1.url()]), true);
    agent.start(&[]);
    // Refused once or twice: queued in the agent's persistent session on b0
    // while it was down, and again as the retained object on subscribe.
    wait_for(Duration::from_secs(10), || {
        let n = assignment_status(&agent)["counters"]["refused"]["rollback"].as_u64();
        (n >= Some(1)).then_some(())
    })
    .expect("the replayed older object was refused after the restart");
    let st = assignment_status(&agent);
    assert_eq!(
        (st["version"].as_u64(), st["source"].as_str()),
        (Some(5), Some("expired"))
    );
    w0.report_on(&agent, &plain_report(&agent), Duration::from_secs(5))
        .expect("still plain reports on bootstrap");
    let on_b1 = w1.reports_for(&agent, Duration::from_secs(1));
    assert!(
        on_b1.is_empty(),
        "the refused object moved the agent: {on_b1:?}"
    );

    // A fresh version 6 routes it again.
    w0.publish_object(object(6, now_ms(), 60_000, &[b1.url()]), true);
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(10))
        .expect("routed again under version 6");
    agent.sigterm();
}

/// Issue 19's "a region cut off: its devices keep their last-known-good
/// profile until leases expire, and reconcile when it returns", with the
/// test playing the allocator (this branch's allocator neither publishes
/// assignments nor reads the group-routed topics yet, and its shortest
/// lease is two minutes). The region is cut off by SIGKILLing both brokers
/// the device could use; it returns when the bootstrap broker restarts.
#[test]
fn a_region_cut_off_keeps_its_shards_until_their_leases_expire_and_reconciles() {
    let tmp = tempfile::tempdir().unwrap();
    let (Some(mut b0), Some(mut b1)) = (broker(tmp.path(), "b0"), broker(tmp.path(), "b1")) else {
        return;
    };
    let adir = tmp.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = Agent::new(
        &adir,
        "asg-3",
        &b0.url(),
        100,
        &format!("\n[assignment]\ngroup = \"{GROUP}\"\n"),
    );
    let (w0, w1) = (
        Watcher::connect(b0.port, "b0"),
        Watcher::connect(b1.port, "b1"),
    );
    agent.start(&[]);
    w0.report_on(&agent, &plain_report(&agent), Duration::from_secs(10))
        .expect("plain reports on the bootstrap broker");

    // Assigned to the regional broker b1 for 8 s.
    let issued = now_ms();
    let v1 = object(1, issued, 8_000, &[b1.url()]);
    w0.publish_object(v1.clone(), true);
    w1.publish_object(v1, true);
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(5))
        .expect("routed reports on b1");
    w0.drain(Duration::from_millis(700));

    // The allocator (on b1) grants two shards: a short lease and a long one.
    let now = now_ms();
    let short = now + 3_000;
    let long = now + 120_000;
    let instr = |seq: u64, ops: Vec<Operation>| {
        let now = now_ms();
        seal(
            Domain::Instruction,
            &Instruction {
                device: agent.device.clone(),
                seq,
                issued_at_ms: now,
                expires_at_ms: now + 60_000,
                ops,
            },
            &[&allocator_key()],
        )
    };
    w1.publish(
        &topics::instr(&agent.device),
        instr(
            1,
            vec![
                Operation::Activate(activation("shaper@1.0.0", "qos", short)),
                Operation::Activate(activation("tunnel@1.0.0", "vpn", long)),
            ],
        ),
        false,
    );
    let ack_topic = topics::routed(&group(), &agent.device, topics::TopicKind::Ack);
    let acked = wait_for(Duration::from_secs(5), || {
        let (t, payload) = w1.rx.recv_timeout(Duration::from_millis(100)).ok()?;
        (t == ack_topic).then(|| agent.open_ack(&payload).instruction_seq)
    });
    assert_eq!(acked, Some(1), "the ack came back on the routed topic");
    let mut shards = agent.profile_shards();
    shards.sort();
    assert_eq!(shards, vec!["shaper@1.0.0", "tunnel@1.0.0"]);

    // The region is cut off: no broker at all.
    b1.kill9();
    b0.kill9();
    assert!(now_ms() + 500 < short, "test setup too slow for the lease");

    // The last-known-good profile holds until the short lease expires, and
    // not longer; the long one stays.
    std::thread::sleep(Duration::from_millis(short.saturating_sub(now_ms() + 500)));
    assert_eq!(
        agent.profile_shards().len(),
        2,
        "kept before its lease ran out"
    );
    let stopped_at = wait_for(Duration::from_secs(5), || {
        (agent.profile_shards() == vec!["tunnel@1.0.0".to_string()]).then(now_ms)
    })
    .expect("the expired shard left the profile");
    assert!(
        stopped_at >= short && stopped_at <= short + 1_500,
        "stopped {} ms after its lease",
        stopped_at as i64 - short as i64
    );

    // The assignment expires during the cut: back to bootstrap.
    let st = wait_for(Duration::from_secs(8), || {
        let s = assignment_status(&agent);
        (s["source"] == "expired").then_some(s)
    })
    .expect("the assignment fell back at its expiry");
    assert!(now_ms() >= issued + 8_000);
    assert_eq!(st["endpoint"], b0.url().as_str());
    assert_eq!(
        agent.profile_shards(),
        vec!["tunnel@1.0.0"],
        "the long lease holds"
    );

    // The region returns (the bootstrap broker): plain reports flow again,
    // they say what ran out, and the allocator's instruction re-activates.
    b0.restart();
    let report = wait_for(Duration::from_secs(15), || {
        let (t, payload) = w0.rx.recv_timeout(Duration::from_millis(200)).ok()?;
        (t == plain_report(&agent)).then(|| agent.open_report(&payload))
    })
    .expect("plain reports on bootstrap once the region returns");
    assert_eq!(report.applied_instruction_seq, 1);
    w0.publish(
        &topics::instr(&agent.device),
        instr(
            2,
            vec![Operation::Activate(activation(
                "shaper@1.0.0",
                "qos",
                now_ms() + 60_000,
            ))],
        ),
        false,
    );
    // (The ack of seq 1 may come again first: its PUBACK can die with b1,
    // and the outbox resends until one arrives; at least once.)
    let acked = wait_for(Duration::from_secs(10), || {
        let (t, payload) = w0.rx.recv_timeout(Duration::from_millis(100)).ok()?;
        let seq =
            (t == topics::ack(&agent.device)).then(|| agent.open_ack(&payload).instruction_seq);
        seq.filter(|&s| s == 2)
    });
    assert_eq!(
        acked,
        Some(2),
        "re-activation acknowledged on the plain topic"
    );
    let mut shards = agent.profile_shards();
    shards.sort();
    assert_eq!(shards, vec!["shaper@1.0.0", "tunnel@1.0.0"], "reconciled");
    agent.sigterm();
}

#[test]
fn after_a_failover_the_agent_returns_to_its_first_endpoint_when_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (Some(b0), Some(mut b1), Some(b2)) = (
        broker(tmp.path(), "b0"),
        broker(tmp.path(), "b1"),
        broker(tmp.path(), "b2"),
    ) else {
        return;
    };
    let adir = tmp.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = Agent::new(
        &adir,
        "asg-home",
        &b0.url(),
        100,
        &format!("\n[assignment]\ngroup = \"{GROUP}\"\nhome_probe_s = {HOME_PROBE_S}\n"),
    );
    let (w0, w1, w2) = (
        Watcher::connect(b0.port, "h0"),
        Watcher::connect(b1.port, "h1"),
        Watcher::connect(b2.port, "h2"),
    );
    agent.start(&[]);
    let v3 = object(3, now_ms(), 600_000, &[b1.url(), b2.url()]);
    for w in [&w0, &w1, &w2] {
        w.publish_object(v3.clone(), true);
    }
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(10))
        .expect("routed reports on the first endpoint");

    // b1 dies: the agent fails over to b2.
    let mut seqs: BTreeSet<u64> = w1
        .reports_for(&agent, Duration::from_millis(500))
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let first = *seqs.first().expect("reports before the kill");
    b1.kill9();
    seqs.insert(
        w2.report_on(&agent, &routed_report(&agent), FAILOVER_BOUND)
            .expect("routed reports on b2 after the failover"),
    );
    // What b1 delivered to its watcher before dying.
    seqs.extend(
        w1.reports_for(&agent, Duration::from_millis(200))
            .into_iter()
            .map(|(_, s)| s),
    );
    // b1 is back: the agent returns to it within the bound.
    // (The watcher subscribes well before the agent's first probe, 2 s
    // after the failover, so it sees every report the agent sends there.)
    b1.restart();
    let back_at = Instant::now();
    let w1 = Watcher::connect(b1.port, "h1-again");
    let home = w1
        .report_on(&agent, &routed_report(&agent), RETURN_BOUND)
        .expect("routed reports on the first endpoint again within the bound");
    let took = back_at.elapsed();
    eprintln!("returned to the first endpoint {took:?} after it came back");
    assert!(took <= RETURN_BOUND, "{took:?}");
    seqs.insert(home);
    // Everything b2 got before the move, and nothing lost across it.
    let on_b2 = w2.drain(Duration::from_millis(300));
    seqs.extend(
        on_b2
            .iter()
            .filter(|(t, _)| *t == routed_report(&agent))
            .map(|(_, p)| agent.open_report(p).seq),
    );
    seqs.extend(
        w1.reports_for(&agent, Duration::from_secs(1))
            .into_iter()
            .map(|(_, s)| s),
    );
    let last = *seqs.last().unwrap();
    let missing: Vec<u64> = (first..=last).filter(|s| !seqs.contains(s)).collect();
    assert!(missing.is_empty(), "reports lost: {missing:?}");
    // A planned move: b2 never published the last will.
    let offline = on_b2.iter().any(|(t, p)| {
        *t == topics::status(&agent.device)
            && codec::decode::<DeviceStatus>(p).unwrap().presence == Presence::Offline
    });
    assert!(!offline, "b2 announced the device offline");
    let st = wait_for(Duration::from_secs(5), || {
        let s = assignment_status(&agent);
        (s["endpoint"] == b1.url().as_str()).then_some(s)
    })
    .expect("status shows the first endpoint");
    assert!(st["counters"]["returns_home"].as_u64() >= Some(1), "{st}");
    assert!(st["counters"]["home_probes"].as_u64() >= Some(1), "{st}");
    assert!(agent.log().contains("return_home"), "{}", agent.log());

    // An empty retained message (the allocator's withdrawal) on b1: the held
    // object stays, counted, not refused; routing goes on.
    w1.publish_object(Vec::new(), true);
    wait_for(Duration::from_secs(5), || {
        (assignment_status(&agent)["counters"]["withdrawn"] == 1).then_some(())
    })
    .expect("the withdrawal was counted");
    let st = assignment_status(&agent);
    assert_eq!(
        (st["version"].as_u64(), st["routed"].as_bool()),
        (Some(3), Some(true)),
        "{st}"
    );
    assert!(
        st["counters"]["refused"]
            .as_object()
            .is_none_or(|r| r.is_empty()),
        "{st}"
    );
    w1.report_on(&agent, &routed_report(&agent), Duration::from_secs(5))
        .expect("still reporting on the routed topic");
    agent.sigterm();
}
