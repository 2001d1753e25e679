//! What the engine learns on one device beyond the daily model (issue 17):
//! a short-term model (minutes), day-of-week factors (the weekly part of
//! the long-term model), the measured one-step error of both models, the
//! outcome of its pre-activations (prediction turns itself off on a class
//! where it does not pay), and the QoS change observed after shifts (the
//! gain the rebalancer expects from the next one).
//!
//! The rules, all deterministic and per device:
//! - **Which model**: for the current slot the model with the lower
//!   measured mean absolute error (EWMA over reports) forecasts; further
//!   ahead only the seasonal one can.
//! - **Whether to pre-activate** ([`preactivation_value`]): the expected
//!   Mbit a pre-activation saves (P(on) × rate × the one report a reactive
//!   policy is late) against the expected cost of the units held (held
//!   early while demand has not come, or for nothing when it never comes),
//!   priced at `unit_hour_value_mbit`. P(on) comes from the interval.
//! - **Whether prediction pays here** ([`ClassLearning::close`]): every
//!   pre-activation is judged when its hold ends: a hit when the class
//!   reached its threshold while held. After `min_samples` outcomes with a
//!   hit rate below `min_hit_rate`, prediction is off for the class for
//!   `off_ms`, then tried again from a clean record.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{ShardKind, TrafficClass};
use std::collections::BTreeMap;

/// Prediction's own parameters (inside [`super::forecast::ForecastConfig`]'s
/// sibling in `PolicyConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictionConfig {
    /// What holding one resource unit idle for an hour costs, in Mbit of
    /// demand served: the operator's price of a unit-hour. The default is
    /// a quarter of what demand-driven allocation serves per unit-hour in
    /// the fleet simulation (about 2,000 Mbit, BENCHMARKS.md): an idle unit
    /// displaces nothing most of the time, since a prediction never
    /// displaces observed demand, but it is the device's CPU and memory.
    pub unit_hour_value_mbit: f64,
    /// Outcomes judged before the hit rate can turn prediction off.
    pub min_samples: u32,
    /// Below this hit rate prediction does not pay on the class.
    pub min_hit_rate: f64,
    /// Prediction stays off this long once it did not pay.
    pub off_ms: u64,
    /// Short-term model smoothing (level, trend) per report.
    pub short_alpha: f32,
    pub short_beta: f32,
    /// Weight of each new day-of-week ratio (a day's traffic over what
    /// the daily model expected of it; each weekday comes once a week).
    pub week_gamma: f32,
    /// Weight of each new absolute error in the models' MAE.
    pub error_weight: f32,
    /// Weight of each day's observation in a slot's on-frequency.
    pub on_weight: f32,
}

impl Default for PredictionConfig {
    fn default() -> Self {
        Self {
            unit_hour_value_mbit: 500.0,
            min_samples: 6,
            min_hit_rate: 0.5,
            off_ms: 24 * 3_600_000,
            short_alpha: 0.5,
            short_beta: 0.2,
            week_gamma: 0.5,
            error_weight: 0.1,
            on_weight: 0.4,
        }
    }
}

/// Holt's linear model over report rates (kbit/s): the short term.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShortTerm {
    pub level: f32,
    pub trend: f32,
    pub n: u32,
}

impl ShortTerm {
    /// The next report's rate.
    pub fn forecast(&self) -> f32 {
        (self.level + self.trend).max(0.0)
    }

    pub fn observe(&mut self, cfg: &PredictionConfig, y: f32) {
        if self.n == 0 {
            self.level = y;
        } else {
            let level = cfg.short_alpha * y + (1.0 - cfg.short_alpha) * (self.level + self.trend);
            self.trend =
                cfg.short_beta * (level - self.level) + (1.0 - cfg.short_beta) * self.trend;
            self.level = level;
        }
        self.n = self.n.saturating_add(1);
    }
}

/// A pre-activation not judged yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenPrediction {
    pub since_ms: u64,
    pub until_ms: u64,
    /// The class reached its threshold while held.
    pub hit: bool,
}

