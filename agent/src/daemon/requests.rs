//! Explicit shard requests from local applications (issue 18, device side):
//! the sans-IO decisions behind the agent's request socket.
//!
//! [`RequestCore`] takes `now` and events — a request line from a
//! connection with the caller's peer credentials, a sealed answer from the
//! broker, a tick, a closed connection, a failed send — and returns
//! [`Action`]s: persist a new sequence ceiling, publish a request, reply on
//! a connection, log a dropped answer. The daemon loop (`agent.rs`) and the
//! socket code (`local_api.rs`) only execute them.
//!
//! What it decides, and why:
//! - **Who may act as which application.** `[[apps]]` declares each
//!   application's name with the uids and gids allowed to act as it; a
//!   caller's credentials come from the kernel (`SO_PEERCRED`), never from
//!   the request. uid 0 may act as any *declared* application (the
//!   operator's tool). Nothing declared ⇒ every request is refused.
//! - **Local rate limit per (app, instance)**: a token bucket
//!   (`max_per_second`, `burst`), so a flooding instance is refused here,
//!   before it costs the device key signatures, broker traffic or the
//!   instance's reputation at the allocator; other instances have their
//!   own buckets. Buckets are bounded ([`MAX_BUCKETS`]).
//! - **Sequence numbers**: strictly increasing per device across restarts.
//!   They are reserved in blocks of [`SEQ_BLOCK`]: a block's ceiling is on
//!   disk ([`Action::PersistSeqCeiling`], executed before the publish that
//!   follows it) before any number of it is used, and a restart resumes
//!   above the ceiling, so no number is reused without an fsync per request.
//! - **Pending requests** keyed by sequence, each with a deadline: the
//!   first answer is due within `answer_timeout_ms`; a queued acquire that
//!   waits gets until its `wait_ms`. An answer is routed to its connection
//!   only if it verifies under the trusted instruction keys, names this
//!   device and matches a pending request's sequence, application and
//!   instance; anything else is dropped and counted.
//! - **Bounds**: pending requests per instance and in total.

use serde::Serialize;
use shardline_client::wire::{self, Answer as LocalAnswer, Request as LocalRequest};
use shardline_shared::msg::{KeySet, ShardKind};
use shardline_shared::request::{
    self, Answer, AppRequest, GrantOutcome, RequestAnswer, RequestOp, RequestRefusal,
    MAX_REQUEST_DURATION_MS, MAX_REQUEST_UNITS,
};
use shardline_shared::{AppName, DeviceId};
use std::collections::{BTreeMap, HashMap};

/// Sequence numbers reserved per durable write.
pub const SEQ_BLOCK: u64 = 1024;
/// Most (app, instance) rate-limit buckets kept.
pub const MAX_BUCKETS: usize = 4096;
/// Most requests waiting for an answer, all instances together.
pub const MAX_PENDING_TOTAL: usize = 1024;

/// A connection of the request socket (assigned by the I/O edge).
pub type ConnId = u64;

/// The kernel's word on who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// One `[[apps]]` entry: who may act as `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRule {
    pub name: AppName,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// The `[requests]` tuning the core needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Token refill rate per (app, instance), requests per second (≥ 1).
    pub max_per_second: u32,
    /// Bucket capacity (≥ 1): how many requests may come at once.
    pub burst: u32,
    /// How long the first answer may take.
    pub answer_timeout_ms: u64,
    /// Most requests of one instance waiting for an answer.
    pub max_pending_per_instance: usize,
}

impl Default for RequestPolicy {
    fn default() -> Self {
        Self {
            max_per_second: 50,
            burst: 100,
            answer_timeout_ms: 5_000,
            max_pending_per_instance: 16,
        }
    }
}

/// Why an answer from the broker was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not signed by a trusted instruction key (or malformed, oversize).
    Unverified,
    /// Names another device.
    OtherDevice,
    /// No pending request has its sequence (late, duplicate, or unknown),
    /// or the pending one is another application's or instance's.
    Unmatched,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Unverified => "unverified",
            DropReason::OtherDevice => "other_device",
            DropReason::Unmatched => "unmatched",
        }
    }
}

/// What the daemon must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this ceiling durably (every sequence up to it may be used)
    /// before executing the next action; on failure call
    /// [`RequestCore::on_send_failed`] with `ceiling_failed = true`.
    PersistSeqCeiling(u64),
    /// Seal with the device key and publish (QoS 1) on the request topic;
    /// on failure call [`RequestCore::on_send_failed`].
    Publish(AppRequest),
    /// Write `answer` on connection `conn`; `last` ends the request.
    Reply {
        conn: ConnId,
        answer: LocalAnswer,
        last: bool,
    },
    /// An answer from the broker was dropped (log it).
    Dropped {
        reason: DropReason,
        request_seq: Option<u64>,
        detail: String,
    },
}

