//! The engine proper: event handling, leases (grant, renew, expire), the
//! report-driven reputation signals, prediction-driven pre-activation,
//! borrowing within a tenant pool, and the periodic rebalancer (shifting with
//! stabilization and rollback). Everything iterates `BTreeMap`s in key order
//! and the only randomness is a hash of the configured seed, so the same
//! events at the same times produce the same actions.

use super::catalog::{Catalog, Tier};
use super::forecast::ClassForecast;
use super::plan::{self, Capacity, Plan, PlanInput};
use super::reputation::{lease_factor, quota_factor};
use super::*;
use shardline_shared::msg::{Activation, ShardFailure, ShardState};
use std::sync::Arc;

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

/// Tier budget × reputation quota, per kind.
fn quota_budget(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    let f = quota_factor(&cfg.reputation, st.reputation.score);
    KINDS.map(|k| (f64::from(tier.budget(k)) * f + 1e-9).floor() as u32)
}

/// Quota + borrowed − lent, per kind.
fn effective_budget(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    let q = quota_budget(cfg, tier, st);
    let b = sum_units(&st.borrowed);
    let l = sum_units(&st.lent);
    [0, 1].map(|k| q[k].saturating_add(b[k]).saturating_sub(l[k]))
}

/// Units a device can lend now without dropping below its own current need.
fn spare(cfg: &PolicyConfig, tier: &Tier, st: &DeviceState) -> [u32; 2] {
    let q = quota_budget(cfg, tier, st);
    let l = sum_units(&st.lent);
    [0, 1].map(|k| q[k].saturating_sub(l[k]).saturating_sub(st.need_units[k]))
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
/// ones a need (seen within the hysteresis window, or predicted) asks for.
fn demanded<'c>(
    catalog: &'c Catalog,
    tier: &Tier,
    cfg: &PolicyConfig,
    st: &DeviceState,
    now: u64,
) -> Vec<&'c str> {
    let mut out: Vec<&'c str> = Vec::new();
    if !cfg.features.demand_driven {
        for c in &tier.capabilities {
            if let Some((k, _)) = catalog.capabilities.get_key_value(c) {
                out.push(k.as_str());
            }
        }
        return out;
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
            }
        }
    }
    out
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
            dirty: DirtySet::default(),
        }
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
                self.operator(now_ms, &device, &shard, &mut out, |st, s| {
                    st.pinned.insert(s.to_owned());
                })
            }
            Event::Unpin { device, shard } => {
                self.operator(now_ms, &device, &shard, &mut out, |st, s| {
                    st.pinned.remove(s);
                })
            }
            Event::Revoke { device, shard } => {
                self.operator(now_ms, &device, &shard, &mut out, |st, s| {
                    st.revoked.insert(s.to_owned());
                    st.pinned.remove(s);
                })
            }
            Event::Unrevoke { device, shard } => {
                self.operator(now_ms, &device, &shard, &mut out, |st, s| {
                    st.revoked.remove(s);
                })
            }
            Event::Drain { device } => {
                self.operator(now_ms, &device, "", &mut out, |st, _| st.drained = true)
            }
            Event::Resume { device } => {
                self.operator(now_ms, &device, "", &mut out, |st, _| st.drained = false)
            }
        }
        out
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
        let st = self.devices.remove(device)?;
        if let Some(t) = &st.tenant {
            if let Some(p) = self.pools.get_mut(t) {
                p.remove(device);
            }
        }
        Some(st)
    }

    /// Devices whose state changed since the last call (to persist them).
    pub fn take_dirty(&mut self) -> Vec<DeviceId> {
        let mut v = std::mem::take(&mut self.dirty.list);
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    // -------------------------------------------------------------- queries

    pub fn devices(&self) -> Vec<DeviceSummary> {
        self.devices
            .iter()
            .map(|(id, st)| {
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
            })
            .collect()
    }

    pub fn device(&self, device: &DeviceId) -> Option<DeviceView> {
        let st = self.devices.get(device)?;
        let budget = self
            .agreements
            .tiers
            .get(&st.tier)
            .map(|t| effective_budget(&self.config, t, st))
            .unwrap_or([0, 0]);
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
            last_qos: st.last_report.clone(),
            flaps: st.flaps,
        })
    }

    /// Units in use and budgeted, per tier.
    pub fn units_by_tier(&self) -> BTreeMap<String, TierUsage> {
        let mut out: BTreeMap<String, TierUsage> = BTreeMap::new();
        for name in self.agreements.tiers.keys() {
            out.insert(name.clone(), TierUsage::default());
        }
        for st in self.devices.values() {
            let used = used_units(st);
            let u = out.entry(st.tier.clone()).or_default();
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

    fn enroll(
        &mut self,
        now: u64,
        device: DeviceId,
        tier: String,
        tenant: Option<String>,
        out: &mut Vec<Action>,
    ) {
        let Some(t) = self.agreements.tiers.get(&tier) else {
            out.push(Action::Alert {
                device,
                message: format!("enrollment refused: unknown tier {tier:?}"),
            });
            return;
        };
        let tenant = tenant.or_else(|| t.tenant.clone());
        let state = match self.devices.get(&device) {
            Some(old) => {
                let mut st = old.clone();
                if st.tenant != tenant {
                    // Leaving a pool ends every loan in it.
                    self.end_all_loans(&device, out);
                    st = self.devices[&device].clone();
                }
                st.tier = tier;
                st.tenant = tenant;
                st
            }
            None => DeviceState {
                tier,
                tenant,
                enrolled_at_ms: now,
                reputation: ReputationState::new(&self.config.reputation, now),
                leases: BTreeMap::new(),
                demand: BTreeMap::new(),
                predicted: BTreeMap::new(),
                forecasts: Vec::new(),
                resources: None,
                last_report: None,
                last_report_seq: 0,
                rejections_seen: 0,
                borrowed: Vec::new(),
                lent: Vec::new(),
                pinned: BTreeSet::new(),
                revoked: BTreeSet::new(),
                avoid_until: BTreeMap::new(),
                drained: false,
                pending_since_ms: None,
                pending_seq: None,
                ended_at: BTreeMap::new(),
                flaps: 0,
                need_units: [0, 0],
                refusals: BTreeMap::new(),
                stabilize_until_ms: 0,
                rollbacks: 0,
                wake_at_ms: 0,
            },
        };
        self.restore_device(device.clone(), state);
        self.dirty.mark(&device);
        self.reconcile(now, &device, out);
    }

    fn unenroll(&mut self, now: u64, device: &DeviceId, out: &mut Vec<Action>) {
        if !self.devices.contains_key(device) {
            return;
        }
        self.end_all_loans(device, out);
        if let Some(st) = self.evict_device(device) {
            let ops: Vec<Operation> = st
                .leases
                .values()
                .map(|l| Operation::Deactivate {
                    shard: l.shard.clone(),
                })
                .collect();
            if !ops.is_empty() {
                out.push(Action::Instruct {
                    device: device.clone(),
                    ops,
                    expires_at_ms: now.saturating_add(self.config.instruction_ttl_ms),
                });
            }
        }
        self.dirty.mark(device);
        let _ = now;
    }

    /// Ends every loan the device is part of; counterparts are re-planned.
    fn end_all_loans(&mut self, device: &DeviceId, out: &mut Vec<Action>) {
        let Some(st) = self.devices.get(device) else {
            return;
        };
        let loans: Vec<Transfer> = st.borrowed.iter().chain(st.lent.iter()).cloned().collect();
        let mut others = BTreeSet::new();
        for t in &loans {
            self.remove_loan(t);
            others.insert(if &t.from == device {
                t.to.clone()
            } else {
                t.from.clone()
            });
        }
        let now = self
            .devices
            .get(device)
            .map(|s| s.reputation.updated_ms)
            .unwrap_or(0);
        for o in others {
            self.reconcile(now, &o, out);
        }
    }

    fn remove_loan(&mut self, t: &Transfer) {
        if let Some(b) = self.devices.get_mut(&t.to) {
            b.borrowed.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.to);
        }
        if let Some(l) = self.devices.get_mut(&t.from) {
            l.lent.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.from);
        }
    }

    fn operator(
        &mut self,
        now: u64,
        device: &DeviceId,
        shard: &str,
        out: &mut Vec<Action>,
        f: impl FnOnce(&mut DeviceState, &str),
    ) {
        if !shard.is_empty() && !self.catalog.shards.contains_key(shard) {
            out.push(Action::Alert {
                device: device.clone(),
                message: format!("unknown shard {shard:?}"),
            });
            return;
        }
        let Some(st) = self.devices.get_mut(device) else {
            out.push(Action::Alert {
                device: device.clone(),
                message: "unknown device".to_owned(),
            });
            return;
        };
        f(st, shard);
        self.dirty.mark(device);
        self.reconcile(now, device, out);
    }

    fn penalize_compliance(&mut self, now: u64, device: &DeviceId, kind: ComplianceKind) {
        let r = &self.config.reputation;
        let delta = match kind {
            ComplianceKind::BadReportSignature => r.bad_report_signature,
            ComplianceKind::TamperedInstruction => r.tampered_instruction,
            ComplianceKind::ShardOutsideProfile => r.shard_outside_profile,
            ComplianceKind::ReplayedReport => r.replayed_report,
        };
        if let Some(st) = self.devices.get_mut(device) {
            st.reputation.apply(r, now, delta, kind.as_str());
            self.dirty.mark(device);
        }
    }

    fn on_report(&mut self, now: u64, report: QosReport, out: &mut Vec<Action>) {
        let device = report.device.clone();
        let Engine {
            catalog,
            config: cfg,
            devices,
            ..
        } = self;
        let Some(st) = devices.get_mut(&device) else {
            out.push(Action::Alert {
                device,
                message: "report from a device that is not enrolled".to_owned(),
            });
            return;
        };
        if report.seq <= st.last_report_seq && st.last_report.is_some() {
            return; // a redelivery or a stale report: already counted
        }
        let rcfg = &cfg.reputation;
        st.reputation.decay_to(rcfg, now);
        let window_ms = u64::from(report.window_ms).clamp(1, 3_600_000);
        let mut penalized = false;
        let mut outside: Vec<String> = Vec::new();
        let (mut own_cpu, mut own_rss) = (0u64, 0u64);
        let mut running = Vec::new();
        let mut report = report;
        // A shard's reported CPU and RSS are those of its host process, which
        // runs the whole capability under the sum of its shards' limits: the
        // use is checked against that sum, and an over-limit host costs
        // reputation once per report, not once per shard it hosts.
        let mut host_limits: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for l in st.leases.values() {
            let e = host_limits.entry(l.capability.clone()).or_default();
            e.0 += u64::from(l.limits.cpu_quota_permille);
            e.1 = e.1.saturating_add(l.limits.memory_max_bytes);
        }
        let mut over_limit_hosts: BTreeSet<String> = BTreeSet::new();
        for s in std::mem::take(&mut report.shards) {
            let id = s.shard.id();
            let alive = matches!(
                s.state,
                ShardState::Running | ShardState::Starting | ShardState::Backoff
            );
            if alive {
                own_cpu += u64::from(s.cpu_permille);
                own_rss += s.rss_kib;
            }
            match st.leases.get_mut(id) {
                Some(lease) if lease.shard == s.shard => {
                    let new_restarts = s.restarts.saturating_sub(lease.restarts_seen);
                    if s.restarts < lease.restarts_seen {
                        lease.restarts_seen = s.restarts; // the agent restarted
                    }
                    if new_restarts > 0 {
                        lease.clean = false;
                        lease.restarts_seen = s.restarts;
                        let (delta, why) = match s.last_failure {
                            Some(ShardFailure::OverLimit) => (rcfg.over_limit, "over_limit_kill"),
                            _ => (rcfg.crash, "shard_crash"),
                        };
                        st.reputation
                            .apply(rcfg, now, delta * f64::from(new_restarts.min(3)), why);
                        penalized = true;
                    }
                    let new_errors = s.errors.saturating_sub(lease.errors_seen);
                    lease.errors_seen = s.errors;
                    let per_min = f64::from(new_errors) * 60_000.0 / window_ms as f64;
                    if per_min > rcfg.error_rate_per_min {
                        lease.clean = false;
                        st.reputation.apply(rcfg, now, rcfg.errors, "error_rate");
                        penalized = true;
                    }
                    let (cpu_lim, mem_lim) =
                        host_limits.get(&lease.capability).copied().unwrap_or((
                            u64::from(lease.limits.cpu_quota_permille),
                            lease.limits.memory_max_bytes,
                        ));
                    let cpu_over = u64::from(s.cpu_permille) * 10 > cpu_lim * 12 + 100;
                    let mem_over = s.rss_kib.saturating_mul(1024) > mem_lim;
                    if alive && (cpu_over || mem_over) {
                        lease.clean = false;
                        if over_limit_hosts.insert(lease.capability.clone()) {
                            st.reputation
                                .apply(rcfg, now, rcfg.over_limit, "over_limit_use");
                            penalized = true;
                        }
                    }
                    if s.state == ShardState::Quarantined {
                        // The device gave up on it: plan its alternative for a while.
                        st.avoid_until
                            .insert(id.to_owned(), now.saturating_add(cfg.quarantine_avoid_ms));
                        st.leases.remove(id);
                        st.ended_at.insert(id.to_owned(), (now, false));
                    }
                }
                _ if alive => {
                    let in_grace = st.ended_at.get(id).is_some_and(|&(t, _)| {
                        now.saturating_sub(t) < cfg.outside_profile_grace_ms
                    });
                    let in_flight = st
                        .pending_since_ms
                        .is_some_and(|t| now.saturating_sub(t) < cfg.outside_profile_grace_ms);
                    if !in_grace && !in_flight {
                        outside.push(s.shard.to_string());
                        st.reputation.apply(
                            rcfg,
                            now,
                            rcfg.shard_outside_profile,
                            ComplianceKind::ShardOutsideProfile.as_str(),
                        );
                        // Once per grace period, not once per report.
                        st.ended_at.insert(id.to_owned(), (now, false));
                        penalized = true;
                    }
                }
                _ => {}
            }
            if alive {
                running.push(s.shard);
            }
        }
        let bad_sig = report.rejections.bad_signature;
        if bad_sig > st.rejections_seen {
            st.reputation.apply(
                rcfg,
                now,
                rcfg.tampered_instruction,
                ComplianceKind::TamperedInstruction.as_str(),
            );
            penalized = true;
        }
        st.rejections_seen = bad_sig;
        if !penalized {
            let gain = rcfg.healthy_per_hour * window_ms as f64 / 3_600_000.0;
            st.reputation.apply(rcfg, now, gain, "healthy");
        }
        // Needs ⇒ demanded capabilities (observed now).
        let mut classes = Vec::with_capacity(report.classes.len());
        let mut weighted_loss = 0.0f64;
        let mut weight = 0.0f64;
        for c in &report.classes {
            for rule in &catalog.rules {
                if rule.need.matches(&c.need) && c.rate_bps >= rule_threshold(cfg, rule) {
                    for cap in &rule.capabilities {
                        match st.demand.get_mut(cap) {
                            Some(t) => *t = now,
                            None => {
                                st.demand.insert(cap.clone(), now);
                            }
                        }
                    }
                }
            }
            if c.need != QosNeed::default() {
                let w = c.bytes.max(1) as f64;
                weighted_loss += w * f64::from(c.loss_permille.min(1000));
                weight += w;
            }
            classes.push(ClassSummary {
                class: c.class,
                rate_bps: c.rate_bps,
                rtt_p95_us: c.rtt_p95_us,
                loss_permille: c.loss_permille,
                need: c.need,
            });
        }
        if cfg.features.prediction {
            let fcfg = &cfg.forecast;
            let slot = now / fcfg.slot_ms.max(1);
            for c in &report.classes {
                let relevant = catalog.rules.iter().any(|r| r.need.matches(&c.need));
                if !relevant {
                    continue;
                }
                match st.forecasts.iter_mut().find(|f| f.class == c.class) {
                    Some(f) => f.need = c.need,
                    None => st
                        .forecasts
                        .push(ClassForecast::new(fcfg, c.class, c.need, slot)),
                }
            }
            for f in &mut st.forecasts {
                let rate = report
                    .classes
                    .iter()
                    .find(|c| c.class == f.class)
                    .map_or(0, |c| c.rate_bps);
                f.add(fcfg, slot, rate as f32 / 1000.0);
            }
        }
        st.last_report = Some(QosSummary {
            at_ms: now,
            seq: report.seq,
            classes,
            qos_score: if weight > 0.0 {
                1000.0 - weighted_loss / weight
            } else {
                1000.0
            },
            running_shards: running,
            shard_cpu_permille: own_cpu,
            shard_rss_kib: own_rss,
        });
        st.last_report_seq = report.seq;
        st.resources = Some(report.resources);
        self.dirty.mark(&device);
        for s in outside {
            out.push(Action::Alert {
                device: device.clone(),
                message: format!("device runs shard {s} outside its profile"),
            });
        }
        self.reconcile(now, &device, out);
    }

    fn on_ack(
        &mut self,
        now: u64,
        device: &DeviceId,
        seq: u64,
        outcome: AckOutcome,
        out: &mut Vec<Action>,
    ) {
        let Some(st) = self.devices.get_mut(device) else {
            return;
        };
        if st.pending_seq.is_some_and(|p| seq < p) {
            return; // an ack for an older instruction
        }
        self.dirty.mark(device);
        match outcome {
            AckOutcome::Applied | AckOutcome::Duplicate => {
                st.pending_since_ms = None;
                st.pending_seq = None;
            }
            AckOutcome::Rejected(reason) => {
                out.push(Action::Alert {
                    device: device.clone(),
                    message: format!("instruction {seq} rejected: {reason:?}"),
                });
                if reason == shardline_shared::msg::RejectReason::BadSignature {
                    self.penalize_compliance(now, device, ComplianceKind::TamperedInstruction);
                }
                self.resync(device);
                self.reconcile(now, device, out);
            }
            AckOutcome::Failed { reason } => {
                out.push(Action::Alert {
                    device: device.clone(),
                    message: format!("instruction {seq} failed on the device: {reason}"),
                });
                self.resync(device);
                self.reconcile(now, device, out);
            }
        }
    }

    /// Forget what was not confirmed: leases whose shard the last report does
    /// not show running are dropped, so the next plan sends them again.
    fn resync(&mut self, device: &DeviceId) {
        if let Some(st) = self.devices.get_mut(device) {
            let running: BTreeSet<&ShardRef> = st
                .last_report
                .as_ref()
                .map(|r| r.running_shards.iter().collect())
                .unwrap_or_default();
            st.leases.retain(|_, l| running.contains(&l.shard));
            st.pending_since_ms = None;
            st.pending_seq = None;
        }
    }

    fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.config.features.shifting {
            self.renew_shifts(now);
        }
        let ids: Vec<DeviceId> = self.devices.keys().cloned().collect();
        for id in &ids {
            self.tick_device(now, id, out);
        }
        if self.config.features.shifting {
            self.rebalance(now, out);
        }
    }

    fn tick_device(&mut self, now: u64, id: &DeviceId, out: &mut Vec<Action>) {
        let Engine {
            config: cfg,
            devices,
            ..
        } = self;
        let Some(st) = devices.get_mut(id) else {
            return;
        };
        if st.wake_at_ms > now {
            return; // nothing due: most devices, most ticks
        }
        let rcfg = &cfg.reputation;
        st.reputation.decay_to(rcfg, now);
        // Expired leases free their units now (the agent stops them itself).
        let expired: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(l) = st.leases.remove(&k) {
                if l.clean {
                    st.reputation
                        .apply(rcfg, now, rcfg.clean_lease, "clean_lease");
                }
                st.ended_at.insert(k, (now, false));
            }
        }
        st.avoid_until.retain(|_, &mut t| t > now);
        st.demand
            .retain(|_, &mut t| now.saturating_sub(t) < cfg.hysteresis_ms);
        st.predicted.retain(|_, &mut t| t > now);
        let keep_ended = cfg.flap_window_ms.max(cfg.outside_profile_grace_ms);
        st.ended_at
            .retain(|_, &mut (t, _)| now.saturating_sub(t) < keep_ended);
        let timed_out = st
            .pending_since_ms
            .is_some_and(|t| now.saturating_sub(t) >= cfg.ack_timeout_ms);
        // Loans that ran out.
        let ended: Vec<Transfer> = st
            .borrowed
            .iter()
            .chain(st.lent.iter())
            .filter(|t| t.expires_at_ms <= now)
            .cloned()
            .collect();
        self.dirty.mark(id);
        for t in &ended {
            self.remove_loan(t);
        }
        if timed_out {
            self.resync(id);
        }
        self.reconcile(now, id, out);
    }

    // ------------------------------------------------------------ reconcile

    /// Re-plans a device and emits the minimal diff; loans recalled from or
    /// granted to it re-plan the counterpart too.
    fn reconcile(&mut self, now: u64, device: &DeviceId, out: &mut Vec<Action>) {
        let mut work = vec![device.clone()];
        let mut rounds = 0;
        while let Some(d) = work.pop() {
            rounds += 1;
            if rounds > 256 {
                break; // loans form no cycles, but never loop on a bug
            }
            self.reconcile_one(now, &d, &mut work, out);
        }
    }

    fn reconcile_one(
        &mut self,
        now: u64,
        device: &DeviceId,
        work: &mut Vec<DeviceId>,
        out: &mut Vec<Action>,
    ) {
        // The catalog and tiers are shared (`Arc`) so a plan can borrow them
        // while device states change.
        let catalog = Arc::clone(&self.catalog);
        let agreements = Arc::clone(&self.agreements);
        let Some(st) = self.devices.get_mut(device) else {
            return;
        };
        st.reputation.decay_to(&self.config.reputation, now);
        if self.config.features.prediction {
            predict(&catalog, &self.config, st, now);
        }
        let Some(tier) = agreements.tiers.get(&st.tier) else {
            return;
        };
        // A borrower that is no longer trusted returns what it borrowed.
        if st.reputation.score < self.config.borrow_min_reputation {
            let back: Vec<Transfer> = st
                .borrowed
                .iter()
                .filter(|t| t.origin == TransferOrigin::Borrow)
                .cloned()
                .collect();
            for t in &back {
                self.remove_loan(t);
            }
        }
        let Some(st) = self.devices.get_mut(device) else {
            return;
        };
        // A lender whose quota shrank below what it lent takes units back.
        if !st.lent.is_empty() {
            let quota = quota_budget(&self.config, tier, st);
            let lent = sum_units(&st.lent);
            let mut recall: Vec<Transfer> = Vec::new();
            for k in 0..2 {
                let mut excess = lent[k].saturating_sub(quota[k]);
                for t in st.lent.iter().rev().filter(|t| kind_index(t.kind) == k) {
                    if excess == 0 {
                        break;
                    }
                    excess = excess.saturating_sub(t.units);
                    recall.push(t.clone());
                }
            }
            for t in &recall {
                self.remove_loan(t);
                work.push(t.to.clone());
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let st = &self.devices[device];
            let mut plan = plan_for(&catalog, tier, &self.config, now, st);
            let wants_more = plan.refusals.iter().find_map(|(c, r)| match r {
                Refusal::Budget {
                    kind,
                    missing_units,
                } => Some((c.clone(), *kind, *missing_units)),
                _ => None,
            });
            if let (Some((cap, kind, missing)), true) = (wants_more, attempts <= 3) {
                // First take back what this device lent: lenders never
                // drop below their own current need.
                let k = kind_index(kind);
                let mut recall: Vec<Transfer> = Vec::new();
                let mut need = missing;
                for t in st.lent.iter().rev().filter(|t| kind_index(t.kind) == k) {
                    if need == 0 {
                        break;
                    }
                    need = need.saturating_sub(t.units);
                    recall.push(t.clone());
                }
                if !recall.is_empty() {
                    for t in &recall {
                        self.remove_loan(t);
                        work.push(t.to.clone());
                    }
                    continue;
                }
                match self.try_borrow(now, device, kind, missing) {
                    Ok(()) => continue,
                    Err(reason) => {
                        plan.refusals.insert(
                            cap,
                            Refusal::BorrowRefused {
                                reason,
                                kind,
                                missing_units: missing,
                            },
                        );
                    }
                }
            }
            self.apply_plan(now, device, tier, plan, out);
            return;
        }
    }

    /// Borrows `missing` units of `kind` from peers of the device's tenant.
    fn try_borrow(
        &mut self,
        now: u64,
        device: &DeviceId,
        kind: ShardKind,
        missing: u32,
    ) -> Result<(), BorrowRefusal> {
        let cfg = &self.config;
        let st = &self.devices[device];
        if !cfg.features.borrowing {
            return Err(BorrowRefusal::Disabled);
        }
        let Some(tier) = self.agreements.tiers.get(&st.tier) else {
            return Err(BorrowRefusal::TierForbids);
        };
        if !tier.borrowing {
            return Err(BorrowRefusal::TierForbids);
        }
        let Some(tenant) = st.tenant.as_ref() else {
            return Err(BorrowRefusal::NoTenant);
        };
        if st.reputation.score < cfg.borrow_min_reputation {
            return Err(BorrowRefusal::LowReputation);
        }
        let already: u32 = st
            .borrowed
            .iter()
            .filter(|t| t.origin == TransferOrigin::Borrow)
            .map(|t| t.units)
            .sum();
        if already.saturating_add(missing) > cfg.max_borrow_units {
            return Err(BorrowRefusal::AtLimit);
        }
        let k = kind_index(kind);
        let mut lenders: Vec<(u32, &DeviceId)> = Vec::new();
        if let Some(pool) = self.pools.get(tenant) {
            for peer in pool {
                if peer == device {
                    continue;
                }
                let Some(pst) = self.devices.get(peer) else {
                    continue;
                };
                let Some(ptier) = self.agreements.tiers.get(&pst.tier) else {
                    continue;
                };
                // A device that borrows itself has nothing to lend, and a
                // suspect one's units are not a pool anyone can rely on: its
                // quota may be cut, recalling the loan, at any report.
                if !pst.borrowed.is_empty()
                    || quota_factor(&cfg.reputation, pst.reputation.score) < 1.0
                {
                    continue;
                }
                let s = spare(cfg, ptier, pst)[k];
                if s > 0 {
                    lenders.push((s, peer));
                }
            }
        }
        lenders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let total: u32 = lenders.iter().map(|l| l.0).sum();
        if total < missing {
            return Err(BorrowRefusal::NoLender);
        }
        let mut left = missing;
        let mut loans = Vec::new();
        for (s, peer) in lenders {
            if left == 0 {
                break;
            }
            let units = s.min(left);
            left -= units;
            loans.push(Transfer {
                from: peer.clone(),
                to: device.clone(),
                kind,
                units,
                since_ms: now,
                expires_at_ms: now.saturating_add(cfg.borrow_ms),
                origin: TransferOrigin::Borrow,
            });
        }
        for t in loans {
            self.add_loan(t);
        }
        Ok(())
    }

    fn add_loan(&mut self, t: Transfer) {
        if let Some(l) = self.devices.get_mut(&t.from) {
            l.lent.push(t.clone());
            self.dirty.mark(&t.from);
        }
        if let Some(b) = self.devices.get_mut(&t.to) {
            self.dirty.mark(&t.to);
            b.borrowed.push(t);
        }
    }

    /// Turns a plan into leases and the minimal instruction.
    fn apply_plan(
        &mut self,
        now: u64,
        device: &DeviceId,
        tier: &Tier,
        plan: Plan<'_>,
        out: &mut Vec<Action>,
    ) {
        let Engine {
            config: cfg,
            devices,
            dirty,
            ..
        } = self;
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        let Plan {
            shards: chosen,
            used,
            refusals,
        } = plan;
        let rcfg = &cfg.reputation;
        let lease_ms = lease_len(cfg, tier, st.reputation.score, device, now);
        let renew_before = (lease_ms / 3).max(cfg.renew_margin_ms);
        let mut deacts: Vec<ShardRef> = Vec::new();
        let mut acts: Vec<Activation> = Vec::new();
        let mut changed = st.refusals != refusals;
        // Releases: leases no longer in the plan.
        let gone: Vec<String> = st
            .leases
            .keys()
            .filter(|k| !chosen.contains_key(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            if let Some(l) = st.leases.remove(&k) {
                if l.clean {
                    st.reputation
                        .apply(rcfg, now, rcfg.clean_lease, "clean_lease");
                }
                st.ended_at.insert(k, (now, true));
                deacts.push(l.shard);
            }
        }
        for (&id, ch) in &chosen {
            let spec = ch.spec;
            let priority = &ch.priority;
            let limits = limits_of(spec, *priority);
            let activation = |expires: u64| Activation {
                shard: spec.shard.clone(),
                capability: ch.capability.to_owned(),
                kind: spec.kind,
                sha256: spec.sha256,
                config: spec.config.clone(),
                limits,
                priority: *priority,
                lease_expires_at_ms: expires,
            };
            match st.leases.get_mut(id) {
                None => {
                    if st.ended_at.get(id).is_some_and(|&(t, explicit)| {
                        explicit && now.saturating_sub(t) < cfg.flap_window_ms
                    }) {
                        st.flaps += 1;
                    }
                    let expires = now.saturating_add(lease_ms);
                    st.leases.insert(
                        id.to_owned(),
                        Lease {
                            shard: spec.shard.clone(),
                            capability: ch.capability.to_owned(),
                            kind: spec.kind,
                            units: spec.units,
                            priority: *priority,
                            limits,
                            granted_at_ms: now,
                            expires_at_ms: expires,
                            clean: true,
                            restarts_seen: 0,
                            errors_seen: 0,
                        },
                    );
                    acts.push(activation(expires));
                }
                Some(l) => {
                    let renew = l.expires_at_ms.saturating_sub(now) <= renew_before;
                    if renew
                        || l.limits != limits
                        || l.priority != *priority
                        || l.shard != spec.shard
                    {
                        if renew {
                            l.expires_at_ms = now.saturating_add(lease_ms);
                        }
                        l.limits = limits;
                        l.priority = *priority;
                        l.shard = spec.shard.clone();
                        acts.push(activation(l.expires_at_ms));
                    }
                }
            }
        }
        // Shards the device runs that it must not (no lease, grace over).
        if st.pending_since_ms.is_none() {
            if let Some(r) = &st.last_report {
                for s in &r.running_shards {
                    let ours = st.leases.get(s.id()).is_some_and(|l| &l.shard == s);
                    if !ours && !deacts.contains(s) {
                        let in_grace = st.ended_at.get(s.id()).is_some_and(|&(t, _)| {
                            now.saturating_sub(t) < cfg.outside_profile_grace_ms
                        });
                        if !in_grace {
                            deacts.push(s.clone());
                        }
                    }
                }
            }
        }
        // Need = what the plan grants plus what it could not fit for lack of
        // units: a device short of units is not a lender.
        let mut need = used;
        for r in refusals.values() {
            if let Refusal::Budget {
                kind,
                missing_units,
            }
            | Refusal::BorrowRefused {
                kind,
                missing_units,
                ..
            } = r
            {
                need[kind_index(*kind)] = need[kind_index(*kind)].saturating_add(*missing_units);
            }
        }
        st.need_units = need;
        st.refusals = refusals;
        st.wake_at_ms = next_wake(cfg, st, now, renew_before);
        if !deacts.is_empty() || !acts.is_empty() {
            changed = true;
            deacts.sort();
            let mut ops: Vec<Operation> = deacts
                .into_iter()
                .map(|shard| Operation::Deactivate { shard })
                .collect();
            ops.extend(acts.into_iter().map(Operation::Activate));
            st.pending_since_ms = Some(now);
            st.pending_seq = None;
            out.push(Action::Instruct {
                device: device.clone(),
                ops,
                expires_at_ms: now.saturating_add(cfg.instruction_ttl_ms),
            });
        }
        if let Some((old, new, reason)) = st.reputation.announce(rcfg, now) {
            changed = true;
            out.push(Action::ReputationChanged {
                device: device.clone(),
                old,
                new,
                reason,
            });
        }
        if changed {
            dirty.mark(device);
        }
    }

    // ------------------------------------------------------------ shifting

    /// The rebalancer: moves units toward the devices with the highest
    /// potential (reputation × demand × gain ÷ cost), at most
    /// `shift_limit_per_tick` units per run, then leaves both sides alone for
    /// the stabilization period and rolls back shifts that made QoS worse.
    fn rebalance(&mut self, now: u64, out: &mut Vec<Action>) {
        self.evaluate_shifts(now, out);
        let cfg = &self.config;
        if self
            .last_shift_ms
            .is_some_and(|t| now.saturating_sub(t) < cfg.shift_interval_ms)
        {
            return;
        }
        self.last_shift_ms = Some(now);
        // (potential, device, kind, missing)
        let mut cands: Vec<(f64, DeviceId, ShardKind, u32)> = Vec::new();
        for (id, st) in &self.devices {
            if st.stabilize_until_ms > now
                || st.tenant.is_none()
                || st.reputation.score < cfg.shift_min_reputation
            {
                continue;
            }
            for (cap, r) in &st.refusals {
                let (kind, missing) = match r {
                    Refusal::Budget {
                        kind,
                        missing_units,
                    }
                    | Refusal::BorrowRefused {
                        kind,
                        missing_units,
                        ..
                    } => (*kind, *missing_units),
                    _ => continue,
                };
                if missing == 0 {
                    continue;
                }
                let demand_kbps = cap_demand_kbps(&self.catalog, cfg, st, cap, now);
                let gain = self
                    .catalog
                    .capabilities
                    .get(cap)
                    .map_or(0.0, |c| f64::from(c.priority) / 100.0);
                let potential =
                    st.reputation.score / 100.0 * demand_kbps * gain / f64::from(missing);
                if potential > 0.0 {
                    cands.push((potential, id.clone(), kind, missing));
                }
                break; // the highest-priority unmet capability only
            }
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut left = cfg.shift_limit_per_tick;
        let mut touched = Vec::new();
        for (_, id, kind, missing) in cands {
            if left < missing {
                continue;
            }
            let st = &self.devices[&id];
            let Some(tenant) = st.tenant.clone() else {
                continue;
            };
            let qos_before = st.last_report.as_ref().map_or(1000.0, |r| r.qos_score);
            let k = kind_index(kind);
            let mut donors: Vec<(u32, DeviceId)> = Vec::new();
            for peer in self.pools.get(&tenant).into_iter().flatten() {
                if peer == &id {
                    continue;
                }
                let pst = &self.devices[peer];
                if pst.stabilize_until_ms > now
                    || !pst.borrowed.is_empty()
                    || quota_factor(&self.config.reputation, pst.reputation.score) < 1.0
                {
                    continue;
                }
                let Some(ptier) = self.agreements.tiers.get(&pst.tier) else {
                    continue;
                };
                let s = spare(&self.config, ptier, pst)[k];
                if s > 0 {
                    donors.push((s, peer.clone()));
                }
            }
            donors.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            if donors.iter().map(|d| d.0).sum::<u32>() < missing {
                continue;
            }
            let mut need = missing;
            let until = now.saturating_add(self.config.stabilization_ms);
            for (s, donor) in donors {
                if need == 0 {
                    break;
                }
                let units = s.min(need);
                need -= units;
                self.add_loan(Transfer {
                    from: donor.clone(),
                    to: id.clone(),
                    kind,
                    units,
                    since_ms: now,
                    expires_at_ms: now.saturating_add(self.config.shift_ms),
                    origin: TransferOrigin::Shift {
                        qos_before: qos_before.clamp(0.0, 1000.0) as u32,
                        evaluated: false,
                    },
                });
                if let Some(d) = self.devices.get_mut(&donor) {
                    d.stabilize_until_ms = until;
                }
            }
            if let Some(r) = self.devices.get_mut(&id) {
                r.stabilize_until_ms = until;
            }
            left -= missing;
            touched.push(id);
        }
        for id in touched {
            self.reconcile(now, &id, out);
        }
    }

    /// A shift that runs out while the recipient still uses the units and the
    /// donor still does not need them is extended rather than returned: the
    /// rebalancer would move them straight back, and the shards would flap.
    fn renew_shifts(&mut self, now: u64) {
        let mut renew: Vec<Transfer> = Vec::new();
        for st in self.devices.values() {
            for t in &st.borrowed {
                if !matches!(t.origin, TransferOrigin::Shift { .. }) || t.expires_at_ms > now {
                    continue;
                }
                let k = kind_index(t.kind);
                let (Some(tier_to), Some(donor)) = (
                    self.agreements.tiers.get(&st.tier),
                    self.devices.get(&t.from),
                ) else {
                    continue;
                };
                let Some(tier_from) = self.agreements.tiers.get(&donor.tier) else {
                    continue;
                };
                let still_used = st.need_units[k] > quota_budget(&self.config, tier_to, st)[k];
                let q = quota_budget(&self.config, tier_from, donor)[k];
                let donor_ok = q >= sum_units(&donor.lent)[k].saturating_add(donor.need_units[k]);
                if still_used && donor_ok && st.reputation.score >= self.config.shift_min_reputation
                {
                    renew.push(t.clone());
                }
            }
        }
        for t in renew {
            self.remove_loan(&t);
            self.add_loan(Transfer {
                expires_at_ms: now.saturating_add(self.config.shift_ms),
                ..t
            });
        }
    }

    /// After the stabilization period, compares the recipient's QoS with the
    /// score before the shift and rolls the shift back if it got worse.
    fn evaluate_shifts(&mut self, now: u64, out: &mut Vec<Action>) {
        let mut rollback: Vec<Transfer> = Vec::new();
        let stab = self.config.stabilization_ms;
        let margin = self.config.rollback_margin;
        for st in self.devices.values_mut() {
            let score = st.last_report.as_ref().map(|r| r.qos_score);
            for t in &mut st.borrowed {
                if let TransferOrigin::Shift {
                    qos_before,
                    evaluated,
                } = &mut t.origin
                {
                    if *evaluated || now < t.since_ms.saturating_add(stab) {
                        continue;
                    }
                    *evaluated = true;
                    if score.is_some_and(|s| s < f64::from(*qos_before) - margin) {
                        rollback.push(t.clone());
                    }
                }
            }
        }
        for t in rollback {
            self.remove_loan(&t);
            // Both sides get a fresh stabilization period: the rebalancer
            // must not shift the same units straight back.
            let until = now.saturating_add(self.config.stabilization_ms);
            if let Some(st) = self.devices.get_mut(&t.to) {
                st.rollbacks += 1;
                st.stabilize_until_ms = until;
            }
            if let Some(st) = self.devices.get_mut(&t.from) {
                st.stabilize_until_ms = until;
            }
            out.push(Action::Alert {
                device: t.to.clone(),
                message: format!(
                    "shift of {} {:?} unit(s) from {} rolled back: QoS got worse",
                    t.units, t.kind, t.from
                ),
            });
            self.reconcile(now, &t.to, out);
            self.reconcile(now, &t.from, out);
        }
    }
}

fn plan_for<'c>(
    catalog: &'c Catalog,
    tier: &Tier,
    cfg: &PolicyConfig,
    now: u64,
    st: &DeviceState,
) -> Plan<'c> {
    let demanded = demanded(catalog, tier, cfg, st, now);
    let capacity = st.resources.as_ref().map(|r| {
        let (cpu, rss) = st
            .last_report
            .as_ref()
            .map_or((0, 0), |l| (l.shard_cpu_permille, l.shard_rss_kib));
        Capacity::from_report(r, cpu, rss, cfg.capacity_headroom)
    });
    plan::plan(&PlanInput {
        catalog,
        tier,
        state: st,
        now_ms: now,
        budget: effective_budget(cfg, tier, st),
        capacity,
        demanded: &demanded,
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
    if cfg.features.prediction && !st.forecasts.is_empty() {
        let slot = cfg.forecast.slot_ms.max(1);
        at((now / slot + 1) * slot);
    }
    if quota_factor(&cfg.reputation, st.reputation.score) < 1.0 || !st.refusals.is_empty() {
        // Recovering reputation or unmet demand: look again soon.
        at(now.saturating_add(cfg.renew_margin_ms.max(60_000)));
    }
    wake
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

/// Pre-activation: when the upper bound of a class forecast crosses a rule's
/// threshold within the horizon, the rule's capabilities are held as
/// predicted until the end of the next slot.
fn predict(catalog: &Catalog, cfg: &PolicyConfig, st: &mut DeviceState, now: u64) {
    let slot_ms = cfg.forecast.slot_ms.max(1);
    let slot_now = now / slot_ms;
    let horizon = cfg
        .prediction_horizon_ms
        .div_ceil(slot_ms)
        .min(u64::from(cfg.forecast.season_slots));
    for f in &st.forecasts {
        if !f.model.warmed_up() {
            continue;
        }
        let mut upper = f32::MIN;
        for h in 0..=horizon {
            let slot = slot_now + h;
            if slot <= f.model.last_slot {
                continue;
            }
            upper = upper.max(f.model.forecast(&cfg.forecast, slot).upper);
        }
        let upper_bps = f64::from(upper) * 1000.0;
        for rule in &catalog.rules {
            let threshold = rule_threshold(cfg, rule).max(cfg.prediction_min_rate_bps);
            if rule.need.matches(&f.need) && upper_bps >= threshold as f64 {
                for cap in &rule.capabilities {
                    let until = (slot_now + 2) * slot_ms;
                    let e = st.predicted.entry(cap.clone()).or_insert(until);
                    *e = (*e).max(until);
                }
            }
        }
    }
}
