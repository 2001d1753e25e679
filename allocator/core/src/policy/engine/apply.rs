//! Turning a plan into leases and instructions: activations, deactivations, priorities and limits.
//!
//! An activation is an [`Operation::ActivateShard`]: the chosen shard and,
//! for the device to fail over to on its own, the catalog alternatives it
//! could run too (a build for its architecture, every per-device key set,
//! same kind, no more units than the chosen one so a failover never takes
//! the device over its budget; at most [`MAX_ALTERNATIVES`]). Each variant
//! carries the digest of its build for the device's architecture, its
//! limits, the catalog's declared bandwidth and its configuration: the
//! catalog's lines with the device's clear values over them. Secret values
//! are not the engine's: `sealed_config` stays empty here and the service
//! seals the device's secrets into it just before signing.

use super::*;
use crate::policy::catalog::ShardSpec;
use crate::policy::plan::{device_arch, missing_build_or_key};
use shardline_shared::msg::{ShardActivation, ShardVariant, MAX_ALTERNATIVES};

/// The catalog's configuration with the device's clear values over it
/// (a device key replaces the catalog line with the same key).
pub(crate) fn merged_config(spec: &ShardSpec, device: Option<&ShardConfigView>) -> Vec<u8> {
    let catalog = String::from_utf8_lossy(&spec.config);
    let mut out = String::new();
    let overridden = |k: &str| device.is_some_and(|d| d.clear.contains_key(k));
    for line in catalog.lines() {
        let key = line.split_once('=').map(|(k, _)| k.trim());
        if key.is_some_and(overridden) && !line.trim_start().starts_with('#') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(d) = device {
        for (k, v) in &d.clear {
            out.push_str(k);
            out.push_str(" = ");
            out.push_str(v);
            out.push('\n');
        }
    }
    out.into_bytes()
}

/// The catalog options of the member whose options include `id` (the
/// member then its alternatives), `id` itself left out.
pub(crate) fn siblings<'c>(catalog: &'c Catalog, id: &str) -> Vec<&'c ShardSpec> {
    for spec in catalog.shards.values() {
        let options =
            std::iter::once(spec.shard.id()).chain(spec.alternatives.iter().map(String::as_str));
        if spec.alternatives.is_empty() || !options.clone().any(|o| o == id) {
            continue;
        }
        return options
            .filter(|o| *o != id)
            .filter_map(|o| catalog.shards.get(o))
            .collect();
    }
    Vec::new()
}

fn variant(
    spec: &ShardSpec,
    arch: Option<&str>,
    config: Option<&DeviceConfigView>,
    priority: u8,
) -> Option<ShardVariant> {
    Some(ShardVariant {
        shard: spec.shard.clone(),
        sha256: spec.builds.for_arch(arch)?,
        config: merged_config(spec, config.and_then(|c| c.get(spec.shard.id()))),
        sealed_config: Vec::new(),
        limits: limits_of(spec, priority),
        bandwidth_kbps: spec.cost.bandwidth_kbps,
    })
}

/// The activation of `spec` on a device in state `st` (its lease end is
/// filled in by the caller).
fn shard_activation(
    catalog: &Catalog,
    spec: &ShardSpec,
    capability: &str,
    priority: u8,
    st: &DeviceState,
    config: Option<&DeviceConfigView>,
    now: u64,
) -> Option<ShardActivation> {
    let arch = device_arch(st);
    let primary = variant(spec, arch, config, priority)?;
    let alternatives = siblings(catalog, spec.shard.id())
        .into_iter()
        .filter(|a| a.kind == spec.kind && a.units <= spec.units)
        .filter(|a| !st.revoked.contains(a.shard.id()))
        .filter(|a| st.avoid_until.get(a.shard.id()).is_none_or(|&t| t <= now))
        .filter(|a| missing_build_or_key(a, arch, config).is_none())
        .filter_map(|a| variant(a, arch, config, priority))
        .take(MAX_ALTERNATIVES)
        .collect();
    Some(ShardActivation {
        primary,
        alternatives,
        capability: capability.to_owned(),
        kind: spec.kind,
        priority,
        lease_expires_at_ms: 0,
    })
}

/// The budget behind a grant, in words.
fn budget_text_of(tier: &Tier, st: &DeviceState, budget: [u32; 2], factors: [f64; 2]) -> String {
    format!(
        "budget {} compute + {} data units (tier {} {}+{} × quota {:.2}/{:.2} at reputation {:.0}, {:+} borrowed, {:+} lent)",
        budget[0],
        budget[1],
        st.tier,
        tier.compute_units,
        tier.data_units,
        factors[0],
        factors[1],
        st.reputation.score,
        sum_units(&st.borrowed).iter().sum::<u32>(),
        -(sum_units(&st.lent).iter().sum::<u32>() as i64),
    )
}