/// Counters for `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounters {
    /// Request lines received from local applications.
    pub received: u64,
    /// Published to the allocator.
    pub sent: u64,
    /// Final answers from the allocator relayed to a caller.
    pub answered: u64,
    pub refused_not_authorized: u64,
    pub refused_rate_limited: u64,
    pub refused_out_of_range: u64,
    /// Answered with a local error (not connected, too many pending, a
    /// failed send, an invalid name).
    pub local_errors: u64,
    /// No (final) answer before the deadline.
    pub timed_out: u64,
    /// The caller hung up before its answer came.
    pub abandoned: u64,
    pub answers_unverified: u64,
    pub answers_other_device: u64,
    pub answers_unmatched: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    conn: ConnId,
    app: AppName,
    instance: AppName,
    /// When the caller is answered with an error if nothing (final) came.
    deadline_ms: u64,
    /// A queued acquire's end of waiting (`None`: it does not wait).
    wait_until_ms: Option<u64>,
    wait_ms: u32,
    /// The queued answer's ticket, once queued.
    ticket: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Thousandths of a request, so refill needs no floating point.
    milli_tokens: u64,
    at_ms: u64,
}

/// The block reservation of request sequence numbers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqReservation {
    next: u64,
    reserved_through: u64,
}

impl SeqReservation {
    /// Resumes above the persisted ceiling (`None` on a first start): every
    /// number up to it may have been used before.
    pub fn resume(persisted_ceiling: Option<u64>) -> Self {
        let c = persisted_ceiling.unwrap_or(0);
        Self {
            next: c.saturating_add(1),
            reserved_through: c,
        }
    }

    /// The next number, and the new ceiling to persist first when it opens
    /// a new block.
    fn take(&mut self) -> (u64, Option<u64>) {
        let seq = self.next;
        self.next = self.next.saturating_add(1);
        if seq > self.reserved_through {
            self.reserved_through = seq.saturating_add(SEQ_BLOCK - 1);
            (seq, Some(self.reserved_through))
        } else {
            (seq, None)
        }
    }

    /// The ceiling written for `seq` did not reach the disk: the durable one
    /// is still `seq - 1` (a write is needed exactly when a number passes
    /// it). `seq` itself stays unused, the next number writes again.
    fn ceiling_failed(&mut self, seq: u64) {
        self.reserved_through = seq.saturating_sub(1);
    }

    /// The number the next request gets.
    pub fn peek(&self) -> u64 {
        self.next
    }
}

/// The sans-IO request core; see the module docs.
#[derive(Debug)]
pub struct RequestCore {
    device: DeviceId,
    apps: Vec<AppRule>,
    policy: RequestPolicy,
    seq: SeqReservation,
    pending: BTreeMap<u64, Pending>,
    buckets: HashMap<(AppName, AppName), Bucket>,
    counters: RequestCounters,
}

fn error(conn: ConnId, text: impl Into<String>) -> Action {
    Action::Reply {
        conn,
        answer: LocalAnswer::Error { error: text.into() },
        last: true,
    }
}

fn refused(conn: ConnId, reason: &str, detail: String) -> Action {
    Action::Reply {
        conn,
        answer: LocalAnswer::Refused {
            reason: reason.to_owned(),
            detail,
        },
        last: true,
    }
}

/// The text of the error a request gets while the broker is unreachable.
pub const NOT_CONNECTED: &str = "not connected to the allocator broker; request not sent";

impl RequestCore {
    pub fn new(
        device: DeviceId,
        apps: Vec<AppRule>,
        policy: RequestPolicy,
        seq: SeqReservation,
    ) -> Self {
        Self {
            device,
            apps,
            policy,
            seq,
            pending: BTreeMap::new(),
            buckets: HashMap::new(),
            counters: RequestCounters::default(),
        }
    }

    /// A reloaded configuration: new application rules and tuning apply to
    /// the next request (pending ones keep their deadlines).
    pub fn reconfigure(&mut self, apps: Vec<AppRule>, policy: RequestPolicy) {
        self.apps = apps;
        self.policy = policy;
        // A smaller burst must not leave a bucket above its capacity.
        let cap = u64::from(policy.burst) * 1000;
        for b in self.buckets.values_mut() {
            b.milli_tokens = b.milli_tokens.min(cap);
        }
    }

