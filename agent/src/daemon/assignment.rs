//! The agent side of seed 001's assignment (issue 19): which broker
//! endpoint the device connects to and on which topics it sends its uplinks,
//! decided by [`RouteCore`], sans-IO (state + now + event → [`RouteAction`]s).
//! The daemon (`agent.rs`) executes the actions: it persists the
//! [`AssignmentState`] in `assignment.json` before acknowledging the object,
//! restarts the MQTT link on another endpoint, and re-subscribes to fetch
//! the retained object again.
//!
//! States: *bootstrap* (nothing accepted yet: the bootstrap endpoints, plain
//! `dev/{id}/…` topics), *assigned* (a valid object: its endpoints, the
//! group-routed topics `g/{tenant}/{region}/{capability}/dev/{id}/…`), *expired* (the object's
//! expiry passed without a renewal: back to the bootstrap endpoints and plain
//! topics; the version floor stays, so a replayed older object is refused).
//!
//! Endpoint failover bound: a connection that fails or drops moves the link
//! to the next endpoint of the list in use, cycling. The first pass through
//! the list switches at once; each further pass waits
//! [`FIRST_CYCLE_DELAY_MS`] doubling up to [`MAX_SWITCH_DELAY_MS`] (5 s), so
//! a fleet whose every endpoint is down does not spin. A node that refuses
//! or resets connections (killed, stopped) is therefore left within
//! [`MAX_SWITCH_DELAY_MS`] plus one connection attempt of the drop; a node
//! that silently stops answering is first detected by the MQTT keep-alive
//! (1.5 × `broker.keep_alive_s`) or rumqttc's 5 s connect timeout.
//!
//! Return home: after a failover the link sits on a later endpoint of the
//! list while the first (the nearest, the one the allocator prefers) may
//! come back. While connected to a later endpoint the core asks the daemon
//! to probe the first one ([`RouteAction::Probe`]: a TCP connection, never
//! an MQTT session, which would take over the device's own session) after
//! [`HOME_PROBE_FIRST_MS`] (configurable), doubling while it stays down up
//! to [`HOME_PROBE_MAX_MS`] (5 min). When the probe is accepted the link
//! moves back with a planned move (clean DISCONNECT, like a new version's
//! move). Bound: a first endpoint that is back is used again within the
//! probe period in force (30 s after the failover, at most 5 min) plus one
//! probe and one connection. A return that then fails is an ordinary
//! failover, and the next probe waits twice as long.
//!
//! Nothing acknowledged is lost across a switch: reports and acks live in
//! the on-disk outbox until their PUBACK, and the topic of each is chosen
//! when it is handed to the client ([`RouteCore::uplink_topic`]), so what was
//! in flight on the old endpoint is sent again on the new one, on the topic
//! the new routing asks for.

use shardline_shared::assign::{
    endpoint_at, handle_assignment, refresh_due, AssignmentRefusal, AssignmentState,
    AssignmentVerdict, EndpointSource, GroupId,
};
use shardline_shared::msg::KeySet;
use shardline_shared::topics::{self, TopicKind};
use shardline_shared::DeviceId;
use std::collections::BTreeMap;

/// Delay before the second pass through an endpoint list; doubles per pass.
pub const FIRST_CYCLE_DELAY_MS: u64 = 500;
/// Longest wait before trying the next endpoint (see the module docs).
pub const MAX_SWITCH_DELAY_MS: u64 = 5_000;
/// Shortest and longest period between two re-fetches of the object once
/// its refresh time has come (a tenth of its lifetime in between).
pub const MIN_REFETCH_MS: u64 = 1_000;
pub const MAX_REFETCH_MS: u64 = 30_000;
/// First wait before probing the first endpoint again after a failover
/// left it (the default of `[assignment] home_probe_s`).
pub const HOME_PROBE_FIRST_MS: u64 = 30_000;
/// Longest wait between two probes of a first endpoint that stays down.
pub const HOME_PROBE_MAX_MS: u64 = 300_000;

/// Why the link moves to another endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchReason {
    /// A new version names endpoints without the one in use.
    NewVersion { version: u64 },
    /// The connection to `from` failed or dropped.
    Failover { from: String },
    /// The object expired: back to the bootstrap endpoints.
    Expired { version: u64 },
    /// The first endpoint of the list accepted a probe again: leave the
    /// later endpoint `from` for it.
    ReturnHome { from: String },
}

impl SwitchReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SwitchReason::NewVersion { .. } => "new_version",
            SwitchReason::Failover { .. } => "failover",
            SwitchReason::Expired { .. } => "expired",
            SwitchReason::ReturnHome { .. } => "return_home",
        }
    }
}

