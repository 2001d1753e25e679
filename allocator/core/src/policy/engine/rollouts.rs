//! Catalog and tier reloads, and the staged rollouts they start
//! (`policy::rollout` holds the rules; this is where the engine applies
//! them: which catalog a device plans with, the canaries' failures, the
//! promotion or rollback at a tick).

use super::*;
use crate::policy::rollout::{Member, Phase, Rollout, RolloutEvent, Rollouts};

/// Why a reload was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    /// The tiers file no longer has a tier enrolled devices are in.
    #[error("{path}:0: field `tier.{tier}`: the tier is gone but {devices} enrolled device(s) use it (e.g. {example}); move them to another tier first")]
    TierInUse {
        path: String,
        tier: String,
        devices: usize,
        example: String,
    },
}

/// One catalog entry a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryChange {
    pub shard: String,
    pub from: String,
    pub to: String,
    /// Rolled out in stages (a canary share first) rather than at once.
    pub staged: bool,
}

/// What a reload changed, for the log and the API's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    pub shards_added: Vec<String>,
    pub shards_removed: Vec<String>,
    pub shards_changed: Vec<EntryChange>,
    /// Capabilities, need rules or unit size changed.
    pub rules_changed: bool,
    pub tiers_added: Vec<String>,
    pub tiers_removed: Vec<String>,
    /// Each in words ("gold: compute 8 → 12, lease_cap 600000 → 300000").
    pub tiers_changed: Vec<String>,
    /// The reasons of the rollouts this reload started.
    pub rollouts_started: Vec<String>,
}

impl ReloadSummary {
    pub fn unchanged(&self) -> bool {
        self.shards_added.is_empty()
            && self.shards_removed.is_empty()
            && self.shards_changed.is_empty()
            && !self.rules_changed
            && self.tiers_added.is_empty()
            && self.tiers_removed.is_empty()
            && self.tiers_changed.is_empty()
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        if self.unchanged() {
            return "nothing changed".into();
        }
        let mut parts = Vec::new();
        if !self.shards_added.is_empty() {
            parts.push(format!("shards added: {}", self.shards_added.join(", ")));
        }
        if !self.shards_removed.is_empty() {
            parts.push(format!(
                "shards removed: {}",
                self.shards_removed.join(", ")
            ));
        }
        for c in &self.shards_changed {
            parts.push(format!(
                "{}: {} → {}{}",
                c.shard,
                c.from,
                c.to,
                if c.staged { " (staged)" } else { "" }
            ));
        }
        if self.rules_changed {
            parts.push("capabilities, rules or unit size changed".into());
        }
        if !self.tiers_added.is_empty() {
            parts.push(format!("tiers added: {}", self.tiers_added.join(", ")));
        }
        if !self.tiers_removed.is_empty() {
            parts.push(format!("tiers removed: {}", self.tiers_removed.join(", ")));
        }
        parts.extend(self.tiers_changed.iter().cloned());
        parts.join("; ")
    }
}

fn tier_diff(name: &str, a: &Tier, b: &Tier) -> Option<String> {
    let mut d = Vec::new();
    if a.compute_units != b.compute_units {
        d.push(format!("compute {} → {}", a.compute_units, b.compute_units));
    }
    if a.data_units != b.data_units {
        d.push(format!("data {} → {}", a.data_units, b.data_units));
    }
    if a.capabilities != b.capabilities {
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        d.push(format!(
            "capabilities [{}] → [{}]",
            join(&a.capabilities),
            join(&b.capabilities)
        ));
    }
    if a.max_priority != b.max_priority {
        d.push(format!(
            "max_priority {} → {}",
            a.max_priority, b.max_priority
        ));
    }
    if a.lease_cap_ms != b.lease_cap_ms {
        d.push(format!(
            "lease_cap_ms {} → {}",
            a.lease_cap_ms, b.lease_cap_ms
        ));
    }
    if a.borrowing != b.borrowing || a.tenant != b.tenant {
        d.push("tenant or borrowing changed".into());
    }
    (!d.is_empty()).then(|| format!("tier {name}: {}", d.join(", ")))
}

fn version_of(s: &catalog::ShardSpec) -> String {
    format!("{}@{}", s.shard.id(), s.shard.version())
}

impl Engine {
    /// The catalog `device` plans with: the engine's, with the previous
    /// entry of every rollout the device is not (yet) a canary of.
    pub(super) fn catalog_for(&mut self, device: &DeviceId) -> Arc<Catalog> {
        if !self.rollouts.overrides() {
            return Arc::clone(&self.catalog);
        }
        let key = self.rollouts.view_key(device);
        if key.iter().all(|&b| b) {
            return Arc::clone(&self.catalog);
        }
        if let Some(c) = self.catalog_views.get(&key) {
            return Arc::clone(c);
        }
        let view = Arc::new(self.rollouts.catalog_view(&self.catalog, &key));
        self.catalog_views.insert(key, Arc::clone(&view));
        view
    }

