use super::*;
use crate::policy::{Agreements, Catalog, PolicyConfig};
use shardline_shared::msg::*;

fn engine() -> Engine {
    use crate::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
    // These tests are about instructions, not per-device configuration
    // (tests_config.rs): the qos shaper gets fleet-wide placeholder
    // addresses so that a latency-sensitive report is answered at once.
    let per_device = "config = \"rate_bps = 20000000\"\ndevice_config = [\"listen\", \"forward\"]";
    assert!(
        EXAMPLE_CATALOG.contains(per_device),
        "shipped qos-shaper config changed"
    );
    let text = EXAMPLE_CATALOG.replace(
        per_device,
        r#"config = "rate_bps = 20000000\nlisten = 127.0.0.1:9\nforward = 127.0.0.1:9""#,
    );
    let catalog = Catalog::from_toml_str(&text, "catalog.toml").unwrap();
    let agreements = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).unwrap();
    Engine::new(catalog, agreements, PolicyConfig::default())
}

/// The core's tunables in these tests (one-minute QoS history windows).
pub(super) fn test_config() -> CoreConfig {
    CoreConfig {
        max_payload: 65536,
        resend_after_ms: 1000,
        checkpoint_ms: 60_000,
        engine_flush_ms: 5_000,
        shared_store: false,
        qos_history_window_ms: 60_000,
    }
}

fn core_with(records: Vec<DeviceRecord>) -> Core {
    Core::new(
        engine(),
        KeyPair::from_seed(&[1; 32]),
        Loaded {
            records,
            ..Loaded::default()
        },
        test_config(),
        Arc::new(Metrics::default()),
        1_000_000,
    )
}

pub(super) fn dev_key() -> KeyPair {
    KeyPair::from_seed(&[2; 32])
}

pub(super) fn report(device: &DeviceId, seq: u64) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: 990_000,
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Sensitive,
            bytes: 1_000_000,
            packets: 1000,
            rate_bps: 800_000,
            rtt_p50_us: None,
            rtt_p95_us: None,
            jitter_us: None,
            loss_permille: 0,
            active_flows: 2,
            need: QosNeed {
                latency_sensitive: true,
                bandwidth_heavy: false,
                needs_encryption: true,
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 50,
            mem_total_kib: 4 << 20,
            mem_available_kib: 3 << 20,
            aes_hw: true,
            arch: "x86_64".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

pub(super) fn enrolled() -> (Core, DeviceId) {
    let d = DeviceId::new("d1").unwrap();
    let mut core = core_with(vec![]);
    let r = core.on_command(
        1_000_000,
        Command::Enroll {
            device: d.clone(),
            public_key: dev_key().public_key(),
            tier: "standard".into(),
            tenant: None,
        },
    );
    assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    core.take_step();
    (core, d)
}

pub(super) fn instr_seq(p: &Publish) -> u64 {
    let env = sign::parse_envelope(&p.payload, 1 << 20).unwrap();
    codec::decode::<Instruction>(&env.payload).unwrap().seq
}

#[test]
fn a_report_on_its_group_routed_topic_is_handled_as_on_the_plain_one() {
    // Issue 19: devices holding an assignment publish on
    // `g/{tenant}/{region}/{capability}/dev/{id}/report`; the instruction still goes to `dev/{id}/instr`.
    let (mut core, d) = enrolled();
    let group = shardline_shared::assign::GroupId::new("acme.eu-west.vpn").unwrap();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    let topic = topics::routed(&group, &d, topics::TopicKind::Report);
    core.on_message(1_000_100, &topic, &bytes);
    let step = core.take_step();
    assert_eq!(step.publish.len(), 1, "one instruction");
    assert_eq!(step.publish[0].topic, topics::instr(&d));
    // Another device's routed topic does not carry this device's report.
    let other = DeviceId::new("someone-else").unwrap();
    let bytes = sign::seal(Domain::Report, &report(&d, 2), &[&dev_key()]);
    core.on_message(
        1_000_200,
        &topics::routed(&group, &other, topics::TopicKind::Report),
        &bytes,
    );
    assert!(core.take_step().publish.is_empty());
}

#[test]
fn an_instruction_leaves_only_with_its_reserved_sequence_in_the_same_batch() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    assert_eq!(step.publish.len(), 1, "one instruction");
    let seq = instr_seq(&step.publish[0]);
    let rec = step
        .batch
        .put_devices
        .iter()
        .find(|r| r.device == d)
        .expect("the record is in the batch that precedes the publish");
    assert!(rec.seq_reserved_until >= seq);
    assert!(rec.next_instruction_seq > seq);
    assert_eq!(rec.pending.len(), 1);
    assert!(!rec.engine_state.is_empty(), "engine state persisted");
    // The persisted engine state restores.
    let restored = core_with(vec![rec.clone()]);
    assert!(restored.engine().device_state(&d).is_some());
    assert!(restored.record(&d).unwrap().next_instruction_seq > rec.seq_reserved_until);
}

