//! Operator faults and duplicate identities: what is *not* device misbehaviour.
//!
//! **Failure classification** ([`classify`]). A shard failure the device
//! reports (restarts in its reports, a failed or `LimitsOutOfRange` ack) is
//! either a *start failure* or a *runtime failure*:
//! - start failures: `LoadRefused` (the library did not verify or load, e.g. a
//!   digest for another architecture), `InitFailed` (the shard refused its
//!   config), a `LimitsOutOfRange` rejection, and a crash, exit, hang or
//!   over-limit kill of a shard that had not yet run fine — fewer than
//!   [`FaultConfig::min_healthy_reports`] healthy reports since its grant,
//!   or within [`FaultConfig::start_grace_ms`] of its grant.
//!   They say the catalog entry (config, limits, digest) does not suit the
//!   device: an operator fault. Reputation does not move; the shard is
//!   avoided on that device with a doubling backoff ([`StartFailure`]), its
//!   alternative planned meanwhile, and the refusal names the failure.
//! - runtime failures: the shard ran fine, then crashed or was killed (a
//!   crash loop after it ran fine stays a runtime failure). They
//!   may count against the device (`crash`, `over_limit`) — unless the entry
//!   is marked failing on the device's architecture, which says the fault
//!   is the entry's.
//!
//! **Failing entries** ([`CatalogHealth`]). Start failures are tracked per
//! catalog shard and architecture. When [`FaultConfig::failing_min_devices`]
//! distinct devices reported one within [`FaultConfig::failing_window_ms`],
//! and they outnumber the devices the entry runs fine on there, the entry
//! is marked failing for that architecture: the planner stops
//! using it (alternatives first, a [`Refusal::CatalogFailing`] otherwise) and
//! the operator is told ([`Action::CatalogEntryFailing`]). One device alone
//! never marks an entry: a lying device cannot disable it fleet-wide. A mark
//! is cleared by the operator (`RetryCatalogEntry`) or when the catalog is
//! loaded with that entry changed (its [`spec_fingerprint`] differs).
//!
//! **Duplicate identities** ([`CloneWatch`]). Two agents running with one
//! device id and key both sign reports, each with its own sequence. The
//! service accepts the higher stream and drops the other as stale; the
//! dropped reports come to the engine as [`Event::StaleReport`]. Evidence is
//! a stale report that only the key holder could have made: the same
//! sequence number signed with different content, or a report whose window
//! ends after the last accepted one began (a replay from the broker carries
//! an old window). [`FaultConfig::duplicate_min_evidence`] pieces within
//! [`FaultConfig::duplicate_window_ms`] flag the device for
//! [`FaultConfig::duplicate_hold_ms`] after the last one: an alert, a metric,
//! a flag on the device view. While flagged the `replayed_report` penalty
//! is not charged (the clone is the operator's mistake). Bound on abuse: an
//! attacker holding the key can already sign anything the device can; the
//! exemption covers *only* `replayed_report`, healthy-report gains are
//! suspended while flagged (two streams cannot farm reputation), the flag
//! expires on its own, and every flagging alerts the operator.
//!
//! Unenrolment leaves a [`Tombstone`] (see there for the re-enrolment rule).

use super::catalog::ShardSpec;
use super::{
    kind_index, BorrowRefusal, DeviceState, Lease, Refusal, ReputationConfig, ReputationState,
};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{QosReport, ShardFailure};
use std::collections::BTreeMap;

/// Parameters of fault classification and duplicate detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// A failure within this long of the lease's grant is a start failure.
    pub start_grace_ms: u64,
    /// Healthy reports (since its grant) after which a shard "ran fine".
    pub min_healthy_reports: u32,
    /// Distinct devices whose start failures mark an entry failing.
    pub failing_min_devices: u32,
    /// Start failures older than this no longer count toward a mark.
    pub failing_window_ms: u64,
    /// First avoidance of a shard that failed to start on a device; doubles
    /// with each further start failure, up to `start_avoid_max_ms`.
    pub start_avoid_ms: u64,
    pub start_avoid_max_ms: u64,
    pub duplicate_window_ms: u64,
    pub duplicate_min_evidence: u32,
    /// The duplicate flag holds this long after the last evidence.
    pub duplicate_hold_ms: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            start_grace_ms: 120_000,
            min_healthy_reports: 2,
            failing_min_devices: 2,
            failing_window_ms: 6 * 3_600_000,
            start_avoid_ms: 10 * 60_000,
            start_avoid_max_ms: 6 * 3_600_000,
            duplicate_window_ms: 10 * 60_000,
            duplicate_min_evidence: 2,
            duplicate_hold_ms: 3_600_000,
        }
    }
}

