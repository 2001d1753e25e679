//! The assignment engine's tunables (the service reads them from
//! `[assignment.engine]`, its `ttl_s`, `period_s` and `regions` over these).
//! Every field has a default; `deny_unknown_fields` so a typo in a
//! configuration is an error, not a silent default.

use crate::policy::forecast::ForecastConfig;
use serde::{Deserialize, Serialize};
use shardline_shared::assign::Region;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssignConfig {
    /// Periodic re-run of the allocation.
    pub period_ms: u64,
    /// Lifetime of a published assignment object (expiry = issue + this).
    pub ttl_ms: u64,
    /// An unchanged assignment is re-issued (same version, later expiry)
    /// once this fraction of its lifetime has passed; devices ask for a
    /// fresh one at 2/3, so a fresh one is there when they ask.
    pub renew_fraction: f64,
    /// Servers report this often; a heartbeat older than this starts to
    /// lower the server's health…
    pub heartbeat_interval_ms: u64,
    /// …which is 0 at this age: the server is lost and its groups move.
    pub heartbeat_timeout_ms: u64,
    /// Share of a server's rated capacity the allocation may fill with
    /// predicted upper bounds (headroom for what the interval misses).
    pub target_utilization: f64,
    /// A server below this health gets no groups (its groups move).
    pub min_health: f64,
    /// A server reporting load ≥ this × capacity is overloaded: immediate
    /// re-run.
    pub overload_utilization: f64,
    /// After its groups change, a server's load reports are not read as
    /// overload evidence for this long (devices take time to move).
    pub overload_settle_ms: u64,
    /// p99 latency a healthy server meets (its health falls as target/p99
    /// beyond it).
    pub latency_target_ms: f64,
    /// Error rate at which the error part of health reaches 0.
    pub max_error_rate: f64,
    /// Weight of each heartbeat in the performance history (EWMA).
    pub history_weight: f64,
    /// History of a server that has served nothing yet.
    pub history_prior: f64,
    pub weights: CostWeights,
    /// Moving a group costs `move_cost_fixed + move_cost_per_load × load`
    /// in the objective (reconnects): the hysteresis. A move must gain more.
    pub move_cost_per_load: f64,
    pub move_cost_fixed: f64,
    /// A group moved less than this ago is not moved again for a marginal
    /// gain (only when its server fails or overflows).
    pub min_dwell_ms: u64,
    /// Improving single moves tried per run (bounds the work and the churn).
    pub max_improvements_per_run: u32,
    pub regions: RegionTable,
    pub forecast: GroupForecastConfig,
    pub anomaly: AnomalyConfig,
}

impl Default for AssignConfig {
    fn default() -> Self {
        Self {
            period_ms: 60_000,
            ttl_ms: 15 * 60_000,
            renew_fraction: 0.5,
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            target_utilization: 0.8,
            min_health: 0.2,
            overload_utilization: 1.0,
            overload_settle_ms: 30_000,
            latency_target_ms: 100.0,
            max_error_rate: 0.05,
            history_weight: 0.05,
            history_prior: 0.9,
            weights: CostWeights::default(),
            move_cost_per_load: 0.3,
            move_cost_fixed: 1.0,
            min_dwell_ms: 10 * 60_000,
            max_improvements_per_run: 32,
            regions: RegionTable::default(),
            forecast: GroupForecastConfig::default(),
            anomaly: AnomalyConfig::default(),
        }
    }
}

/// Weights of the cost terms. Every term but utilization is per report/s
/// of the group's load, so a big group far away costs more than a small one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostWeights {
    /// Σ_servers w × used² / usable: convex, so load spreads in proportion
    /// to capacity; the marginal cost of one report/s is ≈ 2w × utilization.
    pub utilization: f64,
    /// × the region distance ([`RegionTable`]).
    pub distance: f64,
    /// × (1 − health).
    pub health: f64,
    /// × (1 − history).
    pub history: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            utilization: 1.0,
            distance: 2.0,
            health: 2.0,
            history: 1.0,
        }
    }
}

/// One pair of regions and their distance (symmetric).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDistance {
    pub a: String,
    pub b: String,
    pub distance: f64,
}

