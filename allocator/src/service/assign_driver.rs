//! The regional assignment, wired (issue 19): the I/O around seed 001's
//! sans-IO [`AssignmentEngine`] (decisions stay in the core crate).
//!
//! One thread per instance ticks every `[policy] tick_ms`:
//! 1. it writes this instance's heartbeat ([`ServerBeat`]: capacity and
//!    [`Figures`] over the last closed window of the engine's
//!    `heartbeat_interval_ms`: load = accepted reports/s from its own
//!    counters, mean core batch time as the latency, store/publish errors
//!    per report as the error rate, and the messages/s it counted on each
//!    group's routed topics) into the store;
//! 2. the instance holding the store's lead feeds the engine (groups from
//!    `[assignment]`, servers from the stored heartbeats: one older than the
//!    engine's `heartbeat_timeout_ms` is not fed, so its server is lost and
//!    its groups move; group rates summed over the fresh heartbeats, once a
//!    window), polls
//!    it, and for each `Publish` seals the object with the signing key,
//!    persists it (`Store::put_assignment`) and only then publishes it
//!    retained, QoS 1, on `topics::assignment(group)`. A lead that was just
//!    taken builds its engine from the store (`restore_assignment`), so
//!    versions never go back, and republishes the stored objects;
//! 3. every instance reads the stored assignments and subscribes to the
//!    routed uplink filter of each group assigned to it, dropping a lost one
//!    `unsubscribe_grace_s` after it saw the new owner; with `[broker]
//!    uplink = "routed"` the plain uplink filters are held only while
//!    leading. The MQTT link re-subscribes the held set on every reconnect.
//!    A group of its own that vanished from the store (withdrawn) stays
//!    subscribed until its object's expiry (`assign_upkeep::Lingering`);
//! 4. the lead withdraws the stored objects of groups no longer configured
//!    (store first, then an empty retained message clears the broker's
//!    copy) and keeps the capacity shortfalls in the store
//!    (`assign_upkeep`).
//!
//! The bound: a group owned by an instance that dies is republished naming
//! a live one within `heartbeat_timeout_ms` + one tick (+ one tick for the
//! new owner to subscribe), as long as the lead lives. If the lead itself
//! died, a survivor takes the lead when PostgreSQL ends the dead session:
//! at once when its process died (the socket closes; measured 0.02–0.25 s
//! in `tests/tests/cluster_assignment.rs`, where the dead lead's group was
//! stored under a new version 2.9–3.2 s after the kill: the heartbeat
//! timeout runs meanwhile), after the server-side keepalives (~16 s,
//! `store_pg::conn`) when its host vanished.

use super::assign_config::{AssignmentSection, Instance};
use super::assign_upkeep::{self, Lingering, ShortfallBook};
use super::config::UplinkMode;
use super::inbound::now_ms;
use super::store::{ServerBeat, Store, StoredAssignment};
use rumqttc::{AsyncClient, QoS};
use shardline_allocator_core::assign::{
    AssignAction, AssignmentEngine, CapacityShortfall, RerunReason,
};
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::assign::{seal_assignment, GroupId, ServerId};
use shardline_shared::sign::KeyPair;
use shardline_shared::topics;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// History rows kept per group.
pub const MAX_HISTORY_PER_GROUP: usize = 100;
/// A region's capacity warning is logged at most this often.
const WARN_EVERY_MS: u64 = 60_000;

/// Why the lead's run stopped (its engine is rebuilt from the store at the
/// next tick).
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    /// A higher version of the group is stored: another instance published
    /// as lead meanwhile; nothing was written or published.
    #[error("group {group}: version {version} not written, a higher one is stored")]
    Superseded { group: GroupId, version: u64 },
}

/// What the driver shares with the MQTT link and the API.
#[derive(Debug, Default)]
pub struct AssignShared {
    /// Filters held beyond the fixed ones (the MQTT link subscribes them
    /// again on every reconnect).
    pub filters: Mutex<BTreeSet<String>>,
    /// Every SUBSCRIBE and UNSUBSCRIBE of the MQTT link goes through this
    /// (the link's and the driver's alike).
    pub link: super::link_subs::LinkSubs,
    /// Messages counted per group on the routed uplinks since the last beat.
    pub group_counts: Mutex<BTreeMap<GroupId, u64>>,
    /// The latest capacity shortfall per region (reports/s), 0 once placed.
    pub shortfalls: Mutex<BTreeMap<String, CapacityShortfall>>,
    /// Counters and gauges for `/metrics`.
    pub shortfall_events: AtomicU64,
    pub publishes: AtomicU64,
    pub publish_refused: AtomicU64,
    pub reruns: Mutex<BTreeMap<String, u64>>,
    pub groups_per_server: Mutex<BTreeMap<String, u64>>,
    pub versions: Mutex<BTreeMap<String, u64>>,
    pub leading: AtomicU64,
    /// Instances whose `[[assignment.groups]]` differ from the lead's (0
    /// unless leading).
    pub config_mismatch: AtomicU64,
    /// The engine's heartbeat timeout (for the API's "alive"); 0 = the
    /// engine default.
    pub heartbeat_timeout_ms: AtomicU64,
    /// `[[assignment.groups]]` read again on SIGHUP ([`reload_groups`]),
    /// taken by the driver at its next tick.
    pub reloaded_groups: Mutex<Option<Vec<super::assign_config::GroupDecl>>>,
}

