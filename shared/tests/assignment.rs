//! The device-side rules for seed 001's assignment objects
//! (`assign::handle_assignment`, `endpoint_at`, `refresh_due`), one rule per
//! test, on simulated time.

use shardline_shared::assign::{
    self, endpoint_at, handle_assignment, refresh_due, Assignment, AssignmentRefusal,
    AssignmentState, AssignmentVerdict, EndpointSource, GroupId, Region, ServerId,
    MAX_ASSIGNMENT_BYTES, MAX_ASSIGNMENT_SKEW_MS,
};
use shardline_shared::codec;
use shardline_shared::msg::KeySet;
use shardline_shared::sign::{self, Domain, KeyPair, SignedEnvelope};

const T0: u64 = 1_780_000_000_000;
const TTL: u64 = 900_000;

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn keys() -> KeySet {
    KeySet::of(1, &[&key(1)])
}

fn group() -> GroupId {
    GroupId::new("acme.eu-west.vpn").unwrap()
}

fn bootstrap() -> Vec<String> {
    vec!["mqtts://bootstrap.example:8883".to_owned()]
}

fn obj(version: u64, server: &str, issued: u64) -> Assignment {
    Assignment {
        group: group(),
        version,
        issued_at_ms: issued,
        expires_at_ms: issued + TTL,
        region: Region::new("eu-west").unwrap(),
        server: ServerId::new(server).unwrap(),
        endpoints: vec![format!("mqtts://{server}.example:8883")],
    }
}

fn seal(a: &Assignment) -> Vec<u8> {
    assign::seal_assignment(a, &[&key(1)])
}

fn take(state: &AssignmentState, a: &Assignment, now: u64) -> assign::AssignmentDecision {
    handle_assignment(state, &seal(a), now, &keys(), &bootstrap())
}

/// A device that has accepted `obj(5, "alloc-1", T0)`.
fn holding() -> AssignmentState {
    let d = take(
        &AssignmentState::bootstrap(group()),
        &obj(5, "alloc-1", T0),
        T0,
    );
    assert!(matches!(d.verdict, AssignmentVerdict::Accepted { .. }));
    d.state
}

#[track_caller]
fn refused(state: &AssignmentState, bytes: &[u8], now: u64, why: AssignmentRefusal) {
    let d = handle_assignment(state, bytes, now, &keys(), &bootstrap());
    assert_eq!(d.verdict, AssignmentVerdict::Refused(why));
    assert_eq!(&d.state, state, "a refusal changed the state");
    assert_eq!(d.endpoints, endpoint_at(state, now, &bootstrap()));
}

#[test]
fn a_bootstrapped_device_accepts_its_first_object_and_routes_to_it() {
    let s = AssignmentState::bootstrap(group());
    assert!(refresh_due(&s, T0));
    assert_eq!(
        endpoint_at(&s, T0, &bootstrap()).source,
        EndpointSource::BootstrapNone
    );
    let d = take(&s, &obj(1, "alloc-1", T0), T0 + 10);
    assert_eq!(
        d.verdict,
        AssignmentVerdict::Accepted {
            version: 1,
            previous: None
        }
    );
    assert_eq!(d.endpoints.urls, vec!["mqtts://alloc-1.example:8883"]);
    assert_eq!(
        d.endpoints.source,
        EndpointSource::Assigned {
            version: 1,
            server: ServerId::new("alloc-1").unwrap()
        }
    );
    assert!(!refresh_due(&d.state, T0 + 10));
}

#[test]
fn a_newer_version_moves_the_device_and_an_older_one_is_refused() {
    let s = holding();
    let d = take(&s, &obj(6, "alloc-2", T0 + 1_000), T0 + 1_000);
    assert_eq!(
        d.verdict,
        AssignmentVerdict::Accepted {
            version: 6,
            previous: Some(5)
        }
    );
    assert_eq!(d.endpoints.urls, vec!["mqtts://alloc-2.example:8883"]);
    // The old object, still valid by its own expiry, is a rollback now.
    refused(
        &d.state,
        &seal(&obj(5, "alloc-1", T0)),
        T0 + 2_000,
        AssignmentRefusal::Rollback { held: 6, got: 5 },
    );
}

#[test]
fn the_same_version_is_a_duplicate_a_renewal_or_an_equivocation() {
    let s = holding();
    // Byte-identical: a duplicate, nothing changes.
    let d = take(&s, &obj(5, "alloc-1", T0), T0 + 5);
    assert_eq!(d.verdict, AssignmentVerdict::Duplicate { version: 5 });
    assert_eq!(d.state, s);
    // Same routing, issued later with a later expiry: a renewal.
    let renewal = obj(5, "alloc-1", T0 + TTL / 2);
    let d = take(&s, &renewal, T0 + TTL / 2);
    assert_eq!(
        d.verdict,
        AssignmentVerdict::Renewed {
            version: 5,
            expires_at_ms: T0 + TTL / 2 + TTL
        }
    );
    let renewed = d.state;
    assert!(endpoint_at(&renewed, T0 + TTL + 1, &bootstrap()).urls[0].contains("alloc-1"));
    // The older object of the same version arriving late: stale, no change.
    refused(
        &renewed,
        &seal(&obj(5, "alloc-1", T0)),
        T0 + TTL / 2 + 1,
        AssignmentRefusal::Stale { version: 5 },
    );
    // Same version, other server: equivocation.
    refused(
        &s,
        &seal(&obj(5, "alloc-9", T0 + 1)),
        T0 + 1,
        AssignmentRefusal::Equivocation { version: 5 },
    );
}