/// One traffic class of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassLearning {
    pub class: TrafficClass,
    pub short: ShortTerm,
    /// Per slot of the day: how often the class was on (a report at its
    /// rule's threshold) in that slot, EWMA over days. On/off traffic is
    /// not normal: the chance of an onset comes from here, the rate from
    /// the seasonal model.
    /// In 1/255ths: a byte per slot (96 a day) keeps the state of a
    /// class under 100 bytes; the estimate is coarser than that anyway.
    pub on_freq: Vec<u8>,
    /// Slots observed (the frequencies mean something after a day).
    pub slots_seen: u32,
    /// The slot being observed and whether the class was on in it.
    pub cur_slot: u64,
    pub cur_on: bool,
    /// Day-of-week factors of the seasonal forecast (Monday-based days
    /// since the epoch modulo 7; multiplicative, 1 = an ordinary day).
    pub week: [f32; 7],
    /// Measured mean absolute one-step error, kbit/s, of the seasonal model
    /// (per slot) and of the short-term model (per report).
    pub seasonal_mae: f32,
    pub short_mae: f32,
    /// The day being summed for its day-of-week factor: its index (days
    /// since the epoch), what came and what the daily model expected.
    pub day: u64,
    pub day_sum: f32,
    pub day_expected: f32,
    /// Judged pre-activations and the hits among them (halved together
    /// past 32, so the record follows the device).
    pub predictions: u32,
    pub hits: u32,
    pub open: Option<OpenPrediction>,
    /// Prediction is off for the class until then: it did not pay.
    pub off_until_ms: u64,
    /// Every judged pre-activation and hit since enrolment (never reset:
    /// for the operator and the simulation's figures).
    pub total_predictions: u64,
    pub total_hits: u64,
}

impl ClassLearning {
    pub fn new(class: TrafficClass) -> Self {
        Self {
            class,
            short: ShortTerm::default(),
            on_freq: Vec::new(),
            slots_seen: 0,
            cur_slot: 0,
            cur_on: false,
            week: [1.0; 7],
            seasonal_mae: 0.0,
            short_mae: 0.0,
            day: 0,
            day_sum: 0.0,
            day_expected: 0.0,
            predictions: 0,
            hits: 0,
            open: None,
            off_until_ms: 0,
            total_predictions: 0,
            total_hits: 0,
        }
    }

    pub fn week_factor(&self, slot_start_ms: u64) -> f32 {
        self.week[day_of_week(slot_start_ms)]
    }

    /// A report in slot `slot` (of `per_day` slots a day): whether the
    /// class was on feeds the slot's on-frequency once the slot is over.
    pub fn observe_on(&mut self, cfg: &PredictionConfig, slot: u64, per_day: u32, on: bool) {
        let n = per_day.max(1) as usize;
        if self.on_freq.len() != n {
            self.on_freq = vec![0; n];
            self.slots_seen = 0;
        }
        if slot != self.cur_slot {
            if self.cur_slot != 0 {
                let i = (self.cur_slot % n as u64) as usize;
                // From 0, not from the first day's value: one day's burst
                // in a slot (w < 0.5) never makes an onset likely; a
                // daily one does from its second repetition (w ≥ 0.3).
                let x = if self.cur_on { 1.0 } else { 0.0 };
                let old = f32::from(self.on_freq[i]) / 255.0;
                let new = old + cfg.on_weight * (x - old);
                self.on_freq[i] = (new * 255.0).round().clamp(0.0, 255.0) as u8;
                self.slots_seen = self.slots_seen.saturating_add(1);
            }
            self.cur_slot = slot;
            self.cur_on = false;
        }
        self.cur_on |= on;
    }

    /// How likely the class is on in slot `slot`, `None` before a day of
    /// observations.
    pub fn p_on(&self, slot: u64) -> Option<f64> {
        let n = self.on_freq.len();
        if n == 0 || (self.slots_seen as usize) < n {
            return None;
        }
        Some(f64::from(self.on_freq[(slot % n as u64) as usize]) / 255.0)
    }

