//! Enrolment, unenrolment, operator overrides (pin, revoke, drain) and compliance penalties.

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
            st.reputation.apply(r, now, delta, kind.as_str());
            self.dirty.mark(device);
        }
    }
}
