//! The engine proper: event handling, leases (grant, renew, expire), the
//! report-driven reputation signals, prediction-driven pre-activation,
//! borrowing within a tenant pool, and the periodic rebalancer (shifting with
//! stabilization and rollback). Everything iterates `BTreeMap`s in key order
//! and the only randomness is a hash of the configured seed, so the same
//! events at the same times produce the same actions.

use super::catalog::{Catalog, Tier};
use super::feedback;
use super::forecast::ClassForecast;
use super::plan::{self, Capacity, Plan, PlanInput};
use super::reputation::{lease_factor, quota_factor, quota_factor_for};
use super::*;
use shardline_shared::msg::{ShardFailure, ShardState};
use std::sync::Arc;

mod apply;
mod good_neighbour;
mod leases;
mod loans;
mod market;
mod membership;
mod reports;
mod requests;
mod rollouts;
mod shift;

pub use rollouts::{rollout_views, EntryChange, ReloadError, ReloadSummary, RolloutView};

/// Devices touched since the last `take_dirty`, in touch order with
/// consecutive repeats folded (one event usually touches one device several
/// times); `take_dirty` sorts and dedups. Cheaper than a set on the hot path.
#[derive(Debug, Default)]
pub(crate) struct DirtySet {
    list: Vec<DeviceId>,
}

impl DirtySet {
    fn mark(&mut self, id: &DeviceId) {
        if self.list.last() != Some(id) {
            self.list.push(id.clone());
        }
    }

