//! The message types. Every type here is a wire type: its postcard encoding is
//! pinned by a golden-bytes test in `tests/golden.rs`, so a field added,
//! removed or reordered fails a test instead of silently breaking old peers.
//!
//! Evolution rule: enums may gain variants *at the end* (postcard encodes the
//! variant index as a varint, so old variants keep their bytes); structs change
//! only with a new [`crate::FORMAT_VERSION`].
//!
//! Times are milliseconds since the Unix epoch (`*_ms`), durations are
//! milliseconds unless the name says otherwise.

use crate::ids::{DeviceId, KeyId, ShardRef};
use serde::{Deserialize, Serialize};

/// A traffic class the agent recognises. `Other` is traffic no rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TrafficClass {
    Gaming,
    Calls,
    Streaming,
    Interactive,
    Bulk,
    Web,
    Dns,
    Sensitive,
    Other,
}

impl TrafficClass {
    pub const ALL: [TrafficClass; 9] = [
        TrafficClass::Gaming,
        TrafficClass::Calls,
        TrafficClass::Streaming,
        TrafficClass::Interactive,
        TrafficClass::Bulk,
        TrafficClass::Web,
        TrafficClass::Dns,
        TrafficClass::Sensitive,
        TrafficClass::Other,
    ];

    /// Lower-case name used in configuration files, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficClass::Gaming => "gaming",
            TrafficClass::Calls => "calls",
            TrafficClass::Streaming => "streaming",
            TrafficClass::Interactive => "interactive",
            TrafficClass::Bulk => "bulk",
            TrafficClass::Web => "web",
            TrafficClass::Dns => "dns",
            TrafficClass::Sensitive => "sensitive",
            TrafficClass::Other => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for TrafficClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a traffic class needs from the device, derived from its measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QosNeed {
    pub latency_sensitive: bool,
    pub bandwidth_heavy: bool,
    pub needs_encryption: bool,
}

/// One traffic class over one QoS window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    pub class: TrafficClass,
    /// IP bytes (headers included) in the window, both directions.
    pub bytes: u64,
    pub packets: u64,
    /// Average rate over the window, bits per second.
    pub rate_bps: u64,
    /// Round-trip time percentiles in microseconds, `None` when unmeasured.
    pub rtt_p50_us: Option<u32>,
    pub rtt_p95_us: Option<u32>,
    /// RFC 3550 style inter-arrival jitter, microseconds.
    pub jitter_us: Option<u32>,
    /// Loss signals (retransmissions, out-of-order) per thousand packets.
    pub loss_permille: u16,
    pub active_flows: u32,
    pub need: QosNeed,
}

/// What the device has and uses, so the allocator fits shards to its capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceResources {
    pub cpu_cores: u16,
    /// Whole-device CPU load, per mille of all cores.
    pub cpu_load_permille: u16,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// The CPU has AES instructions: AES-GCM is the faster crypto shard.
    pub aes_hw: bool,
    /// Target architecture of the agent binary (`x86_64`, `aarch64`, `arm`).
    pub arch: String,
}

/// Lifecycle state of a shard on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShardState {
    Starting,
    Running,
    /// Restarting after a failure, waiting out its backoff.
    Backoff,
    Stopped,
    /// Failed too often; the agent will not restart it until told again.
    Quarantined,
    /// Its lease ran out and the agent stopped it.
    Expired,
}

/// How the agent enforces a shard host's resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Enforcement {
    /// cgroup v2 `cpu.max` / `memory.max` plus rlimits.
    CgroupV2,
    /// cgroup v1 `cpu` / `memory` controllers plus rlimits.
    CgroupV1,
    /// rlimits and niceness only (no delegated cgroup).
    RlimitsOnly,
}

/// Why a shard host failed, as the agent observed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardFailure {
    /// The host process died from a signal (e.g. SIGSEGV = 11).
    Crashed { signal: i32 },
    /// The host exited with a non-zero code.
    Exited { code: i32 },
    /// Heartbeats stopped arriving.
    Hung,
    /// Killed for exceeding its memory or CPU limit.
    OverLimit,
    /// The library could not be verified or loaded; nothing was run.
    LoadRefused { reason: String },
    /// The library loaded but its `init` refused the configuration it was
    /// given (a missing or malformed key): an operator fault, not the
    /// device's. Added at the end: the variants before it keep their bytes.
    InitFailed { reason: String },
}

