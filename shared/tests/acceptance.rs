//! The instruction-acceptance rules of DESIGN.md ("Wire protocol"), one named
//! test per way an instruction or a key rotation can be refused.
//!
//! Every refusal test checks two things: the exact verdict, and that the state
//! to persist is the input state unchanged (a refused message must leave no
//! trace but a counter). Inputs are real signed envelopes made with fixed
//! Ed25519 seeds, tampered with at the byte level where the case needs it.

use shardline_shared::accept::{
    handle_incoming, handle_instruction, AcceptancePolicy, AcceptanceState, Decision,
    RotationError, Verdict,
};
use shardline_shared::codec::{self, MAX_PAYLOAD};
use shardline_shared::msg::{
    Activation, ClassStats, DeviceResources, Instruction, KeyRotation, KeySet, Operation, QosNeed,
    QosReport, RejectReason, RejectionCounters, ResourceLimits, ShardKind, TrafficClass,
};
use shardline_shared::sign::{self, Domain, KeyPair, OpenError, SignedEnvelope};
use shardline_shared::{DeviceId, ShardRef};

/// 2026-05-28T20:26:40Z: a plausible "now" for a router with NTP.
const T0: u64 = 1_780_000_000_000;
const MINUTE: u64 = 60_000;

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn me() -> DeviceId {
    DeviceId::new("router-1").unwrap()
}

fn policy() -> AcceptancePolicy {
    AcceptancePolicy::default()
}

/// A fresh device at epoch 1 trusting key 1, its floor set to ten minutes ago.
fn fresh() -> AcceptanceState {
    let mut s = AcceptanceState::new(KeySet::of(1, &[&key(1)]));
    s.advance_floor(T0 - 10 * MINUTE);
    s
}

fn activation(config: Vec<u8>) -> Activation {
    Activation {
        shard: ShardRef::new("tunnel-udp", "1.0.0").unwrap(),
        capability: "vpn".into(),
        kind: ShardKind::Data,
        sha256: [0x5a; 32],
        config,
        limits: ResourceLimits {
            cpu_quota_permille: 250,
            cpu_weight: 100,
            memory_max_bytes: 64 << 20,
            nice: 5,
        },
        priority: 3,
        lease_expires_at_ms: T0 + 10 * MINUTE,
    }
}

/// A valid instruction for this device, issued at T0, valid for five minutes.
fn instr(seq: u64) -> Instruction {
    Instruction {
        device: me(),
        seq,
        issued_at_ms: T0,
        expires_at_ms: T0 + 5 * MINUTE,
        ops: vec![
            Operation::Activate(activation(b"psk=abc".to_vec())),
            Operation::Deactivate {
                shard: ShardRef::new("crypto-aes", "0.9.0").unwrap(),
            },
        ],
    }
}

fn sealed(i: &Instruction, signers: &[&KeyPair]) -> Vec<u8> {
    sign::seal(Domain::Instruction, i, signers)
}

fn envelope(bytes: &[u8]) -> SignedEnvelope {
    sign::parse_envelope(bytes, MAX_PAYLOAD).unwrap()
}

fn run(state: &AcceptanceState, bytes: &[u8], now: u64) -> Decision {
    handle_incoming(state, &me(), bytes, now, &policy())
}

/// Asserts an instruction refusal with the exact reason and sequence, and that
/// the state to persist is the input state.
#[track_caller]
fn assert_rejected(
    state: &AcceptanceState,
    bytes: &[u8],
    now: u64,
    seq: Option<u64>,
    reason: RejectReason,
) {
    let d = run(state, bytes, now);
    assert_eq!(d.verdict, Verdict::Reject { seq, reason });
    assert_eq!(&d.state, state, "a refusal must not change the state");
}

/// Asserts a rotation refusal with the exact error and an unchanged state.
#[track_caller]
fn assert_rotation_refused(state: &AcceptanceState, bytes: &[u8], now: u64, err: RotationError) {
    let d = run(state, bytes, now);
    assert_eq!(d.verdict, Verdict::RotationRefused(err));
    assert_eq!(&d.state, state, "a refusal must not change the state");
}

/// Applies `bytes`, asserting it is applied, and returns the next state.
#[track_caller]
fn apply(state: &AcceptanceState, bytes: &[u8], now: u64) -> AcceptanceState {
    let d = run(state, bytes, now);
    assert!(matches!(d.verdict, Verdict::Apply(_)), "{:?}", d.verdict);
    d.state
}

fn rotation(epoch: u64, keys: &[&KeyPair], signers: &[&KeyPair]) -> Vec<u8> {
    let r = KeyRotation {
        new_set: KeySet::of(epoch, keys),
        issued_at_ms: T0,
    };
    sign::seal(Domain::Rotation, &r, signers)
}

#[track_caller]
fn rotate(state: &AcceptanceState, bytes: &[u8], now: u64, epoch: u64) -> AcceptanceState {
    let d = run(state, bytes, now);
    assert_eq!(d.verdict, Verdict::Rotated { epoch });
    assert_eq!(d.state.keys.epoch, epoch);
    d.state
}

// ---------------------------------------------------------------- the good path

