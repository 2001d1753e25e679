//! The agent aborts (SIGABRT, as abrupt as SIGKILL: no cleanup runs) at a
//! chosen point between receiving an instruction and acknowledging it,
//! through the `SHARDLINE_TEST_CRASH_AT` hook (`before-persist`,
//! `after-persist`, `before-broker-ack`). After a restart the broker
//! redelivers the instruction (persistent session, manual acks) and it takes
//! effect exactly once.

mod daemon_support;

use daemon_support::{activation, allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::codec;
use shardline_shared::msg::{AckOutcome, DeviceStatus, Instruction, Operation, Presence};
use shardline_shared::sign::{seal, Domain};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

/// Returns the acks seen for the instruction after the restart, or `None`
/// when the test cannot run here.
fn crash_then_restart(point: &str, device: &str) -> Option<Vec<AckOutcome>> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let broker = Broker::start(dir)?;
    let mut agent = Agent::new(dir, device, &broker.url(), 50, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[("SHARDLINE_TEST_CRASH_AT", point)]);
    // A report means the agent's subscription was processed before it.
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("the agent reports");

    let now = now_ms();
    let instr = Instruction {
        device: agent.device.clone(),
        seq: 1,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ops: vec![Operation::Activate(activation(
            "tunnel@1.0.0",
            "vpn",
            now + 60_000,
        ))],
    };
    cloud.send_instruction(
        &agent.device,
        seal(Domain::Instruction, &instr, &[&allocator_key()]),
    );
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(6), "aborted at {point}: {status:?}");
    // The broker announces the abrupt end through the last will.
    let offline = wait_for(Duration::from_secs(10), || {
        let bytes = cloud.recv_kind("/status", Duration::from_millis(200))?;
        let status: DeviceStatus = codec::decode(&bytes).expect("status decodes");
        (status.presence == Presence::Offline).then_some(status)
    });
    assert!(offline.is_some(), "no offline last will after the crash");
    let persisted = if point == "before-persist" { 0 } else { 1 };
    assert_eq!(
        agent.applied_seq(),
        persisted,
        "state on disk after the crash at {point}"
    );

    agent.start(&[]);
    let acks: Vec<AckOutcome> = {
        // Collect every ack for seq 1 for a while after the first one.
        let first = cloud
            .recv_kind("/ack", Duration::from_secs(15))
            .expect("an ack after restart");
        let mut acks = vec![agent.open_ack(&first)];
        for (topic, bytes) in cloud.drain(Duration::from_millis(1500)) {
            if topic.ends_with("/ack") {
                acks.push(agent.open_ack(&bytes));
            }
        }
        assert!(acks.iter().all(|a| a.instruction_seq == 1), "{acks:?}");
        acks.into_iter().map(|a| a.outcome).collect()
    };
    assert_eq!(agent.applied_seq(), 1);
    assert_eq!(agent.profile_shards(), vec!["tunnel@1.0.0".to_string()]);

    // A third start: the broker has the PUBACK now, nothing is redelivered.
    agent.sigterm();
    agent.start(&[]);
    let later = wait_for(Duration::from_secs(3), || {
        cloud.recv_kind("/ack", Duration::from_millis(100))
    });
    assert!(
        later.is_none(),
        "the instruction was delivered again after it was acked"
    );
    assert_eq!(agent.applied_seq(), 1);
    agent.sigterm();
    drop(broker);
    Some(acks)
}

/// An accepted instruction: applied, or applied with a shard that failed to
/// start (no host for it in this test). Either way it took effect once.
fn took_effect(o: &AckOutcome) -> bool {
    matches!(o, AckOutcome::Applied | AckOutcome::Failed { .. })
}

#[test]
fn a_crash_before_persisting_ends_in_exactly_one_application() {
    let Some(acks) = crash_then_restart("before-persist", "crash-a") else {
        return;
    };
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert!(took_effect(&acks[0]), "{acks:?}");
}

#[test]
fn a_crash_after_persisting_is_recognised_as_a_duplicate() {
    let Some(acks) = crash_then_restart("after-persist", "crash-b") else {
        return;
    };
    // Applied before the crash (state on disk, profile restored at boot);
    // the redelivery is recognised and not applied again.
    assert_eq!(acks, vec![AckOutcome::Duplicate]);
}

#[test]
fn a_crash_before_the_broker_ack_resends_the_ack_and_applies_nothing_twice() {
    let Some(acks) = crash_then_restart("before-broker-ack", "crash-c") else {
        return;
    };
    // The signed ack was in the outbox before the crash and is (re)sent; the
    // redelivered instruction is recognised as a duplicate.
    assert!(acks.contains(&AckOutcome::Duplicate), "{acks:?}");
    assert!(acks.iter().any(took_effect), "{acks:?}");
    assert!(
        acks.iter()
            .all(|a| took_effect(a) || *a == AckOutcome::Duplicate),
        "{acks:?}"
    );
}
