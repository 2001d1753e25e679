//! The service's counters and fleet gauges: plain atomics bumped where things
//! happen (ingest, dispatch, store) and a gauge snapshot the core refreshes on
//! every tick. Exporting them (the Prometheus text on `GET /metrics`) is the
//! service crate's job; nothing here does I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Why an inbound message was dropped (one counter each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a parseable signed envelope, or an undecodable status.
    Garbage,
    /// Larger than the payload cap; not even parsed.
    Oversize,
    /// From a device id that is not enrolled.
    UnknownDevice,
    /// The signature did not verify under the enrolled device key.
    BadSignature,
    /// Signed by the device but naming another device.
    WrongDevice,
    /// A report sequence equal to the last accepted one (redelivery).
    Duplicate,
    /// A report sequence below the last accepted one (replay).
    Stale,
    /// A topic this service does not handle.
    UnknownTopic,
    /// An ack refusing an instruction this service never sent (a forgery
    /// someone else published on the device's instruction topic).
    NotOurs,
}

impl Drop {
    pub const ALL: [Drop; 9] = [
        Drop::Garbage,
        Drop::Oversize,
        Drop::UnknownDevice,
        Drop::BadSignature,
        Drop::WrongDevice,
        Drop::Duplicate,
        Drop::Stale,
        Drop::UnknownTopic,
        Drop::NotOurs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Garbage => "garbage",
            Drop::Oversize => "oversize",
            Drop::UnknownDevice => "unknown_device",
            Drop::BadSignature => "bad_signature",
            Drop::WrongDevice => "wrong_device",
            Drop::Duplicate => "duplicate",
            Drop::Stale => "stale",
            Drop::UnknownTopic => "unknown_topic",
            Drop::NotOurs => "not_ours",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// The message kinds drops are counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Report,
    Ack,
    Status,
    Enroll,
    /// An explicit request of a device's application.
    Request,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Report,
        Kind::Ack,
        Kind::Status,
        Kind::Enroll,
        Kind::Request,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Report => "report",
            Kind::Ack => "ack",
            Kind::Status => "status",
            Kind::Enroll => "enroll",
            Kind::Request => "request",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Fleet gauges, refreshed by the core.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub devices: u64,
    pub pending_instructions: u64,
    /// Devices per reputation bucket [0,10), [10,20) … [90,100].
    pub reputation_buckets: [u64; 10],
    /// Tier ⇒ (devices, compute units used, data units used, compute budget, data budget).
    pub tiers: Vec<(String, u64, u64, u64, u64, u64)>,
    pub reports_per_second: f64,
    pub key_epoch: u64,
    /// (shard, arch) of every catalog entry marked failing.
    pub catalog_failing: Vec<(String, String)>,
    /// (shard, arch, start failures seen): operator faults, never charged.
    pub start_failures: Vec<(String, String, u64)>,
    /// Devices flagged as probably cloned (two agents, one identity).
    pub duplicate_devices: u64,
}

/// All counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reports_received: AtomicU64,
    pub reports_accepted: AtomicU64,
    pub acks_accepted: AtomicU64,
    pub statuses: AtomicU64,
    dropped: [[AtomicU64; 9]; 5],
    pub decisions: AtomicU64,
    pub instructions_sent: AtomicU64,
    pub instructions_resent: AtomicU64,
    pub instructions_applied: AtomicU64,
    pub instructions_rejected: AtomicU64,
    pub instructions_failed: AtomicU64,
    pub instructions_expired: AtomicU64,
    pub compliance_events: AtomicU64,
    pub reputation_changes: AtomicU64,
    pub alerts: AtomicU64,
    /// Catalog entries marked failing (per architecture), since start.
    pub catalog_entries_failed: AtomicU64,
    /// Devices newly flagged as probable duplicates, since start.
    pub duplicate_flags: AtomicU64,
    pub enrolments: AtomicU64,
    pub rotations_sent: AtomicU64,
    pub store_commits: AtomicU64,
    pub store_commit_micros: AtomicU64,
    /// Time the core spent handling messages (engine, signing), and publishing.
    pub core_handle_micros: AtomicU64,
    pub core_publish_micros: AtomicU64,
    pub core_batches: AtomicU64,
    pub store_errors: AtomicU64,
    /// Commits refused because another instance wrote a device first.
    pub store_conflicts: AtomicU64,
    /// Device records reloaded because another instance changed them.
    pub store_reloads: AtomicU64,
    /// Signature checks run by the verifier threads, and in how many batches.
    pub signatures_checked: AtomicU64,
    pub signature_batches: AtomicU64,
    /// Overload (the core's inbox of verified messages): reports dropped
    /// for a newer verified report of the same device, reports shed at the
    /// inbox's memory bound, messages waiting, and when the oldest waiting
    /// one was queued (ms since the epoch; 0 = none).
    pub reports_conflated: AtomicU64,
    pub reports_shed: AtomicU64,
    pub inbox_depth: AtomicU64,
    pub inbox_oldest_at_ms: AtomicU64,
    pub publish_errors: AtomicU64,
    /// Explicit requests: received (before verification), and answers by
    /// what they say.
    pub requests_received: AtomicU64,
    pub requests_granted: AtomicU64,
    pub requests_queued: AtomicU64,
    pub requests_released: AtomicU64,
    pub requests_renewed: AtomicU64,
    pub requests_standing: AtomicU64,
    /// Refusals by [`REFUSAL_REASONS`] index (rate-limited ones included).
    requests_refused: [AtomicU64; 8],
    /// Operator changes of an instance's reputation.
    pub instance_adjustments: AtomicU64,
    pub mqtt_reconnects: AtomicU64,
    pub gauges: Mutex<Gauges>,
    /// Catalog and tier reloads applied, and refused (nothing changed).
    pub catalog_reloads: AtomicU64,
    pub catalog_reloads_refused: AtomicU64,
    /// Rollouts started, promoted or rolled back.
    pub rollout_changes: AtomicU64,
    /// Diagnostics answers of devices stored, and refused (bad signature,
    /// too large, unknown device, not asked for).
    pub diagnostics_received: AtomicU64,
    pub diagnostics_refused: AtomicU64,
    /// Reads the overload stages in front of the core when `/metrics` is
    /// scraped (set once at start by the service; see [`Overload`]).
    pub overload: OnceLock<Box<dyn OverloadProbe>>,
}