/// Records why each capability was granted, refused or released in this
/// plan, and the quota behind the budget (see [`feedback::Decision`]).
#[allow(clippy::too_many_arguments)]
fn explain_plan(
    cfg: &PolicyConfig,
    tier: &Tier,
    st: &mut DeviceState,
    now: u64,
    caps_before: &BTreeSet<String>,
    caps_after: &BTreeSet<String>,
    chosen: &BTreeMap<&str, plan::Chosen<'_>>,
    refusals: &BTreeMap<String, Refusal>,
    device: &DeviceId,
) {
    use feedback::DecisionKind as K;
    let score = st.reputation.score;
    let factors =
        KINDS.map(|k| super::super::reputation::quota_factor_for(&cfg.reputation, k, score));
    if factors.iter().any(|f| *f < 1.0) {
        let quota = quota_budget(cfg, tier, st);
        st.feedback.decide(
            now,
            K::Quota,
            "quota",
            format!(
                "reputation {score:.0}: quota {} of {} compute and {} of {} data units (data is throttled first: factors {:.2} and {:.2})",
                quota[0], tier.compute_units, quota[1], tier.data_units, factors[0], factors[1]
            ),
        );
    }
    let new_caps: Vec<&String> = caps_after.difference(caps_before).collect();
    let budget_text = if new_caps.is_empty() {
        String::new()
    } else {
        budget_text_of(tier, st, effective_budget(cfg, tier, st), factors)
    };
    for cap in new_caps {
        let units: [u32; 2] =
            chosen
                .values()
                .filter(|c| c.capability == cap)
                .fold([0, 0], |mut u, c| {
                    u[kind_index(c.spec.kind)] += c.spec.units;
                    u
                });
        let why = if !cfg.features.demand_driven {
            "every capability the tier allows (static policy)".to_owned()
        } else if let Some(pinned) = chosen
            .values()
            .find(|c| c.capability == cap && st.pinned.contains(c.spec.shard.id()))
        {
            let shard = pinned.spec.shard.id();
            match st.feedback.operator_marks.get(&format!("pin:{shard}")) {
                Some(by) => format!("{shard} pinned by {by}"),
                None => format!("{shard} pinned by the operator"),
            }
        } else if let Some(&t) = st.demand.get(cap) {
            format!(
                "a reported need asks for it (last seen {} s ago)",
                now.saturating_sub(t) / 1000
            )
        } else if st.predicted.get(cap).is_some_and(|&t| t > now) {
            "held ahead of a forecast onset (see the pre-activation)".to_owned()
        } else {
            "requested".to_owned()
        };
        st.feedback.decide(
            now,
            K::Grant,
            cap,
            format!(
                "{cap} granted: {why}; {} compute + {} data units of the {budget_text}",
                units[0], units[1]
            ),
        );
    }
    for cap in caps_before.difference(caps_after) {
        let why = match refusals.get(cap) {
            Some(Refusal::Drained) => match st.feedback.operator_marks.get("drain") {
                Some(by) => format!("the device was drained by {by}"),
                None => "the device is drained".to_owned(),
            },
            Some(_) => "refused now (see the refusal)".to_owned(),
            None if st.drained => match st.feedback.operator_marks.get("drain") {
                Some(by) => format!("the device was drained by {by}"),
                None => "the device is drained".to_owned(),
            },
            None => format!(
                "no reported need asked for it for {}, and no forecast holds it",
                if cfg.hysteresis_ms >= 120_000 {
                    format!("{} min", cfg.hysteresis_ms / 60_000)
                } else {
                    format!("{} s", cfg.hysteresis_ms / 1000)
                }
            ),
        };
        st.feedback
            .decide(now, K::Release, cap, format!("{cap} released: {why}"));
    }
    if refusals.iter().all(|(c, r)| st.refusals.get(c) == Some(r)) {
        return;
    }
    let ctx = faults::explain_ctx(cfg, quota_budget(cfg, tier, st), st, now);
    for (cap, r) in refusals {
        if st.refusals.get(cap) != Some(r) {
            let text = r.explain(cap, device.as_str(), &ctx);
            st.feedback.decide(now, K::Refuse, cap, text);
        }
    }
}

