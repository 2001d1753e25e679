//! Counters and gauges of the service, rendered in the Prometheus text format
//! on `GET /metrics`.
//!
//! Counters are atomics bumped where things happen (ingest, dispatch, store);
//! fleet gauges (reputation distribution, units per tier) are a snapshot the
//! core refreshes on every tick, so a scrape never waits on the core.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::Garbage,
        Drop::Oversize,
        Drop::UnknownDevice,
        Drop::BadSignature,
        Drop::WrongDevice,
        Drop::Duplicate,
        Drop::Stale,
        Drop::UnknownTopic,
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
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Report, Kind::Ack, Kind::Status, Kind::Enroll];
    fn as_str(self) -> &'static str {
        match self {
            Kind::Report => "report",
            Kind::Ack => "ack",
            Kind::Status => "status",
            Kind::Enroll => "enroll",
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
}

/// All counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reports_received: AtomicU64,
    pub reports_accepted: AtomicU64,
    pub acks_accepted: AtomicU64,
    pub statuses: AtomicU64,
    dropped: [[AtomicU64; 8]; 4],
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
    pub publish_errors: AtomicU64,
    pub mqtt_reconnects: AtomicU64,
    pub gauges: Mutex<Gauges>,
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

    pub fn set_gauges(&self, g: Gauges) {
        if let Ok(mut slot) = self.gauges.lock() {
            *slot = g;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "shardline_reports_received_total",
            "Report messages received.",
            get(&self.reports_received),
        );
        counter(
            "shardline_reports_accepted_total",
            "Reports verified, in sequence and handed to the policy engine.",
            get(&self.reports_accepted),
        );
        counter(
            "shardline_acks_accepted_total",
            "Signed instruction acks accepted.",
            get(&self.acks_accepted),
        );
        counter(
            "shardline_status_messages_total",
            "Device status messages received.",
            get(&self.statuses),
        );
        counter(
            "shardline_decisions_total",
            "Instructions the policy engine decided.",
            get(&self.decisions),
        );
        counter(
            "shardline_instructions_sent_total",
            "Signed instructions published (first send).",
            get(&self.instructions_sent),
        );
        counter(
            "shardline_instructions_resent_total",
            "Instructions published again because they were not known applied.",
            get(&self.instructions_resent),
        );
        counter(
            "shardline_instructions_applied_total",
            "Instructions the device acked as applied.",
            get(&self.instructions_applied),
        );
        counter(
            "shardline_instructions_rejected_total",
            "Instructions the device rejected.",
            get(&self.instructions_rejected),
        );
        counter(
            "shardline_instructions_failed_total",
            "Instructions accepted but failed on the device.",
            get(&self.instructions_failed),
        );
        counter(
            "shardline_instructions_expired_total",
            "Pending instructions dropped because they expired.",
            get(&self.instructions_expired),
        );
        counter(
            "shardline_compliance_events_total",
            "Compliance events fed to reputation.",
            get(&self.compliance_events),
        );
        counter(
            "shardline_reputation_changes_total",
            "Reputation changes announced by the engine.",
            get(&self.reputation_changes),
        );
        counter(
            "shardline_alerts_total",
            "Alerts raised by the engine.",
            get(&self.alerts),
        );
        counter(
            "shardline_enrolments_total",
            "Devices enrolled (operator or token).",
            get(&self.enrolments),
        );
        counter(
            "shardline_rotations_sent_total",
            "Key rotation objects published to devices.",
            get(&self.rotations_sent),
        );
        counter(
            "shardline_store_commits_total",
            "Store transactions committed.",
            get(&self.store_commits),
        );
        counter(
            "shardline_store_errors_total",
            "Store transactions that failed.",
            get(&self.store_errors),
        );
        counter(
            "shardline_store_conflicts_total",
            "Commits refused because another allocator instance wrote one of their devices first (shared store).",
            get(&self.store_conflicts),
        );
        counter(
            "shardline_store_reloads_total",
            "Device records reloaded after another allocator instance changed them (shared store).",
            get(&self.store_reloads),
        );
        counter(
            "shardline_signatures_checked_total",
            "Device signatures checked by the verifier threads.",
            get(&self.signatures_checked),
        );
        counter(
            "shardline_signature_batches_total",
            "Batches those signatures were checked in (checked / batches = mean batch size).",
            get(&self.signature_batches),
        );
        counter(
            "shardline_publish_errors_total",
            "MQTT publishes that could not be queued.",
            get(&self.publish_errors),
        );
        counter(
            "shardline_mqtt_reconnects_total",
            "MQTT connection (re)establishments.",
            get(&self.mqtt_reconnects),
        );
        counter(
            "shardline_core_batches_total",
            "Batches the core handled (one store commit each at most).",
            get(&self.core_batches),
        );

        let _ = writeln!(out, "# HELP shardline_store_commit_seconds_total Time spent committing to the store.\n# TYPE shardline_store_commit_seconds_total counter\nshardline_store_commit_seconds_total {:.6}", get(&self.store_commit_micros) as f64 / 1e6);
        let _ = writeln!(out, "# HELP shardline_core_handle_seconds_total Time the core spent handling messages (verify excluded).\n# TYPE shardline_core_handle_seconds_total counter\nshardline_core_handle_seconds_total {:.6}", get(&self.core_handle_micros) as f64 / 1e6);
        let _ = writeln!(out, "# HELP shardline_core_publish_seconds_total Time the core spent queueing publishes.\n# TYPE shardline_core_publish_seconds_total counter\nshardline_core_publish_seconds_total {:.6}", get(&self.core_publish_micros) as f64 / 1e6);
        let _ = writeln!(out, "# HELP shardline_messages_dropped_total Inbound messages dropped, by kind and reason.\n# TYPE shardline_messages_dropped_total counter");
        for kind in Kind::ALL {
            for why in Drop::ALL {
                let v = self.dropped_count(kind, why);
                let _ = writeln!(
                    out,
                    "shardline_messages_dropped_total{{kind=\"{}\",reason=\"{}\"}} {v}",
                    kind.as_str(),
                    why.as_str()
                );
            }
        }
        let g = self.gauges.lock().map(|g| g.clone()).unwrap_or_default();
        let _ = writeln!(out, "# HELP shardline_devices Enrolled devices.\n# TYPE shardline_devices gauge\nshardline_devices {}", g.devices);
        let _ = writeln!(out, "# HELP shardline_pending_instructions Instructions sent and not yet known applied.\n# TYPE shardline_pending_instructions gauge\nshardline_pending_instructions {}", g.pending_instructions);
        let _ = writeln!(out, "# HELP shardline_reports_per_second Reports accepted per second over the last tick interval.\n# TYPE shardline_reports_per_second gauge\nshardline_reports_per_second {:.1}", g.reports_per_second);
        let _ = writeln!(out, "# HELP shardline_key_epoch Instruction-signing key rotation epoch.\n# TYPE shardline_key_epoch gauge\nshardline_key_epoch {}", g.key_epoch);
        let _ = writeln!(out, "# HELP shardline_reputation_devices Devices per reputation bucket (le = upper bound).\n# TYPE shardline_reputation_devices gauge");
        for (i, n) in g.reputation_buckets.iter().enumerate() {
            let _ = writeln!(
                out,
                "shardline_reputation_devices{{le=\"{}\"}} {n}",
                (i + 1) * 10
            );
        }
        let _ = writeln!(out, "# HELP shardline_tier_units Resource units per tier, by kind and use.\n# TYPE shardline_tier_units gauge");
        for (tier, devices, cu, du, cb, db) in &g.tiers {
            let _ = writeln!(out, "shardline_tier_devices{{tier=\"{tier}\"}} {devices}");
            let _ = writeln!(
                out,
                "shardline_tier_units{{tier=\"{tier}\",kind=\"compute\",what=\"used\"}} {cu}"
            );
            let _ = writeln!(
                out,
                "shardline_tier_units{{tier=\"{tier}\",kind=\"data\",what=\"used\"}} {du}"
            );
            let _ = writeln!(
                out,
                "shardline_tier_units{{tier=\"{tier}\",kind=\"compute\",what=\"budget\"}} {cb}"
            );
            let _ = writeln!(
                out,
                "shardline_tier_units{{tier=\"{tier}\",kind=\"data\",what=\"budget\"}} {db}"
            );
        }
        out
    }
}
