//! The allocation: groups onto servers by the seed's cost function, with
//! hysteresis. Pure: snapshots in, a placement out.
//!
//! ## Objective
//!
//! For a placement `a: group → server`, with `L_g` a group's load (the upper
//! bound of its prediction over the horizon), `U_s` the load on `s` and
//! `C_s` its usable capacity (rated × target utilization):
//!
//! ```text
//! J(a) = Σ_s w_u · U_s² / C_s                                  (remaining capacity, balance)
//!      + Σ_g L_g · ( w_d · dist(region_g, region_a(g))          (proximity)
//!                  + w_h · (1 − health_a(g))                    (health)
//!                  + w_p · (1 − history_a(g)) )                 (historical performance)
//!      + Σ_{g moved} (move_fixed + move_per_load · L_g)          (hysteresis: reconnects)
//! ```
//!
//! subject to `U_s ≤ C_s` for every server (relaxed only when nothing fits:
//! the shortfall). The quadratic term's marginal cost of one more report/s
//! is ≈ 2·w_u·utilization, so load spreads in proportion to capacity and a
//! fuller server costs more; a server `d` away wins once the local servers
//! are about w_d·d/(2·w_u) fuller than it (with the defaults, w_d = 2 and a
//! neighbour at 1: only once the local servers are close to full).
//!
//! ## Algorithm (incremental greedy, then bounded local search)
//!
//! 1. **Keep**: every group whose server is still eligible stays there.
//! 2. **Relieve**: a server over capacity (its groups' upper bounds grew, or
//!    it reported more load than they explain) sheds groups: the smallest
//!    single group that covers the excess, else the largest, repeated.
//! 3. **Place**: groups without a server (new, on a failed server, shed),
//!    largest load first, each to the feasible server of least marginal
//!    cost. If none is feasible, to the *least-bad* server (least overflow,
//!    then least cost), and the overflow is the shortfall.
//! 4. **Improve**: up to `max_improvements_per_run` times, the single move
//!    of one group to a feasible server that lowers `J` most, if it lowers
//!    it at all (the move cost included, so a marginal gain never moves a
//!    group). Groups moved within `min_dwell_ms` are not moved here.
//!
//! Cost is O(G log G + G·S) for steps 1–3 and O(k·G·S) for step 4.
//!
//! **Bound.** Let δ be the largest group load over the smallest usable
//! capacity. If the total load is at most (1 − δ) of the total usable
//! capacity, step 3 places every group without overflow, in any order: if
//! a group `g` did not fit, every server would have less than `L_g ≤ δ·C_s`
//! free, so the load already placed would exceed (1 − δ)·ΣC ≥ total load, a
//! contradiction. (Bin packing is NP-hard, so no greedy does better than a
//! bound of this kind; beyond it a shortfall can be reported while a
//! perfect packing exists.) Step 4 only lowers `J` and never breaks
//! feasibility. Step 3 alone has no approximation bound on `J`: step 4
//! reaches a local optimum under single moves when `k` is large enough.
//!
//! Deterministic: ties break on server and group ids; no clock, no RNG.

use super::config::AssignConfig;
use shardline_shared::assign::{GroupId, Region, ServerId};
use std::collections::BTreeMap;

/// An eligible server for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveServer {
    pub id: ServerId,
    pub region: Region,
    /// Capacity the allocation may fill.
    pub usable: f64,
    pub health: f64,
    pub history: f64,
    /// Load it carries beyond what its groups' predictions explain (from an
    /// overload report), counted against its capacity.
    pub extra: f64,
}

/// A group for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveGroup {
    pub id: GroupId,
    pub region: Region,
    pub load: f64,
    /// Its server before this run (eligible or not).
    pub current: Option<ServerId>,
    /// Moved within the dwell time: not moved for a gain.
    pub pinned: bool,
}