    pub fn counters(&self) -> &RequestCounters {
        &self.counters
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.peek()
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending.values().map(|p| p.deadline_ms).min()
    }

    /// Who may act as `app`: `Err` with the reason in words.
    fn authorize(&self, caller: Caller, app: &AppName) -> Result<(), String> {
        if self.apps.is_empty() {
            return Err("no applications are declared ([[apps]] in the agent's \
                        configuration); every request is refused"
                .into());
        }
        let Some(rule) = self.apps.iter().find(|r| &r.name == app) else {
            return Err(format!(
                "application \"{app}\" is not declared in the agent's [[apps]]"
            ));
        };
        if caller.uid == 0 || rule.uids.contains(&caller.uid) || rule.gids.contains(&caller.gid) {
            Ok(())
        } else {
            Err(format!(
                "uid {} (gid {}) may not act as application \"{app}\": neither is among \
                 its uids or gids in [[apps]]",
                caller.uid, caller.gid
            ))
        }
    }

    /// Takes one token from the instance's bucket; `Err(retry_after_ms)`.
    fn take_token(&mut self, now: u64, app: &AppName, instance: &AppName) -> Result<(), u32> {
        let rate = u64::from(self.policy.max_per_second.max(1)); // milli-tokens per ms
        let cap = u64::from(self.policy.burst.max(1)) * 1000;
        let key = (app.clone(), instance.clone());
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_BUCKETS {
            // Forget buckets that have refilled: they hold no information.
            self.buckets.retain(|_, b| {
                b.milli_tokens + now.saturating_sub(b.at_ms).saturating_mul(rate) < cap
            });
            if self.buckets.len() >= MAX_BUCKETS {
                return Err(1000);
            }
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            milli_tokens: cap,
            at_ms: now,
        });
        let refill = now.saturating_sub(b.at_ms).saturating_mul(rate);
        b.milli_tokens = b.milli_tokens.saturating_add(refill).min(cap);
        b.at_ms = b.at_ms.max(now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            Ok(())
        } else {
            let missing = 1000 - b.milli_tokens;
            Err(u32::try_from(missing.div_ceil(rate)).unwrap_or(u32::MAX))
        }
    }

    /// A request line from connection `conn`. `connected`: whether the MQTT
    /// link is up (a request is never queued for a broker that is down).
    pub fn on_request(
        &mut self,
        now: u64,
        conn: ConnId,
        caller: Caller,
        req: LocalRequest,
        connected: bool,
    ) -> Vec<Action> {
        self.counters.received += 1;
        let (app, instance) = match (AppName::new(req.app()), AppName::new(req.instance())) {
            (Ok(a), Ok(i)) => (a, i),
            (Err(e), _) | (_, Err(e)) => {
                self.counters.local_errors += 1;
                return vec![error(conn, e.to_string())];
            }
        };
        if let Err(why) = self.authorize(caller, &app) {
            self.counters.refused_not_authorized += 1;
            return vec![refused(conn, "not_authorized", why)];
        }
        if let Err(retry_after_ms) = self.take_token(now, &app, &instance) {
            self.counters.refused_rate_limited += 1;
            let r = RequestRefusal::RateLimited { retry_after_ms };
            return vec![refused(conn, r.reason(), format!("{r} (by the agent)"))];
        }
        let wait_ms = req.wait_ms();
        let op = to_op(req);
        let mut request = AppRequest {
            device: self.device.clone(),
            seq: 0,
            app,
            instance,
            at_ms: now,
            op,
        };
        if !request.in_range() {
            self.counters.refused_out_of_range += 1;
            let r = RequestRefusal::OutOfRange {
                max_units: MAX_REQUEST_UNITS,
                max_duration_ms: MAX_REQUEST_DURATION_MS,
            };
            return vec![refused(conn, r.reason(), r.to_string())];
        }
        if !connected {
            self.counters.local_errors += 1;
            return vec![error(conn, NOT_CONNECTED)];
        }
        let of_instance = self
            .pending
            .values()
            .filter(|p| p.app == request.app && p.instance == request.instance)
            .count();
        if of_instance >= self.policy.max_pending_per_instance {
            self.counters.local_errors += 1;
            return vec![error(
                conn,
                format!(
                    "instance {}/{} already has {of_instance} requests waiting for an answer \
                     (the most allowed); wait for them",
                    request.app, request.instance
                ),
            )];
        }
        if self.pending.len() >= MAX_PENDING_TOTAL {
            self.counters.local_errors += 1;
            return vec![error(
                conn,
                format!("{MAX_PENDING_TOTAL} requests are waiting for an answer; try again later"),
            )];
        }
        let (seq, ceiling) = self.seq.take();
        request.seq = seq;
        self.pending.insert(
            seq,
            Pending {
                conn,
                app: request.app.clone(),
                instance: request.instance.clone(),
                deadline_ms: now.saturating_add(self.policy.answer_timeout_ms),
                wait_until_ms: (wait_ms > 0).then(|| now.saturating_add(u64::from(wait_ms))),
                wait_ms,
                ticket: None,
            },
        );
        self.counters.sent += 1;
        let mut actions = Vec::with_capacity(2);
        if let Some(c) = ceiling {
            actions.push(Action::PersistSeqCeiling(c));
        }
        actions.push(Action::Publish(request));
        actions
    }

    /// The request `seq` was not sent: its ceiling did not reach the disk
    /// (`ceiling_failed`) or the publish was refused. Its caller gets an
    /// error now.
    pub fn on_send_failed(&mut self, seq: u64, ceiling_failed: bool, why: &str) -> Vec<Action> {
        if ceiling_failed {
            self.seq.ceiling_failed(seq);
        }
        self.counters.sent = self.counters.sent.saturating_sub(1);
        self.counters.local_errors += 1;
        match self.pending.remove(&seq) {
            Some(p) => vec![error(p.conn, format!("request not sent: {why}"))],
            None => Vec::new(),
        }
    }

    /// A message on the answer topic.
    pub fn on_answer(&mut self, now: u64, bytes: &[u8], keys: &KeySet) -> Vec<Action> {
        let answer = match request::open_answer(bytes, |id| {
            keys.keys
                .iter()
                .find(|k| k.key_id == id)
                .map(|k| k.public_key)
        }) {
            Ok(a) => a,
            Err(e) => {
                self.counters.answers_unverified += 1;
                return vec![Action::Dropped {
                    reason: DropReason::Unverified,
                    request_seq: None,
                    detail: e.to_string(),
                }];
            }
        };
        if answer.device != self.device {
            self.counters.answers_other_device += 1;
            return vec![Action::Dropped {
                reason: DropReason::OtherDevice,
                request_seq: Some(answer.request_seq),
                detail: format!("answer names device {}", answer.device),
            }];
        }
        let matches = self
            .pending
            .get(&answer.request_seq)
            .is_some_and(|p| p.app == answer.app && p.instance == answer.instance);
        if !matches {
            self.counters.answers_unmatched += 1;
            let detail = match self.pending.get(&answer.request_seq) {
                Some(p) => format!(
                    "answer for {}/{} but request {} is {}/{}'s",
                    answer.app, answer.instance, answer.request_seq, p.app, p.instance
                ),
                None => "no request waits for this sequence (late, repeated or unknown)".into(),
            };
            return vec![Action::Dropped {
                reason: DropReason::Unmatched,
                request_seq: Some(answer.request_seq),
                detail,
            }];
        }
        self.route(now, answer)
    }

    fn route(&mut self, now: u64, answer: RequestAnswer) -> Vec<Action> {
        let seq = answer.request_seq;
        let Some(p) = self.pending.get_mut(&seq) else {
            return Vec::new();
        };
        let conn = p.conn;
        if let Answer::Queued { ticket, .. } = &answer.answer {
            if let Some(until) = p.wait_until_ms.filter(|&u| u > now) {
                // Keep waiting for the final answer, until the caller's wait.
                p.ticket = Some(*ticket);
                p.deadline_ms = until;
                return vec![Action::Reply {
                    conn,
                    answer: to_local(&answer.answer),
                    last: false,
                }];
            }
        }
        self.pending.remove(&seq);
        self.counters.answered += 1;
        vec![Action::Reply {
            conn,
            answer: to_local(&answer.answer),
            last: true,
        }]
    }

    /// Answers every request whose deadline passed with an error.
    pub fn on_tick(&mut self, now: u64) -> Vec<Action> {
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now)
            .map(|(s, _)| *s)
            .collect();
        let mut actions = Vec::with_capacity(due.len());
        for seq in due {
            let Some(p) = self.pending.remove(&seq) else {
                continue;
            };
            self.counters.timed_out += 1;
            let text = match p.ticket {
                Some(ticket) => format!(
                    "still queued after {} ms (ticket {ticket}); the allocator keeps the \
                     request queued until it is granted, refused or released",
                    p.wait_ms
                ),
                None => format!(
                    "no answer from the allocator within {} ms",
                    self.policy.answer_timeout_ms
                ),
            };
            actions.push(error(p.conn, text));
        }
        actions
    }

    /// Connection `conn` closed: its pending requests are forgotten (their
    /// answers, should they come, are dropped as unmatched).
    pub fn on_closed(&mut self, conn: ConnId) {
        let before = self.pending.len();
        self.pending.retain(|_, p| p.conn != conn);
        self.counters.abandoned += (before - self.pending.len()) as u64;
    }
}

