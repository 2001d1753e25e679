//! Seed 001's assignment engine on simulated time: servers heartbeat with
//! the load their groups put on them, groups report their observed rate
//! each window, the engine is polled every second of simulated time.
//! Devices are modelled by the device-side rules of
//! `shardline_shared::assign` where a test follows the objects end to end.

use shardline_allocator_core::assign::{
    AssignAction, AssignConfig, AssignmentChange, AssignmentEngine, GroupSpec, RegionTable,
    RerunReason, ServerReport,
};
use shardline_allocator_core::policy::prng::SplitMix64;
use shardline_shared::assign::{
    self, AssignmentState, AssignmentVerdict, EndpointSource, GroupId, Region, ServerId,
};
use shardline_shared::msg::KeySet;
use shardline_shared::sign::KeyPair;
use std::collections::{BTreeMap, BTreeSet};

const T0: u64 = 1_780_000_000_000;
const WINDOW: u64 = 60_000;
const HEARTBEAT: u64 = 5_000;

fn sid(s: &str) -> ServerId {
    ServerId::new(s).unwrap()
}

fn gid(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}

fn regions() -> RegionTable {
    RegionTable::neighbours(&[("eu-west", "eu-central"), ("us-east", "us-west")])
}

fn config() -> AssignConfig {
    AssignConfig {
        regions: regions(),
        ..AssignConfig::default()
    }
}

struct SimServer {
    region: &'static str,
    capacity: f64,
    endpoints: Vec<String>,
    alive: bool,
    p99: f64,
}

/// A small world: servers, groups with a rate function, the engine.
struct Sim {
    engine: AssignmentEngine,
    now: u64,
    servers: BTreeMap<ServerId, SimServer>,
    /// Group → (rate now, jitter as a share of it).
    rates: BTreeMap<GroupId, (f64, f64)>,
    rng: SplitMix64,
    actions: Vec<AssignAction>,
    /// Override of a server's reported load (an overload the predictions
    /// do not explain).
    extra_load: BTreeMap<ServerId, f64>,
}

impl Sim {
    fn new(cfg: AssignConfig) -> Self {
        Self {
            engine: AssignmentEngine::new(cfg),
            now: T0,
            servers: BTreeMap::new(),
            rates: BTreeMap::new(),
            rng: SplitMix64::new(42),
            actions: Vec::new(),
            extra_load: BTreeMap::new(),
        }
    }

    fn server(&mut self, id: &str, region: &'static str, capacity: f64) {
        self.servers.insert(
            sid(id),
            SimServer {
                region,
                capacity,
                endpoints: vec![format!("mqtts://{id}.example:8883")],
                alive: true,
                p99: 20.0,
            },
        );
    }

    /// A group with a steady rate (declared as expected too).
    fn group(&mut self, id: &str, rate: f64, jitter: f64) {
        self.rates.insert(gid(id), (rate, jitter));
        self.engine
            .handle_group(
                self.now,
                GroupSpec {
                    id: gid(id),
                    expected_rate: rate,
                },
            )
            .unwrap();
    }

    fn load_on(&self, s: &ServerId) -> f64 {
        let placed: f64 = self
            .rates
            .iter()
            .filter(|(g, _)| self.engine.placement(g).is_some_and(|p| &p.server == s))
            .map(|(_, (r, _))| r)
            .sum();
        placed + self.extra_load.get(s).copied().unwrap_or(0.0)
    }

    /// Advances by `ms` in steps of one second: heartbeats every 5 s,
    /// rates every minute, a poll every second.
    fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 1_000;
            let t = self.now - T0;
            if t % HEARTBEAT == 0 {
                let ids: Vec<ServerId> = self.servers.keys().cloned().collect();
                for id in ids {
                    let s = &self.servers[&id];
                    if !s.alive {
                        continue;
                    }
                    let report = ServerReport {
                        id: id.clone(),
                        region: Region::new(s.region).unwrap(),
                        capacity: s.capacity,
                        endpoints: s.endpoints.clone(),
                        p99_latency_ms: s.p99,
                        error_rate: 0.0,
                        load: self.load_on(&id),
                    };
                    self.engine.handle_server_report(self.now, report).unwrap();
                }
            }
            if t % WINDOW == 0 {
                let groups: Vec<(GroupId, f64, f64)> = self
                    .rates
                    .iter()
                    .map(|(g, (r, j))| (g.clone(), *r, *j))
                    .collect();
                for (g, r, j) in groups {
                    let y = r * (1.0 + j * (self.rng.next_f64() * 2.0 - 1.0));
                    self.engine.handle_group_rate(self.now, &g, y).unwrap();
                }
            }
            let out = self.engine.poll(self.now);
            self.actions.extend(out);
        }
    }

    fn take(&mut self) -> Vec<AssignAction> {
        std::mem::take(&mut self.actions)
    }

    fn on(&self, g: &str) -> String {
        self.engine.placement(&gid(g)).unwrap().server.to_string()
    }

    fn version(&self, g: &str) -> u64 {
        self.engine.assignment(&gid(g)).unwrap().version
    }
}

