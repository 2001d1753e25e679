//! The fleet simulation over the policy engine (the model behind
//! `shardline-allocator simulate`; the command line lives in the service crate).
//!
//! Sans-IO and seeded: a fleet of simulated agents (diurnal demand per traffic
//! class, random spikes, a share of devices that start misbehaving — crashing
//! their shards or using more than their limits) reports to one [`Engine`]
//! every tick and applies the instructions it gets back. The same fleet runs
//! under each policy variant (`static` = tier-only, `reactive` = demand-driven,
//! `full` = with prediction, borrowing and shifting, `market` = `full` with
//! seed 002's credit market in place of free borrowing: with free borrowing
//! beside it, nobody pays for what a peer lends for nothing, and the market
//! never trades) and the figures say what
//! each achieves: demand served, units used, demand served per unit, how fast
//! misbehaving devices lose quota, and shard flaps.

use super::prng::{hash_str, SplitMix64};
use super::{Action, Agreements, Catalog, CatalogError, Engine, Event, Features, PolicyConfig};
use serde::Serialize;
use shardline_shared::ids::{DeviceId, ShardRef};
use shardline_shared::msg::{
    AckOutcome, ClassStats, DeviceResources, Enforcement, Operation, QosNeed, QosReport,
    RejectionCounters, ResourceLimits, ShardFailure, ShardState, ShardStatus, TrafficClass,
};
use std::collections::{BTreeMap, BTreeSet};

/// The shipped example catalog and tiers (the simulation's default fleet setup).
pub const EXAMPLE_CATALOG: &str = include_str!("../../../catalog/catalog.toml");
pub const EXAMPLE_TIERS: &str = include_str!("../../../catalog/tiers.toml");

/// What to simulate.
#[derive(Debug, Clone, Serialize)]
pub struct SimParams {
    pub devices: u32,
    pub hours: u32,
    pub seed: u64,
    pub tick_ms: u64,
    pub misbehaving_permille: u32,
}

/// The figures of one policy variant over the first `hours` of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub hours: u32,
    /// Demand that needed a capability, Mbit, whole fleet.
    pub demand_mbit: f64,
    /// Of it, Mbit carried while the capability was active.
    pub served_mbit: f64,
    pub served_fraction: f64,
    /// Same, well-behaved devices only.
    pub well_behaved_served_fraction: f64,
    /// Resource units active, summed over time (unit-hours).
    pub unit_hours: f64,
    /// Mean units active across the fleet.
    pub mean_units: f64,
    pub served_mbit_per_unit_hour: f64,
    pub misbehaving_devices: u32,
    /// Of them, devices that did misbehave (had a shard to abuse after
    /// the misbehaviour start).
    pub misbehaving_active: u32,
    /// Of those, devices whose quota fell below their tier budget.
    pub misbehaving_lost_quota: u32,
    /// Misbehaving ticks (reports that carried misbehaviour: a crashed or
    /// over-limit shard) until the quota cut (median, max). Ticks in which a
    /// misbehaving device runs nothing cannot show misbehaviour and do not
    /// count; a device never cut counts all of its misbehaving ticks.
    pub reaction_ticks_median: u32,
    pub reaction_ticks_max: u32,
    /// Units that well-behaved devices kept (mean) vs misbehaving ones at the end.
    pub misbehaving_mean_units_end: f64,
    /// Shards re-activated within the flap window after a deactivation.
    pub flaps: u64,
    /// Of them, on well-behaved devices (misbehaving ones lose and regain
    /// quota as their reputation is cut and decays back).
    pub flaps_well_behaved: u64,
    /// The most times one capability of one well-behaved device went off
    /// and on again within one stabilization period (target: at most 1).
    pub max_flaps_per_stabilization: u32,
    /// Where that maximum happened first: "device capability at ms, ms…"
    /// (to look the device up), empty when no capability flapped twice.
    pub max_flaps_where: String,
    /// Demand not served, Mbit, by why (the refusal of the capability it
    /// needed; `not_demanded_yet` = the window its class came on in, before
    /// a report showed it).
    pub unserved_mbit: BTreeMap<String, f64>,
    /// Pre-activations judged, and those demand followed.
    pub preactivations: u64,
    pub preactivation_hits: u64,
    pub instructions: u64,
    pub activations: u64,
    pub events: u64,
}

/// All variants over the same fleet.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub params: SimParams,
    /// Over the whole run.
    pub variants: Vec<VariantResult>,
    /// Over the first 24 h, 72 h and 168 h (those within the run), then
    /// the whole run: prediction only acts after its first day, so one
    /// horizon alone misleads.
    pub horizons: Vec<Vec<VariantResult>>,
}

