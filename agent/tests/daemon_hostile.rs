//! Hostile publishers on the broker (issue 14), against real processes: a
//! real mosquitto with the shipped fleet settings (`packaging/mosquitto/`:
//! logins, ACL, 1 MiB packet cap), the real agent logging in with its
//! password file, and plain MQTT clients as the allocator and as attackers.
//!
//! What each test shows:
//! - logins and topic authorization: anonymous clients and wrong passwords
//!   are refused; a logged-in neighbour can neither read a device's topics
//!   nor publish on them (a forged retained "offline" status never reaches
//!   the allocator), nor take over the device's session by its client id;
//! - size: a 500 KiB instruction reaches the agent and is counted and
//!   dropped without costing the connection; a 2 MiB one (or a 2 MiB
//!   retained status) costs its publisher the connection and reaches nobody;
//! - a flood of 11,000 garbage instructions at QoS 0 and a replay flood of a
//!   genuine old instruction: reports keep flowing without a gap, nothing is
//!   dropped from the outbox, garbage gets no ack, replays only a few.

mod daemon_support;

use daemon_support::{
    activation, allocator_key, now_ms, status_counter, wait_for, Agent, Broker, Cloud, Peer,
};
use rumqttc::QoS;
use shardline_agent::daemon::manager::{ACK_BURST, ACK_PER_S};
use shardline_shared::msg::{
    AckOutcome, DeviceStatus, Instruction, Operation, Presence, QosReport,
};
use shardline_shared::sign::{seal, Domain, KeyPair};
use shardline_shared::{codec, topics, DeviceId};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const PW_A: &str = "gw-a-password-0123456789";
const PW_B: &str = "gw-b-password-9876543210";
const PW_ALLOC: &str = "allocator-password-abcdef";
const PW_EVIL: &str = "attacker-password-zyxwvu";

/// A second allocator-like identity (as an operator adds for a second
/// instance): what an attacker who stole publish rights would hold.
const ACL_ATTACKER: &str = "user attacker\n\
    topic write shardline/v1/dev/+/instr\n\
    topic write shardline/v1/dev/+/status\n\
    topic read shardline/v1/dev/+/status\n";

fn users() -> Vec<(&'static str, &'static str)> {
    vec![
        ("gw-a", PW_A),
        ("gw-b", PW_B),
        ("shardline-allocator", PW_ALLOC),
        ("attacker", PW_EVIL),
    ]
}

/// The agent `gw-a`, logging in with a 0600 password file.
fn agent_a(dir: &Path, broker: &Broker, window_ms: u32) -> Agent {
    let pw = dir.join("mqtt-password");
    std::fs::write(&pw, format!("{PW_A}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    Agent::new_with_broker(
        dir,
        "gw-a",
        &broker.url(),
        window_ms,
        &format!("password_file = \"{}\"\n", pw.display()),
        "",
    )
}

fn instruction(device: &DeviceId, seq: u64, key: &KeyPair) -> Vec<u8> {
    let now = now_ms();
    seal(
        Domain::Instruction,
        &Instruction {
            device: device.clone(),
            seq,
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
            ops: vec![Operation::Activate(activation(
                "tunnel@1.0.0",
                "vpn",
                now + 120_000,
            ))],
        },
        &[key],
    )
}

/// Report sequence numbers must have no gap between the first and the last.
fn assert_no_gap(seqs: &[u64]) {
    assert!(!seqs.is_empty(), "no reports");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "report lost or reordered: {seqs:?}");
    }
}

