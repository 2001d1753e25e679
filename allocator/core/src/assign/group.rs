//! Groups of devices (tenant × region × capability) and their predicted
//! request rate.
//!
//! The service observes each group's rate once per window (reports/s) and
//! feeds it to [`GroupForecast::observe`]. Two models, both reused from the
//! policy engine's prediction:
//! - short term: Holt's linear model (`policy::feedback::ShortTerm`) per
//!   window, with a running variance of its one-step errors: the current
//!   window's mean and prediction interval (mean ± z·σ, σ floored by a share
//!   of the mean and an absolute rate, wide while cold);
//! - long term: additive Holt-Winters with a daily season
//!   (`policy::forecast::HoltWinters`), fed with slot means: once warm, its
//!   upper bound over the coming horizon raises the placement load, so a
//!   group is placed for the daily peak it is about to have.
//!
//! The placement load is `peak_upper` (interval-aware: the upper bound, not
//! the mean). An anomaly is an observation outside the window's interval
//! for `anomaly.consecutive` windows in a row once warm; it triggers an early
//! re-run. Observations outside the interval are held out of the short-term
//! model while the run lasts (one outlier does not drag the level, so a run
//! of them stays visible); a run that reaches `consecutive` is a new regime:
//! the short term restarts from the run's mean, with a σ of at least 10 %
//! of it. A run that ends early is dropped (the daily model still gets
//! every observation).

use super::config::{AssignConfig, GroupForecastConfig};
use crate::policy::feedback::{PredictionConfig, ShortTerm};
use crate::policy::forecast::HoltWinters;
use serde::{Deserialize, Serialize};
use shardline_shared::assign::{GroupId, Region};

/// A group as the service declares it: its id and the rate expected before
/// any is observed (e.g. devices × report rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub id: GroupId,
    pub expected_rate: f64,
}

/// The time window a prediction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A group's predicted rate (reports/s) over a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// From `now` to the end of the placement horizon.
    pub window: TimeWindow,
    /// Current window: short-term mean and interval.
    pub mean: f64,
    pub lower: f64,
    pub upper: f64,
    /// The largest upper bound over the horizon (short term, and the daily
    /// model once warm): what the placement reserves.
    pub peak_upper: f64,
}

/// An observation outside the interval, `windows` times in a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyReport {
    pub group: GroupId,
    pub at_ms: u64,
    pub observed: f64,
    pub lower: f64,
    pub upper: f64,
    pub windows: u32,
}

/// Both models of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupForecast {
    pub short: ShortTerm,
    /// Running variance of the short-term one-step errors.
    pub short_var: f64,
    pub seasonal: HoltWinters,
    /// The seasonal slot being accumulated and its sum and count.
    pub slot: u64,
    pub acc_sum: f64,
    pub acc_n: u32,
    /// Observations so far.
    pub n: u32,
    /// Observations of the current run outside the interval (held out of
    /// the short-term model).
    pub held: Vec<f64>,
    /// Observations the short term has learnt since it (re)started.
    pub steady: u32,
}

impl GroupForecast {
    pub fn new(cfg: &GroupForecastConfig) -> Self {
        Self {
            short: ShortTerm::default(),
            short_var: 0.0,
            seasonal: HoltWinters::new(cfg.seasonal.season_slots),
            slot: 0,
            acc_sum: 0.0,
            acc_n: 0,
            n: 0,
            held: Vec::new(),
            steady: 0,
        }
    }

    fn short_cfg(cfg: &GroupForecastConfig) -> PredictionConfig {
        PredictionConfig {
            short_alpha: cfg.short_alpha,
            short_beta: cfg.short_beta,
            ..PredictionConfig::default()
        }
    }

    /// σ floors: a share of the mean and an absolute rate; wide while cold.
    fn sigma(&self, cfg: &GroupForecastConfig, mean: f64, var: f64) -> f64 {
        let mut s = var
            .max(0.0)
            .sqrt()
            .max(cfg.min_sigma_frac * mean)
            .max(cfg.min_sigma_abs);
        if self.steady < cfg.warmup {
            s = s.max(cfg.cold_sigma_frac * mean);
        }
        s
    }

