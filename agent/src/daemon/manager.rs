//! The capability manager: the device's decision core, sans-IO.
//!
//! It owns everything the agent persists between runs ([`PersistedState`]:
//! the instruction acceptance state, the running profile of shard
//! activations, the report sequence reservation) and turns events into
//! [`Action`]s: an instruction's bytes (through
//! [`shardline_shared::accept::handle_incoming`]), a lease tick, a boot.
//! It never touches a disk, a socket, a process or a clock; the daemon
//! executes the actions **in order**, and every list that changes state
//! starts with [`Action::Persist`], so the new state is on disk before any
//! shard is started or stopped and before anything is acknowledged.
//!
//! The profile holds [`ShardActivation`]s: each with its primary variant,
//! the alternatives the device may fail over to on its own (the
//! supervisor's policy decides when, on simulated time in its tests), and
//! secret configuration still **sealed** (opened only by the supervisor when
//! it starts a host, never persisted or logged in clear). The old
//! `Operation::Activate` is the same thing without alternatives, seal or
//! bandwidth. A `state.json` of format 1 (a profile of `Activation`s) is
//! migrated when read ([`PersistedState::from_json`]).
//!
//! Invariants:
//! - a shard whose lease is at or before `now` is never in the profile after
//!   [`CapabilityManager::on_tick`]; [`CapabilityManager::next_deadline`] says
//!   when the next one runs out so the daemon can wake exactly then;
//! - renewing a lease (same shard, hash, config, limits) does not restart its
//!   host: only a changed capability spec produces `Start`;
//! - report sequence numbers only grow, across restarts, because they are
//!   handed out from a block reserved on disk first;
//! - what anyone with publish rights on the broker can produce costs no disk
//!   write and no signature (issue 14): bytes that fail before or at the
//!   signature check (undecodable, unknown key, bad signature, another
//!   device's) are only counted (the next report carries the counters), and
//!   acks of other refusals and of duplicates (replays of genuinely signed
//!   instructions) come from a token bucket ([`ACK_BURST`], [`ACK_PER_S`]);
//!   beyond it they are counted only. Applied instructions and rotations are
//!   always acked.

use serde::{Deserialize, Serialize};
use shardline_shared::accept::{
    self, AcceptancePolicy, AcceptanceState, Decision, RotationError, Verdict,
};
use shardline_shared::msg::{
    AckOutcome, Activation, Enforcement, KeySet, Operation, RejectReason, RejectionCounters,
    ShardActivation, ShardState, ShardStatus, ShardVariant,
};
use shardline_shared::sign::OpenError;
use shardline_shared::{DeviceId, ShardRef};
use std::collections::BTreeMap;

/// How many report sequence numbers are reserved on disk at once: one fsync
/// per block instead of one per report.
pub const SEQ_BLOCK: u64 = 1024;

/// Format of [`PersistedState`]; bumped on incompatible changes.
/// 2: the profile holds `ShardActivation`s (1 held `Activation`s).
pub const STATE_FORMAT: u32 = 2;

/// Everything the device must remember across restarts (`state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub format: u32,
    pub acceptance: AcceptanceState,
    /// The last-known-good profile: activations of the applied instructions
    /// whose leases had not run out, ordered by primary shard, with their
    /// alternatives; secret configuration stays sealed.
    pub profile: Vec<ShardActivation>,
    /// Report sequence numbers up to this one may have been used.
    pub report_seq_reserved: u64,
}

/// `state.json` as format 1 wrote it.
#[derive(Deserialize)]
struct StateV1 {
    acceptance: AcceptanceState,
    profile: Vec<Activation>,
    report_seq_reserved: u64,
}

/// Why `state.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    #[error("not JSON of a known shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown state format {0} (this agent reads 1 and {STATE_FORMAT})")]
    UnknownFormat(u64),
}

impl PersistedState {
    /// Parses `state.json`, migrating format 1 (whose profile entries become
    /// activations without alternatives, seal or bandwidth: exactly what
    /// they meant). Pure: the caller reads the file and logs the migration
    /// (`migrated` is true then; the next persist writes format 2).
    pub fn from_json(bytes: &[u8]) -> Result<(Self, bool), StateFormatError> {
        #[derive(Deserialize)]
        struct Head {
            format: u64,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        match head.format {
            1 => {
                let old: StateV1 = serde_json::from_slice(bytes)?;
                Ok((
                    Self {
                        format: STATE_FORMAT,
                        acceptance: old.acceptance,
                        profile: old.profile.into_iter().map(from_activation).collect(),
                        report_seq_reserved: old.report_seq_reserved,
                    },
                    true,
                ))
            }
            f if f == u64::from(STATE_FORMAT) => Ok((serde_json::from_slice(bytes)?, false)),
            f => Err(StateFormatError::UnknownFormat(f)),
        }
    }
}

/// The old single-variant activation as a `ShardActivation`.
pub fn from_activation(a: Activation) -> ShardActivation {
    ShardActivation {
        primary: ShardVariant {
            shard: a.shard,
            sha256: a.sha256,
            config: a.config,
            sealed_config: Vec::new(),
            limits: a.limits,
            bandwidth_kbps: 0,
        },
        alternatives: Vec::new(),
        capability: a.capability,
        kind: a.kind,
        priority: a.priority,
        lease_expires_at_ms: a.lease_expires_at_ms,
    }
}

/// What the daemon must do, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this state durably before executing the next action.
    Persist(Box<PersistedState>),
    /// (Re)start the capability's host with exactly these shards.
    Start {
        capability: String,
        shards: Vec<ShardActivation>,
    },
    /// Stop the capability's host.
    Stop { capability: String },
    /// Publish an ack. `Applied` becomes `Failed` in the daemon when a
    /// `Start` of the same action list failed.
    Ack { seq: u64, outcome: AckOutcome },
    /// Answer the operator's diagnostics request of instruction `seq`
    /// (issue 20): recent log lines (at most `max_lines`) and status,
    /// signed, on the device's diagnostics topic. After the ack.
    Diagnostics { seq: u64, max_lines: u16 },
}

