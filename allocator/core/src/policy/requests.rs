//! Explicit shard requests (seed 000, issue 18): an application instance on
//! a device asks for units of a compute or data shard for a short time and
//! gets a grant, a queue position or a refusal with its reason.
//!
//! Everything here is per device and lives in [`DeviceState::apps`]
//! ([`AppRequests`]), so whichever allocator instance holds the device's
//! record can answer. The rules:
//!
//! - **Instance reputation** (0–100) per application instance inside the
//!   device, starting at [`RequestConfig::initial`] and decaying toward it
//!   with `half_life_ms`, moved by how grants end (released `Completed` +,
//!   `Unused` or expired unreleased −, `Errored` −, `OverLimit` −−) and by
//!   rate-limit violations. A new instance of an app never starts above the
//!   lowest score of that app's other instances on the device, live or
//!   recently evicted (`app_floors`), so renaming an instance cannot shed a
//!   bad score.
//! - **Quota**: per kind, floor(device effective budget × `quota_curve`(instance
//!   score)). The device's **pool** for requests is its effective budget
//!   minus the units its pushed leases hold minus the units granted to apps;
//!   the planner of pushed shards gets the budget minus granted units, so
//!   the two never over-commit the device together.
//! - **Queue**: a request the instance's quota allows but the pool cannot
//!   serve now waits (bounded per device and per instance) until units free
//!   up or its deadline passes (`QueueTimeout`). Served fairly: the
//!   least-recently-served instance first, then priority, then age.
//! - **Grants**: lease = min(asked, `max_grant_ms` × `lease_curve`(score)),
//!   at least `min_grant_ms` (or what was asked if less). A grant that runs
//!   out unreleased returns its units; it costs `expired` unless it was
//!   renewed at least once (a renewal shows the work went on, so the missing
//!   release is not read as unused units).
//! - **Rate limit**: a token bucket per instance on the engine's `now`;
//!   a violation is refused (`RateLimited`) and costs that instance only.
//!   Releases are never rate limited: they only return units.
//!
//! Deterministic like the rest of the engine: `BTreeMap` order, no clock,
//! no randomness.

use super::reputation::{curve, decayed};
use super::{kind_index, ReputationEntry};
use serde::{Deserialize, Serialize};
use shardline_shared::ids::{AppName, DeviceId, InstanceRef};
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{
    Answer, Grant, GrantOutcome, InstanceStanding, RequestAnswer, RequestOp, RequestRefusal,
    MAX_REQUEST_DURATION_MS, MAX_REQUEST_UNITS,
};
use std::collections::BTreeMap;

/// Explicit-request parameters (`[policy.requests]`). Deltas are points on
/// the 0–100 scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestConfig {
    /// Score of a new instance (unless its app's floor is lower).
    pub initial: f64,
    /// Scores decay toward `initial` with this half-life.
    pub half_life_ms: u64,
    /// Released with `Completed`.
    pub completed: f64,
    /// Released with `Unused`.
    pub unused: f64,
    /// Ran out unreleased and never renewed.
    pub expired: f64,
    pub errored: f64,
    pub over_limit: f64,
    /// Per request refused by the rate limit.
    pub rate_limited: f64,
    /// Piecewise-linear (score, factor): the instance's share of the
    /// device's effective budget.
    pub quota_curve: Vec<(f64, f64)>,
    /// Piecewise-linear (score, factor): the longest grant as a fraction of
    /// `max_grant_ms`.
    pub lease_curve: Vec<(f64, f64)>,
    pub max_grant_ms: u64,
    pub min_grant_ms: u64,
    pub queue_per_device: u32,
    pub queue_per_instance: u32,
    /// A queued request is refused with `QueueTimeout` after this.
    pub max_wait_ms: u64,
    /// Token bucket per instance: requests per second and burst.
    pub rate_per_s: f64,
    pub burst: f64,
    /// Instances remembered per device; idle ones holding nothing are
    /// evicted first (their app keeps the floor of their score).
    pub max_instances: u32,
    /// Entries kept in each instance's history.
    pub history_len: usize,
}