    /// Every device marked since the last call, once each, sorted.
    fn take(&mut self) -> Vec<DeviceId> {
        let mut v = std::mem::take(&mut self.list);
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Transfers are the same loan when these match (the `evaluated` flag of a
/// shift lives on the recipient's copy only).
fn same_loan(a: &Transfer, b: &Transfer) -> bool {
    a.from == b.from
        && a.to == b.to
        && a.kind == b.kind
        && a.units == b.units
        && a.since_ms == b.since_ms
        && a.expires_at_ms == b.expires_at_ms
}

fn sum_units(ts: &[Transfer]) -> [u32; 2] {
    let mut out = [0u32; 2];
    for t in ts {
        out[kind_index(t.kind)] = out[kind_index(t.kind)].saturating_add(t.units);
    }
    out
}

/// Tier budget × reputation quota, per kind (data throttled first).
fn quota_budget(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    KINDS.map(|k| {
        let f = quota_factor_for(&cfg.reputation, k, st.reputation.score);
        (f64::from(tier.budget(k)) * f + 1e-9).floor() as u32
    })
}

/// Quota + borrowed − lent, per kind.
fn effective_budget(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    let q = quota_budget(cfg, tier, st);
    let b = sum_units(&st.borrowed);
    let l = sum_units(&st.lent);
    [0, 1].map(|k| q[k].saturating_add(b[k]).saturating_sub(l[k]))
}

/// Units a device can lend now without dropping below its own current need
/// (what it granted to its applications included).
fn spare(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    let q = quota_budget(cfg, tier, st);
    let l = sum_units(&st.lent);
    let g = st.apps.granted_units();
    [0, 1].map(|k| {
        q[k].saturating_sub(l[k])
            .saturating_sub(st.need_units[k])
            .saturating_sub(g[k])
    })
}

fn limits_of(spec: &catalog::ShardSpec, priority: u8) -> ResourceLimits {
    ResourceLimits {
        cpu_quota_permille: spec.cost.cpu_permille.max(1),
        cpu_weight: 100 + u16::from(priority) * 10,
        memory_max_bytes: spec.cost.memory_kib.saturating_mul(1024),
        nice: if priority >= 50 { 0 } else { 5 },
    }
}

/// Lease length for this device now: the tier cap scaled by reputation, with
/// up to 5 % seeded jitter so a fleet enrolled together does not renew in lockstep.
fn lease_len(cfg: &PolicyConfig, tier: &Tier, score: f64, device: &DeviceId, now: u64) -> u64 {
    let base = tier.lease_cap_ms as f64 * lease_factor(&cfg.reputation, score);
    let u = (prng::hash_str(cfg.seed ^ now, device.as_str()) >> 11) as f64 / (1u64 << 53) as f64;
    let len = (base * (1.0 - 0.05 * u)) as u64;
    len.clamp(cfg.min_lease_ms.min(tier.lease_cap_ms), tier.lease_cap_ms)
}

fn rule_threshold(cfg: &PolicyConfig, rule: &catalog::Rule) -> u64 {
    rule.min_rate_bps.max(cfg.active_rate_bps)
}

/// Capabilities demanded now: every allowed one in static mode; otherwise the
/// ones a need seen within the hysteresis window asks for, then the ones
/// only a prediction holds (the second list: planned after the first).
fn demanded<'c>(
    catalog: &'c Catalog,
    tier: &Tier,
    cfg: &PolicyConfig,
    st: &DeviceState,
    now: u64,
) -> (Vec<&'c str>, Vec<&'c str>) {
    let mut out: Vec<&'c str> = Vec::new();
    let mut predicted_only: Vec<&'c str> = Vec::new();
    if !cfg.features.demand_driven {
        for c in &tier.capabilities {
            if let Some((k, _)) = catalog.capabilities.get_key_value(c) {
                out.push(k.as_str());
            }
        }
        return (out, predicted_only);
    }
    for (c, &t) in &st.demand {
        if now.saturating_sub(t) < cfg.hysteresis_ms {
            if let Some((k, _)) = catalog.capabilities.get_key_value(c) {
                out.push(k.as_str());
            }
        }
    }
    for (c, &until) in &st.predicted {
        if until > now && !out.iter().any(|o| o == c) {
            if let Some((k, _)) = catalog.capabilities.get_key_value(c) {
                out.push(k.as_str());
                predicted_only.push(k.as_str());
            }
        }
    }
    (out, predicted_only)
}

/// The policy engine. Holds the catalog, the agreements and every device's state.
#[derive(Debug)]
pub struct Engine {
    catalog: std::sync::Arc<Catalog>,
    agreements: std::sync::Arc<Agreements>,
    config: PolicyConfig,
    devices: BTreeMap<DeviceId, DeviceState>,
    /// Tenant ⇒ its devices (the borrowing/shifting pool); derived, rebuilt on restore.
    pools: BTreeMap<String, BTreeSet<DeviceId>>,
    last_shift_ms: Option<u64>,
    /// When the credit market last ran (like `last_shift_ms`, not persisted).
    last_market_ms: Option<u64>,
    /// (tenant, kind) ⇒ the latest clearing price of its pool (in memory:
    /// a restart starts again from the reserve).
    market_prices: BTreeMap<(String, usize), u64>,
    /// Devices whose state changed since the last `take_dirty`.
    dirty: DirtySet,
    /// Of those, the ones whose change must be on disk with the next commit
    /// rather than lazily: both sides of a payment or of a transfer of
    /// units (a loan, a shift, a market sale). A crash must not keep one
    /// side and lose the other (a debit without its credit, a borrower's
    /// units without the lender's loan, so the pool counted twice).
    durable_now: DirtySet,
    /// Failing catalog entries and the start failures behind them.
    health: CatalogHealth,
    /// `health` changed since the last `take_health_dirty`.
    health_dirty: bool,
    /// Per-device shard configuration (clear values, secret key *names*).
    /// Not part of [`DeviceState`]: the service's device record is where it
    /// lives; the service hands it over on restore and on every change.
    device_config: BTreeMap<DeviceId, DeviceConfigView>,
    /// The operator behind the event being handled (`Event::ByOperator`),
    /// named in its explanations; `None` outside one.
    acting: Option<String>,
    /// Staged rollouts of changed catalog entries (persisted by the service).
    rollouts: super::rollout::Rollouts,
    /// `rollouts` changed since the last `take_rollouts_dirty`.
    rollouts_dirty: bool,
    /// Catalog views of devices a rollout keeps on a previous entry, by
    /// [`super::rollout::Rollouts::view_key`]; derived, cleared on change.
    catalog_views: BTreeMap<Vec<bool>, Arc<Catalog>>,
}

impl Engine {
    pub fn new(catalog: Catalog, agreements: Agreements, config: PolicyConfig) -> Self {
        Self {
            catalog: Arc::new(catalog),
            agreements: Arc::new(agreements),
            config,
            devices: BTreeMap::new(),
            pools: BTreeMap::new(),
            last_shift_ms: None,
            last_market_ms: None,
            market_prices: BTreeMap::new(),
            dirty: DirtySet::default(),
            durable_now: DirtySet::default(),
            health: CatalogHealth::default(),
            health_dirty: false,
            device_config: BTreeMap::new(),
            acting: None,
            rollouts: super::rollout::Rollouts::default(),
            rollouts_dirty: false,
            catalog_views: BTreeMap::new(),
        }
    }

    /// Who an operator event is by, as the explanations say it.
    fn actor(&self) -> String {
        self.acting
            .clone()
            .unwrap_or_else(|| "the operator".to_owned())
    }

    /// Failing catalog entries and recent start failures.
    pub fn catalog_health(&self) -> &CatalogHealth {
        &self.health
    }

    /// Loads persisted catalog health; marks of entries the current catalog
    /// changed (or dropped) are cleared: the operator fixed them.
    pub fn restore_catalog_health(&mut self, mut health: CatalogHealth) {
        for shard in health.reconcile_catalog(&self.catalog) {
            tracing::info!(%shard, "failing mark cleared: the catalog entry changed");
            self.health_dirty = true;
        }
        self.health = health;
    }

    /// Replaces the catalog (a reload): failing marks of changed entries are
    /// cleared and every device is re-planned at the next tick.
    pub fn replace_catalog(&mut self, catalog: Catalog) {
        self.catalog = Arc::new(catalog);
        self.catalog_views.clear();
        if !self.health.reconcile_catalog(&self.catalog).is_empty() {
            self.health_dirty = true;
        }
        for st in self.devices.values_mut() {
            st.wake_at_ms = 0;
        }
    }

    /// Whether catalog health changed since the last call (to persist it).
    pub fn take_health_dirty(&mut self) -> bool {
        std::mem::take(&mut self.health_dirty)
    }

    /// Devices flagged as probably cloned at `now`.
    pub fn duplicate_devices(&self, now: u64) -> usize {
        self.devices
            .values()
            .filter(|st| st.clone_watch.flagged(now))
            .count()
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn agreements(&self) -> &Agreements {
        &self.agreements
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Handles one event at `now_ms` and returns what the service must do.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        // Events that may re-plan one device can free units its queued
        // requests wait for: serve them right after.
        let serve_queue_of = match &event {
            Event::Report(QosReport { device, .. })
            | Event::Ack { device, .. }
            | Event::ComplianceEvent { device, .. }
            | Event::Unpin { device, .. }
            | Event::Revoke { device, .. }
            | Event::Resume { device }
            | Event::DeviceConfig { device, .. } => self
                .devices
                .get(device)
                .filter(|st| !st.apps.queue.is_empty())
                .map(|_| device.clone()),
            _ => None,
        };
        match event {
            Event::Enrolled {
                device,
                tier,
                tenant,
            } => self.enroll(now_ms, device, tier, tenant, &mut out),
            Event::Unenrolled { device } => self.unenroll(now_ms, &device, &mut out),
            Event::Report(report) => self.on_report(now_ms, report, &mut out),
            Event::Sent { device, seq } => {
                if let Some(st) = self.devices.get_mut(&device) {
                    if st.pending_since_ms.is_some() {
                        st.pending_seq = Some(seq);
                        self.dirty.mark(&device);
                    }
                }
            }
            Event::Ack {
                device,
                seq,
                outcome,
            } => self.on_ack(now_ms, &device, seq, outcome, &mut out),
            Event::ComplianceEvent { device, kind } => {
                if self.devices.contains_key(&device) {
                    self.penalize_compliance(now_ms, &device, kind);
                    self.reconcile(now_ms, &device, &mut out);
                }
            }
            Event::Tick => self.on_tick(now_ms, &mut out),
            Event::Pin { device, shard } => {
                let by = self.actor();
                let what = format!("{shard} pinned by {by}: kept active whatever the demand, within the tier budget");
                self.operator(now_ms, &device, &shard, &mut out, &what, |st, s| {
                    st.pinned.insert(s.to_owned());
                    st.feedback.operator_marks.insert(format!("pin:{s}"), by);
                })
            }
            Event::Unpin { device, shard } => {
                let what = format!("{shard} unpinned by {}: demand decides again", self.actor());
                self.operator(now_ms, &device, &shard, &mut out, &what, |st, s| {
                    st.pinned.remove(s);
                    st.feedback.operator_marks.remove(&format!("pin:{s}"));
                })
            }
            Event::Revoke { device, shard } => {
                let what = format!("{shard} revoked by {}: never granted here until unrevoked (its alternative is planned)", self.actor());
                self.operator(now_ms, &device, &shard, &mut out, &what, |st, s| {
                    st.revoked.insert(s.to_owned());
                    st.pinned.remove(s);
                    st.feedback.operator_marks.remove(&format!("pin:{s}"));
                })
            }
            Event::Unrevoke { device, shard } => {
                let what = format!("{shard} unrevoked by {}", self.actor());
                self.operator(now_ms, &device, &shard, &mut out, &what, |st, s| {
                    st.revoked.remove(s);
                })
            }
            Event::ByOperator { actor, event } => {
                let outer = self.acting.replace(actor);
                out.extend(self.handle(now_ms, *event));
                self.acting = outer;
            }
            Event::StaleReport(report) => self.on_stale_report(now_ms, report, &mut out),
            Event::Readmitted { device, prior } => self.readmit(now_ms, &device, prior, &mut out),
            Event::RetryCatalogEntry { shard } => self.retry_entry(now_ms, &shard, &mut out),
            Event::Drain { device } => {
                let by = self.actor();
                let what = format!(
                    "drained by {by}: everything deactivated, nothing granted until resumed"
                );
                self.operator(now_ms, &device, "", &mut out, &what, |st, _| {
                    st.drained = true;
                    st.feedback.operator_marks.insert("drain".to_owned(), by);
                })
            }
            Event::Resume { device } => {
                let what = format!("resumed by {}", self.actor());
                self.operator(now_ms, &device, "", &mut out, &what, |st, _| {
                    st.drained = false;
                    st.feedback.operator_marks.remove("drain");
                })
            }
            Event::DeviceConfig {
                device,
                config,
                changed,
            } => self.on_device_config(now_ms, &device, config, &changed, &mut out),
            Event::AppRequest { request } => self.on_app_request(now_ms, request, &mut out),
            Event::ServiceRequest { instance, op } => {
                self.on_service_request(now_ms, instance, op, &mut out)
            }
            Event::AdjustInstanceReputation {
                instance,
                change,
                reason,
                actor,
            } => self.adjust_instance(now_ms, instance, change, reason, actor, &mut out),
        }
        if let Some(device) = serve_queue_of {
            self.tick_apps(now_ms, &device, &mut out);
        }
        out
    }

    /// Installs a device's per-device configuration without re-planning
    /// (the service restoring what its record holds).
    pub fn restore_device_config(&mut self, device: DeviceId, config: DeviceConfigView) {
        if config.is_empty() {
            self.device_config.remove(&device);
        } else {
            self.device_config.insert(device, config);
        }
    }

    /// The device's per-device configuration as the engine holds it.
    pub fn device_config(&self, device: &DeviceId) -> Option<&DeviceConfigView> {
        self.device_config.get(device)
    }

    // ------------------------------------------------------------ state API

    /// The device's state, to persist after an event touched it.
    pub fn device_state(&self, device: &DeviceId) -> Option<&DeviceState> {
        self.devices.get(device)
    }

    /// Loads a device's persisted state (replacing what was in memory).
    pub fn restore_device(&mut self, device: DeviceId, state: DeviceState) {
        if let Some(old) = self.devices.get(&device) {
            if let Some(t) = &old.tenant {
                if let Some(p) = self.pools.get_mut(t) {
                    p.remove(&device);
                }
            }
        }
        if let Some(t) = &state.tenant {
            self.pools
                .entry(t.clone())
                .or_default()
                .insert(device.clone());
        }
        self.devices.insert(device, state);
    }

    /// Drops a device from memory without any effect on it (cache eviction).
    pub fn evict_device(&mut self, device: &DeviceId) -> Option<DeviceState> {
        self.device_config.remove(device);
        let st = self.devices.remove(device)?;
        if let Some(t) = &st.tenant {
            if let Some(p) = self.pools.get_mut(t) {
                p.remove(device);
            }
        }
        Some(st)
    }

    /// Devices whose state changed since the last call (to persist them).
    /// The decisions made on `device` since the last call (for its history).
    pub fn take_fresh_decisions(&mut self, device: &DeviceId) -> Vec<feedback::Decision> {
        self.devices
            .get_mut(device)
            .map(|st| std::mem::take(&mut st.feedback.fresh.0))
            .unwrap_or_default()
    }

    pub fn take_dirty(&mut self) -> Vec<DeviceId> {
        self.dirty.take()
    }

    /// The devices of [`Engine::take_dirty`] whose state the service must
    /// write with its next commit instead of lazily.
    pub fn take_durable_now(&mut self) -> Vec<DeviceId> {
        self.durable_now.take()
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    // -------------------------------------------------------------- queries

    pub fn devices(&self) -> Vec<DeviceSummary> {
        self.devices
            .iter()
            .map(|(id, st)| summary_of(id, st))
            .collect()
    }

    /// One device's row (what [`Engine::devices`] gives for it), without
    /// building every other row: the dashboard's pages ask for a few.
    pub fn summary(&self, device: &DeviceId) -> Option<DeviceSummary> {
        self.devices.get(device).map(|st| summary_of(device, st))
    }

    pub fn device(&self, device: &DeviceId) -> Option<DeviceView> {
        self.device_at(device, st_now(self.devices.get(device)?))
    }

    /// The device view with refusal texts as of `now` (backoff remaining).
    pub fn device_at(&self, device: &DeviceId, now: u64) -> Option<DeviceView> {
        let st = self.devices.get(device)?;
        let tier = self.agreements.tiers.get(&st.tier);
        let budget = tier
            .map(|t| effective_budget(&self.config, t, st))
            .unwrap_or([0, 0]);
        let quota = tier
            .map(|t| quota_budget(&self.config, t, st))
            .unwrap_or([0, 0]);
        let ctx = faults::explain_ctx(&self.config, quota, st, now);
        let refusal_reasons = st
            .refusals
            .iter()
            .map(|(c, r)| (c.clone(), r.explain(c, device.as_str(), &ctx)))
            .collect();
        Some(DeviceView {
            device: device.clone(),
            tier: st.tier.clone(),
            tenant: st.tenant.clone(),
            reputation: st.reputation.score,
            reputation_history: st.reputation.history.clone(),
            budget_compute_units: budget[0],
            budget_data_units: budget[1],
            leases: st.leases.values().cloned().collect(),
            borrowed: st.borrowed.clone(),
            lent: st.lent.clone(),
            pinned: st.pinned.iter().cloned().collect(),
            revoked: st.revoked.iter().cloned().collect(),
            drained: st.drained,
            refusals: st.refusals.clone(),
            refusal_reasons,
            start_failures: st.start_failures.clone(),
            duplicate: st.clone_watch.flag.clone().filter(|f| f.until_ms > now),
            last_qos: st.last_report.clone(),
            flaps: st.flaps,
            arch: plan::device_arch(st).map(str::to_owned),
            app_instances: st.apps.summaries(&self.config.requests, device, now),
            decisions: st.feedback.decisions.clone(),
            prediction: st
                .feedback
                .classes
                .iter()
                .map(|c| PredictionView {
                    class: c.class,
                    preactivations: c.total_predictions,
                    hits: c.total_hits,
                    off_until_ms: (c.off_until_ms > now).then_some(c.off_until_ms),
                    seasonal_mae_kbps: c.seasonal_mae,
                    short_term_mae_kbps: c.short_mae,
                })
                .collect(),
            shifts: st.feedback.shifts.clone(),
            shift_gain: st.feedback.shift_gain,
            credits: st.credits.clone(),
            lending: st.lending.clone(),
        })
    }

    /// How many devices have a reputation in each tenth of 0–100 (the
    /// last bucket holds 90–100), for the gauges: one pass, nothing built
    /// per device.
    pub fn reputation_buckets(&self) -> [u64; 10] {
        let mut buckets = [0u64; 10];
        for st in self.devices.values() {
            let b = ((st.reputation.score / 10.0).floor().max(0.0) as usize).min(9);
            buckets[b] += 1;
        }
        buckets
    }

    /// Units in use and budgeted, per tier.
    pub fn units_by_tier(&self) -> BTreeMap<String, TierUsage> {
        let mut out: BTreeMap<String, TierUsage> = BTreeMap::new();
        for name in self.agreements.tiers.keys() {
            out.insert(name.clone(), TierUsage::default());
        }
        for st in self.devices.values() {
            let used = used_units(st);
            // Runs over the fleet every tick (gauges): the tier name is
            // cloned only for a tier the agreements no longer list.
            let u = match out.get_mut(&st.tier) {
                Some(u) => u,
                None => out.entry(st.tier.clone()).or_default(),
            };
            u.devices += 1;
            u.compute_units_used += u64::from(used[0]);
            u.data_units_used += u64::from(used[1]);
            if let Some(t) = self.agreements.tiers.get(&st.tier) {
                u.compute_units_budget += u64::from(t.compute_units);
                u.data_units_budget += u64::from(t.data_units);
            }
        }
        out
    }

    // ---------------------------------------------------------------- events
}

/// The time a device's state was last brought up to (for views without a clock).
fn st_now(st: &DeviceState) -> u64 {
    st.reputation.updated_ms
}

/// Shards the planner must skip on this device: entries failing on its
/// architecture (unknown before its first report: nothing is skipped).
fn unusable_for(health: &CatalogHealth, st: &DeviceState) -> BTreeMap<String, Refusal> {
    let mut out = BTreeMap::new();
    let Some(arch) = st.resources.as_ref().map(|r| r.arch.as_str()) else {
        return out;
    };
    for m in health.marks().filter(|m| m.arch == arch) {
        out.insert(
            m.shard.clone(),
            Refusal::CatalogFailing {
                shard: m.shard.clone(),
                arch: m.arch.clone(),
                reason: m.reason.clone(),
            },
        );
    }
    out
}

fn plan_for<'c>(
    catalog: &'c Catalog,
    tier: &Tier,
    cfg: &PolicyConfig,
    now: u64,
    st: &DeviceState,
    health: &CatalogHealth,
    device_config: Option<&DeviceConfigView>,
) -> Plan<'c> {
    let unusable = unusable_for(health, st);
    let (demanded, predicted_only) = demanded(catalog, tier, cfg, st, now);
    let capacity = st.resources.as_ref().map(|r| {
        let (cpu, rss) = st
            .last_report
            .as_ref()
            .map_or((0, 0), |l| (l.shard_cpu_permille, l.shard_rss_kib));
        Capacity::from_report(r, cpu, rss, cfg.capacity_headroom)
    });
    // Units granted to applications are not the plan's to use: pushed
    // shards and explicit grants never over-commit the budget together.
    let budget = effective_budget(cfg, tier, st);
    let granted = st.apps.granted_units();
    plan::plan(&PlanInput {
        catalog,
        tier,
        state: st,
        now_ms: now,
        budget: [0, 1].map(|k| budget[k].saturating_sub(granted[k])),
        capacity,
        demanded: &demanded,
        predicted_only: &predicted_only,
        unusable: &unusable,
        device_config,
    })
}

/// When a tick next has work for this device.
fn next_wake(cfg: &PolicyConfig, st: &DeviceState, now: u64, renew_before: u64) -> u64 {
    let mut wake = u64::MAX;
    // Past-due times stay past due: the next tick handles them.
    let mut at = |t: u64| wake = wake.min(t);
    for l in st.leases.values() {
        at(l.expires_at_ms.saturating_sub(renew_before));
    }
    for &t in st.demand.values() {
        at(t.saturating_add(cfg.hysteresis_ms));
    }
    for &t in st.predicted.values() {
        at(t);
    }
    for &t in st.avoid_until.values() {
        at(t);
    }
    for t in st.borrowed.iter().chain(st.lent.iter()) {
        at(t.expires_at_ms);
    }
    if let Some(p) = st.pending_since_ms {
        at(p.saturating_add(cfg.ack_timeout_ms));
    }
    if let Some(t) = st.apps.next_due() {
        at(t);
    }
    if cfg.features.prediction && !st.forecasts.is_empty() {
        let slot = cfg.forecast.slot_ms.max(1);
        at((now / slot + 1) * slot);
    }
    let throttled = KINDS
        .iter()
        .any(|&k| quota_factor_for(&cfg.reputation, k, st.reputation.score) < 1.0);
    if throttled || !st.refusals.is_empty() {
        // Recovering reputation or unmet demand: look again soon.
        at(now.saturating_add(cfg.renew_margin_ms.max(60_000)));
    }
    wake
}

fn summary_of(id: &DeviceId, st: &DeviceState) -> DeviceSummary {
    let used = used_units(st);
    DeviceSummary {
        device: id.clone(),
        tier: st.tier.clone(),
        tenant: st.tenant.clone(),
        reputation: st.reputation.score,
        compute_units: used[0],
        data_units: used[1],
        active_shards: st.leases.len(),
        last_report_ms: st.last_report.as_ref().map(|r| r.at_ms),
        drained: st.drained,
    }
}

fn used_units(st: &DeviceState) -> [u32; 2] {
    let mut u = [0u32; 2];
    for l in st.leases.values() {
        u[kind_index(l.kind)] += l.units;
    }
    u
}

/// Demand (kbit/s) behind a capability: the larger of the last report and the
/// next slot's forecast, over the classes whose needs ask for it.
fn cap_demand_kbps(
    catalog: &Catalog,
    cfg: &PolicyConfig,
    st: &DeviceState,
    cap: &str,
    now: u64,
) -> f64 {
    let asks = |need: &QosNeed| {
        catalog
            .rules
            .iter()
            .any(|r| r.need.matches(need) && r.capabilities.iter().any(|c| c == cap))
    };
    let mut total = 0.0;
    if let Some(r) = &st.last_report {
        for c in &r.classes {
            if asks(&c.need) {
                let mut kbps = c.rate_bps as f64 / 1000.0;
                if let Some(f) = st.forecasts.iter().find(|f| f.class == c.class) {
                    if f.model.warmed_up() {
                        let slot = now / cfg.forecast.slot_ms.max(1) + 1;
                        kbps = kbps.max(f64::from(f.model.forecast(&cfg.forecast, slot).mean));
                    }
                }
                total += kbps;
            }
        }
    }
    total
}

/// Units a capability starts (each member's first option and its
/// dependencies): the cost side of a pre-activation.
fn capability_units(catalog: &Catalog, cap: &str) -> u32 {
    let Some(spec) = catalog.capabilities.get(cap) else {
        return 0;
    };
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut todo: Vec<&str> = spec.members.iter().map(String::as_str).collect();
    let mut units = 0u32;
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(s) = catalog.shards.get(id) {
            units = units.saturating_add(s.units);
            todo.extend(s.depends_on.iter().map(String::as_str));
        }
    }
    units
}

/// Pre-activation (see [`super::feedback`]): judges the pre-activations
/// whose hold ended, then for each class below a rule's threshold now,
/// holds the rule's capabilities until the end of the first slot within
/// the horizon where the expected gain outweighs the expected cost.
fn predict(catalog: &Catalog, cfg: &PolicyConfig, st: &mut DeviceState, now: u64) {
    let pcfg = &cfg.prediction;
    let mut judged = Vec::new();
    for learn in &mut st.feedback.classes {
        if let Some(why) = learn.close(pcfg, now) {
            judged.push((format!("{:?}", learn.class), why));
        }
    }
    for (subject, why) in judged {
        st.feedback
            .decide(now, feedback::DecisionKind::Prediction, &subject, why);
    }
    let slot_ms = cfg.forecast.slot_ms.max(1);
    let slot_now = now / slot_ms;
    let ahead = cfg.prediction_horizon_ms.div_ceil(slot_ms).max(1);
    let lag_ms = match st.feedback.report_interval_ms {
        0 => 60_000,
        w => w,
    };
    let z = f64::from(cfg.forecast.z.max(0.1));
    let mut holds: Vec<(TrafficClass, String, u64, String)> = Vec::new();
    for f in &st.forecasts {
        if !f.model.warmed_up() {
            continue;
        }
        let learn = st.feedback.class(f.class);
        if learn.is_some_and(|l| l.off_until_ms > now) {
            continue;
        }
        let observed_kbps = st.last_report.as_ref().map_or(0.0, |r| {
            r.classes
                .iter()
                .find(|c| c.class == f.class)
                .map_or(0.0, |c| c.rate_bps as f64 / 1000.0)
        });
        for rule in &catalog.rules {
            if !rule.need.matches(&f.need) {
                continue;
            }
            let threshold_kbps =
                rule_threshold(cfg, rule).max(cfg.prediction_min_rate_bps) as f64 / 1000.0;
            if observed_kbps >= threshold_kbps {
                continue; // observed: the reactive part has it
            }
            let units: u32 = rule
                .capabilities
                .iter()
                .map(|c| capability_units(catalog, c))
                .sum();
            for slot in slot_now..=slot_now + ahead {
                if slot <= f.model.last_slot {
                    continue;
                }
                // On earlier in this slot and off now: an end, not an onset.
                if slot == slot_now && learn.is_some_and(|l| l.cur_slot == slot && l.cur_on) {
                    continue;
                }
                let week = learn.map_or(1.0, |l| l.week_factor(slot * slot_ms));
                let fc = f.model.forecast(&cfg.forecast, slot);
                let (mut mean, mut sigma) = (
                    f64::from(fc.mean * week),
                    f64::from((fc.upper - fc.mean) * week) / z,
                );
                let short = learn.filter(|l| slot == slot_now && l.short_is_better());
                if let Some(l) = short {
                    // A mean absolute error of a normal error is 0.8 σ.
                    mean = f64::from(l.short.forecast());
                    sigma = f64::from(l.short_mae) * 1.25;
                }
                let slot_end = (slot + 1) * slot_ms;
                let measured_p_on = learn
                    .and_then(|l| l.p_on(slot))
                    .map(|p| p * f64::from(week.min(1.0)));
                let v = feedback::preactivation_value(
                    pcfg,
                    &feedback::PreactivationInput {
                        mean_kbps: mean,
                        sigma_kbps: sigma,
                        measured_p_on,
                        threshold_kbps,
                        lag_ms,
                        units,
                        lead_ms: (slot * slot_ms).saturating_sub(now),
                        hold_ms: slot_end.saturating_sub(now),
                    },
                );
                // Started again within the flap window of an explicit
                // stop, it would flap: the onset waits for the report.
                let would_flap = rule.capabilities.iter().any(|c| {
                    catalog.capabilities.get(c).is_some_and(|spec| {
                        spec.members.iter().any(|m| {
                            st.ended_at.get(m).is_some_and(|&(t, explicit)| {
                                explicit && now.saturating_sub(t) < cfg.flap_window_ms
                            })
                        })
                    })
                });
                if v.pays(pcfg) && !would_flap {
                    for cap in &rule.capabilities {
                        let why = format!(
                            "{cap} held ahead of a forecast onset of {:?} ({} model): P(rate >= {threshold_kbps:.0} kbit/s) = {:.2}, expected gain {:.0} Mbit > expected cost {:.0} Mbit of {units} unit(s) held",
                            f.class,
                            if short.is_some() { "short-term" } else { "seasonal" },
                            v.p_on,
                            v.gain_mbit,
                            v.cost_mbit
                        );
                        holds.push((f.class, cap.clone(), slot_end, why));
                    }
                    break;
                }
            }
        }
    }
    for (class, cap, until, why) in holds {
        let fresh = st.predicted.get(&cap).is_none_or(|&t| t <= now);
        let e = st.predicted.entry(cap.clone()).or_insert(until);
        *e = (*e).max(until);
        st.feedback.class_mut(class).opened(now, until);
        if fresh {
            st.feedback
                .decide(now, feedback::DecisionKind::Preactivate, &cap, why);
        }
    }
}