    /// The prediction at `now` (`expected` is the declared rate, used until
    /// the first observation).
    pub fn predict(&self, cfg: &GroupForecastConfig, expected: f64, now: u64) -> Prediction {
        let mean = if self.n == 0 {
            expected.max(0.0)
        } else {
            f64::from(self.short.forecast()).max(0.0)
        };
        let half = cfg.z * self.sigma(cfg, mean, self.short_var);
        let upper = mean + half;
        let mut peak_upper = upper;
        let slot_ms = cfg.seasonal.slot_ms.max(1);
        if self.seasonal.warmed_up() {
            let first = (now / slot_ms).max(self.seasonal.last_slot + 1);
            let last = now.saturating_add(cfg.horizon_ms) / slot_ms;
            for slot in first..=last.max(first) {
                let f = self.seasonal.forecast(&cfg.seasonal, slot);
                let m = f64::from(f.mean).max(0.0);
                // The daily model's interval is of slot means; never
                // narrower than the short term's.
                let h = f64::from(f.upper - f.mean).max(half);
                peak_upper = peak_upper.max(m + h);
            }
        }
        Prediction {
            window: TimeWindow {
                start_ms: now,
                end_ms: now.saturating_add(cfg.horizon_ms),
            },
            mean,
            lower: (mean - half).max(0.0),
            upper,
            peak_upper,
        }
    }

    /// Learns one window's observed rate; returns the prediction it was
    /// judged against and, when it completes a run of `consecutive`
    /// windows outside the interval, the run's length.
    pub fn observe(
        &mut self,
        cfg: &GroupForecastConfig,
        consecutive: u32,
        expected: f64,
        now: u64,
        y: f64,
    ) -> (Prediction, Option<u32>) {
        let y = if y.is_finite() { y.max(0.0) } else { 0.0 };
        let p = self.predict(cfg, expected, now);
        let outside = self.steady >= cfg.warmup && (y > p.upper || y < p.lower);
        let mut anomaly = None;
        if outside {
            self.held.push(y);
            if self.held.len() >= consecutive.max(1) as usize {
                // A new regime: restart the short term from the run.
                let run = std::mem::take(&mut self.held);
                let mean = run.iter().sum::<f64>() / run.len() as f64;
                self.short = ShortTerm {
                    level: mean as f32,
                    trend: 0.0,
                    n: 1,
                };
                self.short_var = self.short_var.max((0.1 * mean).powi(2));
                self.steady = cfg.warmup;
                anomaly = Some(run.len() as u32);
            }
        } else {
            self.held.clear();
            if self.short.n > 0 {
                let e = y - f64::from(self.short.forecast());
                self.short_var += cfg.error_weight * (e * e - self.short_var);
            }
            self.short.observe(&Self::short_cfg(cfg), y as f32);
            self.steady = self.steady.saturating_add(1);
        }
        let slot = now / cfg.seasonal.slot_ms.max(1);
        if slot != self.slot && self.acc_n > 0 {
            if self.seasonal.n == 0 || self.slot > self.seasonal.last_slot {
                let mean = self.acc_sum / f64::from(self.acc_n);
                self.seasonal.observe(&cfg.seasonal, self.slot, mean as f32);
            }
            self.acc_sum = 0.0;
            self.acc_n = 0;
        }
        self.slot = slot;
        self.acc_sum += y;
        self.acc_n += 1;
        self.n = self.n.saturating_add(1);
        (p, anomaly)
    }
}

/// A group in the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    pub tenant: String,
    pub region: Region,
    pub capability: String,
    pub expected_rate: f64,
    pub forecast: GroupForecast,
    /// The latest observation (at, reports/s).
    pub last_observed: Option<(u64, f64)>,
}

impl Group {
    pub fn new(cfg: &AssignConfig, spec: &GroupSpec) -> Self {
        Self {
            tenant: spec.id.tenant().to_owned(),
            region: spec.id.region(),
            capability: spec.id.capability().to_owned(),
            id: spec.id.clone(),
            expected_rate: spec.expected_rate,
            forecast: GroupForecast::new(&cfg.forecast),
            last_observed: None,
        }
    }

    pub fn predict(&self, cfg: &AssignConfig, now: u64) -> Prediction {
        self.forecast
            .predict(&cfg.forecast, self.expected_rate, now)
    }

