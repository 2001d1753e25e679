//! Fuzz target: untrusted bytes decoded as every wire type. Decoding must
//! never panic, and whatever decodes must re-encode to bytes that decode to
//! the same value (no type may accept what it cannot faithfully carry on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_shared::accept::AcceptanceState;
use shardline_shared::assign::{self, Assignment, AssignmentState, GroupId};
use shardline_shared::msg::{
    DeviceStatus, EnrollRequest, Instruction, InstructionAck, KeyRotation, KeySet, Operation,
    QosReport, RejectionCounters, ShardStatus,
};
use shardline_shared::request::{AppRequest, RequestAnswer};
use shardline_shared::sign::SignedEnvelope;
use shardline_shared::{decode, encode, DeviceId, ShardRef};
use std::fmt::Debug;

fn check<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + Debug,
{
    if let Ok(value) = decode::<T>(data) {
        let again = encode(&value);
        let back: T = decode(&again).expect("a re-encoded value decodes");
        assert_eq!(back, value, "re-encoding changed the value");
    }
}

fuzz_target!(|data: &[u8]| {
    check::<QosReport>(data);
    check::<ShardStatus>(data);
    check::<InstructionAck>(data);
    check::<DeviceStatus>(data);
    check::<Instruction>(data);
    check::<Operation>(data);
    check::<KeyRotation>(data);
    check::<KeySet>(data);
    check::<SignedEnvelope>(data);
    check::<AcceptanceState>(data);
    check::<RejectionCounters>(data);
    check::<DeviceId>(data);
    check::<ShardRef>(data);
    check::<EnrollRequest>(data);
    check::<AppRequest>(data);
    check::<RequestAnswer>(data);
    check::<Assignment>(data);
    check::<AssignmentState>(data);
    check::<shardline_shared::diag::Diagnostics>(data);
    // Opening a sealed diagnostics answer never panics (size cap first).
    let _ = shardline_shared::diag::open(data, &[7; 32]);
    // Opening a sealed enrolment request never panics either.
    let _ = shardline_shared::sign::open_enroll(data);
    // Nor does a device taking the bytes as its assignment (key 1 pinned,
    // as in the seed corpus). Whatever it accepts, it accepts once: the
    // same bytes again are a duplicate and change nothing.
    let key = shardline_shared::sign::KeyPair::from_seed(&[1; 32]);
    let keys = shardline_shared::msg::KeySet::of(1, &[&key]);
    let now = 1_780_000_000_000;
    let state = AssignmentState::bootstrap(GroupId::new("acme.eu-west.vpn").unwrap());
    let d = assign::handle_assignment(&state, data, now, &keys, &[]);
    if d.state != state {
        assert!(matches!(
            d.verdict,
            assign::AssignmentVerdict::Accepted { .. }
        ));
        let again = assign::handle_assignment(&d.state, data, now, &keys, &[]);
        assert!(matches!(
            again.verdict,
            assign::AssignmentVerdict::Duplicate { .. }
        ));
        assert_eq!(again.state, d.state);
    }
});
