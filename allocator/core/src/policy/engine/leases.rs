//! Ticks: lease renewal and expiry, hysteresis, prediction slots, and reconciling each device's profile with its demand.

use super::*;

impl Engine {
    pub(super) fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        self.tick_with(now, out, false);
    }

    /// The tick as it was before the due scan: every device id cloned up
    /// front and each looked up in turn. Kept only as the reference the
    /// tests hold the due scan to (`tests/policy_props.rs`: the same
    /// actions and states on simulated time); the service never calls it.
    #[doc(hidden)]
    pub fn tick_visiting_every_device(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.tick_with(now, &mut out, true);
        out
    }

    fn tick_with(&mut self, now: u64, out: &mut Vec<Action>, every_device: bool) {
        // First, so a promotion or rollback re-plans devices in this tick.
        self.poll_rollouts(now, out);
        if self.config.features.shifting {
            self.renew_shifts(now);
        }
        if self.config.features.market {
            self.accrue_credits(now);
            self.renew_market(now);
        }
        // Only devices with something due are ticked (most devices, most
        // ticks, have nothing). The scan resumes after the last device
        // ticked, in id order, so a device whose wake time an earlier
        // device's tick moved to now (a loan's counterpart) is still ticked
        // in this pass, as when every id was cloned up front; a due test is
        // one integer per device, without cloning or looking ids up.
        if every_device {
            let ids: Vec<DeviceId> = self.devices.keys().cloned().collect();
            for id in &ids {
                self.tick_device(now, id, out);
            }
        } else {
            let mut cursor: Option<DeviceId> = None;
            while let Some(id) = self.next_due(now, cursor.as_ref()) {
                self.tick_device(now, &id, out);
                cursor = Some(id);
            }
        }
        if self.config.features.shifting {
            self.rebalance(now, out);
        }
        if self.config.features.market {
            self.run_market(now, out);
        }
    }

    /// The first device after `after` (in id order) whose wake time has come.
    fn next_due(&self, now: u64, after: Option<&DeviceId>) -> Option<DeviceId> {
        use std::ops::Bound::{Excluded, Unbounded};
        let due = |(id, st): (&DeviceId, &DeviceState)| (st.wake_at_ms <= now).then(|| id.clone());
        match after {
            None => self.devices.iter().find_map(due),
            Some(a) => self.devices.range((Excluded(a), Unbounded)).find_map(due),
        }
    }

    pub(super) fn tick_device(&mut self, now: u64, id: &DeviceId, out: &mut Vec<Action>) {
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
        let mut lapsed: BTreeSet<String> = BTreeSet::new();
        for k in expired {
            if let Some(l) = st.leases.remove(&k) {
                if l.clean {
                    st.reputation
                        .apply(rcfg, now, rcfg.clean_lease, "clean_lease");
                }
                st.ended_at.insert(k, (now, false));
                lapsed.insert(l.capability);
            }
        }
        for cap in lapsed {
            if !st.leases.values().any(|l| l.capability == cap) {
                // If the plan below grants it again, that is explained too.
                st.feedback.decide(
                    now,
                    feedback::DecisionKind::Release,
                    &cap,
                    format!("{cap} released: its lease ran out before it was renewed (the device stops it by itself)"),
                );
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
            self.resync(now, id);
        }
        self.reconcile(now, id, out);
        // After the plan: what it freed may serve queued requests.
        self.tick_apps(now, id, out);
    }

    // ------------------------------------------------------------ reconcile

    /// Re-plans a device and emits the minimal diff; loans recalled from or
    /// granted to it re-plan the counterpart too.
    pub(super) fn reconcile(&mut self, now: u64, device: &DeviceId, out: &mut Vec<Action>) {
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

    pub(super) fn reconcile_one(
        &mut self,
        now: u64,
        device: &DeviceId,
        work: &mut Vec<DeviceId>,
        out: &mut Vec<Action>,
    ) {
        // The catalog and tiers are shared (`Arc`) so a plan can borrow them
        // while device states change.
        let catalog = self.catalog_for(device);
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
                self.recall_loan(now, t);
                work.push(t.to.clone());
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let st = &self.devices[device];
            let mut plan = plan_for(
                &catalog,
                tier,
                &self.config,
                now,
                st,
                &self.health,
                self.device_config.get(device),
            );
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
                        self.recall_loan(now, t);
                        work.push(t.to.clone());
                    }
                    continue;
                }
                let borrowed = self.try_borrow(now, device, kind, missing);
                if borrowed.is_err()
                    && self.config.features.market
                    && self.buy_to_keep(now, device, &cap, kind, missing)
                {
                    continue;
                }
                match borrowed {
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
}
