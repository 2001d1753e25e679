//! A device's history as the operator reads it afterwards: QoS per traffic
//! class summarised per window, every instruction with what became of it,
//! every announced reputation change and every engine decision, each with
//! its reason. The service core produces [`HistoryEntry`]s into the store
//! [`crate::records::Batch`] they belong with; the stores keep them for a
//! configured retention, bounded per device ([`HistoryLimits`]).
//!
//! Pure data and the QoS window accumulator; no I/O, no clock.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{AckOutcome, ClassStats, Operation, TrafficClass};
use std::collections::BTreeMap;

/// One thing that happened to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub device: DeviceId,
    pub at_ms: u64,
    pub event: HistoryEvent,
}

/// What happened. Grows only at the end: entries are stored encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HistoryEvent {
    /// One traffic class over one history window (several reports).
    Qos(QosWindow),
    /// An instruction sent, or what became of it.
    Instruction {
        seq: u64,
        /// Each operation in words ("activate vpn-tunnel@1.2.0 …").
        ops: Vec<String>,
        status: InstructionStatus,
        /// Why it was not applied, when it was not.
        reason: Option<String>,
    },
    /// An announced reputation change.
    Reputation { from: f64, to: f64, reason: String },
    /// An engine decision (grant, refusal, release, loan …) in words.
    Decision {
        /// `grant`, `refuse`, `release`, … (the engine's `DecisionKind`).
        decision: String,
        capability: String,
        reason: String,
    },
}

/// What became of an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstructionStatus {
    Sent,
    Applied,
    Rejected,
    Failed,
    Expired,
}

impl InstructionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }
}

/// The kinds, as the API names them (`?kind=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryKind {
    Qos,
    Instruction,
    Reputation,
    Decision,
}

impl HistoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qos => "qos",
            Self::Instruction => "instruction",
            Self::Reputation => "reputation",
            Self::Decision => "decision",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "qos" => Self::Qos,
            "instruction" => Self::Instruction,
            "reputation" => Self::Reputation,
            "decision" => Self::Decision,
            _ => return None,
        })
    }
}

impl HistoryEvent {
    pub fn kind(&self) -> HistoryKind {
        match self {
            Self::Qos(_) => HistoryKind::Qos,
            Self::Instruction { .. } => HistoryKind::Instruction,
            Self::Reputation { .. } => HistoryKind::Reputation,
            Self::Decision { .. } => HistoryKind::Decision,
        }
    }
}

/// Which entries of one device to read, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub kind: Option<HistoryKind>,
    /// Only entries at or after this time.
    pub since_ms: u64,
    /// Only entries before this time (paging backwards).
    pub before_ms: Option<u64>,
    pub limit: usize,
}

/// Most entries one read returns.
pub const MAX_HISTORY_READ: usize = 5_000;

impl HistoryQuery {
    pub fn matches(&self, e: &HistoryEntry) -> bool {
        e.at_ms >= self.since_ms
            && self.before_ms.is_none_or(|b| e.at_ms < b)
            && self.kind.is_none_or(|k| e.event.kind() == k)
    }
}

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Entries older than this are pruned.
    pub retention_ms: u64,
    /// At most this many entries per device (the oldest go first).
    pub max_per_device: usize,
    /// QoS is summarised over windows this long.
    pub qos_window_ms: u64,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            retention_ms: 7 * 24 * 3_600_000,
            max_per_device: 4_000,
            qos_window_ms: 300_000,
        }
    }
}

/// One traffic class over one window: the sum of what the device's reports
/// said, RTT and jitter as the worst (p95, jitter) and the mean (p50) of
/// the reports that measured them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QosWindow {
    pub class: TrafficClass,
    pub window_start_ms: u64,
    pub window_ms: u64,
    pub bytes: u64,
    pub packets: u64,
    /// Average rate over the window, Mbit/s.
    pub mbit: f64,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p95_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// Loss signals per thousand packets, packet-weighted.
    pub loss_permille: f64,
    pub max_active_flows: u32,
    pub reports: u32,
}

