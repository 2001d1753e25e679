//! The history the core writes: QoS windows, instructions with their fate,
//! reputation changes and decisions, each in the step (store batch) of the
//! change that made it.

use super::tests::{dev_key, enrolled, instr_seq, report};
use super::*;
use crate::history::HistoryKind;
use shardline_shared::msg::*;

fn history_of(step: &Step, kind: HistoryKind) -> Vec<HistoryEntry> {
    step.batch
        .history
        .iter()
        .filter(|e| e.event.kind() == kind)
        .cloned()
        .collect()
}

#[test]
fn a_report_that_starts_a_new_window_writes_the_last_one_per_class() {
    let (mut core, d) = enrolled();
    let send = |core: &mut Core, seq: u64, at: u64| {
        let bytes = sign::seal(Domain::Report, &report(&d, seq), &[&dev_key()]);
        core.on_message(at, &topics::report(&d), &bytes);
        core.take_step()
    };
    // Two reports in the window [1_020_000, 1_080_000), one in the next.
    assert!(history_of(&send(&mut core, 1, 1_020_000), HistoryKind::Qos).is_empty());
    assert!(history_of(&send(&mut core, 2, 1_050_000), HistoryKind::Qos).is_empty());
    let step = send(&mut core, 3, 1_080_000);
    let qos = history_of(&step, HistoryKind::Qos);
    assert_eq!(qos.len(), 1, "{qos:?}");
    let HistoryEvent::Qos(w) = &qos[0].event else {
        unreachable!()
    };
    assert_eq!(qos[0].at_ms, 1_020_000);
    assert_eq!(
        (w.class, w.bytes, w.packets, w.reports),
        (TrafficClass::Sensitive, 2_000_000, 2000, 2)
    );
    // A replayed report adds nothing to the window.
    let replay = sign::seal(Domain::Report, &report(&d, 3), &[&dev_key()]);
    core.on_message(1_090_000, &topics::report(&d), &replay);
    core.take_step();
    let step = send(&mut core, 4, 1_140_000);
    let HistoryEvent::Qos(w) = &history_of(&step, HistoryKind::Qos)[0].event else {
        unreachable!()
    };
    assert_eq!(w.reports, 1, "the replay was not counted");
}

#[test]
fn an_instruction_is_written_when_sent_and_again_when_settled() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    let seq = instr_seq(&step.publish[0]);
    let sent = history_of(&step, HistoryKind::Instruction);
    assert_eq!(sent.len(), 1);
    let HistoryEvent::Instruction {
        seq: s,
        ops,
        status,
        ..
    } = &sent[0].event
    else {
        unreachable!()
    };
    assert_eq!((*s, *status), (seq, InstructionStatus::Sent));
    assert!(
        ops.iter()
            .any(|o| o.starts_with("activate ") && o.contains(" min)")),
        "{ops:?}"
    );
    // The device refuses it: the refusal and its reason are written.
    let ack = InstructionAck {
        device: d.clone(),
        instruction_seq: seq,
        outcome: AckOutcome::Failed {
            reason: "library digest mismatch".into(),
        },
        at_ms: 1_000_300,
    };
    core.on_message(
        1_000_300,
        &topics::ack(&d),
        &sign::seal(Domain::Ack, &ack, &[&dev_key()]),
    );
    let step = core.take_step();
    let settled = history_of(&step, HistoryKind::Instruction);
    assert!(
        settled.iter().any(|e| matches!(&e.event,
            HistoryEvent::Instruction { seq: s, status: InstructionStatus::Failed, reason: Some(r), .. }
                if *s == seq && r.contains("digest"))),
        "{settled:?}"
    );
}

