//! Operator commands of deployments (issue 20): reloading the catalog and
//! the tiers without a restart, and the staged rollouts it starts
//! (`policy::rollout`). The service reads and parses the files (errors name
//! file, line and field, and a bad file never reaches the core); the core
//! validates the reload against the fleet and applies it whole or not at all.

use super::*;
use crate::policy::{Agreements, Catalog, ReloadSummary, RolloutView};

/// The answer to a reload: where the files came from and what changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadAnswer {
    pub catalog_source: String,
    pub tiers_source: String,
    pub changed: bool,
    /// What changed in one line.
    pub summary: String,
    pub details: ReloadSummary,
}

/// `GET /v1/rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutsView {
    /// Rollouts in their canary phase, or rolled back.
    pub active: Vec<RolloutView>,
    /// Promoted or replaced, newest first.
    pub ended: Vec<RolloutView>,
    pub config: policy::RolloutConfig,
}

impl Core {
    pub(super) fn reload_catalog(
        &mut self,
        now_ms: u64,
        catalog: Catalog,
        agreements: Agreements,
        catalog_source: String,
        tiers_source: String,
    ) -> Reply {
        let mut out = Vec::new();
        match self
            .engine
            .reload(now_ms, catalog, agreements, &tiers_source, &mut out)
        {
            Ok(details) => {
                Metrics::inc(&self.metrics.catalog_reloads);
                let summary = details.describe();
                tracing::info!(
                    catalog = %catalog_source,
                    tiers = %tiers_source,
                    changed = !details.unchanged(),
                    %summary,
                    "catalog and tiers reloaded"
                );
                self.run_actions(now_ms, out);
                Reply::Reloaded(Box::new(ReloadAnswer {
                    catalog_source,
                    tiers_source,
                    changed: !details.unchanged(),
                    summary,
                    details,
                }))
            }
            Err(e) => {
                Metrics::inc(&self.metrics.catalog_reloads_refused);
                tracing::warn!(error = %e, "catalog reload refused: the running catalog stays");
                Reply::Error(CommandError::Invalid(e.to_string()))
            }
        }
    }

    pub(super) fn rollouts_view(&self) -> RolloutsView {
        let (active, ended) = policy::rollout_views(self.engine.rollouts());
        RolloutsView {
            active,
            ended,
            config: self.engine.config().rollout.clone(),
        }
    }

    pub(super) fn rollout_decision(
        &mut self,
        now_ms: u64,
        shard: &str,
        promote: bool,
        actor: &str,
    ) -> Reply {
        let mut out = Vec::new();
        match self
            .engine
            .rollout_decision(now_ms, shard, promote, actor, &mut out)
        {
            Some(reason) => {
                tracing::info!(target: "audit", %actor, %shard, promote, %reason, "rollout decided by an operator");
                self.run_actions(now_ms, out);
                Reply::Rollouts(Box::new(self.rollouts_view()))
            }
            None => Reply::Error(CommandError::Invalid(format!(
                "no rollout of {:?} to {}",
                commands::shown(shard),
                if promote { "promote" } else { "roll back" }
            ))),
        }
    }
}
