//! Explicit shard requests (seed 000): an application instance on a device
//! asks for units of a compute or data shard, and the allocator answers with
//! a short lease (a [`Grant`]), a queue position, or a refusal with its
//! reason.
//!
//! The agent turns a local application's call on its Unix socket into an
//! [`AppRequest`], signs it with the device key under
//! [`Domain::AppRequest`] and publishes it (QoS 1) on
//! [`crate::topics::request`]. The allocator answers each request with a
//! [`RequestAnswer`] signed by an instruction key under
//! [`Domain::RequestAnswer`] on [`crate::topics::answer`]; a queued request
//! gets a second answer (its grant, or a refusal) when it leaves the queue,
//! carrying the same `request_seq`.
//!
//! Everything here is a wire type with golden bytes in `tests/golden.rs`.
//! Enums grow only at the end; structs change only with a new format version.

use crate::codec::{self, DecodeError};
use crate::ids::{AppName, DeviceId, KeyId};
use crate::msg::ShardKind;
use crate::sign::{self, Domain, KeyPair, OpenError};
use serde::{Deserialize, Serialize};

/// Size cap of a sealed request (envelope included), checked before decoding.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// Size cap of a sealed answer (envelope included), checked before decoding.
pub const MAX_ANSWER_BYTES: usize = 2048;
/// Longest lease a request may ask for. The seed asks for very short-lived
/// shards: a lease of seconds, renewed while the work goes on.
pub const MAX_REQUEST_DURATION_MS: u32 = 10 * 60_000;
/// Most units one request may ask for.
pub const MAX_REQUEST_UNITS: u32 = 64;

/// A request from one application instance on a device, signed by the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRequest {
    pub device: DeviceId,
    /// Per-device request sequence, strictly increasing across restarts:
    /// the allocator drops a request at or below the last it accepted (a
    /// redelivery or a replay) and answers each accepted one once.
    pub seq: u64,
    pub app: AppName,
    pub instance: AppName,
    /// When the agent sent it (device clock).
    pub at_ms: u64,
    pub op: RequestOp,
}

/// What the instance asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    /// `units` of a `kind` shard for `duration_ms` (at most
    /// [`MAX_REQUEST_DURATION_MS`]; the allocator may grant less).
    Acquire {
        kind: ShardKind,
        units: u32,
        duration_ms: u32,
        /// Higher goes first within the instance's own queue entries.
        priority: u8,
    },
    /// Extend a grant the instance holds by `duration_ms` from now.
    Renew { grant: u64, duration_ms: u32 },
    /// Give a grant back (or withdraw a queued request by its ticket),
    /// saying how the work went: the outcome moves the instance's reputation.
    Release { grant: u64, outcome: GrantOutcome },
    /// The instance's reputation, quota and what it holds.
    Query,
}

/// How the work under a grant ended, as the application reports it (or the
/// allocator observes it: a grant that runs out unreleased is `Unused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrantOutcome {
    /// The work completed: a positive signal.
    Completed,
    /// The units were not used (or the grant expired unreleased).
    Unused,
    /// The work failed with errors.
    Errored,
    /// The work went over the granted units.
    OverLimit,
}

impl GrantOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantOutcome::Completed => "completed",
            GrantOutcome::Unused => "unused",
            GrantOutcome::Errored => "errored",
            GrantOutcome::OverLimit => "over_limit",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            GrantOutcome::Completed,
            GrantOutcome::Unused,
            GrantOutcome::Errored,
            GrantOutcome::OverLimit,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }
}

/// The allocator's answer to one request, signed by an instruction key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAnswer {
    pub device: DeviceId,
    pub app: AppName,
    pub instance: AppName,
    /// The request answered (a queued request's later grant carries it too).
    pub request_seq: u64,
    pub issued_at_ms: u64,
    pub answer: Answer,
}

/// A lease of units for one application instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Unique per device; names the grant in renew and release.
    pub grant: u64,
    pub kind: ShardKind,
    pub units: u32,
    /// The units return to the pool at this time unless renewed.
    pub expires_at_ms: u64,
}

/// An instance's standing: what a `Query` answers (and what the operator
/// API shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStanding {
    /// The instance's own reputation in tenths of a point (0–1000 for
    /// 0–100): fixed point, so every answer that decodes re-encodes to the
    /// same bytes (no NaN on the wire).
    pub reputation_tenths: u16,
    /// The device's reputation in tenths of a point (the instance's quota is
    /// a share of the device's).
    pub device_reputation_tenths: u16,
    pub compute_quota_units: u32,
    pub data_quota_units: u32,
    pub compute_in_use: u32,
    pub data_in_use: u32,
    /// Its requests waiting in the device's queue.
    pub queued: u32,
}