fn reruns(actions: &[AssignAction]) -> Vec<&shardline_allocator_core::assign::RerunSummary> {
    actions
        .iter()
        .filter_map(|a| match a {
            AssignAction::Rerun(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn shortfalls(
    actions: &[AssignAction],
) -> Vec<&shardline_allocator_core::assign::CapacityShortfall> {
    actions
        .iter()
        .filter_map(|a| match a {
            AssignAction::NeedCapacity(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// eu-west: w1, w2; eu-central (neighbour): c1; us-east (far): u1. Six
/// eu-west groups of 20/s; w1 and w2 can take 80/s each (100 × 0.8).
fn europe() -> Sim {
    let mut sim = Sim::new(config());
    sim.server("w1", "eu-west", 100.0);
    sim.server("w2", "eu-west", 100.0);
    sim.server("c1", "eu-central", 100.0);
    sim.server("u1", "us-east", 1_000.0);
    for i in 0..6 {
        sim.group(&format!("t{i}.eu-west.vpn"), 20.0, 0.02);
    }
    sim.run_for(30 * WINDOW);
    sim
}

#[test]
fn proximity_is_preferred_when_capacity_allows() {
    let sim = europe();
    for i in 0..6 {
        let on = sim.on(&format!("t{i}.eu-west.vpn"));
        assert!(on == "w1" || on == "w2", "t{i} on {on}");
    }
    // One eu-central group lands in eu-central, not on the big far server.
    let mut sim = europe();
    sim.group("t9.eu-central.vpn", 20.0, 0.02);
    sim.run_for(2 * WINDOW);
    assert_eq!(sim.on("t9.eu-central.vpn"), "c1");
    // Loads beyond the region's capacity go to the neighbour before the
    // far region.
    let mut sim = Sim::new(config());
    sim.server("w1", "eu-west", 100.0);
    sim.server("c1", "eu-central", 100.0);
    sim.server("u1", "us-east", 1_000.0);
    for i in 0..6 {
        sim.group(&format!("t{i}.eu-west.vpn"), 20.0, 0.02);
    }
    sim.run_for(30 * WINDOW);
    let on: Vec<String> = (0..6)
        .map(|i| sim.on(&format!("t{i}.eu-west.vpn")))
        .collect();
    assert!(on.iter().all(|s| s != "u1"), "{on:?}");
    assert!(on.iter().any(|s| s == "w1") && on.iter().any(|s| s == "c1"));
}

#[test]
fn a_killed_server_moves_its_groups_within_one_run_to_the_nearest_survivors() {
    let mut sim = europe();
    let before: BTreeMap<String, (String, u64)> = (0..6)
        .map(|i| {
            let g = format!("t{i}.eu-west.vpn");
            (g.clone(), (sim.on(&g), sim.version(&g)))
        })
        .collect();
    let victims: Vec<String> = before
        .iter()
        .filter(|(_, (s, _))| s == "w1")
        .map(|(g, _)| g.clone())
        .collect();
    assert!(!victims.is_empty());
    sim.take();
    sim.servers.get_mut(&sid("w1")).unwrap().alive = false;
    sim.engine.handle_server_down(sim.now, &sid("w1"));
    sim.run_for(1_000); // one poll
    let actions = sim.take();
    let runs = reruns(&actions);
    assert_eq!(runs.len(), 1, "{actions:?}");
    assert!(runs[0]
        .reasons
        .contains(&RerunReason::ServerDown(sid("w1"))));
    assert!(runs[0].unplaced.is_empty());
    for g in &victims {
        let now_on = sim.on(g);
        assert!(now_on == "w2" || now_on == "c1", "{g} moved to {now_on}");
        assert_eq!(sim.version(g), before[g].1 + 1, "{g}");
        assert!(actions.iter().any(|a| matches!(a,
            AssignAction::Publish { assignment, change: AssignmentChange::Moved { from } }
                if assignment.group.as_str() == g && from.as_str() == "w1")));
    }
    // Capacity sufficed: no hook, nobody on the far server.
    assert!(shortfalls(&actions).is_empty());
    for i in 0..6 {
        assert_ne!(sim.on(&format!("t{i}.eu-west.vpn")), "u1");
    }
    // Groups that were not on w1 kept their server and version.
    for (g, (s, v)) in &before {
        if s != "w1" {
            assert_eq!((&sim.on(g), sim.version(g)), (s, *v), "{g}");
        }
    }
}

#[test]
fn a_lost_heartbeat_moves_the_groups_once_the_timeout_passes() {
    let mut sim = europe();
    let timeout = sim.engine.config().heartbeat_timeout_ms;
    sim.take();
    sim.servers.get_mut(&sid("w2")).unwrap().alive = false;
    let stopped = sim.now;
    sim.run_for(timeout + 5_000);
    let actions = sim.take();
    let lost_at = actions
        .iter()
        .position(
            |a| matches!(a, AssignAction::ServerLost { server, .. } if server.as_str() == "w2"),
        )
        .expect("lost");
    let run = reruns(&actions[lost_at..])[0];
    assert!(run.reasons.contains(&RerunReason::ServerLost(sid("w2"))));
    assert!(run.at_ms <= stopped + timeout + HEARTBEAT, "{run:?}");
    for i in 0..6 {
        assert_ne!(sim.on(&format!("t{i}.eu-west.vpn")), "w2");
    }
}

#[test]
fn a_server_whose_own_metrics_turn_bad_loses_its_groups_at_once() {
    let mut sim = europe();
    sim.take();
    let on_w1: Vec<String> = (0..6)
        .map(|i| format!("t{i}.eu-west.vpn"))
        .filter(|g| sim.on(g) == "w1")
        .collect();
    assert!(!on_w1.is_empty());
    // p99 ten times the target: health 0.1, below min_health (0.2).
    sim.servers.get_mut(&sid("w1")).unwrap().p99 = 1_000.0;
    sim.run_for(HEARTBEAT);
    let actions = sim.take();
    let runs = reruns(&actions);
    assert_eq!(runs.len(), 1, "{actions:?}");
    assert!(runs[0].reasons.contains(&RerunReason::Unhealthy(sid("w1"))));
    for g in &on_w1 {
        assert_ne!(sim.on(g), "w1", "{g}");
    }
}

#[test]
fn a_server_whose_group_definitions_differ_gets_no_group_until_they_match() {
    let mut sim = europe();
    sim.take();
    let on_w1: Vec<String> = (0..6)
        .map(|i| format!("t{i}.eu-west.vpn"))
        .filter(|g| sim.on(g) == "w1")
        .collect();
    assert!(!on_w1.is_empty());
    // The lead saw another digest in w1's heartbeat.
    let now = sim.now;
    sim.engine.handle_server_config(now, &sid("w1"), false);
    // Told again (every tick): no second run.
    sim.engine.handle_server_config(now, &sid("w1"), false);
    sim.run_for(1_000);
    let actions = sim.take();
    let runs = reruns(&actions);
    assert_eq!(runs.len(), 1, "{actions:?}");
    assert_eq!(
        runs[0].reasons,
        vec![RerunReason::ConfigMismatch(sid("w1"))],
        "{actions:?}"
    );
    for g in &on_w1 {
        assert_ne!(sim.on(g), "w1", "{g}");
    }
    // Heartbeats alone do not make it eligible again …
    sim.run_for(10 * WINDOW);
    for i in 0..6 {
        assert_ne!(sim.on(&format!("t{i}.eu-west.vpn")), "w1", "t{i}");
    }
    assert!(sim.engine.server(&sid("w1")).unwrap().config_mismatch);
    // … matching again does (it joins like a new server).
    let now = sim.now;
    sim.engine.handle_server_config(now, &sid("w1"), true);
    sim.take();
    sim.run_for(1_000);
    let actions = sim.take();
    assert!(reruns(&actions)
        .iter()
        .any(|r| r.reasons.contains(&RerunReason::ServerJoined(sid("w1")))));
    assert!(!sim.engine.server(&sid("w1")).unwrap().config_mismatch);
    // An unknown server is ignored.
    sim.engine.handle_server_config(now, &sid("nobody"), false);
    assert!(sim.engine.server(&sid("nobody")).is_none());
}

#[test]
fn a_capacity_shortfall_fires_the_hook_and_groups_go_to_the_least_bad_server() {
    let mut sim = Sim::new(config());
    sim.server("w1", "eu-west", 100.0);
    sim.server("w2", "eu-west", 100.0);
    for i in 0..4 {
        sim.group(&format!("t{i}.eu-west.vpn"), 50.0, 0.0);
    }
    sim.run_for(20 * WINDOW);
    sim.take();
    sim.run_for(sim.engine.config().period_ms);
    let actions = sim.take();
    let short = shortfalls(&actions);
    assert_eq!(short.len(), 1, "{actions:?}");
    assert_eq!(short[0].region.as_str(), "eu-west");
    // Four groups of ~55/s (upper bounds) on 2 × 80/s usable: two fit, two
    // overflow; the shortfall is the load beyond usable capacity.
    let loads: f64 = (0..4)
        .map(|i| {
            sim.engine
                .group(&gid(&format!("t{i}.eu-west.vpn")))
                .unwrap()
                .load(sim.engine.config(), sim.now)
        })
        .sum();
    assert!(
        (short[0].shortfall - (loads - 160.0)).abs() < 1e-6,
        "{} vs {}",
        short[0].shortfall,
        loads - 160.0
    );
    assert_eq!(short[0].groups.len(), 2);
    // Every group is served somewhere, two per server (least overflow).
    let mut per: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..4 {
        *per.entry(sim.on(&format!("t{i}.eu-west.vpn"))).or_default() += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 2]);
    // A new server in the region that can take both overflowing groups
    // ends the shortfall at once.
    sim.server("w3", "eu-west", 200.0);
    sim.run_for(HEARTBEAT);
    let actions = sim.take();
    assert!(reruns(&actions)
        .iter()
        .any(|r| r.reasons.contains(&RerunReason::ServerJoined(sid("w3")))));
    assert!(shortfalls(&actions).is_empty(), "{actions:?}");
}

#[test]
fn with_no_eligible_server_the_whole_load_is_the_shortfall_and_devices_fall_back() {
    let mut sim = Sim::new(config());
    sim.server("w1", "eu-west", 100.0);
    sim.group("t0.eu-west.vpn", 30.0, 0.0);
    sim.run_for(5 * WINDOW);
    let published = sim
        .engine
        .assignment(&gid("t0.eu-west.vpn"))
        .unwrap()
        .clone();
    sim.take();
    sim.servers.get_mut(&sid("w1")).unwrap().alive = false;
    sim.engine.handle_server_down(sim.now, &sid("w1"));
    sim.run_for(1_000);
    let actions = sim.take();
    let short = shortfalls(&actions);
    assert_eq!(short.len(), 1);
    let load = sim
        .engine
        .group(&gid("t0.eu-west.vpn"))
        .unwrap()
        .load(sim.engine.config(), sim.now);
    assert!((short[0].shortfall - load).abs() < 1e-9);
    assert_eq!(reruns(&actions)[0].unplaced, vec![gid("t0.eu-west.vpn")]);
    // Nothing new is published for a dead server; the last object expires
    // and the device goes back to its bootstrap endpoint.
    sim.run_for(sim.engine.config().ttl_ms);
    assert!(!sim
        .take()
        .iter()
        .any(|a| matches!(a, AssignAction::Publish { .. })));
    let key = KeyPair::from_seed(&[1; 32]);
    let state = AssignmentState::bootstrap(gid("t0.eu-west.vpn"));
    let boot = vec!["mqtts://bootstrap:8883".to_owned()];
    let d = assign::handle_assignment(
        &state,
        &assign::seal_assignment(&published, &[&key]),
        published.issued_at_ms,
        &KeySet::of(1, &[&key]),
        &boot,
    );
    assert!(matches!(d.verdict, AssignmentVerdict::Accepted { .. }));
    let later = assign::endpoint_at(&d.state, sim.now, &boot);
    assert_eq!(later.urls, boot);
    assert!(matches!(
        later.source,
        EndpointSource::BootstrapExpired { .. }
    ));
}

#[test]
fn a_rate_spike_is_an_anomaly_and_triggers_an_early_run() {
    let mut cfg = config();
    cfg.period_ms = 30 * WINDOW;
    let mut sim = Sim::new(cfg);
    sim.server("w1", "eu-west", 100.0);
    sim.server("w2", "eu-west", 100.0);
    sim.group("t0.eu-west.vpn", 30.0, 0.03);
    sim.group("t1.eu-west.vpn", 30.0, 0.03);
    sim.group("t2.eu-west.vpn", 10.0, 0.03);
    sim.run_for(40 * WINDOW);
    sim.take();
    let spike_on = sim.on("t0.eu-west.vpn");
    let last_run = sim.now;
    sim.rates.get_mut(&gid("t0.eu-west.vpn")).unwrap().0 = 70.0;
    sim.run_for(3 * WINDOW);
    let actions = sim.take();
    let anomaly = actions
        .iter()
        .find_map(|a| match a {
            AssignAction::Anomaly(r) => Some(r),
            _ => None,
        })
        .expect("anomaly");
    assert_eq!(anomaly.group, gid("t0.eu-west.vpn"));
    assert_eq!(anomaly.windows, 3);
    let runs = reruns(&actions);
    assert_eq!(runs.len(), 1);
    assert!(runs[0]
        .reasons
        .contains(&RerunReason::Anomaly(gid("t0.eu-west.vpn"))));
    assert!(runs[0].at_ms < last_run + sim.engine.config().period_ms);
    // ~77/s reserved for the spiking group: it no longer shares a server.
    let p = sim
        .engine
        .prediction(&gid("t0.eu-west.vpn"), sim.now)
        .unwrap();
    assert!(p.mean > 65.0, "{p:?}");
    let others_with_it = ["t1.eu-west.vpn", "t2.eu-west.vpn"]
        .iter()
        .filter(|g| sim.on(g) == sim.on("t0.eu-west.vpn"))
        .count();
    assert_eq!(others_with_it, 0, "spike was on {spike_on}");
}

#[test]
fn stable_jittered_load_does_not_churn() {
    let mut sim = Sim::new(config());
    for (id, region) in [
        ("w1", "eu-west"),
        ("w2", "eu-west"),
        ("c1", "eu-central"),
        ("u1", "us-east"),
        ("u2", "us-west"),
    ] {
        sim.server(id, region, 200.0);
    }
    let regions = ["eu-west", "eu-central", "us-east", "us-west"];
    let mut rng = SplitMix64::new(5);
    for i in 0..24 {
        let rate = 5.0 + rng.next_f64() * 25.0;
        sim.group(&format!("t{i}.{}.vpn", regions[i % 4]), rate, 0.08);
    }
    sim.run_for(5 * WINDOW);
    let mut last: BTreeMap<GroupId, ServerId> = sim
        .engine
        .groups()
        .map(|g| {
            (
                g.id.clone(),
                sim.engine.placement(&g.id).unwrap().server.clone(),
            )
        })
        .collect();
    let versions: BTreeMap<GroupId, u64> = last
        .keys()
        .map(|g| (g.clone(), sim.engine.assignment(g).unwrap().version))
        .collect();
    sim.take();
    // 3 hours, a run a minute: 180 periods of ±8 % jitter.
    let mut moves: BTreeMap<GroupId, u32> = BTreeMap::new();
    let mut runs = 0;
    for _ in 0..180 {
        sim.run_for(WINDOW);
        runs += reruns(&sim.take()).len();
        for (g, s) in last.iter_mut() {
            let now = &sim.engine.placement(g).unwrap().server;
            if now != s {
                *moves.entry(g.clone()).or_default() += 1;
                *s = now.clone();
            }
        }
    }
    assert!(runs >= 180, "{runs} runs");
    assert!(moves.values().all(|&m| m <= 1), "{moves:?}");
    // Versions moved only with the moves; renewals kept them.
    for g in sim.engine.groups() {
        let v = sim.engine.assignment(&g.id).unwrap().version;
        let moved = u64::from(moves.get(&g.id).copied().unwrap_or(0));
        assert_eq!(v, versions[&g.id] + moved);
    }
}

#[test]
fn a_group_whose_upper_bound_does_not_fit_a_server_is_not_put_there() {
    // w1 can take 80/s; c1 (neighbour) 800/s. A steady 70/s group fits w1
    // (upper ≈ 77); a noisy 55/s group, lower mean, does not (upper > 80).
    let place = |rate: f64, jitter: f64| {
        let mut sim = Sim::new(config());
        sim.group("t0.eu-west.vpn", rate, jitter);
        // The group's rate is learnt first (no server yet), then placed.
        sim.run_for(60 * WINDOW);
        sim.server("w1", "eu-west", 100.0);
        sim.server("c1", "eu-central", 1_000.0);
        sim.run_for(HEARTBEAT);
        let p = sim
            .engine
            .prediction(&gid("t0.eu-west.vpn"), sim.now)
            .unwrap();
        (sim.on("t0.eu-west.vpn"), p)
    };
    let (steady_on, p) = place(70.0, 0.0);
    assert!(p.peak_upper < 80.0, "{p:?}");
    assert_eq!(steady_on, "w1");
    let (noisy_on, p) = place(55.0, 0.5);
    assert!(p.mean < 80.0 && p.peak_upper > 80.0, "{p:?}");
    assert_eq!(noisy_on, "c1");
}

#[test]
fn an_overload_report_sheds_groups_at_once() {
    let mut cfg = config();
    cfg.period_ms = 60 * WINDOW;
    let mut sim = Sim::new(cfg);
    sim.server("w1", "eu-west", 100.0);
    sim.server("w2", "eu-west", 100.0);
    for i in 0..4 {
        sim.group(&format!("t{i}.eu-west.vpn"), 15.0, 0.0);
    }
    sim.run_for(10 * WINDOW);
    sim.take();
    // Something the predictions do not see doubles w1's load past capacity.
    sim.extra_load.insert(sid("w1"), 80.0);
    let before: Vec<String> = (0..4)
        .map(|i| sim.on(&format!("t{i}.eu-west.vpn")))
        .collect();
    sim.run_for(HEARTBEAT);
    let actions = sim.take();
    assert!(actions
        .iter()
        .any(|a| matches!(a, AssignAction::Overloaded { server, .. } if server.as_str() == "w1")));
    let runs = reruns(&actions);
    assert_eq!(runs.len(), 1);
    assert!(runs[0].reasons.contains(&RerunReason::Overload(sid("w1"))));
    let after: Vec<String> = (0..4)
        .map(|i| sim.on(&format!("t{i}.eu-west.vpn")))
        .collect();
    assert!(before.iter().any(|s| s == "w1"), "{before:?}");
    assert!(after.iter().all(|s| s == "w2"), "{before:?} → {after:?}");
}

#[test]
fn versions_bump_with_endpoints_and_devices_follow_every_object() {
    let mut sim = europe();
    let g = gid("t0.eu-west.vpn");
    let key = KeyPair::from_seed(&[1; 32]);
    let keys = KeySet::of(1, &[&key]);
    let boot = vec!["mqtts://bootstrap:8883".to_owned()];
    let mut device = AssignmentState::bootstrap(g.clone());
    let feed = |device: &mut AssignmentState, actions: &[AssignAction], now: u64| {
        for a in actions {
            if let AssignAction::Publish { assignment, .. } = a {
                if assignment.group == g {
                    let bytes = assign::seal_assignment(assignment, &[&key]);
                    let d = assign::handle_assignment(device, &bytes, now, &keys, &boot);
                    assert!(
                        !matches!(d.verdict, AssignmentVerdict::Refused(_)),
                        "{:?}",
                        d.verdict
                    );
                    *device = d.state;
                }
            }
        }
    };
    // The objects so far, then a move of its server's endpoints.
    let first = sim.engine.assignment(&g).unwrap().clone();
    let home = first.server.clone();
    feed(
        &mut device,
        &[AssignAction::Publish {
            assignment: first.clone(),
            change: AssignmentChange::New,
        }],
        sim.now,
    );
    sim.take();
    sim.servers.get_mut(&home).unwrap().endpoints = vec!["mqtts://new.example:8883".into()];
    sim.run_for(HEARTBEAT);
    let actions = sim.take();
    let change = actions.iter().find_map(|a| match a {
        AssignAction::Publish { assignment, change } if assignment.group == g => {
            Some((assignment.clone(), change.clone()))
        }
        _ => None,
    });
    let (a, change) = change.expect("republished");
    assert_eq!(change, AssignmentChange::EndpointsChanged);
    assert_eq!(a.version, first.version + 1);
    assert_eq!(a.expires_at_ms, a.issued_at_ms + sim.engine.config().ttl_ms);
    feed(&mut device, &actions, sim.now);
    assert_eq!(
        assign::endpoint_at(&device, sim.now, &boot).urls,
        vec!["mqtts://new.example:8883"]
    );
    // Renewals keep the version and the device's routing alive past the
    // first object's expiry.
    let ttl = sim.engine.config().ttl_ms;
    let mut renewed = 0;
    for _ in 0..(2 * ttl / WINDOW) {
        sim.run_for(WINDOW);
        let actions = sim.take();
        renewed += actions
            .iter()
            .filter(|a| matches!(a, AssignAction::Publish { assignment, change: AssignmentChange::Renewed } if assignment.group == g))
            .count();
        feed(&mut device, &actions, sim.now);
        let e = assign::endpoint_at(&device, sim.now, &boot);
        assert!(matches!(e.source, EndpointSource::Assigned { .. }), "{e:?}");
    }
    assert!(renewed >= 3, "{renewed}");
    assert_eq!(sim.engine.assignment(&g).unwrap().version, a.version);
    // A kill moves it; the device follows to the new version.
    sim.servers.get_mut(&home).unwrap().alive = false;
    sim.engine.handle_server_down(sim.now, &home);
    sim.run_for(1_000);
    let actions = sim.take();
    feed(&mut device, &actions, sim.now);
    let e = assign::endpoint_at(&device, sim.now, &boot);
    match e.source {
        EndpointSource::Assigned { version, server } => {
            assert_eq!(version, a.version + 1);
            assert_ne!(server, home);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_same_inputs_give_the_same_actions() {
    let run = || {
        let mut sim = europe();
        sim.servers.get_mut(&sid("w1")).unwrap().alive = false;
        sim.engine.handle_server_down(sim.now, &sid("w1"));
        sim.run_for(10 * WINDOW);
        format!("{:?}", sim.take())
    };
    assert_eq!(run(), run());
}

#[test]
fn next_timeout_names_the_next_thing_to_do() {
    let mut sim = europe();
    sim.take();
    let next = sim.engine.next_timeout().unwrap();
    assert!(next > sim.now && next <= sim.now + sim.engine.config().period_ms);
    // Nothing happens before it without input.
    let mut engine = sim.engine.clone();
    let quiet: Vec<AssignAction> = engine.poll(next - 1);
    assert!(quiet.is_empty(), "{quiet:?}");
}

#[test]
fn every_endpoint_shared_accepts_the_broker_url_parser_accepts() {
    let mut rng = SplitMix64::new(3);
    let alphabet: Vec<char> = "ab1.-:[]/@".chars().collect();
    let mut accepted = BTreeSet::new();
    for i in 0..20_000 {
        let len = 1 + rng.below(12) as usize;
        let host: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
            .collect();
        let scheme = if i % 2 == 0 { "mqtt" } else { "mqtts" };
        let url = format!("{scheme}://{host}");
        if assign::check_endpoint(&url).is_ok() {
            assert!(
                shardline_support::broker_url::BrokerUrl::parse(&url).is_ok(),
                "{url}"
            );
            accepted.insert(url);
        }
    }
    assert!(accepted.len() > 100, "{}", accepted.len());
}

// ------------------------------------------------------------ properties

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Input {
        Heartbeat {
            server: usize,
            load: f64,
            p99: f64,
            moved_endpoint: bool,
        },
        Down(usize),
        Rate(usize, f64),
        Wait,
    }

    fn input() -> impl Strategy<Value = (u64, Input)> {
        let i = prop_oneof![
            4 => (0usize..4, 0.0f64..300.0, 5.0f64..400.0, proptest::bool::weighted(0.05))
                .prop_map(|(server, load, p99, moved_endpoint)| Input::Heartbeat {
                    server, load, p99, moved_endpoint
                }),
            1 => (0usize..4).prop_map(Input::Down),
            4 => (0usize..8, 0.0f64..120.0).prop_map(|(g, r)| Input::Rate(g, r)),
            1 => Just(Input::Wait),
        ];
        (0u64..40_000, i)
    }

    const REGIONS: [&str; 4] = ["eu-west", "eu-central", "us-east", "eu-west"];

    fn drive(inputs: &[(u64, Input)]) -> Vec<(u64, Vec<AssignAction>)> {
        let mut e = AssignmentEngine::new(config());
        let mut now = T0;
        for g in 0..8 {
            let id = gid(&format!("t{g}.{}.vpn", REGIONS[g % 3]));
            e.handle_group(
                now,
                GroupSpec {
                    id,
                    expected_rate: 10.0 + g as f64 * 5.0,
                },
            )
            .unwrap();
        }
        let mut out = Vec::new();
        for (dt, input) in inputs {
            now += dt;
            match input {
                Input::Heartbeat {
                    server,
                    load,
                    p99,
                    moved_endpoint,
                } => {
                    let port = if *moved_endpoint { 8884 } else { 8883 };
                    e.handle_server_report(
                        now,
                        ServerReport {
                            id: sid(&format!("s{server}")),
                            region: Region::new(REGIONS[*server]).unwrap(),
                            capacity: 100.0 + 50.0 * *server as f64,
                            endpoints: vec![format!("mqtts://s{server}:{port}")],
                            p99_latency_ms: *p99,
                            error_rate: 0.0,
                            load: *load,
                        },
                    )
                    .unwrap();
                }
                Input::Down(s) => e.handle_server_down(now, &sid(&format!("s{s}"))),
                Input::Rate(g, r) => {
                    let id = gid(&format!("t{g}.{}.vpn", REGIONS[g % 3]));
                    e.handle_group_rate(now, &id, *r).unwrap();
                }
                Input::Wait => {}
            }
            let actions = e.poll(now);
            // Checked against the engine right after the poll.
            for a in &actions {
                if let AssignAction::Publish { assignment, .. } = a {
                    let s = e.server(&assignment.server).unwrap();
                    assert!(s.eligible(e.config(), now), "published for {s:?}");
                }
            }
            out.push((now, actions));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever happens: the same inputs give the same actions; a
        /// version goes up by one exactly when server or endpoints change
        /// and a renewal keeps it; every object lives exactly the TTL from
        /// its issue; a run reports a shortfall whenever it leaves a group
        /// without a server.
        #[test]
        fn assignments_are_versioned_deterministic_and_accounted(
            inputs in proptest::collection::vec(input(), 1..80),
        ) {
            let a = drive(&inputs);
            let b = drive(&inputs);
            prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
            let ttl = config().ttl_ms;
            let mut last: BTreeMap<GroupId, shardline_shared::assign::Assignment> =
                BTreeMap::new();
            for (now, actions) in &a {
                for act in actions {
                    match act {
                        AssignAction::Publish { assignment: x, change } => {
                            prop_assert_eq!(x.issued_at_ms, *now);
                            prop_assert_eq!(x.expires_at_ms, now + ttl);
                            prop_assert!(x.validate().is_ok());
                            match (last.get(&x.group), change) {
                                (None, AssignmentChange::New) => prop_assert_eq!(x.version, 1),
                                (Some(p), AssignmentChange::Renewed) => {
                                    prop_assert!(p.same_routing(x));
                                }
                                (Some(p), AssignmentChange::Moved { from }) => {
                                    prop_assert_eq!(&p.server, from);
                                    prop_assert_ne!(&p.server, &x.server);
                                    prop_assert_eq!(x.version, p.version + 1);
                                }
                                (Some(p), AssignmentChange::EndpointsChanged) => {
                                    prop_assert_eq!(&p.server, &x.server);
                                    prop_assert!(p.endpoints != x.endpoints || p.region != x.region);
                                    prop_assert_eq!(x.version, p.version + 1);
                                }
                                (p, c) => prop_assert!(false, "{c:?} after {p:?}"),
                            }
                            last.insert(x.group.clone(), x.clone());
                        }
                        AssignAction::Rerun(r) => {
                            for g in &r.unplaced {
                                prop_assert!(actions.iter().any(|a| matches!(a,
                                    AssignAction::NeedCapacity(s) if s.groups.contains(g))),
                                    "{g} unplaced without a shortfall");
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
