//! Allocator servers as the assignment engine sees them: region, rated
//! capacity (reports/s), the endpoints its devices use, health from its own
//! metrics and a performance history.
//!
//! Health at time `now` = latency part × error part × heartbeat part, each
//! in 0..=1: `min(1, target / p99)`, `1 − error_rate / max_error_rate`
//! (clamped), and 1 while the heartbeat is at most one interval old, falling
//! linearly to 0 at the timeout. The history is an EWMA of the latency ×
//! error parts over the heartbeats in which the server carried groups: how
//! well it served what it was given (an idle server keeps its prior).

use super::config::AssignConfig;
use serde::{Deserialize, Serialize};
use shardline_shared::assign::{self, Region, ServerId, MAX_ENDPOINTS};

/// One heartbeat with the server's own metrics (what the service will read
/// from each allocator instance's status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub id: ServerId,
    pub region: Region,
    /// Reports/s the server can take.
    pub capacity: f64,
    /// Broker URLs its devices use (1 to 8, `shared::assign::check_endpoint`).
    pub endpoints: Vec<String>,
    pub p99_latency_ms: f64,
    /// Share of reports that failed (0..=1).
    pub error_rate: f64,
    /// Reports/s it receives now.
    pub load: f64,
}

/// Why an input was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("server {server}: {reason}")]
    Server { server: String, reason: String },
    #[error("group {group}: {reason}")]
    Group { group: String, reason: String },
}

impl ServerReport {
    /// Finite, non-negative numbers; valid endpoints.
    pub fn check(&self) -> Result<(), InputError> {
        let bad = |reason: String| InputError::Server {
            server: self.id.to_string(),
            reason,
        };
        let nums = [
            ("capacity", self.capacity),
            ("p99_latency_ms", self.p99_latency_ms),
            ("error_rate", self.error_rate),
            ("load", self.load),
        ];
        if let Some((name, v)) = nums.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(bad(format!("{name} is {v}")));
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(bad(format!(
                "{} endpoints (1 to {MAX_ENDPOINTS})",
                self.endpoints.len()
            )));
        }
        for e in &self.endpoints {
            assign::check_endpoint(e).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }
}

/// A server's state in the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub id: ServerId,
    pub region: Region,
    pub capacity: f64,
    pub endpoints: Vec<String>,
    pub last_heartbeat_ms: u64,
    /// Latency × error parts of health from the latest heartbeat.
    pub quality: f64,
    /// EWMA of `quality` over heartbeats with groups assigned.
    pub history: f64,
    /// Reported load (reports/s).
    pub load: f64,
    /// Marked down (`handle_server_down`) until its next heartbeat.
    pub down: bool,
    /// Its heartbeat timed out and that was reported.
    pub lost: bool,
    /// Its latest report is over `overload_utilization`.
    pub overloaded: bool,
    /// Last time a group moved onto or off it.
    pub changed_at_ms: u64,
    /// Its group definitions differ from the lead's (not eligible).
    #[serde(default)]
    pub config_mismatch: bool,
}

impl Server {
    pub(crate) fn new(cfg: &AssignConfig, r: &ServerReport, now: u64) -> Self {
        Self {
            id: r.id.clone(),
            region: r.region.clone(),
            capacity: r.capacity,
            endpoints: r.endpoints.clone(),
            last_heartbeat_ms: now,
            quality: quality(cfg, r),
            history: cfg.history_prior,
            load: r.load,
            down: false,
            lost: false,
            overloaded: false,
            changed_at_ms: 0,
            config_mismatch: false,
        }
    }

    /// Takes a heartbeat; `carrying` says whether it has groups (only then
    /// does the history learn). Returns whether it just became overloaded.
    pub(crate) fn heartbeat(
        &mut self,
        cfg: &AssignConfig,
        r: &ServerReport,
        now: u64,
        carrying: bool,
    ) -> bool {
        self.region = r.region.clone();
        self.capacity = r.capacity;
        self.endpoints = r.endpoints.clone();
        self.last_heartbeat_ms = self.last_heartbeat_ms.max(now);
        self.quality = quality(cfg, r);
        if carrying {
            self.history += cfg.history_weight * (self.quality - self.history);
        }
        self.load = r.load;
        self.down = false;
        self.lost = false;
        let was = self.overloaded;
        self.overloaded = r.load >= cfg.overload_utilization * r.capacity && r.load > 0.0;
        self.overloaded && !was
    }