#[derive(Debug, Clone, Default)]
struct ClassAcc {
    bytes: u64,
    packets: u64,
    rtt_p50_sum_us: u64,
    rtt_p50_n: u32,
    rtt_p95_max_us: Option<u32>,
    jitter_max_us: Option<u32>,
    loss_weighted: u64,
    max_flows: u32,
    reports: u32,
}

/// Sums one device's reports into fixed windows (aligned to multiples of
/// the window length, by the reports' own window start) and hands out a
/// window's per-class summaries once a report of a later window arrives.
/// In memory only: the window open at a crash is lost, which the
/// retention of summaries, not of raw reports, allows.
#[derive(Debug, Clone, Default)]
pub struct QosAccumulator {
    window_start_ms: u64,
    classes: BTreeMap<TrafficClass, ClassAcc>,
}

impl QosAccumulator {
    /// Adds one report's classes; returns the previous window's summaries
    /// when this report starts a new window.
    pub fn add(
        &mut self,
        window_ms: u64,
        report_start_ms: u64,
        classes: &[ClassStats],
    ) -> Vec<QosWindow> {
        let window_ms = window_ms.max(1);
        let start = report_start_ms - report_start_ms % window_ms;
        let mut closed = Vec::new();
        if start != self.window_start_ms {
            closed = self.close(window_ms);
            self.window_start_ms = start;
        }
        for c in classes.iter().filter(|c| c.packets > 0) {
            let a = self.classes.entry(c.class).or_default();
            a.bytes += c.bytes;
            a.packets += c.packets;
            if let Some(p50) = c.rtt_p50_us {
                a.rtt_p50_sum_us += u64::from(p50);
                a.rtt_p50_n += 1;
            }
            a.rtt_p95_max_us = a.rtt_p95_max_us.max(c.rtt_p95_us);
            a.jitter_max_us = a.jitter_max_us.max(c.jitter_us);
            a.loss_weighted += u64::from(c.loss_permille) * c.packets;
            a.max_flows = a.max_flows.max(c.active_flows);
            a.reports += 1;
        }
        closed
    }

    /// The open window's summaries (emptying it).
    pub fn close(&mut self, window_ms: u64) -> Vec<QosWindow> {
        let start = self.window_start_ms;
        std::mem::take(&mut self.classes)
            .into_iter()
            .map(|(class, a)| QosWindow {
                class,
                window_start_ms: start,
                window_ms,
                bytes: a.bytes,
                packets: a.packets,
                mbit: a.bytes as f64 * 8.0 / (window_ms as f64 / 1000.0) / 1e6,
                rtt_p50_ms: (a.rtt_p50_n > 0)
                    .then(|| a.rtt_p50_sum_us as f64 / f64::from(a.rtt_p50_n) / 1000.0),
                rtt_p95_ms: a.rtt_p95_max_us.map(|v| f64::from(v) / 1000.0),
                jitter_ms: a.jitter_max_us.map(|v| f64::from(v) / 1000.0),
                loss_permille: if a.packets == 0 {
                    0.0
                } else {
                    a.loss_weighted as f64 / a.packets as f64
                },
                max_active_flows: a.max_flows,
                reports: a.reports,
            })
            .collect()
    }
}