#[test]
fn lazy_engine_state_is_written_a_few_records_per_step_and_each_within_the_flush_period() {
    let mut core = core_with(vec![]);
    // One key per device: a key enrolls one device only.
    let key_of = |i: usize| {
        KeyPair::from_seed(&[
            i as u8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 7, 7, 7, 7,
        ])
    };
    let devices: Vec<DeviceId> = (0..200)
        .map(|i| DeviceId::new(format!("d{i}")).unwrap())
        .collect();
    for (i, d) in devices.iter().enumerate() {
        let key = key_of(i);
        core.on_command(
            1_000_000,
            Command::Enroll {
                device: d.clone(),
                public_key: key.public_key(),
                tier: "standard".into(),
                tenant: None,
            },
        );
    }
    // First reports: instructions, written at once with their records.
    for (i, d) in devices.iter().enumerate() {
        let bytes = sign::seal(Domain::Report, &report(d, 1), &[&key_of(i)]);
        core.on_message(1_000_000, &topics::report(d), &bytes);
    }
    core.pace_lazy_writes(1_000_000);
    assert_eq!(core.take_step().batch.put_devices.len(), 200);
    // Second reports change only engine state (forecasts): lazy.
    for (i, d) in devices.iter().enumerate() {
        let bytes = sign::seal(Domain::Report, &report(d, 2), &[&key_of(i)]);
        core.on_message(1_000_010, &topics::report(d), &bytes);
    }
    let mut written = std::collections::BTreeSet::new();
    let mut largest = 0;
    let mut now = 1_000_010;
    while now <= 1_000_010 + 5_000 {
        core.pace_lazy_writes(now);
        let puts = core.take_step().batch.put_devices;
        largest = largest.max(puts.len());
        written.extend(puts.into_iter().map(|r| r.device));
        now += 50;
    }
    assert_eq!(
        written.len(),
        200,
        "every lazy record is written within the period"
    );
    assert!(
        largest <= 10,
        "no step carries more than a few lazy records, largest {largest}"
    );
}

#[test]
fn every_write_carries_the_next_version_and_a_reload_drops_uncommitted_changes() {
    let (mut core, d) = enrolled();
    assert_eq!(
        core.version_of(&d),
        Some(1),
        "the enrolment wrote version 1"
    );
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    let rec = step
        .batch
        .put_devices
        .iter()
        .find(|r| r.device == d)
        .unwrap();
    assert_eq!(rec.version, 2);
    // Another instance committed version 2 first (say, it handled the
    // same report): the copy here is replaced, and the instruction this
    // instance decided is gone from its memory too.
    let mut theirs = rec.clone();
    theirs.pending.clear();
    theirs.next_instruction_seq = 40;
    core.install_records(1_000_200, vec![theirs]);
    let mine = core.record(&d).unwrap();
    assert_eq!((mine.version, mine.next_instruction_seq), (2, 40));
    assert!(mine.pending.is_empty());
    assert!(core.engine().device_state(&d).is_some());
    assert!(
        core.take_step().batch.is_empty(),
        "nothing stale is written"
    );
    // A report floor write moves the version as well.
    let bytes = sign::seal(Domain::Report, &report(&d, 2), &[&dev_key()]);
    core.on_message(1_000_300, &topics::report(&d), &bytes);
    let step = core.take_step();
    let v = step
        .batch
        .put_devices
        .iter()
        .map(|r| r.version)
        .chain(step.batch.report_seqs.iter().map(|w| w.version))
        .max();
    assert_eq!(v, Some(3));
    // Unenrolled elsewhere: forgotten here, its key withdrawn.
    core.forget_devices(std::slice::from_ref(&d));
    assert!(core.record(&d).is_none());
    assert!(core.key_directory().read().unwrap().get(&d).is_none());
}

