//! Allocation planning: demanded capabilities ⇒ shards, fitted under the
//! device's budget (per kind) and its reported free capacity. Capabilities are
//! placed in priority order (pinned first), so when something has to go it is
//! the lowest priority; within a capability every member shard tries itself and
//! then its alternatives (alternatives first when the device lacks the
//! feature the member is preferred under). A capability is all or nothing: a
//! tunnel without its crypto is useless.
//!
//! A pinned capability is fitted under the budget but not under the reported
//! free capacity: the pin is the operator's decision, and dropping it on
//! every busy spell of the device's other software would restart its host
//! each time.
//!
//! An option (with its dependencies) is usable on a device only if the
//! catalog has a build of it for the device's architecture and the device
//! has every per-device key it requires (`device_config`, `secret_config`);
//! otherwise the next option is tried, and the capability's refusal names
//! the missing build or key. Neither is charged: a refused capability uses
//! no units.

use super::catalog::{Catalog, DeviceFeature, ShardSpec, Tier};
use super::{kind_index, DeviceConfigView, DeviceState, Refusal};
use shardline_shared::msg::DeviceResources;
use std::collections::BTreeMap;

/// One chosen shard.
#[derive(Debug, Clone)]
pub(crate) struct Chosen<'c> {
    pub spec: &'c ShardSpec,
    pub capability: &'c str,
    pub priority: u8,
}

#[derive(Debug, Default)]
pub(crate) struct Plan<'c> {
    /// Shard id ⇒ choice.
    pub shards: BTreeMap<&'c str, Chosen<'c>>,
    pub used: [u32; 2],
    pub refusals: BTreeMap<String, Refusal>,
    /// Capabilities held only by a prediction that did not fit beside
    /// the observed demand: not refusals (nothing asked for them yet), so
    /// they neither borrow nor attract shifts.
    pub predictions_skipped: Vec<String>,
}

/// Free CPU (per mille of one core) and memory (KiB) shards may use, and
/// the load of other software (per mille of the whole device) for refusals.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Capacity {
    pub cpu_permille: u64,
    pub memory_kib: u64,
    pub other_load_permille: u64,
}

impl Capacity {
    /// From the last report: everything not used by other software, times the
    /// headroom. Our own shards' use is added back since we are re-planning it.
    ///
    /// Units: the device reports its load per mille of *all* cores; shard
    /// costs and the hosts' CPU are per mille of *one* core. The load is
    /// converted to one-core units (× cores) before our hosts' share is
    /// taken out; `own_cpu_permille` must count each host once (a host runs
    /// a whole capability, and each of its shards reports the host's use).
    pub fn from_report(
        res: &DeviceResources,
        own_cpu_permille: u64,
        own_rss_kib: u64,
        headroom: f64,
    ) -> Self {
        let cores = u64::from(res.cpu_cores.max(1));
        let total = cores * 1000;
        let load = cores * u64::from(res.cpu_load_permille.min(1000));
        let other = load.saturating_sub(own_cpu_permille);
        let headroom = headroom.clamp(0.0, 1.0);
        let memory = res
            .mem_available_kib
            .saturating_add(own_rss_kib)
            .min(res.mem_total_kib.max(res.mem_available_kib));
        Self {
            cpu_permille: (total.saturating_sub(other) as f64 * headroom) as u64,
            memory_kib: (memory as f64 * headroom) as u64,
            other_load_permille: other / cores,
        }
    }
}

pub(crate) struct PlanInput<'a, 'c> {
    pub catalog: &'c Catalog,
    pub tier: &'a Tier,
    pub state: &'a DeviceState,
    pub now_ms: u64,
    pub budget: [u32; 2],
    pub capacity: Option<Capacity>,
    /// Demanded capabilities (pinned ones are added by the planner).
    pub demanded: &'a [&'c str],
    /// Of them, those only a prediction holds: planned after every
    /// observed one, so a pre-activation never displaces observed demand.
    pub predicted_only: &'a [&'c str],
    /// Shard id ⇒ why it must not be planned on this device now (catalog
    /// entries failing on its architecture): skipped like an avoided
    /// shard, with this refusal when no option is left.
    pub unusable: &'a BTreeMap<String, Refusal>,
    /// The device's per-device shard configuration (keys only matter here).
    pub device_config: Option<&'a DeviceConfigView>,
}

