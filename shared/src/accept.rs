//! Instruction acceptance: the sans-IO state machine that decides, on the
//! device, whether a received instruction or key rotation takes effect.
//!
//! Input: the received bytes, `now` (device wall clock, ms since the epoch) and
//! the persisted [`AcceptanceState`]. Output: a [`Decision`] — what to do and
//! the state to persist *before* acting on it or acknowledging it to the
//! broker. Nothing here touches a disk, a socket or a clock, so every rule is
//! a plain unit test.
//!
//! Rules (DESIGN.md, "Wire protocol"): valid signature under a pinned key; the
//! device's own id; sequence strictly above the last applied one (equal and
//! identical ⇒ quietly ignored, equal and different ⇒ rejected); not expired;
//! not issued further ahead than the allowed skew; the clock not behind the
//! persisted time floor; the signed payload in its one canonical encoding
//! (so that "identical" means the same bytes), with capability names that
//! are safe as directory names, and resource limits inside the ranges a
//! shard host can run under. A key rotation must be signed
//! by the current set and by the new set, applies in epoch order, and resets
//! the sequence floor.
//!
//! The time floor rises only from *signed* issue times of what was accepted
//! (and, at the agent's edge, from a clock known to be NTP-synchronised),
//! never from the raw local clock: a device whose clock once jumps ahead
//! would otherwise carry that jump in its floor and refuse every instruction
//! ("clock behind floor") once the clock is put right. An issue time is
//! accepted only within the skew of the device clock, so the floor can run
//! ahead of real time only when the allocator's and the device's clocks are
//! both wrong.

use crate::codec::{self, DecodeError};
use crate::ids::{self, DeviceId, KeyId};
use crate::msg::{
    Instruction, KeyRotation, KeySet, Operation, RejectReason, RejectionCounters, ResourceLimits,
};
use crate::sign::{self, Domain, OpenError, SignedEnvelope};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Tunables of acceptance; the defaults suit routers with NTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptancePolicy {
    /// How far ahead of the device clock an instruction may be issued, and how
    /// far behind the time floor the clock may be.
    pub max_clock_skew_ms: u64,
    /// Largest envelope accepted, checked before decoding.
    pub max_envelope_bytes: usize,
}

impl Default for AcceptancePolicy {
    fn default() -> Self {
        Self {
            max_clock_skew_ms: 30_000,
            max_envelope_bytes: 64 * 1024,
        }
    }
}

/// What the device persists between instructions. Written to disk before the
/// MQTT acknowledgement, so a crash at any point ends in a redelivery that
/// this state recognises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptanceState {
    /// The pinned instruction keys and their rotation epoch.
    pub keys: KeySet,
    /// Sequence of the last applied instruction (0: none since the last rotation).
    pub last_applied_seq: u64,
    /// SHA-256 of the last applied instruction's signed payload.
    pub last_applied_digest: Option<[u8; 32]>,
    /// The device clock must not be behind this (minus skew): it only moves
    /// forward, from accepted (signed) issue times and from a clock the edge
    /// knows to be synchronised ([`AcceptanceState::advance_floor`]).
    pub time_floor_ms: u64,
}

impl AcceptanceState {
    /// A fresh device trusting `keys`.
    pub fn new(keys: KeySet) -> Self {
        Self {
            keys,
            last_applied_seq: 0,
            last_applied_digest: None,
            time_floor_ms: 0,
        }
    }

    /// Raises the time floor to `trusted_ms`, a time known to be right: the
    /// clock while NTP says it is synchronised, or a signed issue time. Never
    /// the raw local clock: a one-off jump ahead would stay in the floor and
    /// lock the device out once the clock is corrected.
    pub fn advance_floor(&mut self, trusted_ms: u64) {
        self.time_floor_ms = self.time_floor_ms.max(trusted_ms);
    }
}