/// The decision core; see the module docs.
#[derive(Debug)]
pub struct CapabilityManager {
    device: DeviceId,
    policy: AcceptancePolicy,
    acceptance: AcceptanceState,
    /// Keyed by the primary variant's shard.
    profile: BTreeMap<ShardRef, ShardActivation>,
    /// What the runtime was last told to run, per capability, leases blanked.
    running: BTreeMap<String, Vec<ShardActivation>>,
    report_seq_reserved: u64,
    next_report_seq: u64,
    rejections: RejectionCounters,
    /// Shards stopped because their lease ran out, with when: each is
    /// reported for [`EXPIRED_REPORT_MS`] (or until re-activated), so a cloud
    /// that missed a report while it reconnected still learns of it.
    expired: Vec<(ShardStatus, u64)>,
    ack_budget: AckBudget,
    /// Refusals and duplicates that got no ack (unauthenticated, or over
    /// the ack budget), since start.
    acks_withheld: u64,
}

/// How long an expired shard keeps appearing in reports.
pub const EXPIRED_REPORT_MS: u64 = 60_000;

/// Refusal and duplicate acks that may be sent back to back.
pub const ACK_BURST: u32 = 10;
/// Refusal and duplicate acks per second once the burst is spent.
pub const ACK_PER_S: u32 = 2;

/// Whether a refusal happened at or before the signature check: then the
/// bytes need not come from the allocator at all, and answering them would
/// let any publisher make the device write and sign.
pub fn is_unauthenticated(reason: RejectReason) -> bool {
    matches!(
        reason,
        RejectReason::Malformed
            | RejectReason::BadSignature
            | RejectReason::UnknownKey
            | RejectReason::WrongDevice
    )
}

/// Token bucket for refusal/duplicate acks, on the caller's clock.
#[derive(Debug, Clone)]
struct AckBudget {
    tokens_milli: u64,
    at_ms: u64,
}

impl AckBudget {
    fn new(now_ms: u64) -> Self {
        Self {
            tokens_milli: u64::from(ACK_BURST) * 1000,
            at_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        self.tokens_milli =
            (self.tokens_milli + elapsed * u64::from(ACK_PER_S)).min(u64::from(ACK_BURST) * 1000);
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }
}

impl CapabilityManager {
    /// Restores from the persisted state (if any) at boot: re-pins `pinned`
    /// when the key set was never rotated, drops leases that ran out while
    /// the agent was down, and starts the rest of the last-known-good profile.
    pub fn restore(
        device: DeviceId,
        policy: AcceptancePolicy,
        persisted: Option<PersistedState>,
        pinned: KeySet,
        now_ms: u64,
    ) -> (Self, Vec<Action>) {
        let fresh = persisted.is_none();
        let state = persisted.unwrap_or_else(|| PersistedState {
            format: STATE_FORMAT,
            acceptance: AcceptanceState::new(pinned.clone()),
            profile: Vec::new(),
            report_seq_reserved: 0,
        });
        let mut acceptance = state.acceptance;
        let mut changed = fresh;
        // The configuration pins epoch 0; after a rotation the rotated set
        // (signed by the old and the new keys) is authoritative.
        if acceptance.keys.epoch == 0 && acceptance.keys != pinned {
            acceptance.keys = pinned;
            changed = true;
        }
        let mut mgr = Self {
            device,
            policy,
            acceptance,
            profile: state
                .profile
                .into_iter()
                .map(|a| (a.primary.shard.clone(), a))
                .collect(),
            running: BTreeMap::new(),
            report_seq_reserved: state.report_seq_reserved,
            next_report_seq: state.report_seq_reserved + 1,
            rejections: RejectionCounters::default(),
            expired: Vec::new(),
            ack_budget: AckBudget::new(now_ms),
            acks_withheld: 0,
        };
        changed |= mgr.expire(now_ms);
        let mut actions = Vec::new();
        if changed {
            actions.push(mgr.persist());
        }
        actions.extend(mgr.reconcile());
        (mgr, actions)
    }

