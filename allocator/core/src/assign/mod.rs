//! Seed 001's assignment: groups of devices (tenant × region × capability)
//! onto allocator servers by predicted load, capacity, proximity, health and
//! history; the output is the versioned, expiring assignment objects
//! (`shardline_shared::assign::Assignment`) the service will sign and
//! publish.
//!
//! Sans-IO in the quinn-proto style: [`AssignmentEngine::new`], `handle_*`
//! for inputs (server heartbeats with metrics, servers going down, groups
//! and their observed rates), [`AssignmentEngine::poll`] for outputs
//! ([`AssignAction`]), [`AssignmentEngine::next_timeout`] for when to poll
//! again. No clock (`now_ms` is an argument), no I/O, no randomness; BTreeMap
//! order and id tie-breaks make it deterministic: the same inputs at the same
//! times give the same actions.
//!
//! - [`config`]: tunables and the region-distance table.
//! - [`server`]: servers, their health (latency, errors, heartbeat age) and
//!   performance history.
//! - [`group`]: groups and their prediction (Holt short term + daily
//!   Holt-Winters, reused from `policy`), prediction interval, anomalies.
//! - [`solve`]: the cost function and the allocation algorithm (incremental
//!   greedy + bounded local search, with hysteresis; the bound is stated
//!   there).
//!
//! Invariants:
//! - A run happens at the first poll, every `period_ms`, and at the next poll
//!   after a server goes down, is lost (heartbeat timeout), joins, becomes
//!   overloaded or unhealthy (its own metrics put its health below
//!   `min_health`), or a group's rate is anomalous or a group is
//!   added/removed.
//! - A group's version increases exactly when its server or endpoints change
//!   (1 for its first assignment); an unchanged assignment is re-issued under
//!   the same version with a later issue time and expiry (`renew_fraction`
//!   into its lifetime). Expiry is always issue time + `ttl_ms`.
//! - Nothing is published for a server that is not eligible: a group with no
//!   eligible server keeps its last object until it expires (its devices then
//!   use their bootstrap endpoints) and is reported in
//!   [`AssignAction::NeedCapacity`].
//! - When no server fits a group, the decision says so:
//!   [`AssignAction::NeedCapacity`] per region with the shortfall in
//!   reports/s, and the group goes to the least-bad server.
//!
//! Wired by the service (`allocator/src/service/assign_driver.rs`): the
//! instance holding the store's lead drives it, seals, persists and then
//! publishes its objects, exports the shortfall, and restores the persisted
//! versions with [`AssignmentEngine::restore_assignment`] when it takes the
//! lead, so versions never go back.

pub mod config;
pub mod group;
pub mod server;
pub mod solve;

pub use config::{AnomalyConfig, AssignConfig, CostWeights, GroupForecastConfig, RegionTable};
pub use group::{AnomalyReport, Group, GroupSpec, Prediction, TimeWindow};
pub use server::{InputError, Server, ServerReport};

use serde::{Deserialize, Serialize};
use shardline_shared::assign::{Assignment, GroupId, Region, ServerId};
use solve::{SolveGroup, SolveServer};
use std::collections::BTreeMap;

/// Why a run happened.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RerunReason {
    Initial,
    Periodic,
    ServerJoined(ServerId),
    ServerDown(ServerId),
    ServerLost(ServerId),
    Overload(ServerId),
    Anomaly(GroupId),
    GroupAdded(GroupId),
    GroupRemoved(GroupId),
    /// Its own metrics put its health below `min_health`.
    Unhealthy(ServerId),
    /// Its group definitions differ from the lead's
    /// ([`AssignmentEngine::handle_server_config`]). Last, so stored
    /// reasons written before it still decode.
    ConfigMismatch(ServerId),
}

/// What changed in a published object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignmentChange {
    /// The group's first assignment.
    New,
    /// Another server.
    Moved { from: ServerId },
    /// The same server, other endpoints.
    EndpointsChanged,
    /// Unchanged, re-issued with a later expiry (same version).
    Renewed,
    /// Never emitted by the engine: the service's record that the group
    /// was taken out of the configuration and its object withdrawn (the
    /// retained copy cleared). Last, so stored records keep their encoding.
    Withdrawn,
}

/// The "need more capacity" hook: groups of `region` did not fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityShortfall {
    pub at_ms: u64,
    pub region: Region,
    /// Reports/s beyond usable capacity (on the least-bad servers), plus the
    /// whole load of groups with no eligible server.
    pub shortfall: f64,
    pub groups: Vec<GroupId>,
}