    /// The rollouts, running and ended.
    pub fn rollouts(&self) -> &Rollouts {
        &self.rollouts
    }

    /// Loads persisted rollouts; those whose new entry is no longer the
    /// catalog's end.
    pub fn restore_rollouts(&mut self, mut rollouts: Rollouts) {
        for shard in rollouts.reconcile(&self.config.rollout, &self.catalog) {
            tracing::info!(%shard, "rollout ended: the catalog entry changed while the allocator was down");
            self.rollouts_dirty = true;
        }
        self.rollouts = rollouts;
        self.rollouts_changed();
    }

    /// Whether the rollouts changed since the last call (to persist them).
    pub fn take_rollouts_dirty(&mut self) -> bool {
        std::mem::take(&mut self.rollouts_dirty)
    }

    /// The views are derived from the rollouts: dropped when they change,
    /// and every device re-planned at the next tick.
    fn rollouts_changed(&mut self) {
        self.catalog_views.clear();
        self.rollouts_dirty = true;
        for st in self.devices.values_mut() {
            st.wake_at_ms = 0;
        }
    }

    /// Leases of `shard` are made due, so the next plan re-sends their
    /// activation with the entry the device's view now has: a new digest
    /// or configuration under the same `id@version` would otherwise wait
    /// for the lease's renewal.
    /// `only`: the devices whose view changed (`None`: every device).
    fn renew_leases_of(
        &mut self,
        shard: &str,
        now: u64,
        only: Option<(&BTreeSet<DeviceId>, bool)>,
    ) {
        for (id, st) in self.devices.iter_mut() {
            if let Some((set, inside)) = only {
                if set.contains(id) != inside {
                    continue;
                }
            }
            if let Some(l) = st.leases.get_mut(shard) {
                l.expires_at_ms = l.expires_at_ms.min(now);
            }
        }
    }

    fn rollout_actions(&mut self, now: u64, events: Vec<RolloutEvent>, out: &mut Vec<Action>) {
        if events.is_empty() {
            return;
        }
        for e in events {
            let (shard, phase, reason) = match e {
                RolloutEvent::Started { shard, reason } => (shard, "canary", reason),
                RolloutEvent::Promoted { shard, reason } => (shard, "promoted", reason),
                RolloutEvent::RolledBack { shard, reason } => (shard, "rolled_back", reason),
            };
            // Canaries change view at the start and at a rollback, the
            // others at the promotion.
            let canaries = match phase {
                "promoted" => self.rollouts.ended.first().map(|r| r.canaries.clone()),
                _ => self.rollouts.active.get(&shard).map(|r| r.canaries.clone()),
            }
            .unwrap_or_default();
            self.renew_leases_of(&shard, now, Some((&canaries, phase != "promoted")));
            out.push(Action::Rollout {
                shard,
                phase: phase.to_owned(),
                reason,
            });
        }
        self.rollouts_changed();
    }

    /// Replaces the catalog and the tiers (a reload), validated first: a
    /// reload that would strand enrolled devices in a removed tier changes
    /// nothing. Changed entries are rolled out in stages
    /// (`[policy.engine.rollout]`); every device is re-planned.
    pub fn reload(
        &mut self,
        now: u64,
        catalog: Catalog,
        agreements: Agreements,
        tiers_path: &str,
        out: &mut Vec<Action>,
    ) -> Result<ReloadSummary, ReloadError> {
        let mut stranded: BTreeMap<&str, Vec<&DeviceId>> = BTreeMap::new();
        for (id, st) in &self.devices {
            if !agreements.tiers.contains_key(&st.tier) {
                stranded.entry(st.tier.as_str()).or_default().push(id);
            }
        }
        if let Some((tier, devs)) = stranded.into_iter().next() {
            return Err(ReloadError::TierInUse {
                path: tiers_path.to_owned(),
                tier: tier.to_owned(),
                devices: devs.len(),
                example: devs[0].to_string(),
            });
        }
        let old = Arc::clone(&self.catalog);
        let mut sum = ReloadSummary::default();
        for (id, spec) in &catalog.shards {
            match old.shards.get(id) {
                None => sum.shards_added.push(version_of(spec)),
                Some(o) if faults::spec_fingerprint(o) != faults::spec_fingerprint(spec) => {
                    sum.shards_changed.push(EntryChange {
                        shard: id.clone(),
                        from: version_of(o),
                        to: version_of(spec),
                        staged: false,
                    })
                }
                Some(_) => {}
            }
        }
        sum.shards_removed = old
            .shards
            .keys()
            .filter(|k| !catalog.shards.contains_key(*k))
            .cloned()
            .collect();
        sum.rules_changed = old.capabilities != catalog.capabilities
            || old.rules != catalog.rules
            || old.units != catalog.units;
        let old_tiers = Arc::clone(&self.agreements);
        for (name, t) in &agreements.tiers {
            match old_tiers.tiers.get(name) {
                None => sum.tiers_added.push(name.clone()),
                Some(o) => sum.tiers_changed.extend(tier_diff(name, o, t)),
            }
        }
        sum.tiers_removed = old_tiers
            .tiers
            .keys()
            .filter(|k| !agreements.tiers.contains_key(*k))
            .cloned()
            .collect();
        let members: Vec<Member<'_>> = self
            .devices
            .iter()
            .map(|(d, st)| Member {
                device: d,
                group: format!("{}/{}", st.tenant.as_deref().unwrap_or("-"), st.tier),
            })
            .collect();
        let events = self
            .rollouts
            .on_reload(&self.config.rollout, &old, &catalog, &members, now);
        drop(members);
        for e in &events {
            if let RolloutEvent::Started { shard, reason } = e {
                sum.rollouts_started.push(reason.clone());
                if let Some(c) = sum.shards_changed.iter_mut().find(|c| &c.shard == shard) {
                    c.staged = true;
                }
            }
        }
        self.catalog = Arc::new(catalog);
        self.agreements = Arc::new(agreements);
        if !self.health.reconcile_catalog(&self.catalog).is_empty() {
            self.health_dirty = true;
        }
        self.rollout_actions(now, events, out);
        // Changed entries not staged reach every device now.
        for c in sum.shards_changed.iter().filter(|c| !c.staged) {
            let shard = c.shard.clone();
            self.renew_leases_of(&shard, now, None);
        }
        // Every device is re-planned at the next tick (new budgets, entries).
        self.rollouts_changed();
        Ok(sum)
    }

