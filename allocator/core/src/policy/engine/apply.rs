//! Turning a plan into leases and instructions: activations, deactivations, priorities and limits.

use super::*;

impl Engine {
    /// Turns a plan into leases and the minimal instruction.
    pub(super) fn apply_plan(
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
                            healthy_reports: 0,
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
}
