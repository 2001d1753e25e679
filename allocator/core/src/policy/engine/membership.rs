//! Enrolment, unenrolment (and re-admission from a tombstone), operator
//! overrides (pin, revoke, drain, retry of a failing catalog entry),
//! compliance penalties and duplicate-identity evidence.

use super::*;

impl Engine {
    pub(super) fn enroll(
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
                start_failures: BTreeMap::new(),
                clone_watch: CloneWatch::default(),
                apps: AppRequests::default(),
                lending: Default::default(),
                credits: Default::default(),
                feedback: Default::default(),
            },
        };
        self.restore_device(device.clone(), state);
        self.dirty.mark(&device);
        self.reconcile(now, &device, out);
    }

    pub(super) fn unenroll(&mut self, now: u64, device: &DeviceId, out: &mut Vec<Action>) {
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

    pub(super) fn operator(
        &mut self,
        now: u64,
        device: &DeviceId,
        shard: &str,
        out: &mut Vec<Action>,
        what: &str,
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
        st.feedback.decide(
            now,
            feedback::DecisionKind::Operator,
            if shard.is_empty() { "device" } else { shard },
            what.to_owned(),
        );
        self.dirty.mark(device);
        self.reconcile(now, device, out);
    }

    pub(super) fn penalize_compliance(
        &mut self,
        now: u64,
        device: &DeviceId,
        kind: ComplianceKind,
    ) {
        let r = &self.config.reputation;
        let delta = match kind {
            ComplianceKind::BadReportSignature => r.bad_report_signature,
            ComplianceKind::TamperedInstruction => r.tampered_instruction,
            ComplianceKind::ShardOutsideProfile => r.shard_outside_profile,
            ComplianceKind::ReplayedReport => r.replayed_report,
        };
        if let Some(st) = self.devices.get_mut(device) {
            if kind == ComplianceKind::ReplayedReport && st.clone_watch.flagged(now) {
                // Two agents share the identity (an operator's cloning
                // mistake): their interleaved sequences are not replays.
                return;
            }
            st.reputation.apply(r, now, delta, kind.as_str());
            self.dirty.mark(device);
        }
    }

    /// A verified report the service dropped as stale: evidence of a
    /// duplicate identity or nothing (see `faults::CloneWatch`).
    pub(super) fn on_stale_report(&mut self, now: u64, report: QosReport, out: &mut Vec<Action>) {
        let device = report.device.clone();
        let cfg = &self.config.faults;
        let Some(st) = self.devices.get_mut(&device) else {
            return;
        };
        let was = st.clone_watch.clone();
        if let Some(reason) = st.clone_watch.stale(cfg, &report, now) {
            tracing::warn!(%device, reason = %reason, "probable duplicate device: two agents with one identity");
            out.push(Action::DuplicateSuspected {
                device: device.clone(),
                reason: reason.clone(),
            });
            out.push(Action::Alert {
                device: device.clone(),
                message: format!(
                    "probable duplicate device (two agents with this id and key): {reason}; \
                     replayed_report is not charged while flagged"
                ),
            });
        }
        if st.clone_watch != was {
            self.dirty.mark(&device);
        }
    }

    /// Re-admission after an unenrolment: the reputation is restored from
    /// the tombstone, never better than a fresh device's.
    pub(super) fn readmit(
        &mut self,
        now: u64,
        device: &DeviceId,
        prior: ReputationState,
        out: &mut Vec<Action>,
    ) {
        let rcfg = &self.config.reputation;
        let Some(st) = self.devices.get_mut(device) else {
            return;
        };
        let restored = faults::Tombstone::restored(&prior, rcfg, now);
        if restored.score < st.reputation.score {
            let old = st.reputation.score;
            st.reputation = restored;
            st.reputation.history.push(ReputationEntry {
                at_ms: now,
                old,
                new: st.reputation.score,
                reason: "restored_after_reenrolment".to_owned(),
            });
            if st.reputation.history.len() > rcfg.history_len {
                let excess = st.reputation.history.len() - rcfg.history_len;
                st.reputation.history.drain(..excess);
            }
            self.dirty.mark(device);
            self.reconcile(now, device, out);
        }
    }

    /// Operator: the failing catalog entry `shard` is to be tried again,
    /// everywhere.
    pub(super) fn retry_entry(&mut self, now: u64, shard: &str, out: &mut Vec<Action>) {
        let had_mark = self.health.retry(shard);
        self.health_dirty = true;
        tracing::info!(shard, had_mark, "catalog entry retried by the operator");
        let ids: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, st)| st.start_failures.contains_key(shard) || had_mark)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(st) = self.devices.get_mut(id) {
                if st.start_failures.remove(shard).is_some() {
                    st.avoid_until.remove(shard);
                }
                self.dirty.mark(id);
            }
            self.reconcile(now, id, out);
        }
    }
}