#[test]
fn an_applied_instruction_and_the_decisions_behind_it_are_written() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    let seq = instr_seq(&step.publish[0]);
    let decisions = history_of(&step, HistoryKind::Decision);
    assert!(
        decisions.iter().any(|e| matches!(&e.event,
            HistoryEvent::Decision { decision, capability, reason }
                if decision == "grant" && capability == "qos" && reason.contains("a reported need asks for it"))),
        "{decisions:?}"
    );
    // Every decision the operator view shows was written, once.
    let view = match core.on_command(1_000_150, Command::Device { device: d.clone() }) {
        Reply::Device(v) => v.policy.clone().expect("engine view").decisions,
        other => panic!("{other:?}"),
    };
    assert_eq!(view.len(), decisions.len(), "{view:?} vs {decisions:?}");
    core.take_step();
    let mut r = report(&d, 2);
    r.applied_instruction_seq = seq;
    core.on_message(
        1_000_200,
        &topics::report(&d),
        &sign::seal(Domain::Report, &r, &[&dev_key()]),
    );
    let step = core.take_step();
    assert!(history_of(&step, HistoryKind::Instruction).iter().any(|e| matches!(
        &e.event,
        HistoryEvent::Instruction { seq: s, status: InstructionStatus::Applied, .. } if *s == seq
    )));
    assert!(
        history_of(&step, HistoryKind::Decision).is_empty(),
        "an unchanged plan decides nothing new"
    );
}

#[test]
fn an_expired_instruction_and_an_announced_reputation_change_are_written() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let seq = instr_seq(&core.take_step().publish[0]);
    // Compliance faults until the engine announces a reputation change.
    let mut reputation = Vec::new();
    for i in 0..20 {
        core.compliance(1_000_200 + i, &d, ComplianceKind::BadReportSignature);
        reputation.extend(history_of(&core.take_step(), HistoryKind::Reputation));
    }
    let first = reputation.first().expect("a reputation change was written");
    let HistoryEvent::Reputation { from, to, reason } = &first.event else {
        unreachable!()
    };
    assert!(to < from && !reason.is_empty(), "{first:?}");
    // Long after its expiry, a tick drops the instruction and says so.
    let expired = (0..5)
        .flat_map(|i| {
            core.on_tick(10_000_000 + i * 60_000);
            history_of(&core.take_step(), HistoryKind::Instruction)
        })
        .collect::<Vec<_>>();
    assert!(
        expired.iter().any(|e| matches!(&e.event,
            HistoryEvent::Instruction { seq: s, status: InstructionStatus::Expired, .. } if *s == seq)),
        "{expired:?}"
    );
}

#[test]
fn the_operator_who_pinned_or_drained_is_named_in_the_explanations() {
    let (mut core, d) = enrolled();
    let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    core.take_step();
    let op = |core: &mut Core, at, op, shard: Option<&str>, actor: &str| {
        let r = core.on_command(
            at,
            Command::Operator {
                device: d.clone(),
                op,
                shard: shard.map(str::to_owned),
                actor: actor.into(),
            },
        );
        assert!(matches!(r, Reply::Ok), "{r:?}");
        history_of(&core.take_step(), HistoryKind::Decision)
    };
    let reasons = |entries: &[HistoryEntry]| -> Vec<String> {
        entries
            .iter()
            .map(|e| match &e.event {
                HistoryEvent::Decision { reason, .. } => reason.clone(),
                _ => unreachable!(),
            })
            .collect()
    };
    let drained = reasons(&op(&mut core, 1_000_200, OperatorOp::Drain, None, "alice"));
    assert!(
        drained.iter().any(|r| r.starts_with("drained by alice")),
        "{drained:?}"
    );
    assert!(
        drained
            .iter()
            .any(|r| r.contains("released: the device was drained by alice")),
        "{drained:?}"
    );
    op(&mut core, 1_000_300, OperatorOp::Resume, None, "bob");
    let pinned = reasons(&op(
        &mut core,
        1_000_400,
        OperatorOp::Pin,
        Some("vpn-tunnel"),
        "carol",
    ));
    assert!(
        pinned
            .iter()
            .any(|r| r.starts_with("vpn-tunnel pinned by carol")),
        "{pinned:?}"
    );
    // The name is kept with the device: a restart still explains it so.
    let state = core.engine().device_state(&d).expect("state").clone();
    assert_eq!(
        state
            .feedback
            .operator_marks
            .get("pin:vpn-tunnel")
            .map(String::as_str),
        Some("carol")
    );
    let bytes = postcard::to_stdvec(&state).unwrap();
    assert_eq!(crate::policy::decode_device_state(&bytes).unwrap(), state);
    // A state written before the marks existed (one byte shorter: the
    // empty map) still decodes, with no marks.
    let mut old = state.clone();
    old.feedback.operator_marks.clear();
    let bytes = postcard::to_stdvec(&old).unwrap();
    let decoded = crate::policy::decode_device_state(&bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(decoded, old);
}