#[test]
fn shipped_mosquitto_requires_logins_and_keeps_devices_to_their_own_topics() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start_shipped(tmp.path(), &users(), ACL_ATTACKER) else {
        return;
    };
    let mut agent = agent_a(tmp.path(), &broker, 100);
    let a = agent.device.clone();
    let cloud = Cloud::connect_as(broker.port, &a, Some(("shardline-allocator", PW_ALLOC)));
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("the agent logs in with its password file and reports");

    let refused = Peer::connect(broker.port, "anon", None).err();
    assert!(refused.is_some(), "an anonymous client is refused");
    let refused = Peer::connect(broker.port, "x", Some(("gw-b", "not-the-password!!"))).err();
    assert!(refused.is_some(), "a wrong password is refused");
    let refused = Peer::connect(broker.port, "x", Some(("gw-a", PW_B))).err();
    assert!(refused.is_some(), "another device's username is refused");

    // The neighbour gw-b, logged in, asks for gw-a's client id (to take over
    // its session), subscribes to gw-a's topics and publishes on them.
    let mut b = Peer::connect(broker.port, "shardline-agent-gw-a", Some(("gw-b", PW_B)))
        .expect("gw-b logs in");
    b.subscribe(&topics::instr(&a));
    b.subscribe(&topics::report(&a));
    let forged_offline = codec::encode(&DeviceStatus {
        device: a.clone(),
        presence: Presence::Offline,
        applied_instruction_seq: 0,
        agent_version: "evil".into(),
        at_ms: now_ms(),
    });
    b.publish(&topics::status(&a), forged_offline, QoS::AtLeastOnce, true);
    b.publish(
        &topics::instr(&a),
        b"garbage".to_vec(),
        QoS::AtLeastOnce,
        false,
    );
    b.publish(
        &topics::report(&a),
        b"forged report".to_vec(),
        QoS::AtLeastOnce,
        false,
    );

    // The allocator's instruction reaches gw-a (and only gw-a).
    cloud.send_instruction(&a, instruction(&a, 1, &allocator_key()));
    let ack = agent.open_ack(&cloud.recv_kind("/ack", Duration::from_secs(10)).unwrap());
    assert_eq!(ack.outcome, AckOutcome::Applied);

    let seen_by_b = b.drain(Duration::from_secs(1));
    assert!(
        seen_by_b.is_empty(),
        "a neighbour read gw-a's topics: {:?}",
        seen_by_b.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    // What the allocator saw: gw-a's own messages only.
    let report = wait_for(Duration::from_secs(5), || {
        let bytes = cloud.recv_kind("/report", Duration::from_millis(500))?;
        let r = agent.open_report(&bytes);
        (r.applied_instruction_seq == 1).then_some(r)
    })
    .expect("a report after the instruction");
    assert_eq!(
        report.rejections.total(),
        0,
        "the neighbour's garbage never reached the agent"
    );
    for (topic, payload) in cloud.drain(Duration::from_millis(500)) {
        if topic.ends_with("/status") {
            let st: DeviceStatus = codec::decode(&payload).expect("status from the agent");
            assert_eq!(st.presence, Presence::Online, "forged status delivered");
        } else if topic.ends_with("/report") {
            agent.open_report(&payload);
        }
    }
    // A fresh subscriber (an allocator restarting) gets the real retained status.
    let mut fresh = Peer::connect(broker.port, "x", Some(("attacker", PW_EVIL))).unwrap();
    fresh.subscribe(&topics::status(&a));
    let retained = fresh.drain(Duration::from_millis(700));
    assert_eq!(retained.len(), 1, "one retained status");
    let st: DeviceStatus = codec::decode(&retained[0].1).unwrap();
    assert_eq!(st.presence, Presence::Online);
    assert_eq!(st.agent_version, env!("CARGO_PKG_VERSION"));

    assert_eq!(
        status_counter(&agent, "connects"),
        1,
        "the agent was never kicked off"
    );
    assert_eq!(status_counter(&agent, "link_drops"), 0);
    agent.sigterm();
}