impl Default for RequestConfig {
    fn default() -> Self {
        Self {
            initial: 50.0,
            half_life_ms: 6 * 3_600_000,
            completed: 1.0,
            unused: -0.5,
            expired: -0.5,
            errored: -3.0,
            over_limit: -8.0,
            rate_limited: -1.0,
            quota_curve: vec![(0.0, 0.0), (20.0, 0.25), (50.0, 0.5), (100.0, 1.0)],
            lease_curve: vec![(0.0, 0.1), (50.0, 0.5), (100.0, 1.0)],
            max_grant_ms: 60_000,
            min_grant_ms: 1_000,
            queue_per_device: 32,
            queue_per_instance: 8,
            max_wait_ms: 10_000,
            rate_per_s: 20.0,
            burst: 40.0,
            max_instances: 64,
            history_len: 16,
        }
    }
}

impl RequestConfig {
    /// Values the engine cannot work with, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=100.0).contains(&self.initial) {
            return Err((
                "requests.initial",
                format!("must be 0-100, found {}", self.initial),
            ));
        }
        if self.rate_per_s <= 0.0 || !self.rate_per_s.is_finite() {
            return Err(("requests.rate_per_s", "must be > 0".into()));
        }
        if self.burst < 1.0 || !self.burst.is_finite() {
            return Err(("requests.burst", "must be >= 1".into()));
        }
        if self.max_grant_ms == 0 {
            return Err(("requests.max_grant_ms", "must be > 0".into()));
        }
        if self.max_instances == 0 {
            return Err(("requests.max_instances", "must be > 0".into()));
        }
        Ok(())
    }
}

/// An application instance inside one device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceKey {
    pub app: AppName,
    pub instance: AppName,
}

impl InstanceKey {
    pub fn of(r: &InstanceRef) -> Self {
        Self {
            app: r.app.clone(),
            instance: r.instance.clone(),
        }
    }

    pub fn at(&self, device: &DeviceId) -> InstanceRef {
        InstanceRef {
            device: device.clone(),
            app: self.app.clone(),
            instance: self.instance.clone(),
        }
    }
}

/// One instance's standing and rate-limit bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    pub score: f64,
    pub updated_ms: u64,
    pub history: Vec<ReputationEntry>,
    pub tokens: f64,
    pub tokens_at_ms: u64,
    /// The device's serve counter when this instance was last granted from
    /// the queue (fair order: lowest first).
    pub last_served: u64,
    pub last_active_ms: u64,
    pub rate_limited: u64,
}

/// What an evicted instance leaves its app: new instances start no higher.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AppFloor {
    pub score: f64,
    pub at_ms: u64,
}

/// Units lent to one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppGrant {
    pub grant: u64,
    pub holder: InstanceKey,
    pub kind: ShardKind,
    pub units: u32,
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
    pub renewed: bool,
}

/// A request waiting for units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedRequest {
    pub ticket: u64,
    pub holder: InstanceKey,
    pub request_seq: u64,
    pub kind: ShardKind,
    pub units: u32,
    pub duration_ms: u32,
    pub priority: u8,
    pub queued_at_ms: u64,
    pub deadline_ms: u64,
}

/// A device's explicit-request state (part of [`super::DeviceState`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppRequests {
    /// Highest request sequence accepted from the device (replays below).
    pub last_seq: u64,
    /// Grant ids and queue tickets (a ticket becomes its grant's id).
    pub next_id: u64,
    pub serve_counter: u64,
    pub instances: BTreeMap<InstanceKey, InstanceState>,
    pub grants: BTreeMap<u64, AppGrant>,
    pub queue: Vec<QueuedRequest>,
    pub app_floors: BTreeMap<AppName, AppFloor>,
}

/// An operator's change of an instance's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreChange {
    Delta(f64),
    Set(f64),
}

