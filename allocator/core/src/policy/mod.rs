//! The policy engine: sans-IO and deterministic (same events + same clock ⇒
//! same actions). No I/O, no wall clock: `now` is an argument.
//!
//! The service feeds [`Event`]s into [`Engine::handle`] and carries out the
//! returned [`Action`]s (it assigns instruction sequence numbers, signs and
//! sends). Per-device state is a plain serde value ([`DeviceState`]) so the
//! service can persist it and any allocator instance can serve any device
//! ([`Engine::device_state`] / [`Engine::restore_device`]).
//!
//! Submodules: [`catalog`] (catalog + tiers as TOML data), `plan` (needs ⇒
//! capabilities ⇒ shards under budget and capacity), [`reputation`],
//! [`forecast`] (Holt-Winters with a daily season), `engine` (leases,
//! borrowing, shifting, event handling), [`lending`] (seed 002's loan
//! record, good-neighbour reports, consent and offers), [`prng`],
//! [`simulate`].

pub mod bench_load;
pub mod catalog;
mod engine;
pub mod faults;
pub mod feedback;
pub mod forecast;
pub mod lending;
pub mod market;
mod plan;
pub mod prng;
pub mod reputation;
pub mod requests;
pub mod rollout;
pub mod simulate;

pub use catalog::{Agreements, Catalog, CatalogError, Tier};

pub use engine::{rollout_views, Engine, EntryChange, ReloadError, ReloadSummary, RolloutView};
pub use faults::{
    CatalogHealth, CloneWatch, DuplicateFlag, FailingEntry, FaultConfig, StartFailure, Tombstone,
};
pub use requests::{AppRequests, InstanceSummary, InstanceView, RequestConfig, ScoreChange};
pub use rollout::{RolloutConfig, Rollouts};

use serde::{Deserialize, Serialize};
use shardline_shared::ids::{DeviceId, InstanceRef, ShardRef};
use shardline_shared::msg::{
    AckOutcome, DeviceResources, Operation, QosNeed, QosReport, ResourceLimits, ShardKind,
    TrafficClass,
};
use shardline_shared::request::{AppRequest, RequestAnswer, RequestOp};
use std::collections::{BTreeMap, BTreeSet};

// ------------------------------------------------------------------ events