#[test]
fn only_the_leader_resends_on_status_and_ticks() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    assert_eq!(core.take_step().publish.len(), 1);
    let online = codec::encode(&DeviceStatus {
        device: d.clone(),
        presence: Presence::Online,
        applied_instruction_seq: 0,
        agent_version: "t".into(),
        at_ms: 1_000_200,
    });
    core.set_leader(false);
    core.on_message(1_000_200, &topics::status(&d), &online);
    core.on_tick(1_100_000);
    core.on_connected(1_100_001);
    assert!(
        core.take_step().publish.is_empty(),
        "a follower leaves re-sends to the leader"
    );
    core.set_leader(true);
    core.on_message(1_100_100, &topics::status(&d), &online);
    assert_eq!(core.take_step().publish.len(), 1, "the leader re-sends");
}

#[test]
fn a_rejected_instruction_is_dropped_and_a_reconnect_resends_the_rest() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let first = instr_seq(&core.take_step().publish[0]);
    // An operator drain makes a second instruction while the first is pending.
    core.on_command(
        1_000_200,
        Command::Operator {
            device: d.clone(),
            op: OperatorOp::Drain,
            shard: None,
            actor: "alice".into(),
        },
    );
    let step = core.take_step();
    let second = step.publish.iter().map(instr_seq).max().unwrap_or(first);
    // The device rejects the first: it is dropped, the second stays.
    let ack = InstructionAck {
        device: d.clone(),
        instruction_seq: first,
        outcome: AckOutcome::Rejected(RejectReason::Expired),
        at_ms: 1_000_300,
    };
    core.on_message(
        1_000_300,
        &topics::ack(&d),
        &sign::seal(Domain::Ack, &ack, &[&dev_key()]),
    );
    core.take_step();
    let pending: Vec<u64> = core
        .record(&d)
        .unwrap()
        .pending
        .iter()
        .map(|p| p.seq)
        .collect();
    assert!(!pending.contains(&first));
    if second > first {
        assert!(pending.contains(&second), "{pending:?}");
    }
    // The device reconnects having applied nothing: everything pending is re-sent.
    let status = DeviceStatus {
        device: d.clone(),
        presence: Presence::Online,
        applied_instruction_seq: 0,
        agent_version: "t".into(),
        at_ms: 1_000_400,
    };
    core.on_message(1_000_400, &topics::status(&d), &codec::encode(&status));
    let resent: Vec<u64> = core.take_step().publish.iter().map(instr_seq).collect();
    let mut all = core
        .record(&d)
        .unwrap()
        .pending
        .iter()
        .map(|p| p.seq)
        .collect::<Vec<_>>();
    all.sort_unstable();
    let mut resent_sorted = resent.clone();
    resent_sorted.sort_unstable();
    assert_eq!(resent_sorted, all);
    // A signed report saying it applied them clears them.
    let mut r = report(&d, 2);
    r.applied_instruction_seq = all.iter().copied().max().unwrap_or(0);
    core.on_message(
        1_000_500,
        &topics::report(&d),
        &sign::seal(Domain::Report, &r, &[&dev_key()]),
    );
    assert!(core
        .record(&d)
        .unwrap()
        .pending
        .iter()
        .all(|p| p.seq > r.applied_instruction_seq));
}

#[test]
fn unsigned_or_forged_messages_never_clear_pending_instructions() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let seq = instr_seq(&core.take_step().publish[0]);
    let forged = InstructionAck {
        device: d.clone(),
        instruction_seq: seq,
        outcome: AckOutcome::Applied,
        at_ms: 1_000_200,
    };
    let other = KeyPair::from_seed(&[9; 32]);
    core.on_message(
        1_000_200,
        &topics::ack(&d),
        &sign::seal(Domain::Ack, &forged, &[&other]),
    );
    // A status claiming it applied everything only triggers re-sending.
    let status = DeviceStatus {
        device: d.clone(),
        presence: Presence::Online,
        applied_instruction_seq: seq,
        agent_version: "t".into(),
        at_ms: 1_000_300,
    };
    core.on_message(1_000_300, &topics::status(&d), &codec::encode(&status));
    assert!(core
        .record(&d)
        .unwrap()
        .pending
        .iter()
        .any(|p| p.seq == seq));
    assert_eq!(core.record(&d).unwrap().applied_seq, 0);
    assert_eq!(core.metrics.dropped_count(Kind::Ack, Drop::BadSignature), 1);
}