fn to_kind(k: wire::Kind) -> ShardKind {
    match k {
        wire::Kind::Compute => ShardKind::Compute,
        wire::Kind::Data => ShardKind::Data,
    }
}

fn from_kind(k: ShardKind) -> wire::Kind {
    match k {
        ShardKind::Compute => wire::Kind::Compute,
        ShardKind::Data => wire::Kind::Data,
    }
}

fn to_op(req: LocalRequest) -> RequestOp {
    match req {
        LocalRequest::Acquire {
            kind,
            units,
            for_ms,
            priority,
            ..
        } => RequestOp::Acquire {
            kind: to_kind(kind),
            units,
            duration_ms: for_ms,
            priority,
        },
        LocalRequest::Renew { grant, for_ms, .. } => RequestOp::Renew {
            grant,
            duration_ms: for_ms,
        },
        LocalRequest::Release { grant, outcome, .. } => RequestOp::Release {
            grant,
            outcome: match outcome {
                wire::Outcome::Completed => GrantOutcome::Completed,
                wire::Outcome::Unused => GrantOutcome::Unused,
                wire::Outcome::Errored => GrantOutcome::Errored,
                wire::Outcome::OverLimit => GrantOutcome::OverLimit,
            },
        },
        LocalRequest::Query { .. } => RequestOp::Query,
    }
}

