//! Seed 002's loan record and good-neighbour reports (issue 17): how a
//! device borrows (how often, how successfully), whether it returns on
//! time and in full, what its loans did to the lender's QoS, the harm its
//! neighbours report (weighted by the reporter's reputation, bounded per
//! reporter), and its consent policy as a lender.
//!
//! The rules are pure functions over a device's [`LendingState`] and the
//! [`LendingConfig`]; the engine (`engine/lending.rs`, `engine/loans.rs`)
//! calls them with `now` and applies what they return. Every decision
//! yields a sentence for the operator, kept in [`LendingState::decisions`]
//! (bounded) and shown by `GET /v1/devices/{id}`.
//!
//! # Attribution of harm
//!
//! A lender cannot know who borrows its units: borrowing is the
//! allocator's bookkeeping (the lender's budget shrinks, the borrower's
//! grows; nothing of it runs on the lender), and telling each lender its
//! borrowers would need a new instruction operation that agents of older
//! releases refuse. So the device claims only what it can measure — in its
//! signed report ([`shardline_shared::msg::LendingReport`]), a traffic
//! class of its own whose loss or RTT is worse than its own baseline — and
//! the engine, which knows whether the device was lending during the
//! report's window and to whom, attributes the harm to those borrowers,
//! split by the units each borrowed. A report made while the device was not
//! lending is ignored ([`Ignored::NotLending`]); a device can never be its
//! own borrower, and the engine refuses that case anyway
//! ([`Ignored::SelfReport`]). Only what a device signed moves reputation
//! (the design card's trust boundary): the reporter's own signed report
//! moves its borrowers', bounded as below.
//!
//! # Rules and their parameters ([`LendingConfig`])
//!
//! - **Frequency** (`max_borrows_per_hour`): a device granted that many
//!   loans within an hour is refused further ones until the hour ends
//!   (`BorrowRefusal::TooFrequent`); the first refusal of an hour costs
//!   `churn_penalty`.
//! - **Success**: requests, grants and refusals are counted (shown, not
//!   charged: a refusal is the pool's state, not the device's fault).
//! - **Return** (`return_grace_ms`, `timely_return`, `late_return`): when
//!   a loan ends (expiry or recall) the borrower must stop the shards the
//!   units paid for; its first report `return_grace_ms` after that is
//!   judged: running shards within its budget earn `timely_return`, more
//!   costs `late_return` (incomplete or late return).
//! - **Impact on the lender** (`min_qos_drop`): the lender's QoS score
//!   (0–1000, computed by the engine from its reports) when it started
//!   lending and its worst while lending; a loan after which the drop was
//!   at least `min_qos_drop` counts as harmful on the borrower's record,
//!   and a harm report is only believed when the reporter's QoS score now
//!   is at least `min_qos_drop` below its score when it started lending
//!   (corroboration by the engine's own arithmetic, not the claim alone).
//! - **Good-neighbour reports** (`harm_penalty`, `reporter_min_reputation`,
//!   `per_reporter_cap`, `per_borrower_cap`, `harm_window_ms`,
//!   `max_reporters`): penalty = `harm_penalty` × severity (0–1, from the
//!   worst observation) × reporter weight × the borrower's share of the
//!   reporter's lent units. The weight is 0 below
//!   `reporter_min_reputation` and score/100 above it, so devices below
//!   the threshold — a low-reputation group however large — move nothing.
//!   Per `harm_window_ms`, one reporter takes at most `per_reporter_cap`
//!   points from one borrower and all reporters together at most
//!   `per_borrower_cap`, so no group of reporters can push a borrower
//!   down by more than that per window.
//! - **Consent** ([`shardline_shared::msg::LendConsent`], from the lender's
//!   signed report): at most so many units per kind, only within the UTC
//!   hours given. A loan that only consent prevented is refused as
//!   `BorrowRefusal::NoConsent`.
//! - **Proactive offers** (`underuse_ms`): units a device has left spare
//!   (within its consent) for `underuse_ms` are offered to its pool: its
//!   peers refused for budget are re-planned at the next tick, and offering
//!   lenders are chosen first.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{HarmObservation, LendConsent, MAX_HARM_OBSERVATIONS};
use std::collections::BTreeMap;