/// One instance for the operator (`GET /v1/reputation/{instance}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub instance: String,
    /// From the request: the application (declared in the agent's
    /// configuration) and the instance name it gave.
    pub app: String,
    pub instance_name: String,
    /// From the device's enrolment: its tenant (the account the instance
    /// belongs to) and tier.
    pub tenant: Option<String>,
    pub tier: String,
    /// When the instance last asked for anything.
    pub last_active_ms: u64,
    pub reputation: f64,
    pub standing: InstanceStanding,
    pub history: Vec<ReputationEntry>,
    pub grants: Vec<AppGrant>,
    pub queued: Vec<QueuedRequest>,
    pub rate_limited: u64,
}

/// One row of a device's instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    pub instance: String,
    pub reputation: f64,
    pub compute_in_use: u32,
    pub data_in_use: u32,
    pub queued: u32,
}

/// What the engine knows of the device when it decides a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceBudget {
    /// The tier's own budget: 0 of a kind means the kind is not allowed.
    pub tier: [u32; 2],
    /// Effective budget (tier × device quota ± loans).
    pub effective: [u32; 2],
    /// Units the device's pushed leases hold.
    pub pushed: [u32; 2],
    pub drained: bool,
    pub device_score: f64,
}

/// Fair serving order of a queue entry: its instance's last service
/// (least recent first), its priority (highest first), its ticket (oldest first).
type ServeRank = (u64, std::cmp::Reverse<u8>, u64);

/// Answers produced by one decision, with the request sequence each
/// answers, for the engine to wrap into [`RequestAnswer`]s.
pub(crate) type Answers = Vec<(InstanceKey, u64, Answer)>;

fn tenths(score: f64) -> u16 {
    (score.clamp(0.0, 100.0) * 10.0).round() as u16
}

impl InstanceState {
    fn new(cfg: &RequestConfig, score: f64, now: u64) -> Self {
        Self {
            score,
            updated_ms: now,
            history: Vec::new(),
            tokens: cfg.burst,
            tokens_at_ms: now,
            last_served: 0,
            last_active_ms: now,
            rate_limited: 0,
        }
    }

    fn decay_to(&mut self, cfg: &RequestConfig, now: u64) {
        if now > self.updated_ms {
            self.score = decayed(
                self.score,
                cfg.initial,
                cfg.half_life_ms,
                now - self.updated_ms,
            );
            self.updated_ms = now;
        }
    }

    /// The score as of `now` without changing the state.
    pub fn score_at(&self, cfg: &RequestConfig, now: u64) -> f64 {
        decayed(
            self.score,
            cfg.initial,
            cfg.half_life_ms,
            now.saturating_sub(self.updated_ms),
        )
    }

    fn set_score(&mut self, cfg: &RequestConfig, now: u64, new: f64, reason: String) -> f64 {
        self.decay_to(cfg, now);
        let old = self.score;
        self.score = new.clamp(0.0, 100.0);
        self.history.push(ReputationEntry {
            at_ms: now,
            old,
            new: self.score,
            reason,
        });
        if self.history.len() > cfg.history_len.max(1) {
            let excess = self.history.len() - cfg.history_len.max(1);
            self.history.drain(..excess);
        }
        old
    }

    fn apply(&mut self, cfg: &RequestConfig, now: u64, delta: f64, reason: &str) {
        self.decay_to(cfg, now);
        let new = self.score + delta;
        self.set_score(cfg, now, new, reason.to_owned());
    }

    /// Takes one token; the wait until one is available otherwise.
    fn take_token(&mut self, cfg: &RequestConfig, now: u64) -> Result<(), u32> {
        let dt = now.saturating_sub(self.tokens_at_ms) as f64;
        self.tokens = (self.tokens + dt * cfg.rate_per_s / 1000.0).min(cfg.burst);
        self.tokens_at_ms = self.tokens_at_ms.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - self.tokens) * 1000.0 / cfg.rate_per_s).ceil();
            Err(wait.clamp(1.0, f64::from(u32::MAX)) as u32)
        }
    }
}