/// Something the engine must react to. `now_ms` is passed beside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A device joined (or changed tier). `tenant` overrides the tier's tenant.
    Enrolled {
        device: DeviceId,
        tier: String,
        tenant: Option<String>,
    },
    /// Removes a device and everything it holds (its leases and loans end).
    Unenrolled {
        device: DeviceId,
    },
    /// A QoS report whose signature the service has already verified.
    Report(QosReport),
    /// Optional: the service tells which sequence number it gave the last
    /// `Instruct` for this device, so acks can be matched exactly.
    Sent {
        device: DeviceId,
        seq: u64,
    },
    /// The device's acknowledgement of an instruction.
    Ack {
        device: DeviceId,
        seq: u64,
        outcome: AckOutcome,
    },
    /// A compliance signal the service observed (e.g. a report whose signature
    /// did not verify).
    ComplianceEvent {
        device: DeviceId,
        kind: ComplianceKind,
    },
    /// Time passed: leases expire and renew, loans return, predictions
    /// pre-activate, the rebalancer runs. Handles every device in memory.
    Tick,
    /// Operator: keep this shard (by id) active on the device whatever the demand.
    Pin {
        device: DeviceId,
        shard: String,
    },
    Unpin {
        device: DeviceId,
        shard: String,
    },
    /// Operator: end the shard's lease now and never grant it to the device
    /// until `Unrevoke` (the plan falls back to its alternative).
    Revoke {
        device: DeviceId,
        shard: String,
    },
    Unrevoke {
        device: DeviceId,
        shard: String,
    },
    /// Operator: deactivate everything on the device and grant nothing until `Resume`.
    Drain {
        device: DeviceId,
    },
    Resume {
        device: DeviceId,
    },
    /// A verified report whose sequence number is at or below the last
    /// accepted one (the service dropped it as a redelivery or replay). The
    /// engine only looks at it for signs of two agents sharing one identity
    /// ([`faults`]); it never moves reputation by itself.
    StaleReport(QosReport),
    /// A device enrolled again after an unenrolment: its reputation is
    /// restored from the tombstone, never better than a fresh one's (see
    /// [`faults::Tombstone`]). Sent right after its `Enrolled`.
    Readmitted {
        device: DeviceId,
        prior: ReputationState,
    },
    /// Operator: forget the failing marks and start failures of a catalog
    /// shard (every architecture, every device) and try it again.
    RetryCatalogEntry {
        shard: String,
    },
    /// Operator: the device's per-device shard configuration changed (the
    /// whole of it); the device is re-planned, so a capability refused for
    /// a missing key is granted and a changed value is re-sent.
    DeviceConfig {
        device: DeviceId,
        config: DeviceConfigView,
        /// Shards whose configuration (clear or secret values) changed: their
        /// running activation is re-sent with the new values. The engine
        /// cannot see secret values, so the service says which changed.
        changed: BTreeSet<String>,
    },
    /// An explicit request an application instance made through its
    /// device's agent, whose device signature the service has verified
    /// (see [`requests`]). At or below the device's last accepted request
    /// sequence it is dropped without an answer.
    AppRequest {
        request: AppRequest,
    },
    /// An operator or service acting for an instance (`POST
    /// /v1/shard/request`): decided like the instance's own request, with
    /// no sequence check and no rate limit; answered with `request_seq` 0.
    ServiceRequest {
        instance: InstanceRef,
        op: RequestOp,
    },
    /// Operator: an audited change of an instance's explicit-request
    /// reputation (recorded in its history with the reason).
    AdjustInstanceReputation {
        instance: InstanceRef,
        change: ScoreChange,
        reason: String,
        actor: String,
    },
    /// An operator event (pin, revoke, drain, …) made by a named operator:
    /// the engine's explanations name them ("vpn pinned by alice").
    ByOperator {
        actor: String,
        event: Box<Event>,
    },
}

/// Compliance signals (all lower reputation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComplianceKind {
    /// A report from the device failed signature verification.
    BadReportSignature,
    /// The device rejected an instruction as tampered (bad signature).
    TamperedInstruction,
    /// The device ran a shard outside its profile.
    ShardOutsideProfile,
    /// A replayed or out-of-order report.
    ReplayedReport,
}

impl ComplianceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComplianceKind::BadReportSignature => "bad_report_signature",
            ComplianceKind::TamperedInstruction => "tampered_instruction",
            ComplianceKind::ShardOutsideProfile => "shard_outside_profile",
            ComplianceKind::ReplayedReport => "replayed_report",
        }
    }
}

// ----------------------------------------------------------------- actions

/// What the service must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Sign and send these operations to the device (the service assigns the
    /// sequence number). Deactivations come before activations.
    Instruct {
        device: DeviceId,
        ops: Vec<Operation>,
        expires_at_ms: u64,
    },
    ReputationChanged {
        device: DeviceId,
        old: f64,
        new: f64,
        reason: String,
    },
    Alert {
        device: DeviceId,
        message: String,
    },
    /// A catalog entry was marked failing on one architecture: start
    /// failures from `devices` distinct devices. An operator fault, for the
    /// operator (warn log, metric); no device's reputation moved.
    CatalogEntryFailing {
        shard: String,
        arch: String,
        reason: String,
        devices: u32,
    },
    /// Two agents probably share this device's identity (see [`faults`]).
    DuplicateSuspected {
        device: DeviceId,
        reason: String,
    },
    /// Sign and send this answer to the device's answer topic.
    Answer(RequestAnswer),
    /// An operator changed an instance's reputation (for the audit log).
    InstanceReputationAdjusted {
        instance: InstanceRef,
        old: f64,
        new: f64,
        reason: String,
        actor: String,
    },
    /// A staged rollout started, was promoted or rolled back
    /// (`phase` `canary` / `promoted` / `rolled_back`); the reason in
    /// words and numbers.
    Rollout {
        shard: String,
        phase: String,
        reason: String,
    },
}