    /// Handles bytes received on the device's `instr` topic.
    pub fn on_instruction(&mut self, bytes: &[u8], now_ms: u64) -> Vec<Action> {
        let Decision { verdict, state } =
            accept::handle_incoming(&self.acceptance, &self.device, bytes, now_ms, &self.policy);
        match verdict {
            Verdict::Apply(instr) => {
                self.acceptance = state;
                let mut diagnostics = Vec::new();
                for op in instr.ops {
                    match op {
                        Operation::RequestDiagnostics { max_lines } => diagnostics.push(max_lines),
                        Operation::Activate(a) => self.activate(from_activation(a), now_ms),
                        Operation::ActivateShard(a) => self.activate(a, now_ms),
                        Operation::Deactivate { shard } => {
                            // By the primary the cloud activated, or by the
                            // alternative the device reported running.
                            self.profile
                                .retain(|_, a| a.variants().all(|v| v.shard != shard));
                        }
                    }
                }
                let mut actions = vec![self.persist()];
                actions.extend(self.reconcile());
                actions.push(Action::Ack {
                    seq: instr.seq,
                    outcome: AckOutcome::Applied,
                });
                // One answer per instruction, however many times it asked.
                if let Some(max_lines) = diagnostics.into_iter().max() {
                    actions.push(Action::Diagnostics {
                        seq: instr.seq,
                        max_lines,
                    });
                }
                actions
            }
            Verdict::Ignore { seq } => self.budgeted_ack(seq, AckOutcome::Duplicate, now_ms),
            Verdict::Reject { seq, reason } => {
                self.rejections.count(reason);
                if is_unauthenticated(reason) {
                    self.acks_withheld += 1;
                    return Vec::new();
                }
                self.budgeted_ack(seq.unwrap_or(0), AckOutcome::Rejected(reason), now_ms)
            }
            Verdict::Rotated { .. } => {
                self.acceptance = state;
                // Rotations carry no sequence of their own: acked as seq 0.
                vec![
                    self.persist(),
                    Action::Ack {
                        seq: 0,
                        outcome: AckOutcome::Applied,
                    },
                ]
            }
            Verdict::RotationRefused(err) => {
                let reason = rotation_reason(&err);
                self.rejections.count(reason);
                if is_unauthenticated(reason) {
                    self.acks_withheld += 1;
                    return Vec::new();
                }
                self.budgeted_ack(0, AckOutcome::Rejected(reason), now_ms)
            }
        }
    }

    fn activate(&mut self, a: ShardActivation, now_ms: u64) {
        if a.lease_expires_at_ms <= now_ms {
            // Already over: never start it, but say so.
            self.expired.push((expired_status(&a), now_ms));
            self.profile.remove(&a.primary.shard);
        } else {
            self.profile.insert(a.primary.shard.clone(), a);
        }
    }

    /// An ack from the budget, or nothing (counted) when it is spent.
    fn budgeted_ack(&mut self, seq: u64, outcome: AckOutcome, now_ms: u64) -> Vec<Action> {
        if self.ack_budget.take(now_ms) {
            vec![Action::Ack { seq, outcome }]
        } else {
            self.acks_withheld += 1;
            Vec::new()
        }
    }

    /// Refusals and duplicates that got no ack since start.
    pub fn acks_withheld(&self) -> u64 {
        self.acks_withheld
    }

    /// Stops every shard whose lease ran out by `now`.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Action> {
        if !self.expire(now_ms) {
            return Vec::new();
        }
        let mut actions = vec![self.persist()];
        actions.extend(self.reconcile());
        actions
    }

    /// Raises the persisted time floor (so a clock reset cannot revive
    /// expired instructions) to `trusted_ms`, a time known to be right (see
    /// `daemon::clock`: the clock while NTP says it is synchronised); `None`
    /// (an unsynchronised clock) leaves it to the signed issue times of
    /// accepted instructions. Returns the persist action when it moved.
    pub fn advance_floor(&mut self, trusted_ms: Option<u64>) -> Vec<Action> {
        let Some(t) = trusted_ms else {
            return Vec::new();
        };
        if t <= self.acceptance.time_floor_ms {
            return Vec::new();
        }
        self.acceptance.advance_floor(t);
        vec![self.persist()]
    }

    /// When the next lease runs out.
    pub fn next_deadline(&self) -> Option<u64> {
        self.profile.values().map(|a| a.lease_expires_at_ms).min()
    }

    /// The next report sequence number; when it leaves the reserved block,
    /// a new block is reserved first (the returned `Persist` must be executed
    /// before the report is stored).
    pub fn next_report_seq(&mut self) -> (u64, Vec<Action>) {
        let seq = self.next_report_seq;
        self.next_report_seq += 1;
        let mut actions = Vec::new();
        if seq > self.report_seq_reserved {
            self.report_seq_reserved = seq + SEQ_BLOCK - 1;
            actions.push(self.persist());
        }
        (seq, actions)
    }

    pub fn applied_seq(&self) -> u64 {
        self.acceptance.last_applied_seq
    }