/// One region's shortfall: load beyond usable capacity on the servers that
/// took the groups that did not fit (or the whole load of groups with no
/// eligible server at all).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionShortfall {
    pub region: Region,
    pub shortfall: f64,
    pub groups: Vec<GroupId>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Solution {
    pub placement: BTreeMap<GroupId, ServerId>,
    /// No eligible server at all.
    pub unplaced: Vec<GroupId>,
    pub shortfalls: Vec<RegionShortfall>,
    /// `J` of the placement.
    pub objective: f64,
}

struct Ctx<'a> {
    cfg: &'a AssignConfig,
    servers: &'a [SolveServer],
    groups: &'a [SolveGroup],
    used: Vec<f64>,
    at: Vec<Option<usize>>,
}

impl Ctx<'_> {
    fn cap(&self, s: usize) -> f64 {
        self.servers[s].usable.max(1e-9)
    }

    /// Load-weighted cost of `g` on `s`, move cost included.
    fn static_cost(&self, g: usize, s: usize) -> f64 {
        let (grp, srv, w) = (&self.groups[g], &self.servers[s], &self.cfg.weights);
        let per_load = w.distance * self.cfg.regions.distance(&grp.region, &srv.region)
            + w.health * (1.0 - srv.health)
            + w.history * (1.0 - srv.history);
        let moved = grp.current.as_ref().is_some_and(|c| *c != srv.id);
        let move_cost = if moved {
            self.cfg.move_cost_fixed + self.cfg.move_cost_per_load * grp.load
        } else {
            0.0
        };
        grp.load * per_load + move_cost
    }

    /// Change of the utilization term when `load` is added to `s`.
    fn util_add(&self, s: usize, load: f64) -> f64 {
        let u = self.used[s];
        self.cfg.weights.utilization * ((u + load).powi(2) - u * u) / self.cap(s)
    }

    fn fits(&self, s: usize, load: f64) -> bool {
        self.used[s] + load <= self.servers[s].usable + 1e-9
    }

    fn put(&mut self, g: usize, s: usize) {
        self.used[s] += self.groups[g].load;
        self.at[g] = Some(s);
    }

    fn take(&mut self, g: usize) {
        if let Some(s) = self.at[g].take() {
            self.used[s] -= self.groups[g].load;
        }
    }

    fn objective(&self) -> f64 {
        let util: f64 = (0..self.servers.len())
            .map(|s| self.cfg.weights.utilization * self.used[s].powi(2) / self.cap(s))
            .sum();
        let rest: f64 = (0..self.groups.len())
            .filter_map(|g| self.at[g].map(|s| self.static_cost(g, s)))
            .sum();
        util + rest
    }
}