/// The ranges resource limits in an activation must lie in; outside them the
/// instruction is refused with [`RejectReason::LimitsOutOfRange`] instead of
/// being clamped on the device (a clamped limit is not the limit the
/// allocator budgeted, and the allocator would never learn of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRanges {
    /// `cpu_quota_permille`: 0 means "no quota"; above this is more CPU than
    /// any device has (256 cores).
    pub max_cpu_quota_permille: u32,
    /// `cpu_weight`: cgroup v2 `cpu.weight` accepts 1–10000.
    pub cpu_weight: std::ops::RangeInclusive<u16>,
    /// `memory_max_bytes`: 0 means "no cap"; otherwise at least this (below
    /// it a shard host cannot even map its own code)…
    pub min_memory_bytes: u64,
    /// …and at most this (1 TiB).
    pub max_memory_bytes: u64,
    /// `nice`: what `setpriority` accepts.
    pub nice: std::ops::RangeInclusive<i8>,
}

/// The ranges every agent checks (see [`LimitRanges`]).
pub const LIMIT_RANGES: LimitRanges = LimitRanges {
    max_cpu_quota_permille: 256_000,
    cpu_weight: 1..=10_000,
    min_memory_bytes: 1 << 20,
    max_memory_bytes: 1 << 40,
    nice: -20..=19,
};

impl LimitRanges {
    /// Whether `limits` lie inside these ranges.
    pub fn admits(&self, limits: &ResourceLimits) -> bool {
        limits.cpu_quota_permille <= self.max_cpu_quota_permille
            && self.cpu_weight.contains(&limits.cpu_weight)
            && (limits.memory_max_bytes == 0
                || (self.min_memory_bytes..=self.max_memory_bytes)
                    .contains(&limits.memory_max_bytes))
            && self.nice.contains(&limits.nice)
    }
}

/// What the device should do with the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply these operations, then acknowledge.
    Apply(Instruction),
    /// A redelivery of the instruction last applied: acknowledge, do nothing.
    Ignore { seq: u64 },
    /// Refuse; count it and report it. `seq` is known when the payload decoded.
    Reject {
        seq: Option<u64>,
        reason: RejectReason,
    },
    /// A key rotation was accepted; the state now trusts the new set.
    Rotated { epoch: u64 },
    /// A key rotation was refused.
    RotationRefused(RotationError),
}

/// A verdict and the state to persist before acting on it. On every refusal
/// `state` equals the input state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub state: AcceptanceState,
}

/// Why a key rotation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("rotation is not decodable: {0}")]
    Malformed(DecodeError),
    #[error("rotation signature: {0}")]
    Signature(OpenError),
    #[error("rotation lacks a signature by the current key set")]
    NotSignedByCurrentSet,
    #[error("rotation lacks a signature by the new key set")]
    NotSignedByNewSet,
    #[error("rotation to epoch {got} does not follow current epoch {current}")]
    OutOfOrder { current: u64, got: u64 },
    #[error("rotation carries an empty key set")]
    EmptyKeySet,
    #[error("rotation issued in the future")]
    FromFuture,
    #[error("device clock is behind its time floor")]
    ClockBehindFloor,
    /// A key entry whose id is not derived from its public key: signatures
    /// naming that id would be checked against another key.
    #[error("key set entry {0} does not carry the id of its public key")]
    InconsistentKeyId(KeyId),
}

/// Handles anything received on the device's `instr` topic: instructions and
/// key rotations, told apart by the envelope's domain (the signature check
/// then holds the envelope to that domain).
pub fn handle_incoming(
    state: &AcceptanceState,
    me: &DeviceId,
    bytes: &[u8],
    now_ms: u64,
    policy: &AcceptancePolicy,
) -> Decision {
    match sign::parse_envelope(bytes, policy.max_envelope_bytes) {
        Ok(env) if env.domain == Domain::Rotation => {
            handle_rotation_envelope(state, &env, now_ms, policy)
        }
        Ok(env) => handle_instruction_envelope(state, me, &env, now_ms, policy),
        Err(_) => refuse(state, None, RejectReason::Malformed),
    }
}

/// Handles bytes that must be an instruction.
pub fn handle_instruction(
    state: &AcceptanceState,
    me: &DeviceId,
    bytes: &[u8],
    now_ms: u64,
    policy: &AcceptancePolicy,
) -> Decision {
    match sign::parse_envelope(bytes, policy.max_envelope_bytes) {
        Ok(env) => handle_instruction_envelope(state, me, &env, now_ms, policy),
        Err(_) => refuse(state, None, RejectReason::Malformed),
    }
}

