//! Reputation arithmetic: a 0–100 score per device that decays toward neutral
//! with a half-life, moves by configured deltas, and maps to a quota of the
//! tier budget and to a lease length through piecewise-linear curves.
//!
//! What moves it (issue 15): only what the device is responsible for.
//! Operator faults — a shard that failed to *start* (load refused, init
//! refused its config, limits out of range, a crash or over-limit kill
//! before it ran fine) — never do (see [`super::faults`]). A *runtime*
//! failure (the shard ran fine on this device, then crashed or was killed)
//! costs `crash` / `over_limit`, unless its catalog entry is marked failing
//! on the device's architecture (then it is the entry's fault). Forged or
//! replayed messages anyone on the broker can send never do either, and
//! `replayed_report` is not charged while the device is flagged as a
//! probable duplicate identity. Re-enrolment restores the score from the
//! tombstone, never better than the initial one.

use super::{ReputationConfig, ReputationEntry, ReputationState};
use shardline_shared::msg::ShardKind;

impl ReputationState {
    pub fn new(cfg: &ReputationConfig, now_ms: u64) -> Self {
        Self {
            score: cfg.initial,
            updated_ms: now_ms,
            announced: cfg.initial,
            history: Vec::new(),
            last_reason: String::new(),
            penalized: false,
        }
    }

    /// Applies the decay up to `now_ms` (never backwards).
    pub fn decay_to(&mut self, cfg: &ReputationConfig, now_ms: u64) {
        if now_ms <= self.updated_ms {
            return;
        }
        self.score = decayed(
            self.score,
            cfg.initial,
            cfg.half_life_ms,
            now_ms - self.updated_ms,
        );
        self.updated_ms = now_ms;
    }

    /// Moves the score by `delta` (after decay), clamped to 0–100.
    pub fn apply(&mut self, cfg: &ReputationConfig, now_ms: u64, delta: f64, reason: &str) {
        self.decay_to(cfg, now_ms);
        self.score = (self.score + delta).clamp(0.0, 100.0);
        // The announced reason is the latest penalty if there was one since
        // the last announcement (a bonus right after must not hide it).
        if (delta < 0.0 || !self.penalized) && self.last_reason != reason {
            reason.clone_into(&mut self.last_reason);
        }
        if delta < 0.0 {
            self.penalized = true;
        }
    }

    /// If the score moved by a point or more since the last announcement, or
    /// a penalty was applied, records it and returns (old, new, reason).
    pub fn announce(&mut self, cfg: &ReputationConfig, now_ms: u64) -> Option<(f64, f64, String)> {
        if !self.penalized && (self.score - self.announced).abs() < 1.0 {
            return None;
        }
        let old = self.announced;
        let new = self.score;
        let reason = if self.last_reason.is_empty() {
            "decay".to_owned()
        } else {
            std::mem::take(&mut self.last_reason)
        };
        self.announced = new;
        self.penalized = false;
        self.history.push(ReputationEntry {
            at_ms: now_ms,
            old,
            new,
            reason: reason.clone(),
        });
        if self.history.len() > cfg.history_len {
            let excess = self.history.len() - cfg.history_len;
            self.history.drain(..excess);
        }
        Some((old, new, reason))
    }
}

/// `score` after `dt_ms` of exponential decay toward `neutral`.
pub fn decayed(score: f64, neutral: f64, half_life_ms: u64, dt_ms: u64) -> f64 {
    if half_life_ms == 0 {
        return neutral;
    }
    let f = 0.5f64.powf(dt_ms as f64 / half_life_ms as f64);
    neutral + (score - neutral) * f
}

/// Piecewise-linear interpolation through `points` (sorted by x), clamped at
/// both ends; 1.0 for an empty curve.
pub fn curve(points: &[(f64, f64)], x: f64) -> f64 {
    let Some(first) = points.first() else {
        return 1.0;
    };
    if x <= first.0 {
        return first.1;
    }
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            if x1 <= x0 {
                return y1;
            }
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        }
    }
    points[points.len() - 1].1
}

/// The fraction of the tier's compute budget a device with this score gets.
pub fn quota_factor(cfg: &ReputationConfig, score: f64) -> f64 {
    curve(&cfg.quota_curve, score).clamp(0.0, 1.0)
}

/// The fraction of the tier's budget of `kind` a device with this score
/// gets: data is throttled before compute (`data_quota_curve`).
pub fn quota_factor_for(cfg: &ReputationConfig, kind: ShardKind, score: f64) -> f64 {
    match kind {
        ShardKind::Compute => quota_factor(cfg, score),
        ShardKind::Data => curve(&cfg.data_quota_curve, score).clamp(0.0, 1.0),
    }
}

/// The fraction of the tier's lease cap a device with this score gets.
pub fn lease_factor(cfg: &ReputationConfig, score: f64) -> f64 {
    curve(&cfg.lease_curve, score).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_halves_the_distance_to_neutral_per_half_life() {
        assert!((decayed(90.0, 50.0, 1000, 1000) - 70.0).abs() < 1e-9);
        assert!((decayed(10.0, 50.0, 1000, 2000) - 40.0).abs() < 1e-9);
        assert_eq!(decayed(90.0, 50.0, 1000, 0), 90.0);
    }

    #[test]
    fn curve_interpolates_and_clamps() {
        let c = [(0.0, 0.0), (20.0, 0.25), (45.0, 1.0), (100.0, 1.0)];
        assert_eq!(curve(&c, -5.0), 0.0);
        assert!((curve(&c, 10.0) - 0.125).abs() < 1e-9);
        assert_eq!(curve(&c, 50.0), 1.0);
        assert_eq!(curve(&c, 200.0), 1.0);
    }

    #[test]
    fn data_is_throttled_before_compute() {
        let cfg = ReputationConfig::default();
        // (score, compute factor, data factor)
        let table = [
            (100.0, 1.0, 1.0),
            (50.0, 1.0, 1.0), // a fresh device keeps both
            (46.0, 1.0, 1.0),
            (45.5, 1.0, 0.9786),
            (45.0, 1.0, 0.9571),
            (30.0, 0.55, 0.3143),
            (10.0, 0.125, 0.04),
            (0.0, 0.0, 0.0),
        ];
        for (score, compute, data) in table {
            let c = quota_factor_for(&cfg, ShardKind::Compute, score);
            let d = quota_factor_for(&cfg, ShardKind::Data, score);
            assert!((c - compute).abs() < 1e-3, "{score}: compute {c}");
            assert!((d - data).abs() < 1e-3, "{score}: data {d}");
            assert!(d <= c, "{score}: data never above compute");
        }
    }

    #[test]
    fn penalties_clamp_and_are_announced_once() {
        let cfg = ReputationConfig::default();
        let mut r = ReputationState::new(&cfg, 0);
        r.apply(&cfg, 0, -80.0, "crash");
        assert_eq!(r.score, 0.0);
        let (old, new, why) = r.announce(&cfg, 0).expect("announced");
        assert_eq!((old, new, why.as_str()), (50.0, 0.0, "crash"));
        assert!(r.announce(&cfg, 0).is_none());
        r.apply(&cfg, 0, 0.3, "healthy");
        assert!(
            r.announce(&cfg, 0).is_none(),
            "small gains are not announced"
        );
    }
}