/// Horizons reported beside the whole run, hours.
pub const HORIZONS_H: [u32; 3] = [24, 72, 168];

fn horizons_of(hours: u32) -> Vec<u32> {
    let mut h: Vec<u32> = HORIZONS_H.iter().copied().filter(|&x| x < hours).collect();
    h.push(hours);
    h
}

impl SimReport {
    pub fn variant(&self, name: &str) -> Option<&VariantResult> {
        self.variants.iter().find(|v| v.variant == name)
    }

    /// The variant over the first `hours`.
    pub fn at(&self, hours: u32, name: &str) -> Option<&VariantResult> {
        self.horizons
            .iter()
            .flatten()
            .find(|v| v.hours == hours && v.variant == name)
    }

    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fleet: {} devices, {} h, {} s ticks, seed {}, {}‰ misbehaving",
            p.devices,
            p.hours,
            p.tick_ms / 1000,
            p.seed,
            p.misbehaving_permille
        );
        let _ = writeln!(
            s,
            "{:<13} {:>12} {:>12} {:>7} {:>7} {:>10} {:>9} {:>13} {:>15} {:>11} {:>7}",
            "variant@h",
            "demand Mbit",
            "served Mbit",
            "served",
            "good",
            "unit-h",
            "units",
            "Mbit/unit-h",
            "react tk med/max",
            "flaps all/good",
            "instr"
        );
        for v in self.horizons.iter().flatten() {
            let _ = writeln!(
                s,
                "{:<13} {:>12.0} {:>12.0} {:>6.1}% {:>6.1}% {:>10.0} {:>9.0} {:>13.1} {:>8}/{:<6} {:>6}/{:<5} {:>7}",
                format!("{}@{}h", v.variant, v.hours),
                v.demand_mbit,
                v.served_mbit,
                v.served_fraction * 100.0,
                v.well_behaved_served_fraction * 100.0,
                v.unit_hours,
                v.mean_units,
                v.served_mbit_per_unit_hour,
                v.reaction_ticks_median,
                v.reaction_ticks_max,
                v.flaps,
                v.flaps_well_behaved,
                v.instructions
            );
        }
        for v in &self.variants {
            let _ = writeln!(
                s,
                "{:<9} misbehaving: {} devices, {} misbehaved, {} lost quota; mean units at the end {:.2}",
                v.variant,
                v.misbehaving_devices,
                v.misbehaving_active,
                v.misbehaving_lost_quota,
                v.misbehaving_mean_units_end
            );
        }
        for v in &self.variants {
            let total: f64 = v.unserved_mbit.values().sum();
            let why: Vec<String> = v
                .unserved_mbit
                .iter()
                .map(|(k, m)| format!("{k} {:.1}%", 100.0 * ratio(*m, total)))
                .collect();
            let _ = writeln!(
                s,
                "{:<9} unserved {:.0} Mbit: {}; most flaps of one capability per stabilization period {}{}",
                v.variant,
                total,
                why.join(", "),
                v.max_flaps_per_stabilization,
                if v.max_flaps_where.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", v.max_flaps_where)
                }
            );
        }
        s
    }
}

/// Runs `static`, `reactive`, `full` and `market` over the same fleet.
pub fn run_all(params: &SimParams) -> Result<SimReport, CatalogError> {
    let mut variants = Vec::new();
    for (name, features) in [
        ("static", Features::STATIC),
        ("reactive", Features::REACTIVE),
        ("full", Features::FULL),
        (
            "market",
            Features {
                borrowing: false,
                ..Features::MARKET
            },
        ),
    ] {
        variants.push(run_variant_horizons(params, name, features)?);
    }
    let n = horizons_of(params.hours).len();
    let horizons: Vec<Vec<VariantResult>> = (0..n)
        .map(|i| variants.iter().map(|v| v[i].clone()).collect())
        .collect();
    Ok(SimReport {
        params: params.clone(),
        variants: horizons.last().cloned().unwrap_or_default(),
        horizons,
    })
}