/// One run's outcome, for the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerunSummary {
    pub at_ms: u64,
    pub reasons: Vec<RerunReason>,
    pub groups: usize,
    pub servers: usize,
    /// (group, previous server, new server).
    pub moved: Vec<(GroupId, Option<ServerId>, ServerId)>,
    /// Groups with no eligible server at all.
    pub unplaced: Vec<GroupId>,
    pub objective: f64,
}

/// What the service carries out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AssignAction {
    /// Sign (`shared::assign::seal_assignment`) and publish.
    Publish {
        assignment: Assignment,
        change: AssignmentChange,
    },
    /// Log, and export as a metric: more capacity is needed in `region`.
    NeedCapacity(CapacityShortfall),
    /// A group's rate left its prediction interval (a re-run follows).
    Anomaly(AnomalyReport),
    /// A server's heartbeat timed out (its groups move in the same poll).
    ServerLost {
        server: ServerId,
        last_heartbeat_ms: u64,
    },
    /// A server reported load over its capacity.
    Overloaded {
        server: ServerId,
        load: f64,
        capacity: f64,
    },
    Rerun(RerunSummary),
}

/// Where a group is and what was last published for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub server: ServerId,
    /// When it last moved (dwell time).
    pub moved_at_ms: u64,
}

/// The assignment engine (module docs).
#[derive(Debug, Clone)]
pub struct AssignmentEngine {
    config: AssignConfig,
    servers: BTreeMap<ServerId, Server>,
    groups: BTreeMap<GroupId, Group>,
    placements: BTreeMap<GroupId, Placement>,
    published: BTreeMap<GroupId, Assignment>,
    last_run_ms: Option<u64>,
    pending: Vec<RerunReason>,
    out: Vec<AssignAction>,
}

impl AssignmentEngine {
    pub fn new(config: AssignConfig) -> Self {
        Self {
            config,
            servers: BTreeMap::new(),
            groups: BTreeMap::new(),
            placements: BTreeMap::new(),
            published: BTreeMap::new(),
            last_run_ms: None,
            pending: Vec::new(),
            out: Vec::new(),
        }
    }

    pub fn config(&self) -> &AssignConfig {
        &self.config
    }

    /// A heartbeat with the server's metrics. A new (or revived) server
    /// triggers a run; so does the onset of an overload.
    pub fn handle_server_report(&mut self, now: u64, r: ServerReport) -> Result<(), InputError> {
        r.check()?;
        let carrying = self.placements.values().any(|p| p.server == r.id);
        match self.servers.get_mut(&r.id) {
            Some(s) => {
                let revived = s.down || s.lost;
                let was_eligible = s.eligible(&self.config, now);
                let overloaded = s.heartbeat(&self.config, &r, now, carrying);
                if revived {
                    self.pending.push(RerunReason::ServerJoined(r.id.clone()));
                } else if was_eligible && !s.eligible(&self.config, now) {
                    self.pending.push(RerunReason::Unhealthy(r.id.clone()));
                }
                if overloaded {
                    self.out.push(AssignAction::Overloaded {
                        server: r.id.clone(),
                        load: r.load,
                        capacity: r.capacity,
                    });
                    self.pending.push(RerunReason::Overload(r.id.clone()));
                }
            }
            None => {
                let mut s = Server::new(&self.config, &r, now);
                s.heartbeat(&self.config, &r, now, false);
                self.servers.insert(r.id.clone(), s);
                self.pending.push(RerunReason::ServerJoined(r.id));
            }
        }
        Ok(())
    }

    /// A server is down (its process died, an operator drained it): health
    /// 0 until its next heartbeat; its groups move at the next poll.
    pub fn handle_server_down(&mut self, _now: u64, id: &ServerId) {
        if let Some(s) = self.servers.get_mut(id) {
            if !s.down {
                s.down = true;
                self.pending.push(RerunReason::ServerDown(id.clone()));
            }
        }
    }

    /// Whether a server's group definitions match the lead's (the driver
    /// compares digests carried by the heartbeats; the engine only takes
    /// the verdict). A server that does not match is not eligible — it
    /// may not even know the groups it would be given — so its groups move
    /// at the next poll; matching again, it is eligible again. Unknown
    /// servers are ignored (feed the heartbeat first).
    pub fn handle_server_config(&mut self, _now: u64, id: &ServerId, matches: bool) {
        if let Some(s) = self.servers.get_mut(id) {
            if s.config_mismatch == matches {
                s.config_mismatch = !matches;
                self.pending.push(if matches {
                    RerunReason::ServerJoined(id.clone())
                } else {
                    RerunReason::ConfigMismatch(id.clone())
                });
            }
        }
    }