/// What kind of failure a reported one is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Start,
    Runtime,
}

/// Start or runtime failure of `lease` at `now`.
pub fn classify(
    cfg: &FaultConfig,
    failure: Option<&ShardFailure>,
    lease: &Lease,
    now: u64,
) -> FailureClass {
    let never_ran = matches!(
        failure,
        Some(ShardFailure::LoadRefused { .. } | ShardFailure::InitFailed { .. })
    );
    let young = now.saturating_sub(lease.granted_at_ms) < cfg.start_grace_ms;
    if never_ran || young || lease.healthy_reports < cfg.min_healthy_reports {
        FailureClass::Start
    } else {
        FailureClass::Runtime
    }
}

/// The failure in words, as the operator sees it.
pub fn failure_text(failure: Option<&ShardFailure>) -> String {
    match failure {
        None => "failed".to_owned(),
        Some(ShardFailure::Crashed { signal }) => format!("Crashed (signal {signal})"),
        Some(ShardFailure::Exited { code }) => format!("Exited (code {code})"),
        Some(ShardFailure::Hung) => "Hung".to_owned(),
        Some(ShardFailure::OverLimit) => "OverLimit at start".to_owned(),
        Some(ShardFailure::LoadRefused { reason }) => format!("LoadRefused {}", clip(reason)),
        Some(ShardFailure::InitFailed { reason }) => format!("InitFailed {}", clip(reason)),
    }
}

/// Device-supplied text, bounded (it ends up in logs, views and metrics help).
pub fn clip(text: &str) -> String {
    const MAX: usize = 120;
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match clean.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &clean[..cut]),
        None => clean,
    }
}

/// A shard's latest start failure on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFailure {
    pub reason: String,
    /// Start failures in a row (the backoff doubles with each).
    pub count: u32,
    pub last_ms: u64,
    /// Avoided on this device until then.
    pub until_ms: u64,
}

impl StartFailure {
    /// The avoidance after the `count`-th start failure in a row.
    pub fn backoff(cfg: &FaultConfig, count: u32) -> u64 {
        let shift = count.saturating_sub(1).min(20);
        cfg.start_avoid_ms
            .saturating_mul(1u64 << shift)
            .min(cfg.start_avoid_max_ms.max(cfg.start_avoid_ms))
    }
}

/// Shard ⇒ architecture ⇒ value.
pub type PerEntry<T> = BTreeMap<String, BTreeMap<String, T>>;

/// A catalog entry marked failing on one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingEntry {
    pub shard: String,
    pub arch: String,
    /// The latest start failure's reason.
    pub reason: String,
    /// The distinct devices whose start failures marked it.
    pub devices: Vec<DeviceId>,
    pub since_ms: u64,
    /// [`spec_fingerprint`] of the entry when marked: a catalog with the
    /// entry changed clears the mark.
    pub fingerprint: u64,
}

/// Fleet-wide health of the catalog: failing marks and the recent start
/// failures that lead to them. Engine-wide state, persisted by the service
/// beside the device records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogHealth {
    /// Shard ⇒ architecture ⇒ mark.
    pub failing: PerEntry<FailingEntry>,
    /// Shard ⇒ architecture ⇒ device ⇒ (when, reason) of its latest start failure.
    pub recent: PerEntry<BTreeMap<DeviceId, (u64, String)>>,
    /// Shard ⇒ architecture ⇒ start failures seen (a counter for metrics).
    pub start_failures_total: PerEntry<u64>,
    /// Shard ⇒ architecture ⇒ device ⇒ when it last ran fine there. Not
    /// persisted (it refills within minutes of reports, and writing it
    /// would make every healthy report a store write).
    #[serde(skip)]
    pub running_fine: PerEntry<BTreeMap<DeviceId, u64>>,
}

impl CatalogHealth {
    /// The mark of `shard` on `arch`, if any.
    pub fn failing_on(&self, shard: &str, arch: &str) -> Option<&FailingEntry> {
        self.failing.get(shard).and_then(|m| m.get(arch))
    }