/// Seed 002's lending parameters (`[policy.engine.lending]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LendingConfig {
    /// Loans granted to one device per hour before it is refused.
    pub max_borrows_per_hour: u32,
    /// Reputation change (≤ 0) at the first refusal of an hour for frequency.
    pub churn_penalty: f64,
    /// Reputation change (≥ 0) for a loan returned on time and in full.
    pub timely_return: f64,
    /// Reputation change (≤ 0) for a loan returned late or in part.
    pub late_return: f64,
    /// The borrower has this long after a loan ends to stop its shards.
    pub return_grace_ms: u64,
    /// Reporters below this reputation carry no weight.
    pub reporter_min_reputation: f64,
    /// Reputation change (≤ 0) of a harm report at full severity, full
    /// weight and the whole of the reporter's lent units.
    pub harm_penalty: f64,
    /// Most points one reporter takes from one borrower per window.
    pub per_reporter_cap: f64,
    /// Most points all reporters together take from one borrower per window.
    pub per_borrower_cap: f64,
    pub harm_window_ms: u64,
    /// QoS score drop (0–1000 scale) that corroborates a harm report and
    /// marks a loan harmful to its lender.
    pub min_qos_drop: f64,
    /// Units spare this long are offered to the pool.
    pub underuse_ms: u64,
    /// Reporters tracked per borrower per window (bounds the state).
    pub max_reporters: usize,
    /// Decisions kept per device for the operator.
    pub decisions_len: usize,
}

impl Default for LendingConfig {
    fn default() -> Self {
        Self {
            max_borrows_per_hour: 6,
            churn_penalty: -0.5,
            timely_return: 0.5,
            late_return: -2.0,
            // As long as a deactivation may take to show in a report
            // (`outside_profile_grace_ms`).
            return_grace_ms: 180_000,
            // The starting reputation: a fresh device's report counts, one
            // that has been penalised below it does not.
            reporter_min_reputation: 50.0,
            harm_penalty: -1.5,
            per_reporter_cap: 2.0,
            // Below the gap between a device trusted for shifting (50) and
            // one quota-cut (46 for data, `data_quota_curve`; 45 for
            // compute): reports alone never cut a device's quota within
            // one window.
            per_borrower_cap: 4.0,
            // The reputation half-life: a window's harm has mostly decayed
            // when the next window's may add up.
            harm_window_ms: 6 * 3_600_000,
            // 2 % more byte-weighted loss.
            min_qos_drop: 20.0,
            underuse_ms: 15 * 60_000,
            max_reporters: 32,
            decisions_len: 16,
        }
    }
}

impl LendingConfig {
    /// Values the engine cannot work with, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let signs = [
            ("churn_penalty", self.churn_penalty <= 0.0),
            ("late_return", self.late_return <= 0.0),
            ("harm_penalty", self.harm_penalty <= 0.0),
            ("timely_return", self.timely_return >= 0.0),
            ("per_reporter_cap", self.per_reporter_cap >= 0.0),
            ("per_borrower_cap", self.per_borrower_cap >= 0.0),
            ("min_qos_drop", self.min_qos_drop >= 0.0),
        ];
        for (field, ok) in signs {
            if !ok {
                return Err((field, "has the wrong sign (or is not a number)".into()));
            }
        }
        if self.harm_window_ms == 0 {
            return Err(("harm_window_ms", "must be > 0".into()));
        }
        Ok(())
    }
}

/// One decision about lending, in words, for the operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub text: String,
}

/// A loan that ended: the borrower's first report after `due_ms` says
/// whether it stopped what the units paid for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingReturn {
    pub due_ms: u64,
    pub lender: DeviceId,
    pub units: u32,
}

/// A device's lending record, as borrower, lender and reporter (persisted
/// in `DeviceState::lending`; the default is its state before any loan).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LendingState {
    // --- as a borrower
    pub borrow_requests: u64,
    pub borrow_granted: u64,
    pub borrow_refused: u64,
    /// Start of the hour `borrows_this_hour` counts in.
    pub hour_start_ms: u64,
    pub borrows_this_hour: u32,
    /// The hour whose churn was charged (once per hour).
    pub churn_charged_at_ms: Option<u64>,
    pub returns_timely: u64,
    pub returns_late: u64,
    pub pending_return: Option<PendingReturn>,
    /// Loans after which the lender's QoS had dropped by `min_qos_drop`.
    pub loans_harmful: u64,
    /// Start of the harm window, points taken in it, and by whom.
    pub harm_window_start_ms: u64,
    pub harm_received: f64,
    pub harm_by_reporter: BTreeMap<DeviceId, f64>,
    // --- as a lender
    /// QoS score when it started lending (set while it lends).
    pub qos_at_lend_start: Option<f64>,
    /// Its worst QoS score while lending.
    pub worst_qos_while_lending: Option<f64>,
    /// Its consent as its latest report gave it (`None`: lends any spare).
    pub consent: Option<LendConsent>,
    /// Since when it has had spare units; offered once `underuse_ms` passed.
    pub underused_since_ms: Option<u64>,
    /// Units offered to the pool now, per kind (compute, data).
    pub offer: [u32; 2],
    // --- as a reporter
    pub harm_accepted: u64,
    /// Harm reports ignored, by [`Ignored::as_str`].
    pub harm_ignored: BTreeMap<String, u64>,
    /// The latest decisions, oldest first.
    pub decisions: Vec<Decision>,
}

