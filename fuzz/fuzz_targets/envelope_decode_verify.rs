//! Fuzz target: untrusted bytes from the `instr` topic → envelope parsing →
//! signature verification → instruction / rotation acceptance, against a
//! fixed device state.
//!
//! Besides "never panics" it checks what holds for any input: a refusal
//! leaves the state untouched; whatever is applied carries a valid signature
//! by the pinned key and obeys every acceptance rule; a rotation moves
//! exactly one epoch. The seed corpus (`cargo run --example seed_corpus`)
//! holds validly signed messages so mutations start from the deep paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_shared::accept::{handle_incoming, AcceptancePolicy, AcceptanceState, Verdict};
use shardline_shared::msg::KeySet;
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::DeviceId;

/// 2026-05-28, the device clock during the run (the seeds use it too).
const NOW: u64 = 1_780_000_000_000;

fuzz_target!(|data: &[u8]| {
    // Rebuilt per input (cheap next to a signature check) so there is no
    // global state for the fuzzer to depend on.
    let pinned = KeyPair::from_seed(&[1; 32]);
    let state = AcceptanceState {
        keys: KeySet::of(1, &[&pinned]),
        last_applied_seq: 10,
        last_applied_digest: Some([7; 32]),
        time_floor_ms: NOW - 60_000,
    };
    let me = DeviceId::new("router-1").expect("valid id");
    let policy = AcceptancePolicy::default();

    let decision = handle_incoming(&state, &me, data, NOW, &policy);
    match decision.verdict {
        Verdict::Reject { .. } | Verdict::RotationRefused(_) | Verdict::Ignore { .. } => {
            assert_eq!(decision.state, state, "a refusal changed the state");
        }
        Verdict::Apply(instr) => {
            let env =
                sign::parse_envelope(data, policy.max_envelope_bytes).expect("applied bytes parse");
            assert!(!env.signatures.is_empty());
            for entry in &env.signatures {
                sign::verify_entry(
                    Domain::Instruction,
                    &env.payload,
                    entry,
                    &pinned.public_key(),
                )
                .expect("applied instruction verifies under the pinned key");
            }
            assert_eq!(instr.device, me);
            assert!(instr.seq > state.last_applied_seq);
            assert!(instr.expires_at_ms > NOW);
            assert!(instr.issued_at_ms <= NOW + policy.max_clock_skew_ms);
            assert_eq!(decision.state.last_applied_seq, instr.seq);
            assert_eq!(decision.state.keys, state.keys);
        }
        Verdict::Rotated { epoch } => {
            assert_eq!(epoch, 2);
            assert_eq!(decision.state.keys.epoch, 2);
            assert_eq!(decision.state.last_applied_seq, 0);
        }
    }
});