fn refuse(state: &AcceptanceState, seq: Option<u64>, reason: RejectReason) -> Decision {
    Decision {
        verdict: Verdict::Reject { seq, reason },
        state: state.clone(),
    }
}

fn clock_behind_floor(state: &AcceptanceState, now_ms: u64, policy: &AcceptancePolicy) -> bool {
    now_ms.saturating_add(policy.max_clock_skew_ms) < state.time_floor_ms
}

fn handle_instruction_envelope(
    state: &AcceptanceState,
    me: &DeviceId,
    env: &SignedEnvelope,
    now_ms: u64,
    policy: &AcceptancePolicy,
) -> Decision {
    let opened = sign::open_envelope::<Instruction>(env, Domain::Instruction, |id| {
        state.keys.public_key(id)
    });
    let instr = match opened {
        Ok((instr, _signers)) => instr,
        Err(OpenError::UnknownKey(_)) => return refuse(state, None, RejectReason::UnknownKey),
        Err(OpenError::Payload(_) | OpenError::Envelope(_)) => {
            return refuse(state, None, RejectReason::Malformed)
        }
        Err(
            OpenError::WrongDomain { .. } | OpenError::NoSignature | OpenError::BadSignature(_),
        ) => return refuse(state, None, RejectReason::BadSignature),
    };
    // postcard accepts over-long varints, so one instruction has many byte
    // forms. Only the canonical one is accepted: then "identical" (same
    // digest) and "same content" coincide, and a re-encoded redelivery can
    // never count as equivocation nor a variant slip past the digest.
    if codec::encode(&instr) != env.payload {
        return refuse(state, Some(instr.seq), RejectReason::Malformed);
    }
    let seq = Some(instr.seq);
    // Capability names become cgroup directory names on the device; one that
    // could leave its directory ("../x", "a/b") is refused like bad framing.
    // More alternatives than any catalog needs is refused the same way.
    let unsafe_name = instr.ops.iter().any(|op| match op {
        Operation::Activate(a) => ids::check_capability(&a.capability).is_err(),
        Operation::ActivateShard(a) => {
            ids::check_capability(&a.capability).is_err()
                || a.alternatives.len() > crate::msg::MAX_ALTERNATIVES
        }
        Operation::Deactivate { .. } | Operation::RequestDiagnostics { .. } => false,
    });
    if unsafe_name {
        return refuse(state, seq, RejectReason::Malformed);
    }
    if &instr.device != me {
        return refuse(state, seq, RejectReason::WrongDevice);
    }
    if clock_behind_floor(state, now_ms, policy) {
        return refuse(state, seq, RejectReason::ClockBehindFloor);
    }
    let digest: [u8; 32] = Sha256::digest(&env.payload).into();
    if instr.seq < state.last_applied_seq {
        return refuse(state, seq, RejectReason::Rollback);
    }
    if instr.seq == state.last_applied_seq {
        // seq 0 is never applied, so state.last_applied_digest is Some here
        // unless nothing was applied since the last rotation.
        return match state.last_applied_digest {
            Some(d) if d == digest => Decision {
                verdict: Verdict::Ignore { seq: instr.seq },
                state: state.clone(),
            },
            Some(_) => refuse(state, seq, RejectReason::Equivocation),
            None => refuse(state, seq, RejectReason::Rollback),
        };
    }
    if instr.expires_at_ms <= now_ms {
        return refuse(state, seq, RejectReason::Expired);
    }
    if instr.issued_at_ms > now_ms.saturating_add(policy.max_clock_skew_ms) {
        return refuse(state, seq, RejectReason::FromFuture);
    }
    let limits_ok = instr.ops.iter().all(|op| match op {
        Operation::Activate(a) => LIMIT_RANGES.admits(&a.limits),
        Operation::ActivateShard(a) => a.variants().all(|v| LIMIT_RANGES.admits(&v.limits)),
        Operation::Deactivate { .. } | Operation::RequestDiagnostics { .. } => true,
    });
    if !limits_ok {
        return refuse(state, seq, RejectReason::LimitsOutOfRange);
    }
    let mut next = state.clone();
    next.last_applied_seq = instr.seq;
    next.last_applied_digest = Some(digest);
    // The signed issue time, not `now`: see the module docs.
    next.time_floor_ms = next.time_floor_ms.max(instr.issued_at_ms);
    Decision {
        verdict: Verdict::Apply(instr),
        state: next,
    }
}