    /// Records one start failure; returns the new mark when this one made
    /// the entry failing.
    pub fn record_start_failure(
        &mut self,
        cfg: &FaultConfig,
        spec: &ShardSpec,
        arch: &str,
        device: &DeviceId,
        reason: &str,
        now: u64,
    ) -> Option<FailingEntry> {
        let shard = spec.shard.id();
        *self
            .start_failures_total
            .entry(shard.to_owned())
            .or_default()
            .entry(arch.to_owned())
            .or_default() += 1;
        let per_dev = self
            .recent
            .entry(shard.to_owned())
            .or_default()
            .entry(arch.to_owned())
            .or_default();
        per_dev.insert(device.clone(), (now, reason.to_owned()));
        per_dev.retain(|_, (t, _)| now.saturating_sub(*t) < cfg.failing_window_ms);
        let devices: Vec<DeviceId> = per_dev.keys().cloned().collect();
        // Devices where it runs fine (and that did not fail it since).
        let fine = self
            .running_fine
            .get_mut(shard)
            .and_then(|m| m.get_mut(arch))
            .map_or(0, |m| {
                m.retain(|d, t| {
                    now.saturating_sub(*t) < cfg.failing_window_ms && !devices.contains(d)
                });
                m.len()
            });
        // A few devices (misbehaving, or lying) must not disable an entry
        // that runs fine elsewhere: failures must come from enough
        // devices *and* outnumber the devices it runs fine on.
        if self.failing_on(shard, arch).is_some()
            || (devices.len() as u64) < u64::from(cfg.failing_min_devices.max(1))
            || devices.len() <= fine
        {
            return None;
        }
        let mark = FailingEntry {
            shard: shard.to_owned(),
            arch: arch.to_owned(),
            reason: reason.to_owned(),
            devices,
            since_ms: now,
            fingerprint: spec_fingerprint(spec),
        };
        self.failing
            .entry(shard.to_owned())
            .or_default()
            .insert(arch.to_owned(), mark.clone());
        Some(mark)
    }

    /// `shard` ran fine on `device` (counts against marking it failing).
    pub fn record_running_fine(&mut self, shard: &str, arch: &str, device: &DeviceId, now: u64) {
        self.running_fine
            .entry(shard.to_owned())
            .or_default()
            .entry(arch.to_owned())
            .or_default()
            .insert(device.clone(), now);
    }

    /// Forgets everything about `shard`; whether there was a mark.
    pub fn retry(&mut self, shard: &str) -> bool {
        self.recent.remove(shard);
        self.failing.remove(shard).is_some()
    }

    /// Drops marks (and recent failures) of entries that are gone or
    /// changed in `catalog`: the operator fixed them. Returns the shards cleared.
    pub fn reconcile_catalog(&mut self, catalog: &super::Catalog) -> Vec<String> {
        let mut cleared = Vec::new();
        self.failing.retain(|shard, marks| {
            let fp = catalog.shards.get(shard).map(spec_fingerprint);
            marks.retain(|_, m| Some(m.fingerprint) == fp);
            if marks.is_empty() {
                cleared.push(shard.clone());
            }
            !marks.is_empty()
        });
        for s in &cleared {
            self.recent.remove(s);
        }
        self.recent
            .retain(|shard, _| catalog.shards.contains_key(shard));
        cleared
    }

    /// Every mark, in (shard, arch) order.
    pub fn marks(&self) -> impl Iterator<Item = &FailingEntry> {
        self.failing.values().flat_map(|m| m.values())
    }
}