// ------------------------------------------------------------------ config

/// Which parts of the policy run. `static` = tier-only (every allowed
/// capability, no demand), `reactive` = demand-driven only, `full` = all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Features {
    /// Allocate from reported QoS needs; off = every allowed capability, always.
    pub demand_driven: bool,
    pub prediction: bool,
    pub borrowing: bool,
    pub shifting: bool,
    /// Seed 002's credit market (see [`market`]).
    pub market: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self::FULL
    }
}

impl Features {
    pub const STATIC: Features = Features {
        demand_driven: false,
        prediction: false,
        borrowing: false,
        shifting: false,
        market: false,
    };
    pub const REACTIVE: Features = Features {
        demand_driven: true,
        prediction: false,
        borrowing: false,
        shifting: false,
        market: false,
    };
    pub const FULL: Features = Features {
        demand_driven: true,
        prediction: true,
        borrowing: true,
        shifting: true,
        market: false,
    };
    /// Everything, with the credit market.
    pub const MARKET: Features = Features {
        market: true,
        ..Features::FULL
    };
}

/// Reputation parameters. Deltas are points on the 0–100 scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReputationConfig {
    pub initial: f64,
    /// The score decays toward `initial` with this half-life.
    pub half_life_ms: u64,
    pub over_limit: f64,
    pub crash: f64,
    /// Per report whose shard error rate is above `error_rate_per_min`.
    pub errors: f64,
    pub error_rate_per_min: f64,
    pub bad_report_signature: f64,
    pub tampered_instruction: f64,
    pub shard_outside_profile: f64,
    pub replayed_report: f64,
    /// A lease that ended (expired or released) without any failure.
    pub clean_lease: f64,
    /// Healthy operation, per hour of healthy report windows.
    pub healthy_per_hour: f64,
    /// Piecewise-linear (reputation, factor) points: quota of the tier's
    /// compute budget.
    pub quota_curve: Vec<(f64, f64)>,
    /// The same for the data budget (seed 000's differential throttling):
    /// data shards are throttled before compute shards, so a device
    /// slipping below good standing loses bandwidth-heavy work first and
    /// keeps its compute (crypto, auth) a little longer.
    pub data_quota_curve: Vec<(f64, f64)>,
    /// Per report in which a capability's traffic exceeded
    /// `network_over_factor` × the bandwidth its shards declare (the
    /// device let more through than it was granted: network I/O in the
    /// score).
    pub network_over_limit: f64,
    pub network_over_factor: f64,
    /// Per grant an application on the device released as `Completed`
    /// (completed work, a positive signal), at most
    /// `completed_work_per_hour` points an hour.
    pub completed_work: f64,
    pub completed_work_per_hour: f64,
    /// Piecewise-linear (reputation, factor) points: lease length as a fraction of the tier cap.
    pub lease_curve: Vec<(f64, f64)>,
    /// Entries kept in the per-device history.
    pub history_len: usize,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        Self {
            initial: 50.0,
            half_life_ms: 6 * 3_600_000,
            over_limit: -8.0,
            crash: -5.0,
            errors: -2.0,
            error_rate_per_min: 10.0,
            bad_report_signature: -10.0,
            tampered_instruction: -10.0,
            shard_outside_profile: -15.0,
            replayed_report: -2.0,
            clean_lease: 1.0,
            healthy_per_hour: 2.0,
            quota_curve: vec![(0.0, 0.0), (20.0, 0.25), (45.0, 1.0), (100.0, 1.0)],
            // Full data quota needs 46 (compute: 45), and below that the
            // data factor is always the smaller. The start (50) minus the
            // most neighbours' reports can take in one window (4,
            // `LendingConfig::per_borrower_cap`) keeps both.
            data_quota_curve: vec![(0.0, 0.0), (25.0, 0.1), (46.0, 1.0), (100.0, 1.0)],
            network_over_limit: -3.0,
            network_over_factor: 2.0,
            completed_work: 0.25,
            completed_work_per_hour: 2.0,
            lease_curve: vec![(0.0, 0.1), (50.0, 0.5), (100.0, 1.0)],
            history_len: 8,
        }
    }
}