    pub fn rejections(&self) -> &RejectionCounters {
        &self.rejections
    }

    pub fn acceptance(&self) -> &AcceptanceState {
        &self.acceptance
    }

    /// The active profile, ordered by primary shard.
    pub fn profile(&self) -> impl Iterator<Item = &ShardActivation> {
        self.profile.values()
    }

    /// Shard statuses for a report: the runtime's view of running shards
    /// (with the current lease, which a renewal may have moved), then the
    /// shards whose lease ran out in the last [`EXPIRED_REPORT_MS`] and that
    /// were not activated again.
    pub fn report_statuses(
        &mut self,
        mut runtime: Vec<ShardStatus>,
        now_ms: u64,
    ) -> Vec<ShardStatus> {
        // A running alternative holds the lease of its activation.
        let leases: BTreeMap<&ShardRef, u64> = self
            .profile
            .values()
            .flat_map(|a| a.variants().map(|v| (&v.shard, a.lease_expires_at_ms)))
            .collect();
        for s in &mut runtime {
            if let Some(&lease) = leases.get(&s.shard) {
                s.lease_expires_at_ms = lease;
            }
        }
        let profile = &self.profile;
        self.expired.retain(|(e, at)| {
            now_ms.saturating_sub(*at) < EXPIRED_REPORT_MS && !profile.contains_key(&e.shard)
        });
        runtime.retain(|s| !self.expired.iter().any(|(e, _)| e.shard == s.shard));
        runtime.extend(self.expired.iter().map(|(e, _)| e.clone()));
        runtime
    }

    /// Replaces the pinned epoch-0 keys (configuration reload); no effect
    /// after a rotation. Returns the persist action when they changed.
    pub fn repin(&mut self, pinned: KeySet) -> Vec<Action> {
        if self.acceptance.keys.epoch == 0 && self.acceptance.keys != pinned {
            self.acceptance.keys = pinned;
            return vec![self.persist()];
        }
        Vec::new()
    }

    fn expire(&mut self, now_ms: u64) -> bool {
        let gone: Vec<ShardRef> = self
            .profile
            .values()
            .filter(|a| a.lease_expires_at_ms <= now_ms)
            .map(|a| a.primary.shard.clone())
            .collect();
        for shard in &gone {
            if let Some(a) = self.profile.remove(shard) {
                self.expired.push((expired_status(&a), now_ms));
            }
        }
        !gone.is_empty()
    }

    fn persist(&self) -> Action {
        Action::Persist(Box::new(PersistedState {
            format: STATE_FORMAT,
            acceptance: self.acceptance.clone(),
            profile: self.profile.values().cloned().collect(),
            report_seq_reserved: self.report_seq_reserved,
        }))
    }

    /// Brings the runtime in line with the profile: stops first (frees
    /// resources), then starts capabilities whose spec changed.
    fn reconcile(&mut self) -> Vec<Action> {
        let mut desired: BTreeMap<String, Vec<ShardActivation>> = BTreeMap::new();
        for a in self.profile.values() {
            desired
                .entry(a.capability.clone())
                .or_default()
                .push(a.clone());
        }
        let mut actions = Vec::new();
        for cap in self.running.keys() {
            if !desired.contains_key(cap) {
                actions.push(Action::Stop {
                    capability: cap.clone(),
                });
            }
        }
        let mut running = BTreeMap::new();
        for (cap, shards) in desired {
            let spec: Vec<ShardActivation> = shards.iter().map(without_lease).collect();
            if self.running.get(&cap) != Some(&spec) {
                actions.push(Action::Start {
                    capability: cap.clone(),
                    shards,
                });
            }
            running.insert(cap, spec);
        }
        self.running = running;
        actions
    }
}

fn without_lease(a: &ShardActivation) -> ShardActivation {
    ShardActivation {
        lease_expires_at_ms: 0,
        ..a.clone()
    }
}

fn expired_status(a: &ShardActivation) -> ShardStatus {
    ShardStatus {
        shard: a.primary.shard.clone(),
        capability: a.capability.clone(),
        state: ShardState::Expired,
        cpu_permille: 0,
        rss_kib: 0,
        restarts: 0,
        errors: 0,
        last_failure: None,
        lease_expires_at_ms: a.lease_expires_at_ms,
        enforcement: Enforcement::RlimitsOnly,
    }
}