/// A stable fingerprint of a catalog entry: what the operator can change
/// (digest, config, cost, dependencies) — a change clears its failing marks.
pub fn spec_fingerprint(spec: &ShardSpec) -> u64 {
    let bytes = postcard::to_stdvec(spec).unwrap_or_default();
    let d = sha2::Sha256::digest(&bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// A short digest of a report's content (duplicate detection).
pub fn report_digest(report: &QosReport) -> u64 {
    let bytes = postcard::to_stdvec(report).unwrap_or_default();
    let d = sha2::Sha256::digest(&bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// The duplicate-identity flag of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateFlag {
    pub since_ms: u64,
    pub until_ms: u64,
    /// Evidence seen since flagged (and the piece that flagged it).
    pub evidence: u32,
    pub reason: String,
}

/// Recent accepted reports and stale-report evidence of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneWatch {
    /// (seq, digest) of the last accepted reports, oldest first.
    pub recent: Vec<(u64, u64)>,
    /// Window start of the last accepted report (the device's clock).
    pub last_window_start_ms: u64,
    /// When each recent piece of evidence arrived.
    pub evidence_ms: Vec<u64>,
    pub flag: Option<DuplicateFlag>,
}

/// Accepted reports remembered for equivocation checks.
const RECENT_REPORTS: usize = 16;

impl CloneWatch {
    /// An accepted report.
    pub fn accepted(&mut self, report: &QosReport, now: u64) {
        self.recent.push((report.seq, report_digest(report)));
        if self.recent.len() > RECENT_REPORTS {
            self.recent.remove(0);
        }
        self.last_window_start_ms = report.window_start_ms;
        if self.flag.as_ref().is_some_and(|f| f.until_ms <= now) {
            self.flag = None;
        }
    }

    pub fn flagged(&self, now: u64) -> bool {
        self.flag.as_ref().is_some_and(|f| f.until_ms > now)
    }

    /// A stale report; returns the reason when it newly flags the device.
    pub fn stale(&mut self, cfg: &FaultConfig, report: &QosReport, now: u64) -> Option<String> {
        let digest = report_digest(report);
        let reason = match self.recent.iter().find(|(s, _)| *s == report.seq) {
            Some(&(_, d)) if d == digest => return None, // a redelivery
            Some(_) => format!(
                "report seq {} signed twice with different content",
                report.seq
            ),
            None => {
                let end = report
                    .window_start_ms
                    .saturating_add(u64::from(report.window_ms));
                if end <= self.last_window_start_ms {
                    return None; // an old report replayed: anyone can do that
                }
                format!(
                    "a fresh report (window at {} ms) under an old seq {}",
                    report.window_start_ms, report.seq
                )
            }
        };
        self.evidence_ms.push(now);
        self.evidence_ms
            .retain(|&t| now.saturating_sub(t) < cfg.duplicate_window_ms);
        let until = now.saturating_add(cfg.duplicate_hold_ms);
        match &mut self.flag {
            Some(f) if f.until_ms > now => {
                f.evidence += 1;
                f.until_ms = until;
                None
            }
            _ if self.evidence_ms.len() as u64 >= u64::from(cfg.duplicate_min_evidence.max(1)) => {
                self.flag = Some(DuplicateFlag {
                    since_ms: now,
                    until_ms: until,
                    evidence: self.evidence_ms.len() as u32,
                    reason: reason.clone(),
                });
                Some(reason)
            }
            _ => None,
        }
    }
}

/// What the store keeps of an unenrolled device, so that enrolling the same
/// id again neither launders its reputation nor rewinds its sequences.
///
/// Rule on re-enrolment: the restored score is the tombstone's score,
/// decayed toward neutral for the time the device was away exactly as it
/// would have decayed enrolled, and capped at the initial score: a bad score
/// is never laundered, a good one is not carried into what may be a new
/// relation (a new key, a re-imaged box). Instruction numbering continues
/// above the old reservation, so a device that kept its state is not refused
/// with `Rollback`. The report floor is kept only when the device comes back
/// with the same key (its old signed reports would verify again); with a new
/// key they cannot, and a re-imaged device starts its reports from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub device: DeviceId,
    pub public_key: [u8; 32],
    pub unenrolled_at_ms: u64,
    pub last_report_seq: u64,
    /// Highest instruction sequence number that may have been used.
    pub last_instruction_seq: u64,
    pub reputation: Option<ReputationState>,
}

impl Tombstone {
    /// The reputation a re-enrolled device starts with (see the type docs).
    pub fn restored(prior: &ReputationState, cfg: &ReputationConfig, now: u64) -> ReputationState {
        let mut r = prior.clone();
        r.decay_to(cfg, now);
        r.score = r.score.min(cfg.initial);
        r.announced = r.score;
        r.penalized = false;
        r.last_reason.clear();
        r
    }
}

/// What [`Refusal::explain`] needs besides the refusal.
#[derive(Debug, Clone)]
pub struct ExplainCtx {
    pub reputation: f64,
    /// Tier budget × reputation quota, per kind.
    pub quota: [u32; 2],
    pub borrow_min_reputation: f64,
    pub now_ms: u64,
    /// The operator who drained the device, when known.
    pub drained_by: Option<String>,
}

fn units(n: u32) -> &'static str {
    if n == 1 {
        "unit"
    } else {
        "units"
    }
}

