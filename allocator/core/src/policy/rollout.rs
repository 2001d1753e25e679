//! Staged rollouts of changed catalog entries (issue 20, deployments).
//!
//! When a catalog reload changes a shard's entry (a new version or digest,
//! new config or cost), the fleet does not switch at once: a canary share of
//! every device group (tenant × tier) gets the new entry first, the rest
//! keep the previous one. The canaries' failures of the *new* entry (start
//! failures and crashes they report) are counted; after a soak period with
//! the failure rate at or under the threshold the rollout is promoted (every
//! device gets the new entry), above the threshold it is rolled back
//! automatically (the canaries get the previous entry again), with the reason
//! in words and numbers. An operator may promote or roll back by hand.
//!
//! Pure and sans-IO like the engine: `now` in, [`RolloutEvent`]s out. The
//! state ([`Rollouts`]) is a serde value the service persists beside the
//! device records, so a restart mid-rollout resumes with the same canaries
//! (chosen by a hash of the device id, never by chance).

use super::catalog::{Catalog, ShardSpec};
use super::faults::spec_fingerprint;
use super::prng;
use serde::{Deserialize, Serialize};
use shardline_shared::ids::{DeviceId, ShardRef};
use std::collections::{BTreeMap, BTreeSet};

/// `[policy.engine.rollout]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Off: a changed entry reaches every device at once (as before issue 20).
    pub staged: bool,
    /// Share of each device group that gets a changed entry first, in per
    /// mille (100 = 10 %). At least one device of a non-empty group.
    pub canary_permille: u32,
    /// How long the canaries run the new entry before it is promoted.
    pub soak_ms: u64,
    /// Roll back when more than this percentage of the canaries that ran
    /// the new entry failed it.
    pub failure_threshold_pct: f64,
    /// Rollouts that ended, kept for `GET /v1/rollouts`.
    pub history: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            staged: true,
            canary_permille: 100,
            soak_ms: 10 * 60_000,
            failure_threshold_pct: 20.0,
            history: 16,
        }
    }
}

impl RolloutConfig {
    /// Values a rollout cannot work with, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.canary_permille == 0 || self.canary_permille > 1000 {
            return Err((
                "canary_permille",
                format!("must be 1..=1000, got {}", self.canary_permille),
            ));
        }
        if !(0.0..100.0).contains(&self.failure_threshold_pct) {
            return Err((
                "failure_threshold_pct",
                format!("must be in [0, 100), got {}", self.failure_threshold_pct),
            ));
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Only the canaries have the new entry.
    Canary,
    /// Every device has the new entry.
    Promoted,
    /// Every device has the previous entry again.
    RolledBack,
}

/// One staged rollout of one shard's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub shard: String,
    /// The entry every device ran before (non-canaries keep it).
    pub previous: ShardSpec,
    /// The entry being rolled out.
    pub next: ShardSpec,
    pub phase: Phase,
    pub started_ms: u64,
    /// When the phase last changed.
    pub phase_since_ms: u64,
    /// The canaries, chosen at the start (a restart keeps them).
    pub canaries: BTreeSet<DeviceId>,
    /// Group (`tenant/tier`) ⇒ (devices in it, canaries among them).
    pub groups: BTreeMap<String, (u32, u32)>,
    /// Canaries that ran the new entry (or failed it).
    pub exposed: BTreeSet<DeviceId>,
    /// Canaries that failed the new entry ⇒ the latest reason.
    pub failed: BTreeMap<DeviceId, String>,
    pub threshold_pct: f64,
    pub soak_ms: u64,
    /// Why the rollout is in its phase, in words and numbers.
    pub reason: String,
}

/// What a rollout did that the operator should hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutEvent {
    Started { shard: String, reason: String },
    Promoted { shard: String, reason: String },
    RolledBack { shard: String, reason: String },
}

/// A device and its group, for canary selection.
#[derive(Debug)]
pub struct Member<'a> {
    pub device: &'a DeviceId,
    pub group: String,
}