#[test]
fn valid_instruction_applies_and_records_seq_digest_and_floor() {
    let s = fresh();
    let i = instr(7);
    let d = run(&s, &sealed(&i, &[&key(1)]), T0 + 1_000);
    assert_eq!(d.verdict, Verdict::Apply(i.clone()));
    assert_eq!(d.state.last_applied_seq, 7);
    assert!(d.state.last_applied_digest.is_some());
    // The floor moves to the signed issue time, not to the device clock.
    assert_eq!(d.state.time_floor_ms, i.issued_at_ms);
    assert_eq!(d.state.keys, s.keys);
}

#[test]
fn increasing_sequences_apply_in_turn_even_with_gaps() {
    let mut s = fresh();
    for seq in [1, 2, 5, 100, u64::MAX] {
        s = apply(&s, &sealed(&instr(seq), &[&key(1)]), T0);
        assert_eq!(s.last_applied_seq, seq);
    }
}

#[test]
fn instruction_issued_within_the_allowed_skew_applies() {
    let mut i = instr(1);
    i.issued_at_ms = T0 + policy().max_clock_skew_ms;
    apply(&fresh(), &sealed(&i, &[&key(1)]), T0);
}

// ------------------------------------------------------------ signature cases

#[test]
fn bad_signature_tampered_payload_is_rejected() {
    let s = fresh();
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    // A different, well-formed instruction under the old signature.
    let mut forged = instr(3);
    forged.ops.pop();
    env.payload = codec::encode(&forged);
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );

    // One flipped bit in the payload is enough.
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    let last = env.payload.len() - 1;
    env.payload[last] ^= 0x01;
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
}

#[test]
fn bad_signature_tampered_signature_bytes_is_rejected() {
    let s = fresh();
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    env.signatures[0].signature[10] ^= 0x80;
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );

    // A signature of the wrong length is refused before verification.
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    env.signatures[0].signature.truncate(63);
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
}

#[test]
fn missing_signature_is_rejected() {
    let s = fresh();
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    env.signatures.clear();
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
}

#[test]
fn unknown_key_is_rejected() {
    let s = fresh();
    assert_rejected(
        &s,
        &sealed(&instr(3), &[&key(9)]),
        T0,
        None,
        RejectReason::UnknownKey,
    );
}

#[test]
fn a_valid_signature_next_to_an_unknown_one_is_rejected() {
    // Every signature must be by a pinned key; an extra stranger is not ignored.
    assert_rejected(
        &fresh(),
        &sealed(&instr(3), &[&key(1), &key(9)]),
        T0,
        None,
        RejectReason::UnknownKey,
    );
}