/// The engine configuration the simulation uses for a tick length.
pub fn sim_config(params: &SimParams, features: Features) -> PolicyConfig {
    let tick = params.tick_ms;
    PolicyConfig {
        seed: params.seed,
        features,
        renew_margin_ms: 2 * tick,
        min_lease_ms: 4 * tick,
        ack_timeout_ms: 2 * tick,
        hysteresis_ms: (3 * tick).max(15 * 60_000),
        outside_profile_grace_ms: 2 * tick,
        ..PolicyConfig::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    None,
    Crash,
    Overuse,
}

/// One class's daily shape: active between `start_h` and `end_h` (device
/// local offset applied) with a peak rate, plus noise.
#[derive(Debug, Clone)]
struct ClassProfile {
    class: TrafficClass,
    need: QosNeed,
    start_h: f64,
    end_h: f64,
    peak_kbps: f64,
}

#[derive(Debug, Clone)]
struct SimShard {
    shard: ShardRef,
    capability: String,
    units: u32,
    limits: ResourceLimits,
    lease_expires_at_ms: u64,
    restarts: u32,
    /// Reports it ran fine in: a crash-misbehaving device crashes shards
    /// that ran fine (a crash at start is an operator fault, see
    /// `policy::faults`, and is not what this models).
    ok_reports: u32,
}

/// Healthy reports after which a shard has run fine (the engine's default).
const RAN_FINE: u32 = 2;

/// A simulated agent: applies instructions, expires leases, reports.
#[derive(Debug)]
struct SimDevice {
    id: DeviceId,
    tier: String,
    tenant: String,
    classes: Vec<ClassProfile>,
    resources: DeviceResources,
    running: BTreeMap<String, SimShard>,
    seq: u64,
    applied_seq: u64,
    misbehaviour: Misbehaviour,
    /// Current spike: (class index, until ms).
    spike: Option<(usize, u64)>,
    rng: SplitMix64,
}

/// A per-device configuration that sets every key the catalog requires
/// (`device_config` values and `secret_config` names) to a placeholder:
/// simulated devices (and tests of allocation rather than configuration)
/// are configured devices.
pub fn placeholder_device_config(catalog: &Catalog) -> super::DeviceConfigView {
    let mut out = super::DeviceConfigView::new();
    for (id, spec) in &catalog.shards {
        if spec.device_config.is_empty() && spec.secret_config.is_empty() {
            continue;
        }
        let view = out.entry(id.clone()).or_default();
        for k in &spec.device_config {
            view.clear.insert(k.clone(), "sim".to_owned());
        }
        view.secret_keys.extend(spec.secret_config.iter().cloned());
    }
    out
}

impl SimDevice {
    fn apply(&mut self, catalog: &Catalog, ops: &[Operation]) -> u64 {
        let mut activations = 0;
        self.applied_seq += 1;
        for op in ops {
            match op {
                Operation::Deactivate { shard } => {
                    self.running.remove(shard.id());
                }
                // The engine never asks; an operator does, not simulated.
                Operation::RequestDiagnostics { .. } => {}
                Operation::Activate(a) => {
                    activations += 1;
                    self.start(
                        catalog,
                        &a.shard,
                        &a.capability,
                        a.limits,
                        a.lease_expires_at_ms,
                    );
                }
                Operation::ActivateShard(a) => {
                    activations += 1;
                    let p = &a.primary;
                    self.start(
                        catalog,
                        &p.shard,
                        &a.capability,
                        p.limits,
                        a.lease_expires_at_ms,
                    );
                }
            }
        }
        activations
    }

    fn start(
        &mut self,
        catalog: &Catalog,
        shard: &ShardRef,
        capability: &str,
        limits: ResourceLimits,
        lease_expires_at_ms: u64,
    ) {
        let units = catalog.shard(shard.id()).map_or(1, |s| s.units);
        let restarts = self.running.get(shard.id()).map_or(0, |s| s.restarts);
        let ok_reports = self.running.get(shard.id()).map_or(0, |s| s.ok_reports);
        self.running.insert(
            shard.id().to_owned(),
            SimShard {
                shard: shard.clone(),
                capability: capability.to_owned(),
                units,
                limits,
                lease_expires_at_ms,
                restarts,
                ok_reports,
            },
        );
    }

    /// Whether a report now can carry this device's misbehaviour.
    fn can_misbehave(&self) -> bool {
        match self.misbehaviour {
            Misbehaviour::Crash => self.running.values().any(|s| s.ok_reports >= RAN_FINE),
            _ => !self.running.is_empty(),
        }
    }

    fn expire(&mut self, now: u64) {
        self.running.retain(|_, s| s.lease_expires_at_ms > now);
    }

    /// Class rates (kbit/s) over the window starting at `now`.
    fn rates(&mut self, now: u64, tick_ms: u64) -> Vec<(usize, f64)> {
        let hour = (now % 86_400_000) as f64 / 3_600_000.0;
        let mut out = Vec::new();
        if let Some((_, until)) = self.spike {
            if until <= now {
                self.spike = None;
            }
        }
        // A spike: a random class is busy for 1–3 ticks (≈ 2 per device per day).
        if self.spike.is_none() && self.rng.below(1000) < 7 * tick_ms / 300_000 {
            let c = self.rng.below(self.classes.len() as u64) as usize;
            self.spike = Some((c, now + tick_ms * (1 + self.rng.below(3))));
        }
        for (i, c) in self.classes.iter().enumerate() {
            let in_window = if c.start_h <= c.end_h {
                hour >= c.start_h && hour < c.end_h
            } else {
                hour >= c.start_h || hour < c.end_h
            };
            let spiking = self.spike.is_some_and(|(s, _)| s == i);
            if in_window || spiking {
                // A smooth bump over the window, with 20 % noise.
                let len = (c.end_h - c.start_h).rem_euclid(24.0).max(0.5);
                let x = (hour - c.start_h).rem_euclid(24.0) / len;
                let shape = if in_window {
                    0.4 + 0.6 * (std::f64::consts::PI * x).sin()
                } else {
                    0.8
                };
                let noise = 1.0 + 0.2 * self.rng.normal();
                out.push((i, (c.peak_kbps * shape * noise).max(10.0)));
            }
        }
        out
    }

    fn report(
        &mut self,
        window_start: u64,
        tick_ms: u64,
        rates: &[(usize, f64)],
        served: &dyn Fn(&QosNeed) -> bool,
        misbehaving: bool,
    ) -> QosReport {
        self.seq += 1;
        // Seed 002's good-neighbour observations: a simulated class's
        // baseline is its served level (2 ‰, 40 ms), so an unserved class
        // is reported as harmed, as an agent would after its warm-up. The
        // engine attributes it only if the device was lending meanwhile.
        let mut harm = Vec::new();
        let classes = rates
            .iter()
            .map(|&(i, kbps)| {
                let c = &self.classes[i];
                let bytes = (kbps * 1000.0 / 8.0 * tick_ms as f64 / 1000.0) as u64;
                if !served(&c.need) && harm.len() < shardline_shared::msg::MAX_HARM_OBSERVATIONS {
                    harm.push(shardline_shared::msg::HarmObservation {
                        class: c.class,
                        baseline_loss_permille: 2,
                        loss_permille: 30,
                        baseline_rtt_p95_us: Some(40_000),
                        rtt_p95_us: Some(120_000),
                    });
                }
                ClassStats {
                    class: c.class,
                    bytes,
                    packets: bytes / 800 + 1,
                    rate_bps: (kbps * 1000.0) as u64,
                    rtt_p50_us: Some(20_000),
                    rtt_p95_us: Some(if served(&c.need) { 40_000 } else { 120_000 }),
                    jitter_us: Some(2_000),
                    loss_permille: if served(&c.need) { 2 } else { 30 },
                    active_flows: 3,
                    need: c.need,
                }
            })
            .collect();
        let mut host_cpu_limit: BTreeMap<String, u32> = BTreeMap::new();
        for s in self.running.values() {
            *host_cpu_limit.entry(s.capability.clone()).or_default() += s.limits.cpu_quota_permille;
        }
        let mut shards = Vec::new();
        for s in self.running.values_mut() {
            let mut status = ShardStatus {
                shard: s.shard.clone(),
                capability: s.capability.clone(),
                state: ShardState::Running,
                cpu_permille: s.limits.cpu_quota_permille / 2,
                rss_kib: s.limits.memory_max_bytes / 2048,
                restarts: s.restarts,
                errors: 0,
                last_failure: None,
                lease_expires_at_ms: s.lease_expires_at_ms,
                enforcement: Enforcement::CgroupV2,
            };
            if misbehaving {
                match self.misbehaviour {
                    Misbehaviour::Crash if s.ok_reports < RAN_FINE => s.ok_reports += 1,
                    Misbehaviour::Crash => {
                        s.restarts += 1;
                        status.restarts = s.restarts;
                        status.last_failure = Some(ShardFailure::Crashed { signal: 11 });
                    }
                    Misbehaviour::Overuse => {
                        // The capability's host process (all its shards)
                        // uses 3× the sum of their limits; every status of
                        // the capability reports the host's use.
                        status.cpu_permille = host_cpu_limit
                            .get(&s.capability)
                            .copied()
                            .unwrap_or(s.limits.cpu_quota_permille)
                            * 3;
                        status.enforcement = Enforcement::RlimitsOnly;
                    }
                    Misbehaviour::None => {}
                }
            } else {
                s.ok_reports = s.ok_reports.saturating_add(1);
            }
            shards.push(status);
        }
        QosReport {
            device: self.id.clone(),
            seq: self.seq,
            window_start_ms: window_start,
            window_ms: tick_ms.min(u64::from(u32::MAX)) as u32,
            classes,
            resources: self.resources.clone(),
            shards,
            applied_instruction_seq: self.applied_seq,
            rejections: RejectionCounters::default(),
            lending: shardline_shared::msg::LendingReport {
                harm,
                consent: None,
            },
        }
    }

    fn units(&self) -> u32 {
        self.running.values().map(|s| s.units).sum()
    }

    /// Capabilities with every member (or an alternative of it) running.
    fn active_capability(&self, catalog: &Catalog, cap: &str) -> bool {
        let Some(spec) = catalog.capabilities.get(cap) else {
            return false;
        };
        spec.members.iter().all(|m| {
            self.running.contains_key(m)
                || catalog.shards[m]
                    .alternatives
                    .iter()
                    .any(|a| self.running.contains_key(a))
        })
    }
}

fn build_fleet(params: &SimParams) -> Vec<SimDevice> {
    let mut rng = SplitMix64::new(params.seed);
    let mut fleet = Vec::with_capacity(params.devices as usize);
    for i in 0..params.devices {
        let id = DeviceId::new(format!("sim-{i:06}")).unwrap_or_else(|_| unreachable_id());
        let mut drng = SplitMix64::new(hash_str(params.seed, id.as_str()));
        let r = rng.below(100);
        let tier = if r < 40 {
            "basic"
        } else if r < 85 {
            "standard"
        } else {
            "premium"
        };
        let offset = drng.next_f64() * 2.0 - 1.0;
        let mut classes = vec![ClassProfile {
            class: TrafficClass::Calls,
            need: QosNeed {
                latency_sensitive: true,
                ..QosNeed::default()
            },
            start_h: 8.0 + offset,
            end_h: 18.0 + offset,
            peak_kbps: 200.0 + drng.next_f64() * 600.0,
        }];
        if tier != "basic" {
            classes.push(ClassProfile {
                class: TrafficClass::Sensitive,
                need: QosNeed {
                    needs_encryption: true,
                    ..QosNeed::default()
                },
                start_h: 9.0 + offset,
                end_h: 17.0 + offset,
                peak_kbps: 500.0 + drng.next_f64() * 2000.0,
            });
        }
        classes.push(ClassProfile {
            class: TrafficClass::Streaming,
            need: QosNeed {
                bandwidth_heavy: true,
                ..QosNeed::default()
            },
            start_h: 19.0 + offset,
            end_h: 23.0 + offset,
            peak_kbps: 3000.0 + drng.next_f64() * 5000.0,
        });
        let weak = drng.below(100) < 5;
        let misbehaviour = if rng.below(1000) < u64::from(params.misbehaving_permille) {
            if rng.below(2) == 0 {
                Misbehaviour::Crash
            } else {
                Misbehaviour::Overuse
            }
        } else {
            Misbehaviour::None
        };
        fleet.push(SimDevice {
            tenant: format!("tenant-{}", i % 10),
            tier: tier.to_owned(),
            classes,
            resources: DeviceResources {
                cpu_cores: if weak { 1 } else { 2 + drng.below(3) as u16 },
                cpu_load_permille: if weak {
                    750
                } else {
                    150 + drng.below(350) as u16
                },
                mem_total_kib: 1 << 20,
                mem_available_kib: if weak {
                    48 * 1024
                } else {
                    256 * 1024 + drng.below(512 * 1024)
                },
                aes_hw: drng.below(2) == 0,
                arch: "aarch64".to_owned(),
            },
            running: BTreeMap::new(),
            seq: 0,
            applied_seq: 0,
            misbehaviour,
            spike: None,
            rng: drng,
            id,
        });
    }
    fleet
}

fn unreachable_id() -> DeviceId {
    // `sim-NNNNNN` is always a valid id; keep a valid fallback anyway.
    DeviceId::new("sim-invalid").unwrap_or_else(|_| std::process::abort())
}

/// When misbehaving devices start (so each has a clean record first).
pub const MISBEHAVE_FROM_H: u64 = 6;

/// Runs one variant over the fleet built from `params` (the whole run).
pub fn run_variant(
    params: &SimParams,
    name: &str,
    features: Features,
) -> Result<VariantResult, CatalogError> {
    let mut all = run_variant_horizons(params, name, features)?;
    Ok(all.pop().unwrap_or_else(|| empty_result(name)))
}

/// What a run has counted so far.
#[derive(Debug, Default)]
struct Tally {
    res: Option<VariantResult>,
    demand_good: f64,
    served_good: f64,
    unit_ticks: u64,
    reaction: BTreeMap<usize, u32>,
    /// Tick of the first report that carried misbehaviour (a shard to abuse).
    bad_since: BTreeMap<usize, u64>,
    /// Misbehaving reports (with a shard to abuse) each device has sent.
    bad_reports: BTreeMap<usize, u32>,
    /// (device, capability) ⇒ when it last went off (explicitly).
    off_at: BTreeMap<(usize, String), u64>,
    /// (device, capability) ⇒ times it came back on within the flap window.
    flap_times: BTreeMap<(usize, String), Vec<u64>>,
}

impl Tally {
    fn result(
        &self,
        engine: &Engine,
        fleet: &[SimDevice],
        ticks: u64,
        tick: u64,
        stabilization_ms: u64,
    ) -> VariantResult {
        let mut res = self.res.clone().unwrap_or_else(|| empty_result(""));
        let hours = ticks as f64 * tick as f64 / 3_600_000.0;
        res.hours = hours.round() as u32;
        res.unit_hours = self.unit_ticks as f64 * tick as f64 / 3_600_000.0;
        res.mean_units = ratio(res.unit_hours, hours);
        res.served_fraction = ratio(res.served_mbit, res.demand_mbit);
        res.well_behaved_served_fraction = ratio(self.served_good, self.demand_good);
        res.served_mbit_per_unit_hour = ratio(res.served_mbit, res.unit_hours);
        let bad: Vec<usize> = (0..fleet.len())
            .filter(|&i| fleet[i].misbehaviour != Misbehaviour::None)
            .collect();
        res.misbehaving_devices = bad.len() as u32;
        res.misbehaving_active = self.bad_since.len() as u32;
        res.misbehaving_lost_quota = self.reaction.len() as u32;
        let mut r: Vec<u32> = self.reaction.values().copied().collect();
        // A device that misbehaved and was never cut counts all its misbehaving reports.
        for (i, &n) in &self.bad_reports {
            if !self.reaction.contains_key(i) {
                r.push(n);
            }
        }
        r.sort_unstable();
        res.reaction_ticks_median = r.get(r.len() / 2).copied().unwrap_or(0);
        res.reaction_ticks_max = r.last().copied().unwrap_or(0);
        res.misbehaving_mean_units_end = if bad.is_empty() {
            0.0
        } else {
            bad.iter()
                .map(|&i| f64::from(fleet[i].units()))
                .sum::<f64>()
                / bad.len() as f64
        };
        res.flaps = 0;
        res.flaps_well_behaved = 0;
        res.preactivations = 0;
        res.preactivation_hits = 0;
        for d in fleet {
            if let Some(st) = engine.device_state(&d.id) {
                for c in &st.feedback.classes {
                    res.preactivations += c.total_predictions;
                    res.preactivation_hits += c.total_hits;
                }
            }
            let f = engine.device_state(&d.id).map_or(0, |s| s.flaps);
            res.flaps += f;
            if d.misbehaviour == Misbehaviour::None {
                res.flaps_well_behaved += f;
            }
        }
        res.max_flaps_per_stabilization = 0;
        res.max_flaps_where.clear();
        for ((i, cap), times) in &self.flap_times {
            if fleet[*i].misbehaviour != Misbehaviour::None {
                continue;
            }
            // The most flaps within any window of one stabilization period.
            let mut lo = 0;
            for hi in 0..times.len() {
                while times[hi] - times[lo] >= stabilization_ms {
                    lo += 1;
                }
                let n = (hi - lo + 1) as u32;
                if n > res.max_flaps_per_stabilization {
                    res.max_flaps_per_stabilization = n;
                    res.max_flaps_where = if n > 1 {
                        format!("{} {cap} at {:?} ms", fleet[*i].id, &times[lo..=hi])
                    } else {
                        String::new()
                    };
                }
            }
        }
        res
    }
}

fn empty_result(name: &str) -> VariantResult {
    VariantResult {
        variant: name.to_owned(),
        hours: 0,
        demand_mbit: 0.0,
        served_mbit: 0.0,
        served_fraction: 0.0,
        well_behaved_served_fraction: 0.0,
        unit_hours: 0.0,
        mean_units: 0.0,
        served_mbit_per_unit_hour: 0.0,
        misbehaving_devices: 0,
        misbehaving_active: 0,
        misbehaving_lost_quota: 0,
        reaction_ticks_median: 0,
        reaction_ticks_max: 0,
        misbehaving_mean_units_end: 0.0,
        flaps: 0,
        flaps_well_behaved: 0,
        max_flaps_per_stabilization: 0,
        max_flaps_where: String::new(),
        unserved_mbit: BTreeMap::new(),
        preactivations: 0,
        preactivation_hits: 0,
        instructions: 0,
        activations: 0,
        events: 0,
    }
}

/// Why a capability a device's demand needs is not active, as a short key.
fn unserved_reason(st: Option<&super::DeviceState>, cap: &str) -> String {
    let Some(st) = st else {
        return "not_enrolled".to_owned();
    };
    use super::Refusal as R;
    let key = match st.refusals.get(cap) {
        Some(R::BorrowRefused { reason, .. }) => {
            return format!("borrow_refused_{reason:?}").to_lowercase()
        }
        Some(R::NotAllowed) => "not_allowed",
        Some(R::Budget { .. }) => "budget",
        Some(R::Capacity { .. }) => "capacity",
        Some(R::Unavailable { .. }) => "unavailable",
        Some(R::Drained) => "drained",
        Some(R::StartFailed { .. }) => "start_failed",
        Some(R::CatalogFailing { .. }) => "catalog_failing",
        Some(R::NoBuild { .. }) => "no_build",
        Some(R::MissingDeviceConfig { .. }) => "missing_device_config",
        None if st.demand.contains_key(cap) => "demanded_not_running",
        None => "not_demanded_yet",
    };
    key.to_owned()
}

/// Runs one variant over the fleet built from `params`: its figures over
/// each of [`HORIZONS_H`] within the run, then over the whole run.
pub fn run_variant_horizons(
    params: &SimParams,
    name: &str,
    features: Features,
) -> Result<Vec<VariantResult>, CatalogError> {
    let catalog = Catalog::from_toml_str(EXAMPLE_CATALOG, "catalog.toml")?;
    let agreements = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog)?;
    let config = sim_config(params, features);
    let stabilization_ms = config.stabilization_ms;
    let flap_window_ms = config.flap_window_ms;
    let mut engine = Engine::new(catalog.clone(), agreements.clone(), config);
    let mut fleet = build_fleet(params);
    let index: BTreeMap<DeviceId, usize> = fleet
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let tick = params.tick_ms;
    let start = 0u64;
    let mut tally = Tally {
        res: Some(empty_result(name)),
        ..Tally::default()
    };
    let apply =
        |engine_out: Vec<Action>, now: u64, fleet: &mut Vec<SimDevice>, tally: &mut Tally| {
            let mut acks = Vec::new();
            for a in engine_out {
                if let Action::Instruct { device, ops, .. } = a {
                    if let Some(&i) = index.get(&device) {
                        let before: BTreeSet<String> = catalog
                            .capabilities
                            .keys()
                            .filter(|c| fleet[i].active_capability(&catalog, c))
                            .cloned()
                            .collect();
                        let res = tally.res.get_or_insert_with(|| empty_result(""));
                        res.instructions += 1;
                        res.activations += fleet[i].apply(&catalog, &ops);
                        let after: BTreeSet<String> = catalog
                            .capabilities
                            .keys()
                            .filter(|c| fleet[i].active_capability(&catalog, c))
                            .cloned()
                            .collect();
                        for c in before.difference(&after) {
                            tally.off_at.insert((i, c.clone()), now);
                        }
                        for c in after.difference(&before) {
                            let back_soon = tally
                                .off_at
                                .get(&(i, c.clone()))
                                .is_some_and(|&t| now.saturating_sub(t) < flap_window_ms);
                            if back_soon {
                                tally
                                    .flap_times
                                    .entry((i, c.clone()))
                                    .or_default()
                                    .push(now);
                            }
                        }
                        acks.push((device, fleet[i].applied_seq));
                    }
                }
            }
            acks
        };
    for d in &fleet {
        engine.handle(
            start,
            Event::Enrolled {
                device: d.id.clone(),
                tier: d.tier.clone(),
                tenant: Some(d.tenant.clone()),
            },
        );
        engine.handle(
            start,
            Event::DeviceConfig {
                device: d.id.clone(),
                config: placeholder_device_config(&catalog),
                changed: BTreeSet::new(),
            },
        );
        if let Some(r) = tally.res.as_mut() {
            r.events += 1;
        }
    }
    let ticks = u64::from(params.hours) * 3_600_000 / tick;
    let checkpoints: Vec<u64> = horizons_of(params.hours)
        .into_iter()
        .map(|h| u64::from(h) * 3_600_000 / tick)
        .collect();
    let mut out = Vec::new();
    let misbehave_from = MISBEHAVE_FROM_H * 3_600_000;
    // Last window's class rates per device (reported at the next tick).
    let mut pending_rates: Vec<Vec<(usize, f64)>> = vec![Vec::new(); fleet.len()];
    for t in 0..=ticks {
        let now = start + t * tick;
        let misbehaving_now = now >= misbehave_from;
        for i in 0..fleet.len() {
            fleet[i].expire(now);
            if t > 0 {
                let d = &mut fleet[i];
                let rates = std::mem::take(&mut pending_rates[i]);
                let running_caps: Vec<String> = catalog
                    .capabilities
                    .keys()
                    .filter(|c| d.active_capability(&catalog, c))
                    .cloned()
                    .collect();
                let served = |need: &QosNeed| {
                    caps_for(&catalog, need)
                        .iter()
                        .all(|c| running_caps.contains(c))
                };
                let bad = misbehaving_now && d.misbehaviour != Misbehaviour::None;
                if bad && d.can_misbehave() {
                    tally.bad_since.entry(i).or_insert(t);
                    *tally.bad_reports.entry(i).or_insert(0) += 1;
                }
                let report = d.report(now - tick, tick, &rates, &served, bad);
                let engine_out = engine.handle(now, Event::Report(report));
                if let Some(r) = tally.res.as_mut() {
                    r.events += 1;
                }
                for (device, seq) in apply(engine_out, now, &mut fleet, &mut tally) {
                    engine.handle(
                        now,
                        Event::Ack {
                            device,
                            seq,
                            outcome: AckOutcome::Applied,
                        },
                    );
                    if let Some(r) = tally.res.as_mut() {
                        r.events += 1;
                    }
                }
            }
        }
        let engine_out = engine.handle(now, Event::Tick);
        if let Some(r) = tally.res.as_mut() {
            r.events += 1;
        }
        for (device, seq) in apply(engine_out, now, &mut fleet, &mut tally) {
            engine.handle(
                now,
                Event::Ack {
                    device,
                    seq,
                    outcome: AckOutcome::Applied,
                },
            );
        }
        if checkpoints.contains(&t) && t > 0 {
            out.push(tally.result(&engine, &fleet, t, tick, stabilization_ms));
        }
        if t == ticks {
            break;
        }
        // The window [now, now + tick): demand and what serves it.
        for (i, d) in fleet.iter_mut().enumerate() {
            let rates = d.rates(now, tick);
            tally.unit_ticks += u64::from(d.units());
            let res = tally.res.get_or_insert_with(|| empty_result(""));
            for &(c, kbps) in &rates {
                let need = d.classes[c].need;
                let caps = caps_for(&catalog, &need);
                if caps.is_empty() {
                    continue;
                }
                let mbit = kbps * tick as f64 / 1_000_000.0;
                res.demand_mbit += mbit;
                let missing = caps.iter().find(|cap| !d.active_capability(&catalog, cap));
                match missing {
                    None => res.served_mbit += mbit,
                    Some(cap) => {
                        let why = unserved_reason(engine.device_state(&d.id), cap);
                        *res.unserved_mbit.entry(why).or_insert(0.0) += mbit;
                    }
                }
                if d.misbehaviour == Misbehaviour::None {
                    tally.demand_good += mbit;
                    if missing.is_none() {
                        tally.served_good += mbit;
                    }
                }
            }
            pending_rates[i] = rates;
            if let (Some(&n), false) = (tally.bad_reports.get(&i), tally.reaction.contains_key(&i))
            {
                if let Some(st) = engine.device_state(&d.id) {
                    let cut = super::reputation::quota_factor(
                        &engine.config().reputation,
                        st.reputation.score,
                    ) < 1.0;
                    if cut {
                        tally.reaction.insert(i, n);
                    }
                }
            }
        }
    }
    if out.is_empty() {
        out.push(tally.result(&engine, &fleet, ticks, tick, stabilization_ms));
    }
    Ok(out)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Capabilities the catalog's rules ask for a need (threshold aside).
fn caps_for(catalog: &Catalog, need: &QosNeed) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in &catalog.rules {
        if r.need.matches(need) {
            for c in &r.capabilities {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
    }
    out
}