/// Deterministic canaries: in every group, the `permille` share (rounded
/// up, at least one) of devices with the lowest hash of their id. The same
/// devices whatever the order they are given in, and on every restart.
pub fn select_canaries(
    members: &[Member<'_>],
    permille: u32,
) -> (BTreeSet<DeviceId>, BTreeMap<String, (u32, u32)>) {
    let mut by_group: BTreeMap<&str, Vec<(u64, &DeviceId)>> = BTreeMap::new();
    for m in members {
        by_group
            .entry(m.group.as_str())
            .or_default()
            .push((prng::hash_str(0x5eed_ca4a, m.device.as_str()), m.device));
    }
    let mut out = BTreeSet::new();
    let mut groups = BTreeMap::new();
    for (g, mut devs) in by_group {
        devs.sort();
        let n = devs.len() as u64;
        let take = (n * u64::from(permille.min(1000))).div_ceil(1000).max(1) as usize;
        for (_, d) in devs.iter().take(take) {
            out.insert((*d).clone());
        }
        groups.insert(g.to_owned(), (n as u32, take.min(devs.len()) as u32));
    }
    (out, groups)
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

fn label(spec: &ShardSpec) -> String {
    format!("{} {}", spec.shard.id(), spec.shard.version())
}

impl Rollout {
    /// The entry every device runs when no canary is involved.
    pub fn stable(&self) -> &ShardSpec {
        match self.phase {
            Phase::Promoted => &self.next,
            Phase::Canary | Phase::RolledBack => &self.previous,
        }
    }

    /// Whether `device` plans with the new entry.
    pub fn gets_next(&self, device: &DeviceId) -> bool {
        match self.phase {
            Phase::Promoted => true,
            Phase::RolledBack => false,
            Phase::Canary => self.canaries.contains(device),
        }
    }

    /// Failure rate of the new entry on the canaries that ran it, in %.
    pub fn failure_pct(&self) -> f64 {
        pct(self.failed.len(), self.exposed.len())
    }

    fn failed_text(&self) -> String {
        format!(
            "{} failed on {} of {} canaries ({:.0} %",
            label(&self.next),
            self.failed.len(),
            self.exposed.len(),
            self.failure_pct()
        )
    }

    fn set_phase(&mut self, phase: Phase, now: u64, reason: String) {
        self.phase = phase;
        self.phase_since_ms = now;
        self.reason = reason;
    }
}

/// Every rollout: the running ones by shard, and the newest that ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    /// Shard ⇒ its rollout (in canary phase, or rolled back: the previous
    /// entry stays in force until a reload changes the entry again).
    pub active: BTreeMap<String, Rollout>,
    /// Promoted or replaced rollouts, newest first.
    pub ended: Vec<Rollout>,
}

impl Rollouts {
    /// The catalog entry of `shard` that `device` plans with, when a
    /// rollout decides it (`None`: the catalog's own).
    pub fn spec_for(&self, shard: &str, device: &DeviceId) -> Option<&ShardSpec> {
        let r = self.active.get(shard)?;
        (!r.gets_next(device)).then_some(&r.previous)
    }

    /// Whether any device plans with an entry other than the catalog's.
    pub fn overrides(&self) -> bool {
        self.active.values().any(|r| r.phase != Phase::Promoted)
    }

    /// Per active rollout (in shard order), whether `device` gets the new
    /// entry: the key of the device's catalog view.
    pub fn view_key(&self, device: &DeviceId) -> Vec<bool> {
        self.active.values().map(|r| r.gets_next(device)).collect()
    }

    /// The catalog a device with view `key` plans with: the new catalog
    /// with the previous entry of every rollout the key says no to.
    pub fn catalog_view(&self, catalog: &Catalog, key: &[bool]) -> Catalog {
        let mut c = catalog.clone();
        for (r, &next) in self.active.values().zip(key) {
            if !next {
                if let Some(s) = c.shards.get_mut(&r.shard) {
                    *s = r.previous.clone();
                }
            }
        }
        c
    }

    fn end(&mut self, r: Rollout, cfg: &RolloutConfig) {
        self.ended.insert(0, r);
        self.ended.truncate(cfg.history);
    }

    /// A reload replaced `old` (the catalog the fleet ran, stable entries)
    /// with `new`: starts a rollout for every changed entry. `members` are
    /// the enrolled devices with their group.
    pub fn on_reload(
        &mut self,
        cfg: &RolloutConfig,
        old: &Catalog,
        new: &Catalog,
        members: &[Member<'_>],
        now: u64,
    ) -> Vec<RolloutEvent> {
        let mut events = Vec::new();
        // Entries gone from the catalog end their rollout.
        let gone: Vec<String> = self
            .active
            .keys()
            .filter(|s| !new.shards.contains_key(*s))
            .cloned()
            .collect();
        for s in gone {
            if let Some(mut r) = self.active.remove(&s) {
                r.reason = format!("ended: {s} left the catalog");
                self.end(r, cfg);
            }
        }
        for (id, next) in &new.shards {
            // What devices not in a rollout of it run now.
            let stable = match self.active.get(id) {
                Some(r) => r.stable().clone(),
                None => match old.shards.get(id) {
                    Some(s) => s.clone(),
                    None => continue, // a new entry: nobody runs it yet
                },
            };
            let changed = spec_fingerprint(&stable) != spec_fingerprint(next);
            let running_same = self
                .active
                .get(id)
                .is_some_and(|r| spec_fingerprint(&r.next) == spec_fingerprint(next));
            if running_same {
                continue; // the same reload again: the rollout goes on
            }
            if let Some(mut r) = self.active.remove(id) {
                r.reason = format!("replaced by a reload of {}", label(next));
                self.end(r, cfg);
            }
            if !changed || !cfg.staged {
                continue;
            }
            let (canaries, groups) = select_canaries(members, cfg.canary_permille);
            if canaries.is_empty() {
                continue; // no device to try it on: nothing to stage
            }
            let reason = format!(
                "canary: {} → {} on {} of {} devices ({} ‰ of each group), soak {} s, rollback above {:.0} %",
                label(&stable),
                next.shard.version(),
                canaries.len(),
                members.len(),
                cfg.canary_permille,
                cfg.soak_ms / 1000,
                cfg.failure_threshold_pct
            );
            events.push(RolloutEvent::Started {
                shard: id.clone(),
                reason: reason.clone(),
            });
            self.active.insert(
                id.clone(),
                Rollout {
                    shard: id.clone(),
                    previous: stable,
                    next: next.clone(),
                    phase: Phase::Canary,
                    started_ms: now,
                    phase_since_ms: now,
                    canaries,
                    groups,
                    exposed: BTreeSet::new(),
                    failed: BTreeMap::new(),
                    threshold_pct: cfg.failure_threshold_pct,
                    soak_ms: cfg.soak_ms,
                    reason,
                },
            );
        }
        events
    }

    /// After a restart: rollouts whose new entry is no longer the
    /// catalog's (the files changed while the allocator was down) end.
    pub fn reconcile(&mut self, cfg: &RolloutConfig, catalog: &Catalog) -> Vec<String> {
        let stale: Vec<String> = self
            .active
            .iter()
            .filter(|(s, r)| {
                catalog
                    .shards
                    .get(*s)
                    .is_none_or(|c| spec_fingerprint(c) != spec_fingerprint(&r.next))
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in &stale {
            if let Some(mut r) = self.active.remove(s) {
                r.reason = "ended: the catalog changed while the allocator was down".into();
                self.end(r, cfg);
            }
        }
        stale
    }

    /// Whether `device` is a canary of a running rollout whose new entry
    /// is `shard`.
    pub fn is_canary_of_next(&self, device: &DeviceId, shard: &ShardRef) -> bool {
        self.active.get(shard.id()).is_some_and(|r| {
            r.phase == Phase::Canary && &r.next.shard == shard && r.canaries.contains(device)
        })
    }

    /// `device` runs `shard` fine: a canary of its rollout is exposed.
    /// Whether anything changed.
    pub fn note_running(&mut self, device: &DeviceId, shard: &ShardRef) -> bool {
        match self.active.get_mut(shard.id()) {
            Some(r)
                if r.phase == Phase::Canary
                    && &r.next.shard == shard
                    && r.canaries.contains(device) =>
            {
                r.exposed.insert(device.clone())
            }
            _ => false,
        }
    }

    /// `device` failed `shard` (a start failure or a crash). Counted when
    /// it is a canary failing the new entry. Whether anything changed.
    pub fn note_failure(&mut self, device: &DeviceId, shard: &ShardRef, reason: &str) -> bool {
        match self.active.get_mut(shard.id()) {
            Some(r)
                if r.phase == Phase::Canary
                    && &r.next.shard == shard
                    && r.canaries.contains(device) =>
            {
                r.exposed.insert(device.clone());
                let reason: String = reason.chars().take(160).collect();
                r.failed.insert(device.clone(), reason);
                true
            }
            _ => false,
        }
    }

    /// Promotes or rolls back what is due at `now`.
    pub fn poll(&mut self, cfg: &RolloutConfig, now: u64) -> Vec<RolloutEvent> {
        let mut events = Vec::new();
        let mut promoted = Vec::new();
        for (id, r) in self.active.iter_mut() {
            if r.phase != Phase::Canary {
                continue;
            }
            let rate = r.failure_pct();
            if !r.failed.is_empty() && rate > r.threshold_pct {
                let reason = format!("rollback: {} > {:.0} %)", r.failed_text(), r.threshold_pct);
                r.set_phase(Phase::RolledBack, now, reason.clone());
                events.push(RolloutEvent::RolledBack {
                    shard: id.clone(),
                    reason,
                });
            } else if now.saturating_sub(r.started_ms) >= r.soak_ms && !r.exposed.is_empty() {
                let reason = format!(
                    "promote: {} ≤ {:.0} %) after a soak of {} s",
                    r.failed_text(),
                    r.threshold_pct,
                    now.saturating_sub(r.started_ms) / 1000
                );
                r.set_phase(Phase::Promoted, now, reason.clone());
                events.push(RolloutEvent::Promoted {
                    shard: id.clone(),
                    reason,
                });
                promoted.push(id.clone());
            } else if now.saturating_sub(r.started_ms) >= r.soak_ms
                && !r.reason.starts_with("waiting")
            {
                r.reason = format!(
                    "waiting: soak over but no canary has run {} yet",
                    label(&r.next)
                );
            }
        }
        for id in promoted {
            if let Some(r) = self.active.remove(&id) {
                self.end(r, cfg);
            }
        }
        events
    }

    /// The operator promotes `shard`'s rollout now.
    pub fn promote(
        &mut self,
        cfg: &RolloutConfig,
        shard: &str,
        actor: &str,
        now: u64,
    ) -> Option<RolloutEvent> {
        let mut r = self.active.remove(shard)?;
        let reason = format!(
            "promoted by {actor}: {}, threshold {:.0} %)",
            r.failed_text(),
            r.threshold_pct
        );
        r.set_phase(Phase::Promoted, now, reason.clone());
        self.end(r, cfg);
        Some(RolloutEvent::Promoted {
            shard: shard.to_owned(),
            reason,
        })
    }

    /// The operator rolls `shard`'s rollout back now (canaries get the
    /// previous entry again; it stays so until a reload changes the entry).
    pub fn rollback(&mut self, shard: &str, actor: &str, now: u64) -> Option<RolloutEvent> {
        let r = self.active.get_mut(shard)?;
        if r.phase == Phase::RolledBack {
            return None;
        }
        let reason = format!("rolled back by {actor}: {})", r.failed_text());
        r.set_phase(Phase::RolledBack, now, reason.clone());
        Some(RolloutEvent::RolledBack {
            shard: shard.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests;