fn outcome_delta(cfg: &RequestConfig, outcome: GrantOutcome) -> (f64, &'static str) {
    match outcome {
        GrantOutcome::Completed => (cfg.completed, "completed"),
        GrantOutcome::Unused => (cfg.unused, "unused"),
        GrantOutcome::Errored => (cfg.errored, "errored"),
        GrantOutcome::OverLimit => (cfg.over_limit, "over_limit"),
    }
}

impl AppRequests {
    /// Units granted to apps, per kind.
    pub fn granted_units(&self) -> [u32; 2] {
        let mut out = [0u32; 2];
        for g in self.grants.values() {
            let k = kind_index(g.kind);
            out[k] = out[k].saturating_add(g.units);
        }
        out
    }

    fn held_by(&self, who: &InstanceKey) -> [u32; 2] {
        let mut out = [0u32; 2];
        for g in self.grants.values().filter(|g| &g.holder == who) {
            let k = kind_index(g.kind);
            out[k] = out[k].saturating_add(g.units);
        }
        out
    }

    fn queued_by(&self, who: &InstanceKey) -> u32 {
        self.queue.iter().filter(|q| &q.holder == who).count() as u32
    }

    /// The earliest time something here is due (an expiry or a deadline).
    pub fn next_due(&self) -> Option<u64> {
        let g = self.grants.values().map(|g| g.expires_at_ms);
        let q = self.queue.iter().map(|q| q.deadline_ms);
        g.chain(q).min()
    }

    fn pool(&self, b: &DeviceBudget) -> [u32; 2] {
        let granted = self.granted_units();
        [0, 1].map(|k| {
            b.effective[k]
                .saturating_sub(b.pushed[k])
                .saturating_sub(granted[k])
        })
    }

    fn quota(cfg: &RequestConfig, b: &DeviceBudget, score: f64) -> [u32; 2] {
        let f = curve(&cfg.quota_curve, score).clamp(0.0, 1.0);
        b.effective
            .map(|e| (f64::from(e) * f + 1e-9).floor() as u32)
    }

    fn grant_len(cfg: &RequestConfig, score: f64, asked: u32) -> u64 {
        let cap = (cfg.max_grant_ms as f64 * curve(&cfg.lease_curve, score).clamp(0.0, 1.0)) as u64;
        let asked = u64::from(asked);
        asked.min(cap.max(cfg.min_grant_ms)).max(1)
    }

    fn app_floor(&self, cfg: &RequestConfig, app: &AppName, now: u64) -> f64 {
        let mut floor = cfg.initial;
        for (k, i) in &self.instances {
            if &k.app == app {
                floor = floor.min(i.score_at(cfg, now));
            }
        }
        if let Some(f) = self.app_floors.get(app) {
            floor = floor.min(decayed(
                f.score,
                cfg.initial,
                cfg.half_life_ms,
                now.saturating_sub(f.at_ms),
            ));
        }
        floor
    }

    /// The instance's state, created if new (at no more than its app's
    /// floor); `None` when the device holds `max_instances` and none can be
    /// evicted.
    fn instance_mut(
        &mut self,
        cfg: &RequestConfig,
        who: &InstanceKey,
        now: u64,
    ) -> Option<&mut InstanceState> {
        if !self.instances.contains_key(who) {
            if self.instances.len() >= cfg.max_instances as usize && !self.evict_one(cfg, now) {
                return None;
            }
            let start = self.app_floor(cfg, &who.app, now);
            self.instances
                .insert(who.clone(), InstanceState::new(cfg, start, now));
        }
        self.instances.get_mut(who)
    }