/// What waits in front of the core at one moment: the pre-verification
/// stage (`preverify::UnverifiedQueue`, all verifier threads together)
/// and, with the embedded broker, its ingest gate. Read on demand (a
/// scrape), never kept up to date on the hot path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overload {
    /// Reports and acks waiting for their signature check.
    pub stage_reports: u64,
    pub stage_acks: u64,
    /// Their payload bytes.
    pub stage_report_bytes: u64,
    pub stage_ack_bytes: u64,
    /// The embedded broker's ingest gate (`None` with an external broker).
    pub gate: Option<GateState>,
}

/// The embedded broker's ingest gate (the service's `ingest_gate.rs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateState {
    /// Bytes the MQTT link is behind the front.
    pub behind_bytes: u64,
    /// Device connections waiting for room now.
    pub waiting: u64,
    /// Seconds device connections were held, summed over ended waits.
    pub held_seconds: f64,
    /// Times the gate was opened after nothing came out of the link.
    pub stall_reopens: u64,
    /// Groups whose routed uplinks it counts.
    pub groups: u64,
}

/// Reads [`Overload`] (implemented by the service, which owns the stages).
pub trait OverloadProbe: Send + Sync + std::fmt::Debug {
    fn read(&self) -> Overload;
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        add(c, 1);
    }

    pub fn dropped(&self, kind: Kind, why: Drop) {
        add(&self.dropped[kind.index()][why.index()], 1);
    }

    pub fn dropped_count(&self, kind: Kind, why: Drop) -> u64 {
        self.dropped[kind.index()][why.index()].load(Ordering::Relaxed)
    }

    pub fn refused(&self, reason: &shardline_shared::request::RequestRefusal) {
        add(&self.requests_refused[reason.index()], 1);
    }

    /// Refused requests by reason, in [`REFUSAL_REASONS`] order.
    pub fn refused_counts(&self) -> [u64; 8] {
        std::array::from_fn(|i| self.requests_refused[i].load(Ordering::Relaxed))
    }

    /// The overload stages now (all zero before a probe is set).
    pub fn overload(&self) -> Overload {
        self.overload.get().map(|p| p.read()).unwrap_or_default()
    }

    pub fn set_gauges(&self, g: Gauges) {
        if let Ok(mut slot) = self.gauges.lock() {
            *slot = g;
        }
    }
}

/// Label values of refused explicit requests, by reason.
pub const REFUSAL_REASONS: [&str; 8] = shardline_shared::request::RequestRefusal::REASONS;