    /// A report's rate for the class: the short-term model and its error.
    pub fn observe_report(&mut self, cfg: &PredictionConfig, rate_kbps: f32) {
        if self.short.n > 0 {
            let err = (rate_kbps - self.short.forecast()).abs();
            self.short_mae += cfg.error_weight * (err - self.short_mae);
        }
        self.short.observe(cfg, rate_kbps);
    }

    /// A completed slot: the seasonal model's error and the day's factor
    /// (`base` is the seasonal forecast before the weekly factor).
    pub fn observe_slot(&mut self, cfg: &PredictionConfig, slot_start_ms: u64, y: f32, base: f32) {
        let d = day_of_week(slot_start_ms);
        let err = (y - base * self.week[d]).abs();
        self.seasonal_mae += cfg.error_weight * (err - self.seasonal_mae);
        // A day's factor is its whole traffic over what an ordinary day
        // would bring, judged when the day is over: slot by slot, the
        // ratio of two small numbers is noise.
        let day = slot_start_ms / 86_400_000;
        if day != self.day {
            if self.day_expected > 0.0 {
                let done = day_of_week(self.day * 86_400_000);
                let ratio = (self.day_sum / self.day_expected).clamp(0.0, 4.0);
                self.week[done] += cfg.week_gamma * (ratio - self.week[done]);
            }
            self.day = day;
            self.day_sum = 0.0;
            self.day_expected = 0.0;
        }
        self.day_sum += y.max(0.0);
        self.day_expected += base.max(0.0);
    }

    /// Whether the short-term model forecasts the current slot better.
    pub fn short_is_better(&self) -> bool {
        self.short.n > 4 && self.short_mae < self.seasonal_mae
    }

    /// A pre-activation holds the class's capabilities until `until_ms`.
    pub fn opened(&mut self, now: u64, until_ms: u64) {
        match &mut self.open {
            Some(o) => o.until_ms = o.until_ms.max(until_ms),
            None => {
                self.open = Some(OpenPrediction {
                    since_ms: now,
                    until_ms,
                    hit: false,
                })
            }
        }
    }

    /// The class reached its threshold: an open pre-activation was right.
    pub fn demand_seen(&mut self) {
        if let Some(o) = &mut self.open {
            o.hit = true;
        }
    }

    /// Judges a pre-activation whose hold ended; returns the explanation
    /// when this outcome turned prediction off.
    pub fn close(&mut self, cfg: &PredictionConfig, now: u64) -> Option<String> {
        let o = self.open.filter(|o| o.until_ms <= now)?;
        self.open = None;
        self.predictions = self.predictions.saturating_add(1);
        self.total_predictions = self.total_predictions.saturating_add(1);
        if o.hit {
            self.hits = self.hits.saturating_add(1);
            self.total_hits = self.total_hits.saturating_add(1);
        }
        if self.predictions > 32 {
            self.predictions /= 2;
            self.hits /= 2;
        }
        let rate = f64::from(self.hits) / f64::from(self.predictions.max(1));
        if self.predictions >= cfg.min_samples && rate < cfg.min_hit_rate {
            let why = format!(
                "prediction off for {:?} until {} ms: {} of its last {} pre-activations were followed by demand (below {:.0} %)",
                self.class,
                now.saturating_add(cfg.off_ms),
                self.hits,
                self.predictions,
                cfg.min_hit_rate * 100.0
            );
            self.off_until_ms = now.saturating_add(cfg.off_ms);
            self.predictions = 0;
            self.hits = 0;
            return Some(why);
        }
        None
    }
}

/// Days since the epoch (a Thursday) modulo 7, Monday = 0.
pub fn day_of_week(ms: u64) -> usize {
    ((ms / 86_400_000 + 3) % 7) as usize
}

