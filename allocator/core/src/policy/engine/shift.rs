//! The periodic rebalancer: shifting units toward the highest potential, with a per-tick limit, stabilization and rollback.

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

    /// After the stabilization period, compares the recipient's QoS with the
    /// score before the shift and rolls the shift back if it got worse.
    pub(super) fn evaluate_shifts(&mut self, now: u64, out: &mut Vec<Action>) {
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
