//! What a device says: QoS reports (needs, resource use, shard failures, reputation signals) and instruction acks.
//!
//! Failures are classified first (`faults::classify`): start failures are
//! operator faults — the shard is avoided on the device with a backoff and
//! counted toward marking its catalog entry failing, reputation untouched;
//! only runtime failures of a shard that ran fine, of an entry not failing
//! on the device's architecture, cost reputation.

use super::*;
use shardline_shared::msg::RejectReason;

/// One start failure of shard `id` on a device: avoided there with a
/// doubling backoff, counted toward the entry's failing mark (and the
/// operator told when this one marks it).
#[allow(clippy::too_many_arguments)]
fn note_start_failure(
    cfg: &PolicyConfig,
    catalog: &Catalog,
    health: &mut CatalogHealth,
    rollouts: &super::super::rollout::Rollouts,
    st: &mut DeviceState,
    device: &DeviceId,
    arch: &str,
    id: &str,
    reason: &str,
    now: u64,
    out: &mut Vec<Action>,
) {
    let f = st
        .start_failures
        .entry(id.to_owned())
        .or_insert(StartFailure {
            reason: String::new(),
            count: 0,
            last_ms: 0,
            until_ms: 0,
        });
    f.count = f.count.saturating_add(1);
    reason.clone_into(&mut f.reason);
    f.last_ms = now;
    f.until_ms = now.saturating_add(StartFailure::backoff(&cfg.faults, f.count));
    let until = f.until_ms;
    let avoid = st.avoid_until.entry(id.to_owned()).or_insert(until);
    *avoid = (*avoid).max(until);
    tracing::info!(%device, shard = id, arch, reason, until_ms = until, "shard failed to start: avoided on the device, not charged");
    let Some(spec) = catalog.shards.get(id) else {
        return;
    };
    // A canary failing the new entry of a rollout: the rollout judges it
    // (and rolls it back); the entry the rest of the fleet runs is fine.
    if st
        .leases
        .get(id)
        .is_some_and(|l| rollouts.is_canary_of_next(device, &l.shard))
    {
        return;
    }
    if let Some(mark) = health.record_start_failure(&cfg.faults, spec, arch, device, reason, now) {
        out.push(Action::CatalogEntryFailing {
            shard: mark.shard,
            arch: mark.arch,
            reason: mark.reason,
            devices: mark.devices.len() as u32,
        });
    }
}

/// The first capability (by name) whose classes' traffic in this report
/// exceeds `network_over_factor` × the bandwidth its leased shards declare
/// (capabilities with no declared bandwidth are not judged).
fn network_over(
    catalog: &Catalog,
    cfg: &PolicyConfig,
    st: &DeviceState,
    report: &QosReport,
) -> Option<String> {
    let mut declared: BTreeMap<&str, u64> = BTreeMap::new();
    for l in st.leases.values() {
        let bw = catalog
            .shards
            .get(l.shard.id())
            .map_or(0, |s| s.cost.bandwidth_kbps);
        *declared.entry(l.capability.as_str()).or_default() += bw;
    }
    for (cap, bw_kbps) in declared {
        if bw_kbps == 0 {
            continue;
        }
        let traffic_bps: u64 = report
            .classes
            .iter()
            .filter(|c| {
                catalog
                    .rules
                    .iter()
                    .any(|r| r.need.matches(&c.need) && r.capabilities.iter().any(|x| x == cap))
            })
            .map(|c| c.rate_bps)
            .fold(0u64, u64::saturating_add);
        let limit = bw_kbps as f64 * 1000.0 * cfg.reputation.network_over_factor.max(1.0);
        if traffic_bps as f64 > limit {
            return Some(cap.to_owned());
        }
    }
    None
}