/// The standard normal CDF (Abramowitz–Stegun 26.2.17, error < 7.5e-8).
pub fn normal_cdf(x: f64) -> f64 {
    if !x.is_finite() {
        return if x > 0.0 { 1.0 } else { 0.0 };
    }
    let t = 1.0 / (1.0 + 0.231_641_9 * x.abs());
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782
                + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    let tail = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly;
    if x >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The inputs of one pre-activation decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreactivationInput {
    /// Forecast mean and standard deviation of the class rate, kbit/s.
    pub mean_kbps: f64,
    pub sigma_kbps: f64,
    /// The measured chance the class is on in the slot, when known
    /// (it replaces the one the interval gives).
    pub measured_p_on: Option<f64>,
    /// The rule's threshold, kbit/s.
    pub threshold_kbps: f64,
    /// How late a reactive policy is: one report window, ms.
    pub lag_ms: u64,
    /// Units the pre-activation would start.
    pub units: u32,
    /// Held early (until the forecast slot starts) and in all, ms.
    pub lead_ms: u64,
    pub hold_ms: u64,
}

/// The decision: P(on), the expected gain and cost in Mbit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreactivationValue {
    pub p_on: f64,
    pub gain_mbit: f64,
    pub cost_mbit: f64,
}

impl PreactivationValue {
    /// The gain outweighs the cost, and the onset is at least as likely
    /// as the hit rate prediction must keep (below it, acting would turn
    /// prediction off on the class by its own misses).
    pub fn pays(&self, cfg: &PredictionConfig) -> bool {
        self.gain_mbit > self.cost_mbit && self.p_on >= cfg.min_hit_rate
    }
}

/// Expected value of pre-activating: gain = P(on) × rate × lag (the
/// demand a reactive policy misses at the onset); cost = units × value of
/// a unit-hour × (P(on) × the early hold + (1 − P(on)) × the whole hold).
pub fn preactivation_value(cfg: &PredictionConfig, i: &PreactivationInput) -> PreactivationValue {
    let sigma = i.sigma_kbps.max(1e-6);
    let p_on = i
        .measured_p_on
        .unwrap_or_else(|| normal_cdf((i.mean_kbps - i.threshold_kbps) / sigma))
        .clamp(0.0, 1.0);
    let rate = i.mean_kbps.max(i.threshold_kbps);
    let gain_mbit = p_on * rate * i.lag_ms as f64 / 1e6;
    let hour = |ms: u64| ms as f64 / 3_600_000.0;
    let cost_mbit = f64::from(i.units)
        * cfg.unit_hour_value_mbit
        * (p_on * hour(i.lead_ms) + (1.0 - p_on) * hour(i.hold_ms));
    PreactivationValue {
        p_on,
        gain_mbit,
        cost_mbit,
    }
}

/// What a decision was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// A capability granted (activated) because a need asks for it.
    Grant,
    /// A demanded capability refused (budget, capacity, agreement, …).
    Refuse,
    /// A capability released: no need asks for it any more.
    Release,
    /// Held ahead of a forecast onset.
    Preactivate,
    /// Prediction turned off (or on again) for a class.
    Prediction,
    /// Units borrowed, lent, returned.
    Loan,
    /// Units moved by the rebalancer, or a shift rolled back.
    Shift,
    /// The reputation quota cut or restored the budget.
    Quota,
    /// An operator pin, revoke, drain.
    Operator,
    /// Data shards throttled before compute shards.
    Throttle,
}

impl DecisionKind {
    /// The name the API and the history use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Refuse => "refuse",
            Self::Release => "release",
            Self::Preactivate => "preactivate",
            Self::Prediction => "prediction",
            Self::Loan => "loan",
            Self::Shift => "shift",
            Self::Quota => "quota",
            Self::Operator => "operator",
            Self::Throttle => "throttle",
        }
    }
}

/// One decision of the engine about a device, with its explanation in
/// words (for the operator's surfaces: `GET /v1/devices/{id}`, `shardctl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub kind: DecisionKind,
    /// The capability, shard or loan it is about.
    pub subject: String,
    pub explanation: String,
}

/// Decisions kept per device (the newest).
pub const DECISIONS_KEPT: usize = 24;