#[test]
fn expired_pending_instructions_are_dropped_on_tick() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    core.take_step();
    let exp = core.record(&d).unwrap().pending[0].expires_at_ms;
    core.on_tick(exp + 1);
    assert!(core
        .record(&d)
        .unwrap()
        .pending
        .iter()
        .all(|p| p.expires_at_ms > exp + 1));
    assert!(core.metrics.instructions_expired.load(Ordering::Relaxed) >= 1);
}

fn reputation(core: &Core, d: &DeviceId) -> f64 {
    core.engine().device(d).unwrap().reputation
}

/// Issue 14: what a broker neighbour publishes on a device's topics moves
/// neither its reputation nor what the service sends it.
#[test]
fn forged_replayed_and_unsigned_messages_never_move_the_victims_reputation() {
    let (mut core, d) = enrolled();
    let first = sign::seal(Domain::Report, &report(&d, 5), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &first);
    let sent = instr_seq(&core.take_step().publish[0]);
    let before = reputation(&core, &d);
    let attacker = KeyPair::from_seed(&[66; 32]);
    // A well-formed report signed by someone else, five times.
    for seq in 6..11 {
        let forged = sign::seal(Domain::Report, &report(&d, seq), &[&attacker]);
        core.on_message(1_000_200, &topics::report(&d), &forged);
    }
    // The device's own old report, replayed.
    let old = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_300, &topics::report(&d), &old);
    core.on_message(1_000_301, &topics::report(&d), &first);
    // The device's honest refusal of an instruction someone else forged on
    // its topic (a number this service never used).
    let refusal = InstructionAck {
        device: d.clone(),
        instruction_seq: sent + 1000,
        outcome: AckOutcome::Rejected(RejectReason::BadSignature),
        at_ms: 1_000_400,
    };
    core.on_message(
        1_000_400,
        &topics::ack(&d),
        &sign::seal(Domain::Ack, &refusal, &[&dev_key()]),
    );
    // An ack with a forged signature.
    let forged_ack = InstructionAck {
        outcome: AckOutcome::Failed { reason: "x".into() },
        instruction_seq: sent,
        ..refusal.clone()
    };
    core.on_message(
        1_000_500,
        &topics::ack(&d),
        &sign::seal(Domain::Ack, &forged_ack, &[&attacker]),
    );
    assert_eq!(reputation(&core, &d), before);
    assert_eq!(
        core.record(&d).unwrap().pending.len(),
        1,
        "the real instruction is still pending"
    );
    assert!(
        core.take_step().publish.is_empty(),
        "no instruction was planned from forged input"
    );
    let m = &core.metrics;
    assert_eq!(m.dropped_count(Kind::Report, Drop::BadSignature), 5);
    assert_eq!(m.dropped_count(Kind::Report, Drop::Stale), 1);
    assert_eq!(m.dropped_count(Kind::Report, Drop::Duplicate), 1);
    assert_eq!(m.dropped_count(Kind::Ack, Drop::NotOurs), 1);
    assert_eq!(m.dropped_count(Kind::Ack, Drop::BadSignature), 1);
    assert_eq!(m.compliance_events.load(Ordering::Relaxed), 0);
}

/// An unsigned "offline" status (anyone can publish one, retained) does not
/// stop re-sends; re-sends back off per attempt.
#[test]
fn a_forged_offline_status_does_not_stop_resends_and_resends_back_off() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    assert_eq!(core.take_step().publish.len(), 1);
    let offline = codec::encode(&DeviceStatus {
        device: d.clone(),
        presence: Presence::Offline,
        applied_instruction_seq: 0,
        agent_version: "forged".into(),
        at_ms: 1_000_150,
    });
    core.on_message(1_000_150, &topics::status(&d), &offline);
    // resend_after_ms is 1 s: attempt 1 → re-sent 1 s later, then 2 s, 4 s.
    let mut resent_at = Vec::new();
    let mut now = 1_000_100;
    while now < 1_009_000 {
        now += 250;
        core.on_tick(now);
        if !core.take_step().publish.is_empty() {
            resent_at.push(now - 1_000_100);
        }
    }
    assert!(
        resent_at.len() >= 3,
        "re-sent while 'offline': {resent_at:?}"
    );
    let gaps: Vec<u64> = resent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] >= g[0] * 2 - 250),
        "each gap about doubles: {resent_at:?}"
    );
}