/// The allocator's answer as a socket answer line.
pub fn to_local(a: &Answer) -> LocalAnswer {
    match a {
        Answer::Granted(g) => LocalAnswer::Granted {
            grant: g.grant,
            kind: from_kind(g.kind),
            units: g.units,
            expires_at_ms: g.expires_at_ms,
        },
        Answer::Renewed(g) => LocalAnswer::Renewed {
            grant: g.grant,
            kind: from_kind(g.kind),
            units: g.units,
            expires_at_ms: g.expires_at_ms,
        },
        Answer::Queued {
            ticket,
            position,
            expected_wait_ms,
        } => LocalAnswer::Queued {
            ticket: *ticket,
            position: *position,
            expected_wait_ms: *expected_wait_ms,
        },
        Answer::Refused(r) => LocalAnswer::Refused {
            reason: r.reason().to_owned(),
            detail: r.to_string(),
        },
        Answer::Released { grant, units } => LocalAnswer::Released {
            grant: *grant,
            units: *units,
        },
        Answer::Standing(s) => LocalAnswer::Standing {
            reputation: f64::from(s.reputation_tenths) / 10.0,
            device_reputation: f64::from(s.device_reputation_tenths) / 10.0,
            compute_quota_units: s.compute_quota_units,
            data_quota_units: s.data_quota_units,
            compute_in_use: s.compute_in_use,
            data_in_use: s.data_in_use,
            queued: s.queued,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::PublicKeyEntry;
    use shardline_shared::request::{Grant, InstanceStanding};
    use shardline_shared::sign::KeyPair;
    use shardline_shared::KeyId;

    const T0: u64 = 1_800_000_000_000;
    const ROOT: Caller = Caller {
        pid: 1,
        uid: 0,
        gid: 0,
    };
    const CAM_USER: Caller = Caller {
        pid: 2,
        uid: 1000,
        gid: 1000,
    };

    fn name(s: &str) -> AppName {
        AppName::new(s).unwrap()
    }

    fn device() -> DeviceId {
        DeviceId::new("gw-a").unwrap()
    }

    fn alloc_key() -> KeyPair {
        KeyPair::from_seed(&[42; 32])
    }

    fn keys() -> KeySet {
        let k = alloc_key().public_key();
        KeySet {
            epoch: 0,
            keys: vec![PublicKeyEntry {
                key_id: KeyId::of_public_key(&k),
                public_key: k,
            }],
        }
    }

    fn core() -> RequestCore {
        RequestCore::new(
            device(),
            vec![
                AppRule {
                    name: name("cam"),
                    uids: vec![1000],
                    gids: vec![],
                },
                AppRule {
                    name: name("nas"),
                    uids: vec![],
                    gids: vec![2000],
                },
            ],
            RequestPolicy {
                max_per_second: 10,
                burst: 3,
                answer_timeout_ms: 5_000,
                max_pending_per_instance: 4,
            },
            SeqReservation::resume(None),
        )
    }

    fn acquire(app: &str, instance: &str, wait_ms: u32) -> LocalRequest {
        LocalRequest::Acquire {
            app: app.into(),
            instance: instance.into(),
            kind: wire::Kind::Compute,
            units: 2,
            for_ms: 30_000,
            priority: 0,
            wait_ms,
        }
    }

    fn published(actions: &[Action]) -> AppRequest {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Publish(r) => Some(r.clone()),
                _ => None,
            })
            .expect("a publish")
    }

    fn reply(actions: &[Action]) -> (ConnId, LocalAnswer, bool) {
        match actions {
            [Action::Reply { conn, answer, last }] => (*conn, answer.clone(), *last),
            other => panic!("expected one reply, got {other:?}"),
        }
    }

    fn sealed(seq: u64, app: &str, instance: &str, answer: Answer, key: &KeyPair) -> Vec<u8> {
        request::seal_answer(
            &RequestAnswer {
                device: device(),
                app: name(app),
                instance: name(instance),
                request_seq: seq,
                issued_at_ms: T0,
                answer,
            },
            &[key],
        )
    }

    fn grant(id: u64) -> Answer {
        Answer::Granted(Grant {
            grant: id,
            kind: ShardKind::Compute,
            units: 2,
            expires_at_ms: T0 + 30_000,
        })
    }

    #[test]
    fn a_granted_request_reaches_its_connection_once() {
        let mut c = core();
        let a = c.on_request(T0, 7, CAM_USER, acquire("cam", "w1", 0), true);
        assert_eq!(a[0], Action::PersistSeqCeiling(SEQ_BLOCK), "block first");
        let r = published(&a);
        assert_eq!(
            (r.seq, r.app.as_str(), r.instance.as_str()),
            (1, "cam", "w1")
        );
        assert!(matches!(r.op, RequestOp::Acquire { units: 2, .. }));
        let a = c.on_answer(
            T0 + 10,
            &sealed(1, "cam", "w1", grant(5), &alloc_key()),
            &keys(),
        );
        let (conn, answer, last) = reply(&a);
        assert_eq!(conn, 7);
        assert!(last);
        assert_eq!(
            answer,
            LocalAnswer::Granted {
                grant: 5,
                kind: wire::Kind::Compute,
                units: 2,
                expires_at_ms: T0 + 30_000
            }
        );
        // A redelivery matches nothing any more.
        let a = c.on_answer(
            T0 + 20,
            &sealed(1, "cam", "w1", grant(5), &alloc_key()),
            &keys(),
        );
        assert!(matches!(
            a[..],
            [Action::Dropped {
                reason: DropReason::Unmatched,
                ..
            }]
        ));
        assert_eq!(c.counters().answered, 1);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn queued_then_granted_on_the_same_connection_within_the_wait() {
        let mut c = core();
        let seq = published(&c.on_request(T0, 3, CAM_USER, acquire("cam", "w1", 10_000), true)).seq;
        let queued = Answer::Queued {
            ticket: 9,
            position: 1,
            expected_wait_ms: 2_000,
        };
        let (_, a, last) = reply(&c.on_answer(
            T0 + 50,
            &sealed(seq, "cam", "w1", queued, &alloc_key()),
            &keys(),
        ));
        assert!(matches!(a, LocalAnswer::Queued { ticket: 9, .. }));
        assert!(!last, "the caller waits for more");
        // The answer timeout no longer applies; the wait does.
        assert!(c.on_tick(T0 + 6_000).is_empty());
        assert_eq!(c.next_deadline(), Some(T0 + 10_000));
        let (conn, a, last) = reply(&c.on_answer(
            T0 + 7_000,
            &sealed(seq, "cam", "w1", grant(9), &alloc_key()),
            &keys(),
        ));
        assert_eq!(conn, 3);
        assert!(last);
        assert!(matches!(a, LocalAnswer::Granted { grant: 9, .. }));
    }

    #[test]
    fn a_queued_answer_ends_a_request_that_does_not_wait_and_a_wait_runs_out() {
        let mut c = core();
        let queued = Answer::Queued {
            ticket: 4,
            position: 2,
            expected_wait_ms: 2_000,
        };
        let s1 = published(&c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true)).seq;
        let (_, _, last) = reply(&c.on_answer(
            T0,
            &sealed(s1, "cam", "w1", queued.clone(), &alloc_key()),
            &keys(),
        ));
        assert!(last);
        let s2 = published(&c.on_request(T0, 2, CAM_USER, acquire("cam", "w1", 1_000), true)).seq;
        reply(&c.on_answer(
            T0 + 10,
            &sealed(s2, "cam", "w1", queued, &alloc_key()),
            &keys(),
        ));
        let (conn, a, last) = reply(&c.on_tick(T0 + 1_000));
        assert_eq!((conn, last), (2, true));
        match a {
            LocalAnswer::Error { error } => {
                assert!(
                    error.contains("still queued after 1000 ms (ticket 4)"),
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_answer_within_the_timeout_is_an_error_and_the_entry_goes() {
        let mut c = core();
        let seq = published(&c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true)).seq;
        assert_eq!(c.next_deadline(), Some(T0 + 5_000));
        assert!(c.on_tick(T0 + 4_999).is_empty());
        let (_, a, _) = reply(&c.on_tick(T0 + 5_000));
        assert_eq!(
            a,
            LocalAnswer::Error {
                error: "no answer from the allocator within 5000 ms".into()
            }
        );
        assert_eq!((c.pending(), c.counters().timed_out), (0, 1));
        let late = c.on_answer(
            T0 + 6_000,
            &sealed(seq, "cam", "w1", grant(1), &alloc_key()),
            &keys(),
        );
        assert!(matches!(
            late[..],
            [Action::Dropped {
                reason: DropReason::Unmatched,
                ..
            }]
        ));
    }

    #[test]
    fn answers_that_do_not_verify_or_match_are_dropped_and_counted() {
        let mut c = core();
        let seq = published(&c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true)).seq;
        let stranger = KeyPair::from_seed(&[9; 32]);
        let a = c.on_answer(T0, &sealed(seq, "cam", "w1", grant(1), &stranger), &keys());
        assert!(matches!(
            a[..],
            [Action::Dropped {
                reason: DropReason::Unverified,
                ..
            }]
        ));
        assert!(c.on_answer(T0, b"garbage", &keys()).len() == 1);
        let other = request::seal_answer(
            &RequestAnswer {
                device: DeviceId::new("gw-b").unwrap(),
                app: name("cam"),
                instance: name("w1"),
                request_seq: seq,
                issued_at_ms: T0,
                answer: grant(1),
            },
            &[&alloc_key()],
        );
        let a = c.on_answer(T0, &other, &keys());
        assert!(matches!(
            a[..],
            [Action::Dropped {
                reason: DropReason::OtherDevice,
                ..
            }]
        ));
        // Right sequence, another instance: not this caller's answer.
        let a = c.on_answer(
            T0,
            &sealed(seq, "cam", "w2", grant(1), &alloc_key()),
            &keys(),
        );
        assert!(matches!(
            a[..],
            [Action::Dropped {
                reason: DropReason::Unmatched,
                ..
            }]
        ));
        let n = c.counters();
        assert_eq!(
            (
                n.answers_unverified,
                n.answers_other_device,
                n.answers_unmatched
            ),
            (2, 1, 1)
        );
        assert_eq!(c.pending(), 1, "still waiting for its real answer");
    }

    #[test]
    fn credentials_decide_who_may_act_as_which_app() {
        let mut c = core();
        let (_, a, _) = reply(&c.on_request(T0, 1, CAM_USER, acquire("nas", "x", 0), true));
        assert!(
            matches!(&a, LocalAnswer::Refused { reason, detail } if reason == "not_authorized" && detail.contains("uid 1000")),
            "{a:?}"
        );
        let nas_group = Caller {
            pid: 3,
            uid: 1500,
            gid: 2000,
        };
        assert!(matches!(
            c.on_request(T0, 2, nas_group, acquire("nas", "x", 0), true)
                .last(),
            Some(Action::Publish(_))
        ));
        assert!(matches!(
            c.on_request(T0, 3, ROOT, acquire("cam", "op", 0), true)
                .last(),
            Some(Action::Publish(_))
        ));
        let (_, a, _) = reply(&c.on_request(T0, 4, ROOT, acquire("ghost", "x", 0), true));
        assert!(
            matches!(&a, LocalAnswer::Refused { detail, .. } if detail.contains("not declared")),
            "{a:?}"
        );
        let mut none = RequestCore::new(
            device(),
            vec![],
            RequestPolicy::default(),
            SeqReservation::resume(None),
        );
        let (_, a, _) = reply(&none.on_request(T0, 1, ROOT, acquire("cam", "x", 0), true));
        assert!(
            matches!(&a, LocalAnswer::Refused { detail, .. } if detail.contains("no applications are declared")),
            "{a:?}"
        );
    }

    #[test]
    fn a_flooding_instance_is_limited_alone_and_refills() {
        let mut c = core();
        for _ in 0..3 {
            assert!(matches!(
                c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true)
                    .last(),
                Some(Action::Publish(_))
            ));
        }
        let (_, a, _) = reply(&c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true));
        match a {
            LocalAnswer::Refused { reason, detail } => {
                assert_eq!(reason, "rate_limited");
                assert!(detail.contains("retry after 100 ms"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Another instance has its own bucket.
        assert!(matches!(
            c.on_request(T0, 2, CAM_USER, acquire("cam", "w2", 0), true)
                .last(),
            Some(Action::Publish(_))
        ));
        // 10 per second: one token back after 100 ms.
        assert!(matches!(
            c.on_request(T0 + 100, 1, CAM_USER, acquire("cam", "w1", 0), true)
                .last(),
            Some(Action::Publish(_))
        ));
        assert_eq!(c.counters().refused_rate_limited, 1);
    }

    #[test]
    fn broker_down_range_and_pending_bounds_answer_at_once() {
        let mut c = core();
        let (_, a, _) = reply(&c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), false));
        assert_eq!(
            a,
            LocalAnswer::Error {
                error: NOT_CONNECTED.into()
            }
        );
        assert_eq!(c.pending(), 0, "nothing queued for a broker that is down");
        let big = LocalRequest::Acquire {
            app: "cam".into(),
            instance: "w1".into(),
            kind: wire::Kind::Data,
            units: MAX_REQUEST_UNITS + 1,
            for_ms: 1_000,
            priority: 0,
            wait_ms: 0,
        };
        let (_, a, _) = reply(&c.on_request(T0, 1, CAM_USER, big, true));
        assert!(matches!(a, LocalAnswer::Refused { ref reason, .. } if reason == "out_of_range"));
        let (_, a, _) = reply(&c.on_request(T0, 1, CAM_USER, acquire("cam", "../x", 0), true));
        assert!(matches!(a, LocalAnswer::Error { .. }));
        c.reconfigure(
            c.apps.clone(),
            RequestPolicy {
                burst: 100,
                max_per_second: 100,
                ..c.policy
            },
        );
        for _ in 0..4 {
            c.on_request(T0 + 1_000, 1, CAM_USER, acquire("cam", "w1", 0), true);
        }
        let (_, a, _) =
            reply(&c.on_request(T0 + 1_000, 1, CAM_USER, acquire("cam", "w1", 0), true));
        assert!(
            matches!(a, LocalAnswer::Error { ref error } if error.contains("already has 4")),
            "{a:?}"
        );
        c.on_closed(1);
        assert_eq!((c.pending(), c.counters().abandoned), (0, 4));
    }

    #[test]
    fn sequence_numbers_resume_above_the_ceiling_and_a_failed_write_is_retried() {
        let mut s = SeqReservation::resume(None);
        assert_eq!(s.take(), (1, Some(SEQ_BLOCK)));
        assert_eq!(s.take(), (2, None));
        // A restart after any number of uses resumes above the ceiling.
        let mut r = SeqReservation::resume(Some(SEQ_BLOCK));
        assert_eq!(r.take(), (SEQ_BLOCK + 1, Some(2 * SEQ_BLOCK)));
        // The ceiling write failed: the number is skipped, the next writes again.
        let mut c = core();
        let a = c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true);
        let seq = published(&a).seq;
        let (_, e, _) = reply(&c.on_send_failed(seq, true, "disk full"));
        assert!(matches!(e, LocalAnswer::Error { ref error } if error.contains("disk full")));
        let a = c.on_request(T0, 1, CAM_USER, acquire("cam", "w1", 0), true);
        assert_eq!(a[0], Action::PersistSeqCeiling(seq + SEQ_BLOCK));
        assert_eq!(published(&a).seq, seq + 1);
    }

    #[test]
    fn standing_and_refusals_read_in_words() {
        let s = to_local(&Answer::Standing(InstanceStanding {
            reputation_tenths: 525,
            device_reputation_tenths: 610,
            compute_quota_units: 4,
            data_quota_units: 2,
            compute_in_use: 1,
            data_in_use: 0,
            queued: 0,
        }));
        assert!(
            matches!(s, LocalAnswer::Standing { reputation, .. } if (reputation - 52.5).abs() < 1e-9)
        );
        let r = to_local(&Answer::Refused(RequestRefusal::InsufficientQuota {
            kind: ShardKind::Compute,
            asked: 8,
            quota: 4,
            in_use: 2,
        }));
        assert_eq!(
            r,
            LocalAnswer::Refused {
                reason: "insufficient_quota".into(),
                detail: "insufficient quota: asked 8 compute units, quota 4, in use 2".into()
            }
        );
    }
}