/// The QoS of the classes that have a need, from one report (byte-weighted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QosSnapshot {
    pub loss_permille: f64,
    /// p95 round-trip time and jitter, ms (0 when the device measured none).
    pub rtt_p95_ms: f64,
    pub jitter_ms: f64,
}

impl QosSnapshot {
    /// QoS points of a change from `before` to `self` (positive = better):
    /// one point per ‰ of loss, per 2 ms of p95 RTT and per ms of jitter.
    pub fn gain_over(&self, before: &QosSnapshot) -> f64 {
        (before.loss_permille - self.loss_permille)
            + (before.rtt_p95_ms - self.rtt_p95_ms) / 2.0
            + (before.jitter_ms - self.jitter_ms)
    }

    pub fn describe(&self) -> String {
        format!(
            "loss {:.0} ‰, p95 RTT {:.0} ms, jitter {:.1} ms",
            self.loss_permille, self.rtt_p95_ms, self.jitter_ms
        )
    }
}

/// Why a shift is rolled back, if it is: QoS after it worse than before
/// in loss (score points), p95 RTT or jitter (each beyond a ratio and a
/// floor, so noise on a quiet link does not count). Gaming and call
/// traffic lose no packets when they suffer: latency and jitter say it.
pub fn shift_worse(
    before: &QosSnapshot,
    after: &QosSnapshot,
    loss_margin: f64,
    latency: (f64, f64),
    jitter: (f64, f64),
) -> Option<String> {
    if after.loss_permille > before.loss_permille + loss_margin {
        return Some(format!(
            "loss rose from {:.0} to {:.0} ‰",
            before.loss_permille, after.loss_permille
        ));
    }
    let worse = |b: f64, a: f64, (ratio, floor): (f64, f64)| a > b + (b * ratio).max(floor);
    if worse(before.rtt_p95_ms, after.rtt_p95_ms, latency) {
        return Some(format!(
            "p95 RTT rose from {:.0} to {:.0} ms",
            before.rtt_p95_ms, after.rtt_p95_ms
        ));
    }
    if worse(before.jitter_ms, after.jitter_ms, jitter) {
        return Some(format!(
            "jitter rose from {:.1} to {:.1} ms",
            before.jitter_ms, after.jitter_ms
        ));
    }
    None
}

/// One shift toward this device, with the QoS before and (once judged) after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftRecord {
    pub from: DeviceId,
    pub kind: ShardKind,
    pub units: u32,
    pub at_ms: u64,
    /// The potential that chose it (reputation × demand × gain ÷ cost).
    pub potential: f64,
    pub before: QosSnapshot,
    pub after: Option<QosSnapshot>,
    /// "kept (+68 points)" or "rolled back: p95 RTT rose from 40 to 120 ms".
    pub outcome: Option<String>,
}

/// Shift records kept per device.
pub const SHIFTS_KEPT: usize = 8;

/// Everything learned on one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackState {
    /// The engine's latest decisions on the device, newest last.
    pub decisions: Vec<Decision>,
    pub classes: Vec<ClassLearning>,
    /// Time between the device's reports, ms: how late a reactive policy
    /// is at an onset.
    pub report_interval_ms: u64,
    /// QoS points ([`QosSnapshot::gain_over`]) observed after this
    /// device's recent shifts, EWMA; `None` before the first was judged.
    pub shift_gain: Option<f64>,
    /// Shifts judged on this device (gain samples).
    pub shifts_judged: u32,
    /// QoS of the latest report (the "before" of the next shift).
    pub last_qos: Option<QosSnapshot>,
    /// Recent shifts toward the device, newest last.
    pub shifts: Vec<ShiftRecord>,
    /// The hour (since the epoch) and the completed-work points given in it.
    pub work_hour: u64,
    pub work_points: f64,
    /// Decisions made since the service last took them for the device's
    /// history (see [`crate::history`]). Never persisted: the service
    /// takes them into the same store step as the state that made them.
    #[serde(skip)]
    pub fresh: Outbox<Decision>,
    /// Who pinned each shard (`pin:<shard>`) and who drained the device
    /// (`drain`), for the explanations. Last field (issue 20): older
    /// records decode with it empty (see `decode_device_state`).
    pub operator_marks: BTreeMap<String, String>,
}