/// One shard's status as reported with every QoS window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: ShardRef,
    pub capability: String,
    pub state: ShardState,
    /// CPU use of its host, per mille of one core.
    pub cpu_permille: u32,
    pub rss_kib: u64,
    pub restarts: u32,
    pub errors: u32,
    pub last_failure: Option<ShardFailure>,
    pub lease_expires_at_ms: u64,
    pub enforcement: Enforcement,
}

/// Counters of instructions the device refused, by reason, since it started.
/// The allocator turns these into compliance signals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionCounters {
    pub bad_signature: u64,
    pub unknown_key: u64,
    pub wrong_device: u64,
    pub rollback: u64,
    pub equivocation: u64,
    pub expired: u64,
    pub from_future: u64,
    pub clock_behind_floor: u64,
    pub malformed: u64,
}

/// A device's periodic report: QoS per class, resources, shard status. Sent
/// signed (see [`crate::sign::Domain::Report`]) on `dev/{device}/report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QosReport {
    pub device: DeviceId,
    /// Per-device report sequence, strictly increasing, persisted by the agent:
    /// the allocator drops duplicates and stale reports by it.
    pub seq: u64,
    pub window_start_ms: u64,
    pub window_ms: u32,
    pub classes: Vec<ClassStats>,
    pub resources: DeviceResources,
    pub shards: Vec<ShardStatus>,
    /// Sequence number of the last instruction the device applied.
    pub applied_instruction_seq: u64,
    pub rejections: RejectionCounters,
    /// Seed 002 (issue 17): harm to the device's own QoS and its consent as
    /// a lender. Added last: a report from an agent that predates it ends
    /// right before it, and [`decode_report`] reads it as empty.
    pub lending: LendingReport,
}

/// Most harm observations one report may carry (one per traffic class is
/// all an agent makes); the allocator reads no more than these.
pub const MAX_HARM_OBSERVATIONS: usize = 8;

/// What a device says about lending its units (seed 002's good-neighbour
/// report and consent), inside its signed [`QosReport`].
///
/// The device does not name a neighbour: it cannot know who borrows its
/// units (borrowing is the allocator's bookkeeping; nothing of it runs on
/// the lender). It says only that a class of its own traffic got worse
/// than its own baseline; the allocator, which knows whether the device
/// was lending during that window and to whom, attributes the harm.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LendingReport {
    /// At most [`MAX_HARM_OBSERVATIONS`] are read.
    pub harm: Vec<HarmObservation>,
    /// `None`: the device lends whatever the allocator finds spare.
    pub consent: Option<LendConsent>,
}

/// A traffic class whose loss or RTT in this report's window is worse than
/// the device's own baseline (learnt from its earlier, unharmed windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HarmObservation {
    pub class: TrafficClass,
    pub baseline_loss_permille: u16,
    pub loss_permille: u16,
    pub baseline_rtt_p95_us: Option<u32>,
    pub rtt_p95_us: Option<u32>,
}

/// How much and when the device consents to lend (its owner's policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LendConsent {
    /// Most units lent at once, per kind.
    pub max_compute_units: u16,
    pub max_data_units: u16,
    /// Lends only from this UTC hour (inclusive) to that one (exclusive),
    /// wrapping past midnight; equal hours mean all day.
    pub from_hour_utc: u8,
    pub to_hour_utc: u8,
}

impl LendConsent {
    /// Whether the device lends at `now_ms` (Unix milliseconds).
    pub fn open_at(&self, now_ms: u64) -> bool {
        let (from, to) = (
            u64::from(self.from_hour_utc % 24),
            u64::from(self.to_hour_utc % 24),
        );
        let hour = (now_ms / 3_600_000) % 24;
        match from.cmp(&to) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => (from..to).contains(&hour),
            std::cmp::Ordering::Greater => hour >= from || hour < to,
        }
    }
}

/// The encoding of an empty [`LendingReport`]: what a report of an agent
/// that predates the field lacks at its end.
pub const REPORT_LEGACY_TAIL: &[u8] = &[0, 0];

/// Decodes a framed [`QosReport`], this layout or the one before
/// [`QosReport::lending`] (read as empty). The two cannot be confused: an
/// old report always ends two bytes short of the new layout.
pub fn decode_report(bytes: &[u8]) -> Result<QosReport, crate::codec::DecodeError> {
    crate::codec::decode_or_padded(bytes, crate::codec::MAX_PAYLOAD, REPORT_LEGACY_TAIL)
}

