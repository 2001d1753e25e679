//! Hostile instructions sent through a real broker by a plain MQTT client:
//! forged (unknown key), tampered (bad signature), replayed (an older
//! instruction again), expired, and addressed to another device. Each is
//! counted in the next report's RejectionCounters and the running profile
//! stays as it was. Only refusals of genuinely signed instructions (the
//! replay, the expired one) are acked with their reason: what fails at or
//! before the signature check could come from anyone on the broker and
//! costs the device no write and no signature (issue 14).

mod daemon_support;

use daemon_support::{activation, allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::msg::{AckOutcome, Instruction, Operation, RejectReason};
use shardline_shared::sign::{parse_envelope, seal, Domain, KeyPair};
use shardline_shared::{codec, DeviceId};
use std::time::Duration;

#[test]
fn forged_replayed_expired_and_wrong_device_instructions_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(tmp.path()) else {
        return;
    };
    let mut agent = Agent::new(tmp.path(), "reject-1", &broker.url(), 100, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");

    let key = allocator_key();
    let now = now_ms();
    let instr = |seq: u64, device: &DeviceId, expires: u64, shard: &str| Instruction {
        device: device.clone(),
        seq,
        issued_at_ms: now,
        expires_at_ms: expires,
        ops: vec![Operation::Activate(activation(shard, "vpn", now + 120_000))],
    };
    let me = agent.device.clone();
    let first = seal(
        Domain::Instruction,
        &instr(4, &me, now + 60_000, "tunnel@1.0.0"),
        &[&key],
    );
    let second = seal(
        Domain::Instruction,
        &instr(5, &me, now + 60_000, "tunnel@1.0.0"),
        &[&key],
    );
    for bytes in [first.clone(), second] {
        cloud.send_instruction(&me, bytes);
        let ack = agent.open_ack(&cloud.recv_kind("/ack", Duration::from_secs(10)).unwrap());
        assert!(!matches!(ack.outcome, AckOutcome::Rejected(_)), "{ack:?}");
    }
    assert_eq!(agent.applied_seq(), 5);
    let profile_before = agent.state()["profile"].clone();

    let forged = seal(
        Domain::Instruction,
        &instr(6, &me, now + 60_000, "evil@6.6.6"),
        &[&KeyPair::from_seed(&[66; 32])],
    );
    let tampered = {
        // A valid envelope whose payload was changed after signing.
        let mut env = parse_envelope(
            &seal(
                Domain::Instruction,
                &instr(7, &me, now + 60_000, "tunnel@1.0.0"),
                &[&key],
            ),
            1 << 20,
        )
        .unwrap();
        env.payload = codec::encode(&instr(7, &me, now + 60_000, "evil@6.6.6"));
        codec::encode(&env)
    };
    let expired = seal(
        Domain::Instruction,
        &instr(8, &me, now - 1, "evil@6.6.6"),
        &[&key],
    );
    let other = DeviceId::new("someone-else").unwrap();
    let wrong_device = seal(
        Domain::Instruction,
        &instr(9, &other, now + 60_000, "evil@6.6.6"),
        &[&key],
    );
    let cases = [
        (forged, None),
        (tampered, None),
        (first, Some((4, RejectReason::Rollback))),
        (expired, Some((8, RejectReason::Expired))),
        (wrong_device, None),
    ];
    for (bytes, acked) in cases {
        cloud.send_instruction(&me, bytes);
        if let Some((seq, reason)) = acked {
            let ack = agent.open_ack(&cloud.recv_kind("/ack", Duration::from_secs(10)).unwrap());
            assert_eq!(ack.instruction_seq, seq, "{reason:?}");
            assert_eq!(ack.outcome, AckOutcome::Rejected(reason));
        }
    }
    let late = cloud.recv_kind("/ack", Duration::from_secs(1));
    assert!(
        late.is_none(),
        "no ack for unauthenticated bytes: {:?}",
        late.map(|b| agent.open_ack(&b))
    );
    assert_eq!(agent.applied_seq(), 5);
    assert_eq!(
        agent.state()["profile"],
        profile_before,
        "profile untouched"
    );

    let counters = wait_for(Duration::from_secs(5), || {
        let report = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(300))?);
        (report.rejections.total() == 5).then_some(report)
    })
    .expect("a report counting the five rejections");
    let c = counters.rejections;
    assert_eq!(
        (
            c.unknown_key,
            c.bad_signature,
            c.rollback,
            c.expired,
            c.wrong_device
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(counters.applied_instruction_seq, 5);
    agent.sigterm();
}