/// The answer itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Granted(Grant),
    /// Waiting for units to free up; `ticket` names the entry (release it
    /// to withdraw) and becomes the grant's id when it is granted.
    Queued {
        ticket: u64,
        /// 1 = next.
        position: u32,
        expected_wait_ms: u64,
    },
    Refused(RequestRefusal),
    /// A release (or the withdrawal of a queued request) took effect.
    Released {
        grant: u64,
        units: u32,
    },
    Standing(InstanceStanding),
    /// A renewal took effect: the grant with its new expiry.
    Renewed(Grant),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestRefusal {
    /// More than the instance's quota (from its reputation) allows, even
    /// once everything it holds is returned.
    InsufficientQuota {
        kind: ShardKind,
        asked: u32,
        quota: u32,
        in_use: u32,
    },
    /// The device's tier has no units of this kind at all.
    KindNotAllowed { kind: ShardKind },
    /// The device's queue (or the instance's share of it) is full.
    QueueFull { limit: u32 },
    /// The instance sends requests faster than allowed; it costs the
    /// instance's reputation, never another instance's.
    RateLimited { retry_after_ms: u32 },
    /// Renew or release of a grant the instance does not hold.
    UnknownGrant { grant: u64 },
    /// Units or duration outside what a request may ask.
    OutOfRange {
        max_units: u32,
        max_duration_ms: u32,
    },
    /// The device is drained by the operator.
    Drained,
    /// Waited in the queue past its deadline without units freeing up.
    QueueTimeout,
}

impl RequestRefusal {
    /// Every refusal's reason word, in variant order.
    pub const REASONS: [&'static str; 8] = [
        "insufficient_quota",
        "kind_not_allowed",
        "queue_full",
        "rate_limited",
        "unknown_grant",
        "out_of_range",
        "drained",
        "queue_timeout",
    ];

    /// The position of this refusal's reason in [`RequestRefusal::REASONS`].
    pub fn index(&self) -> usize {
        match self {
            RequestRefusal::InsufficientQuota { .. } => 0,
            RequestRefusal::KindNotAllowed { .. } => 1,
            RequestRefusal::QueueFull { .. } => 2,
            RequestRefusal::RateLimited { .. } => 3,
            RequestRefusal::UnknownGrant { .. } => 4,
            RequestRefusal::OutOfRange { .. } => 5,
            RequestRefusal::Drained => 6,
            RequestRefusal::QueueTimeout => 7,
        }
    }

    /// A stable snake_case word for the reason (the local socket's
    /// `reason`, metric labels).
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

impl std::fmt::Display for RequestRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = |k: &ShardKind| k.as_str();
        match self {
            RequestRefusal::InsufficientQuota {
                kind: k,
                asked,
                quota,
                in_use,
            } => write!(
                f,
                "insufficient quota: asked {asked} {} units, quota {quota}, in use {in_use}",
                kind(k)
            ),
            RequestRefusal::KindNotAllowed { kind: k } => {
                write!(f, "the device's tier has no {} units", kind(k))
            }
            RequestRefusal::QueueFull { limit } => write!(f, "queue full ({limit} waiting)"),
            RequestRefusal::RateLimited { retry_after_ms } => {
                write!(f, "rate limited: retry after {retry_after_ms} ms")
            }
            RequestRefusal::UnknownGrant { grant } => {
                write!(f, "grant {grant} is not held by this instance")
            }
            RequestRefusal::OutOfRange {
                max_units,
                max_duration_ms,
            } => write!(
                f,
                "out of range: 1 to {max_units} units for 1 to {max_duration_ms} ms"
            ),
            RequestRefusal::Drained => f.write_str("the device is drained by the operator"),
            RequestRefusal::QueueTimeout => {
                f.write_str("waited in the queue until its deadline; no units freed up")
            }
        }
    }
}

impl std::fmt::Display for Answer {
    /// The answer in words, for operators (`shardctl`, the API's
    /// `explanation`) and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Granted(g) | Answer::Renewed(g) => write!(
                f,
                "{} grant {}: {} {} units until {} (Unix ms)",
                if matches!(self, Answer::Granted(_)) {
                    "granted"
                } else {
                    "renewed"
                },
                g.grant,
                g.units,
                g.kind.as_str(),
                g.expires_at_ms
            ),
            Answer::Queued {
                ticket,
                position,
                expected_wait_ms,
            } => write!(
                f,
                "queued: ticket {ticket}, position {position}, expected wait {expected_wait_ms} ms"
            ),
            Answer::Refused(r) => write!(f, "refused: {r}"),
            Answer::Released { grant, units } => {
                write!(f, "released grant {grant}: {units} units returned")
            }
            Answer::Standing(s) => write!(
                f,
                "reputation {:.1} (device {:.1}); compute {}/{} units, data {}/{} units; {} queued",
                f64::from(s.reputation_tenths) / 10.0,
                f64::from(s.device_reputation_tenths) / 10.0,
                s.compute_in_use,
                s.compute_quota_units,
                s.data_in_use,
                s.data_quota_units,
                s.queued
            ),
        }
    }
}

impl AppRequest {
    /// Units and duration within the wire limits (an `Acquire` or `Renew`).
    pub fn in_range(&self) -> bool {
        let duration_ok = |d: u32| (1..=MAX_REQUEST_DURATION_MS).contains(&d);
        match &self.op {
            RequestOp::Acquire {
                units, duration_ms, ..
            } => (1..=MAX_REQUEST_UNITS).contains(units) && duration_ok(*duration_ms),
            RequestOp::Renew { duration_ms, .. } => duration_ok(*duration_ms),
            RequestOp::Release { .. } | RequestOp::Query => true,
        }
    }
}