/// Lease, hysteresis, prediction, borrowing and shifting parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Seeds the engine's only randomness (renewal jitter).
    pub seed: u64,
    pub features: Features,
    pub reputation: ReputationConfig,
    /// Signed instructions expire this long after issue.
    pub instruction_ttl_ms: u64,
    /// An unacknowledged instruction is re-planned against the observed profile after this.
    pub ack_timeout_ms: u64,
    pub min_lease_ms: u64,
    /// Renew when less than max(lease/3, this) is left.
    pub renew_margin_ms: u64,
    /// A capability stays demanded this long after its need was last seen (anti-flap).
    pub hysteresis_ms: u64,
    /// Fraction of the device's free CPU and memory shards may take.
    pub capacity_headroom: f64,
    /// A shard re-activated within this window after its deactivation counts as a flap.
    pub flap_window_ms: u64,
    /// A shard the device quarantined is avoided (alternative first) this long.
    pub quarantine_avoid_ms: u64,
    /// A class counts as active above this rate.
    pub active_rate_bps: u64,
    /// Grace after a deactivation before a still-running shard is "outside its profile".
    pub outside_profile_grace_ms: u64,
    pub forecast: forecast::ForecastConfig,
    /// When a forecast is worth acting on (see [`feedback`]).
    pub prediction: feedback::PredictionConfig,
    /// Operator faults and duplicate identities (see [`faults`]).
    pub faults: FaultConfig,
    /// Pre-activate when the upper bound crosses a need threshold this far ahead.
    pub prediction_horizon_ms: u64,
    /// Floor of the need threshold for predictions: the interval of a class
    /// that is off at night still spans a few tens of kbit/s (its
    /// on/off edges dominate the error variance), which must not read as demand.
    pub prediction_min_rate_bps: u64,
    pub borrow_min_reputation: f64,
    pub borrow_ms: u64,
    pub max_borrow_units: u32,
    pub shift_interval_ms: u64,
    /// Units moved per rebalancer run, whole fleet.
    pub shift_limit_per_tick: u32,
    pub stabilization_ms: u64,
    pub shift_min_reputation: f64,
    pub shift_ms: u64,
    /// Roll back when the recipient's QoS score (0–1000) fell by more than this.
    pub rollback_margin: f64,
    /// Roll back when the recipient's p95 RTT rose by more than this
    /// fraction and at least `rollback_latency_min_ms` (gaming and calls
    /// suffer in latency, not loss).
    pub rollback_latency_ratio: f64,
    pub rollback_latency_min_ms: f64,
    /// The same for jitter.
    pub rollback_jitter_ratio: f64,
    pub rollback_jitter_min_ms: f64,
    /// QoS points ([`feedback::QosSnapshot::gain_over`]) a shift is
    /// expected to bring before any shift to the device was judged; after,
    /// the gain observed after its shifts (the feedback loop).
    pub shift_gain_prior: f64,
    /// Explicit requests of application instances (see [`requests`]).
    pub requests: RequestConfig,
    /// Seed 002's credit market (see [`market`]); runs with `features.market`.
    pub market: market::MarketConfig,
    /// Seed 002: borrowing behaviour, returns, good-neighbour reports,
    /// consent and offers (see [`lending`]).
    pub lending: lending::LendingConfig,
    /// Staged rollouts of changed catalog entries (see [`rollout`]).
    pub rollout: rollout::RolloutConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            features: Features::FULL,
            reputation: ReputationConfig::default(),
            instruction_ttl_ms: 120_000,
            ack_timeout_ms: 60_000,
            min_lease_ms: 120_000,
            renew_margin_ms: 60_000,
            hysteresis_ms: 15 * 60_000,
            capacity_headroom: 0.8,
            flap_window_ms: 30 * 60_000,
            quarantine_avoid_ms: 30 * 60_000,
            active_rate_bps: 8_000,
            outside_profile_grace_ms: 180_000,
            forecast: forecast::ForecastConfig::default(),
            prediction: feedback::PredictionConfig::default(),
            faults: FaultConfig::default(),
            prediction_horizon_ms: 30 * 60_000,
            prediction_min_rate_bps: 64_000,
            // Equal to the starting reputation: a device nobody has
            // penalised may borrow from its tenant's pool at once; any
            // penalty takes it below (issue 15: 55 was above the start,
            // so no fresh fleet could borrow).
            borrow_min_reputation: 50.0,
            borrow_ms: 30 * 60_000,
            max_borrow_units: 4,
            shift_interval_ms: 5 * 60_000,
            shift_limit_per_tick: 16,
            stabilization_ms: 15 * 60_000,
            shift_min_reputation: 50.0,
            shift_ms: 60 * 60_000,
            rollback_margin: 20.0,
            rollback_latency_ratio: 0.2,
            rollback_latency_min_ms: 5.0,
            rollback_jitter_ratio: 0.25,
            rollback_jitter_min_ms: 2.0,
            shift_gain_prior: 50.0,
            requests: RequestConfig::default(),
            market: market::MarketConfig::default(),
            lending: lending::LendingConfig::default(),
            rollout: rollout::RolloutConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Values the engine cannot work with, as (field, what is wrong): a zero
    /// instruction lifetime would make every instruction expire on arrival,
    /// a zero interval would spin.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("instruction_ttl_ms", self.instruction_ttl_ms),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("min_lease_ms", self.min_lease_ms),
            ("shift_interval_ms", self.shift_interval_ms),
            ("borrow_ms", self.borrow_ms),
            ("shift_ms", self.shift_ms),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be > 0".into()));
            }
        }
        if !(self.capacity_headroom > 0.0 && self.capacity_headroom <= 1.0) {
            return Err((
                "capacity_headroom",
                format!("must be in (0, 1], found {}", self.capacity_headroom),
            ));
        }
        let r = &self.reputation;
        if !(0.0..=100.0).contains(&r.initial) {
            return Err(("initial", format!("must be 0-100, found {}", r.initial)));
        }
        if r.half_life_ms == 0 {
            return Err(("half_life_ms", "must be > 0".into()));
        }
        self.market.check()?;
        self.lending.check()?;
        self.rollout.check()?;
        self.requests.check()
    }
}