/// Why a device rejected an instruction (also carried in acks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// Not decodable: bad framing, oversize, trailing bytes, unknown version.
    Malformed,
    /// No signature, or a signature that does not verify (including a
    /// signature made for another kind of object).
    BadSignature,
    /// Signed by a key the device does not have pinned.
    UnknownKey,
    /// Addressed to another device.
    WrongDevice,
    /// Sequence number below the last applied one.
    Rollback,
    /// Same sequence number as the last applied one, different content.
    Equivocation,
    /// Its `expires_at` has passed.
    Expired,
    /// Issued further in the future than the allowed clock skew.
    FromFuture,
    /// The device clock is behind its persisted time floor.
    ClockBehindFloor,
    /// An activation's resource limits are outside the ranges a shard host
    /// can run under (`accept::LIMIT_RANGES`): an operator fault in the
    /// catalog or the signer, not device misbehaviour. Added at the end: the
    /// variants before it keep their wire bytes.
    LimitsOutOfRange,
}

/// The outcome of one instruction on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    Applied,
    /// A redelivery of the instruction already applied; nothing was done again.
    Duplicate,
    Rejected(RejectReason),
    /// Accepted but an operation failed to take effect (e.g. a shard would not load).
    Failed {
        reason: String,
    },
}

/// Sent signed on `dev/{device}/ack` after every instruction the device sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionAck {
    pub device: DeviceId,
    /// The instruction's sequence number, or 0 when it could not be decoded.
    pub instruction_seq: u64,
    pub outcome: AckOutcome,
    pub at_ms: u64,
}

/// Online state published retained on `dev/{device}/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    Online,
    Offline,
}

/// Retained device status. The MQTT last will carries the `Offline` variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: DeviceId,
    pub presence: Presence,
    pub applied_instruction_seq: u64,
    pub agent_version: String,
    pub at_ms: u64,
}

/// Resource limits a shard host runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// CPU quota in per mille of one core (`cpu.max` = quota/period); 1000 = one full core.
    pub cpu_quota_permille: u32,
    /// Relative CPU share among shard hosts (`cpu.weight`, 1–10000).
    pub cpu_weight: u16,
    /// Memory cap in bytes (`memory.max`, `RLIMIT_AS` as fallback).
    pub memory_max_bytes: u64,
    /// Niceness the host process runs at (-20..=19).
    pub nice: i8,
}

/// Whether a shard spends compute or carries data; budgeted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ShardKind {
    Compute,
    Data,
}

impl ShardKind {
    /// Lower-case name used in configuration, JSON, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardKind::Compute => "compute",
            ShardKind::Data => "data",
        }
    }
}

/// Start (or update) one shard under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub shard: ShardRef,
    /// Capability the shard belongs to (e.g. `vpn`); one host process per capability.
    pub capability: String,
    pub kind: ShardKind,
    /// SHA-256 of the shared library; the agent refuses any other file.
    pub sha256: [u8; 32],
    /// Opaque configuration handed to the shard's `init`.
    pub config: Vec<u8>,
    pub limits: ResourceLimits,
    pub priority: u8,
    /// The shard stops at this time unless a later instruction renews it.
    pub lease_expires_at_ms: u64,
}

/// Most alternatives one [`ShardActivation`] may carry; the catalog never
/// needs more, and the cap keeps a hostile instruction from making the agent
/// walk a long list.
pub const MAX_ALTERNATIVES: usize = 4;

/// One runnable variant of a shard for this device: the library (with the
/// digest for the device's architecture), its configuration and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardVariant {
    pub shard: ShardRef,
    /// SHA-256 of the shared library built for the device's architecture.
    pub sha256: [u8; 32],
    /// Configuration in clear (`key = value` lines): nothing secret.
    pub config: Vec<u8>,
    /// Secret configuration (`key = value` lines) sealed to the device with
    /// [`crate::seal`]; empty when the shard has no secret. The agent opens
    /// it with its device key and appends it to `config`.
    pub sealed_config: Vec<u8>,
    pub limits: ResourceLimits,
    /// Bandwidth the catalog declares for the shard, kbit/s; the device
    /// enforces it. 0 = none declared (no cap).
    pub bandwidth_kbps: u64,
}