impl Refusal {
    /// The refusal of `capability` on `device` in words, for the operator.
    pub fn explain(&self, capability: &str, device: &str, ctx: &ExplainCtx) -> String {
        match self {
            Refusal::NotAllowed => "not allowed: the tier does not include it".to_owned(),
            Refusal::Budget {
                kind,
                missing_units,
            } => format!(
                "budget: {} {missing_units} {} short (reputation {:.0} → quota {})",
                kind.as_str(),
                units(*missing_units),
                ctx.reputation,
                ctx.quota[kind_index(*kind)]
            ),
            Refusal::Capacity {
                cpu_needed_permille,
                cpu_free_permille,
                memory_needed_kib,
                memory_free_kib,
                other_load_permille,
            } => {
                let load = format!("other load {} %", other_load_permille / 10);
                if cpu_needed_permille > cpu_free_permille {
                    format!(
                        "capacity: cpu needs {cpu_needed_permille}‰, free {cpu_free_permille}‰ ({load})"
                    )
                } else {
                    format!(
                        "capacity: memory needs {} KiB, free {} KiB ({load})",
                        memory_needed_kib, memory_free_kib
                    )
                }
            }
            Refusal::Unavailable { shard } => {
                format!("unavailable: every option of {shard} is revoked or avoided")
            }
            Refusal::Drained => format!(
                "drained by {}",
                ctx.drained_by.as_deref().unwrap_or("the operator")
            ),
            Refusal::BorrowRefused {
                reason,
                kind,
                missing_units,
            } => {
                let why = match reason {
                    BorrowRefusal::Disabled => "borrowing is off".to_owned(),
                    BorrowRefusal::TierForbids => "the tier forbids borrowing".to_owned(),
                    BorrowRefusal::NoTenant => "no tenant pool".to_owned(),
                    BorrowRefusal::LowReputation => format!(
                        "low reputation {:.0} < {:.0}",
                        ctx.reputation, ctx.borrow_min_reputation
                    ),
                    BorrowRefusal::NoLender => "no peer has spare units".to_owned(),
                    BorrowRefusal::AtLimit => "already borrowing the maximum".to_owned(),
                    BorrowRefusal::TooFrequent => {
                        "too many loans this hour (see the device's lending decisions)".to_owned()
                    }
                    BorrowRefusal::NoConsent => {
                        "peers have spare units but do not consent to lend them now".to_owned()
                    }
                };
                format!(
                    "borrow refused: {why} ({} {missing_units} {} short)",
                    kind.as_str(),
                    units(*missing_units)
                )
            }
            Refusal::StartFailed {
                shard,
                reason,
                until_ms,
            } => format!(
                "start failure of {shard} on this device: {reason} (avoided for {} s more)",
                until_ms.saturating_sub(ctx.now_ms) / 1000
            ),
            Refusal::CatalogFailing {
                shard,
                arch,
                reason,
            } => format!("failing catalog entry {shard} on {arch}: {reason}"),
            // These two need the operator to act: say what to change.
            Refusal::NoBuild { shard, arch } => format!(
                "{capability} needs a build of {shard} for {arch} (catalog [shard.sha256] has none)"
            ),
            Refusal::MissingDeviceConfig { shard, key, secret } => format!(
                "{capability} needs device config {shard}:{key} — shardctl config set {device} {shard} {}{key}=…",
                if *secret { "--secret " } else { "" }
            ),
        }
    }
}

/// The explanation context of a device.
pub(crate) fn explain_ctx(
    cfg: &super::PolicyConfig,
    quota: [u32; 2],
    st: &DeviceState,
    now: u64,
) -> ExplainCtx {
    ExplainCtx {
        reputation: st.reputation.score,
        quota,
        borrow_min_reputation: cfg.borrow_min_reputation,
        now_ms: now,
        drained_by: st.feedback.operator_marks.get("drain").cloned(),
    }
}