/// Issue 15: a device that refuses the rotation object (enrolled after the
/// rotation, it pins the new key) is sent it once, not in a loop.
#[test]
fn a_refused_rotation_is_not_resent_in_a_loop() {
    let (mut core, d) = enrolled();
    let r = core.on_command(
        1_000_050,
        Command::Rotate {
            new_key: KeyPair::from_seed(&[9; 32]),
            key_file: "/k2".into(),
        },
    );
    assert!(matches!(r, Reply::Rotated { epoch: 1, .. }), "{r:?}");
    core.take_step();
    let sent_before = core.metrics.rotations_sent.load(Ordering::Relaxed);
    for i in 0..20u64 {
        let refusal = InstructionAck {
            device: d.clone(),
            instruction_seq: 0,
            outcome: AckOutcome::Rejected(RejectReason::UnknownKey),
            at_ms: 1_000_100 + i,
        };
        core.on_message(
            1_000_100 + i * 100,
            &topics::ack(&d),
            &sign::seal(Domain::Ack, &refusal, &[&dev_key()]),
        );
        core.take_step();
    }
    let sent = core.metrics.rotations_sent.load(Ordering::Relaxed) - sent_before;
    assert!(sent <= 1, "rotation sent {sent} times");
}

/// Presence comes from what the device signed: a forged "offline" status
/// does not make it offline, and silence does.
#[test]
fn presence_follows_signed_reports_not_statuses() {
    let (mut core, d) = enrolled();
    let presence =
        |core: &mut Core, now| match core.on_command(now, Command::Device { device: d.clone() }) {
            Reply::Device(v) => v.presence.clone(),
            other => panic!("{other:?}"),
        };
    assert_eq!(presence(&mut core, 1_000_050), "unknown");
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let offline = codec::encode(&DeviceStatus {
        device: d.clone(),
        presence: Presence::Offline,
        applied_instruction_seq: 0,
        agent_version: "forged".into(),
        at_ms: 1_000_150,
    });
    core.on_message(1_000_150, &topics::status(&d), &offline);
    core.on_tick(1_001_000);
    assert_eq!(presence(&mut core, 1_001_000), "online");
    // Three 10 s windows (and 30 s) without a signed report: offline.
    core.on_tick(1_031_200);
    assert_eq!(presence(&mut core, 1_031_200), "offline");
}

/// Issue 15: unenrol + enrol is not a loophole. The tombstone keeps the
/// (bad) reputation and the sequence numbers; instruction numbering
/// continues above the old one.
#[test]
fn unenrol_then_enrol_restores_reputation_and_keeps_sequences_monotonic() {
    let (mut core, d) = enrolled();
    let first = sign::seal(Domain::Report, &report(&d, 5), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &first);
    let sent = instr_seq(&core.take_step().publish[0]);
    for _ in 0..3 {
        core.compliance(1_000_200, &d, ComplianceKind::BadReportSignature);
    }
    let bad = reputation(&core, &d);
    assert!(bad < 30.0, "{bad}");
    let reserved = core.record(&d).unwrap().seq_reserved_until;
    assert!(matches!(
        core.on_command(1_000_300, Command::Unenroll { device: d.clone() }),
        Reply::Ok
    ));
    let step = core.take_step();
    let tomb = step
        .batch
        .tombstones
        .iter()
        .find(|(id, _)| id == &d)
        .and_then(|(_, t)| t.clone())
        .expect("a tombstone is written with the delete");
    assert_eq!(tomb.last_report_seq, 5);
    assert!(tomb.last_instruction_seq >= sent);
    // A restart in between: the tombstone comes back from the store.
    let mut core = Core::new(
        engine(),
        KeyPair::from_seed(&[1; 32]),
        Loaded {
            tombstones: vec![tomb],
            ..Loaded::default()
        },
        test_config(),
        Arc::new(Metrics::default()),
        1_000_400,
    );
    let r = core.on_command(
        1_000_500,
        Command::Enroll {
            device: d.clone(),
            public_key: dev_key().public_key(),
            tier: "standard".into(),
            tenant: None,
        },
    );
    assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    let again = reputation(&core, &d);
    assert!(again <= bad + 0.1, "laundered: {bad} -> {again}");
    let rec = core.record(&d).unwrap();
    assert!(rec.next_instruction_seq > reserved.max(sent));
    assert_eq!(rec.last_report_seq, 5, "same key: the report floor is kept");
    let step = core.take_step();
    assert!(step
        .batch
        .tombstones
        .iter()
        .any(|(id, t)| id == &d && t.is_none()));
    // A new instruction gets a number above everything used before.
    let next = sign::seal(Domain::Report, &report(&d, 6), &[&dev_key()]);
    core.on_message(1_000_600, &topics::report(&d), &next);
    let step = core.take_step();
    if let Some(p) = step.publish.first() {
        assert!(instr_seq(p) > reserved);
    }
}