    /// Heartbeat part of health at `now`.
    fn freshness(&self, cfg: &AssignConfig, now: u64) -> f64 {
        let age = now.saturating_sub(self.last_heartbeat_ms);
        if age <= cfg.heartbeat_interval_ms {
            1.0
        } else if age >= cfg.heartbeat_timeout_ms {
            0.0
        } else {
            let span = cfg
                .heartbeat_timeout_ms
                .saturating_sub(cfg.heartbeat_interval_ms)
                .max(1);
            1.0 - (age - cfg.heartbeat_interval_ms) as f64 / span as f64
        }
    }

    /// Health in 0..=1 at `now` (0 when down or lost).
    pub fn health(&self, cfg: &AssignConfig, now: u64) -> f64 {
        if self.down {
            return 0.0;
        }
        (self.quality * self.freshness(cfg, now)).clamp(0.0, 1.0)
    }

    /// Whether its heartbeat has timed out at `now`.
    pub fn timed_out(&self, cfg: &AssignConfig, now: u64) -> bool {
        now.saturating_sub(self.last_heartbeat_ms) >= cfg.heartbeat_timeout_ms
    }

    /// Whether it may get groups at `now` (never while its group
    /// definitions differ from the lead's).
    pub fn eligible(&self, cfg: &AssignConfig, now: u64) -> bool {
        !self.down
            && !self.config_mismatch
            && !self.timed_out(cfg, now)
            && self.capacity > 0.0
            && self.health(cfg, now) >= cfg.min_health
    }

    /// The capacity the allocation may fill.
    pub fn usable(&self, cfg: &AssignConfig) -> f64 {
        self.capacity * cfg.target_utilization
    }
}

/// Latency part × error part of health for one report.
fn quality(cfg: &AssignConfig, r: &ServerReport) -> f64 {
    let latency = if r.p99_latency_ms <= cfg.latency_target_ms {
        1.0
    } else {
        cfg.latency_target_ms / r.p99_latency_ms
    };
    let errors = if cfg.max_error_rate > 0.0 {
        1.0 - r.error_rate / cfg.max_error_rate
    } else if r.error_rate > 0.0 {
        0.0
    } else {
        1.0
    };
    (latency.clamp(0.0, 1.0) * errors.clamp(0.0, 1.0)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(p99: f64, errors: f64) -> ServerReport {
        ServerReport {
            id: ServerId::new("s1").unwrap(),
            region: Region::new("eu").unwrap(),
            capacity: 100.0,
            endpoints: vec!["mqtt://s1:1883".into()],
            p99_latency_ms: p99,
            error_rate: errors,
            load: 10.0,
        }
    }

    #[test]
    fn health_falls_with_latency_errors_and_heartbeat_age() {
        let cfg = AssignConfig::default();
        let s = Server::new(&cfg, &report(50.0, 0.0), 0);
        assert_eq!(s.health(&cfg, 0), 1.0);
        assert_eq!(s.health(&cfg, cfg.heartbeat_interval_ms), 1.0);
        let mid = (cfg.heartbeat_interval_ms + cfg.heartbeat_timeout_ms) / 2;
        assert!((s.health(&cfg, mid) - 0.5).abs() < 1e-9);
        assert_eq!(s.health(&cfg, cfg.heartbeat_timeout_ms), 0.0);
        assert!(s.timed_out(&cfg, cfg.heartbeat_timeout_ms));
        let slow = Server::new(&cfg, &report(200.0, 0.0), 0);
        assert!((slow.health(&cfg, 0) - 0.5).abs() < 1e-9);
        let failing = Server::new(&cfg, &report(50.0, 0.025), 0);
        assert!((failing.health(&cfg, 0) - 0.5).abs() < 1e-9);
        assert_eq!(
            Server::new(&cfg, &report(50.0, 0.5), 0).health(&cfg, 0),
            0.0
        );
    }

    #[test]
    fn history_learns_only_while_carrying_groups() {
        let cfg = AssignConfig::default();
        let mut s = Server::new(&cfg, &report(50.0, 0.0), 0);
        for t in 1..50 {
            s.heartbeat(&cfg, &report(400.0, 0.0), t * 1000, false);
        }
        assert_eq!(s.history, cfg.history_prior);
        for t in 50..100 {
            s.heartbeat(&cfg, &report(400.0, 0.0), t * 1000, true);
        }
        assert!(s.history < 0.4, "{}", s.history);
    }

    #[test]
    fn bad_reports_are_refused() {
        let mut r = report(50.0, 0.0);
        r.capacity = f64::NAN;
        assert!(r.check().is_err());
        let mut r = report(50.0, 0.0);
        r.endpoints = vec!["http://x".into()];
        assert!(r.check().is_err());
        let mut r = report(50.0, 0.0);
        r.endpoints.clear();
        assert!(r.check().is_err());
        assert!(report(50.0, 0.0).check().is_ok());
    }
}