#[test]
fn oversize_publishes_neither_disconnect_the_device_nor_reach_the_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start_shipped(tmp.path(), &users(), ACL_ATTACKER) else {
        return;
    };
    let mut agent = agent_a(tmp.path(), &broker, 100);
    let a = agent.device.clone();
    let cloud = Cloud::connect_as(broker.port, &a, Some(("shardline-allocator", PW_ALLOC)));
    agent.start(&[]);
    let first = agent.open_report(&cloud.recv_kind("/report", Duration::from_secs(10)).unwrap());
    let mut seqs = vec![first.seq];
    let collect = |cloud: &Cloud, window: Duration, seqs: &mut Vec<u64>| -> Vec<QosReport> {
        let mut out = Vec::new();
        for (topic, payload) in cloud.drain(window) {
            if topic.ends_with("/report") {
                let r = agent.open_report(&payload);
                seqs.push(r.seq);
                out.push(r);
            }
        }
        out
    };

    // 500 KiB on the instruction topic: under the broker cap, so it reaches
    // the agent, which counts it as malformed (and stays connected).
    let evil = Peer::connect(broker.port, "x", Some(("attacker", PW_EVIL))).unwrap();
    evil.publish(
        &topics::instr(&a),
        vec![0x01; 500 * 1024],
        QoS::AtLeastOnce,
        false,
    );
    let reports = collect(&cloud, Duration::from_secs(2), &mut seqs);
    assert!(
        reports.last().is_some_and(|r| r.rejections.malformed == 1),
        "the 500 KiB instruction was counted: {:?}",
        reports.last().map(|r| &r.rejections)
    );

    // 2 MiB: above the cap; the broker drops the publisher, nobody gets it.
    evil.publish(
        &topics::instr(&a),
        vec![0x02; 2 << 20],
        QoS::AtLeastOnce,
        false,
    );
    let mut evil = evil;
    assert!(
        evil.wait_down(Duration::from_secs(5)).is_some(),
        "the broker disconnects a 2 MiB publisher"
    );
    // A 2 MiB retained status (what made the allocator reconnect every
    // 0.5 s) is refused as well and never retained.
    let evil2 = Peer::connect(broker.port, "x", Some(("attacker", PW_EVIL))).unwrap();
    evil2.publish(
        &topics::status(&DeviceId::new("gw-x").unwrap()),
        vec![0x03; 2 << 20],
        QoS::AtLeastOnce,
        true,
    );
    let mut evil2 = evil2;
    assert!(evil2.wait_down(Duration::from_secs(5)).is_some());
    let mut fresh = Peer::connect(broker.port, "x", Some(("attacker", PW_EVIL))).unwrap();
    fresh.subscribe("shardline/v1/dev/+/status");
    let retained = fresh.drain(Duration::from_millis(700));
    assert!(
        retained.iter().all(|(t, _)| !t.contains("gw-x")),
        "an oversize retained status was kept"
    );

    let reports = collect(&cloud, Duration::from_secs(2), &mut seqs);
    assert!(!reports.is_empty(), "reports keep coming");
    assert_eq!(
        reports.last().unwrap().rejections.malformed,
        1,
        "the 2 MiB instruction never reached the agent"
    );
    assert_no_gap(&seqs);
    assert_eq!(status_counter(&agent, "connects"), 1, "no reconnect");
    assert_eq!(status_counter(&agent, "link_drops"), 0);

    // The session holds nothing that wedges a restarted agent.
    agent.sigterm();
    let before = *seqs.iter().max().unwrap();
    agent.start(&[]);
    let after = wait_for(Duration::from_secs(10), || {
        let r = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(500))?);
        (r.seq > before).then_some(r)
    });
    assert!(after.is_some(), "the restarted agent reports");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status_counter(&agent, "connects"), 1, "no reconnect loop");
    assert_eq!(status_counter(&agent, "link_drops"), 0);
    agent.sigterm();
}