/// What the daemon does for the route core, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    /// Write this state to `assignment.json` (atomic, durable) before the
    /// object's PUBACK.
    Persist(AssignmentState),
    /// Drop the current connection and connect to `url`.
    Connect { url: String, reason: SwitchReason },
    /// Fetch the retained object again (unsubscribe, subscribe).
    Refetch,
    /// Try a TCP connection to `url` (the first endpoint of the list) and
    /// report the outcome with [`RouteCore::on_probe`].
    Probe { url: String },
    /// The held object expired; `refetch_unanswered`: re-fetches were sent
    /// and no fresh object came back before the expiry (worth a warning).
    Expired {
        version: u64,
        refetch_unanswered: bool,
    },
}

/// Counters for status.json.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteCounters {
    pub accepted: u64,
    pub renewed: u64,
    pub duplicates: u64,
    /// Refused objects by reason ([`refusal_name`]).
    pub refused: BTreeMap<&'static str, u64>,
    /// Link moves to another endpoint, by any reason.
    pub endpoint_switches: u64,
    /// Expiries that sent the device back to bootstrap.
    pub fallbacks: u64,
    /// Probes of the first endpoint sent, and moves back to it.
    pub home_probes: u64,
    pub returns_home: u64,
    /// Empty payloads on the group's topic: the allocator withdrew the
    /// group's object (cleared the retained message).
    pub withdrawn: u64,
}

/// A stable name for a refusal (status.json keys, log fields).
pub fn refusal_name(r: &AssignmentRefusal) -> &'static str {
    match r {
        AssignmentRefusal::Malformed => "malformed",
        AssignmentRefusal::BadSignature => "bad_signature",
        AssignmentRefusal::UnknownKey => "unknown_key",
        AssignmentRefusal::WrongGroup => "wrong_group",
        AssignmentRefusal::Rollback { .. } => "rollback",
        AssignmentRefusal::Equivocation { .. } => "equivocation",
        AssignmentRefusal::Stale { .. } => "stale",
        AssignmentRefusal::Expired => "expired",
        AssignmentRefusal::FromFuture => "from_future",
    }
}

/// The routing decisions of one device in one group; see the module docs.
#[derive(Debug)]
pub struct RouteCore {
    state: AssignmentState,
    bootstrap: Vec<String>,
    /// The endpoint list in use and where it comes from.
    urls: Vec<String>,
    source: EndpointSource,
    /// Index into `urls` of the endpoint the link is on (or trying).
    index: usize,
    connected: bool,
    /// Failed or dropped connections since the last CONNACK.
    failures: u32,
    /// A scheduled move to `urls[index]` at this time.
    pending: Option<(u64, usize)>,
    /// When the last re-fetch went out (reset by a fresh object).
    refetched_at: Option<u64>,
    /// The next probe of `urls[0]` while connected to a later endpoint.
    home_probe: Option<HomeProbe>,
    /// The wait before the next probe (doubles while home stays down).
    home_probe_ms: u64,
    home_probe_first_ms: u64,
    counters: RouteCounters,
}

/// A scheduled (or sent) probe of the first endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HomeProbe {
    at: u64,
    /// Sent, its outcome not reported yet.
    sent: bool,
}

impl RouteCore {
    /// Restores a device's routing from its persisted state at `now_ms`.
    /// `bootstrap` must not be empty (the configuration guarantees it).
    pub fn new(state: AssignmentState, bootstrap: Vec<String>, now_ms: u64) -> Self {
        let e = endpoint_at(&state, now_ms, &bootstrap);
        Self {
            state,
            bootstrap,
            urls: e.urls,
            source: e.source,
            index: 0,
            connected: false,
            failures: 0,
            pending: None,
            refetched_at: None,
            home_probe: None,
            home_probe_ms: HOME_PROBE_FIRST_MS,
            home_probe_first_ms: HOME_PROBE_FIRST_MS,
            counters: RouteCounters::default(),
        }
    }

    /// Sets the first wait before probing the first endpoint again
    /// (`[assignment] home_probe_s`; at least 1 ms).
    pub fn with_home_probe(mut self, first_ms: u64) -> Self {
        self.home_probe_first_ms = first_ms.max(1);
        self.home_probe_ms = self.home_probe_first_ms;
        self
    }

    pub fn group(&self) -> &GroupId {
        &self.state.group
    }

    pub fn state(&self) -> &AssignmentState {
        &self.state
    }

    /// The endpoint the link should be on now.
    pub fn endpoint(&self) -> &str {
        &self.urls[self.index.min(self.urls.len() - 1)]
    }