    /// Declares a group (or updates its expected rate).
    pub fn handle_group(&mut self, _now: u64, spec: GroupSpec) -> Result<(), InputError> {
        if !spec.expected_rate.is_finite() || spec.expected_rate < 0.0 {
            return Err(InputError::Group {
                group: spec.id.to_string(),
                reason: format!("expected rate {}", spec.expected_rate),
            });
        }
        match self.groups.get_mut(&spec.id) {
            Some(g) => g.expected_rate = spec.expected_rate,
            None => {
                self.groups
                    .insert(spec.id.clone(), Group::new(&self.config, &spec));
                self.pending.push(RerunReason::GroupAdded(spec.id));
            }
        }
        Ok(())
    }

    /// Forgets a group (its last object expires on its own).
    pub fn handle_group_removed(&mut self, _now: u64, id: &GroupId) {
        if self.groups.remove(id).is_some() {
            self.placements.remove(id);
            self.published.remove(id);
            self.pending.push(RerunReason::GroupRemoved(id.clone()));
        }
    }

    /// One observation window's request rate of a group (reports/s). An
    /// anomaly is reported and triggers a run at the next poll.
    pub fn handle_group_rate(
        &mut self,
        now: u64,
        id: &GroupId,
        rate: f64,
    ) -> Result<(), InputError> {
        let Some(g) = self.groups.get_mut(id) else {
            return Err(InputError::Group {
                group: id.to_string(),
                reason: "unknown group".into(),
            });
        };
        if let Some(a) = g.observe(&self.config, now, rate) {
            self.pending.push(RerunReason::Anomaly(id.clone()));
            self.out.push(AssignAction::Anomaly(a));
        }
        Ok(())
    }

    /// Restores what was published before a restart (from the store), so
    /// versions continue from there. The group must be declared first.
    pub fn restore_assignment(&mut self, a: Assignment) {
        if self.groups.contains_key(&a.group) {
            self.placements.insert(
                a.group.clone(),
                Placement {
                    server: a.server.clone(),
                    moved_at_ms: a.issued_at_ms,
                },
            );
            self.published.insert(a.group.clone(), a);
        }
    }

    /// Runs what is due at `now` and returns the actions since the last
    /// poll: server losses, a run if one is due, then what to publish.
    pub fn poll(&mut self, now: u64) -> Vec<AssignAction> {
        let cfg = &self.config;
        for s in self.servers.values_mut() {
            if !s.down && !s.lost && s.timed_out(cfg, now) {
                s.lost = true;
                self.out.push(AssignAction::ServerLost {
                    server: s.id.clone(),
                    last_heartbeat_ms: s.last_heartbeat_ms,
                });
                self.pending.push(RerunReason::ServerLost(s.id.clone()));
            }
        }
        let mut reasons = std::mem::take(&mut self.pending);
        match self.last_run_ms {
            None => reasons.insert(0, RerunReason::Initial),
            Some(t) if now >= t.saturating_add(cfg.period_ms) => {
                reasons.insert(0, RerunReason::Periodic)
            }
            _ => {}
        }
        // With no group there is nothing to place: the first run waits.
        if !reasons.is_empty() && !self.groups.is_empty() {
            reasons.sort();
            reasons.dedup();
            self.run(now, reasons);
        }
        self.publish(now);
        std::mem::take(&mut self.out)
    }

    /// The next time `poll` has something to do without new input: the
    /// periodic run, a heartbeat timeout or a renewal.
    pub fn next_timeout(&self) -> Option<u64> {
        let cfg = &self.config;
        let run = self.last_run_ms.map(|t| t.saturating_add(cfg.period_ms));
        let lost = self
            .servers
            .values()
            .filter(|s| !s.down && !s.lost)
            .map(|s| s.last_heartbeat_ms.saturating_add(cfg.heartbeat_timeout_ms));
        let renew = self.published.values().map(|a| self.renew_at(a));
        run.into_iter().chain(lost).chain(renew).min()
    }

    fn renew_at(&self, a: &Assignment) -> u64 {
        let life = a.expires_at_ms.saturating_sub(a.issued_at_ms) as f64;
        a.issued_at_ms
            .saturating_add((life * self.config.renew_fraction.clamp(0.0, 1.0)) as u64)
    }

