//! Signed assignment objects (seed 001's "data objects"): which allocator
//! server, and which broker endpoints, the devices of one group use, until
//! when.
//!
//! A group is `tenant.region.capability` ([`GroupId`], e.g.
//! `acme.eu-west.vpn`). The allocator's assignment engine
//! (`shardline-allocator-core`, `assign/`) decides which server serves a
//! group; the service signs the resulting [`Assignment`] with its
//! instruction key(s) under [`Domain::Assignment`] ([`seal_assignment`]).
//! A device verifies it against its pinned instruction keys and keeps it in
//! an [`AssignmentState`] with [`handle_assignment`], routes to
//! [`endpoint_at`] and asks for a fresh object once [`refresh_due`].
//!
//! Rules (all in [`handle_assignment`], which never mutates on refusal):
//! - the signature is valid under a trusted key and the domain is
//!   [`Domain::Assignment`] (an instruction or an answer never passes as one);
//! - the signed payload is in its one canonical encoding and every field is
//!   valid: ids and region tags in their alphabets, 1 to
//!   [`MAX_ENDPOINTS`] broker URLs (`mqtt://` / `mqtts://`, host, optional
//!   port, at most [`MAX_ENDPOINT_LEN`] bytes each), `version >= 1`,
//!   `expires_at_ms > issued_at_ms`;
//! - it is for the device's own group;
//! - versions only move forward: an older version is refused (`Rollback`);
//!   the same version with the same routing (server, region, endpoints) is
//!   a duplicate when it is byte-identical and a *renewal* (the expiry moves
//!   forward, nothing else changes) when it was issued later; the same
//!   version with other routing is refused (`Equivocation`: two allocators
//!   disagree, and the first word stands);
//! - an object already expired, or issued further ahead of the device clock
//!   than [`MAX_ASSIGNMENT_SKEW_MS`], is refused.
//!
//! The version names the routing decision, not the object: the allocator
//! bumps it only when the group's server or endpoints change, and renews an
//! unchanged assignment under the same version with a later issue time and
//! expiry. Once an object has expired the device goes back to its bootstrap
//! endpoints (from its configuration) until it fetches a fresh one; the
//! version floor stays, so an old object replayed later is still refused.
//!
//! Not wired yet (issue 19): no topic carries these objects, the agent does
//! not hold an [`AssignmentState`], the allocator service does not publish.

use crate::codec::{self, DecodeError};
use crate::ids::KeyId;
use crate::msg::KeySet;
use crate::sign::{self, Domain, KeyPair, OpenError};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Size cap of a sealed assignment (envelope included), checked before
/// decoding: the largest valid object (8 endpoints of 256 bytes, the longest
/// ids) with [`sign::MAX_SIGNATURES`] signatures fits with room to spare.
pub const MAX_ASSIGNMENT_BYTES: usize = 4096;
/// Most broker endpoints one assignment may name.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest broker URL, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 256;
/// How far ahead of the device clock an assignment may be issued.
pub const MAX_ASSIGNMENT_SKEW_MS: u64 = 30_000;
/// Longest part of a group id and longest region tag.
pub const MAX_PART_LEN: usize = 32;
/// Longest server (allocator instance) id.
pub const MAX_SERVER_LEN: usize = 64;

/// Why an identifier, a region tag, an endpoint or an assignment is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> AssignmentError {
    AssignmentError::Invalid {
        what,
        value: value.chars().take(80).collect(),
        reason,
    }
}