// ------------------------------------------------------------ device state

/// One granted lease (an active shard) as the engine believes the device runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub shard: ShardRef,
    pub capability: String,
    pub kind: ShardKind,
    pub units: u32,
    pub priority: u8,
    pub limits: ResourceLimits,
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
    /// No failure, over-limit use or error burst was seen during the lease.
    pub clean: bool,
    /// Last restart/error counters the device reported for it.
    pub restarts_seen: u32,
    pub errors_seen: u32,
    /// Reports that showed it running without a new restart since its
    /// grant: a failure counts as a runtime failure (and may be charged)
    /// only once it ran fine here (see [`faults::classify`]).
    #[serde(default)]
    pub healthy_reports: u32,
}

/// Units lent from one device to another, for a bounded time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub from: DeviceId,
    pub to: DeviceId,
    pub kind: ShardKind,
    pub units: u32,
    pub since_ms: u64,
    pub expires_at_ms: u64,
    pub origin: TransferOrigin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferOrigin {
    Borrow,
    /// Moved by the rebalancer; `qos_before` is the recipient's QoS score
    /// (0–1000) then; `evaluated` once the stabilization period has been judged.
    Shift {
        qos_before: u32,
        evaluated: bool,
    },
    /// Bought in the credit market at `price_milli` per unit (see [`market`]).
    Market {
        price_milli: u64,
    },
}

/// One reputation change, for the operator's view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReputationEntry {
    pub at_ms: u64,
    pub old: f64,
    pub new: f64,
    pub reason: String,
}