    pub fn source(&self) -> &EndpointSource {
        &self.source
    }

    pub fn counters(&self) -> &RouteCounters {
        &self.counters
    }

    /// Whether uplinks go on the group-routed topics at `now_ms`: only under
    /// a valid object (expiry is checked here too, between two ticks).
    pub fn routed(&self, now_ms: u64) -> bool {
        matches!(self.source, EndpointSource::Assigned { .. })
            && self
                .state
                .current
                .as_ref()
                .is_some_and(|h| now_ms < h.assignment.expires_at_ms)
    }

    /// The topic for an uplink of `kind` at `now_ms`: group-routed under a
    /// valid assignment for the routable kinds, else the plain one.
    pub fn uplink_topic(&self, device: &DeviceId, kind: TopicKind, now_ms: u64) -> Option<String> {
        if kind.is_routable() && self.routed(now_ms) {
            return Some(topics::routed(&self.state.group, device, kind));
        }
        None
    }

    /// The link is up (CONNACK) at `now_ms`. On a later endpoint of the
    /// list, a probe of the first is scheduled; on the first, the probe
    /// period starts over.
    pub fn on_connected(&mut self, now_ms: u64) {
        self.connected = true;
        self.failures = 0;
        self.pending = None;
        if self.index == 0 {
            self.home_probe_ms = self.home_probe_first_ms;
        }
        self.arm_home_probe(now_ms);
    }

    /// Schedules a probe of `urls[0]` if the link is up on a later endpoint
    /// and none is scheduled.
    fn arm_home_probe(&mut self, now_ms: u64) {
        if self.connected && self.index > 0 && self.index < self.urls.len() {
            if self.home_probe.is_none() {
                self.home_probe = Some(HomeProbe {
                    at: now_ms.saturating_add(self.home_probe_ms),
                    sent: false,
                });
            }
        } else {
            self.home_probe = None;
        }
    }

    /// The outcome of a [`RouteAction::Probe`] of `url` at `now_ms`:
    /// accepted, the link moves back to the first endpoint (a planned move);
    /// refused, the next probe waits twice as long (up to
    /// [`HOME_PROBE_MAX_MS`]). An outcome that no longer applies (the list
    /// or the endpoint changed meanwhile) is ignored.
    pub fn on_probe(&mut self, url: &str, accepted: bool, now_ms: u64) -> Vec<RouteAction> {
        let mut out = Vec::new();
        let current = matches!(self.home_probe, Some(HomeProbe { sent: true, .. }));
        if !current || self.index == 0 || self.urls.first().map(String::as_str) != Some(url) {
            return out;
        }
        self.home_probe = None;
        // Doubled either way: if the return fails (the node accepts TCP but
        // not MQTT yet), the next probe waits longer.
        self.home_probe_ms = self
            .home_probe_ms
            .saturating_mul(2)
            .min(HOME_PROBE_MAX_MS.max(self.home_probe_first_ms));
        if !accepted || !self.connected {
            self.arm_home_probe(now_ms);
            return out;
        }
        let from = self.endpoint().to_owned();
        self.index = 0;
        self.pending = None;
        self.failures = 0;
        self.connected = false;
        self.counters.endpoint_switches += 1;
        self.counters.returns_home += 1;
        out.push(RouteAction::Connect {
            url: self.urls[0].clone(),
            reason: SwitchReason::ReturnHome { from },
        });
        out
    }

    /// The connection failed or dropped: schedule the next endpoint of the
    /// list (see the module docs for the delays). With one endpoint the
    /// link's own backoff retries it.
    pub fn on_down(&mut self, now_ms: u64) -> Vec<RouteAction> {
        self.connected = false;
        self.home_probe = None;
        if self.urls.len() < 2 || self.pending.is_some() {
            return Vec::new();
        }
        self.failures = self.failures.saturating_add(1);
        let n = self.urls.len() as u32;
        let pass = (self.failures - 1) / n;
        let delay = if pass == 0 {
            0
        } else {
            FIRST_CYCLE_DELAY_MS
                .saturating_mul(1 << (pass - 1).min(16))
                .min(MAX_SWITCH_DELAY_MS)
        };
        let next = (self.index + 1) % self.urls.len();
        self.pending = Some((now_ms.saturating_add(delay), next));
        self.on_tick(now_ms)
    }