impl LendingState {
    /// Records a decision for the operator (a repeat of the latest is not
    /// recorded again: a shortage re-planned at every report says the same).
    pub fn note(&mut self, cfg: &LendingConfig, now: u64, text: String) {
        tracing::debug!(decision = %text, "lending");
        if self.decisions.last().is_some_and(|d| d.text == text) {
            return;
        }
        self.decisions.push(Decision { at_ms: now, text });
        if self.decisions.len() > cfg.decisions_len {
            let excess = self.decisions.len() - cfg.decisions_len;
            self.decisions.drain(..excess);
        }
    }

    fn roll_hour(&mut self, now: u64) {
        if now.saturating_sub(self.hour_start_ms) >= HOUR_MS {
            self.hour_start_ms = now - now % HOUR_MS;
            self.borrows_this_hour = 0;
        }
    }

    fn roll_harm_window(&mut self, cfg: &LendingConfig, now: u64) {
        if now.saturating_sub(self.harm_window_start_ms) >= cfg.harm_window_ms {
            self.harm_window_start_ms = now;
            self.harm_received = 0.0;
            self.harm_by_reporter.clear();
        }
    }

    fn count_ignored(&mut self, why: Ignored) {
        *self
            .harm_ignored
            .entry(why.as_str().to_owned())
            .or_default() += 1;
    }
}

const HOUR_MS: u64 = 3_600_000;

// --------------------------------------------------------------- frequency

/// The frequency rule's verdict on a borrow request.
#[derive(Debug, Clone, PartialEq)]
pub enum Frequency {
    Allowed,
    /// Refused; `charge` is the reputation change (0 once charged this hour).
    TooFrequent {
        charge: f64,
        text: String,
    },
}

/// Frequency rule: at most `max_borrows_per_hour` grants per hour; the
/// first refusal of an hour costs `churn_penalty`. Updates the hour window.
pub fn frequency(cfg: &LendingConfig, st: &mut LendingState, now: u64) -> Frequency {
    st.roll_hour(now);
    if st.borrows_this_hour < cfg.max_borrows_per_hour {
        return Frequency::Allowed;
    }
    let charged = st.churn_charged_at_ms == Some(st.hour_start_ms);
    st.churn_charged_at_ms = Some(st.hour_start_ms);
    let charge = if charged { 0.0 } else { cfg.churn_penalty };
    Frequency::TooFrequent {
        charge,
        text: format!(
            "borrow refused: {} loans granted this hour (limit {}){}",
            st.borrows_this_hour,
            cfg.max_borrows_per_hour,
            if charged {
                String::new()
            } else {
                format!("; reputation {charge:+.1} for churn")
            }
        ),
    }
}

/// Counts one borrow request and its outcome.
pub fn record_request(st: &mut LendingState, now: u64, granted: bool) {
    st.roll_hour(now);
    st.borrow_requests = st.borrow_requests.saturating_add(1);
    if granted {
        st.borrow_granted = st.borrow_granted.saturating_add(1);
        st.borrows_this_hour = st.borrows_this_hour.saturating_add(1);
    } else {
        st.borrow_refused = st.borrow_refused.saturating_add(1);
    }
}

// ----------------------------------------------------------------- consent

/// What a lender lends under its consent: `spare` cut to its per-kind
/// maximum less what it already lends, nothing outside its hours. The text
/// says why it was cut (`None`: not cut).
pub fn consented_spare(
    consent: Option<&LendConsent>,
    spare: [u32; 2],
    lent: [u32; 2],
    now: u64,
) -> ([u32; 2], Option<String>) {
    let Some(c) = consent else {
        return (spare, None);
    };
    if !c.open_at(now) {
        let why = format!(
            "consents to lend only from {:02}:00 to {:02}:00 UTC",
            c.from_hour_utc % 24,
            c.to_hour_utc % 24
        );
        return ([0, 0], (spare != [0, 0]).then_some(why));
    }
    let max = [u32::from(c.max_compute_units), u32::from(c.max_data_units)];
    let out = [0, 1].map(|k| spare[k].min(max[k].saturating_sub(lent[k])));
    let why = (out != spare).then(|| {
        format!(
            "consents to lend at most {} compute and {} data units ({} and {} lent)",
            max[0], max[1], lent[0], lent[1]
        )
    });
    (out, why)
}