/// A device's reputation with its recent history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReputationState {
    pub score: f64,
    pub updated_ms: u64,
    /// Last score announced through `Action::ReputationChanged`.
    pub announced: f64,
    pub history: Vec<ReputationEntry>,
    /// Reason of the latest change not yet announced.
    pub last_reason: String,
    /// A penalty was applied since the last announcement.
    pub penalized: bool,
}

/// Per-class summary of the last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    pub class: TrafficClass,
    pub rate_bps: u64,
    pub rtt_p95_us: Option<u32>,
    pub loss_permille: u16,
    pub need: QosNeed,
}

/// The last QoS report, condensed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QosSummary {
    pub at_ms: u64,
    pub seq: u64,
    pub classes: Vec<ClassSummary>,
    /// 0–1000, higher is better: 1000 − byte-weighted loss of classes with a need.
    pub qos_score: f64,
    pub running_shards: Vec<ShardRef>,
    /// CPU (per mille of one core) and memory our shards used.
    pub shard_cpu_permille: u64,
    pub shard_rss_kib: u64,
}

/// Why a demanded capability is not (fully) granted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The tier does not allow the capability.
    NotAllowed,
    /// Over the device's budget (tier × reputation quota ± loans) for this kind.
    Budget { kind: ShardKind, missing_units: u32 },
    /// Over the device's reported free CPU or memory. CPU in per mille of
    /// one core, memory in KiB; `other_load_permille` is the load of
    /// software other than our shards, per mille of the whole device.
    Capacity {
        cpu_needed_permille: u64,
        cpu_free_permille: u64,
        memory_needed_kib: u64,
        memory_free_kib: u64,
        other_load_permille: u64,
    },
    /// Every option of a member shard is revoked or avoided.
    Unavailable { shard: String },
    /// The device is drained by the operator.
    Drained,
    /// The shard failed to start on this device (an operator fault: its
    /// config, limits or digest); it is avoided here until `until_ms`.
    StartFailed {
        shard: String,
        reason: String,
        until_ms: u64,
    },
    /// The catalog entry is marked failing for the device's architecture.
    CatalogFailing {
        shard: String,
        arch: String,
        reason: String,
    },
    /// Over budget, and borrowing the missing units was refused.
    BorrowRefused {
        reason: BorrowRefusal,
        kind: ShardKind,
        missing_units: u32,
    },
    /// The catalog has no build of this shard for the device's architecture
    /// (nor does any alternative).
    NoBuild { shard: String, arch: String },
    /// The device lacks a per-device configuration key the shard requires
    /// (`device_config`, or `secret_config` when `secret`).
    MissingDeviceConfig {
        shard: String,
        key: String,
        secret: bool,
    },
}

impl Refusal {
    /// The units of one kind a capability lacks, when that is why it was
    /// refused (over budget, borrowing refused or not): what borrowing,
    /// shifting and the market can supply.
    pub fn shortfall(&self) -> Option<(ShardKind, u32)> {
        match self {
            Refusal::Budget {
                kind,
                missing_units,
            }
            | Refusal::BorrowRefused {
                kind,
                missing_units,
                ..
            } => Some((*kind, *missing_units)),
            _ => None,
        }
    }
}

/// One shard's per-device configuration as the engine sees it: the clear
/// keys with their values (they go into the activation) and only the
/// *names* of the secret keys (the values stay in the service record and
/// are sealed to the device at its edge; the engine never holds them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfigView {
    pub clear: BTreeMap<String, String>,
    pub secret_keys: BTreeSet<String>,
}

/// Shard id ⇒ that shard's per-device configuration.
pub type DeviceConfigView = BTreeMap<String, ShardConfigView>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BorrowRefusal {
    Disabled,
    TierForbids,
    NoTenant,
    LowReputation,
    NoLender,
    AtLimit,
    /// Seed 002: more loans this hour than `lending.max_borrows_per_hour`.
    /// Added at the end, like the next one: stored refusals keep their bytes.
    TooFrequent,
    /// Peers had the units spare, but their consent policies do not lend them now.
    NoConsent,
}