/// Runs the allocation (module docs).
pub fn solve(cfg: &AssignConfig, servers: &[SolveServer], groups: &[SolveGroup]) -> Solution {
    let index: BTreeMap<&ServerId, usize> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.id, i))
        .collect();
    let mut cx = Ctx {
        cfg,
        servers,
        groups,
        used: servers.iter().map(|s| s.extra.max(0.0)).collect(),
        at: vec![None; groups.len()],
    };
    // 1. Keep.
    for (g, grp) in groups.iter().enumerate() {
        if let Some(&s) = grp.current.as_ref().and_then(|c| index.get(c)) {
            cx.put(g, s);
        }
    }
    // 2. Relieve servers over capacity.
    for (s, srv) in servers.iter().enumerate() {
        loop {
            let excess = cx.used[s] - srv.usable;
            if excess <= 1e-9 {
                break;
            }
            let mut on: Vec<usize> = (0..groups.len()).filter(|&g| cx.at[g] == Some(s)).collect();
            if on.is_empty() {
                break;
            }
            on.sort_by(|&a, &b| {
                groups[a]
                    .load
                    .total_cmp(&groups[b].load)
                    .then_with(|| groups[a].id.cmp(&groups[b].id))
            });
            let shed = on
                .iter()
                .copied()
                .find(|&g| groups[g].load >= excess)
                .unwrap_or(on[on.len() - 1]);
            cx.take(shed);
        }
    }
    // 3. Place, largest first.
    let mut pool: Vec<usize> = (0..groups.len()).filter(|&g| cx.at[g].is_none()).collect();
    pool.sort_by(|&a, &b| {
        groups[b]
            .load
            .total_cmp(&groups[a].load)
            .then_with(|| groups[a].id.cmp(&groups[b].id))
    });
    let mut overflowed: Vec<usize> = Vec::new();
    let mut unplaced = Vec::new();
    for g in pool {
        let load = groups[g].load;
        let cost = |cx: &Ctx<'_>, s: usize| cx.static_cost(g, s) + cx.util_add(s, load);
        let best = (0..servers.len())
            .filter(|&s| cx.fits(s, load))
            .min_by(|&a, &b| cost(&cx, a).total_cmp(&cost(&cx, b)).then(a.cmp(&b)));
        match best {
            Some(s) => cx.put(g, s),
            None => {
                let over = |cx: &Ctx<'_>, s: usize| cx.used[s] + load - servers[s].usable;
                let least_bad = (0..servers.len()).min_by(|&a, &b| {
                    over(&cx, a)
                        .total_cmp(&over(&cx, b))
                        .then(cost(&cx, a).total_cmp(&cost(&cx, b)))
                        .then(a.cmp(&b))
                });
                match least_bad {
                    Some(s) => {
                        cx.put(g, s);
                        overflowed.push(g);
                    }
                    None => unplaced.push(g),
                }
            }
        }
    }
    // 4. Improve by single moves.
    for _ in 0..cfg.max_improvements_per_run {
        let mut best: Option<(f64, usize, usize)> = None;
        for (g, grp) in groups.iter().enumerate() {
            let Some(s) = cx.at[g] else { continue };
            // A group that overflowed may always move to where it fits.
            if grp.pinned && !overflowed.contains(&g) {
                continue;
            }
            let load = grp.load;
            let leave = cfg.weights.utilization
                * (cx.used[s].powi(2) - (cx.used[s] - load).powi(2))
                / cx.cap(s);
            for t in 0..servers.len() {
                if t == s || !cx.fits(t, load) {
                    continue;
                }
                let delta =
                    cx.static_cost(g, t) - cx.static_cost(g, s) + cx.util_add(t, load) - leave;
                if delta < -1e-6 && best.is_none_or(|(d, _, _)| delta < d) {
                    best = Some((delta, g, t));
                }
            }
        }
        let Some((_, g, t)) = best else { break };
        cx.take(g);
        cx.put(g, t);
    }
    // Shortfall: each over-capacity server's excess, shared among the
    // overflowed groups on it by load, by the groups' regions.
    let mut by_region: BTreeMap<Region, (f64, Vec<GroupId>)> = BTreeMap::new();
    for (s, srv) in servers.iter().enumerate() {
        let excess = cx.used[s] - srv.usable;
        let on: Vec<usize> = overflowed
            .iter()
            .copied()
            .filter(|&g| cx.at[g] == Some(s))
            .collect();
        let total: f64 = on.iter().map(|&g| groups[g].load).sum();
        if excess <= 1e-9 || on.is_empty() || total <= 0.0 {
            continue;
        }
        let excess = excess.min(total);
        for g in on {
            let e = by_region.entry(groups[g].region.clone()).or_default();
            e.0 += excess * groups[g].load / total;
            e.1.push(groups[g].id.clone());
        }
    }
    for &g in &unplaced {
        let e = by_region.entry(groups[g].region.clone()).or_default();
        e.0 += groups[g].load;
        e.1.push(groups[g].id.clone());
    }
    let shortfalls = by_region
        .into_iter()
        .map(|(region, (shortfall, mut groups))| {
            groups.sort();
            RegionShortfall {
                region,
                shortfall,
                groups,
            }
        })
        .collect();
    Solution {
        placement: (0..groups.len())
            .filter_map(|g| cx.at[g].map(|s| (groups[g].id.clone(), servers[s].id.clone())))
            .collect(),
        unplaced: unplaced.iter().map(|&g| groups[g].id.clone()).collect(),
        shortfalls,
        objective: cx.objective(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, region: &str, usable: f64) -> SolveServer {
        SolveServer {
            id: ServerId::new(id).unwrap(),
            region: Region::new(region).unwrap(),
            usable,
            health: 1.0,
            history: 1.0,
            extra: 0.0,
        }
    }

    fn group(id: &str, load: f64, current: Option<&str>) -> SolveGroup {
        let id = GroupId::new(id).unwrap();
        SolveGroup {
            region: id.region(),
            id,
            load,
            current: current.map(|c| ServerId::new(c).unwrap()),
            pinned: false,
        }
    }

    fn on(sol: &Solution, g: &str) -> String {
        sol.placement[&GroupId::new(g).unwrap()].to_string()
    }

    #[test]
    fn the_bound_holds_on_random_instances() {
        // Total load ≤ (1 − δ)·ΣC ⇒ no shortfall, whatever the order.
        let cfg = AssignConfig::default();
        let mut rng = crate::policy::prng::SplitMix64::new(11);
        for _ in 0..200 {
            let servers: Vec<SolveServer> = (0..1 + rng.below(6))
                .map(|i| server(&format!("s{i}"), "eu", 50.0 + rng.next_f64() * 150.0))
                .collect();
            let min_c = servers.iter().map(|s| s.usable).fold(f64::MAX, f64::min);
            let total_c: f64 = servers.iter().map(|s| s.usable).sum();
            let delta = 0.1 + rng.next_f64() * 0.4;
            let budget = (1.0 - delta) * total_c;
            let mut groups = Vec::new();
            let mut sum = 0.0;
            loop {
                let l = 1.0 + rng.next_f64() * (delta * min_c - 1.0);
                if sum + l > budget {
                    break;
                }
                sum += l;
                groups.push(group(&format!("t.eu.c{}", groups.len()), l, None));
            }
            let sol = solve(&cfg, &servers, &groups);
            assert!(sol.shortfalls.is_empty(), "{sol:?}");
            assert_eq!(sol.placement.len(), groups.len());
        }
    }

    #[test]
    fn the_smallest_covering_group_is_shed_from_an_overfull_server() {
        // No balancing incentive: only step 2 moves anything here.
        let mut cfg = AssignConfig::default();
        cfg.weights.utilization = 0.0;
        let servers = [server("a", "eu", 100.0), server("b", "eu", 100.0)];
        let groups = [
            group("t.eu.big", 70.0, Some("a")),
            group("t.eu.mid", 25.0, Some("a")),
            group("t.eu.small", 10.0, Some("a")),
        ];
        // 105 on a (usable 100): shedding `small` (10 ≥ 5) moves the least.
        let sol = solve(&cfg, &servers, &groups);
        assert_eq!(on(&sol, "t.eu.small"), "b");
        assert_eq!(on(&sol, "t.eu.big"), "a");
        assert_eq!(on(&sol, "t.eu.mid"), "a");
    }

    #[test]
    fn a_marginal_gain_does_not_move_a_group() {
        let cfg = AssignConfig::default();
        let servers = [server("a", "eu", 100.0), server("b", "eu", 100.0)];
        // 40 + 30 on a, 0 on b: moving 30 gains 2·40·30/100 = 24 > the
        // move cost (1 + 0.3·30 = 10): moves. 10 + 5 on a: moving 5 gains
        // 2·10·5/100 = 1 < 1 + 1.5: stays.
        let sol = solve(
            &cfg,
            &servers,
            &[
                group("t.eu.x", 40.0, Some("a")),
                group("t.eu.y", 30.0, Some("a")),
            ],
        );
        assert_eq!(on(&sol, "t.eu.y"), "b");
        let sol = solve(
            &cfg,
            &servers,
            &[
                group("t.eu.x", 10.0, Some("a")),
                group("t.eu.y", 5.0, Some("a")),
            ],
        );
        assert_eq!(on(&sol, "t.eu.y"), "a");
    }
}