impl Engine {
    /// The operator changed the device's per-device configuration: keep
    /// it, make the leases of shards whose values changed due (so their
    /// activation is re-sent with the new configuration) and re-plan.
    pub(super) fn on_device_config(
        &mut self,
        now: u64,
        device: &DeviceId,
        config: DeviceConfigView,
        changed: &BTreeSet<String>,
        out: &mut Vec<Action>,
    ) {
        if !self.devices.contains_key(device) {
            return;
        }
        self.restore_device_config(device.clone(), config);
        let catalog = Arc::clone(&self.catalog);
        if let Some(st) = self.devices.get_mut(device) {
            // A lease whose shard (or an alternative it carries) changed is
            // made due for renewal: the plan re-sends its activation with
            // the new values (which replaces the running one), or, when a
            // key it needs is gone, releases it with a deactivation.
            for (id, lease) in st.leases.iter_mut() {
                let touched = changed.contains(id.as_str())
                    || siblings(&catalog, id)
                        .iter()
                        .any(|s| changed.contains(s.shard.id()));
                if touched {
                    lease.expires_at_ms = lease.expires_at_ms.min(now);
                }
            }
            st.wake_at_ms = 0;
        }
        self.dirty.mark(device);
        self.reconcile(now, device, out);
    }

    /// Turns a plan into leases and the minimal instruction.
    pub(super) fn apply_plan(
        &mut self,
        now: u64,
        device: &DeviceId,
        tier: &Tier,
        plan: Plan<'_>,
        out: &mut Vec<Action>,
    ) {
        // The device's view: a rollout may keep it on a previous entry.
        let view = self.catalog_for(device);
        let catalog = &*view;
        let Engine {
            config: cfg,
            devices,
            dirty,
            device_config,
            ..
        } = self;
        let dcfg = device_config.get(device);
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        let Plan {
            shards: chosen,
            used,
            refusals,
            predictions_skipped: _,
        } = plan;
        let rcfg = &cfg.reputation;
        let caps_before: BTreeSet<String> =
            st.leases.values().map(|l| l.capability.clone()).collect();
        let caps_after: BTreeSet<String> =
            chosen.values().map(|c| c.capability.to_owned()).collect();
        explain_plan(
            cfg,
            tier,
            st,
            now,
            &caps_before,
            &caps_after,
            &chosen,
            &refusals,
            device,
        );
        let lease_ms = lease_len(cfg, tier, st.reputation.score, device, now);
        let renew_before = (lease_ms / 3).max(cfg.renew_margin_ms);
        let mut deacts: Vec<ShardRef> = Vec::new();
        let mut acts: Vec<ShardActivation> = Vec::new();
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
            // The planner chose only shards with a build for this device.
            if spec.builds.for_arch(device_arch(st)).is_none() {
                continue;
            }
            // Built only when sent: most plans renew nothing and change
            // nothing, and an activation (configs, alternatives) is the
            // costliest part of a plan to build.
            let activation = |st: &DeviceState, expires: u64| {
                shard_activation(catalog, spec, ch.capability, *priority, st, dcfg, now).map(|a| {
                    ShardActivation {
                        lease_expires_at_ms: expires,
                        ..a
                    }
                })
            };
            match st.leases.get(id) {
                None => {
                    if st.ended_at.get(id).is_some_and(|&(t, explicit)| {
                        explicit && now.saturating_sub(t) < cfg.flap_window_ms
                    }) {
                        st.flaps += 1;
                    }
                    let expires = now.saturating_add(lease_ms);
                    acts.extend(activation(st, expires));
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
                }
                Some(l) => {
                    let renew = l.expires_at_ms.saturating_sub(now) <= renew_before;
                    if renew
                        || l.limits != limits
                        || l.priority != *priority
                        || l.shard != spec.shard
                    {
                        let expires = if renew {
                            now.saturating_add(lease_ms)
                        } else {
                            l.expires_at_ms
                        };
                        acts.extend(activation(st, expires));
                        if let Some(l) = st.leases.get_mut(id) {
                            l.expires_at_ms = expires;
                            l.limits = limits;
                            l.priority = *priority;
                            l.shard = spec.shard.clone();
                        }
                    }
                }
            }
        }
        // Shards the device runs that it must not (no lease, grace over).
        if st.pending_since_ms.is_none() {
            if let Some(r) = &st.last_report {
                for s in &r.running_shards {
                    // An alternative the device failed over to, in place of
                    // a shard it holds a lease for, is ours too.
                    let ours = st.leases.get(s.id()).is_some_and(|l| &l.shard == s)
                        || st.leases.values().any(|l| {
                            siblings(catalog, l.shard.id())
                                .iter()
                                .any(|a| &a.shard == s)
                        });
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
        for (kind, missing) in refusals.values().filter_map(Refusal::shortfall) {
            need[kind_index(kind)] = need[kind_index(kind)].saturating_add(missing);
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
            ops.extend(acts.into_iter().map(Operation::ActivateShard));
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