/// Everything the engine keeps about one device (serde: persist it as is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub tier: String,
    pub tenant: Option<String>,
    pub enrolled_at_ms: u64,
    pub reputation: ReputationState,
    /// Shard id ⇒ lease, as instructed.
    pub leases: BTreeMap<String, Lease>,
    /// Capability ⇒ last time a need (seen or predicted) demanded it.
    pub demand: BTreeMap<String, u64>,
    /// Capability ⇒ until when the prediction holds it.
    pub predicted: BTreeMap<String, u64>,
    pub forecasts: Vec<forecast::ClassForecast>,
    pub resources: Option<DeviceResources>,
    pub last_report: Option<QosSummary>,
    pub last_report_seq: u64,
    pub rejections_seen: u64,
    pub borrowed: Vec<Transfer>,
    pub lent: Vec<Transfer>,
    pub pinned: BTreeSet<String>,
    pub revoked: BTreeSet<String>,
    /// Shard id ⇒ avoided until (quarantined by the device).
    pub avoid_until: BTreeMap<String, u64>,
    pub drained: bool,
    /// An instruction is in flight since this time (and its seq, once known).
    pub pending_since_ms: Option<u64>,
    pub pending_seq: Option<u64>,
    /// Shard id ⇒ when its lease last ended and whether by an explicit
    /// deactivation (flap detection) rather than expiry (outside-profile grace).
    pub ended_at: BTreeMap<String, (u64, bool)>,
    pub flaps: u64,
    /// Units the last plan used plus the units it lacked, per kind (compute, data).
    pub need_units: [u32; 2],
    pub refusals: BTreeMap<String, Refusal>,
    /// The rebalancer leaves the device alone until then.
    pub stabilize_until_ms: u64,
    pub rollbacks: u64,
    /// The next time a tick has something to do for this device (a renewal,
    /// an expiry, a hysteresis window closing, a forecast slot); ticks skip
    /// it until then. 0 = at the next tick.
    #[serde(default)]
    pub wake_at_ms: u64,
    /// Shard id ⇒ its latest start failure on this device (operator
    /// faults: avoided with a backoff, never charged).
    #[serde(default)]
    pub start_failures: BTreeMap<String, StartFailure>,
    /// Signs of two agents sharing this device's identity.
    #[serde(default)]
    pub clone_watch: CloneWatch,
    /// Explicit requests: instances, grants, queue. State written before
    /// it existed decodes through [`decode_device_state`], which supplies
    /// it empty.
    #[serde(default)]
    pub apps: AppRequests,
    /// Seed 002's loan record: how the device borrows and returns, what
    /// its loans did to its lenders, the good-neighbour reports about it,
    /// its consent policy as a lender (see [`lending`]).
    #[serde(default)]
    pub lending: lending::LendingState,
    /// Seed 002's credits: earned by lending units, spent in the per-tick
    /// market (see [`market`]).
    #[serde(default)]
    pub credits: market::CreditAccount,
    /// What the engine learned about its own decisions on this device:
    /// forecast error (prediction off where it does not pay) and the QoS
    /// gain shifts brought (see [`feedback`]). The last three fields were
    /// added together (issue 17); new fields go after them.
    #[serde(default)]
    pub feedback: feedback::FeedbackState,
}

/// Decodes a persisted [`DeviceState`] (postcard). Postcard is not
/// self-describing: state written by an older release ends early, so the
/// empty values of the fields it lacks are appended and it is decoded
/// again — an upgrade keeps every device's reputation. Two older layouts
/// exist: before [`DeviceState::apps`] (issue 18) and before the three
/// fields of issue 17 (`lending`, `credits`, `feedback`).
pub fn decode_device_state(bytes: &[u8]) -> Result<DeviceState, postcard::Error> {
    let first = match postcard::from_bytes(bytes) {
        Ok(st) => return Ok(st),
        Err(e) => e,
    };
    let issue17 = [
        postcard::to_stdvec(&lending::LendingState::default())?,
        postcard::to_stdvec(&market::CreditAccount::default())?,
        postcard::to_stdvec(&feedback::FeedbackState::default())?,
    ]
    .concat();
    let apps = postcard::to_stdvec(&AppRequests::default())?;
    // Issue 20 appended `FeedbackState::operator_marks` (the last field).
    let issue20 = postcard::to_stdvec(&BTreeMap::<String, String>::new())?;
    for tail in [issue20, issue17.clone(), [apps, issue17].concat()] {
        let padded = [bytes, &tail].concat();
        if let Ok(st) = postcard::from_bytes(&padded) {
            return Ok(st);
        }
    }
    Err(first)
}