// --------------------------------------------------------------- harm rule

/// Why a harm report moved nothing (counted on the reporter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ignored {
    /// The reporter named itself (cannot happen through the engine's
    /// attribution; refused anyway).
    SelfReport,
    /// The reporter was not lending during the whole report window.
    NotLending,
    /// No observation was worse than its baseline.
    NoHarm,
    /// The engine's own QoS score of the reporter did not drop by
    /// `min_qos_drop` since it started lending.
    NotCorroborated,
    /// The reporter's reputation is below `reporter_min_reputation`.
    LowReputation,
    /// The reporter's (or all reporters') cap for this borrower is spent.
    Capped,
    /// More observations than [`MAX_HARM_OBSERVATIONS`]: the rest are unread.
    TooMany,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::SelfReport => "self_report",
            Ignored::NotLending => "not_lending",
            Ignored::NoHarm => "no_harm",
            Ignored::NotCorroborated => "not_corroborated",
            Ignored::LowReputation => "low_reputation",
            Ignored::Capped => "capped",
            Ignored::TooMany => "too_many_observations",
        }
    }
}

/// Severity 0–1 of a report's observations: the worst of (extra loss / 10 %)
/// and (RTT / baseline − 1), each clamped; an observation no worse than its
/// baseline is 0. Reads at most [`MAX_HARM_OBSERVATIONS`].
pub fn severity(obs: &[HarmObservation]) -> f64 {
    obs.iter()
        .take(MAX_HARM_OBSERVATIONS)
        .map(|o| {
            let loss = f64::from(o.loss_permille.min(1000))
                - f64::from(o.baseline_loss_permille.min(1000));
            let loss = (loss / 100.0).clamp(0.0, 1.0);
            let rtt = match (o.baseline_rtt_p95_us, o.rtt_p95_us) {
                (Some(b), Some(r)) if b > 0 => (f64::from(r) / f64::from(b) - 1.0).clamp(0.0, 1.0),
                _ => 0.0,
            };
            loss.max(rtt)
        })
        .fold(0.0, f64::max)
}

/// The weight of a reporter's word: 0 below `reporter_min_reputation`,
/// score/100 at or above it.
pub fn reporter_weight(cfg: &LendingConfig, score: f64) -> f64 {
    // NaN carries no weight either.
    if score.is_nan() || score < cfg.reporter_min_reputation {
        return 0.0;
    }
    (score / 100.0).clamp(0.0, 1.0)
}

/// What the engine knows about a harm report's reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct Reporter<'a> {
    pub device: &'a DeviceId,
    pub score: f64,
    /// Its QoS score now and when it started lending (the engine's own).
    pub qos_now: Option<f64>,
    pub qos_at_lend_start: Option<f64>,
    /// Its borrowers whose loans covered the report window, with the
    /// units each borrowed from it.
    pub borrowers: Vec<(DeviceId, u32)>,
}

/// The reporter-level screen of a harm report: `Ok` with the penalty per
/// borrower before caps (positive points), or why it is ignored.
pub fn screen(
    cfg: &LendingConfig,
    r: &Reporter<'_>,
    obs: &[HarmObservation],
) -> Result<Vec<(DeviceId, f64)>, Ignored> {
    if r.borrowers.iter().any(|(b, _)| b == r.device) {
        return Err(Ignored::SelfReport);
    }
    let total: u32 = r.borrowers.iter().map(|(_, u)| *u).sum();
    if total == 0 {
        return Err(Ignored::NotLending);
    }
    let sev = severity(obs);
    if sev <= 0.0 {
        return Err(Ignored::NoHarm);
    }
    let drop = match (r.qos_at_lend_start, r.qos_now) {
        (Some(start), Some(now)) => start - now,
        _ => 0.0,
    };
    if drop.is_nan() || drop < cfg.min_qos_drop {
        return Err(Ignored::NotCorroborated);
    }
    let w = reporter_weight(cfg, r.score);
    if w <= 0.0 {
        return Err(Ignored::LowReputation);
    }
    let base = -cfg.harm_penalty * sev * w;
    Ok(r.borrowers
        .iter()
        .map(|(b, u)| (b.clone(), base * f64::from(*u) / f64::from(total)))
        .collect())
}