/// The device's architecture as its last report gave it.
pub(crate) fn device_arch(state: &DeviceState) -> Option<&str> {
    state
        .resources
        .as_ref()
        .map(|r| r.arch.as_str())
        .filter(|a| !a.is_empty())
}

/// Why `spec` cannot run on this device whatever the budget: no build for
/// its architecture, or a per-device key it requires is not set.
pub(crate) fn missing_build_or_key(
    spec: &ShardSpec,
    arch: Option<&str>,
    config: Option<&DeviceConfigView>,
) -> Option<Refusal> {
    if spec.builds.for_arch(arch).is_none() {
        return Some(Refusal::NoBuild {
            shard: spec.shard.id().to_owned(),
            arch: arch.unwrap_or("unknown (no report yet)").to_owned(),
        });
    }
    for (key, secret) in spec.required_keys() {
        let set = config
            .and_then(|c| c.get(spec.shard.id()))
            .is_some_and(|s| {
                if secret {
                    s.secret_keys.contains(key)
                } else {
                    s.clear.contains_key(key)
                }
            });
        if !set {
            return Some(Refusal::MissingDeviceConfig {
                shard: spec.shard.id().to_owned(),
                key: key.to_owned(),
                secret,
            });
        }
    }
    None
}

fn has_feature(res: Option<&DeviceResources>, f: DeviceFeature) -> bool {
    match f {
        DeviceFeature::AesHw => res.is_some_and(|r| r.aes_hw),
    }
}