/// A lease's length from `now_ms`, e.g. `58 min` or `40 s`.
fn lease_text(now_ms: u64, expires_at_ms: u64) -> String {
    let s = expires_at_ms.saturating_sub(now_ms) / 1000;
    if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// An operation sent at `now_ms`, in words, for the instruction history.
pub fn describe_operation(now_ms: u64, op: &Operation) -> String {
    match op {
        Operation::Activate(a) => format!(
            "activate {} ({}, cpu {} ‰, {} MiB, lease {})",
            a.shard,
            a.capability,
            a.limits.cpu_quota_permille,
            a.limits.memory_max_bytes >> 20,
            lease_text(now_ms, a.lease_expires_at_ms)
        ),
        Operation::Deactivate { shard } => format!("deactivate {shard}"),
        Operation::RequestDiagnostics { max_lines } => {
            format!("send diagnostics (at most {max_lines} log lines)")
        }
        Operation::ActivateShard(a) => {
            let alternatives = if a.alternatives.is_empty() {
                String::new()
            } else {
                format!(", {} alternative(s)", a.alternatives.len())
            };
            format!(
                "activate {} ({}, cpu {} ‰, {} MiB{alternatives}, lease {})",
                a.primary.shard,
                a.capability,
                a.primary.limits.cpu_quota_permille,
                a.primary.limits.memory_max_bytes >> 20,
                lease_text(now_ms, a.lease_expires_at_ms)
            )
        }
    }
}

/// The status and reason an acknowledgement gives an instruction.
pub fn ack_status(outcome: &AckOutcome) -> (InstructionStatus, Option<String>) {
    match outcome {
        AckOutcome::Applied | AckOutcome::Duplicate => (InstructionStatus::Applied, None),
        AckOutcome::Rejected(r) => (InstructionStatus::Rejected, Some(format!("{r:?}"))),
        AckOutcome::Failed { reason } => (InstructionStatus::Failed, Some(reason.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::QosNeed;

    fn class(class: TrafficClass, bytes: u64, packets: u64, p95_us: Option<u32>) -> ClassStats {
        ClassStats {
            class,
            bytes,
            packets,
            rate_bps: 0,
            rtt_p50_us: p95_us.map(|v| v / 2),
            rtt_p95_us: p95_us,
            jitter_us: None,
            loss_permille: 10,
            active_flows: 3,
            need: QosNeed::default(),
        }
    }

    #[test]
    fn a_window_closes_when_a_report_of_the_next_one_arrives() {
        let mut acc = QosAccumulator::default();
        let w = 60_000;
        assert!(acc
            .add(
                w,
                0,
                &[class(TrafficClass::Gaming, 1_000_000, 100, Some(20_000))]
            )
            .is_empty());
        assert!(acc
            .add(
                w,
                10_000,
                &[class(TrafficClass::Gaming, 500_000, 50, Some(40_000))]
            )
            .is_empty());
        let closed = acc.add(w, 60_000, &[class(TrafficClass::Calls, 10, 1, None)]);
        assert_eq!(closed.len(), 1);
        let g = &closed[0];
        assert_eq!(
            (g.class, g.window_start_ms, g.bytes, g.packets, g.reports),
            (TrafficClass::Gaming, 0, 1_500_000, 150, 2)
        );
        assert_eq!(g.rtt_p95_ms, Some(40.0));
        assert_eq!(g.rtt_p50_ms, Some(15.0));
        assert!((g.mbit - 0.2).abs() < 1e-9, "{}", g.mbit);
        assert!((g.loss_permille - 10.0).abs() < 1e-9);
        let rest = acc.close(w);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].class, TrafficClass::Calls);
    }

    #[test]
    fn idle_classes_are_not_summarised() {
        let mut acc = QosAccumulator::default();
        acc.add(1000, 0, &[class(TrafficClass::Gaming, 0, 0, None)]);
        assert!(acc.close(1000).is_empty());
    }

    #[test]
    fn a_query_filters_by_kind_and_time() {
        let d = DeviceId::new("dev-1").unwrap();
        let e = HistoryEntry {
            device: d,
            at_ms: 100,
            event: HistoryEvent::Reputation {
                from: 50.0,
                to: 40.0,
                reason: "x".into(),
            },
        };
        let q = |kind, since_ms, before_ms| HistoryQuery {
            kind,
            since_ms,
            before_ms,
            limit: 10,
        };
        assert!(q(None, 0, None).matches(&e));
        assert!(q(Some(HistoryKind::Reputation), 100, Some(101)).matches(&e));
        assert!(!q(Some(HistoryKind::Qos), 0, None).matches(&e));
        assert!(!q(None, 101, None).matches(&e));
        assert!(!q(None, 0, Some(100)).matches(&e));
    }
}