    /// Evicts the least recently active instance holding and queuing
    /// nothing; its app keeps its score as a floor.
    fn evict_one(&mut self, cfg: &RequestConfig, now: u64) -> bool {
        let busy = |k: &InstanceKey| {
            self.grants.values().any(|g| &g.holder == k)
                || self.queue.iter().any(|q| &q.holder == k)
        };
        let victim = self
            .instances
            .iter()
            .filter(|(k, _)| !busy(k))
            .min_by_key(|(k, i)| (i.last_active_ms, (*k).clone()))
            .map(|(k, _)| k.clone());
        let Some(victim) = victim else {
            return false;
        };
        if let Some(i) = self.instances.remove(&victim) {
            let score = i.score_at(cfg, now);
            if score < cfg.initial {
                let floor = self.app_floor(cfg, &victim.app, now).min(score);
                self.app_floors.insert(
                    victim.app.clone(),
                    AppFloor {
                        score: floor,
                        at_ms: now,
                    },
                );
                // Bounded like the instances: the floor closest to neutral goes.
                while self.app_floors.len() > cfg.max_instances as usize {
                    let lightest = self
                        .app_floors
                        .iter()
                        .max_by(|a, b| a.1.score.total_cmp(&b.1.score).then(b.0.cmp(a.0)))
                        .map(|(k, _)| k.clone());
                    match lightest {
                        Some(k) => self.app_floors.remove(&k),
                        None => break,
                    };
                }
            }
        }
        true
    }

    /// Standing of an instance (zeros for one never seen).
    pub(crate) fn standing(
        &self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        who: &InstanceKey,
        now: u64,
    ) -> InstanceStanding {
        let score = self.instances.get(who).map_or_else(
            || self.app_floor(cfg, &who.app, now),
            |i| i.score_at(cfg, now),
        );
        let quota = Self::quota(cfg, b, score);
        let held = self.held_by(who);
        InstanceStanding {
            reputation_tenths: tenths(score),
            device_reputation_tenths: tenths(b.device_score),
            compute_quota_units: quota[0],
            data_quota_units: quota[1],
            compute_in_use: held[0],
            data_in_use: held[1],
            queued: self.queued_by(who),
        }
    }