/// Rotations have no counters of their own; they are counted under the
/// instruction reason that describes the same fault.
pub fn rotation_reason(err: &RotationError) -> RejectReason {
    match err {
        RotationError::Malformed(_)
        | RotationError::EmptyKeySet
        | RotationError::InconsistentKeyId(_) => RejectReason::Malformed,
        RotationError::Signature(OpenError::UnknownKey(_)) => RejectReason::UnknownKey,
        RotationError::Signature(OpenError::Envelope(_) | OpenError::Payload(_)) => {
            RejectReason::Malformed
        }
        RotationError::Signature(_)
        | RotationError::NotSignedByCurrentSet
        | RotationError::NotSignedByNewSet => RejectReason::BadSignature,
        RotationError::OutOfOrder { .. } => RejectReason::Rollback,
        RotationError::FromFuture => RejectReason::FromFuture,
        RotationError::ClockBehindFloor => RejectReason::ClockBehindFloor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::{Instruction, KeyRotation, ResourceLimits, ShardKind};
    use shardline_shared::sign::{seal, Domain, KeyPair};

    const T0: u64 = 1_800_000_000_000;

    fn alloc_key() -> KeyPair {
        KeyPair::from_seed(&[1; 32])
    }

    fn me() -> DeviceId {
        DeviceId::new("r1").unwrap()
    }

    fn activation(shard: &str, cap: &str, lease: u64) -> Activation {
        Activation {
            shard: shard.parse().unwrap(),
            capability: cap.into(),
            kind: ShardKind::Compute,
            sha256: [9; 32],
            config: vec![],
            limits: ResourceLimits {
                cpu_quota_permille: 200,
                cpu_weight: 100,
                memory_max_bytes: 32 << 20,
                nice: 5,
            },
            priority: 1,
            lease_expires_at_ms: lease,
        }
    }

    fn instr(seq: u64, now: u64, ops: Vec<Operation>) -> Vec<u8> {
        seal(
            Domain::Instruction,
            &Instruction {
                device: me(),
                seq,
                issued_at_ms: now,
                expires_at_ms: now + 60_000,
                ops,
            },
            &[&alloc_key()],
        )
    }

    fn boot(now: u64) -> CapabilityManager {
        let (m, actions) = CapabilityManager::restore(
            me(),
            AcceptancePolicy::default(),
            None,
            KeySet::of(0, &[&alloc_key()]),
            now,
        );
        assert!(matches!(actions.as_slice(), [Action::Persist(_)]));
        m
    }

    #[test]
    fn the_floor_moves_only_to_trusted_times_and_survives_a_clock_jump() {
        let mut m = boot(T0);
        // An unsynchronised clock a day ahead raises nothing.
        let day = 86_400_000;
        assert!(m.advance_floor(None).is_empty());
        assert_eq!(m.acceptance().time_floor_ms, 0);
        // An instruction applied while the clock is a day ahead raises the
        // floor to its signed issue time (T0), not to the clock.
        let long = seal(
            Domain::Instruction,
            &Instruction {
                device: me(),
                seq: 1,
                issued_at_ms: T0,
                expires_at_ms: T0 + 2 * day,
                ops: vec![],
            },
            &[&alloc_key()],
        );
        let a = m.on_instruction(&long, T0 + day);
        assert!(matches!(a.first(), Some(Action::Persist(_))), "{a:?}");
        assert_eq!(m.acceptance().time_floor_ms, T0);
        // The clock is put right: the next instruction applies.
        let a = m.on_instruction(&instr(2, T0 + 1_000, vec![]), T0 + 1_000);
        assert!(matches!(a.first(), Some(Action::Persist(_))), "{a:?}");
        assert_eq!(m.applied_seq(), 2);
        // A synchronised clock raises it, and the move is persisted.
        let a = m.advance_floor(Some(T0 + 5_000));
        assert!(matches!(a.as_slice(), [Action::Persist(_)]), "{a:?}");
        assert_eq!(m.acceptance().time_floor_ms, T0 + 5_000);
        assert!(m.advance_floor(Some(T0)).is_empty(), "never lowered");
    }

    fn starts(actions: &[Action]) -> Vec<(String, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { capability, shards } => Some((capability.clone(), shards.len())),
                _ => None,
            })
            .collect()
    }

    fn stops(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { capability } => Some(capability.clone()),
                _ => None,
            })
            .collect()
    }

    fn last_persist(actions: &[Action]) -> PersistedState {
        actions
            .iter()
            .rev()
            .find_map(|a| match a {
                Action::Persist(s) => Some((**s).clone()),
                _ => None,
            })
            .expect("a persist action")
    }

    #[test]
    fn a_diagnostics_request_is_answered_once_after_the_ack() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![
                    Operation::RequestDiagnostics { max_lines: 50 },
                    Operation::RequestDiagnostics { max_lines: 200 },
                ],
            ),
            T0,
        );
        let n = a.len();
        assert!(matches!(a[n - 2], Action::Ack { seq: 1, .. }), "{a:?}");
        assert_eq!(
            a[n - 1],
            Action::Diagnostics {
                seq: 1,
                max_lines: 200
            }
        );
        // A redelivery is a duplicate: acked, never answered again.
        let again = m.on_instruction(
            &instr(
                1,
                T0,
                vec![
                    Operation::RequestDiagnostics { max_lines: 50 },
                    Operation::RequestDiagnostics { max_lines: 200 },
                ],
            ),
            T0,
        );
        assert!(!again
            .iter()
            .any(|a| matches!(a, Action::Diagnostics { .. })));
    }

    #[test]
    fn applying_persists_first_then_starts_then_acks() {
        let mut m = boot(T0);
        let bytes = instr(
            1,
            T0,
            vec![
                Operation::Activate(activation("tunnel@1", "vpn", T0 + 10_000)),
                Operation::Activate(activation("crypto@1", "vpn", T0 + 10_000)),
            ],
        );
        let actions = m.on_instruction(&bytes, T0 + 1);
        assert!(matches!(actions[0], Action::Persist(_)));
        assert_eq!(starts(&actions), vec![("vpn".to_string(), 2)]);
        assert_eq!(
            actions.last(),
            Some(&Action::Ack {
                seq: 1,
                outcome: AckOutcome::Applied
            })
        );
        let saved = last_persist(&actions);
        assert_eq!(saved.acceptance.last_applied_seq, 1);
        assert_eq!(saved.profile.len(), 2);

        // Redelivery: duplicate ack, nothing started, nothing persisted.
        let again = m.on_instruction(&bytes, T0 + 2);
        assert_eq!(
            again,
            vec![Action::Ack {
                seq: 1,
                outcome: AckOutcome::Duplicate
            }]
        );
    }

    #[test]
    fn lease_expiry_stops_on_time_and_renewal_does_not_restart() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![
                    Operation::Activate(activation("tunnel@1", "vpn", T0 + 10_000)),
                    Operation::Activate(activation("shaper@1", "qos", T0 + 5_000)),
                ],
            ),
            T0,
        );
        assert_eq!(starts(&a).len(), 2);
        assert_eq!(m.next_deadline(), Some(T0 + 5_000));
        assert!(m.on_tick(T0 + 4_999).is_empty());
        let t = m.on_tick(T0 + 5_000);
        assert_eq!(stops(&t), vec!["qos".to_string()]);
        assert!(starts(&t).is_empty());
        assert!(last_persist(&t)
            .profile
            .iter()
            .all(|a| a.capability == "vpn"));
        let statuses = m.report_statuses(vec![], T0 + 5_000);
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].state, ShardState::Expired);
        assert_eq!(
            m.report_statuses(vec![], T0 + 6_000).len(),
            1,
            "kept while the cloud may have missed it"
        );
        assert!(
            m.report_statuses(vec![], T0 + 5_000 + EXPIRED_REPORT_MS)
                .is_empty(),
            "dropped after the retention"
        );

        // Renewal of the vpn lease: persisted, but no restart.
        let r = m.on_instruction(
            &instr(
                2,
                T0 + 6_000,
                vec![Operation::Activate(activation(
                    "tunnel@1",
                    "vpn",
                    T0 + 20_000,
                ))],
            ),
            T0 + 6_000,
        );
        assert!(starts(&r).is_empty() && stops(&r).is_empty(), "{r:?}");
        assert!(m.on_tick(T0 + 10_000).is_empty(), "renewed lease holds");
        assert_eq!(stops(&m.on_tick(T0 + 20_000)), vec!["vpn".to_string()]);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn a_changed_shard_restarts_its_capability_and_deactivate_stops_it() {
        let mut m = boot(T0);
        m.on_instruction(
            &instr(
                1,
                T0,
                vec![Operation::Activate(activation(
                    "tunnel@1",
                    "vpn",
                    T0 + 9_000,
                ))],
            ),
            T0,
        );
        let mut changed = activation("tunnel@1", "vpn", T0 + 9_000);
        changed.config = vec![1, 2, 3];
        let a = m.on_instruction(&instr(2, T0, vec![Operation::Activate(changed)]), T0);
        assert_eq!(starts(&a), vec![("vpn".to_string(), 1)]);
        let d = m.on_instruction(
            &instr(
                3,
                T0,
                vec![Operation::Deactivate {
                    shard: "tunnel@1".parse().unwrap(),
                }],
            ),
            T0,
        );
        assert_eq!(stops(&d), vec!["vpn".to_string()]);
        assert!(last_persist(&d).profile.is_empty());
    }

    #[test]
    fn boot_restores_valid_leases_and_drops_expired_ones() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![
                    Operation::Activate(activation("tunnel@1", "vpn", T0 + 10_000)),
                    Operation::Activate(activation("shaper@1", "qos", T0 + 3_000)),
                ],
            ),
            T0,
        );
        let saved = last_persist(&a);
        // Reboot at T0 + 5 s, offline: qos ran out meanwhile, vpn is restored.
        let (mut m2, actions) = CapabilityManager::restore(
            me(),
            AcceptancePolicy::default(),
            Some(saved),
            KeySet::of(0, &[&alloc_key()]),
            T0 + 5_000,
        );
        assert!(matches!(actions[0], Action::Persist(_)));
        assert_eq!(starts(&actions), vec![("vpn".to_string(), 1)]);
        assert_eq!(m2.applied_seq(), 1);
        let st = m2.report_statuses(vec![], T0);
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].shard.to_string(), "shaper@1");
    }

    #[test]
    fn rejections_are_counted_and_only_authenticated_ones_are_acked() {
        let mut m = boot(T0);
        m.on_instruction(
            &instr(
                5,
                T0,
                vec![Operation::Activate(activation(
                    "tunnel@1",
                    "vpn",
                    T0 + 60_000,
                ))],
            ),
            T0,
        );
        let forged = {
            let k = KeyPair::from_seed(&[66; 32]);
            seal(
                Domain::Instruction,
                &Instruction {
                    device: me(),
                    seq: 6,
                    issued_at_ms: T0,
                    expires_at_ms: T0 + 1000,
                    ops: vec![],
                },
                &[&k],
            )
        };
        let wrong_device = seal(
            Domain::Instruction,
            &Instruction {
                device: DeviceId::new("other").unwrap(),
                seq: 7,
                issued_at_ms: T0,
                expires_at_ms: T0 + 1000,
                ops: vec![],
            },
            &[&alloc_key()],
        );
        let expired = seal(
            Domain::Instruction,
            &Instruction {
                device: me(),
                seq: 8,
                issued_at_ms: T0 - 5000,
                expires_at_ms: T0 - 1,
                ops: vec![],
            },
            &[&alloc_key()],
        );
        let replayed_older = instr(3, T0, vec![]);
        for (bytes, reason, acked) in [
            (forged, RejectReason::UnknownKey, false),
            (wrong_device, RejectReason::WrongDevice, false),
            (expired, RejectReason::Expired, true),
            (replayed_older, RejectReason::Rollback, true),
            (b"garbage".to_vec(), RejectReason::Malformed, false),
        ] {
            let a = m.on_instruction(&bytes, T0 + 10);
            if acked {
                assert_eq!(a.len(), 1, "{a:?}");
                assert!(matches!(
                    &a[0],
                    Action::Ack { outcome: AckOutcome::Rejected(r), .. } if *r == reason
                ));
            } else {
                assert!(a.is_empty(), "{reason:?} costs no write: {a:?}");
            }
        }
        assert_eq!(m.acks_withheld(), 3);
        let c = m.rejections();
        assert_eq!(
            (
                c.unknown_key,
                c.wrong_device,
                c.expired,
                c.rollback,
                c.malformed
            ),
            (1, 1, 1, 1, 1)
        );
        assert_eq!(m.applied_seq(), 5);
        assert_eq!(m.profile().count(), 1);
    }

    #[test]
    fn a_rotation_is_persisted_and_old_keys_stop_working() {
        let mut m = boot(T0);
        let new_key = KeyPair::from_seed(&[2; 32]);
        let rot = seal(
            Domain::Rotation,
            &KeyRotation {
                new_set: KeySet::of(1, &[&new_key]),
                issued_at_ms: T0,
            },
            &[&alloc_key(), &new_key],
        );
        let a = m.on_instruction(&rot, T0);
        assert_eq!(last_persist(&a).acceptance.keys.epoch, 1);
        let old = m.on_instruction(&instr(1, T0, vec![]), T0);
        assert!(old.is_empty(), "unknown key: counted, not acked");
        assert_eq!(m.rejections().unknown_key, 1);
        // A reboot with the old pinned key in the config keeps the rotated set.
        let (m2, _) = CapabilityManager::restore(
            me(),
            AcceptancePolicy::default(),
            Some(last_persist(&a)),
            KeySet::of(0, &[&alloc_key()]),
            T0,
        );
        assert_eq!(m2.acceptance().keys.epoch, 1);
    }

    #[test]
    fn refusal_acks_of_a_replay_flood_are_rate_limited() {
        let mut m = boot(T0);
        m.on_instruction(&instr(5, T0, vec![]), T0);
        let replay = instr(3, T0, vec![]);
        let acks = |a: Vec<Action>| a.iter().filter(|a| matches!(a, Action::Ack { .. })).count();
        let burst: usize = (0..1000)
            .map(|_| acks(m.on_instruction(&replay, T0 + 1)))
            .sum();
        assert_eq!(burst, ACK_BURST as usize);
        assert_eq!(m.rejections().rollback, 1000, "every one is counted");
        assert_eq!(m.acks_withheld(), 1000 - u64::from(ACK_BURST));
        // One second later the bucket has refilled by ACK_PER_S.
        let later: usize = (0..100)
            .map(|_| acks(m.on_instruction(&replay, T0 + 1001)))
            .sum();
        assert_eq!(later, ACK_PER_S as usize);
        // A genuine new instruction is always acked.
        let a = m.on_instruction(&instr(6, T0 + 1001, vec![]), T0 + 1001);
        assert_eq!(acks(a), 1);
    }

    #[test]
    fn report_sequence_survives_restarts_and_reserves_in_blocks() {
        let mut m = boot(T0);
        let (s1, a1) = m.next_report_seq();
        assert_eq!(s1, 1);
        let saved = last_persist(&a1);
        assert!(saved.report_seq_reserved >= 1);
        let (s2, a2) = m.next_report_seq();
        assert_eq!(s2, 2);
        assert!(a2.is_empty(), "inside the reserved block");
        // Crash now; the restarted agent continues above everything used.
        let (mut m2, _) = CapabilityManager::restore(
            me(),
            AcceptancePolicy::default(),
            Some(saved),
            KeySet::of(0, &[&alloc_key()]),
            T0,
        );
        let (s3, a3) = m2.next_report_seq();
        assert!(s3 > s2);
        assert!(!a3.is_empty());
    }

    #[test]
    fn an_activation_with_a_lease_already_over_is_not_started() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![Operation::Activate(activation("tunnel@1", "vpn", T0 - 1))],
            ),
            T0,
        );
        assert!(starts(&a).is_empty());
        assert_eq!(m.report_statuses(vec![], T0)[0].state, ShardState::Expired);
        // Still reported a while later, gone after the retention.
        assert_eq!(m.report_statuses(vec![], T0 + 1_000).len(), 1);
        assert!(m.report_statuses(vec![], T0 + EXPIRED_REPORT_MS).is_empty());
    }

    fn variant(shard: &str, sealed: &[u8], kbps: u64) -> ShardVariant {
        ShardVariant {
            shard: shard.parse().unwrap(),
            sha256: [7; 32],
            config: b"mode = x\n".to_vec(),
            sealed_config: sealed.to_vec(),
            limits: ResourceLimits {
                cpu_quota_permille: 200,
                cpu_weight: 100,
                memory_max_bytes: 32 << 20,
                nice: 5,
            },
            bandwidth_kbps: kbps,
        }
    }

    fn shard_activation(lease: u64) -> ShardActivation {
        ShardActivation {
            primary: variant("crypto-aes256gcm@0.1.0", b"SEALED-BYTES", 0),
            alternatives: vec![variant("crypto-chacha20poly1305@0.1.0", b"", 2_000)],
            capability: "vpn".into(),
            kind: ShardKind::Compute,
            priority: 3,
            lease_expires_at_ms: lease,
        }
    }

    #[test]
    fn a_shard_activation_reaches_the_runtime_with_its_alternatives_and_stays_sealed() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![Operation::ActivateShard(shard_activation(T0 + 10_000))],
            ),
            T0,
        );
        let started: Vec<&ShardActivation> = a
            .iter()
            .filter_map(|a| match a {
                Action::Start { shards, .. } => Some(shards.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(started, vec![&shard_activation(T0 + 10_000)]);
        let saved = last_persist(&a);
        assert_eq!(saved.format, STATE_FORMAT);
        assert_eq!(saved.profile, vec![shard_activation(T0 + 10_000)]);
        // On disk the secret is the sealed box, byte for byte.
        let json = serde_json::to_string(&saved).unwrap();
        let back = PersistedState::from_json(json.as_bytes()).unwrap();
        assert_eq!(back, (saved.clone(), false));

        // Offline reboot from the last-known-good profile: the runtime gets
        // the alternatives again, so it can fail over without the cloud.
        let (mut m2, actions) = CapabilityManager::restore(
            me(),
            AcceptancePolicy::default(),
            Some(saved),
            KeySet::of(0, &[&alloc_key()]),
            T0 + 1_000,
        );
        assert!(actions.iter().any(|a| matches!(a,
            Action::Start { shards, .. } if shards[0].alternatives.len() == 1)));
        // The alternative running in the primary's place carries the
        // activation's lease in the report.
        let running_alt = ShardStatus {
            shard: "crypto-chacha20poly1305@0.1.0".parse().unwrap(),
            ..expired_status(&shard_activation(0))
        };
        let st = m2.report_statuses(vec![running_alt], T0 + 1_000);
        assert_eq!(st[0].lease_expires_at_ms, T0 + 10_000);
        // Deactivating by the alternative the device reported stops it too.
        let d = m2.on_instruction(
            &instr(
                2,
                T0 + 1_000,
                vec![Operation::Deactivate {
                    shard: "crypto-chacha20poly1305@0.1.0".parse().unwrap(),
                }],
            ),
            T0 + 1_000,
        );
        assert_eq!(stops(&d), vec!["vpn".to_string()]);
    }

    #[test]
    fn a_format_1_state_is_migrated_and_garbage_is_an_error_not_a_panic() {
        let mut m = boot(T0);
        let a = m.on_instruction(
            &instr(
                1,
                T0,
                vec![Operation::Activate(activation(
                    "tunnel@1",
                    "vpn",
                    T0 + 10_000,
                ))],
            ),
            T0,
        );
        let saved = last_persist(&a);
        // What format 1 wrote: the same state with a profile of Activations.
        let v1 = serde_json::json!({
            "format": 1,
            "acceptance": saved.acceptance,
            "profile": [activation("tunnel@1", "vpn", T0 + 10_000)],
            "report_seq_reserved": saved.report_seq_reserved,
        });
        let (migrated, was_old) =
            PersistedState::from_json(v1.to_string().as_bytes()).expect("migrates");
        assert!(was_old);
        assert_eq!(migrated, saved, "format 1 means exactly the same profile");
        for bad in [
            &b"{}"[..],
            b"{\"format\": 9}",
            b"{\"format\": 1, \"profile\": 3}",
            b"\xff\xfe",
            b"",
        ] {
            assert!(PersistedState::from_json(bad).is_err(), "{bad:?}");
        }
    }
}