#[test]
fn a_garbage_flood_costs_no_writes_and_reports_keep_flowing() {
    const FLOOD: usize = 11_000;
    const REPLAYS: usize = 1_000;
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start_shipped(tmp.path(), &users(), ACL_ATTACKER) else {
        return;
    };
    let mut agent = agent_a(tmp.path(), &broker, 100);
    let a = agent.device.clone();
    let cloud = Cloud::connect_as(broker.port, &a, Some(("shardline-allocator", PW_ALLOC)));
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");
    // A genuine instruction, so that a later replay of it is a Rollback.
    let genuine = instruction(&a, 3, &allocator_key());
    cloud.send_instruction(&a, genuine.clone());
    cloud.send_instruction(&a, instruction(&a, 4, &allocator_key()));
    for _ in 0..2 {
        let ack = agent.open_ack(&cloud.recv_kind("/ack", Duration::from_secs(10)).unwrap());
        assert_eq!(ack.outcome, AckOutcome::Applied);
    }

    // The garbage: undecodable, forged (unknown key), another device's,
    // tampered (bad signature), rotating.
    let other = DeviceId::new("gw-b").unwrap();
    let forged = instruction(&a, 99, &KeyPair::from_seed(&[66; 32]));
    let wrong_device = instruction(&other, 99, &allocator_key());
    let mut tampered = instruction(&a, 99, &allocator_key());
    let n = tampered.len();
    tampered[n - 1] ^= 0x55;
    let kinds = [b"\x01garbage".to_vec(), forged, wrong_device, tampered];
    let instr_topic = topics::instr(&a);
    let flooder = {
        let topic = instr_topic.clone();
        let port = broker.port;
        std::thread::spawn(move || {
            let evil = Peer::connect(port, "x", Some(("attacker", PW_EVIL))).unwrap();
            let started = Instant::now();
            for i in 0..FLOOD {
                evil.publish(
                    &topic,
                    kinds[i % kinds.len()].clone(),
                    QoS::AtMostOnce,
                    false,
                );
            }
            for _ in 0..REPLAYS {
                evil.publish(&topic, genuine.clone(), QoS::AtMostOnce, false);
            }
            // Let the client put everything on the wire before it goes.
            std::thread::sleep(Duration::from_secs(2));
            started.elapsed()
        })
    };

    // Watch the device during the flood and 4 s after.
    let start = Instant::now();
    let mut last_report_at = Instant::now();
    let mut worst_gap = Duration::ZERO;
    let mut seqs = Vec::new();
    let mut acks = Vec::new();
    let mut last: Option<QosReport> = None;
    let mut flood_time = None;
    while flood_time.is_none() || start.elapsed() < flood_time.unwrap() + Duration::from_secs(4) {
        if flood_time.is_none() && flooder.is_finished() {
            flood_time = Some(start.elapsed());
        }
        let Some((topic, payload)) = cloud.recv(Duration::from_millis(100)) else {
            continue;
        };
        if topic.ends_with("/report") {
            let r = agent.open_report(&payload);
            worst_gap = worst_gap.max(last_report_at.elapsed());
            last_report_at = Instant::now();
            seqs.push(r.seq);
            last = Some(r);
        } else if topic.ends_with("/ack") {
            acks.push(agent.open_ack(&payload));
        }
    }
    let flood_time = flooder.join().unwrap();
    let last = last.expect("reports during the flood");
    let c = &last.rejections;
    eprintln!(
        "flood: {FLOOD} garbage + {REPLAYS} replays in {flood_time:?}; worst report gap \
         {worst_gap:?}; {} reports; {} acks; counted: malformed {} unknown_key {} \
         wrong_device {} bad_signature {} rollback {}",
        seqs.len(),
        acks.len(),
        c.malformed,
        c.unknown_key,
        c.wrong_device,
        c.bad_signature,
        c.rollback
    );
    assert_no_gap(&seqs);
    assert!(
        worst_gap < Duration::from_secs(2),
        "reports stalled for {worst_gap:?} (window 100 ms)"
    );
    let garbage_counted = c.malformed + c.unknown_key + c.wrong_device + c.bad_signature;
    assert!(
        garbage_counted >= (FLOOD / 2) as u64,
        "the flood did not reach the agent (only {garbage_counted} counted): the test proves nothing"
    );
    assert!(
        c.rollback >= (REPLAYS / 2) as u64,
        "replays counted: {}",
        c.rollback
    );
    // Garbage gets no ack at all; replays a bounded number.
    assert!(
        acks.iter()
            .all(|k| k.outcome
                == AckOutcome::Rejected(shardline_shared::msg::RejectReason::Rollback)),
        "only replays are acked: {acks:?}"
    );
    let budget = u64::from(ACK_BURST) + u64::from(ACK_PER_S) * (start.elapsed().as_secs() + 1);
    assert!(
        (acks.len() as u64) <= budget,
        "{} refusal acks, budget {budget}",
        acks.len()
    );
    assert_eq!(
        status_counter(&agent, "outbox_dropped"),
        0,
        "nothing dropped"
    );
    assert_eq!(status_counter(&agent, "link_drops"), 0, "the link held");
    assert_eq!(status_counter(&agent, "connects"), 1);
    assert_eq!(agent.applied_seq(), 4, "the profile is untouched");
    agent.sigterm();
}