/// A good score is capped at the initial one on re-enrolment.
#[test]
fn a_good_reputation_is_capped_at_the_initial_one_on_reenrolment() {
    let cfg = policy::PolicyConfig::default().reputation;
    let mut prior = policy::ReputationState::new(&cfg, 0);
    prior.score = 90.0;
    let r = policy::Tombstone::restored(&prior, &cfg, 1000);
    assert_eq!(r.score, cfg.initial);
    prior.score = 10.0;
    let r = policy::Tombstone::restored(&prior, &cfg, 1000);
    assert!(
        r.score < 11.0 && r.score > 10.0,
        "decayed a little: {}",
        r.score
    );
}

fn app_request(d: &DeviceId, seq: u64, op: shardline_shared::request::RequestOp) -> Vec<u8> {
    use shardline_shared::ids::AppName;
    let req = shardline_shared::request::AppRequest {
        device: d.clone(),
        seq,
        app: AppName::new("cam").unwrap(),
        instance: AppName::new("1").unwrap(),
        at_ms: 1_000_000,
        op,
    };
    shardline_shared::request::seal_request(&req, &dev_key())
}

#[test]
fn an_answer_leaves_signed_in_the_step_that_persists_the_device() {
    use shardline_shared::request::{open_answer, Answer, RequestOp};
    let (mut core, d) = enrolled();
    let acquire = RequestOp::Acquire {
        kind: ShardKind::Compute,
        units: 1,
        duration_ms: 10_000,
        priority: 0,
    };
    core.on_message(
        1_000_100,
        &topics::request(&d),
        &app_request(&d, 1, acquire.clone()),
    );
    let step = core.take_step();
    assert_eq!(step.publish.len(), 1);
    assert_eq!(step.publish[0].topic, topics::answer(&d));
    let key = KeyPair::from_seed(&[1; 32]);
    let a = open_answer(&step.publish[0].payload, |k| {
        (k == key.id()).then_some(key.public_key())
    })
    .expect("signed with the instruction key");
    assert!(matches!(a.answer, Answer::Granted(_)), "{a:?}");
    let rec = step
        .batch
        .put_devices
        .iter()
        .find(|r| r.device == d)
        .expect("the device's record is in the batch before the answer leaves");
    // The persisted state holds the grant and the request floor.
    let st = policy::decode_device_state(&rec.engine_state).unwrap();
    assert_eq!((st.apps.last_seq, st.apps.grants.len()), (1, 1));
    // A replay: dropped and counted, no answer.
    core.on_message(
        1_000_200,
        &topics::request(&d),
        &app_request(&d, 1, acquire),
    );
    assert!(core.take_step().publish.is_empty());
    assert_eq!(
        core.metrics.dropped_count(Kind::Request, Drop::Duplicate),
        1
    );
}