    /// When [`RouteCore::on_tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut at = self.pending.map(|(t, _)| t);
        let mut fold = |t: u64| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(HomeProbe { at: t, sent: false }) = self.home_probe {
            fold(t);
        }
        if let (EndpointSource::Assigned { .. }, Some(h)) = (&self.source, &self.state.current) {
            fold(h.assignment.expires_at_ms);
            // Re-fetches need a connection; without one the next CONNACK
            // subscribes anyway (and a past deadline here would spin).
            if self.connected {
                fold(match self.refetched_at {
                    Some(t) => t.saturating_add(self.refetch_period()),
                    None => h.assignment.refresh_at_ms(),
                });
            }
        }
        at
    }

    fn refetch_period(&self) -> u64 {
        let life = self.state.current.as_ref().map_or(0, |h| {
            h.assignment
                .expires_at_ms
                .saturating_sub(h.assignment.issued_at_ms)
        });
        (life / 10).clamp(MIN_REFETCH_MS, MAX_REFETCH_MS)
    }

    /// Time passed: a due endpoint switch, an expiry, a re-fetch.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<RouteAction> {
        let mut out = Vec::new();
        if let EndpointSource::Assigned { version, .. } = self.source {
            let e = endpoint_at(&self.state, now_ms, &self.bootstrap);
            if !matches!(e.source, EndpointSource::Assigned { .. }) {
                self.counters.fallbacks += 1;
                out.push(RouteAction::Expired {
                    version,
                    refetch_unanswered: self.refetched_at.is_some(),
                });
                self.refetched_at = None;
                self.adopt(
                    e.urls,
                    e.source,
                    SwitchReason::Expired { version },
                    &mut out,
                );
                self.arm_home_probe(now_ms);
                return out;
            }
            if self.connected && refresh_due(&self.state, now_ms) {
                let due = match self.refetched_at {
                    Some(t) => now_ms >= t.saturating_add(self.refetch_period()),
                    None => true,
                };
                if due {
                    self.refetched_at = Some(now_ms);
                    out.push(RouteAction::Refetch);
                }
            }
        }
        if let Some((at, next)) = self.pending {
            if now_ms >= at {
                self.pending = None;
                let from = self.endpoint().to_owned();
                self.index = next % self.urls.len();
                self.counters.endpoint_switches += 1;
                out.push(RouteAction::Connect {
                    url: self.endpoint().to_owned(),
                    reason: SwitchReason::Failover { from },
                });
            }
        }
        if let Some(p) = &mut self.home_probe {
            if !p.sent && now_ms >= p.at && self.connected && self.index > 0 {
                p.sent = true;
                self.counters.home_probes += 1;
                out.push(RouteAction::Probe {
                    url: self.urls[0].clone(),
                });
            }
        }
        out
    }

    /// Moves to a new endpoint list: stays on the current endpoint when the
    /// new list holds it (only its position changes), else connects to the
    /// new list's first.
    fn adopt(
        &mut self,
        urls: Vec<String>,
        source: EndpointSource,
        reason: SwitchReason,
        out: &mut Vec<RouteAction>,
    ) {
        let current = self.endpoint().to_owned();
        self.source = source;
        self.pending = None;
        self.failures = 0;
        // A new list: a probe of the old list's first endpoint is moot.
        self.home_probe = None;
        match urls.iter().position(|u| *u == current) {
            Some(i) => {
                self.urls = urls;
                self.index = i;
            }
            None => {
                self.urls = urls;
                self.index = 0;
                self.connected = false;
                self.counters.endpoint_switches += 1;
                out.push(RouteAction::Connect {
                    url: self.urls[0].clone(),
                    reason,
                });
            }
        }
    }

    /// Whether a payload on the group's assignment topic is the allocator's
    /// withdrawal (an empty retained message clears the broker's copy).
    pub fn is_withdrawal(bytes: &[u8]) -> bool {
        bytes.is_empty()
    }

    /// The group's object was withdrawn. Not a refusal, and not a reason to
    /// drop what is held: a valid object stays in use until its expiry
    /// (re-fetches then find nothing, and the expiry sends the device back
    /// to its bootstrap endpoints and plain topics, the floor kept).
    pub fn on_withdrawn(&mut self) {
        self.counters.withdrawn += 1;
    }

    /// An object arrived on the group's assignment topic. Returns the
    /// verdict and the actions; a refusal changes nothing but a counter.
    pub fn on_object(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        keys: &KeySet,
    ) -> (AssignmentVerdict, Vec<RouteAction>) {
        let d = handle_assignment(&self.state, bytes, now_ms, keys, &self.bootstrap);
        let mut out = Vec::new();
        match &d.verdict {
            AssignmentVerdict::Refused(r) => {
                *self.counters.refused.entry(refusal_name(r)).or_default() += 1;
                return (d.verdict, out);
            }
            AssignmentVerdict::Duplicate { .. } => {
                self.counters.duplicates += 1;
                return (d.verdict, out);
            }
            AssignmentVerdict::Renewed { .. } => {
                self.counters.renewed += 1;
            }
            AssignmentVerdict::Accepted { .. } => {
                self.counters.accepted += 1;
            }
        }
        self.refetched_at = None;
        self.state = d.state.clone();
        out.push(RouteAction::Persist(d.state));
        let version = match &d.endpoints.source {
            EndpointSource::Assigned { version, .. } => *version,
            _ => 0,
        };
        let same_list = self.urls == d.endpoints.urls && self.source == d.endpoints.source;
        if !same_list {
            self.adopt(
                d.endpoints.urls,
                d.endpoints.source,
                SwitchReason::NewVersion { version },
                &mut out,
            );
            self.arm_home_probe(now_ms);
        }
        (d.verdict, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::assign::{seal_assignment, Assignment, Region, ServerId};
    use shardline_shared::msg::PublicKeyEntry;
    use shardline_shared::sign::KeyPair;

    const T0: u64 = 1_800_000_000_000;

    fn key() -> KeyPair {
        KeyPair::from_seed(&[7; 32])
    }

    fn keys() -> KeySet {
        let k = key();
        KeySet {
            epoch: 0,
            keys: vec![PublicKeyEntry {
                key_id: k.id(),
                public_key: k.public_key(),
            }],
        }
    }

    fn group() -> GroupId {
        GroupId::new("acme.eu-west.vpn").unwrap()
    }

    fn object(version: u64, issued: u64, life: u64, endpoints: &[&str]) -> Vec<u8> {
        let a = Assignment {
            group: group(),
            version,
            issued_at_ms: issued,
            expires_at_ms: issued + life,
            region: Region::new("eu-west").unwrap(),
            server: ServerId::new("alloc-a").unwrap(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        };
        seal_assignment(&a, &[&key()])
    }

    fn core() -> RouteCore {
        RouteCore::new(
            AssignmentState::bootstrap(group()),
            vec!["mqtt://boot:1883".into()],
            T0,
        )
    }

    fn connects(actions: &[RouteAction]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                RouteAction::Connect { url, .. } => Some(url.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_version_moves_the_link_and_routes_the_uplinks() {
        let mut c = core();
        let dev = DeviceId::new("d1").unwrap();
        assert_eq!(c.endpoint(), "mqtt://boot:1883");
        assert_eq!(c.uplink_topic(&dev, TopicKind::Report, T0), None);
        c.on_connected(T0);
        let (v, a) = c.on_object(
            &object(1, T0, 60_000, &["mqtt://a", "mqtt://b"]),
            T0,
            &keys(),
        );
        assert!(matches!(v, AssignmentVerdict::Accepted { version: 1, .. }));
        assert!(matches!(a[0], RouteAction::Persist(_)), "persisted first");
        assert_eq!(connects(&a), vec!["mqtt://a"]);
        assert_eq!(
            c.uplink_topic(&dev, TopicKind::Report, T0 + 1).as_deref(),
            Some("shardline/v1/g/acme/eu-west/vpn/dev/d1/report")
        );
        assert_eq!(c.uplink_topic(&dev, TopicKind::Status, T0 + 1), None);
        // A new version that still holds the endpoint in use: no reconnect.
        c.on_connected(T0);
        let (_, a) = c.on_object(
            &object(2, T0 + 5, 60_000, &["mqtt://c", "mqtt://a"]),
            T0 + 10,
            &keys(),
        );
        assert!(connects(&a).is_empty());
        assert_eq!(c.endpoint(), "mqtt://a");
        assert_eq!(c.counters().endpoint_switches, 1);
    }

    #[test]
    fn a_refused_object_changes_nothing_and_is_counted() {
        let mut c = core();
        c.on_object(&object(3, T0, 60_000, &["mqtt://a"]), T0, &keys());
        let before = c.state().clone();
        for bytes in [
            object(2, T0 + 1, 60_000, &["mqtt://x"]),
            object(3, T0 + 1, 60_000, &["mqtt://x"]),
            object(9, T0 - 120_000, 60_000, &["mqtt://x"]),
            b"garbage".to_vec(),
        ] {
            let (v, a) = c.on_object(&bytes, T0 + 2, &keys());
            assert!(matches!(v, AssignmentVerdict::Refused(_)), "{v:?}");
            assert!(a.is_empty());
        }
        assert_eq!(c.state(), &before);
        assert_eq!(c.endpoint(), "mqtt://a");
        let r = &c.counters().refused;
        assert_eq!(
            (
                r["rollback"],
                r["equivocation"],
                r["expired"],
                r["malformed"]
            ),
            (1, 1, 1, 1)
        );
        let other = KeyPair::from_seed(&[8; 32]);
        let a = Assignment {
            group: group(),
            version: 10,
            issued_at_ms: T0,
            expires_at_ms: T0 + 60_000,
            region: Region::new("eu-west").unwrap(),
            server: ServerId::new("evil").unwrap(),
            endpoints: vec!["mqtt://evil".into()],
        };
        let (v, _) = c.on_object(&seal_assignment(&a, &[&other]), T0 + 3, &keys());
        assert_eq!(v, AssignmentVerdict::Refused(AssignmentRefusal::UnknownKey));
        let elsewhere = Assignment {
            group: GroupId::new("acme.us-east.vpn").unwrap(),
            ..a
        };
        let (v, _) = c.on_object(&seal_assignment(&elsewhere, &[&key()]), T0 + 3, &keys());
        assert_eq!(v, AssignmentVerdict::Refused(AssignmentRefusal::WrongGroup));
        assert_eq!(c.state(), &before);
        assert_eq!(c.counters().refused.values().sum::<u64>(), 6);
    }

    #[test]
    fn a_dead_endpoint_is_left_at_once_then_cycling_slows_down_up_to_the_bound() {
        let mut c = core();
        c.on_object(
            &object(1, T0, 600_000, &["mqtt://a", "mqtt://b", "mqtt://c"]),
            T0,
            &keys(),
        );
        c.on_connected(T0);
        let mut now = T0 + 1000;
        assert_eq!(
            connects(&c.on_down(now)),
            vec!["mqtt://b"],
            "first pass: at once"
        );
        assert_eq!(connects(&c.on_down(now)), vec!["mqtt://c"]);
        assert_eq!(connects(&c.on_down(now)), vec!["mqtt://a"]);
        // Second pass: FIRST_CYCLE_DELAY_MS, then doubling, capped.
        let mut waits = Vec::new();
        for _ in 0..18 {
            assert!(connects(&c.on_down(now)).is_empty());
            // The link's own retries while a switch is pending change nothing.
            assert!(c.on_down(now).is_empty());
            let due = c.next_deadline().unwrap();
            assert!(connects(&c.on_tick(due - 1)).is_empty());
            assert_eq!(connects(&c.on_tick(due)).len(), 1);
            waits.push(due - now);
            now = due;
        }
        assert_eq!(&waits[..7], &[500, 500, 500, 1000, 1000, 1000, 2000]);
        assert!(waits.iter().all(|&w| w <= MAX_SWITCH_DELAY_MS));
        assert_eq!(*waits.last().unwrap(), MAX_SWITCH_DELAY_MS);
        // A connection resets the cycle: the next drop switches at once.
        c.on_connected(T0);
        assert_eq!(connects(&c.on_down(now)).len(), 1);
    }

    #[test]
    fn refresh_refetches_and_expiry_falls_back_to_bootstrap_keeping_the_floor() {
        let mut c = core();
        let dev = DeviceId::new("d1").unwrap();
        c.on_object(&object(4, T0, 30_000, &["mqtt://a"]), T0, &keys());
        c.on_connected(T0);
        assert!(c.on_tick(T0 + 19_999).is_empty());
        assert_eq!(c.next_deadline(), Some(T0 + 20_000), "refresh at 2/3");
        assert_eq!(c.on_tick(T0 + 20_000), vec![RouteAction::Refetch]);
        assert!(
            c.on_tick(T0 + 20_500).is_empty(),
            "not again before the period"
        );
        assert_eq!(c.on_tick(T0 + 23_000), vec![RouteAction::Refetch]);
        let a = c.on_tick(T0 + 30_000);
        assert_eq!(
            a[0],
            RouteAction::Expired {
                version: 4,
                refetch_unanswered: true
            }
        );
        assert_eq!(connects(&a), vec!["mqtt://boot:1883"]);
        assert_eq!(c.uplink_topic(&dev, TopicKind::Report, T0 + 30_000), None);
        assert_eq!(c.counters().fallbacks, 1);
        assert!(
            c.on_tick(T0 + 90_000).is_empty(),
            "no refetch loop when expired"
        );
        // The floor stays: an older version replayed later is refused.
        let (v, _) = c.on_object(
            &object(3, T0 + 31_000, 30_000, &["mqtt://x"]),
            T0 + 31_000,
            &keys(),
        );
        assert_eq!(
            v,
            AssignmentVerdict::Refused(AssignmentRefusal::Rollback { held: 4, got: 3 })
        );
        // A renewal after expiry routes again.
        c.on_connected(T0);
        let (v, a) = c.on_object(
            &object(4, T0 + 32_000, 30_000, &["mqtt://a"]),
            T0 + 32_000,
            &keys(),
        );
        assert!(matches!(v, AssignmentVerdict::Renewed { version: 4, .. }));
        assert_eq!(connects(&a), vec!["mqtt://a"]);
        assert!(c.routed(T0 + 32_001));
    }

    #[test]
    fn offline_there_is_no_refresh_deadline_only_the_expiry() {
        let mut c = core();
        c.on_object(&object(1, T0, 30_000, &["mqtt://a"]), T0, &keys());
        assert_eq!(c.next_deadline(), Some(T0 + 30_000));
        assert!(c.on_tick(T0 + 25_000).is_empty());
        c.on_connected(T0);
        assert_eq!(c.next_deadline(), Some(T0 + 20_000));
    }

    #[test]
    fn a_renewal_postpones_the_refresh_and_keeps_the_link() {
        let mut c = core();
        c.on_object(&object(1, T0, 30_000, &["mqtt://a"]), T0, &keys());
        c.on_connected(T0);
        assert_eq!(c.on_tick(T0 + 20_000), vec![RouteAction::Refetch]);
        let (v, a) = c.on_object(
            &object(1, T0 + 20_001, 30_000, &["mqtt://a"]),
            T0 + 20_002,
            &keys(),
        );
        assert!(matches!(v, AssignmentVerdict::Renewed { .. }));
        assert!(connects(&a).is_empty());
        assert!(
            c.on_tick(T0 + 31_000).is_empty(),
            "no expiry, no refetch yet"
        );
        assert_eq!(c.next_deadline(), Some(T0 + 20_001 + 20_000));
    }

    #[test]
    fn a_restored_expired_state_starts_on_bootstrap() {
        let mut c = core();
        c.on_object(&object(5, T0, 10_000, &["mqtt://a"]), T0, &keys());
        let c2 = RouteCore::new(
            c.state().clone(),
            vec!["mqtt://boot:1883".into()],
            T0 + 10_000,
        );
        assert_eq!(c2.endpoint(), "mqtt://boot:1883");
        assert_eq!(
            c2.source(),
            &EndpointSource::BootstrapExpired { version: 5 }
        );
        let c3 = RouteCore::new(
            c.state().clone(),
            vec!["mqtt://boot:1883".into()],
            T0 + 9_999,
        );
        assert_eq!(c3.endpoint(), "mqtt://a");
    }

    fn probes(actions: &[RouteAction]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                RouteAction::Probe { url } => Some(url.as_str()),
                _ => None,
            })
            .collect()
    }

    /// On `mqtt://b` after `mqtt://a` dropped, connected at `T0 + 1000`.
    fn failed_over() -> RouteCore {
        let mut c = core().with_home_probe(30_000);
        c.on_object(
            &object(1, T0, 3_600_000, &["mqtt://a", "mqtt://b", "mqtt://c"]),
            T0,
            &keys(),
        );
        c.on_connected(T0);
        assert_eq!(c.next_deadline(), Some(T0 + 2_400_000), "no probe at home");
        assert_eq!(connects(&c.on_down(T0 + 1000)), vec!["mqtt://b"]);
        c.on_connected(T0 + 1000);
        c
    }

    #[test]
    fn after_a_failover_the_first_endpoint_is_probed_and_the_link_returns_to_it() {
        let mut c = failed_over();
        assert_eq!(c.next_deadline(), Some(T0 + 31_000));
        assert!(c.on_tick(T0 + 30_999).is_empty());
        let a = c.on_tick(T0 + 31_000);
        assert_eq!(probes(&a), vec!["mqtt://a"]);
        assert!(connects(&a).is_empty(), "a probe is not a move");
        // While the probe is out, no deadline spins on it.
        assert_eq!(c.next_deadline(), Some(T0 + 2_400_000));
        assert!(c.on_tick(T0 + 40_000).is_empty(), "not probed twice");
        let a = c.on_probe("mqtt://a", true, T0 + 31_050);
        assert_eq!(
            a,
            vec![RouteAction::Connect {
                url: "mqtt://a".into(),
                reason: SwitchReason::ReturnHome {
                    from: "mqtt://b".into()
                }
            }]
        );
        assert_eq!(c.endpoint(), "mqtt://a");
        assert_eq!(
            (c.counters().returns_home, c.counters().home_probes),
            (1, 1)
        );
        // Home again: nothing more to probe, and the period starts over.
        c.on_connected(T0 + 31_100);
        assert!(probes(&c.on_tick(T0 + 400_000)).is_empty());
        assert_eq!(connects(&c.on_down(T0 + 400_000)), vec!["mqtt://b"]);
        c.on_connected(T0 + 400_000);
        assert_eq!(c.next_deadline(), Some(T0 + 430_000));
        // Routing is untouched by the move: uplinks stay group-routed.
        assert!(c.routed(T0 + 430_000));
    }

    #[test]
    fn a_first_endpoint_that_stays_down_is_probed_less_often_up_to_five_minutes() {
        let mut c = failed_over();
        let mut now = T0 + 1000;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let due = c.next_deadline().unwrap();
            assert_eq!(probes(&c.on_tick(due)), vec!["mqtt://a"]);
            waits.push(due - now);
            now = due + 100;
            assert!(c.on_probe("mqtt://a", false, now).is_empty());
        }
        assert_eq!(
            waits,
            vec![30_000, 60_000, 120_000, 240_000, 300_000, 300_000, 300_000, 300_000]
        );
        assert_eq!(c.endpoint(), "mqtt://b");
        // A stale or unasked outcome changes nothing.
        assert!(c.on_probe("mqtt://a", true, now).is_empty());
        assert!(c.on_probe("mqtt://b", true, now).is_empty());
        assert_eq!(c.endpoint(), "mqtt://b");
    }

    #[test]
    fn a_drop_or_a_new_list_cancels_the_probe_and_a_failed_return_is_a_failover() {
        let mut c = failed_over();
        let due = c.next_deadline().unwrap();
        assert_eq!(probes(&c.on_tick(due)).len(), 1);
        // The link dropped while the probe was out: its outcome is moot,
        // the ordinary failover goes on.
        assert_eq!(connects(&c.on_down(due + 10)), vec!["mqtt://c"]);
        assert!(c.on_probe("mqtt://a", true, due + 20).is_empty());
        assert_eq!(c.endpoint(), "mqtt://c");
        c.on_connected(due + 30);
        let due = c.next_deadline().unwrap();
        assert_eq!(probes(&c.on_tick(due)), vec!["mqtt://a"]);
        assert_eq!(
            connects(&c.on_probe("mqtt://a", true, due)),
            vec!["mqtt://a"]
        );
        // The return fails (TCP accepted, MQTT not): the next endpoint at
        // once, and the next probe waits twice as long as the last.
        assert_eq!(connects(&c.on_down(due + 5)), vec!["mqtt://b"]);
        c.on_connected(due + 10);
        assert_eq!(c.next_deadline(), Some(due + 10 + 60_000));
        // A new version whose list holds the endpoint in use at a later
        // place: the probe is for the new list's first.
        let (_, a) = c.on_object(
            &object(2, T0 + 5, 3_600_000, &["mqtt://z", "mqtt://b"]),
            due + 20,
            &keys(),
        );
        assert!(connects(&a).is_empty());
        let due2 = c.next_deadline().unwrap();
        assert_eq!(probes(&c.on_tick(due2)), vec!["mqtt://z"]);
        // Home is the list's first: a new list that starts with the
        // endpoint in use needs no probe.
        let (_, a) = c.on_object(
            &object(3, T0 + 6, 3_600_000, &["mqtt://b"]),
            due2 + 1,
            &keys(),
        );
        assert!(connects(&a).is_empty());
        assert!(c.on_probe("mqtt://z", true, due2 + 2).is_empty());
        assert_eq!(c.endpoint(), "mqtt://b");
    }

    #[test]
    fn a_withdrawal_keeps_the_held_object_until_it_expires() {
        let mut c = core();
        c.on_object(&object(2, T0, 30_000, &["mqtt://a"]), T0, &keys());
        c.on_connected(T0);
        let before = c.state().clone();
        assert!(RouteCore::is_withdrawal(b""));
        assert!(!RouteCore::is_withdrawal(&object(
            2,
            T0,
            30_000,
            &["mqtt://a"]
        )));
        c.on_withdrawn();
        assert_eq!(c.counters().withdrawn, 1);
        assert!(c.counters().refused.is_empty(), "not a refusal");
        assert_eq!(c.state(), &before);
        assert!(c.routed(T0 + 29_999));
        assert_eq!(c.endpoint(), "mqtt://a");
        // Re-fetches go on; nothing answers; the expiry falls back.
        assert_eq!(c.on_tick(T0 + 20_000), vec![RouteAction::Refetch]);
        let a = c.on_tick(T0 + 30_000);
        assert!(matches!(a[0], RouteAction::Expired { version: 2, .. }));
        assert_eq!(connects(&a), vec!["mqtt://boot:1883"]);
    }
}