/// Items handed from the engine to the service, not part of the state:
/// ignored by equality (a restored state equals the one saved) and by
/// serde.
#[derive(Debug, Clone)]
pub struct Outbox<T>(pub Vec<T>);

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> PartialEq for Outbox<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl FeedbackState {
    /// Records a shift toward the device (bounded).
    pub fn shift_started(&mut self, record: ShiftRecord) {
        self.shifts.push(record);
        if self.shifts.len() > SHIFTS_KEPT {
            let excess = self.shifts.len() - SHIFTS_KEPT;
            self.shifts.drain(..excess);
        }
    }

    /// Judges the shift from `from` started at `at_ms` with the QoS now:
    /// updates the learned gain and returns (before, after, gain).
    pub fn shift_judged(
        &mut self,
        from: &DeviceId,
        at_ms: u64,
        outcome: String,
    ) -> Option<(QosSnapshot, QosSnapshot, f64)> {
        let after = self.last_qos?;
        let rec = self
            .shifts
            .iter_mut()
            .rev()
            .find(|r| &r.from == from && r.at_ms == at_ms && r.after.is_none())?;
        rec.after = Some(after);
        let gain = after.gain_over(&rec.before);
        rec.outcome = Some(outcome);
        let before = rec.before;
        self.shift_gain = Some(match self.shift_gain {
            None => gain,
            Some(g) => g + 0.3 * (gain - g),
        });
        self.shifts_judged = self.shifts_judged.saturating_add(1);
        Some((before, after, gain))
    }

    /// The completed-work bonus for one more completed grant at `now`:
    /// `per_grant`, but at most `per_hour` points in one hour.
    pub fn work_bonus(&mut self, now: u64, per_grant: f64, per_hour: f64) -> f64 {
        let hour = now / 3_600_000;
        if hour != self.work_hour {
            self.work_hour = hour;
            self.work_points = 0.0;
        }
        let gain = per_grant.min(per_hour - self.work_points).max(0.0);
        self.work_points += gain;
        gain
    }

    /// Records a decision (the same subject and text again only refreshes
    /// its time: a plan re-made every tick is one decision, not many).
    pub fn decide(&mut self, at_ms: u64, kind: DecisionKind, subject: &str, explanation: String) {
        if let Some(d) = self
            .decisions
            .iter_mut()
            .rev()
            .find(|d| d.kind == kind && d.subject == subject)
        {
            if d.explanation == explanation {
                d.at_ms = at_ms;
                return;
            }
        }
        tracing::debug!(?kind, subject, %explanation, "policy decision");
        let decision = Decision {
            at_ms,
            kind,
            subject: subject.to_owned(),
            explanation,
        };
        // Bounded like the log: a device nobody takes history from (the
        // simulation) keeps no more than the log does.
        if self.fresh.0.len() >= DECISIONS_KEPT {
            self.fresh.0.remove(0);
        }
        self.fresh.0.push(decision.clone());
        self.decisions.push(decision);
        if self.decisions.len() > DECISIONS_KEPT {
            let excess = self.decisions.len() - DECISIONS_KEPT;
            self.decisions.drain(..excess);
        }
    }

    pub fn class_mut(&mut self, class: TrafficClass) -> &mut ClassLearning {
        let i = match self.classes.iter().position(|c| c.class == class) {
            Some(i) => i,
            None => {
                self.classes.push(ClassLearning::new(class));
                self.classes.len() - 1
            }
        };
        &mut self.classes[i]
    }

    pub fn class(&self, class: TrafficClass) -> Option<&ClassLearning> {
        self.classes.iter().find(|c| c.class == class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_points() {
        for (x, p) in [
            (0.0, 0.5),
            (1.96, 0.975),
            (-1.0, 0.158_655),
            (3.0, 0.998_65),
        ] {
            assert!((normal_cdf(x) - p).abs() < 1e-4, "{x}: {}", normal_cdf(x));
        }
    }
}