#[test]
fn a_forged_request_is_counted_and_never_charged() {
    use shardline_shared::request::RequestOp;
    let (mut core, d) = enrolled();
    let before = reputation(&core, &d);
    let forged = shardline_shared::request::seal_request(
        &shardline_shared::request::AppRequest {
            device: d.clone(),
            seq: 5,
            app: shardline_shared::ids::AppName::new("cam").unwrap(),
            instance: shardline_shared::ids::AppName::new("1").unwrap(),
            at_ms: 0,
            op: RequestOp::Query,
        },
        &KeyPair::from_seed(&[9; 32]),
    );
    core.on_message(1_000_100, &topics::request(&d), &forged);
    core.on_message(1_000_100, &topics::request(&d), b"garbage");
    let step = core.take_step();
    assert!(step.publish.is_empty());
    assert_eq!(
        core.metrics
            .dropped_count(Kind::Request, Drop::BadSignature),
        1
    );
    assert_eq!(core.metrics.dropped_count(Kind::Request, Drop::Garbage), 1);
    assert_eq!(reputation(&core, &d), before);
    // The forged sequence did not raise the floor: the device's own seq 1 is answered.
    core.on_message(
        1_000_200,
        &topics::request(&d),
        &app_request(&d, 1, RequestOp::Query),
    );
    assert_eq!(core.take_step().publish.len(), 1);
}

/// Issue 17: what the engine decided for a device, each with its
/// explanation, reaches `GET /v1/devices/{id}` through the service and
/// survives a restart from the stored record.
#[test]
fn decisions_reach_the_operator_view_explained_and_survive_a_restart() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    let decisions =
        |core: &mut Core| match core.on_command(1_000_200, Command::Device { device: d.clone() }) {
            Reply::Device(v) => v.policy.clone().expect("engine view").decisions,
            other => panic!("{other:?}"),
        };
    let before = decisions(&mut core);
    let grant = before
        .iter()
        .find(|x| x.kind == crate::policy::feedback::DecisionKind::Grant && x.subject == "qos")
        .unwrap_or_else(|| panic!("qos grant explained: {before:?}"));
    assert!(
        grant.explanation.contains("a reported need asks for it")
            && grant.explanation.contains("tier standard"),
        "{}",
        grant.explanation
    );
    // A fresh service from the committed record (a restart) shows the same.
    let rec = step
        .batch
        .put_devices
        .iter()
        .find(|r| r.device == d)
        .cloned()
        .expect("the device was written");
    let mut again = core_with(vec![rec]);
    assert_eq!(decisions(&mut again), before);
}

/// One key, one device: a key enrolled for one device is refused for
/// another until that device is unenrolled, and a record another instance
/// reloads with a new key frees the old one.
#[test]
fn a_public_key_belongs_to_one_enrolled_device() {
    let (mut core, a) = enrolled();
    let enroll = |core: &mut Core, name: &str, key: [u8; 32]| {
        core.on_command(
            1_000_100,
            Command::Enroll {
                device: DeviceId::new(name).unwrap(),
                public_key: key,
                tier: "standard".into(),
                tenant: None,
            },
        )
    };
    let key = dev_key().public_key();
    match enroll(&mut core, "b", key) {
        Reply::Error(CommandError::KeyInUse(owner)) => assert_eq!(owner, "d1"),
        other => panic!("expected KeyInUse, got {other:?}"),
    }
    // The owner enrolling again with its own key is a tier change, not a clash.
    assert!(matches!(enroll(&mut core, "d1", key), Reply::Enrolled(_)));
    assert!(matches!(
        core.on_command(1_000_200, Command::Unenroll { device: a.clone() }),
        Reply::Ok
    ));
    assert!(matches!(enroll(&mut core, "b", key), Reply::Enrolled(_)));
    match enroll(&mut core, "d1", key) {
        Reply::Error(CommandError::KeyInUse(owner)) => assert_eq!(owner, "b"),
        other => panic!("expected KeyInUse, got {other:?}"),
    }
    // Another instance gave `b` a new key: the old one is free, the new
    // one is taken.
    let new_key = KeyPair::from_seed(&[3; 32]).public_key();
    let mut theirs = core.record(&DeviceId::new("b").unwrap()).unwrap().clone();
    theirs.public_key = new_key;
    theirs.version += 1;
    core.install_records(1_000_300, vec![theirs]);
    assert!(matches!(enroll(&mut core, "c", key), Reply::Enrolled(_)));
    match enroll(&mut core, "e", new_key) {
        Reply::Error(CommandError::KeyInUse(owner)) => assert_eq!(owner, "b"),
        other => panic!("expected KeyInUse, got {other:?}"),
    }
}