pub(crate) fn plan<'c>(input: &PlanInput<'_, 'c>) -> Plan<'c> {
    let catalog = input.catalog;
    let state = input.state;
    let mut out = Plan::default();
    if state.drained {
        for cap in input.demanded {
            out.refusals.insert((*cap).to_owned(), Refusal::Drained);
        }
        return out;
    }
    // Order: pinned capabilities, then observed demand before predicted,
    // then priority (high first), then name.
    let mut caps: Vec<(bool, bool, u8, &'c str)> = Vec::with_capacity(input.demanded.len() + 1);
    for &c in input.demanded {
        if let Some(spec) = catalog.capabilities.get(c) {
            let observed = !input.predicted_only.contains(&c);
            caps.push((false, observed, spec.priority, spec.name.as_str()));
        }
    }
    for p in &state.pinned {
        if let Some(shard) = catalog.shards.get(p) {
            let spec = &catalog.capabilities[&shard.capability];
            match caps.iter_mut().find(|c| c.3 == spec.name) {
                Some(c) => c.0 = true,
                None => caps.push((true, true, spec.priority, spec.name.as_str())),
            }
        }
    }
    caps.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
            .then(a.3.cmp(b.3))
    });

    let mut cpu_used: u64 = 0;
    let mut mem_used: u64 = 0;
    let res = state.resources.as_ref();
    let arch = device_arch(state);
    for (pinned, observed, _, cap_name) in caps {
        if !input.tier.capabilities.contains(cap_name) {
            out.refusals
                .insert(cap_name.to_owned(), Refusal::NotAllowed);
            continue;
        }
        let cap = &catalog.capabilities[cap_name];
        let mut tentative: Vec<&'c ShardSpec> = Vec::new();
        let mut t_used = out.used;
        let mut t_cpu = cpu_used;
        let mut t_mem = mem_used;
        let mut refusal: Option<Refusal> = None;
        for member in &cap.members {
            let spec = &catalog.shards[member];
            let mut options: Vec<&'c ShardSpec> = Vec::with_capacity(1 + spec.alternatives.len());
            let member_first = spec.prefer_when.is_none_or(|f| has_feature(res, f));
            if member_first {
                options.push(spec);
            }
            options.extend(spec.alternatives.iter().map(|a| &catalog.shards[a]));
            if !member_first {
                options.push(spec);
            }
            if let Some(pos) = options
                .iter()
                .position(|o| state.pinned.contains(o.shard.id()))
            {
                let p = options.remove(pos);
                options.insert(0, p);
            }
            let mut first_failure: Option<Refusal> = None;
            let mut picked = false;
            for opt in options {
                let id = opt.shard.id();
                let avoided = state.avoid_until.get(id).is_some_and(|&t| t > input.now_ms);
                if state.revoked.contains(id) || avoided {
                    if let Some(f) = state.start_failures.get(id).filter(|_| avoided) {
                        first_failure.get_or_insert(Refusal::StartFailed {
                            shard: id.to_owned(),
                            reason: f.reason.clone(),
                            until_ms: f.until_ms,
                        });
                    }
                    continue;
                }
                if let Some(r) = input.unusable.get(id) {
                    first_failure.get_or_insert(r.clone());
                    continue;
                }
                // The option plus its dependencies not chosen yet.
                let mut bundle: Vec<&'c ShardSpec> = vec![opt];
                let mut i = 0;
                let mut dep_blocked = false;
                while i < bundle.len() {
                    for d in &bundle[i].depends_on {
                        let dspec = &catalog.shards[d];
                        if state.revoked.contains(d.as_str()) {
                            dep_blocked = true;
                        }
                        let already = out.shards.contains_key(d.as_str())
                            || tentative.iter().any(|t| t.shard.id() == d)
                            || bundle.iter().any(|b| b.shard.id() == d);
                        if !already {
                            bundle.push(dspec);
                        }
                    }
                    i += 1;
                }
                if dep_blocked {
                    continue;
                }
                if let Some(r) = bundle
                    .iter()
                    .find_map(|b| missing_build_or_key(b, arch, input.device_config))
                {
                    first_failure.get_or_insert(r);
                    continue;
                }
                let mut n_used = t_used;
                let (mut n_cpu, mut n_mem) = (t_cpu, t_mem);
                for b in &bundle {
                    if out.shards.contains_key(b.shard.id())
                        || tentative.iter().any(|t| t.shard.id() == b.shard.id())
                    {
                        continue;
                    }
                    n_used[kind_index(b.kind)] += b.units;
                    n_cpu += u64::from(b.cost.cpu_permille);
                    n_mem += b.cost.memory_kib;
                }
                let over_budget = (0..2).find(|&k| n_used[k] > input.budget[k]);
                if let Some(k) = over_budget {
                    first_failure.get_or_insert(Refusal::Budget {
                        kind: super::KINDS[k],
                        missing_units: n_used[k] - input.budget[k],
                    });
                    continue;
                }
                // A pin is the operator's decision for this device: it
                // yields to the tier budget, not to the device's other load
                // (which would otherwise start and stop it with every busy
                // spell, each time a restart of its host).
                if let Some(c) = input.capacity.filter(|_| !pinned) {
                    if n_cpu > c.cpu_permille || n_mem > c.memory_kib {
                        first_failure.get_or_insert(Refusal::Capacity {
                            cpu_needed_permille: n_cpu,
                            cpu_free_permille: c.cpu_permille,
                            memory_needed_kib: n_mem,
                            memory_free_kib: c.memory_kib,
                            other_load_permille: c.other_load_permille,
                        });
                        continue;
                    }
                }
                for b in bundle {
                    if !tentative.iter().any(|t| t.shard.id() == b.shard.id())
                        && !out.shards.contains_key(b.shard.id())
                    {
                        tentative.push(b);
                    }
                }
                t_used = n_used;
                t_cpu = n_cpu;
                t_mem = n_mem;
                picked = true;
                break;
            }
            if !picked {
                refusal = Some(first_failure.unwrap_or(Refusal::Unavailable {
                    shard: member.clone(),
                }));
                break;
            }
        }
        match refusal {
            Some(_) if !observed && !pinned => {
                out.predictions_skipped.push(cap_name.to_owned());
            }
            Some(r) => {
                out.refusals.insert(cap_name.to_owned(), r);
            }
            None => {
                out.used = t_used;
                cpu_used = t_cpu;
                mem_used = t_mem;
                for s in tentative {
                    let base = if pinned && state.pinned.contains(s.shard.id()) {
                        u8::MAX
                    } else {
                        s.priority
                    };
                    out.shards.insert(
                        s.shard.id(),
                        Chosen {
                            spec: s,
                            capability: s.capability.as_str(),
                            priority: base.min(input.tier.max_priority),
                        },
                    );
                }
            }
        }
    }
    out
}