fn handle_rotation_envelope(
    state: &AcceptanceState,
    env: &SignedEnvelope,
    now_ms: u64,
    policy: &AcceptancePolicy,
) -> Decision {
    let refused = |e: RotationError| Decision {
        verdict: Verdict::RotationRefused(e),
        state: state.clone(),
    };
    let rotation: KeyRotation = match codec::decode(&env.payload) {
        Ok(r) => r,
        Err(e) => return refused(RotationError::Malformed(e)),
    };
    let new_set = &rotation.new_set;
    // Every signature must be by a key of either set and verify; then at
    // least one must come from each set.
    let lookup = |id| state.keys.public_key(id).or_else(|| new_set.public_key(id));
    let signers = match sign::open_envelope::<KeyRotation>(env, Domain::Rotation, lookup) {
        Ok((_, signers)) => signers,
        Err(e) => return refused(RotationError::Signature(e)),
    };
    if new_set.keys.is_empty() {
        return refused(RotationError::EmptyKeySet);
    }
    if let Some(bad) = new_set
        .keys
        .iter()
        .find(|k| k.key_id != KeyId::of_public_key(&k.public_key))
    {
        return refused(RotationError::InconsistentKeyId(bad.key_id));
    }
    if !signers.iter().any(|&id| state.keys.contains(id)) {
        return refused(RotationError::NotSignedByCurrentSet);
    }
    if !signers.iter().any(|&id| new_set.contains(id)) {
        return refused(RotationError::NotSignedByNewSet);
    }
    // checked_add: a pinned set at u64::MAX has no successor (and must not
    // overflow-panic in a debug build).
    if state.keys.epoch.checked_add(1) != Some(new_set.epoch) {
        return refused(RotationError::OutOfOrder {
            current: state.keys.epoch,
            got: new_set.epoch,
        });
    }
    if clock_behind_floor(state, now_ms, policy) {
        return refused(RotationError::ClockBehindFloor);
    }
    if rotation.issued_at_ms > now_ms.saturating_add(policy.max_clock_skew_ms) {
        return refused(RotationError::FromFuture);
    }
    let next = AcceptanceState {
        keys: new_set.clone(),
        // A stolen old key may have pushed the sequence to the top; the new
        // set starts afresh, and old-key instructions no longer verify.
        last_applied_seq: 0,
        last_applied_digest: None,
        time_floor_ms: state.time_floor_ms.max(rotation.issued_at_ms),
    };
    Decision {
        verdict: Verdict::Rotated {
            epoch: new_set.epoch,
        },
        state: next,
    }
}

impl RejectionCounters {
    /// Counts one rejection under its reason.
    pub fn count(&mut self, reason: RejectReason) {
        let slot = match reason {
            RejectReason::Malformed => &mut self.malformed,
            RejectReason::BadSignature => &mut self.bad_signature,
            RejectReason::UnknownKey => &mut self.unknown_key,
            RejectReason::WrongDevice => &mut self.wrong_device,
            RejectReason::Rollback => &mut self.rollback,
            RejectReason::Equivocation => &mut self.equivocation,
            RejectReason::Expired => &mut self.expired,
            RejectReason::FromFuture => &mut self.from_future,
            RejectReason::ClockBehindFloor => &mut self.clock_behind_floor,
            // The report's counters keep their wire layout (a new field
            // would break every older decoder); the ack names the exact
            // reason, and the allocator reads compliance from acks.
            RejectReason::LimitsOutOfRange => &mut self.malformed,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u64 {
        self.malformed
            + self.bad_signature
            + self.unknown_key
            + self.wrong_device
            + self.rollback
            + self.equivocation
            + self.expired
            + self.from_future
            + self.clock_behind_floor
    }
}