/// SIGHUP: reads `path` again and hands its `[[assignment.groups]]` to the
/// driver (the other `[assignment]` and `[instance]` fields need a
/// restart). A file that does not load changes nothing (logged with file,
/// line and field).
pub fn reload_groups(
    path: &std::path::Path,
    shared: &AssignShared,
) -> Result<(), super::config::ConfigError> {
    match super::config::Config::load(path, true) {
        Ok(c) => {
            tracing::info!(
                groups = c.assignment.groups.len(),
                "SIGHUP: assignment groups read again"
            );
            *lock(&shared.reloaded_groups) = Some(c.assignment.groups);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: assignment groups not reloaded: the running ones stay");
            Err(e)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AssignShared {
    /// Counts one message on a routed uplink topic.
    pub fn count_routed(&self, topic: &str) {
        if let Some((Some(group), _, _)) = topics::parse_routed(topic) {
            *lock(&self.group_counts).entry(group).or_default() += 1;
        }
    }

    pub fn heartbeat_timeout_ms(&self) -> u64 {
        match self.heartbeat_timeout_ms.load(Ordering::Relaxed) {
            0 => shardline_allocator_core::assign::AssignConfig::default().heartbeat_timeout_ms,
            t => t,
        }
    }

    /// The held filters (for the MQTT link's re-subscription).
    pub fn held_filters(&self) -> Vec<String> {
        lock(&self.filters).iter().cloned().collect()
    }

    /// The Prometheus text of the assignment's metrics.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP shardline_assignment_capacity_shortfall Reports/s of a region's groups that did not fit.\n# TYPE shardline_assignment_capacity_shortfall gauge"
        );
        for (region, s) in lock(&self.shortfalls).iter() {
            let _ = writeln!(
                out,
                "shardline_assignment_capacity_shortfall{{region=\"{region}\"}} {}",
                s.shortfall
            );
        }
        let _ = writeln!(
            out,
            "# TYPE shardline_assignment_capacity_shortfall_total counter\nshardline_assignment_capacity_shortfall_total {}",
            self.shortfall_events.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE shardline_assignment_publishes_total counter\nshardline_assignment_publishes_total {}",
            self.publishes.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE shardline_assignment_groups gauge");
        for (server, n) in lock(&self.groups_per_server).iter() {
            let _ = writeln!(
                out,
                "shardline_assignment_groups{{server=\"{server}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE shardline_assignment_version gauge");
        for (group, v) in lock(&self.versions).iter() {
            let _ = writeln!(out, "shardline_assignment_version{{group=\"{group}\"}} {v}");
        }
        let _ = writeln!(out, "# TYPE shardline_assignment_reruns_total counter");
        for (reason, n) in lock(&self.reruns).iter() {
            let _ = writeln!(
                out,
                "shardline_assignment_reruns_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# TYPE shardline_assignment_leading gauge\nshardline_assignment_leading {}",
            self.leading.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shardline_assignment_config_mismatch Instances whose [[assignment.groups]] differ from the lead's (they get no group; 0 unless leading).\n# TYPE shardline_assignment_config_mismatch gauge\nshardline_assignment_config_mismatch {}",
            self.config_mismatch.load(Ordering::Relaxed)
        );
        out
    }
}

/// The plain uplink filters (reports, acks, enrolments, requests,
/// diagnostics) without `$share`.
pub fn plain_uplink_filters() -> Vec<String> {
    [
        topics::ALL_REPORTS,
        topics::ALL_ACKS,
        topics::ALL_ENROLL,
        topics::ALL_REQUESTS,
        topics::ALL_DIAGNOSTICS,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The filters an instance should hold: its groups' routed filters, and in
/// `routed` mode the plain uplinks while it leads.
pub fn wanted_filters(
    me: &ServerId,
    uplink: UplinkMode,
    leading: bool,
    assignments: &[StoredAssignment],
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = assignments
        .iter()
        .filter(|a| &a.assignment.server == me)
        .map(|a| topics::group_uplink_filter(&a.assignment.group))
        .collect();
    if uplink == UplinkMode::Routed && leading {
        out.extend(plain_uplink_filters());
    }
    out
}

/// Which filters are held, and since when each unwanted one is unwanted.
#[derive(Debug, Default)]
pub struct Subscriptions {
    held: BTreeMap<String, Option<u64>>,
}

/// What to change at the broker.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SubChanges {
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

impl Subscriptions {
    /// New wanted filters are subscribed at once; a held filter no longer
    /// wanted is dropped `grace_ms` after it was first seen unwanted (the new
    /// owner had that long to subscribe); wanted again, it stays.
    pub fn update(&mut self, now: u64, wanted: &BTreeSet<String>, grace_ms: u64) -> SubChanges {
        let mut c = SubChanges::default();
        for f in wanted {
            match self.held.get_mut(f) {
                Some(since) => *since = None,
                None => {
                    self.held.insert(f.clone(), None);
                    c.subscribe.push(f.clone());
                }
            }
        }
        self.held.retain(|f, since| {
            if wanted.contains(f) {
                return true;
            }
            let t = *since.get_or_insert(now);
            if now >= t.saturating_add(grace_ms) {
                c.unsubscribe.push(f.clone());
                false
            } else {
                true
            }
        });
        c
    }

    pub fn held(&self) -> impl Iterator<Item = &String> {
        self.held.keys()
    }
}

/// Logs a region's shortfall at most once a minute.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    last: BTreeMap<String, u64>,
}

impl WarnLimiter {
    pub fn allow(&mut self, region: &str, now: u64) -> bool {
        match self.last.get(region) {
            Some(t) if now < t.saturating_add(WARN_EVERY_MS) => false,
            _ => {
                self.last.insert(region.to_owned(), now);
                true
            }
        }
    }
}

/// A rerun reason's label (without its argument).
pub fn reason_label(r: &RerunReason) -> &'static str {
    match r {
        RerunReason::Initial => "initial",
        RerunReason::Periodic => "periodic",
        RerunReason::ServerJoined(_) => "server_joined",
        RerunReason::ServerDown(_) => "server_down",
        RerunReason::ServerLost(_) => "server_lost",
        RerunReason::Overload(_) => "overload",
        RerunReason::Anomaly(_) => "anomaly",
        RerunReason::GroupAdded(_) => "group_added",
        RerunReason::GroupRemoved(_) => "group_removed",
        RerunReason::Unhealthy(_) => "unhealthy",
        RerunReason::ConfigMismatch(_) => "config_mismatch",
    }
}

/// The lead's engine and what it was fed.
struct Lead {
    engine: AssignmentEngine,
    /// The latest heartbeat time fed per server.
    fed: BTreeMap<ServerId, u64>,
    /// Reasons of the last run (stored with what it published).
    reasons: Vec<RerunReason>,
    /// When group rates were last fed (one observation per window).
    rates_at_ms: Option<u64>,
    /// The key file the store named when this lead last looked (a change
    /// is a key rotation: the stored objects are signed again).
    key_file: Option<String>,
    /// The capacity shortfalls as this lead sees them (kept in the store).
    shortfalls: ShortfallBook,
}

/// Feeds the heartbeats not fed yet and fresh (younger than the timeout) to
/// the engine; returns the fresh ones.
fn feed_beats<'a>(
    engine: &mut AssignmentEngine,
    fed: &mut BTreeMap<ServerId, u64>,
    beats: &'a [ServerBeat],
    now: u64,
) -> Vec<&'a ServerBeat> {
    let timeout = engine.config().heartbeat_timeout_ms;
    let mut fresh = Vec::new();
    for b in beats {
        let at = b.at_ms.min(now);
        if now >= at.saturating_add(timeout) {
            continue;
        }
        fresh.push(b);
        if fed.get(&b.report.id).is_some_and(|t| *t >= at) {
            continue;
        }
        if let Err(e) = engine.handle_server_report(at, b.report.clone()) {
            tracing::warn!(server = %b.report.id, error = %e, "heartbeat refused by the assignment engine");
            continue;
        }
        fed.insert(b.report.id.clone(), at);
    }
    fresh
}

/// The instances among `fresh` whose group definitions differ from the
/// lead's digest `own`. A heartbeat without a digest (written by an older
/// version) cannot be compared and is not counted.
pub fn mismatched_configs(own: &str, fresh: &[&ServerBeat]) -> BTreeSet<ServerId> {
    fresh
        .iter()
        .filter(|b| b.groups_digest.as_deref().is_some_and(|d| d != own))
        .map(|b| b.report.id.clone())
        .collect()
}

/// Everything the driver thread needs.
pub struct Driver {
    pub instance: Instance,
    pub section: AssignmentSection,
    pub uplink: UplinkMode,
    pub tick: Duration,
    pub store: Arc<dyn Store>,
    pub client: AsyncClient,
    pub rt: tokio::runtime::Handle,
    /// The signing key at start (see [`Driver::signing_key`]).
    pub key: KeyPair,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<AssignShared>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// This instance's figures over one window (`heartbeat_interval_ms`):
/// what its heartbeats carry until the next window closes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Accepted reports/s.
    pub load: f64,
    /// Mean core batch time (ms), standing in for the p99 latency.
    pub latency_ms: f64,
    /// Store and publish errors per accepted report (0..=1).
    pub error_rate: f64,
    /// Messages/s counted on each group's routed uplinks.
    pub group_rates: Vec<(GroupId, f64)>,
}

impl Figures {
    fn of(prev: Counters, cur: Counters, counts: BTreeMap<GroupId, u64>) -> Self {
        let secs = (cur.at_ms.saturating_sub(prev.at_ms) as f64 / 1000.0).max(0.001);
        let reports = cur.reports.saturating_sub(prev.reports);
        let batches = cur.batches.saturating_sub(prev.batches);
        let latency_ms = if batches == 0 {
            0.0
        } else {
            cur.micros.saturating_sub(prev.micros) as f64 / batches as f64 / 1000.0
        };
        let errors = cur.errors.saturating_sub(prev.errors);
        Self {
            load: reports as f64 / secs,
            latency_ms,
            error_rate: (errors as f64 / reports.max(1) as f64).clamp(0.0, 1.0),
            group_rates: counts
                .into_iter()
                .map(|(g, n)| (g, n as f64 / secs))
                .collect(),
        }
    }
}

/// Own load counters at one time.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    at_ms: u64,
    reports: u64,
    batches: u64,
    micros: u64,
    errors: u64,
}

impl Counters {
    fn read(m: &Metrics, at_ms: u64) -> Self {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            at_ms,
            reports: r(&m.reports_accepted),
            batches: r(&m.core_batches),
            micros: r(&m.core_handle_micros),
            errors: r(&m.store_errors) + r(&m.publish_errors),
        }
    }
}

