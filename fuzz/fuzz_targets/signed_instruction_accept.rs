//! Fuzz target: the fuzzer chooses the *signed payload* and the clock; the
//! target signs it with the pinned key, so every input gets past signature
//! verification and exercises payload decoding and the acceptance rules.
//! Input layout: 8 bytes little-endian clock offset, then the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_shared::accept::{
    handle_incoming, AcceptancePolicy, AcceptanceState, Verdict, LIMIT_RANGES,
};
use shardline_shared::codec;
use shardline_shared::msg::{KeySet, Operation, RejectReason};
use shardline_shared::sign::{Domain, KeyPair, SignedEnvelope};
use shardline_shared::DeviceId;

const NOW: u64 = 1_780_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((clock, payload)) = data.split_first_chunk::<8>() else {
        return;
    };
    // Clock within about ±1.2 days of NOW, so time rules are reachable both ways.
    let offset = i64::from_le_bytes(*clock) % (1 << 27);
    let now = NOW.wrapping_add_signed(offset);
    let pinned = KeyPair::from_seed(&[1; 32]);
    let state = AcceptanceState {
        keys: KeySet::of(1, &[&pinned]),
        last_applied_seq: 10,
        last_applied_digest: Some([7; 32]),
        time_floor_ms: NOW - 60_000,
    };
    let me = DeviceId::new("router-1").expect("valid id");
    let policy = AcceptancePolicy::default();
    let envelope = SignedEnvelope {
        domain: Domain::Instruction,
        payload: payload.to_vec(),
        signatures: vec![pinned.sign_entry(Domain::Instruction, payload)],
    };
    let bytes = codec::encode(&envelope);
    let decision = handle_incoming(&state, &me, &bytes, now, &policy);
    match decision.verdict {
        Verdict::Apply(instr) => {
            assert_eq!(
                codec::encode(&instr),
                payload,
                "applied a non-canonical payload"
            );
            assert_eq!(instr.device, me);
            assert!(instr.seq > 10 && instr.expires_at_ms > now);
            assert!(instr.issued_at_ms <= now + policy.max_clock_skew_ms);
            assert!(now + policy.max_clock_skew_ms >= state.time_floor_ms);
            // The floor follows the signed issue time, never the clock.
            assert_eq!(
                decision.state.time_floor_ms,
                state.time_floor_ms.max(instr.issued_at_ms)
            );
            for op in &instr.ops {
                if let Operation::Activate(a) = op {
                    assert!(LIMIT_RANGES.admits(&a.limits), "applied {:?}", a.limits);
                }
            }
        }
        Verdict::Reject { reason, .. } => {
            assert_ne!(reason, RejectReason::BadSignature, "own signature refused");
            assert_ne!(reason, RejectReason::UnknownKey, "pinned key unknown");
            assert_eq!(decision.state, state);
        }
        other => panic!("unexpected verdict {other:?}"),
    }
});