#[test]
fn expired_and_future_objects_are_refused() {
    let s = holding();
    refused(
        &s,
        &seal(&obj(6, "alloc-2", T0)),
        T0 + TTL,
        AssignmentRefusal::Expired,
    );
    let ahead = T0 + 1_000 + MAX_ASSIGNMENT_SKEW_MS + 1;
    refused(
        &s,
        &seal(&obj(6, "alloc-2", ahead)),
        T0 + 1_000,
        AssignmentRefusal::FromFuture,
    );
    // Within the skew is fine.
    let d = take(
        &s,
        &obj(6, "alloc-2", T0 + 1_000 + MAX_ASSIGNMENT_SKEW_MS),
        T0 + 1_000,
    );
    assert!(matches!(d.verdict, AssignmentVerdict::Accepted { .. }));
}

#[test]
fn an_expired_object_falls_back_to_bootstrap_and_keeps_the_version_floor() {
    let s = holding();
    assert!(!refresh_due(&s, T0 + TTL / 2));
    // Two thirds into its lifetime the device asks for a fresh one.
    assert!(refresh_due(&s, T0 + TTL * 2 / 3));
    assert!(endpoint_at(&s, T0 + TTL - 1, &bootstrap()).urls[0].contains("alloc-1"));
    let after = endpoint_at(&s, T0 + TTL, &bootstrap());
    assert_eq!(after.urls, bootstrap());
    assert_eq!(
        after.source,
        EndpointSource::BootstrapExpired { version: 5 }
    );
    // An older version is still refused after expiry.
    refused(
        &s,
        &seal(&obj(4, "alloc-0", T0 + TTL)),
        T0 + TTL + 1,
        AssignmentRefusal::Rollback { held: 5, got: 4 },
    );
    // A newer one takes over again.
    let d = take(&s, &obj(6, "alloc-3", T0 + TTL), T0 + TTL + 1);
    assert!(d.endpoints.urls[0].contains("alloc-3"));
}

#[test]
fn only_trusted_keys_the_assignment_domain_and_the_own_group_are_accepted() {
    let s = holding();
    let next = obj(6, "alloc-2", T0);
    refused(
        &s,
        &assign::seal_assignment(&next, &[&key(2)]),
        T0,
        AssignmentRefusal::UnknownKey,
    );
    // A validly signed object of another domain relabelled as an assignment.
    let mut env: SignedEnvelope =
        codec::decode(&sign::seal(Domain::Instruction, &next, &[&key(1)])).unwrap();
    refused(
        &s,
        &codec::encode(&env),
        T0,
        AssignmentRefusal::BadSignature,
    );
    env.domain = Domain::Assignment;
    refused(
        &s,
        &codec::encode(&env),
        T0,
        AssignmentRefusal::BadSignature,
    );
    env.signatures.clear();
    refused(
        &s,
        &codec::encode(&env),
        T0,
        AssignmentRefusal::BadSignature,
    );
    // Another tenant's group.
    let mut other = next.clone();
    other.group = GroupId::new("evil.eu-west.vpn").unwrap();
    refused(&s, &seal(&other), T0, AssignmentRefusal::WrongGroup);
    // Junk and oversize.
    refused(&s, b"", T0, AssignmentRefusal::Malformed);
    refused(
        &s,
        &vec![1u8; MAX_ASSIGNMENT_BYTES + 1],
        T0,
        AssignmentRefusal::Malformed,
    );
}

#[test]
fn invalid_fields_and_non_canonical_encodings_are_refused() {
    let s = holding();
    let base = obj(6, "alloc-2", T0);
    let mut cases: Vec<Assignment> = Vec::new();
    let mut a = base.clone();
    a.endpoints.clear();
    cases.push(a);
    let mut a = base.clone();
    a.endpoints = vec!["mqtt://x:1".into(); 9];
    cases.push(a);
    let mut a = base.clone();
    a.endpoints = vec!["http://x".into()];
    cases.push(a);
    let mut a = base.clone();
    a.expires_at_ms = a.issued_at_ms;
    cases.push(a);
    let mut a = base.clone();
    a.version = 0;
    cases.push(a);
    for a in cases {
        assert!(a.validate().is_err(), "{a:?}");
        // seal does not validate; the receiver does.
        refused(&s, &seal(&a), T0, AssignmentRefusal::Malformed);
    }
    // The version as an over-long varint (0x86 0x00 for 6): same value,
    // another byte form, refused even though the signature is valid.
    let payload = codec::encode(&base);
    let canonical_version = [0x06u8];
    let at = 1 + 1 + 16; // version byte, group length, group
    assert_eq!(&payload[at..at + 1], &canonical_version);
    let mut long = payload[..at].to_vec();
    long.extend_from_slice(&[0x86, 0x00]);
    long.extend_from_slice(&payload[at + 1..]);
    assert_eq!(codec::decode::<Assignment>(&long).unwrap(), base);
    let env = SignedEnvelope {
        domain: Domain::Assignment,
        signatures: vec![key(1).sign_entry(Domain::Assignment, &long)],
        payload: long,
    };
    refused(&s, &codec::encode(&env), T0, AssignmentRefusal::Malformed);
}

#[test]
fn an_assignment_never_opens_as_an_instruction_or_an_answer() {
    let bytes = seal(&obj(1, "alloc-1", T0));
    let lookup = |_| Some(key(1).public_key());
    assert!(shardline_shared::request::open_answer(&bytes, lookup).is_err());
    assert!(sign::open::<shardline_shared::msg::Instruction>(
        &bytes,
        Domain::Instruction,
        MAX_ASSIGNMENT_BYTES,
        lookup
    )
    .is_err());
    assert_eq!(
        assign::open_assignment(&bytes, lookup),
        Ok(obj(1, "alloc-1", T0))
    );
}