impl Driver {
    /// Starts the driver thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("allocator-assign".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut lead: Option<Lead> = None;
        let mut subs = Subscriptions::default();
        let mut lingering = Lingering::default();
        let configured_ids =
            |s: &AssignmentSection| s.group_specs().into_iter().map(|g| g.id).collect();
        let mut configured: BTreeSet<GroupId> = configured_ids(&self.section);
        let mut warn = WarnLimiter::default();
        let engine = self.section.engine_config();
        let window_ms = engine
            .heartbeat_interval_ms
            .max(self.tick.as_millis() as u64);
        let mut window = Counters::read(&self.metrics, now_ms());
        let mut figures = Figures::default();
        self.shared
            .heartbeat_timeout_ms
            .store(engine.heartbeat_timeout_ms, Ordering::Relaxed);
        tracing::info!(server = %self.instance.id, region = %self.instance.region, enabled = self.section.enabled, "assignment driver started");
        loop {
            std::thread::sleep(self.tick);
            let now = now_ms();
            if let Some(groups) = lock(&self.shared.reloaded_groups).take() {
                // The lead's engine is rebuilt from the new groups and the
                // store (as after a change of lead): added groups are placed
                // (a withdrawn one continues its versions), removed ones are
                // no longer renewed and get withdrawn below.
                self.section.groups = groups;
                configured = configured_ids(&self.section);
                lead = None;
                tracing::info!(groups = configured.len(), "assignment: groups reloaded");
            }
            if now >= window.at_ms.saturating_add(window_ms) {
                let cur = Counters::read(&self.metrics, now);
                let counts = std::mem::take(&mut *lock(&self.shared.group_counts));
                figures = Figures::of(window, cur, counts);
                window = cur;
            }
            let leading = match self.store.try_lead() {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "assignment: cannot read the lead; not leading this tick");
                    false
                }
            };
            self.shared.leading.store(leading as u64, Ordering::Relaxed);
            let beat = ServerBeat {
                report: self
                    .instance
                    .report(figures.load, figures.latency_ms, figures.error_rate),
                at_ms: now,
                group_rates: figures.group_rates.clone(),
                lead: leading,
                groups_digest: Some(self.section.groups_digest()),
            };
            if let Err(e) = self.store.put_server_beat(&beat) {
                tracing::warn!(error = %e, "assignment: heartbeat not written");
            }
            if !leading {
                lead = None;
                // Only the lead compares the instances' groups.
                self.shared.config_mismatch.store(0, Ordering::Relaxed);
            } else if self.section.enabled {
                if let Err(e) = self.drive(now, &mut lead, &mut warn) {
                    tracing::warn!(error = %e, "assignment: the lead's run failed; rebuilding from the store next tick");
                    lead = None;
                }
            }
            match self.store.load_assignments() {
                Ok(stored) => {
                    self.gauges(&stored);
                    let mut wanted =
                        wanted_filters(&self.instance.id, self.uplink, leading, &stored);
                    wanted.extend(lingering.update(&self.instance.id, &stored, now));
                    if leading && self.section.enabled && lead.is_some() {
                        self.withdraw_unconfigured(now, &configured, &stored);
                    }
                    let grace = self.section.unsubscribe_grace_s.saturating_mul(1000);
                    let changes = subs.update(now, &wanted, grace);
                    *lock(&self.shared.filters) = subs.held().cloned().collect();
                    self.apply(changes);
                }
                Err(e) => tracing::warn!(error = %e, "assignment: cannot read the assignments"),
            }
        }
    }

    fn drive(
        &self,
        now: u64,
        lead: &mut Option<Lead>,
        warn: &mut WarnLimiter,
    ) -> Result<(), DriveError> {
        let beats = self.store.load_server_beats()?;
        let l = match lead {
            Some(l) => l,
            None => {
                let mut engine = AssignmentEngine::new(self.section.engine_config());
                for spec in self.section.group_specs() {
                    if let Err(e) = engine.handle_group(now, spec) {
                        tracing::warn!(error = %e, "assignment: group refused");
                    }
                }
                let stored = self.store.load_assignments()?;
                for s in &stored {
                    // An unconfigured group is not restored (the engine
                    // knows only configured ones) nor republished: it is
                    // withdrawn after this run.
                    if engine.group(&s.assignment.group).is_none() {
                        continue;
                    }
                    engine.restore_assignment(s.assignment.clone());
                    // The broker may have lost the retained copy.
                    self.publish(s);
                }
                // A configured group withdrawn earlier continues from its
                // last version (devices keep it as their floor).
                for spec in self.section.group_specs() {
                    if stored.iter().any(|s| s.assignment.group == spec.id) {
                        continue;
                    }
                    if let Some(last) = self.store.load_assignment_history(&spec.id, 1)?.pop() {
                        // Due for renewal at once: its retained copy was
                        // cleared, so it is published again (same version
                        // when its placement holds, the next one if not).
                        let mut a = last.assignment;
                        a.expires_at_ms = a.issued_at_ms;
                        engine.restore_assignment(a);
                    }
                }
                tracing::info!(
                    restored = stored.len(),
                    "assignment: leading; engine restored from the store"
                );
                lead.insert(Lead {
                    engine,
                    fed: BTreeMap::new(),
                    reasons: Vec::new(),
                    rates_at_ms: None,
                    key_file: self.store.load_meta()?.key_file,
                    shortfalls: ShortfallBook::restore(self.store.load_shortfalls()?),
                })
            }
        };
        let key_file = self.store.load_meta()?.key_file;
        if key_file != l.key_file {
            l.key_file = key_file;
            self.resign(now)?;
        }
        let fresh = feed_beats(&mut l.engine, &mut l.fed, &beats, now);
        let own = self.section.groups_digest();
        let mismatched = mismatched_configs(&own, &fresh);
        for b in &fresh {
            let id = &b.report.id;
            let differs = mismatched.contains(id);
            l.engine.handle_server_config(now, id, !differs);
            if differs && warn.allow(&format!("config-mismatch/{id}"), now) {
                tracing::warn!(
                    server = %id,
                    digest = b.groups_digest.as_deref().unwrap_or("-"),
                    lead_digest = %own,
                    "assignment: this instance's [[assignment.groups]] differ from the lead's; it gets no group until they match"
                );
            }
        }
        self.shared
            .config_mismatch
            .store(mismatched.len() as u64, Ordering::Relaxed);
        let mut rates: BTreeMap<&GroupId, f64> = BTreeMap::new();
        for b in &fresh {
            for (g, r) in &b.group_rates {
                *rates.entry(g).or_default() += r;
            }
        }
        // One observation per window: the heartbeats' rates change once a
        // window, so feeding every tick would repeat them.
        let window_ms = l.engine.config().heartbeat_interval_ms;
        if l.rates_at_ms
            .is_none_or(|t| now >= t.saturating_add(window_ms))
        {
            l.rates_at_ms = Some(now);
            for (g, r) in rates {
                if l.engine.group(g).is_some() {
                    let _ = l.engine.handle_group_rate(now, g, r);
                }
            }
        }
        let mut short_regions: BTreeSet<String> = BTreeSet::new();
        let mut ran = false;
        let mut key: Option<KeyPair> = None;
        for action in l.engine.poll(now) {
            match action {
                AssignAction::Publish { assignment, change } => {
                    let reasons = if matches!(
                        change,
                        shardline_allocator_core::assign::AssignmentChange::Renewed
                    ) {
                        Vec::new()
                    } else {
                        l.reasons.clone()
                    };
                    let key = key.get_or_insert_with(|| self.signing_key());
                    let sealed = seal_assignment(&assignment, &[&*key]);
                    let s = StoredAssignment {
                        assignment,
                        sealed,
                        change,
                        reasons,
                        at_ms: now,
                    };
                    // Persist before publishing: versions never go back.
                    if self.store.put_assignment(&s, MAX_HISTORY_PER_GROUP)? {
                        tracing::info!(group = %s.assignment.group, version = s.assignment.version, server = %s.assignment.server, change = ?s.change, "assignment published");
                        self.publish(&s);
                    } else {
                        self.shared.publish_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(group = %s.assignment.group, version = s.assignment.version, "a newer assignment is stored (another lead?); rebuilding");
                        return Err(DriveError::Superseded {
                            group: s.assignment.group,
                            version: s.assignment.version,
                        });
                    }
                }
                AssignAction::NeedCapacity(s) => {
                    let region = s.region.to_string();
                    self.shared.shortfall_events.fetch_add(1, Ordering::Relaxed);
                    if warn.allow(&region, now) {
                        tracing::warn!(region = %region, shortfall = s.shortfall, groups = s.groups.len(), "assignment: not enough capacity in this region");
                    }
                    short_regions.insert(region.clone());
                    l.shortfalls.need(&s, now);
                    lock(&self.shared.shortfalls).insert(region, s);
                }
                AssignAction::Rerun(summary) => {
                    ran = true;
                    let mut reruns = lock(&self.shared.reruns);
                    for r in &summary.reasons {
                        *reruns.entry(reason_label(r).to_owned()).or_default() += 1;
                    }
                    tracing::info!(reasons = ?summary.reasons, moved = summary.moved.len(), unplaced = summary.unplaced.len(), servers = summary.servers, "assignment run");
                    l.reasons = summary.reasons;
                }
                AssignAction::ServerLost {
                    server,
                    last_heartbeat_ms,
                } => {
                    tracing::warn!(%server, last_heartbeat_ms, "assignment: server lost (heartbeat timed out)");
                }
                AssignAction::Overloaded {
                    server,
                    load,
                    capacity,
                } => {
                    tracing::warn!(%server, load, capacity, "assignment: server overloaded");
                }
                AssignAction::Anomaly(a) => {
                    tracing::info!(anomaly = ?a, "assignment: group rate anomaly");
                }
            }
        }
        if ran {
            // A run without a shortfall for a region clears its gauge.
            for s in lock(&self.shared.shortfalls).values_mut() {
                if !short_regions.contains(s.region.as_str()) {
                    s.shortfall = 0.0;
                }
            }
            l.shortfalls.run_ended(&short_regions);
        }
        if let Some(records) = l.shortfalls.take_dirty() {
            if let Err(e) = self.store.put_shortfalls(&records) {
                tracing::warn!(error = %e, "assignment: capacity shortfalls not written; retrying next tick");
                l.shortfalls.write_failed();
            }
        }
        Ok(())
    }

    /// Withdraws the stored objects of groups not configured here: the
    /// withdrawal is committed, then the retained copy is cleared (an empty
    /// retained message); a failure is retried at the next tick.
    fn withdraw_unconfigured(
        &self,
        now: u64,
        configured: &BTreeSet<GroupId>,
        stored: &[StoredAssignment],
    ) {
        for s in assign_upkeep::unconfigured(configured, stored) {
            let row = assign_upkeep::withdrawal_row(s, now);
            let a = &s.assignment;
            match self.store.withdraw_assignment(&row, MAX_HISTORY_PER_GROUP) {
                Ok(true) => {
                    tracing::info!(group = %a.group, version = a.version, server = %a.server, expires_at_ms = a.expires_at_ms, "assignment withdrawn: the group is no longer configured");
                    let topic = topics::assignment(&a.group);
                    if let Err(e) = self.rt.block_on(self.client.publish(
                        topic,
                        QoS::AtLeastOnce,
                        true,
                        Vec::new(),
                    )) {
                        tracing::warn!(group = %a.group, error = %e, "the withdrawn object's retained copy not cleared; it expires on its own");
                    }
                }
                Ok(false) => {
                    tracing::debug!(group = %a.group, "withdrawal skipped: the stored version changed");
                }
                Err(e) => {
                    tracing::warn!(group = %a.group, error = %e, "assignment withdrawal not written; retrying next tick");
                }
            }
        }
    }

    /// The key instructions are signed with now: after a rotation the
    /// store names the new key file (read at each batch of publishes, which
    /// are rare); the key this instance started with otherwise.
    fn signing_key(&self) -> KeyPair {
        let rotated = self.store.load_meta().ok().and_then(|m| m.key_file);
        match rotated.map(|f| super::keys::read_secret(std::path::Path::new(&f))) {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "assignment: the rotated key cannot be read; signing with the start-up key");
                self.key.clone()
            }
            None => self.key.clone(),
        }
    }

    /// After a key rotation: every stored object signed again with the key
    /// in force (same object, same version; a device that already took it
    /// sees the same payload), persisted as a renewal, then republished, so
    /// that devices which applied the rotation need not wait for a renewal.
    fn resign(&self, now: u64) -> Result<(), DriveError> {
        let key = self.signing_key();
        tracing::info!(key_id = %key.id(), "assignment: signing key rotated; signing the stored objects again");
        for s in self.store.load_assignments()? {
            let s = StoredAssignment {
                sealed: seal_assignment(&s.assignment, &[&key]),
                change: shardline_allocator_core::assign::AssignmentChange::Renewed,
                reasons: Vec::new(),
                at_ms: now,
                ..s
            };
            if self.store.put_assignment(&s, MAX_HISTORY_PER_GROUP)? {
                self.publish(&s);
            }
        }
        Ok(())
    }

    fn publish(&self, s: &StoredAssignment) {
        let topic = topics::assignment(&s.assignment.group);
        let sent =
            self.rt.block_on(
                self.client
                    .publish(topic, QoS::AtLeastOnce, true, s.sealed.clone()),
            );
        match sent {
            Ok(()) => {
                self.shared.publishes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(group = %s.assignment.group, error = %e, "assignment publish not queued; the next lead or renewal republishes it");
            }
        }
    }

    fn apply(&self, c: SubChanges) {
        for f in c.subscribe {
            tracing::info!(filter = %f, "assignment: subscribing");
            if let Err(e) = self
                .rt
                .block_on(self.shared.link.subscribe(&self.client, f.clone()))
            {
                tracing::warn!(filter = %f, error = %e, "subscribe not queued");
            }
        }
        for f in c.unsubscribe {
            tracing::info!(filter = %f, "assignment: unsubscribing");
            if let Err(e) = self
                .rt
                .block_on(self.shared.link.unsubscribe(&self.client, f.clone()))
            {
                tracing::warn!(filter = %f, error = %e, "unsubscribe not queued");
            }
        }
    }

    fn gauges(&self, stored: &[StoredAssignment]) {
        let mut per_server: BTreeMap<String, u64> = BTreeMap::new();
        let mut versions = BTreeMap::new();
        for s in stored {
            *per_server
                .entry(s.assignment.server.to_string())
                .or_default() += 1;
            versions.insert(s.assignment.group.to_string(), s.assignment.version);
        }
        *lock(&self.shared.groups_per_server) = per_server;
        *lock(&self.shared.versions) = versions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_lost_filter_is_dropped_only_after_the_grace() {
        let mut s = Subscriptions::default();
        let c = s.update(0, &set(&["a", "b"]), 10);
        assert_eq!(c.subscribe, vec!["a", "b"]);
        assert!(s.update(1, &set(&["a", "b"]), 10) == SubChanges::default());
        // b lost at 5: held until 15.
        assert!(s.update(5, &set(&["a"]), 10).unsubscribe.is_empty());
        assert!(s.update(14, &set(&["a"]), 10).unsubscribe.is_empty());
        assert_eq!(s.update(15, &set(&["a"]), 10).unsubscribe, vec!["b"]);
        assert_eq!(s.held().cloned().collect::<Vec<_>>(), vec!["a"]);
        // Lost and regained within the grace: never unsubscribed, not
        // subscribed twice.
        s.update(20, &set(&[]), 10);
        let c = s.update(25, &set(&["a"]), 10);
        assert_eq!(c, SubChanges::default());
        assert!(s.update(40, &set(&["a"]), 10).unsubscribe.is_empty());
    }

    #[test]
    fn routed_mode_reads_plain_uplinks_only_while_leading() {
        use shardline_allocator_core::assign::AssignmentChange;
        use shardline_shared::assign::{Assignment, Region};
        let me = ServerId::new("alloc-a").unwrap();
        let mk = |g: &str, server: &str| StoredAssignment {
            assignment: Assignment {
                group: GroupId::new(g).unwrap(),
                version: 1,
                issued_at_ms: 1,
                expires_at_ms: 2,
                region: Region::new("eu").unwrap(),
                server: ServerId::new(server).unwrap(),
                endpoints: vec!["mqtt://h:1".into()],
            },
            sealed: vec![],
            change: AssignmentChange::New,
            reasons: vec![],
            at_ms: 1,
        };
        let stored = [mk("t.eu.a", "alloc-a"), mk("t.eu.b", "alloc-b")];
        let w = wanted_filters(&me, UplinkMode::Routed, false, &stored);
        assert_eq!(w, set(&["shardline/v1/g/t/eu/a/dev/+/+"]));
        let w = wanted_filters(&me, UplinkMode::Routed, true, &stored);
        assert_eq!(w.len(), 1 + plain_uplink_filters().len());
        assert!(w.contains(topics::ALL_REPORTS));
        // Shared mode: the plain topics stay on `$share` (the MQTT link).
        let w = wanted_filters(&me, UplinkMode::Shared, true, &stored);
        assert_eq!(w, set(&["shardline/v1/g/t/eu/a/dev/+/+"]));
    }

    #[test]
    fn figures_are_per_second_over_the_window() {
        let g = GroupId::new("t.eu.a").unwrap();
        let prev = Counters {
            at_ms: 1_000,
            reports: 10,
            batches: 5,
            micros: 1_000,
            errors: 0,
        };
        let cur = Counters {
            at_ms: 3_000,
            reports: 50,
            batches: 9,
            micros: 9_000,
            errors: 2,
        };
        let f = Figures::of(prev, cur, [(g.clone(), 30)].into());
        assert_eq!(f.load, 20.0);
        assert_eq!(f.latency_ms, 2.0);
        assert_eq!(f.error_rate, 0.05);
        assert_eq!(f.group_rates, vec![(g, 15.0)]);
        // Nothing happened: zeros, no division by zero.
        let f = Figures::of(prev, prev, BTreeMap::new());
        assert_eq!(f, Figures::default());
    }

    /// A heartbeat of server `id` in region `eu` at `at_ms`, without digest.
    fn test_beat(id: &str, at_ms: u64) -> ServerBeat {
        use shardline_allocator_core::assign::ServerReport;
        use shardline_shared::assign::Region;
        ServerBeat {
            report: ServerReport {
                id: ServerId::new(id).unwrap(),
                region: Region::new("eu").unwrap(),
                capacity: 10.0,
                endpoints: vec!["mqtt://h:1".into()],
                p99_latency_ms: 1.0,
                error_rate: 0.0,
                load: 0.0,
            },
            at_ms,
            group_rates: vec![],
            lead: false,
            groups_digest: None,
        }
    }

    #[test]
    fn only_instances_with_another_groups_digest_are_mismatched() {
        let beat = |id: &str, digest: Option<&str>| ServerBeat {
            groups_digest: digest.map(str::to_owned),
            ..test_beat(id, 1)
        };
        let beats = [
            beat("lead", Some("aa")),
            beat("same", Some("aa")),
            beat("other", Some("bb")),
            beat("old", None),
        ];
        let fresh: Vec<&ServerBeat> = beats.iter().collect();
        let m = mismatched_configs("aa", &fresh);
        assert_eq!(
            m.into_iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            vec!["other"]
        );
    }

    #[test]
    fn a_regions_warning_is_logged_at_most_once_a_minute() {
        let mut w = WarnLimiter::default();
        assert!(w.allow("eu", 0));
        assert!(!w.allow("eu", 59_999));
        assert!(w.allow("us", 10));
        assert!(w.allow("eu", 60_000));
    }

    #[test]
    fn stale_heartbeats_are_not_fed_and_each_beat_is_fed_once() {
        use shardline_allocator_core::assign::AssignConfig;
        let cfg = AssignConfig {
            heartbeat_timeout_ms: 1_000,
            ..AssignConfig::default()
        };
        let mut engine = AssignmentEngine::new(cfg);
        let beat = test_beat;
        let mut fed = BTreeMap::new();
        let beats = [beat("a", 9_500), beat("b", 8_000)];
        let fresh = feed_beats(&mut engine, &mut fed, &beats, 10_000);
        assert_eq!(fresh.len(), 1);
        assert!(engine.server(&ServerId::new("a").unwrap()).is_some());
        assert!(engine.server(&ServerId::new("b").unwrap()).is_none());
        assert_eq!(fed.len(), 1);
        feed_beats(&mut engine, &mut fed, &beats, 10_100);
        assert_eq!(fed[&ServerId::new("a").unwrap()], 9_500);
    }
}
