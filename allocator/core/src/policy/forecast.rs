//! Per device and traffic class, an additive Holt-Winters forecast with a
//! daily season at a coarse slot size (15 min by default: 96 `f32` of season
//! per class), and a prediction interval from the variance of the one-step
//! errors. Reports are averaged into their slot; the model updates once per
//! completed slot, so its state stays small and its cost per report is O(1).

use super::feedback::{ClassLearning, PredictionConfig};
use serde::{Deserialize, Serialize};
use shardline_shared::msg::{QosNeed, TrafficClass};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastConfig {
    pub slot_ms: u64,
    /// Slots per season (a day: 96 × 15 min).
    pub season_slots: u32,
    pub alpha: f32,
    pub beta: f32,
    pub gamma: f32,
    /// Weight of each new squared error in the running variance.
    pub var_weight: f32,
    /// z of the prediction interval (1.96 ≈ 95 %).
    pub z: f32,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            slot_ms: 15 * 60_000,
            season_slots: 96,
            alpha: 0.2,
            beta: 0.01,
            gamma: 0.3,
            var_weight: 0.05,
            z: 1.96,
        }
    }
}

/// Additive Holt-Winters state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoltWinters {
    pub level: f32,
    pub trend: f32,
    pub season: Vec<f32>,
    /// Running variance of one-step errors (after the first season).
    pub var: f32,
    /// Observations so far.
    pub n: u32,
    /// Absolute slot index of the last observation.
    pub last_slot: u64,
}

/// A point forecast with its prediction interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub mean: f32,
    pub lower: f32,
    pub upper: f32,
}

impl HoltWinters {
    pub fn new(season_slots: u32) -> Self {
        Self {
            level: 0.0,
            trend: 0.0,
            season: vec![0.0; season_slots.max(1) as usize],
            var: 0.0,
            n: 0,
            last_slot: 0,
        }
    }

    fn idx(&self, slot: u64) -> usize {
        (slot % self.season.len() as u64) as usize
    }

    /// A full season has been seen: forecasts and intervals mean something.
    pub fn warmed_up(&self) -> bool {
        self.n as usize > self.season.len()
    }

    /// Feeds the value of absolute slot `slot` (slots must increase).
    pub fn observe(&mut self, cfg: &ForecastConfig, slot: u64, y: f32) {
        let m = self.season.len();
        let s = self.idx(slot);
        if (self.n as usize) < m {
            // First season (classical initialisation): the level is the mean
            // of the season, each slot's seasonal term its offset from it.
            self.season[s] = y;
            self.level += (y - self.level) / (self.n + 1) as f32;
            if self.n as usize == m - 1 {
                let level = self.level;
                self.season.iter_mut().for_each(|x| *x -= level);
            }
        } else {
            let steps = slot.saturating_sub(self.last_slot).max(1) as f32;
            let predicted = self.level + steps * self.trend + self.season[s];
            let err = y - predicted;
            self.var += cfg.var_weight * (err * err - self.var);
            if self.n as usize == m {
                self.var = err * err;
            }
            let level = cfg.alpha * (y - self.season[s])
                + (1.0 - cfg.alpha) * (self.level + steps * self.trend);
            self.trend = cfg.beta * (level - self.level) + (1.0 - cfg.beta) * self.trend;
            self.level = level;
            self.season[s] = cfg.gamma * (y - level) + (1.0 - cfg.gamma) * self.season[s];
        }
        self.n = self.n.saturating_add(1);
        self.last_slot = slot;
    }

    /// Forecast for absolute slot `slot` (> last observed).
    pub fn forecast(&self, cfg: &ForecastConfig, slot: u64) -> Forecast {
        let h = slot.saturating_sub(self.last_slot).max(1);
        let mean = self.level + h as f32 * self.trend + self.season[self.idx(slot)];
        // Additive HW h-step variance: σ²·(1 + Σ_{j<h} (α(1+jβ) + γ·[j ≡ 0 mod m])²).
        let m = self.season.len() as u64;
        let mut factor = 1.0f32;
        for j in 1..h.min(4 * m) {
            let mut c = cfg.alpha * (1.0 + j as f32 * cfg.beta);
            if j % m == 0 {
                c += cfg.gamma;
            }
            factor += c * c;
        }
        let half = cfg.z * (self.var.max(0.0) * factor).sqrt();
        Forecast {
            mean,
            lower: mean - half,
            upper: mean + half,
        }
    }
}

/// One traffic class of one device: its last need flags, a slot accumulator
/// and the model (rates in kbit/s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassForecast {
    pub class: TrafficClass,
    pub need: QosNeed,
    pub slot: u64,
    pub acc_sum: f32,
    pub acc_n: u32,
    pub model: HoltWinters,
}

impl ClassForecast {
    pub fn new(cfg: &ForecastConfig, class: TrafficClass, need: QosNeed, slot: u64) -> Self {
        Self {
            class,
            need,
            slot,
            acc_sum: 0.0,
            acc_n: 0,
            model: HoltWinters::new(cfg.season_slots),
        }
    }

    /// Adds one report's rate for this class at slot `slot`; a new slot
    /// flushes the previous slot's mean into the model. `learn` gets the
    /// report (short-term model) and each completed slot (the seasonal
    /// model's error, the day-of-week factor).
    pub fn add(
        &mut self,
        cfg: &ForecastConfig,
        slot: u64,
        rate_kbps: f32,
        learn: &mut ClassLearning,
        pcfg: &PredictionConfig,
    ) {
        if slot != self.slot {
            self.flush(cfg, learn, pcfg);
            self.slot = slot;
        }
        learn.observe_report(pcfg, rate_kbps);
        self.acc_sum += rate_kbps;
        self.acc_n += 1;
    }

    fn flush(&mut self, cfg: &ForecastConfig, learn: &mut ClassLearning, pcfg: &PredictionConfig) {
        if self.acc_n > 0 && (self.model.n == 0 || self.slot > self.model.last_slot) {
            let y = self.acc_sum / self.acc_n as f32;
            let slot_start = self.slot.saturating_mul(cfg.slot_ms);
            if self.model.warmed_up() {
                let base = self.model.forecast(cfg, self.slot).mean;
                learn.observe_slot(pcfg, slot_start, y, base);
            }
            // The daily model learns an ordinary day: the day-of-week factor
            // is divided out (a day whose factor is near zero, a closed
            // office's Sunday, teaches it nothing).
            let w = learn.week_factor(slot_start);
            if w >= 0.1 {
                self.model.observe(cfg, self.slot, y / w);
            }
        }
        self.acc_sum = 0.0;
        self.acc_n = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_clean_daily_shape() {
        let cfg = ForecastConfig::default();
        let mut hw = HoltWinters::new(cfg.season_slots);
        let f = |t: u64| 100.0 + 80.0 * ((t % 96) as f32 / 96.0 * std::f32::consts::TAU).sin();
        for t in 0..96 * 5 {
            hw.observe(&cfg, t, f(t));
        }
        let t = 96 * 5 + 10;
        let fc = hw.forecast(&cfg, t);
        assert!((fc.mean - f(t)).abs() < 5.0, "{fc:?} vs {}", f(t));
        assert!(fc.lower <= fc.mean && fc.mean <= fc.upper);
    }
}