/// A part of a group id or a region tag: 1–32 of `[A-Za-z0-9_-]` (no dot:
/// the dot separates the parts of a group id).
fn check_part(what: &'static str, value: &str) -> Result<(), AssignmentError> {
    if value.is_empty() || value.len() > MAX_PART_LEN {
        return Err(invalid(what, value, "must be 1 to 32 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err(invalid(
            what,
            value,
            "may only contain ASCII letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

/// A group of devices: `tenant.region.capability`, each part 1–32 of
/// `[A-Za-z0-9_-]`. Validated at construction and on decode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GroupId(String);

impl GroupId {
    pub fn new(value: impl Into<String>) -> Result<Self, AssignmentError> {
        let value = value.into();
        let parts: Vec<&str> = value.split('.').collect();
        let [tenant, region, capability] = parts.as_slice() else {
            return Err(invalid(
                "group id",
                &value,
                "must be tenant.region.capability",
            ));
        };
        check_part("group tenant", tenant)?;
        check_part("group region", region)?;
        check_part("group capability", capability)?;
        Ok(Self(value))
    }

    /// A group from its three parts.
    pub fn of(tenant: &str, region: &str, capability: &str) -> Result<Self, AssignmentError> {
        Self::new(format!("{tenant}.{region}.{capability}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn part(&self, i: usize) -> &str {
        self.0.split('.').nth(i).unwrap_or_default()
    }

    pub fn tenant(&self) -> &str {
        self.part(0)
    }

    /// The group's region as a tag (valid by construction).
    pub fn region(&self) -> Region {
        Region(self.part(1).to_owned())
    }

    pub fn capability(&self) -> &str {
        self.part(2)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for GroupId {
    type Err = AssignmentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for GroupId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A geographic tag (`eu-west`): 1–32 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Region(String);

impl Region {
    pub fn new(value: impl Into<String>) -> Result<Self, AssignmentError> {
        let value = value.into();
        check_part("region", &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Region {
    type Err = AssignmentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// An allocator instance: 1–64 of `[A-Za-z0-9._-]`, not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServerId(String);

impl ServerId {
    pub fn new(value: impl Into<String>) -> Result<Self, AssignmentError> {
        let value = value.into();
        if value.is_empty() || value.len() > MAX_SERVER_LEN {
            return Err(invalid("server id", &value, "must be 1 to 64 characters"));
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !value.chars().all(ok) || value.starts_with('.') {
            return Err(invalid(
                "server id",
                &value,
                "may only contain ASCII letters, digits, '.', '_' and '-' and must not start with '.'",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ServerId {
    type Err = AssignmentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ServerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Checks a broker URL in its one accepted form: `mqtt://` or `mqtts://`
/// (lower case), a host (a name or IPv4 address of `[A-Za-z0-9.-]` not
/// starting or ending with '.' or '-', or a bracketed IPv6 literal of hex
/// digits, ':' and '.'), an optional `:port` (1–65535, no leading zero),
/// nothing else (no user, path, query or trailing '/'), at most
/// [`MAX_ENDPOINT_LEN`] bytes.
///
/// `shardline-shared` does not depend on `shardline-support`, whose
/// `broker_url` parser the daemons use for their configuration; every URL
/// accepted here is also accepted there (tested in the allocator core).
pub fn check_endpoint(url: &str) -> Result<(), AssignmentError> {
    let bad = |reason| Err(invalid("broker endpoint", url, reason));
    if url.len() > MAX_ENDPOINT_LEN {
        return bad("longer than 256 bytes");
    }
    let Some(rest) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("mqtt://"))
    else {
        return bad("must start with mqtt:// or mqtts://");
    };
    let (host_ok, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return bad("unterminated '[' in host");
        };
        let ok = host.len() >= 2
            && host
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
            && host.contains(':');
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad("unexpected text after the host"),
            },
        };
        (ok, port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            && !host.starts_with(['.', '-'])
            && !host.ends_with(['.', '-']);
        (ok, port)
    };
    if !host_ok {
        return bad("missing or invalid host");
    }
    if let Some(p) = port {
        let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits || p.starts_with('0') || p.parse::<u32>().map_or(true, |n| n > 65_535) {
            return bad("port must be 1 to 65535 without a leading zero");
        }
    }
    Ok(())
}

/// The signed assignment object: the devices of `group` use `endpoints`
/// (served by allocator instance `server` in `region`) from `issued_at_ms`
/// until `expires_at_ms`. A wire type (golden bytes in `tests/golden.rs`);
/// every field is validated on decode (see [`Assignment::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AssignmentWire")]
pub struct Assignment {
    pub group: GroupId,
    /// Bumped when the group's server or endpoints change; 1 is the first.
    pub version: u64,
    /// Allocator clock, ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// After this the device falls back to its bootstrap endpoints.
    pub expires_at_ms: u64,
    /// The geo tag of the serving side (the server's region).
    pub region: Region,
    /// The allocator instance that serves the group.
    pub server: ServerId,
    /// Broker URLs, in order of preference: 1 to [`MAX_ENDPOINTS`].
    pub endpoints: Vec<String>,
}

/// [`Assignment`]'s wire layout before validation.
#[derive(Deserialize)]
struct AssignmentWire {
    group: GroupId,
    version: u64,
    issued_at_ms: u64,
    expires_at_ms: u64,
    region: Region,
    server: ServerId,
    endpoints: Vec<String>,
}

impl TryFrom<AssignmentWire> for Assignment {
    type Error = AssignmentError;
    fn try_from(w: AssignmentWire) -> Result<Self, Self::Error> {
        let a = Assignment {
            group: w.group,
            version: w.version,
            issued_at_ms: w.issued_at_ms,
            expires_at_ms: w.expires_at_ms,
            region: w.region,
            server: w.server,
            endpoints: w.endpoints,
        };
        a.validate()?;
        Ok(a)
    }
}

impl Assignment {
    /// The checks a decoded assignment passes (ids are valid by type):
    /// version ≥ 1, a lifetime (`expires_at_ms > issued_at_ms`), 1 to
    /// [`MAX_ENDPOINTS`] endpoints, each valid ([`check_endpoint`]).
    pub fn validate(&self) -> Result<(), AssignmentError> {
        let what = "assignment";
        if self.version == 0 {
            return Err(invalid(what, self.group.as_str(), "version 0"));
        }
        if self.expires_at_ms <= self.issued_at_ms {
            return Err(invalid(what, self.group.as_str(), "expires before issued"));
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(invalid(
                what,
                self.group.as_str(),
                "must name 1 to 8 endpoints",
            ));
        }
        self.endpoints.iter().try_for_each(|e| check_endpoint(e))
    }

    /// Same routing: group, version, region, server and endpoints (the
    /// times may differ: a renewal).
    pub fn same_routing(&self, other: &Assignment) -> bool {
        self.group == other.group
            && self.version == other.version
            && self.region == other.region
            && self.server == other.server
            && self.endpoints == other.endpoints
    }

    /// When a device should fetch a fresh object: two thirds into the
    /// lifetime (the allocator renews at half of it).
    pub fn refresh_at_ms(&self) -> u64 {
        let life = self.expires_at_ms.saturating_sub(self.issued_at_ms);
        self.issued_at_ms.saturating_add(life / 3 * 2)
    }
}

/// Signs an assignment with the allocator's instruction keys under
/// [`Domain::Assignment`].
pub fn seal_assignment(a: &Assignment, signers: &[&KeyPair]) -> Vec<u8> {
    sign::seal(Domain::Assignment, a, signers)
}

/// Opens a sealed assignment: at most [`MAX_ASSIGNMENT_BYTES`], every
/// signature by a key `lookup` knows, under [`Domain::Assignment`]. Does not
/// check canonical encoding or versions: that is [`handle_assignment`]'s.
pub fn open_assignment(
    bytes: &[u8],
    lookup: impl Fn(KeyId) -> Option<[u8; 32]>,
) -> Result<Assignment, OpenError> {
    sign::open(bytes, Domain::Assignment, MAX_ASSIGNMENT_BYTES, lookup).map(|(a, _)| a)
}

/// Decodes an unsigned assignment payload with the cap (fuzzing, tools).
pub fn decode_assignment(bytes: &[u8]) -> Result<Assignment, DecodeError> {
    codec::decode_capped(bytes, MAX_ASSIGNMENT_BYTES)
}

/// The object a device holds and the digest of its signed payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAssignment {
    pub assignment: Assignment,
    /// SHA-256 of the canonical payload: "identical" means the same bytes.
    pub digest: [u8; 32],
}

/// What a device persists per group: its group and the newest accepted
/// object (`None`: bootstrap, nothing accepted yet). Kept after expiry: the
/// version floor must survive, only the routing falls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentState {
    pub group: GroupId,
    pub current: Option<HeldAssignment>,
}

impl AssignmentState {
    /// A device of `group` that has accepted nothing yet.
    pub fn bootstrap(group: GroupId) -> Self {
        Self {
            group,
            current: None,
        }
    }
}

/// Why an assignment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentRefusal {
    /// Not decodable, over the cap, not canonical, or an invalid field.
    Malformed,
    /// No signature, a signature that does not verify, or another domain.
    BadSignature,
    /// Signed by a key the device does not trust.
    UnknownKey,
    /// For another group.
    WrongGroup,
    /// Older than the version held.
    Rollback { held: u64, got: u64 },
    /// The version held, with other routing.
    Equivocation { version: u64 },
    /// The version held, same routing, but not issued later than the one
    /// held: a late redelivery of an older renewal.
    Stale { version: u64 },
    /// Already expired by the device clock.
    Expired,
    /// Issued further ahead of the device clock than the allowed skew.
    FromFuture,
}

/// What became of the received object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentVerdict {
    /// A newer version: route to its endpoints.
    Accepted {
        version: u64,
        previous: Option<u64>,
    },
    /// The version held, issued later: the expiry moved forward.
    Renewed {
        version: u64,
        expires_at_ms: u64,
    },
    /// Byte-identical to the object held.
    Duplicate {
        version: u64,
    },
    Refused(AssignmentRefusal),
}

/// Where the device routes now and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    /// The held object, valid at that time.
    Assigned { version: u64, server: ServerId },
    /// Nothing accepted yet.
    BootstrapNone,
    /// The held object has expired.
    BootstrapExpired { version: u64 },
}

/// The endpoints to use and where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub urls: Vec<String>,
    pub source: EndpointSource,
}

/// A verdict, the state to persist (on every refusal equal to the input),
/// and the endpoints to route to at `now_ms` under that state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentDecision {
    pub verdict: AssignmentVerdict,
    pub state: AssignmentState,
    pub endpoints: Endpoints,
}

/// The endpoints at `now_ms`: the held object's while it is valid
/// (`now_ms < expires_at_ms`), else the bootstrap endpoints.
pub fn endpoint_at(state: &AssignmentState, now_ms: u64, bootstrap: &[String]) -> Endpoints {
    match &state.current {
        Some(h) if now_ms < h.assignment.expires_at_ms => Endpoints {
            urls: h.assignment.endpoints.clone(),
            source: EndpointSource::Assigned {
                version: h.assignment.version,
                server: h.assignment.server.clone(),
            },
        },
        Some(h) => Endpoints {
            urls: bootstrap.to_vec(),
            source: EndpointSource::BootstrapExpired {
                version: h.assignment.version,
            },
        },
        None => Endpoints {
            urls: bootstrap.to_vec(),
            source: EndpointSource::BootstrapNone,
        },
    }
}

/// Whether the device should fetch a fresh object: nothing held, or two
/// thirds of the held object's lifetime have passed (or it has expired).
pub fn refresh_due(state: &AssignmentState, now_ms: u64) -> bool {
    match &state.current {
        None => true,
        Some(h) => now_ms >= h.assignment.refresh_at_ms(),
    }
}

/// Decides whether the device takes the received bytes as its group's
/// assignment (rules: module docs). Pure: returns the state to persist,
/// which on every refusal equals `state`.
pub fn handle_assignment(
    state: &AssignmentState,
    bytes: &[u8],
    now_ms: u64,
    trusted_keys: &KeySet,
    bootstrap: &[String],
) -> AssignmentDecision {
    let verdict_and_state = decide(state, bytes, now_ms, trusted_keys);
    let (verdict, next) = match verdict_and_state {
        Ok((verdict, next)) => (verdict, next),
        Err(refusal) => (AssignmentVerdict::Refused(refusal), state.clone()),
    };
    let endpoints = endpoint_at(&next, now_ms, bootstrap);
    AssignmentDecision {
        verdict,
        state: next,
        endpoints,
    }
}

fn decide(
    state: &AssignmentState,
    bytes: &[u8],
    now_ms: u64,
    keys: &KeySet,
) -> Result<(AssignmentVerdict, AssignmentState), AssignmentRefusal> {
    use AssignmentRefusal as R;
    let env = sign::parse_envelope(bytes, MAX_ASSIGNMENT_BYTES).map_err(|_| R::Malformed)?;
    let (a, _signers) =
        sign::open_envelope::<Assignment>(&env, Domain::Assignment, |id| keys.public_key(id))
            .map_err(|e| match e {
                OpenError::UnknownKey(_) => R::UnknownKey,
                OpenError::Envelope(_) | OpenError::Payload(_) => R::Malformed,
                OpenError::WrongDomain { .. }
                | OpenError::NoSignature
                | OpenError::BadSignature(_) => R::BadSignature,
            })?;
    // One byte form per object (postcard also reads over-long varints), so
    // that "identical" is "the same digest".
    if codec::encode(&a) != env.payload {
        return Err(R::Malformed);
    }
    if a.group != state.group {
        return Err(R::WrongGroup);
    }
    let digest: [u8; 32] = Sha256::digest(&env.payload).into();
    let verdict = match &state.current {
        Some(h) if a.version < h.assignment.version => {
            return Err(R::Rollback {
                held: h.assignment.version,
                got: a.version,
            })
        }
        Some(h) if a.version == h.assignment.version => {
            if h.digest == digest {
                return Ok((
                    AssignmentVerdict::Duplicate { version: a.version },
                    state.clone(),
                ));
            }
            if !h.assignment.same_routing(&a) {
                return Err(R::Equivocation { version: a.version });
            }
            if a.issued_at_ms <= h.assignment.issued_at_ms
                || a.expires_at_ms <= h.assignment.expires_at_ms
            {
                return Err(R::Stale { version: a.version });
            }
            AssignmentVerdict::Renewed {
                version: a.version,
                expires_at_ms: a.expires_at_ms,
            }
        }
        held => AssignmentVerdict::Accepted {
            version: a.version,
            previous: held.as_ref().map(|h| h.assignment.version),
        },
    };
    if a.expires_at_ms <= now_ms {
        return Err(R::Expired);
    }
    if a.issued_at_ms > now_ms.saturating_add(MAX_ASSIGNMENT_SKEW_MS) {
        return Err(R::FromFuture);
    }
    let next = AssignmentState {
        group: state.group.clone(),
        current: Some(HeldAssignment {
            assignment: a,
            digest,
        }),
    };
    Ok((verdict, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_have_three_safe_parts() {
        let g = GroupId::new("acme.eu-west.vpn").unwrap();
        assert_eq!(
            (g.tenant(), g.region().as_str(), g.capability()),
            ("acme", "eu-west", "vpn")
        );
        for bad in [
            "",
            "acme",
            "acme.eu",
            "a.b.c.d",
            "a..c",
            "a/b.c.d",
            "a.b.+",
            ".b.c",
            &format!("{}.b.c", "x".repeat(33)),
        ] {
            assert!(GroupId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Region::new("eu.west").is_err());
        assert!(ServerId::new(".x").is_err());
        assert!(ServerId::new("alloc-1.eu").is_ok());
    }

    #[test]
    fn endpoints_are_checked_strictly() {
        for ok in [
            "mqtt://broker",
            "mqtts://b1.example.com:8883",
            "mqtt://10.0.0.1:1883",
            "mqtt://[::1]:1883",
            "mqtts://[fe80::1]",
            "mqtt://h:65535",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "http://x",
            "MQTT://x",
            "mqtt://",
            "mqtt://x/",
            "mqtt://x/path",
            "mqtt://u@x",
            "mqtt://x:0",
            "mqtt://x:01883",
            "mqtt://x:65536",
            "mqtt://x:",
            "mqtt://x:1:2",
            "mqtt://[::1",
            "mqtt://[]:1",
            "mqtt://[::1]x",
            "mqtt://-x",
            "mqtt://x.",
            "mqtt://a b",
            &format!("mqtt://{}", "a".repeat(250)),
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