/// Start (or update) one shard under a lease, with the alternatives the
/// device may fail over to on its own, in order, when the shard cannot run
/// (it reports what it did in its next report). Supersedes [`Activation`],
/// which stays decodable so an old instruction is still understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardActivation {
    pub primary: ShardVariant,
    /// At most [`MAX_ALTERNATIVES`]; same capability and kind as the primary.
    pub alternatives: Vec<ShardVariant>,
    /// Capability the shard belongs to (e.g. `vpn`).
    pub capability: String,
    pub kind: ShardKind,
    pub priority: u8,
    /// The shard (or the alternative running in its place) stops at this
    /// time unless a later instruction renews it.
    pub lease_expires_at_ms: u64,
}

impl ShardActivation {
    /// The primary first, then the alternatives in order.
    pub fn variants(&self) -> impl Iterator<Item = &ShardVariant> {
        std::iter::once(&self.primary).chain(self.alternatives.iter())
    }
}

/// One change to a device's running profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    Activate(Activation),
    Deactivate {
        shard: ShardRef,
    },
    /// Added at the end, so the variants before it keep their bytes.
    ActivateShard(ShardActivation),
    /// An operator asks for the device's recent log lines and status
    /// (issue 20): answered with a signed [`crate::diag::Diagnostics`] on
    /// `dev/{device}/diag`, at most `max_lines` lines. Added at the end.
    RequestDiagnostics {
        max_lines: u16,
    },
}

/// A signed instruction's content (signed under [`crate::sign::Domain::Instruction`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instruction {
    pub device: DeviceId,
    /// Per-device sequence, strictly increasing.
    pub seq: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub ops: Vec<Operation>,
}

/// One public key of a key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyEntry {
    pub key_id: KeyId,
    pub public_key: [u8; 32],
}

/// The set of keys a device trusts for instructions, with its epoch (how many
/// rotations led to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    pub epoch: u64,
    pub keys: Vec<PublicKeyEntry>,
}

/// Replaces the trusted key set. Must be signed by a key of the current set
/// *and* a key of the new one (signed under [`crate::sign::Domain::Rotation`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    /// Must be the current epoch + 1: rotations apply in order, once.
    pub new_set: KeySet,
    pub issued_at_ms: u64,
}

/// Longest bootstrap token an [`EnrollRequest`] may carry, in bytes. The
/// allocator issues 64 hex digits; the cap leaves room for other issuers
/// while keeping the request far below [`MAX_ENROLL_BYTES`].
pub const MAX_ENROLL_TOKEN_LEN: usize = 256;

/// Size cap of a sealed enrolment request (envelope included). Checked before
/// anything is decoded: the topic is open to any client that can connect,
/// so it gets a cap of its own instead of the report-sized default.
pub const MAX_ENROLL_BYTES: usize = 1024;

/// A device's request to enrol itself with an operator-issued bootstrap
/// token, published (QoS 1) on `dev/{device}/enroll`, sealed under
/// [`crate::sign::Domain::Enroll`] and signed by the very key it enrols (see
/// [`crate::sign::seal_enroll`] / [`crate::sign::open_enroll`]): the token
/// is the operator's consent, the signature proves the device holds the
/// private half of `public_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub device: DeviceId,
    /// The device's Ed25519 public key: it signs the device's reports and acks.
    pub public_key: [u8; 32],
    /// The bootstrap token as issued (the allocator stores only its hash).
    pub token: String,
}

#[cfg(test)]
mod lending_tests {
    use super::LendConsent;

    /// One row per case of the consent window: (from, to, hour, open).
    #[test]
    fn consent_window_table() {
        let rows = [
            (0, 0, 13, true),   // equal hours: all day
            (8, 18, 7, false),  // before the window
            (8, 18, 8, true),   // from is inclusive
            (8, 18, 18, false), // to is exclusive
            (22, 6, 23, true),  // wraps past midnight
            (22, 6, 3, true),
            (22, 6, 12, false),
            (30, 30, 5, true), // out of range hours fold into 0-23
        ];
        for (from, to, hour, open) in rows {
            let c = LendConsent {
                max_compute_units: 1,
                max_data_units: 1,
                from_hour_utc: from,
                to_hour_utc: to,
            };
            let now = 5 * 86_400_000 + hour * 3_600_000 + 59_999;
            assert_eq!(c.open_at(now), open, "from {from} to {to} at {hour}h");
        }
    }
}