/// Charges `points` (≥ 0) of harm from `reporter` to a borrower, within the
/// per-reporter and per-borrower caps of the current window. Returns the
/// points actually charged (what the borrower's reputation loses).
pub fn charge(
    cfg: &LendingConfig,
    borrower: &mut LendingState,
    reporter: &DeviceId,
    points: f64,
    now: u64,
) -> f64 {
    borrower.roll_harm_window(cfg, now);
    if points.is_nan() || points <= 0.0 {
        return 0.0;
    }
    let known = borrower.harm_by_reporter.contains_key(reporter);
    if !known && borrower.harm_by_reporter.len() >= cfg.max_reporters {
        return 0.0;
    }
    let by_r = borrower
        .harm_by_reporter
        .get(reporter)
        .copied()
        .unwrap_or(0.0);
    let left = (cfg.per_reporter_cap - by_r)
        .min(cfg.per_borrower_cap - borrower.harm_received)
        .max(0.0);
    let applied = points.min(left);
    if applied <= 0.0 {
        return 0.0;
    }
    borrower.harm_received += applied;
    *borrower
        .harm_by_reporter
        .entry(reporter.clone())
        .or_default() += applied;
    applied
}

/// Counts an ignored harm report on its reporter and explains it.
pub fn ignore(cfg: &LendingConfig, reporter: &mut LendingState, why: Ignored, now: u64) {
    reporter.count_ignored(why);
    let text = match why {
        Ignored::SelfReport => "harm report ignored: it names the reporter itself".to_owned(),
        Ignored::NotLending => {
            "harm report ignored: the device was not lending during its window".to_owned()
        }
        Ignored::NoHarm => "harm report ignored: nothing worse than its baseline".to_owned(),
        Ignored::NotCorroborated => format!(
            "harm report ignored: its QoS score did not drop by {} since it started lending",
            cfg.min_qos_drop
        ),
        Ignored::LowReputation => format!(
            "harm report ignored: the reporter's reputation is below {}",
            cfg.reporter_min_reputation
        ),
        Ignored::Capped => {
            "harm report ignored: its cap for the borrower is spent this window".to_owned()
        }
        Ignored::TooMany => {
            format!("harm report cut to {MAX_HARM_OBSERVATIONS} observations (more were sent)")
        }
    };
    reporter.note(cfg, now, text);
}

// ------------------------------------------------------------- the lender

/// The lender started lending (its first loan): its QoS score then is the
/// baseline its harm reports are judged against.
pub fn lend_started(st: &mut LendingState, qos_now: Option<f64>) {
    if st.qos_at_lend_start.is_none() {
        st.qos_at_lend_start = qos_now;
        st.worst_qos_while_lending = qos_now;
    }
}

/// A report of the lender while it lends: its worst QoS score so far.
pub fn observe_lender_qos(st: &mut LendingState, qos: f64) {
    if st.qos_at_lend_start.is_some() {
        let w = st.worst_qos_while_lending.get_or_insert(qos);
        *w = w.min(qos);
    }
}

/// The lender's QoS drop while lending (0 when unknown).
pub fn lender_qos_drop(st: &LendingState) -> f64 {
    match (st.qos_at_lend_start, st.worst_qos_while_lending) {
        (Some(a), Some(w)) => (a - w).max(0.0),
        _ => 0.0,
    }
}

/// The lender lends nothing any more: its baseline is forgotten.
pub fn lend_stopped(st: &mut LendingState) {
    st.qos_at_lend_start = None;
    st.worst_qos_while_lending = None;
}

// ----------------------------------------------------------------- returns

/// The return rule's verdict on a borrower's report after a loan ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Return {
    /// Not due yet.
    Pending,
    Timely {
        delta: f64,
        text: String,
    },
    Late {
        delta: f64,
        text: String,
    },
}

/// Judges a pending return: `running` are the units of the shards the
/// borrower's report shows running, `budget` its budget now, per kind.
pub fn judge_return(
    cfg: &LendingConfig,
    pending: &PendingReturn,
    running: [u32; 2],
    budget: [u32; 2],
    now: u64,
) -> Return {
    if now < pending.due_ms {
        return Return::Pending;
    }
    let over = [0, 1].map(|k| running[k].saturating_sub(budget[k]));
    if over == [0, 0] {
        Return::Timely {
            delta: cfg.timely_return,
            text: format!(
                "returned {} unit(s) borrowed from {} on time: reputation {:+.1}",
                pending.units, pending.lender, cfg.timely_return
            ),
        }
    } else {
        Return::Late {
            delta: cfg.late_return,
            text: format!(
                "late or incomplete return of {} unit(s) borrowed from {}: still runs {} compute \
                 and {} data unit(s) over its budget {} ms after the loan ended: reputation {:+.1}",
                pending.units,
                pending.lender,
                over[0],
                over[1],
                now.saturating_sub(pending.due_ms.saturating_sub(cfg.return_grace_ms)),
                cfg.late_return
            ),
        }
    }
}