    /// Promotes or rolls back what is due (from the tick).
    pub(super) fn poll_rollouts(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rollouts.active.is_empty() {
            return;
        }
        let events = self.rollouts.poll(&self.config.rollout, now);
        self.rollout_actions(now, events, out);
    }

    /// The operator promotes or rolls back `shard`'s rollout. `None`: no
    /// running rollout of it (or already rolled back).
    pub fn rollout_decision(
        &mut self,
        now: u64,
        shard: &str,
        promote: bool,
        actor: &str,
        out: &mut Vec<Action>,
    ) -> Option<String> {
        let e = if promote {
            self.rollouts
                .promote(&self.config.rollout, shard, actor, now)?
        } else {
            self.rollouts.rollback(shard, actor, now)?
        };
        let reason = match &e {
            RolloutEvent::Started { reason, .. }
            | RolloutEvent::Promoted { reason, .. }
            | RolloutEvent::RolledBack { reason, .. } => reason.clone(),
        };
        self.rollout_actions(now, vec![e], out);
        Some(reason)
    }

    /// A canary ran `shard` fine (from a report).
    pub(super) fn rollout_running(&mut self, device: &DeviceId, shard: &ShardRef) {
        if self.rollouts.note_running(device, shard) {
            self.rollouts_dirty = true;
        }
    }

    /// A device failed `shard` (start failure or crash).
    pub(super) fn rollout_failed(&mut self, device: &DeviceId, shard: &ShardRef, reason: &str) {
        if self.rollouts.note_failure(device, shard, reason) {
            self.rollouts_dirty = true;
        }
    }
}

/// A rollout as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    pub shard: String,
    pub phase: Phase,
    pub previous_version: String,
    pub new_version: String,
    pub started_ms: u64,
    pub phase_since_ms: u64,
    pub canaries: Vec<String>,
    /// Group (`tenant/tier`) ⇒ [devices, canaries].
    pub groups: BTreeMap<String, (u32, u32)>,
    pub exposed: usize,
    pub failures: BTreeMap<String, String>,
    pub failure_pct: f64,
    pub threshold_pct: f64,
    pub soak_ms: u64,
    pub reason: String,
}

impl From<&Rollout> for RolloutView {
    fn from(r: &Rollout) -> Self {
        Self {
            shard: r.shard.clone(),
            phase: r.phase,
            previous_version: r.previous.shard.version().to_owned(),
            new_version: r.next.shard.version().to_owned(),
            started_ms: r.started_ms,
            phase_since_ms: r.phase_since_ms,
            canaries: r.canaries.iter().map(|d| d.to_string()).collect(),
            groups: r.groups.clone(),
            exposed: r.exposed.len(),
            failures: r
                .failed
                .iter()
                .map(|(d, why)| (d.to_string(), why.clone()))
                .collect(),
            failure_pct: r.failure_pct(),
            threshold_pct: r.threshold_pct,
            soak_ms: r.soak_ms,
            reason: r.reason.clone(),
        }
    }
}

/// `GET /v1/rollouts`: running rollouts, then the newest ended ones.
pub fn rollout_views(r: &Rollouts) -> (Vec<RolloutView>, Vec<RolloutView>) {
    (
        r.active.values().map(RolloutView::from).collect(),
        r.ended.iter().map(RolloutView::from).collect(),
    )
}