#[test]
fn a_password_file_others_can_read_is_refused_with_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("mqtt-password");
    std::fs::write(&pw, "secret-secret-secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"gw-a\"\nkey_file = \"{}\"\n\n[allocator]\nkeys = [\"{}\"]\n\n\
             [broker]\nurl = \"mqtt://127.0.0.1:1\"\npassword_file = \"{}\"\n\n\
             [state]\ndir = \"{}\"\n\n[requests]\nsocket = \"{}\"\n",
            tmp.path().join("device.key").display(),
            hex::encode(allocator_key().public_key()),
            pw.display(),
            tmp.path().join("state").display(),
            tmp.path().join("agent.sock").display(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:10: field `broker.password_file`",
            config.display()
        )) && err.contains("mode 644"),
        "{err}"
    );
}

/// Against a broker *without* the shipped cap the agent cannot read a 2 MiB
/// packet without losing the connection, and its persistent session hands
/// the packet over again after every reconnect. What the agent can do is
/// not reconnect at full speed: only a connection that stayed up resets its
/// backoff (it used to reconnect ~25 times a second, forever).
#[test]
fn without_the_broker_cap_an_oversize_packet_only_slows_reconnects_down() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(tmp.path()) else {
        return;
    };
    // reconnect_min_ms = 50, reconnect_max_ms = 400 (daemon_support).
    let mut agent = Agent::new(tmp.path(), "gw-a", &broker.url(), 100, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");
    let a = agent.device.clone();
    let evil = Peer::connect(broker.port, "evil", None).unwrap();
    evil.publish(
        &topics::instr(&a),
        vec![0x05; 2 << 20],
        QoS::AtLeastOnce,
        false,
    );
    assert!(
        wait_for(Duration::from_secs(5), || {
            (status_counter(&agent, "link_drops") >= 1).then_some(())
        })
        .is_some(),
        "the uncapped broker forwards the packet and the agent drops the link"
    );
    let drops_before = status_counter(&agent, "link_drops");
    std::thread::sleep(Duration::from_secs(4));
    let drops = status_counter(&agent, "link_drops") - drops_before;
    eprintln!("uncapped broker: {drops} link drops in 4 s");
    // Backoff 50 ms doubling to 400 ms (× 0.5–1.0 jitter), never reset:
    // at most ~16 attempts in 4 s; a tight loop makes about 100.
    assert!(drops <= 20, "{drops} reconnects in 4 s: a reconnect loop");
    assert!(
        agent.log().contains("must cap packets"),
        "the agent says what is wrong"
    );
    agent.sigterm();
}

/// A leaked credential is rotated: the operator sets a new password on the
/// broker and in the device's password file, and a SIGHUP to the agent logs
/// it in again with the new one; no report is lost on the way and the old
/// password no longer opens a connection.
#[test]
fn a_rotated_password_takes_effect_on_reload_without_losing_a_report() {
    const PW_NEW: &str = "gw-a-rotated-password-42";
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start_shipped(tmp.path(), &users(), "") else {
        return;
    };
    let mut agent = agent_a(tmp.path(), &broker, 100);
    let a = agent.device.clone();
    let cloud = Cloud::connect_as(broker.port, &a, Some(("shardline-allocator", PW_ALLOC)));
    agent.start(&[]);
    let mut seqs = vec![
        agent
            .open_report(&cloud.recv_kind("/report", Duration::from_secs(10)).unwrap())
            .seq,
    ];

    broker.set_password("gw-a", PW_NEW);
    broker.reload();
    let pw = tmp.path().join("mqtt-password");
    std::fs::write(&pw, format!("{PW_NEW}\n")).unwrap();
    agent.sighup();
    assert!(
        wait_for(Duration::from_secs(10), || {
            (status_counter(&agent, "connects") >= 2).then_some(())
        })
        .is_some(),
        "the agent logged in again after the reload"
    );
    for (topic, payload) in cloud.drain(Duration::from_secs(2)) {
        if topic.ends_with("/report") {
            seqs.push(agent.open_report(&payload).seq);
        }
    }
    assert!(seqs.len() > 5, "reports keep coming: {seqs:?}");
    assert_no_gap(&seqs);
    assert_eq!(
        status_counter(&agent, "connects"),
        2,
        "one new login, no loop"
    );
    assert!(
        Peer::connect(broker.port, "x", Some(("gw-a", PW_A))).is_err(),
        "the old password is refused"
    );
    agent.sigterm();
}