// ----------------------------------------------------------------- queries

/// One row of the device list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub device: DeviceId,
    pub tier: String,
    pub tenant: Option<String>,
    pub reputation: f64,
    pub compute_units: u32,
    pub data_units: u32,
    pub active_shards: usize,
    pub last_report_ms: Option<u64>,
    pub drained: bool,
}

/// One device in full, for the operator API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device: DeviceId,
    pub tier: String,
    pub tenant: Option<String>,
    pub reputation: f64,
    pub reputation_history: Vec<ReputationEntry>,
    /// Effective budget now (tier × quota ± loans), per kind.
    pub budget_compute_units: u32,
    pub budget_data_units: u32,
    pub leases: Vec<Lease>,
    pub borrowed: Vec<Transfer>,
    pub lent: Vec<Transfer>,
    pub pinned: Vec<String>,
    pub revoked: Vec<String>,
    pub drained: bool,
    pub refusals: BTreeMap<String, Refusal>,
    /// Capability ⇒ why it is refused, in words (see [`Refusal::explain`]).
    pub refusal_reasons: BTreeMap<String, String>,
    /// Shards that failed to start here (avoided for a while, not charged).
    pub start_failures: BTreeMap<String, StartFailure>,
    /// Set while two agents probably share this device's identity.
    pub duplicate: Option<DuplicateFlag>,
    pub last_qos: Option<QosSummary>,
    pub flaps: u64,
    /// The architecture the device's signed reports give (`None` before
    /// the first): which builds of a shard it can be sent.
    #[serde(default)]
    pub arch: Option<String>,
    /// Application instances with explicit-request state on the device.
    #[serde(default)]
    pub app_instances: Vec<InstanceSummary>,
    /// The engine's latest decisions on the device, each explained.
    #[serde(default)]
    pub decisions: Vec<feedback::Decision>,
    /// Per traffic class: how prediction fares here.
    #[serde(default)]
    pub prediction: Vec<PredictionView>,
    /// Recent shifts toward the device with the QoS before and after.
    #[serde(default)]
    pub shifts: Vec<feedback::ShiftRecord>,
    /// QoS points its judged shifts brought (EWMA).
    #[serde(default)]
    pub shift_gain: Option<f64>,
    /// The device's credits and its latest market events (see [`market`]).
    #[serde(default)]
    pub credits: market::CreditAccount,
    /// Seed 002's loan record: borrowing and returns, harm reports made
    /// and received, consent, offers, and the decisions in words.
    #[serde(default)]
    pub lending: lending::LendingState,
}

/// How prediction fares on one traffic class of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionView {
    pub class: TrafficClass,
    /// Pre-activations judged since enrolment, and those demand followed.
    pub preactivations: u64,
    pub hits: u64,
    /// Prediction is off for the class until then (it did not pay).
    pub off_until_ms: Option<u64>,
    /// Mean absolute one-step error, kbit/s, of each model.
    pub seasonal_mae_kbps: f32,
    pub short_term_mae_kbps: f32,
}

/// Units in use per tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierUsage {
    pub devices: u64,
    pub compute_units_used: u64,
    pub data_units_used: u64,
    /// Sum of the tier budgets of its devices (before reputation quota).
    pub compute_units_budget: u64,
    pub data_units_budget: u64,
}

/// Why an engine call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
}

fn kind_index(kind: ShardKind) -> usize {
    match kind {
        ShardKind::Compute => 0,
        ShardKind::Data => 1,
    }
}

const KINDS: [ShardKind; 2] = [ShardKind::Compute, ShardKind::Data];