impl Engine {
    pub(super) fn on_report(&mut self, now: u64, report: QosReport, out: &mut Vec<Action>) {
        let device = report.device.clone();
        let Engine {
            catalog,
            config: cfg,
            devices,
            health,
            health_dirty,
            rollouts,
            ..
        } = self;
        let rollouts = &*rollouts;
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
        st.clone_watch.accepted(&report, now);
        // Device-supplied: bounded before it becomes a map key and a label.
        let arch = faults::clip(&report.resources.arch)
            .chars()
            .take(32)
            .collect::<String>();
        // Start failures seen in this report: (shard id, reason).
        let mut start_failed: Vec<(String, String)> = Vec::new();
        // For staged rollouts: (shard, why it failed or `None` = runs fine).
        let mut rollout_notes: Vec<(ShardRef, Option<String>)> = Vec::new();
        let mut unhealthy = false;
        let window_ms = u64::from(report.window_ms).clamp(1, 3_600_000);
        let mut penalized = false;
        let mut outside: Vec<String> = Vec::new();
        let (mut own_cpu, mut own_rss) = (0u64, 0u64);
        let mut running = Vec::new();
        let mut report = report;
        // Seed 002's part of the report, handled once the QoS summary is stored.
        let lending_report = std::mem::take(&mut report.lending);
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
        let mut host_use: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for s in std::mem::take(&mut report.shards) {
            let id = s.shard.id();
            let alive = matches!(
                s.state,
                ShardState::Running | ShardState::Starting | ShardState::Backoff
            );
            if alive {
                // Every shard of a host reports the host's use: counted
                // once per host (capability), or our own load would be
                // counted several times and the other load look smaller.
                let e = host_use.entry(s.capability.clone()).or_default();
                e.0 = e.0.max(u64::from(s.cpu_permille));
                e.1 = e.1.max(s.rss_kib);
            }
            match st.leases.get_mut(id) {
                Some(lease) if lease.shard == s.shard => {
                    let new_restarts = s.restarts.saturating_sub(lease.restarts_seen);
                    if s.restarts < lease.restarts_seen {
                        lease.restarts_seen = s.restarts; // the agent restarted
                    }
                    let load_or_init = matches!(
                        s.last_failure,
                        Some(ShardFailure::LoadRefused { .. } | ShardFailure::InitFailed { .. })
                    );
                    if new_restarts > 0 {
                        rollout_notes.push((
                            s.shard.clone(),
                            Some(faults::failure_text(s.last_failure.as_ref())),
                        ));
                        lease.clean = false;
                        lease.restarts_seen = s.restarts;
                        // Operator faults (config, limits, digest) show as
                        // start failures: never the device's doing.
                        // `healthy_reports` is not reset: once a lease ran
                        // fine here, a crash loop is the device's runtime
                        // failure, not the entry's start failure.
                        let class =
                            faults::classify(&cfg.faults, s.last_failure.as_ref(), lease, now);
                        let entry_failing = health.failing_on(id, &arch).is_some();
                        match class {
                            faults::FailureClass::Start => {
                                unhealthy = true;
                                start_failed.push((
                                    id.to_owned(),
                                    faults::failure_text(s.last_failure.as_ref()),
                                ));
                            }
                            // The entry fails fleet-wide on this architecture:
                            // its fault, not this device's.
                            faults::FailureClass::Runtime if entry_failing => unhealthy = true,
                            faults::FailureClass::Runtime => {
                                let (delta, why) = match s.last_failure {
                                    Some(ShardFailure::OverLimit) => {
                                        (rcfg.over_limit, "over_limit_kill")
                                    }
                                    _ => (rcfg.crash, "shard_crash"),
                                };
                                st.reputation.apply(
                                    rcfg,
                                    now,
                                    delta * f64::from(new_restarts.min(3)),
                                    why,
                                );
                                penalized = true;
                            }
                        }
                    } else if load_or_init
                        && s.state != ShardState::Running
                        && st
                            .start_failures
                            .get(id)
                            .is_none_or(|f| f.last_ms < lease.granted_at_ms)
                    {
                        // Refused at load or init without a restart count:
                        // once per grant.
                        rollout_notes.push((
                            s.shard.clone(),
                            Some(faults::failure_text(s.last_failure.as_ref())),
                        ));
                        lease.clean = false;
                        unhealthy = true;
                        start_failed
                            .push((id.to_owned(), faults::failure_text(s.last_failure.as_ref())));
                    } else if s.state == ShardState::Running {
                        rollout_notes.push((s.shard.clone(), None));
                        lease.healthy_reports = lease.healthy_reports.saturating_add(1);
                        let min = cfg.faults.min_healthy_reports.max(1);
                        if lease.healthy_reports >= min {
                            // It runs fine here now: the backoff starts over.
                            st.start_failures.remove(id);
                            // Refreshed now and then, not every report: it
                            // only has to stay within the failing window.
                            if (lease.healthy_reports - min) % 16 == 0 {
                                health.record_running_fine(id, &arch, &device, now);
                            }
                        }
                    }
                    // Errors and excess use that come with a start failure
                    // of this lease (an operator fault: config, limits below
                    // the host's need) belong to it: the lease is unclean,
                    // nothing is charged. A shard that errs while it starts
                    // without failing is still the device's.
                    let still_starting = start_failed.iter().any(|(f, _)| f == id)
                        || st
                            .start_failures
                            .get(id)
                            .is_some_and(|f| f.last_ms >= lease.granted_at_ms)
                        || health.failing_on(id, &arch).is_some();
                    let new_errors = s.errors.saturating_sub(lease.errors_seen);
                    lease.errors_seen = s.errors;
                    let per_min = f64::from(new_errors) * 60_000.0 / window_ms as f64;
                    if per_min > rcfg.error_rate_per_min {
                        lease.clean = false;
                        if !still_starting {
                            st.reputation.apply(rcfg, now, rcfg.errors, "error_rate");
                            penalized = true;
                        }
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
                        if !still_starting && over_limit_hosts.insert(lease.capability.clone()) {
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
        for (cpu, rss) in host_use.values() {
            own_cpu = own_cpu.saturating_add(*cpu);
            own_rss = own_rss.saturating_add(*rss);
        }
        // Instructions that failed the device's signature check were forged
        // or corrupted by someone else (anyone can publish on its topic):
        // the device did right to refuse them, so its reputation does not
        // move. The rise is an alert for the operator.
        let bad_sig = report.rejections.bad_signature;
        let forged_seen = bad_sig.saturating_sub(st.rejections_seen);
        st.rejections_seen = bad_sig;
        if forged_seen > 0 {
            out.push(Action::Alert {
                device: report.device.clone(),
                message: format!(
                    "{forged_seen} instruction(s) on the device's topic failed its signature \
                     check: forged or corrupted by another publisher (not charged to the device)"
                ),
            });
        }
        for (id, reason) in start_failed {
            note_start_failure(
                cfg, catalog, health, rollouts, st, &device, &arch, &id, &reason, now, out,
            );
            *health_dirty = true;
        }
        // Network I/O: a capability whose traffic is far above the
        // bandwidth its running shards declare was let through unshaped.
        // Once per report, like over-limit CPU.
        if let Some(cap) = network_over(catalog, cfg, st, &report) {
            st.reputation
                .apply(rcfg, now, rcfg.network_over_limit, "network_over_limit");
            st.feedback.decide(
                now,
                feedback::DecisionKind::Throttle,
                &cap,
                format!(
                    "{cap}: traffic above {}× the bandwidth its shards declare; reputation {:+}",
                    rcfg.network_over_factor, rcfg.network_over_limit
                ),
            );
            penalized = true;
        }
        // A duplicate identity earns nothing while flagged (see `faults`):
        // two streams must not farm reputation under the exemption.
        if !penalized && !unhealthy && !st.clone_watch.flagged(now) {
            let gain = rcfg.healthy_per_hour * window_ms as f64 / 3_600_000.0;
            st.reputation.apply(rcfg, now, gain, "healthy");
        }
        // Needs ⇒ demanded capabilities (observed now).
        let mut classes = Vec::with_capacity(report.classes.len());
        let mut weighted_loss = 0.0f64;
        let mut weighted_rtt = 0.0f64;
        let mut weighted_jitter = 0.0f64;
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
                weighted_rtt += w * f64::from(c.rtt_p95_us.unwrap_or(0).min(60_000_000)) / 1000.0;
                weighted_jitter += w * f64::from(c.jitter_us.unwrap_or(0).min(60_000_000)) / 1000.0;
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
            let pcfg = &cfg.prediction;
            let slot = now / fcfg.slot_ms.max(1);
            let since_last = st
                .last_report
                .as_ref()
                .map_or(0, |r| now.saturating_sub(r.at_ms));
            st.feedback.report_interval_ms = since_last.max(window_ms).min(3_600_000);
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
            for f in &st.forecasts {
                // A class at a rule's threshold: the pre-activation that
                // held its capabilities (if any) was right.
                let rate = report
                    .classes
                    .iter()
                    .find(|c| c.class == f.class)
                    .map_or(0, |c| c.rate_bps);
                let on = catalog.rules.iter().any(|r| {
                    r.need.matches(&f.need)
                        && rate >= rule_threshold(cfg, r).max(cfg.prediction_min_rate_bps)
                });
                let learn = st.feedback.class_mut(f.class);
                learn.observe_on(pcfg, slot, fcfg.season_slots, on);
                if on {
                    learn.demand_seen();
                }
            }
            for f in &mut st.forecasts {
                let rate = report
                    .classes
                    .iter()
                    .find(|c| c.class == f.class)
                    .map_or(0, |c| c.rate_bps);
                let learn = st.feedback.class_mut(f.class);
                f.add(fcfg, slot, rate as f32 / 1000.0, learn, pcfg);
            }
        }
        // The QoS of the classes with a need: what shifts are judged by.
        st.feedback.last_qos = (weight > 0.0).then(|| feedback::QosSnapshot {
            loss_permille: weighted_loss / weight,
            rtt_p95_ms: weighted_rtt / weight,
            jitter_ms: weighted_jitter / weight,
        });
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
        for (shard, failure) in rollout_notes {
            match failure {
                Some(why) => self.rollout_failed(&device, &shard, &why),
                None => self.rollout_running(&device, &shard),
            }
        }
        for s in outside {
            out.push(Action::Alert {
                device: device.clone(),
                message: format!("device runs shard {s} outside its profile"),
            });
        }
        self.on_lending_report(now, &device, lending_report, window_ms, out);
        self.reconcile(now, &device, out);
    }

    pub(super) fn on_ack(
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
            AckOutcome::Rejected(RejectReason::LimitsOutOfRange) => {
                // The catalog's limits do not suit the device: an operator
                // fault, attributed to the shards this instruction started.
                self.ack_start_failure(now, device, "LimitsOutOfRange", None, out);
                self.resync(now, device);
                self.reconcile(now, device, out);
            }
            AckOutcome::Failed { reason } => {
                let reason = faults::clip(&reason);
                out.push(Action::Alert {
                    device: device.clone(),
                    message: format!("instruction {seq} failed on the device: {reason}"),
                });
                self.ack_start_failure(now, device, &reason, Some(&reason), out);
                self.resync(now, device);
                self.reconcile(now, device, out);
            }
            AckOutcome::Rejected(reason) => {
                out.push(Action::Alert {
                    device: device.clone(),
                    message: format!("instruction {seq} rejected: {reason:?}"),
                });
                self.resync(now, device);
                self.reconcile(now, device, out);
            }
        }
    }

    /// A failed or `LimitsOutOfRange` ack: a start failure of the shards
    /// the pending instruction activated (of a failed one, those its `text`
    /// names). Never charged to the device.
    fn ack_start_failure(
        &mut self,
        now: u64,
        device: &DeviceId,
        reason: &str,
        text: Option<&str>,
        out: &mut Vec<Action>,
    ) {
        let Engine {
            catalog,
            config: cfg,
            devices,
            health,
            health_dirty,
            rollouts,
            rollouts_dirty,
            ..
        } = self;
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        let Some(since) = st.pending_since_ms else {
            return;
        };
        let started: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| l.granted_at_ms >= since)
            .map(|(k, _)| k.clone())
            .collect();
        let named: Vec<String> = started
            .iter()
            .filter(|k| text.is_some_and(|t| t.contains(k.as_str())))
            .cloned()
            .collect();
        // `LimitsOutOfRange` refuses the whole instruction: every shard it
        // started. A failed one is blamed only on the shards its text
        // names: blaming a whole capability for one member would mark
        // healthy entries failing; the reports' `last_failure` attributes
        // the rest.
        let blamed = match text {
            None => started,
            Some(_) => named,
        };
        let arch = st
            .resources
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |r| faults::clip(&r.arch));
        for id in blamed {
            if let Some(l) = st.leases.get_mut(&id) {
                l.clean = false;
                if rollouts.note_failure(device, &l.shard, reason) {
                    *rollouts_dirty = true;
                }
            }
            note_start_failure(
                cfg, catalog, health, rollouts, st, device, &arch, &id, reason, now, out,
            );
            *health_dirty = true;
        }
    }

    /// Forget what was not confirmed: leases whose shard the last report does
    /// not show running are dropped, so the next plan sends them again.
    pub(super) fn resync(&mut self, now: u64, device: &DeviceId) {
        if let Some(st) = self.devices.get_mut(device) {
            let running: BTreeSet<&ShardRef> = st
                .last_report
                .as_ref()
                .map(|r| r.running_shards.iter().collect())
                .unwrap_or_default();
            let before: BTreeSet<String> =
                st.leases.values().map(|l| l.capability.clone()).collect();
            st.leases.retain(|_, l| running.contains(&l.shard));
            for cap in before {
                if !st.leases.values().any(|l| l.capability == cap) {
                    st.feedback.decide(
                        now,
                        feedback::DecisionKind::Release,
                        &cap,
                        format!(
                            "{cap} forgotten: the device did not confirm it (no acknowledgement, not running in its last report); planned again from scratch"
                        ),
                    );
                }
            }
            st.pending_since_ms = None;
            st.pending_seq = None;
        }
    }
}