    /// Grants that ran out return their units; queued requests past their
    /// deadline are refused. Then the queue is served.
    pub(crate) fn expire(
        &mut self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        now: u64,
        out: &mut Answers,
    ) -> bool {
        if self.next_due().is_none_or(|t| t > now) {
            return false;
        }
        let expired: Vec<u64> = self
            .grants
            .values()
            .filter(|g| g.expires_at_ms <= now)
            .map(|g| g.grant)
            .collect();
        for id in expired {
            if let Some(g) = self.grants.remove(&id) {
                if !g.renewed {
                    if let Some(i) = self.instances.get_mut(&g.holder) {
                        i.apply(cfg, now, cfg.expired, "expired_unreleased");
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].deadline_ms <= now {
                let q = self.queue.remove(i);
                out.push((
                    q.holder,
                    q.request_seq,
                    Answer::Refused(RequestRefusal::QueueTimeout),
                ));
            } else {
                i += 1;
            }
        }
        self.serve_queue(cfg, b, now, out);
        true
    }

    /// Grants queued requests while units allow, fairly across instances.
    pub(crate) fn serve_queue(
        &mut self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        now: u64,
        out: &mut Answers,
    ) {
        if b.drained {
            return;
        }
        while !self.queue.is_empty() {
            let pool = self.pool(b);
            let mut best: Option<(usize, ServeRank)> = None;
            for (idx, q) in self.queue.iter().enumerate() {
                let k = kind_index(q.kind);
                if q.units > pool[k] {
                    continue;
                }
                let Some(inst) = self.instances.get(&q.holder) else {
                    continue;
                };
                let quota = Self::quota(cfg, b, inst.score_at(cfg, now));
                if self.held_by(&q.holder)[k].saturating_add(q.units) > quota[k] {
                    continue;
                }
                let rank = (inst.last_served, std::cmp::Reverse(q.priority), q.ticket);
                if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                    best = Some((idx, rank));
                }
            }
            let Some((idx, _)) = best else {
                break;
            };
            let q = self.queue.remove(idx);
            self.serve_counter += 1;
            let score = match self.instances.get_mut(&q.holder) {
                Some(i) => {
                    i.last_served = self.serve_counter;
                    i.score_at(cfg, now)
                }
                None => cfg.initial,
            };
            let grant = self.make_grant(
                cfg,
                q.ticket,
                &q.holder,
                q.kind,
                q.units,
                q.duration_ms,
                score,
                now,
            );
            out.push((q.holder, q.request_seq, Answer::Granted(grant)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make_grant(
        &mut self,
        cfg: &RequestConfig,
        id: u64,
        holder: &InstanceKey,
        kind: ShardKind,
        units: u32,
        duration_ms: u32,
        score: f64,
        now: u64,
    ) -> Grant {
        let expires_at_ms = now.saturating_add(Self::grant_len(cfg, score, duration_ms));
        self.grants.insert(
            id,
            AppGrant {
                grant: id,
                holder: holder.clone(),
                kind,
                units,
                granted_at_ms: now,
                expires_at_ms,
                renewed: false,
            },
        );
        Grant {
            grant: id,
            kind,
            units,
            expires_at_ms,
        }
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// When a queued request of `units` of `kind` at the end of the queue
    /// can expect units: the expiry of the held grants that free enough
    /// (what the pool lacks plus what the entries ahead ask), else the wait
    /// deadline.
    fn expected_wait(
        &self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        kind: ShardKind,
        units: u32,
        now: u64,
    ) -> u64 {
        let k = kind_index(kind);
        let ahead: u32 = self
            .queue
            .iter()
            .filter(|q| q.kind == kind)
            .map(|q| q.units)
            .sum();
        let mut missing = units.saturating_add(ahead).saturating_sub(self.pool(b)[k]);
        let mut expiries: Vec<(u64, u32)> = self
            .grants
            .values()
            .filter(|g| g.kind == kind)
            .map(|g| (g.expires_at_ms, g.units))
            .collect();
        expiries.sort_unstable();
        for (t, u) in expiries {
            missing = missing.saturating_sub(u);
            if missing == 0 {
                return t.saturating_sub(now).min(cfg.max_wait_ms);
            }
        }
        cfg.max_wait_ms
    }

    /// Decides one operation of an instance. `rate_limit`: whether the
    /// instance's bucket applies (a device's own request; not an operator
    /// acting for it). The answers (the direct one first) are pushed on `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decide(
        &mut self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        who: &InstanceKey,
        request_seq: u64,
        op: RequestOp,
        rate_limit: bool,
        now: u64,
        out: &mut Answers,
    ) {
        macro_rules! answer {
            ($a:expr) => {
                out.push((who.clone(), request_seq, $a))
            };
        }
        let in_range = match &op {
            RequestOp::Acquire {
                units, duration_ms, ..
            } => {
                (1..=MAX_REQUEST_UNITS).contains(units)
                    && (1..=MAX_REQUEST_DURATION_MS).contains(duration_ms)
            }
            RequestOp::Renew { duration_ms, .. } => {
                (1..=MAX_REQUEST_DURATION_MS).contains(duration_ms)
            }
            RequestOp::Release { .. } | RequestOp::Query => true,
        };
        // Releases and queries of an unknown instance do not create it:
        // only an acquisition (or an operator) makes an instance exist.
        let creates = matches!(op, RequestOp::Acquire { .. });
        if rate_limit && !matches!(op, RequestOp::Release { .. }) {
            let inst = if creates {
                self.instance_mut(cfg, who, now)
            } else {
                self.instances.get_mut(who)
            };
            if let Some(inst) = inst {
                inst.last_active_ms = now;
                if let Err(retry_after_ms) = inst.take_token(cfg, now) {
                    inst.rate_limited += 1;
                    inst.apply(cfg, now, cfg.rate_limited, "rate_limited");
                    answer!(Answer::Refused(RequestRefusal::RateLimited {
                        retry_after_ms
                    }));
                    return;
                }
            } else if matches!(op, RequestOp::Acquire { .. }) {
                answer!(Answer::Refused(RequestRefusal::QueueFull {
                    limit: cfg.max_instances,
                }));
                return;
            }
        }
        if !in_range {
            answer!(Answer::Refused(RequestRefusal::OutOfRange {
                max_units: MAX_REQUEST_UNITS,
                max_duration_ms: MAX_REQUEST_DURATION_MS,
            }));
            return;
        }
        match op {
            RequestOp::Query => {
                let s = self.standing(cfg, b, who, now);
                out.push((who.clone(), request_seq, Answer::Standing(s)));
            }
            RequestOp::Release { grant, outcome } => {
                if let Some(g) = self.grants.get(&grant).filter(|g| &g.holder == who) {
                    let units = g.units;
                    self.grants.remove(&grant);
                    let (delta, reason) = outcome_delta(cfg, outcome);
                    if let Some(i) = self.instances.get_mut(who) {
                        i.apply(cfg, now, delta, reason);
                        i.last_active_ms = now;
                    }
                    out.push((who.clone(), request_seq, Answer::Released { grant, units }));
                    self.serve_queue(cfg, b, now, out);
                } else if let Some(pos) = self
                    .queue
                    .iter()
                    .position(|q| q.ticket == grant && &q.holder == who)
                {
                    // Withdrawing a queued request is not an outcome: no charge.
                    let q = self.queue.remove(pos);
                    out.push((
                        who.clone(),
                        request_seq,
                        Answer::Released {
                            grant,
                            units: q.units,
                        },
                    ));
                    // Its place may have been blocking nobody, but fairness
                    // order can change: serving is cheap with a short queue.
                    self.serve_queue(cfg, b, now, out);
                } else {
                    answer!(Answer::Refused(RequestRefusal::UnknownGrant { grant }));
                }
            }
            RequestOp::Renew { grant, duration_ms } => {
                if b.drained {
                    answer!(Answer::Refused(RequestRefusal::Drained));
                    return;
                }
                let score = self
                    .instances
                    .get(who)
                    .map_or(cfg.initial, |i| i.score_at(cfg, now));
                let len = Self::grant_len(cfg, score, duration_ms);
                match self.grants.get_mut(&grant).filter(|g| &g.holder == who) {
                    Some(g) => {
                        g.expires_at_ms = g.expires_at_ms.max(now.saturating_add(len));
                        g.renewed = true;
                        let renewed = Grant {
                            grant,
                            kind: g.kind,
                            units: g.units,
                            expires_at_ms: g.expires_at_ms,
                        };
                        answer!(Answer::Renewed(renewed));
                    }
                    None => answer!(Answer::Refused(RequestRefusal::UnknownGrant { grant })),
                }
            }
            RequestOp::Acquire {
                kind,
                units,
                duration_ms,
                priority,
            } => {
                let k = kind_index(kind);
                if b.drained {
                    answer!(Answer::Refused(RequestRefusal::Drained));
                    return;
                }
                if b.tier[k] == 0 {
                    answer!(Answer::Refused(RequestRefusal::KindNotAllowed { kind }));
                    return;
                }
                let Some(inst) = self.instance_mut(cfg, who, now) else {
                    answer!(Answer::Refused(RequestRefusal::QueueFull {
                        limit: cfg.max_instances,
                    }));
                    return;
                };
                inst.last_active_ms = now;
                let score = inst.score_at(cfg, now);
                let quota = Self::quota(cfg, b, score)[k];
                let in_use = self.held_by(who)[k];
                if units.saturating_add(in_use) > quota {
                    answer!(Answer::Refused(RequestRefusal::InsufficientQuota {
                        kind,
                        asked: units,
                        quota,
                        in_use,
                    }));
                    return;
                }
                // Waiting entries of the same kind go first: a newcomer
                // does not overtake the queue.
                let others_waiting = self.queue.iter().any(|q| q.kind == kind);
                if units <= self.pool(b)[k] && !others_waiting {
                    let id = self.take_id();
                    let g = self.make_grant(cfg, id, who, kind, units, duration_ms, score, now);
                    answer!(Answer::Granted(g));
                    return;
                }
                if self.queue.len() >= cfg.queue_per_device as usize {
                    answer!(Answer::Refused(RequestRefusal::QueueFull {
                        limit: cfg.queue_per_device,
                    }));
                    return;
                }
                if self.queued_by(who) >= cfg.queue_per_instance {
                    answer!(Answer::Refused(RequestRefusal::QueueFull {
                        limit: cfg.queue_per_instance,
                    }));
                    return;
                }
                let expected_wait_ms = self.expected_wait(cfg, b, kind, units, now);
                let ticket = self.take_id();
                self.queue.push(QueuedRequest {
                    ticket,
                    holder: who.clone(),
                    request_seq,
                    kind,
                    units,
                    duration_ms,
                    priority,
                    queued_at_ms: now,
                    deadline_ms: now.saturating_add(cfg.max_wait_ms),
                });
                out.push((
                    who.clone(),
                    request_seq,
                    Answer::Queued {
                        ticket,
                        position: self.queue.len() as u32,
                        expected_wait_ms,
                    },
                ));
                // Units may be free for it after all (the queue ahead was
                // of entries that do not fit): serve in fair order.
                self.serve_queue(cfg, b, now, out);
            }
        }
    }

    /// An operator's change of an instance's score (created if unknown);
    /// returns (old, new).
    pub(crate) fn adjust(
        &mut self,
        cfg: &RequestConfig,
        who: &InstanceKey,
        change: ScoreChange,
        reason: String,
        now: u64,
    ) -> Option<(f64, f64)> {
        let value = match change {
            ScoreChange::Delta(v) | ScoreChange::Set(v) => v,
        };
        if !value.is_finite() {
            return None; // a NaN would stick: clamping keeps it
        }
        let inst = self.instance_mut(cfg, who, now)?;
        inst.decay_to(cfg, now);
        let new = match change {
            ScoreChange::Delta(d) => inst.score + d,
            ScoreChange::Set(s) => s,
        };
        let old = inst.set_score(cfg, now, new, reason);
        Some((old, inst.score))
    }

    pub(crate) fn view(
        &self,
        cfg: &RequestConfig,
        b: &DeviceBudget,
        who: &InstanceRef,
        now: u64,
    ) -> Option<InstanceView> {
        let key = InstanceKey::of(who);
        let inst = self.instances.get(&key)?;
        Some(InstanceView {
            instance: who.to_string(),
            app: who.app.to_string(),
            instance_name: who.instance.to_string(),
            // Filled in by the engine, which holds the device's enrolment.
            tenant: None,
            tier: String::new(),
            last_active_ms: inst.last_active_ms,
            reputation: inst.score_at(cfg, now),
            standing: self.standing(cfg, b, &key, now),
            history: inst.history.clone(),
            grants: self
                .grants
                .values()
                .filter(|g| g.holder == key)
                .cloned()
                .collect(),
            queued: self
                .queue
                .iter()
                .filter(|q| q.holder == key)
                .cloned()
                .collect(),
            rate_limited: inst.rate_limited,
        })
    }

    pub(crate) fn summaries(
        &self,
        cfg: &RequestConfig,
        device: &DeviceId,
        now: u64,
    ) -> Vec<InstanceSummary> {
        self.instances
            .iter()
            .map(|(k, i)| {
                let held = self.held_by(k);
                InstanceSummary {
                    instance: k.at(device).to_string(),
                    reputation: i.score_at(cfg, now),
                    compute_in_use: held[0],
                    data_in_use: held[1],
                    queued: self.queued_by(k),
                }
            })
            .collect()
    }
}

/// Wraps decided answers for the wire.
pub(crate) fn to_wire(
    device: &DeviceId,
    now: u64,
    answers: Answers,
) -> impl Iterator<Item = RequestAnswer> + '_ {
    answers
        .into_iter()
        .map(move |(who, request_seq, answer)| RequestAnswer {
            device: device.clone(),
            app: who.app,
            instance: who.instance,
            request_seq,
            issued_at_ms: now,
            answer,
        })
}