    /// What the placement reserves for the group: the horizon's upper bound.
    pub fn load(&self, cfg: &AssignConfig, now: u64) -> f64 {
        self.predict(cfg, now).peak_upper.max(cfg.forecast.min_load)
    }

    /// Learns one observation; `Some` when it completes an anomaly.
    pub fn observe(&mut self, cfg: &AssignConfig, now: u64, rate: f64) -> Option<AnomalyReport> {
        let (p, run) = self.forecast.observe(
            &cfg.forecast,
            cfg.anomaly.consecutive,
            self.expected_rate,
            now,
            rate,
        );
        self.last_observed = Some((now, rate));
        if let Some(run) = run {
            return Some(AnomalyReport {
                group: self.id.clone(),
                at_ms: now,
                observed: rate,
                lower: p.lower,
                upper: p.upper,
                windows: run,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> Group {
        let spec = GroupSpec {
            id: GroupId::new("acme.eu-west.vpn").unwrap(),
            expected_rate: 100.0,
        };
        Group::new(&AssignConfig::default(), &spec)
    }

    #[test]
    fn a_cold_group_is_placed_by_its_declared_rate_with_a_wide_interval() {
        let cfg = AssignConfig::default();
        let p = group().predict(&cfg, 0);
        assert_eq!(p.mean, 100.0);
        assert!((p.upper - 149.0).abs() < 1e-9, "{p:?}");
        assert!((p.lower - 51.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.window.end_ms, cfg.forecast.horizon_ms);
    }

    #[test]
    fn a_steady_group_gets_a_narrow_interval_and_a_spike_is_an_anomaly() {
        let cfg = AssignConfig::default();
        let mut g = group();
        let mut rng = crate::policy::prng::SplitMix64::new(7);
        for w in 0..60u64 {
            let y = 100.0 * (1.0 + 0.04 * (rng.next_f64() * 2.0 - 1.0));
            assert_eq!(g.observe(&cfg, w * 60_000, y), None, "window {w}");
        }
        let p = g.predict(&cfg, 60 * 60_000);
        assert!(p.upper < 125.0 && p.lower > 75.0, "{p:?}");
        let t = 61 * 60_000;
        assert_eq!(g.observe(&cfg, t, 300.0), None);
        assert_eq!(g.observe(&cfg, t + 60_000, 300.0), None);
        let a = g.observe(&cfg, t + 120_000, 300.0).expect("third window");
        assert_eq!(a.windows, 3);
        assert!(a.upper < 300.0);
        // The new regime is the prediction now, with a sane interval.
        let p = g.predict(&cfg, t + 180_000);
        assert!((p.mean - 300.0).abs() < 1.0, "{p:?}");
        assert!(p.upper > 330.0 && p.upper < 400.0, "{p:?}");
        // One outlier, then back to normal: no anomaly, the level holds.
        let t = t + 180_000;
        g.observe(&cfg, t, 300.0);
        assert_eq!(g.observe(&cfg, t + 60_000, 1_000.0), None);
        assert_eq!(g.observe(&cfg, t + 120_000, 300.0), None);
        assert!((g.predict(&cfg, t + 180_000).mean - 300.0).abs() < 5.0);
    }

    #[test]
    fn the_daily_model_raises_the_placement_load_before_the_daily_peak() {
        let cfg = AssignConfig::default();
        let mut g = group();
        let day = 86_400_000u64;
        // 100/s all day, 400/s from 12:00 to 13:00, for three days.
        let rate = |t: u64| {
            if (12 * 3_600_000..13 * 3_600_000).contains(&(t % day)) {
                400.0
            } else {
                100.0
            }
        };
        let mut t = 0;
        while t < 3 * day + 11 * 3_600_000 {
            g.observe(&cfg, t, rate(t));
            t += 60_000;
        }
        // At 11:50 on day 4 the short term says ~100; the daily model
        // knows the peak is 10 minutes away, inside the horizon.
        let p = g.predict(&cfg, 3 * day + 11 * 3_600_000 + 50 * 60_000);
        assert!(p.upper < 150.0, "{p:?}");
        assert!(p.peak_upper > 350.0, "{p:?}");
        // At 11:00 the peak is beyond the 15-minute horizon.
        let p = g.predict(&cfg, 3 * day + 11 * 3_600_000);
        assert!(p.peak_upper < 200.0, "{p:?}");
    }
}