// ------------------------------------------------------------------ offers

/// Proactive offers: units spare (within consent) for `underuse_ms` are
/// offered. Returns true when an offer appears or grows (peers should look).
pub fn update_offer(cfg: &LendingConfig, st: &mut LendingState, spare: [u32; 2], now: u64) -> bool {
    if spare == [0, 0] {
        st.underused_since_ms = None;
        st.offer = [0, 0];
        return false;
    }
    let since = *st.underused_since_ms.get_or_insert(now);
    let before = st.offer;
    st.offer = if now.saturating_sub(since) >= cfg.underuse_ms {
        spare
    } else {
        [0, 0]
    };
    (0..2).any(|k| st.offer[k] > before[k])
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::TrafficClass;

    fn obs(base_loss: u16, loss: u16, base_rtt: Option<u32>, rtt: Option<u32>) -> HarmObservation {
        HarmObservation {
            class: TrafficClass::Bulk,
            baseline_loss_permille: base_loss,
            loss_permille: loss,
            baseline_rtt_p95_us: base_rtt,
            rtt_p95_us: rtt,
        }
    }

    type ConsentRow = (
        &'static str,
        Option<LendConsent>,
        [u32; 2],
        [u32; 2],
        [u32; 2],
        bool,
    );
    type ScreenRow<'a> = (
        &'static str,
        Reporter<'a>,
        Vec<HarmObservation>,
        Result<Vec<(DeviceId, f64)>, Ignored>,
    );

    #[test]
    fn severity_table() {
        let rows: [(&str, Vec<HarmObservation>, f64); 7] = [
            ("nothing reported", vec![], 0.0),
            ("no worse", vec![obs(10, 10, Some(100), Some(100))], 0.0),
            ("better", vec![obs(50, 10, Some(200), Some(100))], 0.0),
            ("5 % more loss", vec![obs(0, 50, None, None)], 0.5),
            ("loss capped at 1", vec![obs(0, 1000, None, None)], 1.0),
            ("RTT 1.5x", vec![obs(0, 0, Some(100), Some(150))], 0.5),
            (
                "worst observation wins",
                vec![obs(0, 20, None, None), obs(0, 0, Some(100), Some(190))],
                0.9,
            ),
        ];
        for (case, o, want) in rows {
            assert!(
                (severity(&o) - want).abs() < 1e-9,
                "{case}: {}",
                severity(&o)
            );
        }
        // Observations past the cap are not read.
        let mut many = vec![obs(0, 0, None, None); MAX_HARM_OBSERVATIONS];
        many.push(obs(0, 1000, None, None));
        assert_eq!(severity(&many), 0.0);
        // A zero baseline RTT never divides by zero.
        assert_eq!(severity(&[obs(0, 0, Some(0), Some(u32::MAX))]), 0.0);
    }

    #[test]
    fn reporter_weight_table() {
        let cfg = LendingConfig::default();
        for (score, want) in [
            (0.0, 0.0),
            (49.9, 0.0),
            (50.0, 0.5),
            (80.0, 0.8),
            (100.0, 1.0),
            (f64::NAN, 0.0),
        ] {
            assert_eq!(reporter_weight(&cfg, score), want, "score {score}");
        }
    }

    #[test]
    fn frequency_table() {
        let cfg = LendingConfig {
            max_borrows_per_hour: 2,
            ..LendingConfig::default()
        };
        let mut st = LendingState::default();
        let t0 = 10 * HOUR_MS;
        // Two grants in the hour are allowed.
        for _ in 0..2 {
            assert_eq!(frequency(&cfg, &mut st, t0), Frequency::Allowed);
            record_request(&mut st, t0, true);
        }
        // The third is refused and charged once…
        match frequency(&cfg, &mut st, t0 + 1) {
            Frequency::TooFrequent { charge, .. } => assert_eq!(charge, cfg.churn_penalty),
            f => panic!("{f:?}"),
        }
        // …the fourth is refused, not charged again.
        match frequency(&cfg, &mut st, t0 + 2) {
            Frequency::TooFrequent { charge, text } => {
                assert_eq!(charge, 0.0);
                assert!(text.contains("2 loans granted this hour"), "{text}");
            }
            f => panic!("{f:?}"),
        }
        // The next hour starts over.
        assert_eq!(frequency(&cfg, &mut st, t0 + HOUR_MS), Frequency::Allowed);
        // Refusals are counted, never as grants.
        record_request(&mut st, t0 + HOUR_MS, false);
        assert_eq!(
            (st.borrow_requests, st.borrow_granted, st.borrow_refused),
            (3, 2, 1)
        );
    }

    #[test]
    fn consent_table() {
        let c = |max_c, max_d, from, to| LendConsent {
            max_compute_units: max_c,
            max_data_units: max_d,
            from_hour_utc: from,
            to_hour_utc: to,
        };
        let noon = 12 * HOUR_MS;
        // (case, consent, spare, already lent, lendable, cut)
        let rows: [ConsentRow; 6] = [
            (
                "no consent given: any spare",
                None,
                [2, 3],
                [0, 0],
                [2, 3],
                false,
            ),
            (
                "within limits",
                Some(c(5, 5, 0, 0)),
                [2, 3],
                [0, 0],
                [2, 3],
                false,
            ),
            (
                "cut to the maximum",
                Some(c(1, 2, 0, 0)),
                [2, 3],
                [0, 0],
                [1, 2],
                true,
            ),
            (
                "already lent counts",
                Some(c(1, 2, 0, 0)),
                [2, 3],
                [1, 1],
                [0, 1],
                true,
            ),
            (
                "outside the hours",
                Some(c(5, 5, 22, 6)),
                [2, 3],
                [0, 0],
                [0, 0],
                true,
            ),
            (
                "inside the hours",
                Some(c(5, 5, 8, 18)),
                [2, 3],
                [0, 0],
                [2, 3],
                false,
            ),
        ];
        for (case, consent, spare, lent, want, cut) in rows {
            let (got, why) = consented_spare(consent.as_ref(), spare, lent, noon);
            assert_eq!(got, want, "{case}");
            assert_eq!(why.is_some(), cut, "{case}: {why:?}");
        }
    }

    fn reporter<'a>(me: &'a DeviceId, score: f64, borrowers: Vec<(DeviceId, u32)>) -> Reporter<'a> {
        Reporter {
            device: me,
            score,
            qos_now: Some(900.0),
            qos_at_lend_start: Some(1000.0),
            borrowers,
        }
    }

    #[test]
    fn screen_table() {
        let cfg = LendingConfig::default();
        let me = DeviceId::new("lender").unwrap();
        let b = DeviceId::new("borrower").unwrap();
        let c = DeviceId::new("other").unwrap();
        let harm = vec![obs(0, 100, None, None)]; // severity 1
        let uncorroborated = Reporter {
            qos_now: Some(995.0),
            ..reporter(&me, 80.0, vec![(b.clone(), 1)])
        };
        let rows: [ScreenRow<'_>; 7] = [
            (
                "self report",
                reporter(&me, 80.0, vec![(me.clone(), 1)]),
                harm.clone(),
                Err(Ignored::SelfReport),
            ),
            (
                "not lending",
                reporter(&me, 80.0, vec![]),
                harm.clone(),
                Err(Ignored::NotLending),
            ),
            (
                "no harm",
                reporter(&me, 80.0, vec![(b.clone(), 1)]),
                vec![obs(5, 5, None, None)],
                Err(Ignored::NoHarm),
            ),
            (
                "not corroborated",
                uncorroborated,
                harm.clone(),
                Err(Ignored::NotCorroborated),
            ),
            (
                "low reputation",
                reporter(&me, 30.0, vec![(b.clone(), 1)]),
                harm.clone(),
                Err(Ignored::LowReputation),
            ),
            (
                "one borrower: full penalty × weight",
                reporter(&me, 80.0, vec![(b.clone(), 1)]),
                harm.clone(),
                Ok(vec![(b.clone(), 1.5 * 0.8)]),
            ),
            (
                "split by units",
                reporter(&me, 100.0, vec![(b.clone(), 1), (c.clone(), 2)]),
                harm.clone(),
                Ok(vec![(b.clone(), 0.5), (c.clone(), 1.0)]),
            ),
        ];
        for (case, r, o, want) in rows {
            let got = screen(&cfg, &r, &o);
            match (&got, &want) {
                (Ok(g), Ok(w)) => {
                    assert_eq!(g.len(), w.len(), "{case}");
                    for ((gd, gp), (wd, wp)) in g.iter().zip(w) {
                        assert_eq!(gd, wd, "{case}");
                        assert!((gp - wp).abs() < 1e-9, "{case}: {gp} vs {wp}");
                    }
                }
                _ => assert_eq!(got, want, "{case}"),
            }
        }
    }

    #[test]
    fn charge_table() {
        let cfg = LendingConfig::default(); // 2 per reporter, 4 per borrower, 6 h
        let r = |n: &str| DeviceId::new(n).unwrap();
        let mut st = LendingState::default();
        // (case, reporter, points, now, charged)
        let rows = [
            ("within the reporter's cap", "a", 1.5, 0, 1.5),
            ("reporter cap: only 0.5 left", "a", 1.5, 1, 0.5),
            ("reporter cap spent", "a", 1.0, 2, 0.0),
            ("another reporter", "b", 2.0, 3, 2.0),
            ("borrower cap: 4 in all", "c", 2.0, 4, 0.0),
            ("nothing negative", "d", -3.0, 5, 0.0),
            ("a new window", "a", 1.0, 6 * HOUR_MS, 1.0),
        ];
        for (case, rep, points, now, want) in rows {
            let got = charge(&cfg, &mut st, &r(rep), points, now);
            assert!((got - want).abs() < 1e-9, "{case}: {got}");
        }
        // The reporter table is bounded.
        let small = LendingConfig {
            max_reporters: 1,
            ..cfg
        };
        let mut st = LendingState::default();
        assert_eq!(charge(&small, &mut st, &r("a"), 1.0, 0), 1.0);
        assert_eq!(charge(&small, &mut st, &r("b"), 1.0, 0), 0.0);
    }

    #[test]
    fn return_table() {
        let cfg = LendingConfig::default();
        let p = PendingReturn {
            due_ms: 1000,
            lender: DeviceId::new("lender").unwrap(),
            units: 1,
        };
        let rows = [
            ("not due", [9, 9], [3, 3], 999, "pending"),
            ("within budget", [3, 3], [3, 3], 1000, "timely"),
            ("over in data", [3, 4], [3, 3], 1000, "late"),
            ("over in compute", [4, 0], [3, 3], 5000, "late"),
        ];
        for (case, running, budget, now, want) in rows {
            let got = match judge_return(&cfg, &p, running, budget, now) {
                Return::Pending => "pending",
                Return::Timely { delta, .. } => {
                    assert_eq!(delta, cfg.timely_return);
                    "timely"
                }
                Return::Late { delta, text } => {
                    assert_eq!(delta, cfg.late_return);
                    assert!(text.contains("borrowed from lender"), "{text}");
                    "late"
                }
            };
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn offer_table() {
        let cfg = LendingConfig::default(); // 15 min
        let m = 60_000;
        let mut st = LendingState::default();
        // (case, spare, now, new offer?, offer)
        let rows = [
            ("spare starts", [0, 1], 0, false, [0, 0]),
            ("not long enough", [0, 1], 14 * m, false, [0, 0]),
            ("offered", [0, 1], 15 * m, true, [0, 1]),
            ("same offer: no news", [0, 1], 16 * m, false, [0, 1]),
            ("grows", [1, 1], 17 * m, true, [1, 1]),
            ("used again", [0, 0], 18 * m, false, [0, 0]),
            (
                "spare again: the clock restarts",
                [0, 1],
                19 * m,
                false,
                [0, 0],
            ),
        ];
        for (case, spare, now, news, offer) in rows {
            assert_eq!(update_offer(&cfg, &mut st, spare, now), news, "{case}");
            assert_eq!(st.offer, offer, "{case}");
        }
    }

    #[test]
    fn lender_qos_and_decisions() {
        let cfg = LendingConfig {
            decisions_len: 2,
            ..LendingConfig::default()
        };
        let mut st = LendingState::default();
        observe_lender_qos(&mut st, 500.0); // not lending: ignored
        assert_eq!(lender_qos_drop(&st), 0.0);
        lend_started(&mut st, Some(990.0));
        observe_lender_qos(&mut st, 950.0);
        observe_lender_qos(&mut st, 970.0);
        assert_eq!(lender_qos_drop(&st), 40.0);
        lend_stopped(&mut st);
        assert_eq!(lender_qos_drop(&st), 0.0);
        for t in ["a", "a", "b", "c"] {
            st.note(&cfg, 0, t.to_owned());
        }
        let texts: Vec<&str> = st.decisions.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["b", "c"]);
    }

    #[test]
    fn the_default_state_encodes() {
        let bytes = postcard::to_stdvec(&LendingState::default()).unwrap();
        let back: LendingState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, LendingState::default());
        LendingConfig::default().check().unwrap();
    }
}