/// Signs a request with the device key under [`Domain::AppRequest`].
pub fn seal_request(req: &AppRequest, device_key: &KeyPair) -> Vec<u8> {
    sign::seal(Domain::AppRequest, req, &[device_key])
}

/// Opens a sealed request: at most [`MAX_REQUEST_BYTES`], signed by exactly
/// the device key `device_public` under [`Domain::AppRequest`], addressed
/// from `device` (the topic's device).
pub fn open_request(
    bytes: &[u8],
    device: &DeviceId,
    device_public: &[u8; 32],
) -> Result<AppRequest, OpenError> {
    let id = KeyId::of_public_key(device_public);
    let (req, _): (AppRequest, _) =
        sign::open(bytes, Domain::AppRequest, MAX_REQUEST_BYTES, |k| {
            (k == id).then_some(*device_public)
        })?;
    if &req.device != device {
        return Err(OpenError::Payload(DecodeError::Malformed(format!(
            "request names device {} on {device}'s topic",
            req.device
        ))));
    }
    Ok(req)
}

/// Signs an answer with the allocator's instruction keys under
/// [`Domain::RequestAnswer`].
pub fn seal_answer(answer: &RequestAnswer, signers: &[&KeyPair]) -> Vec<u8> {
    sign::seal(Domain::RequestAnswer, answer, signers)
}

/// Opens a sealed answer: at most [`MAX_ANSWER_BYTES`], every signature by a
/// key `lookup` knows (the device's pinned instruction keys).
pub fn open_answer(
    bytes: &[u8],
    lookup: impl Fn(KeyId) -> Option<[u8; 32]>,
) -> Result<RequestAnswer, OpenError> {
    sign::open(bytes, Domain::RequestAnswer, MAX_ANSWER_BYTES, lookup).map(|(a, _)| a)
}

/// Decodes an unsigned request payload with the request cap (fuzzing, tools).
pub fn decode_request(bytes: &[u8]) -> Result<AppRequest, DecodeError> {
    codec::decode_capped(bytes, MAX_REQUEST_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: RequestOp) -> AppRequest {
        AppRequest {
            device: DeviceId::new("gw-a").unwrap(),
            seq: 7,
            app: AppName::new("cam").unwrap(),
            instance: AppName::new("1").unwrap(),
            at_ms: 1_000,
            op,
        }
    }

    #[test]
    fn a_request_opens_only_under_its_own_device_key_and_topic() {
        let key = KeyPair::from_seed(&[3; 32]);
        let other = KeyPair::from_seed(&[4; 32]);
        let r = req(RequestOp::Query);
        let sealed = seal_request(&r, &key);
        let gw_a = DeviceId::new("gw-a").unwrap();
        assert_eq!(open_request(&sealed, &gw_a, &key.public_key()).unwrap(), r);
        assert!(open_request(&sealed, &gw_a, &other.public_key()).is_err());
        let gw_b = DeviceId::new("gw-b").unwrap();
        assert!(open_request(&sealed, &gw_b, &key.public_key()).is_err());
        // A request is not an answer, nor a report.
        assert!(open_answer(&sealed, |_| Some(key.public_key())).is_err());
    }

    #[test]
    fn every_refusal_has_its_own_reason_word() {
        let all = [
            RequestRefusal::InsufficientQuota {
                kind: ShardKind::Compute,
                asked: 1,
                quota: 0,
                in_use: 0,
            },
            RequestRefusal::KindNotAllowed {
                kind: ShardKind::Data,
            },
            RequestRefusal::QueueFull { limit: 1 },
            RequestRefusal::RateLimited { retry_after_ms: 1 },
            RequestRefusal::UnknownGrant { grant: 1 },
            RequestRefusal::OutOfRange {
                max_units: 1,
                max_duration_ms: 1,
            },
            RequestRefusal::Drained,
            RequestRefusal::QueueTimeout,
        ];
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        assert_eq!(all[0].reason(), "insufficient_quota");
        let mut words = RequestRefusal::REASONS.to_vec();
        words.dedup();
        assert_eq!(words.len(), all.len());
    }

    #[test]
    fn range_checks_follow_the_wire_limits() {
        let acquire = |units, duration_ms| RequestOp::Acquire {
            kind: ShardKind::Compute,
            units,
            duration_ms,
            priority: 0,
        };
        assert!(req(acquire(1, 30_000)).in_range());
        assert!(!req(acquire(0, 30_000)).in_range());
        assert!(!req(acquire(MAX_REQUEST_UNITS + 1, 30_000)).in_range());
        assert!(!req(acquire(1, 0)).in_range());
        assert!(!req(acquire(1, MAX_REQUEST_DURATION_MS + 1)).in_range());
        assert!(req(RequestOp::Query).in_range());
    }
}
