//! The periodic rebalancer (seed 003): shifting units toward the highest
//! potential, with a per-tick limit, stabilization and rollback.
//!
//! Potential = reputation × predicted demand × projected gain ÷ cost:
//! reputation on 0–1; predicted demand the larger of the last report and
//! the next slot's forecast behind the unmet capability (Mbit/s); the
//! projected gain the QoS points the device's earlier shifts brought
//! (`feedback.shift_gain`, the feedback loop), or `shift_gain_prior`
//! before one was judged, weighted by the capability's priority; the cost
//! the units it lacks. A device whose shifts brought nothing gets no
//! potential until four stabilization periods after its last shift; then
//! it is tried at the prior again (only a judged shift teaches, and
//! circumstances change).
//!
//! Every shift is logged (decision, tracing, `feedback.shifts`) with the
//! QoS before; after the stabilization period it is judged against the
//! QoS then — loss, p95 RTT and jitter — and kept or rolled back.

use super::*;

impl Engine {
    /// The rebalancer: moves units toward the devices with the highest
    /// potential (reputation × demand × gain ÷ cost), at most
    /// `shift_limit_per_tick` units per run, then leaves both sides alone for
    /// the stabilization period and rolls back shifts that made QoS worse.
    pub(super) fn rebalance(&mut self, now: u64, out: &mut Vec<Action>) {
        self.evaluate_shifts(now, out);
        let cfg = &self.config;
        if self
            .last_shift_ms
            .is_some_and(|t| now.saturating_sub(t) < cfg.shift_interval_ms)
        {
            return;
        }
        self.last_shift_ms = Some(now);
        // (potential, device, kind, missing, explanation)
        let mut cands: Vec<(f64, DeviceId, ShardKind, u32, String)> = Vec::new();
        for (id, st) in &self.devices {
            if st.stabilize_until_ms > now
                || st.tenant.is_none()
                || st.reputation.score < cfg.shift_min_reputation
            {
                continue;
            }
            for (cap, r) in &st.refusals {
                let Some((kind, missing)) = r.shortfall() else {
                    continue;
                };
                if missing == 0 {
                    continue;
                }
                let demand_kbps = cap_demand_kbps(&self.catalog, cfg, st, cap, now);
                let priority = self
                    .catalog
                    .capabilities
                    .get(cap)
                    .map_or(0.0, |c| f64::from(c.priority) / 100.0);
                let (gain, learned) = projected_gain(cfg, st, now);
                let potential = st.reputation.score / 100.0 * demand_kbps / 1000.0 * gain.max(0.0)
                    / 100.0
                    * priority
                    / f64::from(missing);
                if potential > 0.0 {
                    let why = format!(
                        "potential {potential:.3} = reputation {:.0}/100 × demand {:.2} Mbit/s × gain {gain:.0} QoS points ({}) /100 × priority {priority:.2} ÷ {missing} {kind:?} unit(s)",
                        st.reputation.score,
                        demand_kbps / 1000.0,
                        if learned { "learned from its earlier shifts" } else { "prior" },
                    );
                    cands.push((potential, id.clone(), kind, missing, why));
                }
                break; // the highest-priority unmet capability only
            }
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut left = cfg.shift_limit_per_tick;
        let mut touched = Vec::new();
        for (potential, id, kind, missing, why) in cands {
            if left < missing {
                continue;
            }
            let st = &self.devices[&id];
            let Some(tenant) = st.tenant.clone() else {
                continue;
            };
            let qos_before = st.last_report.as_ref().map_or(1000.0, |r| r.qos_score);
            let snapshot_before = st.feedback.last_qos.unwrap_or_default();
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
                tracing::info!(
                    from = %donor,
                    to = %id,
                    units,
                    kind = ?kind,
                    potential,
                    before = %snapshot_before.describe(),
                    "shift"
                );
                if let Some(r) = self.devices.get_mut(&id) {
                    r.feedback.shift_started(feedback::ShiftRecord {
                        from: donor.clone(),
                        kind,
                        units,
                        at_ms: now,
                        potential,
                        before: snapshot_before,
                        after: None,
                        outcome: None,
                    });
                    r.feedback.decide(
                        now,
                        feedback::DecisionKind::Shift,
                        &format!("from {donor}"),
                        format!(
                            "{units} {kind:?} unit(s) shifted from {donor} for {} min: {why}; QoS before: {}",
                            self.config.shift_ms / 60_000,
                            snapshot_before.describe()
                        ),
                    );
                }
                if let Some(d) = self.devices.get_mut(&donor) {
                    d.feedback.decide(
                        now,
                        feedback::DecisionKind::Shift,
                        &format!("to {id}"),
                        format!(
                            "{units} {kind:?} unit(s) shifted to {id}: unused here (spare), highest potential in the pool"
                        ),
                    );
                }
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
    pub(super) fn renew_shifts(&mut self, now: u64) {
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

    /// After the stabilization period, compares the recipient's QoS (loss,
    /// p95 RTT, jitter) with its QoS before the shift, learns the gain,
    /// and rolls the shift back if it got worse.
    pub(super) fn evaluate_shifts(&mut self, now: u64, out: &mut Vec<Action>) {
        let mut rollback: Vec<(Transfer, String)> = Vec::new();
        let cfg = &self.config;
        let stab = cfg.stabilization_ms;
        for st in self.devices.values_mut() {
            let score = st.last_report.as_ref().map(|r| r.qos_score);
            let mut judged: Vec<(DeviceId, u64, Option<String>)> = Vec::new();
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
                    let record = st
                        .feedback
                        .shifts
                        .iter()
                        .find(|r| r.from == t.from && r.at_ms == t.since_ms);
                    let worse = match (record, st.feedback.last_qos) {
                        (Some(r), Some(after)) => feedback::shift_worse(
                            &r.before,
                            &after,
                            cfg.rollback_margin,
                            (cfg.rollback_latency_ratio, cfg.rollback_latency_min_ms),
                            (cfg.rollback_jitter_ratio, cfg.rollback_jitter_min_ms),
                        ),
                        // A shift from before the records: the score only.
                        _ => score
                            .filter(|s| *s < f64::from(*qos_before) - cfg.rollback_margin)
                            .map(|s| format!("QoS score fell from {qos_before} to {s:.0}")),
                    };
                    if let Some(w) = &worse {
                        rollback.push((t.clone(), w.clone()));
                    }
                    judged.push((t.from.clone(), t.since_ms, worse));
                }
            }
            for (from, at, worse) in judged {
                let outcome = match &worse {
                    Some(w) => format!("rolled back: {w}"),
                    None => "kept".to_owned(),
                };
                if let Some((before, after, gain)) =
                    st.feedback.shift_judged(&from, at, outcome.clone())
                {
                    tracing::info!(%from, before = %before.describe(), after = %after.describe(), gain, %outcome, "shift judged");
                    st.feedback.decide(
                        now,
                        feedback::DecisionKind::Shift,
                        &format!("from {from}"),
                        format!(
                            "shift from {from} judged after {} min: before {}, after {} ({gain:+.0} QoS points): {outcome}",
                            stab / 60_000,
                            before.describe(),
                            after.describe()
                        ),
                    );
                }
            }
        }
        for (t, why) in rollback {
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
                    "shift of {} {:?} unit(s) from {} rolled back: {why}",
                    t.units, t.kind, t.from
                ),
            });
            self.reconcile(now, &t.to, out);
            self.reconcile(now, &t.from, out);
        }
    }
}

/// The QoS points a shift to this device is expected to bring, and whether
/// it was learned from its earlier shifts. A learned gain at or below zero
/// is retried at the prior once four stabilization periods passed since
/// the last shift: circumstances change, and only a judged shift teaches.
fn projected_gain(cfg: &PolicyConfig, st: &DeviceState, now: u64) -> (f64, bool) {
    match st.feedback.shift_gain {
        Some(g) if g > 0.0 => (g, true),
        Some(g) => {
            let last = st.feedback.shifts.last().map_or(0, |r| r.at_ms);
            if now.saturating_sub(last) >= cfg.stabilization_ms.saturating_mul(4) {
                (cfg.shift_gain_prior, false)
            } else {
                (g, true)
            }
        }
        None => (cfg.shift_gain_prior, false),
    }
}