/// Geographic proximity: the same region is 0, a listed pair its distance
/// (neighbours are 1 by convention), any other pair `unlisted` (far).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionTable {
    pub pairs: Vec<RegionDistance>,
    pub unlisted: f64,
}

impl Default for RegionTable {
    fn default() -> Self {
        Self {
            pairs: Vec::new(),
            unlisted: 3.0,
        }
    }
}

impl RegionTable {
    /// A table where each listed pair is a neighbour (distance 1).
    pub fn neighbours(pairs: &[(&str, &str)]) -> Self {
        Self {
            pairs: pairs
                .iter()
                .map(|(a, b)| RegionDistance {
                    a: (*a).to_owned(),
                    b: (*b).to_owned(),
                    distance: 1.0,
                })
                .collect(),
            ..Self::default()
        }
    }

    pub fn distance(&self, a: &Region, b: &Region) -> f64 {
        if a == b {
            return 0.0;
        }
        let (a, b) = (a.as_str(), b.as_str());
        self.pairs
            .iter()
            .find(|p| (p.a == a && p.b == b) || (p.a == b && p.b == a))
            .map_or(self.unlisted, |p| p.distance)
    }
}

/// How a group's request rate is predicted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupForecastConfig {
    /// The placement covers this much time ahead: the daily model's upper
    /// bound over it is taken, so a group is placed for its coming peak.
    pub horizon_ms: u64,
    /// Holt's linear model per observation window (level, trend).
    pub short_alpha: f32,
    pub short_beta: f32,
    /// Weight of each new squared one-step error in the running variance.
    pub error_weight: f64,
    /// z of the prediction interval (1.96 ≈ 95 %).
    pub z: f64,
    /// Floors of σ: a share of the mean and an absolute rate (reports/s),
    /// so that a perfectly steady group still has an interval.
    pub min_sigma_frac: f64,
    pub min_sigma_abs: f64,
    /// σ as a share of the mean while fewer than `warmup` windows are seen
    /// (and of the declared rate before any).
    pub cold_sigma_frac: f64,
    pub warmup: u32,
    /// A group is placed as at least this load (reports/s).
    pub min_load: f64,
    /// The long-term model: Holt-Winters with a daily season
    /// (`policy::forecast`), fed with slot means of the observed rate.
    pub seasonal: ForecastConfig,
}

impl Default for GroupForecastConfig {
    fn default() -> Self {
        Self {
            horizon_ms: 15 * 60_000,
            short_alpha: 0.5,
            short_beta: 0.1,
            error_weight: 0.1,
            z: 1.96,
            min_sigma_frac: 0.05,
            min_sigma_abs: 1.0,
            cold_sigma_frac: 0.25,
            warmup: 5,
            min_load: 1.0,
            seasonal: ForecastConfig::default(),
        }
    }
}

/// When an observed rate is an anomaly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Observed outside the prediction interval this many windows in a
    /// row (once the model is warm): an anomaly, and an early re-run.
    pub consecutive: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self { consecutive: 3 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_reads_from_toml_with_defaults_and_refuses_typos() {
        let cfg: AssignConfig = toml::from_str(
            r#"
            period_ms = 30000
            [weights]
            distance = 3.0
            [regions]
            unlisted = 5.0
            [[regions.pairs]]
            a = "eu-west"
            b = "eu-central"
            distance = 1.0
            "#,
        )
        .unwrap();
        assert_eq!(cfg.period_ms, 30_000);
        assert_eq!(cfg.weights.distance, 3.0);
        assert_eq!(cfg.weights.health, CostWeights::default().health);
        assert_eq!(cfg.ttl_ms, AssignConfig::default().ttl_ms);
        let r = |s: &str| Region::new(s).unwrap();
        assert_eq!(cfg.regions.distance(&r("eu-central"), &r("eu-west")), 1.0);
        assert_eq!(cfg.regions.distance(&r("eu-west"), &r("eu-west")), 0.0);
        assert_eq!(cfg.regions.distance(&r("eu-west"), &r("us-east")), 5.0);
        assert!(toml::from_str::<AssignConfig>("perod_ms = 1").is_err());
    }
}