#[test]
fn a_key_id_pointing_at_a_pinned_key_with_a_strangers_signature_is_rejected() {
    let mut env = envelope(&sealed(&instr(3), &[&key(9)]));
    env.signatures[0].key_id = key(1).id();
    assert_rejected(
        &fresh(),
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
}

// ------------------------------------------------------------ addressing

#[test]
fn instruction_for_another_device_is_rejected() {
    let mut i = instr(3);
    i.device = DeviceId::new("router-2").unwrap();
    assert_rejected(
        &fresh(),
        &sealed(&i, &[&key(1)]),
        T0,
        Some(3),
        RejectReason::WrongDevice,
    );
}

// ------------------------------------------------------------ sequence rules

#[test]
fn rollback_to_a_lower_sequence_is_rejected() {
    let s = apply(&fresh(), &sealed(&instr(10), &[&key(1)]), T0);
    assert_rejected(
        &s,
        &sealed(&instr(9), &[&key(1)]),
        T0,
        Some(9),
        RejectReason::Rollback,
    );
}

#[test]
fn sequence_zero_is_never_applied() {
    assert_rejected(
        &fresh(),
        &sealed(&instr(0), &[&key(1)]),
        T0,
        Some(0),
        RejectReason::Rollback,
    );
}

#[test]
fn equivocation_same_sequence_different_content_is_rejected() {
    let s = apply(&fresh(), &sealed(&instr(10), &[&key(1)]), T0);
    let mut other = instr(10);
    other.ops.pop();
    assert_rejected(
        &s,
        &sealed(&other, &[&key(1)]),
        T0,
        Some(10),
        RejectReason::Equivocation,
    );
}

#[test]
fn redelivery_of_the_applied_instruction_is_quietly_ignored() {
    let bytes = sealed(&instr(10), &[&key(1)]);
    let s = apply(&fresh(), &bytes, T0);
    let d = run(&s, &bytes, T0 + 1);
    assert_eq!(d.verdict, Verdict::Ignore { seq: 10 });
    assert_eq!(d.state, s);
}

#[test]
fn same_bytes_delivered_three_times_apply_exactly_once() {
    let bytes = sealed(&instr(4), &[&key(1)]);
    let mut s = fresh();
    let (mut applied, mut ignored) = (0, 0);
    for n in 0..3 {
        let d = run(&s, &bytes, T0 + n);
        match d.verdict {
            Verdict::Apply(_) => applied += 1,
            Verdict::Ignore { seq: 4 } => ignored += 1,
            other => panic!("unexpected verdict {other:?}"),
        }
        s = d.state;
    }
    assert_eq!((applied, ignored), (1, 2));
}

#[test]
fn redelivery_after_expiry_is_still_ignored_not_reapplied() {
    let bytes = sealed(&instr(4), &[&key(1)]);
    let s = apply(&fresh(), &bytes, T0);
    let d = run(&s, &bytes, T0 + 6 * MINUTE);
    assert_eq!(d.verdict, Verdict::Ignore { seq: 4 });
    assert_eq!(d.state, s);
}

// ------------------------------------------------------------ time rules

#[test]
fn expired_instruction_is_rejected() {
    let s = fresh();
    let bytes = sealed(&instr(3), &[&key(1)]);
    // expires_at itself is already too late.
    assert_rejected(&s, &bytes, T0 + 5 * MINUTE, Some(3), RejectReason::Expired);
    assert_rejected(&s, &bytes, T0 + 6 * MINUTE, Some(3), RejectReason::Expired);
    apply(&s, &bytes, T0 + 5 * MINUTE - 1);
}

#[test]
fn instruction_issued_further_ahead_than_the_skew_is_rejected() {
    let mut i = instr(3);
    i.issued_at_ms = T0 + policy().max_clock_skew_ms + 1;
    i.expires_at_ms = T0 + 10 * MINUTE;
    assert_rejected(
        &fresh(),
        &sealed(&i, &[&key(1)]),
        T0,
        Some(3),
        RejectReason::FromFuture,
    );
}

#[test]
fn clock_behind_the_persisted_floor_is_rejected() {
    // The floor reached 2026; the router reboots without RTC at 1970.
    let mut s = fresh();
    s.advance_floor(T0);
    // An instruction that was valid in 2020 and expired long ago: at now = 0
    // it would look neither expired nor from the future.
    let mut old = instr(3);
    old.issued_at_ms = 1_577_836_800_000; // 2020-01-01
    old.expires_at_ms = 1_609_459_200_000; // 2021-01-01
    let bytes = sealed(&old, &[&key(1)]);
    assert_rejected(&s, &bytes, 0, Some(3), RejectReason::ClockBehindFloor);
    // Just beyond the skew allowance is still refused; within it, the
    // instruction is judged on its own times (and is expired).
    let skew = policy().max_clock_skew_ms;
    assert_rejected(
        &s,
        &bytes,
        T0 - skew - 1,
        Some(3),
        RejectReason::ClockBehindFloor,
    );
    assert_rejected(&s, &bytes, T0 - skew, Some(3), RejectReason::Expired);
}

#[test]
fn applying_raises_the_floor_to_the_issue_time() {
    let mut i = instr(1);
    i.issued_at_ms = T0 + 20_000; // within skew, ahead of the device clock
    let s = apply(&fresh(), &sealed(&i, &[&key(1)]), T0);
    assert_eq!(s.time_floor_ms, T0 + 20_000);
}

// ------------------------------------------------- the time floor on simulated time

#[test]
fn a_one_off_clock_jump_ahead_does_not_lock_the_device_out() {
    // The router's clock jumps a day ahead (a bad RTC read, a wrong manual
    // `date`) while it keeps taking instructions the allocator issues at
    // real time T0 with a two-day validity.
    let day = 24 * 60 * MINUTE;
    let mut long = instr(1);
    long.expires_at_ms = T0 + 2 * day;
    let jumped = T0 + day;
    let s = apply(&fresh(), &sealed(&long, &[&key(1)]), jumped);
    // The floor took the signed issue time, not the jumped clock.
    assert_eq!(s.time_floor_ms, T0);
    // The clock is put right: the next instruction applies at once. (Had the
    // floor followed the clock, it would be a day ahead and every
    // instruction would be "clock behind floor" for a day.)
    let mut next = instr(2);
    next.issued_at_ms = T0 + 2_000;
    let s = apply(&s, &sealed(&next, &[&key(1)]), T0 + 2_000);
    assert_eq!(s.time_floor_ms, T0 + 2_000);
}

#[test]
fn a_clock_jump_ahead_sees_short_instructions_expired_and_recovers_when_corrected() {
    // While the clock is a year ahead, five-minute instructions look
    // expired: refused without a trace, so nothing is lost once it is fixed.
    let year = 365 * 24 * 60 * MINUTE;
    let s = fresh();
    let bytes = sealed(&instr(1), &[&key(1)]);
    assert_rejected(&s, &bytes, T0 + year, Some(1), RejectReason::Expired);
    let s = apply(&s, &bytes, T0 + 1_000);
    assert_eq!(s.time_floor_ms, T0);
}

#[test]
fn the_floor_still_refuses_a_clock_reset_to_1970_after_instructions() {
    // The floor that only signed issue times raised is still a floor: the
    // router applies an instruction, reboots without RTC at 1970, and a
    // captured old instruction (expired in 2021) is refused.
    let s = apply(&fresh(), &sealed(&instr(1), &[&key(1)]), T0 + 1_000);
    assert_eq!(s.time_floor_ms, T0);
    let mut old = instr(2);
    old.issued_at_ms = 1_577_836_800_000; // 2020-01-01
    old.expires_at_ms = 1_609_459_200_000; // 2021-01-01
    assert_rejected(
        &s,
        &sealed(&old, &[&key(1)]),
        0,
        Some(2),
        RejectReason::ClockBehindFloor,
    );
}

#[test]
fn a_rotation_raises_the_floor_to_its_issue_time_not_the_clock() {
    let s = rotate(
        &fresh(),
        &rotation(2, &[&key(2)], &[&key(1), &key(2)]),
        T0 + 20 * MINUTE,
        2,
    );
    assert_eq!(s.time_floor_ms, T0);
}

#[test]
fn advance_floor_only_raises() {
    let mut s = fresh();
    s.advance_floor(T0);
    s.advance_floor(T0 - MINUTE);
    assert_eq!(s.time_floor_ms, T0);
}

// --------------------------------------------------------- resource limit ranges

/// `instr(seq)` with its activation's limits changed by `f`.
fn instr_with_limits(seq: u64, f: impl Fn(&mut ResourceLimits)) -> Instruction {
    let mut i = instr(seq);
    for op in &mut i.ops {
        if let Operation::Activate(a) = op {
            f(&mut a.limits);
        }
    }
    i
}

#[test]
fn limits_out_of_range_are_rejected_with_their_own_reason() {
    type Change = fn(&mut ResourceLimits);
    let out_of_range: [(&str, Change); 8] = [
        ("cpu_weight 0", |l| l.cpu_weight = 0),
        ("cpu_weight 10001", |l| l.cpu_weight = 10_001),
        ("nice -21", |l| l.nice = -21),
        ("nice 20", |l| l.nice = 20),
        ("nice i8::MAX", |l| l.nice = i8::MAX),
        ("memory 1 byte", |l| l.memory_max_bytes = 1),
        ("memory over 1 TiB", |l| l.memory_max_bytes = (1 << 40) + 1),
        ("cpu quota 256001 permille", |l| {
            l.cpu_quota_permille = 256_001
        }),
    ];
    let s = fresh();
    for (what, change) in out_of_range {
        let i = instr_with_limits(4, change);
        let d = run(&s, &sealed(&i, &[&key(1)]), T0);
        assert_eq!(
            d.verdict,
            Verdict::Reject {
                seq: Some(4),
                reason: RejectReason::LimitsOutOfRange
            },
            "{what}"
        );
        assert_eq!(d.state, s, "{what}: a refusal must not change the state");
    }
    // The refusal left no trace: the same sequence with good limits applies.
    apply(&s, &sealed(&instr(4), &[&key(1)]), T0);
}

#[test]
fn limits_at_the_edges_of_their_ranges_apply() {
    type Change = fn(&mut ResourceLimits);
    let edges: [(&str, Change); 8] = [
        ("no cpu quota", |l| l.cpu_quota_permille = 0),
        ("cpu quota 256 cores", |l| l.cpu_quota_permille = 256_000),
        ("cpu_weight 1", |l| l.cpu_weight = 1),
        ("cpu_weight 10000", |l| l.cpu_weight = 10_000),
        ("nice -20 and no memory cap", |l| {
            l.nice = -20;
            l.memory_max_bytes = 0;
        }),
        ("nice 19", |l| l.nice = 19),
        ("memory 1 MiB", |l| l.memory_max_bytes = 1 << 20),
        ("memory 1 TiB", |l| l.memory_max_bytes = 1 << 40),
    ];
    for (what, change) in edges {
        let i = instr_with_limits(4, change);
        let d = run(&fresh(), &sealed(&i, &[&key(1)]), T0);
        assert_eq!(d.verdict, Verdict::Apply(i), "{what}");
    }
}

#[test]
fn limits_are_checked_in_every_activation_of_an_instruction() {
    // One good activation does not carry a bad one.
    let mut i = instr(4);
    let mut bad = activation(Vec::new());
    bad.shard = ShardRef::new("crypto-chacha", "1.0.0").unwrap();
    bad.limits.cpu_weight = 0;
    i.ops.push(Operation::Activate(bad));
    assert_rejected(
        &fresh(),
        &sealed(&i, &[&key(1)]),
        T0,
        Some(4),
        RejectReason::LimitsOutOfRange,
    );
}

// ------------------------------------------------------------ framing

#[test]
fn more_signatures_than_the_cap_are_refused_before_any_is_checked() {
    // Five valid signatures by five pinned keys: still refused, because the
    // count alone is over the cap (each one would cost a verification).
    let keys = [key(1), key(2), key(3), key(4), key(5)];
    let refs: Vec<&KeyPair> = keys.iter().collect();
    let mut s = AcceptanceState::new(KeySet::of(1, &refs));
    s.advance_floor(T0 - 10 * MINUTE);
    let five = sealed(&instr(1), &refs);
    assert_eq!(
        sign::parse_envelope(&five, MAX_PAYLOAD),
        Err(OpenError::Envelope(codec::DecodeError::TooManySignatures {
            count: 5,
            max: sign::MAX_SIGNATURES
        }))
    );
    assert_rejected(&s, &five, T0, None, RejectReason::Malformed);
    // Four is within the cap and applies.
    apply(&s, &sealed(&instr(1), &refs[..4]), T0);
}

#[test]
fn oversize_input_is_rejected_before_decoding() {
    // A genuinely valid instruction that is only too big.
    let mut i = instr(3);
    i.ops = vec![Operation::Activate(activation(vec![0x42; 70 * 1024]))];
    let bytes = sealed(&i, &[&key(1)]);
    assert!(bytes.len() > policy().max_envelope_bytes);
    assert_rejected(&fresh(), &bytes, T0, None, RejectReason::Malformed);
    // The same bytes under a larger cap apply: size alone caused the refusal.
    let roomy = AcceptancePolicy {
        max_envelope_bytes: 128 * 1024,
        ..policy()
    };
    let d = handle_incoming(&fresh(), &me(), &bytes, T0, &roomy);
    assert_eq!(d.verdict, Verdict::Apply(i));
}

#[test]
fn empty_input_and_unknown_format_version_are_malformed() {
    let s = fresh();
    assert_rejected(&s, &[], T0, None, RejectReason::Malformed);
    let mut bytes = sealed(&instr(3), &[&key(1)]);
    bytes[0] = 2;
    assert_rejected(&s, &bytes, T0, None, RejectReason::Malformed);
}

#[test]
fn trailing_bytes_after_the_envelope_are_rejected() {
    let mut bytes = sealed(&instr(3), &[&key(1)]);
    bytes.push(0);
    assert_rejected(&fresh(), &bytes, T0, None, RejectReason::Malformed);
}

#[test]
fn trailing_bytes_after_the_payload_in_a_resigned_envelope_are_rejected() {
    // The pinned key really signed these bytes: only the framing is wrong.
    let mut payload = codec::encode(&instr(3));
    payload.push(0);
    let env = SignedEnvelope {
        domain: Domain::Instruction,
        signatures: vec![key(1).sign_entry(Domain::Instruction, &payload)],
        payload,
    };
    assert_rejected(
        &fresh(),
        &codec::encode(&env),
        T0,
        None,
        RejectReason::Malformed,
    );
}

#[test]
fn signed_payload_with_an_unknown_format_version_is_rejected() {
    let mut payload = codec::encode(&instr(3));
    payload[0] = 9;
    let env = SignedEnvelope {
        domain: Domain::Instruction,
        signatures: vec![key(1).sign_entry(Domain::Instruction, &payload)],
        payload,
    };
    assert_rejected(
        &fresh(),
        &codec::encode(&env),
        T0,
        None,
        RejectReason::Malformed,
    );
}

#[test]
fn non_canonical_payload_encoding_is_rejected() {
    // The seq varint written over-long (0x83 0x00 instead of 0x03): postcard
    // decodes it to the very same instruction, and the pinned key signed it.
    let canonical = codec::encode(&instr(3));
    let at = 2 + me().as_str().len(); // version byte, string length, string
    assert_eq!(canonical[at], 3);
    let mut payload = canonical[..at].to_vec();
    payload.extend_from_slice(&[0x83, 0x00]);
    payload.extend_from_slice(&canonical[at + 1..]);
    assert_eq!(codec::decode::<Instruction>(&payload).unwrap(), instr(3));
    let resigned = |payload: Vec<u8>| {
        codec::encode(&SignedEnvelope {
            domain: Domain::Instruction,
            signatures: vec![key(1).sign_entry(Domain::Instruction, &payload)],
            payload,
        })
    };
    assert_rejected(
        &fresh(),
        &resigned(payload.clone()),
        T0,
        Some(3),
        RejectReason::Malformed,
    );
    // After the canonical form is applied, the variant is not "different
    // content" (equivocation) either: it is refused as malformed.
    let s = apply(&fresh(), &resigned(canonical), T0);
    assert_rejected(&s, &resigned(payload), T0, Some(3), RejectReason::Malformed);
}

#[test]
fn capability_name_that_could_escape_a_directory_is_rejected() {
    // The agent names a cgroup after the capability; the pinned key signed
    // these, so only the content check stands between them and the disk.
    for bad in ["../../../sys/fs/cgroup", "a/b", "", ".hidden", "vpn\0"] {
        let mut i = instr(3);
        i.ops = vec![Operation::Activate(Activation {
            capability: bad.into(),
            ..activation(vec![])
        })];
        assert_rejected(
            &fresh(),
            &sealed(&i, &[&key(1)]),
            T0,
            Some(3),
            RejectReason::Malformed,
        );
    }
}

// ------------------------------------------------------------ domain separation

fn report() -> QosReport {
    QosReport {
        device: me(),
        seq: 3,
        window_start_ms: T0,
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Gaming,
            bytes: 1000,
            packets: 10,
            rate_bps: 800,
            rtt_p50_us: Some(20_000),
            rtt_p95_us: None,
            jitter_us: None,
            loss_permille: 0,
            active_flows: 1,
            need: QosNeed {
                latency_sensitive: true,
                ..QosNeed::default()
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 100,
            mem_total_kib: 1 << 20,
            mem_available_kib: 1 << 19,
            aes_hw: true,
            arch: "aarch64".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

#[test]
fn report_object_presented_as_an_instruction_is_rejected() {
    let s = fresh();
    // Signed by a pinned key, as the Report domain.
    let bytes = sign::seal(Domain::Report, &report(), &[&key(1)]);
    assert_rejected(&s, &bytes, T0, None, RejectReason::BadSignature);
    // The same envelope relabelled as an instruction.
    let mut env = envelope(&bytes);
    env.domain = Domain::Instruction;
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
}

#[test]
fn instruction_bytes_signed_in_another_domain_are_rejected() {
    // The payload is a perfectly valid instruction; the signature was made for
    // a report, an ack or a rotation. Relabelling the envelope does not help.
    let s = fresh();
    for domain in [Domain::Report, Domain::Ack, Domain::Rotation] {
        let mut env = envelope(&sign::seal(domain, &instr(3), &[&key(1)]));
        env.domain = Domain::Instruction;
        assert_rejected(
            &s,
            &codec::encode(&env),
            T0,
            None,
            RejectReason::BadSignature,
        );
    }
}

#[test]
fn rotation_object_presented_as_an_instruction_is_rejected() {
    let s = fresh();
    let bytes = rotation(2, &[&key(2)], &[&key(1), &key(2)]);
    // On the instruction-only entry point, the Rotation domain is refused.
    let d = handle_instruction(&s, &me(), &bytes, T0, &policy());
    assert_eq!(
        d.verdict,
        Verdict::Reject {
            seq: None,
            reason: RejectReason::BadSignature
        }
    );
    assert_eq!(d.state, s);
    // Relabelled as an instruction: the pinned key's signature (checked
    // first) was made for the Rotation domain and does not verify.
    let mut env = envelope(&bytes);
    env.domain = Domain::Instruction;
    assert_rejected(
        &s,
        &codec::encode(&env),
        T0,
        None,
        RejectReason::BadSignature,
    );
    // Left with only the new key's signature, it is by a key not pinned yet.
    env.signatures.retain(|e| e.key_id == key(2).id());
    assert_rejected(&s, &codec::encode(&env), T0, None, RejectReason::UnknownKey);
}

#[test]
fn instruction_presented_as_a_rotation_is_refused() {
    // A real instruction relabelled as a rotation goes to the rotation path and
    // is refused there without touching the key set.
    let s = fresh();
    let mut env = envelope(&sealed(&instr(3), &[&key(1)]));
    env.domain = Domain::Rotation;
    let d = run(&s, &codec::encode(&env), T0);
    assert!(
        matches!(
            d.verdict,
            Verdict::RotationRefused(RotationError::Malformed(_))
        ),
        "{:?}",
        d.verdict
    );
    assert_eq!(d.state, s);
}

// ------------------------------------------------------------ key rotation

#[test]
fn rotation_signed_only_by_the_old_key_is_refused() {
    let s = fresh();
    assert_rotation_refused(
        &s,
        &rotation(2, &[&key(2)], &[&key(1)]),
        T0,
        RotationError::NotSignedByNewSet,
    );
}

#[test]
fn rotation_signed_only_by_the_new_key_is_refused() {
    let s = fresh();
    assert_rotation_refused(
        &s,
        &rotation(2, &[&key(2)], &[&key(2)]),
        T0,
        RotationError::NotSignedByCurrentSet,
    );
}

#[test]
fn rotation_signed_by_old_and_new_keys_is_accepted() {
    let s = fresh();
    let next = rotate(&s, &rotation(2, &[&key(2)], &[&key(1), &key(2)]), T0, 2);
    assert_eq!(next.keys, KeySet::of(2, &[&key(2)]));
    // Instructions now verify under the new key only.
    apply(&next, &sealed(&instr(1), &[&key(2)]), T0);
    assert_rejected(
        &next,
        &sealed(&instr(1), &[&key(1)]),
        T0,
        None,
        RejectReason::UnknownKey,
    );
}

#[test]
fn rotation_with_a_tampered_signature_is_refused() {
    let s = fresh();
    let mut env = envelope(&rotation(2, &[&key(2)], &[&key(1), &key(2)]));
    env.signatures[0].signature[0] ^= 1;
    assert_rotation_refused(
        &s,
        &codec::encode(&env),
        T0,
        RotationError::Signature(OpenError::BadSignature(key(1).id())),
    );
}

#[test]
fn rotation_signed_by_a_stranger_too_is_refused() {
    let s = fresh();
    assert_rotation_refused(
        &s,
        &rotation(2, &[&key(2)], &[&key(1), &key(2), &key(9)]),
        T0,
        RotationError::Signature(OpenError::UnknownKey(key(9).id())),
    );
}

#[test]
fn rotation_chain_applies_in_epoch_order() {
    let s1 = fresh();
    let s2 = rotate(&s1, &rotation(2, &[&key(2)], &[&key(1), &key(2)]), T0, 2);
    let s3 = rotate(&s2, &rotation(3, &[&key(3)], &[&key(2), &key(3)]), T0, 3);
    assert_eq!(s3.keys, KeySet::of(3, &[&key(3)]));
    apply(&s3, &sealed(&instr(1), &[&key(3)]), T0);
}

#[test]
fn rotation_skipping_an_epoch_is_refused() {
    let s = fresh();
    assert_rotation_refused(
        &s,
        &rotation(3, &[&key(3)], &[&key(1), &key(3)]),
        T0,
        RotationError::OutOfOrder { current: 1, got: 3 },
    );
}

#[test]
fn replayed_old_rotation_is_refused() {
    // Key 2 stays in the set across both rotations, so the replays get past
    // the signature checks and meet the epoch rule itself.
    let r12 = rotation(2, &[&key(2)], &[&key(1), &key(2)]);
    let r23 = rotation(3, &[&key(2), &key(3)], &[&key(2), &key(3)]);
    let s2 = rotate(&fresh(), &r12, T0, 2);
    let s3 = rotate(&s2, &r23, T0, 3);
    assert_rotation_refused(
        &s3,
        &r23,
        T0,
        RotationError::OutOfOrder { current: 3, got: 3 },
    );
    // The first rotation is signed by key 1, which is no longer trusted.
    assert_rotation_refused(
        &s3,
        &r12,
        T0,
        RotationError::Signature(OpenError::UnknownKey(key(1).id())),
    );
}

#[test]
fn rotation_resets_the_sequence_floor_after_a_stolen_key_pushed_it_up() {
    // A thief with key 1 pushed the sequence to 2^63 and it was applied.
    let stolen = 1u64 << 63;
    let s = apply(&fresh(), &sealed(&instr(stolen), &[&key(1)]), T0);
    assert_eq!(s.last_applied_seq, stolen);
    // The operator rotates to key 2; numbering starts afresh.
    let s = rotate(&s, &rotation(2, &[&key(2)], &[&key(1), &key(2)]), T0, 2);
    assert_eq!((s.last_applied_seq, s.last_applied_digest), (0, None));
    let s = apply(&s, &sealed(&instr(5), &[&key(2)]), T0);
    assert_eq!(s.last_applied_seq, 5);
    // The thief's further instructions no longer verify.
    assert_rejected(
        &s,
        &sealed(&instr(stolen + 1), &[&key(1)]),
        T0,
        None,
        RejectReason::UnknownKey,
    );
}

#[test]
fn rotation_to_an_empty_key_set_is_refused() {
    // Signed by the current key, and by "the new set" which has no keys: the
    // device would be bricked.
    assert_rotation_refused(
        &fresh(),
        &rotation(2, &[], &[&key(1)]),
        T0,
        RotationError::EmptyKeySet,
    );
}

#[test]
fn rotation_from_the_future_is_refused() {
    let r = KeyRotation {
        new_set: KeySet::of(2, &[&key(2)]),
        issued_at_ms: T0 + policy().max_clock_skew_ms + 1,
    };
    assert_rotation_refused(
        &fresh(),
        &sign::seal(Domain::Rotation, &r, &[&key(1), &key(2)]),
        T0,
        RotationError::FromFuture,
    );
}

#[test]
fn rotation_with_the_clock_behind_the_floor_is_refused() {
    let mut s = fresh();
    s.advance_floor(T0);
    assert_rotation_refused(
        &s,
        &rotation(2, &[&key(2)], &[&key(1), &key(2)]),
        0,
        RotationError::ClockBehindFloor,
    );
}

#[test]
fn undecodable_rotation_is_refused() {
    let payload = vec![codec::FORMAT_VERSION, 0xff];
    let env = SignedEnvelope {
        domain: Domain::Rotation,
        signatures: vec![key(1).sign_entry(Domain::Rotation, &payload)],
        payload,
    };
    let d = run(&fresh(), &codec::encode(&env), T0);
    assert!(
        matches!(
            d.verdict,
            Verdict::RotationRefused(RotationError::Malformed(_))
        ),
        "{:?}",
        d.verdict
    );
    assert_eq!(d.state, fresh());
}

#[test]
fn rotation_at_the_largest_epoch_is_refused_without_panicking() {
    let mut s = fresh();
    s.keys.epoch = u64::MAX;
    // There is no epoch after u64::MAX; a rotation "to" anything is out of order.
    assert_rotation_refused(
        &s,
        &rotation(0, &[&key(2)], &[&key(1), &key(2)]),
        T0,
        RotationError::OutOfOrder {
            current: u64::MAX,
            got: 0,
        },
    );
}

#[test]
fn rotation_key_entry_whose_id_is_not_its_keys_is_refused() {
    // Key 2's public key listed under key 3's id: a device accepting it would
    // verify "key 3" signatures with key 2 and never verify key 3 itself.
    let mut set = KeySet::of(2, &[&key(2), &key(3)]);
    set.keys[1].public_key = key(2).public_key();
    let r = KeyRotation {
        new_set: set,
        issued_at_ms: T0,
    };
    assert_rotation_refused(
        &fresh(),
        &sign::seal(Domain::Rotation, &r, &[&key(1), &key(2)]),
        T0,
        RotationError::InconsistentKeyId(key(3).id()),
    );
}

// ------------------------------------------------------------ recovery

#[test]
fn after_any_rejection_the_next_valid_instruction_still_applies() {
    let mut s = fresh();
    let mut next_seq = 1u64;
    let mut valid = |s: &AcceptanceState, now: u64| -> AcceptanceState {
        let seq = next_seq;
        next_seq += 1;
        let d = run(s, &sealed(&instr(seq), &[&key(1)]), now);
        assert_eq!(d.verdict, Verdict::Apply(instr(seq)));
        d.state
    };
    s = valid(&s, T0);

    let good = sealed(&instr(50), &[&key(1)]);
    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    bad.push(("empty", vec![]));
    bad.push(("garbage", vec![0xff; 40]));
    bad.push(("oversize", vec![1; 65 * 1024]));
    let mut trailing = good.clone();
    trailing.push(7);
    bad.push(("trailing", trailing));
    let mut tampered = envelope(&good);
    tampered.payload[5] ^= 4;
    bad.push(("bad signature", codec::encode(&tampered)));
    let mut unsigned = envelope(&good);
    unsigned.signatures.clear();
    bad.push(("no signature", codec::encode(&unsigned)));
    bad.push(("unknown key", sealed(&instr(50), &[&key(9)])));
    let mut other = instr(50);
    other.device = DeviceId::new("router-2").unwrap();
    bad.push(("wrong device", sealed(&other, &[&key(1)])));
    bad.push(("rollback", sealed(&instr(0), &[&key(1)])));
    let mut expired = instr(50);
    expired.expires_at_ms = T0 - 1;
    bad.push(("expired", sealed(&expired, &[&key(1)])));
    let mut future = instr(50);
    future.issued_at_ms = T0 + 10 * MINUTE;
    future.expires_at_ms = T0 + 20 * MINUTE;
    bad.push(("future", sealed(&future, &[&key(1)])));
    bad.push(("report", sign::seal(Domain::Report, &report(), &[&key(1)])));
    bad.push((
        "rotation by old key only",
        rotation(2, &[&key(2)], &[&key(1)]),
    ));

    for (what, bytes) in &bad {
        let d = run(&s, bytes, T0);
        assert!(
            matches!(
                d.verdict,
                Verdict::Reject { .. } | Verdict::RotationRefused(_)
            ),
            "{what}: {:?}",
            d.verdict
        );
        assert_eq!(d.state, s, "{what} changed the state");
        s = valid(&s, T0);
    }

    // Equivocation needs a just-applied instruction to contradict.
    let seq = s.last_applied_seq;
    let mut contradiction = instr(seq);
    contradiction.ops.clear();
    assert_rejected(
        &s,
        &sealed(&contradiction, &[&key(1)]),
        T0,
        Some(seq),
        RejectReason::Equivocation,
    );
    s = valid(&s, T0);

    // A clock behind the floor refuses everything; once the clock is back, the
    // same kind of instruction applies.
    let upcoming = s.last_applied_seq + 1;
    assert_rejected(
        &s,
        &sealed(&instr(upcoming), &[&key(1)]),
        0,
        Some(upcoming),
        RejectReason::ClockBehindFloor,
    );
    valid(&s, T0);
}

// ------------------------------------------------------------ counters

#[test]
fn rejection_counters_count_covers_every_reject_reason() {
    // Exhaustive match: a new RejectReason fails to compile here until it is
    // listed, and so until RejectionCounters::count is checked for it.
    fn listed(r: RejectReason) -> usize {
        match r {
            RejectReason::Malformed => 0,
            RejectReason::BadSignature => 1,
            RejectReason::UnknownKey => 2,
            RejectReason::WrongDevice => 3,
            RejectReason::Rollback => 4,
            RejectReason::Equivocation => 5,
            RejectReason::Expired => 6,
            RejectReason::FromFuture => 7,
            RejectReason::ClockBehindFloor => 8,
            RejectReason::LimitsOutOfRange => 9,
        }
    }
    let all = [
        RejectReason::Malformed,
        RejectReason::BadSignature,
        RejectReason::UnknownKey,
        RejectReason::WrongDevice,
        RejectReason::Rollback,
        RejectReason::Equivocation,
        RejectReason::Expired,
        RejectReason::FromFuture,
        RejectReason::ClockBehindFloor,
        RejectReason::LimitsOutOfRange,
    ];
    for (i, r) in all.iter().enumerate() {
        assert_eq!(listed(*r), i);
    }

    let mut c = RejectionCounters::default();
    for (n, r) in all.iter().enumerate() {
        let before = c.clone();
        c.count(*r);
        assert_eq!(c.total(), n as u64 + 1, "{r:?} not counted in total");
        assert_ne!(c, before, "{r:?} changed no counter");
    }
    // Each reason landed in its own counter: every counter is exactly 1,
    // except `malformed`, which also counts LimitsOutOfRange (the report's
    // counters keep their wire layout; the ack names the exact reason). The
    // destructuring has no `..`, so a new counter field must be added here.
    let RejectionCounters {
        bad_signature,
        unknown_key,
        wrong_device,
        rollback,
        equivocation,
        expired,
        from_future,
        clock_behind_floor,
        malformed,
    } = c;
    assert_eq!(
        [
            bad_signature,
            unknown_key,
            wrong_device,
            rollback,
            equivocation,
            expired,
            from_future,
            clock_behind_floor,
            malformed
        ],
        [1, 1, 1, 1, 1, 1, 1, 1, 2]
    );
}