    fn run(&mut self, now: u64, reasons: Vec<RerunReason>) {
        let cfg = &self.config;
        let loads: BTreeMap<&GroupId, f64> = self
            .groups
            .iter()
            .map(|(id, g)| (id, g.load(cfg, now)))
            .collect();
        let servers: Vec<SolveServer> = self
            .servers
            .values()
            .filter(|s| s.eligible(cfg, now))
            .map(|s| {
                // An overload report read after its groups settled: the load
                // the predictions do not explain counts against capacity.
                let explained: f64 = self
                    .placements
                    .iter()
                    .filter(|(_, p)| p.server == s.id)
                    .filter_map(|(g, _)| loads.get(g))
                    .sum();
                let settled =
                    s.last_heartbeat_ms >= s.changed_at_ms.saturating_add(cfg.overload_settle_ms);
                let extra = if s.overloaded && settled {
                    (s.load - explained).max(0.0)
                } else {
                    0.0
                };
                SolveServer {
                    id: s.id.clone(),
                    region: s.region.clone(),
                    usable: s.usable(cfg),
                    health: s.health(cfg, now),
                    history: s.history,
                    extra,
                }
            })
            .collect();
        let groups: Vec<SolveGroup> = self
            .groups
            .values()
            .map(|g| {
                let placed = self.placements.get(&g.id);
                SolveGroup {
                    id: g.id.clone(),
                    region: g.region.clone(),
                    load: loads[&g.id],
                    current: placed.map(|p| p.server.clone()),
                    pinned: placed
                        .is_some_and(|p| now < p.moved_at_ms.saturating_add(cfg.min_dwell_ms)),
                }
            })
            .collect();
        let sol = solve::solve(cfg, &servers, &groups);
        let mut moved = Vec::new();
        for (g, to) in &sol.placement {
            let from = self.placements.get(g).map(|p| p.server.clone());
            if from.as_ref() == Some(to) {
                continue;
            }
            for s in from.iter().chain(std::iter::once(to)) {
                if let Some(srv) = self.servers.get_mut(s) {
                    srv.changed_at_ms = now;
                }
            }
            self.placements.insert(
                g.clone(),
                Placement {
                    server: to.clone(),
                    moved_at_ms: now,
                },
            );
            moved.push((g.clone(), from, to.clone()));
        }
        for s in sol.shortfalls {
            self.out.push(AssignAction::NeedCapacity(CapacityShortfall {
                at_ms: now,
                region: s.region,
                shortfall: s.shortfall,
                groups: s.groups,
            }));
        }
        self.out.push(AssignAction::Rerun(RerunSummary {
            at_ms: now,
            reasons,
            groups: self.groups.len(),
            servers: servers.len(),
            moved,
            unplaced: sol.unplaced,
            objective: sol.objective,
        }));
        self.last_run_ms = Some(now);
    }

    /// New versions where server or endpoints changed, renewals where due;
    /// nothing for a group whose server is not eligible.
    fn publish(&mut self, now: u64) {
        let cfg = &self.config;
        let mut issued = Vec::new();
        for (gid, p) in &self.placements {
            let Some(server) = self.servers.get(&p.server) else {
                continue;
            };
            if !server.eligible(cfg, now) {
                continue;
            }
            let prev = self.published.get(gid);
            let change = match prev {
                None => AssignmentChange::New,
                Some(a) if a.server != server.id => AssignmentChange::Moved {
                    from: a.server.clone(),
                },
                Some(a) if a.endpoints != server.endpoints || a.region != server.region => {
                    AssignmentChange::EndpointsChanged
                }
                Some(a) if now >= self.renew_at(a) => AssignmentChange::Renewed,
                Some(_) => continue,
            };
            let version = match (&change, prev) {
                (AssignmentChange::Renewed, Some(a)) => a.version,
                (_, Some(a)) => a.version.saturating_add(1),
                (_, None) => 1,
            };
            let assignment = Assignment {
                group: gid.clone(),
                version,
                issued_at_ms: now,
                expires_at_ms: now.saturating_add(cfg.ttl_ms.max(1)),
                region: server.region.clone(),
                server: server.id.clone(),
                endpoints: server.endpoints.clone(),
            };
            issued.push((assignment, change));
        }
        for (assignment, change) in issued {
            self.published
                .insert(assignment.group.clone(), assignment.clone());
            self.out.push(AssignAction::Publish { assignment, change });
        }
    }

    // ------------------------------------------------------------ queries

    pub fn server(&self, id: &ServerId) -> Option<&Server> {
        self.servers.get(id)
    }

    pub fn servers(&self) -> impl Iterator<Item = &Server> {
        self.servers.values()
    }

    pub fn group(&self, id: &GroupId) -> Option<&Group> {
        self.groups.get(id)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// The server a group is placed on.
    pub fn placement(&self, id: &GroupId) -> Option<&Placement> {
        self.placements.get(id)
    }

    /// The last object published for a group.
    pub fn assignment(&self, id: &GroupId) -> Option<&Assignment> {
        self.published.get(id)
    }

    /// A group's prediction at `now`.
    pub fn prediction(&self, id: &GroupId, now: u64) -> Option<Prediction> {
        self.groups.get(id).map(|g| g.predict(&self.config, now))
    }
}
