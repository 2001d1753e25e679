//! Explicit requests inside the engine: the device's budget as the request
//! rules see it, the sequence check, and answers as actions (the rules
//! themselves are in [`crate::policy::requests`]).

use super::*;
use crate::policy::requests::{to_wire, Answers, DeviceBudget, InstanceKey};
use shardline_shared::request::GrantOutcome;

/// The device's budget for requests (effective budget, pushed units, tier).
fn budget_of(cfg: &PolicyConfig, agreements: &Agreements, st: &DeviceState) -> DeviceBudget {
    let tier = agreements.tiers.get(&st.tier);
    DeviceBudget {
        tier: tier.map_or([0, 0], |t| KINDS.map(|k| t.budget(k))),
        effective: tier.map_or([0, 0], |t| effective_budget(cfg, t, st)),
        pushed: used_units(st),
        drained: st.drained,
        device_score: st.reputation.score,
    }
}

impl Engine {
    pub(super) fn on_app_request(&mut self, now: u64, request: AppRequest, out: &mut Vec<Action>) {
        let Some(st) = self.devices.get_mut(&request.device) else {
            return;
        };
        if request.seq <= st.apps.last_seq {
            // A redelivery or a replay: answered once already.
            return;
        }
        st.apps.last_seq = request.seq;
        let who = InstanceKey {
            app: request.app,
            instance: request.instance,
        };
        self.app_decide(
            now,
            &request.device,
            &who,
            request.seq,
            request.op,
            true,
            out,
        );
    }

    pub(super) fn on_service_request(
        &mut self,
        now: u64,
        instance: InstanceRef,
        op: RequestOp,
        out: &mut Vec<Action>,
    ) {
        let who = InstanceKey::of(&instance);
        self.app_decide(now, &instance.device, &who, 0, op, false, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn app_decide(
        &mut self,
        now: u64,
        device: &DeviceId,
        who: &InstanceKey,
        request_seq: u64,
        op: RequestOp,
        rate_limit: bool,
        out: &mut Vec<Action>,
    ) {
        let Engine {
            config: cfg,
            agreements,
            devices,
            dirty,
            ..
        } = self;
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        let rcfg = &cfg.requests;
        let b = budget_of(cfg, agreements, st);
        let mut answers: Answers = Vec::new();
        // Expiries first, so what ran out is free for this request.
        st.apps.expire(rcfg, &b, now, &mut answers);
        let completing = match &op {
            RequestOp::Release {
                grant,
                outcome: GrantOutcome::Completed,
            } => st.apps.grants.get(grant).is_some_and(|g| &g.holder == who),
            _ => false,
        };
        st.apps.decide(
            rcfg,
            &b,
            who,
            request_seq,
            op,
            rate_limit,
            now,
            &mut answers,
        );
        if completing {
            // Completed work is a positive signal for the device too,
            // bounded per hour so releasing many tiny grants farms nothing.
            let r = &cfg.reputation;
            let gain = st
                .feedback
                .work_bonus(now, r.completed_work, r.completed_work_per_hour);
            if gain > 0.0 {
                st.reputation.apply(r, now, gain, "completed_work");
            }
        }
        if let Some(t) = st.apps.next_due() {
            st.wake_at_ms = st.wake_at_ms.min(t);
        }
        dirty.mark(device);
        out.extend(to_wire(device, now, answers).map(Action::Answer));
    }

    /// A tick's share: grants that ran out, queue deadlines, and units the
    /// pushed plan freed.
    pub(super) fn tick_apps(&mut self, now: u64, device: &DeviceId, out: &mut Vec<Action>) {
        let Engine {
            config: cfg,
            agreements,
            devices,
            dirty,
            ..
        } = self;
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        if st.apps.grants.is_empty() && st.apps.queue.is_empty() {
            return;
        }
        let b = budget_of(cfg, agreements, st);
        let mut answers: Answers = Vec::new();
        let expired = st.apps.expire(&cfg.requests, &b, now, &mut answers);
        st.apps.serve_queue(&cfg.requests, &b, now, &mut answers);
        if let Some(t) = st.apps.next_due() {
            st.wake_at_ms = st.wake_at_ms.min(t);
        }
        if expired || !answers.is_empty() {
            dirty.mark(device);
        }
        out.extend(to_wire(device, now, answers).map(Action::Answer));
    }

    pub(super) fn adjust_instance(
        &mut self,
        now: u64,
        instance: InstanceRef,
        change: ScoreChange,
        reason: String,
        actor: String,
        out: &mut Vec<Action>,
    ) {
        let Some(st) = self.devices.get_mut(&instance.device) else {
            return;
        };
        let who = InstanceKey::of(&instance);
        let recorded = format!("operator {actor}: {reason}");
        if let Some((old, new)) = st
            .apps
            .adjust(&self.config.requests, &who, change, recorded, now)
        {
            self.dirty.mark(&instance.device);
            out.push(Action::InstanceReputationAdjusted {
                instance,
                old,
                new,
                reason,
                actor,
            });
        }
    }

    /// One instance's standing and history, for the operator.
    pub fn instance_view(&self, instance: &InstanceRef) -> Option<InstanceView> {
        self.instance_view_at(instance, None)
    }

    /// [`Engine::instance_view`] with scores decayed to `now`.
    pub fn instance_view_at(
        &self,
        instance: &InstanceRef,
        now: Option<u64>,
    ) -> Option<InstanceView> {
        let st = self.devices.get(&instance.device)?;
        let b = budget_of(&self.config, &self.agreements, st);
        let now = now.unwrap_or_else(|| st_now(st));
        let mut view = st.apps.view(&self.config.requests, &b, instance, now)?;
        view.tenant = st.tenant.clone();
        view.tier = st.tier.clone();
        Some(view)
    }

    /// The device's application instances.
    pub fn instances(&self, device: &DeviceId, now: u64) -> Vec<InstanceSummary> {
        self.devices
            .get(device)
            .map(|st| st.apps.summaries(&self.config.requests, device, now))
            .unwrap_or_default()
    }

    /// Units held per kind on the device: pushed leases, app grants, and
    /// the effective budget (for invariant checks and views).
    pub fn units_held(&self, device: &DeviceId) -> Option<([u32; 2], [u32; 2], [u32; 2])> {
        let st = self.devices.get(device)?;
        let b = budget_of(&self.config, &self.agreements, st);
        Some((b.pushed, st.apps.granted_units(), b.effective))
    }
}
