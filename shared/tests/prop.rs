//! Property tests for the wire protocol:
//!
//! - every wire type survives encode → decode unchanged, refuses trailing
//!   bytes and refuses any strict prefix of its encoding;
//! - arbitrary bytes decoded as every type, and fed through envelope parsing
//!   and instruction acceptance, never panic;
//! - acceptance of validly signed instructions obeys the DESIGN.md rules,
//!   stated as properties rather than as the code's own order of checks;
//! - no single-byte change to a valid signed instruction makes the device
//!   apply a different instruction, or apply the same one twice.
//! - assignment objects (seed 001): junk never takes effect, a refusal never
//!   changes the state, versions held never go down and a version once held
//!   keeps its routing, whatever sequence of validly signed objects arrives.
//!
//! Case counts are kept small enough that the file runs in seconds in a
//! debug build; the fuzz targets in `fuzz/` explore the same surface for longer.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde::{de::DeserializeOwned, Serialize};
use shardline_shared::accept::{
    handle_incoming, handle_instruction, AcceptancePolicy, AcceptanceState, Verdict,
};
use shardline_shared::assign::{
    self, handle_assignment, Assignment, AssignmentState, AssignmentVerdict, GroupId,
    HeldAssignment, Region, ServerId,
};
use shardline_shared::msg::{
    AckOutcome, Activation, ClassStats, DeviceResources, DeviceStatus, Enforcement, Instruction,
    InstructionAck, KeyRotation, KeySet, Operation, Presence, PublicKeyEntry, QosNeed, QosReport,
    RejectReason, RejectionCounters, ResourceLimits, ShardActivation, ShardFailure, ShardKind,
    ShardState, ShardStatus, ShardVariant, TrafficClass,
};
use shardline_shared::msg::{EnrollRequest, MAX_ENROLL_TOKEN_LEN};
use shardline_shared::request::{
    self, Answer, AppRequest, Grant, GrantOutcome, InstanceStanding, RequestAnswer, RequestOp,
    RequestRefusal,
};
use shardline_shared::sign::{self, Domain, KeyPair, SignatureEntry, SignedEnvelope};
use shardline_shared::AppName;
use shardline_shared::{codec, decode, encode, DeviceId, KeyId, ShardRef};
use std::fmt::Debug;

const T0: u64 = 1_780_000_000_000;

// ------------------------------------------------------------ strategies

/// The id alphabet, not starting with a dot.
fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}"
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    token().prop_map(|s| DeviceId::new(s).expect("strategy makes valid ids"))
}

fn shard_ref() -> impl Strategy<Value = ShardRef> {
    (token(), token()).prop_map(|(id, v)| ShardRef::new(id, v).expect("valid"))
}

fn key_id() -> impl Strategy<Value = KeyId> {
    any::<[u8; 8]>().prop_map(KeyId)
}

fn traffic_class() -> impl Strategy<Value = TrafficClass> {
    select(TrafficClass::ALL.to_vec())
}

fn qos_need() -> impl Strategy<Value = QosNeed> {
    any::<(bool, bool, bool)>().prop_map(|(l, b, e)| QosNeed {
        latency_sensitive: l,
        bandwidth_heavy: b,
        needs_encryption: e,
    })
}

fn class_stats() -> impl Strategy<Value = ClassStats> {
    (
        traffic_class(),
        any::<(u64, u64, u64)>(),
        (
            option::of(any::<u32>()),
            option::of(any::<u32>()),
            option::of(any::<u32>()),
        ),
        any::<u16>(),
        any::<u32>(),
        qos_need(),
    )
        .prop_map(
            |(class, (bytes, packets, rate_bps), (p50, p95, jit), loss, flows, need)| ClassStats {
                class,
                bytes,
                packets,
                rate_bps,
                rtt_p50_us: p50,
                rtt_p95_us: p95,
                jitter_us: jit,
                loss_permille: loss,
                active_flows: flows,
                need,
            },
        )
}

fn device_resources() -> impl Strategy<Value = DeviceResources> {
    (
        any::<(u16, u16, u64, u64, bool)>(),
        select(vec!["x86_64", "aarch64", "arm", ""]),
    )
        .prop_map(|((cores, load, total, avail, aes), arch)| DeviceResources {
            cpu_cores: cores,
            cpu_load_permille: load,
            mem_total_kib: total,
            mem_available_kib: avail,
            aes_hw: aes,
            arch: arch.into(),
        })
}

fn shard_state() -> impl Strategy<Value = ShardState> {
    select(vec![
        ShardState::Starting,
        ShardState::Running,
        ShardState::Backoff,
        ShardState::Stopped,
        ShardState::Quarantined,
        ShardState::Expired,
    ])
}

fn enforcement() -> impl Strategy<Value = Enforcement> {
    select(vec![
        Enforcement::CgroupV2,
        Enforcement::CgroupV1,
        Enforcement::RlimitsOnly,
    ])
}

fn shard_failure() -> impl Strategy<Value = ShardFailure> {
    prop_oneof![
        any::<i32>().prop_map(|signal| ShardFailure::Crashed { signal }),
        any::<i32>().prop_map(|code| ShardFailure::Exited { code }),
        Just(ShardFailure::Hung),
        Just(ShardFailure::OverLimit),
        ".{0,12}".prop_map(|reason| ShardFailure::LoadRefused { reason }),
        ".{0,12}".prop_map(|reason| ShardFailure::InitFailed { reason }),
    ]
}

fn shard_status() -> impl Strategy<Value = ShardStatus> {
    (
        shard_ref(),
        token(),
        shard_state(),
        any::<(u32, u64, u32, u32)>(),
        option::of(shard_failure()),
        any::<u64>(),
        enforcement(),
    )
        .prop_map(
            |(shard, capability, state, (cpu, rss, restarts, errors), last, lease, enf)| {
                ShardStatus {
                    shard,
                    capability,
                    state,
                    cpu_permille: cpu,
                    rss_kib: rss,
                    restarts,
                    errors,
                    last_failure: last,
                    lease_expires_at_ms: lease,
                    enforcement: enf,
                }
            },
        )
}

fn rejection_counters() -> impl Strategy<Value = RejectionCounters> {
    any::<[u64; 9]>().prop_map(|c| RejectionCounters {
        bad_signature: c[0],
        unknown_key: c[1],
        wrong_device: c[2],
        rollback: c[3],
        equivocation: c[4],
        expired: c[5],
        from_future: c[6],
        clock_behind_floor: c[7],
        malformed: c[8],
    })
}

fn qos_report() -> impl Strategy<Value = QosReport> {
    (
        device_id(),
        any::<(u64, u64, u32)>(),
        vec(class_stats(), 0..4),
        device_resources(),
        vec(shard_status(), 0..3),
        any::<u64>(),
        rejection_counters(),
    )
        .prop_map(
            |(device, (seq, start, window), classes, resources, shards, applied, rejections)| {
                QosReport {
                    device,
                    seq,
                    window_start_ms: start,
                    window_ms: window,
                    classes,
                    resources,
                    shards,
                    applied_instruction_seq: applied,
                    rejections,
                    lending: Default::default(),
                }
            },
        )
}

fn reject_reason() -> impl Strategy<Value = RejectReason> {
    select(vec![
        RejectReason::Malformed,
        RejectReason::BadSignature,
        RejectReason::UnknownKey,
        RejectReason::WrongDevice,
        RejectReason::Rollback,
        RejectReason::Equivocation,
        RejectReason::Expired,
        RejectReason::FromFuture,
        RejectReason::ClockBehindFloor,
        RejectReason::LimitsOutOfRange,
    ])
}

fn ack_outcome() -> impl Strategy<Value = AckOutcome> {
    prop_oneof![
        Just(AckOutcome::Applied),
        Just(AckOutcome::Duplicate),
        reject_reason().prop_map(AckOutcome::Rejected),
        ".{0,12}".prop_map(|reason| AckOutcome::Failed { reason }),
    ]
}

fn instruction_ack() -> impl Strategy<Value = InstructionAck> {
    (device_id(), any::<u64>(), ack_outcome(), any::<u64>()).prop_map(
        |(device, instruction_seq, outcome, at_ms)| InstructionAck {
            device,
            instruction_seq,
            outcome,
            at_ms,
        },
    )
}

fn device_status() -> impl Strategy<Value = DeviceStatus> {
    (
        device_id(),
        select(vec![Presence::Online, Presence::Offline]),
        any::<u64>(),
        "[0-9.]{0,8}",
        any::<u64>(),
    )
        .prop_map(|(device, presence, seq, version, at_ms)| DeviceStatus {
            device,
            presence,
            applied_instruction_seq: seq,
            agent_version: version,
            at_ms,
        })
}

/// Limits anywhere in their types, and (as often) in or at the edges of the
/// ranges the device accepts, so both sides of every bound are drawn.
fn resource_limits() -> impl Strategy<Value = ResourceLimits> {
    let quota = prop_oneof![any::<u32>(), 0u32..=256_001, Just(256_000), Just(256_001)];
    let weight = prop_oneof![any::<u16>(), Just(0u16), 1u16..=10_001];
    let memory = prop_oneof![
        any::<u64>(),
        Just(0u64),
        (1u64 << 20) - 1..=(1u64 << 20),
        1u64 << 20..=1u64 << 40,
        Just((1u64 << 40) + 1),
    ];
    let nice = prop_oneof![any::<i8>(), -21i8..=20];
    (quota, weight, memory, nice).prop_map(|(q, w, m, n)| ResourceLimits {
        cpu_quota_permille: q,
        cpu_weight: w,
        memory_max_bytes: m,
        nice: n,
    })
}

/// The accepted ranges, written out independently of `accept::LIMIT_RANGES`
/// so the property checks the rule, not the code against itself.
fn limits_in_range(l: &ResourceLimits) -> bool {
    l.cpu_quota_permille <= 256_000
        && (1..=10_000).contains(&l.cpu_weight)
        && (l.memory_max_bytes == 0 || (1 << 20..=1 << 40).contains(&l.memory_max_bytes))
        && (-20..=19).contains(&l.nice)
}

fn activation() -> impl Strategy<Value = Activation> {
    (
        shard_ref(),
        token(),
        select(vec![ShardKind::Compute, ShardKind::Data]),
        any::<[u8; 32]>(),
        vec(any::<u8>(), 0..16),
        resource_limits(),
        any::<(u8, u64)>(),
    )
        .prop_map(
            |(shard, capability, kind, sha256, config, limits, (priority, lease))| Activation {
                shard,
                capability,
                kind,
                sha256,
                config,
                limits,
                priority,
                lease_expires_at_ms: lease,
            },
        )
}

fn shard_variant() -> impl Strategy<Value = ShardVariant> {
    (
        shard_ref(),
        any::<[u8; 32]>(),
        vec(any::<u8>(), 0..16),
        vec(any::<u8>(), 0..16),
        resource_limits(),
        any::<u64>(),
    )
        .prop_map(
            |(shard, sha256, config, sealed_config, limits, bandwidth_kbps)| ShardVariant {
                shard,
                sha256,
                config,
                sealed_config,
                limits,
                bandwidth_kbps,
            },
        )
}

fn shard_activation() -> impl Strategy<Value = ShardActivation> {
    (shard_variant(), vec(shard_variant(), 0..3), activation()).prop_map(
        |(primary, alternatives, a)| ShardActivation {
            primary,
            alternatives,
            capability: a.capability,
            kind: a.kind,
            priority: a.priority,
            lease_expires_at_ms: a.lease_expires_at_ms,
        },
    )
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        activation().prop_map(Operation::Activate),
        shard_ref().prop_map(|shard| Operation::Deactivate { shard }),
        shard_activation().prop_map(Operation::ActivateShard),
        any::<u16>().prop_map(|max_lines| Operation::RequestDiagnostics { max_lines }),
    ]
}

fn diagnostics() -> impl Strategy<Value = shardline_shared::diag::Diagnostics> {
    use shardline_shared::diag::{DiagShard, DiagStatus, Diagnostics};
    let shard = (shard_ref(), token(), any::<u32>(), option::of(".{0,20}")).prop_map(
        |(shard, capability, restarts, last_failure)| DiagShard {
            shard,
            capability,
            state: ShardState::Running,
            restarts,
            last_failure,
        },
    );
    (
        device_id(),
        any::<u64>(),
        vec(shard, 0..3),
        vec(".{0,40}", 0..8),
        any::<bool>(),
    )
        .prop_map(
            |(device, request_seq, shards, log_lines, truncated)| Diagnostics {
                device,
                request_seq,
                at_ms: request_seq / 2,
                status: DiagStatus {
                    agent_version: "0.1.0".into(),
                    uptime_s: request_seq % 1000,
                    arch: "x86_64".into(),
                    shards,
                    capture_source: "ring".into(),
                    broker_connected: truncated,
                    last_errors: log_lines.iter().take(2).cloned().collect(),
                },
                log_lines,
                truncated,
            },
        )
}

fn instruction() -> impl Strategy<Value = Instruction> {
    (
        device_id(),
        any::<(u64, u64, u64)>(),
        vec(operation(), 0..3),
    )
        .prop_map(|(device, (seq, issued, expires), ops)| Instruction {
            device,
            seq,
            issued_at_ms: issued,
            expires_at_ms: expires,
            ops,
        })
}

fn public_key_entry() -> impl Strategy<Value = PublicKeyEntry> {
    (key_id(), any::<[u8; 32]>())
        .prop_map(|(key_id, public_key)| PublicKeyEntry { key_id, public_key })
}

fn key_set() -> impl Strategy<Value = KeySet> {
    (any::<u64>(), vec(public_key_entry(), 0..3)).prop_map(|(epoch, keys)| KeySet { epoch, keys })
}

fn key_rotation() -> impl Strategy<Value = KeyRotation> {
    (key_set(), any::<u64>()).prop_map(|(new_set, issued_at_ms)| KeyRotation {
        new_set,
        issued_at_ms,
    })
}

fn domain() -> impl Strategy<Value = Domain> {
    select(vec![
        Domain::Instruction,
        Domain::Report,
        Domain::Rotation,
        Domain::Ack,
        Domain::Enroll,
    ])
}

fn enroll_request() -> impl Strategy<Value = EnrollRequest> {
    (device_id(), any::<[u8; 32]>(), "[ -~]{0,80}").prop_map(|(device, public_key, token)| {
        EnrollRequest {
            device,
            public_key,
            token,
        }
    })
}

fn signature_entry() -> impl Strategy<Value = SignatureEntry> {
    (key_id(), vec(any::<u8>(), 0..70))
        .prop_map(|(key_id, signature)| SignatureEntry { key_id, signature })
}

fn signed_envelope() -> impl Strategy<Value = SignedEnvelope> {
    (
        domain(),
        vec(any::<u8>(), 0..64),
        vec(signature_entry(), 0..3),
    )
        .prop_map(|(domain, payload, signatures)| SignedEnvelope {
            domain,
            payload,
            signatures,
        })
}

fn acceptance_state() -> impl Strategy<Value = AcceptanceState> {
    (
        key_set(),
        any::<u64>(),
        option::of(any::<[u8; 32]>()),
        any::<u64>(),
    )
        .prop_map(|(keys, seq, digest, floor)| AcceptanceState {
            keys,
            last_applied_seq: seq,
            last_applied_digest: digest,
            time_floor_ms: floor,
        })
}

fn app_name() -> impl Strategy<Value = AppName> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}".prop_map(|s| AppName::new(s).expect("valid"))
}

fn shard_kind() -> impl Strategy<Value = ShardKind> {
    select(vec![ShardKind::Compute, ShardKind::Data])
}

fn grant_outcome() -> impl Strategy<Value = GrantOutcome> {
    select(vec![
        GrantOutcome::Completed,
        GrantOutcome::Unused,
        GrantOutcome::Errored,
        GrantOutcome::OverLimit,
    ])
}

fn request_op() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        (shard_kind(), any::<u32>(), any::<u32>(), any::<u8>()).prop_map(
            |(kind, units, duration_ms, priority)| RequestOp::Acquire {
                kind,
                units,
                duration_ms,
                priority
            }
        ),
        (any::<u64>(), any::<u32>())
            .prop_map(|(grant, duration_ms)| RequestOp::Renew { grant, duration_ms }),
        (any::<u64>(), grant_outcome())
            .prop_map(|(grant, outcome)| RequestOp::Release { grant, outcome }),
        Just(RequestOp::Query),
    ]
}

fn app_request() -> impl Strategy<Value = AppRequest> {
    (
        device_id(),
        any::<u64>(),
        app_name(),
        app_name(),
        any::<u64>(),
        request_op(),
    )
        .prop_map(|(device, seq, app, instance, at_ms, op)| AppRequest {
            device,
            seq,
            app,
            instance,
            at_ms,
            op,
        })
}

fn grant() -> impl Strategy<Value = Grant> {
    (any::<u64>(), shard_kind(), any::<u32>(), any::<u64>()).prop_map(
        |(grant, kind, units, expires_at_ms)| Grant {
            grant,
            kind,
            units,
            expires_at_ms,
        },
    )
}

fn request_refusal() -> impl Strategy<Value = RequestRefusal> {
    prop_oneof![
        (shard_kind(), any::<(u32, u32, u32)>()).prop_map(|(kind, (asked, quota, in_use))| {
            RequestRefusal::InsufficientQuota {
                kind,
                asked,
                quota,
                in_use,
            }
        }),
        shard_kind().prop_map(|kind| RequestRefusal::KindNotAllowed { kind }),
        any::<u32>().prop_map(|limit| RequestRefusal::QueueFull { limit }),
        any::<u32>().prop_map(|retry_after_ms| RequestRefusal::RateLimited { retry_after_ms }),
        any::<u64>().prop_map(|grant| RequestRefusal::UnknownGrant { grant }),
        any::<(u32, u32)>().prop_map(|(max_units, max_duration_ms)| {
            RequestRefusal::OutOfRange {
                max_units,
                max_duration_ms,
            }
        }),
        Just(RequestRefusal::Drained),
        Just(RequestRefusal::QueueTimeout),
    ]
}

fn answer_body() -> impl Strategy<Value = Answer> {
    prop_oneof![
        grant().prop_map(Answer::Granted),
        any::<(u64, u32, u64)>().prop_map(|(ticket, position, expected_wait_ms)| {
            Answer::Queued {
                ticket,
                position,
                expected_wait_ms,
            }
        }),
        request_refusal().prop_map(Answer::Refused),
        any::<(u64, u32)>().prop_map(|(grant, units)| Answer::Released { grant, units }),
        any::<(u16, u16, u32, u32, u32, u32, u32)>().prop_map(|t| {
            Answer::Standing(InstanceStanding {
                reputation_tenths: t.0,
                device_reputation_tenths: t.1,
                compute_quota_units: t.2,
                data_quota_units: t.3,
                compute_in_use: t.4,
                data_in_use: t.5,
                queued: t.6,
            })
        }),
        grant().prop_map(Answer::Renewed),
    ]
}

fn request_answer() -> impl Strategy<Value = RequestAnswer> {
    (
        device_id(),
        app_name(),
        app_name(),
        any::<u64>(),
        any::<u64>(),
        answer_body(),
    )
        .prop_map(
            |(device, app, instance, request_seq, issued_at_ms, answer)| RequestAnswer {
                device,
                app,
                instance,
                request_seq,
                issued_at_ms,
                answer,
            },
        )
}

// ------------------------------------------------------------ round trips

/// Encode → decode gives the value back; one trailing byte, or any strict
/// prefix (`cut` picks which), is refused.
fn round_trip<T>(value: &T, cut: prop::sample::Index) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = encode(value);
    let back: T = decode(&bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(&back, value);
    let mut longer = bytes.clone();
    longer.push(0);
    prop_assert!(decode::<T>(&longer).is_err(), "trailing byte accepted");
    let prefix = &bytes[..cut.index(bytes.len())];
    prop_assert!(decode::<T>(prefix).is_err(), "prefix {prefix:?} accepted");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_qos_report(v in qos_report(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_diagnostics_and_its_seal(v in diagnostics(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
        let k = KeyPair::from_seed(&[4; 32]);
        let sealed = v.seal(&k);
        prop_assert_eq!(shardline_shared::diag::open(&sealed, &k.public_key()).unwrap(), v);
        // Another key's answer, or one cut short, never opens.
        let other = KeyPair::from_seed(&[5; 32]);
        prop_assert!(shardline_shared::diag::open(&sealed, &other.public_key()).is_err());
        let at = cut.index(sealed.len());
        prop_assert!(shardline_shared::diag::open(&sealed[..at], &k.public_key()).is_err());
    }

    #[test]
    fn round_trip_app_request(v in app_request(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_request_answer(v in request_answer(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn a_sealed_request_opens_only_as_sent_and_never_as_an_answer(
        v in app_request(),
        flip in any::<prop::sample::Index>(),
    ) {
        let key = KeyPair::from_seed(&[9; 32]);
        let sealed = request::seal_request(&v, &key);
        if sealed.len() <= request::MAX_REQUEST_BYTES {
            prop_assert_eq!(
                request::open_request(&sealed, &v.device, &key.public_key()),
                Ok(v.clone())
            );
        }
        prop_assert!(request::open_answer(&sealed, |_| Some(key.public_key())).is_err());
        // Any single changed byte: refused, or (a byte outside what is
        // signed, e.g. the domain) still the very same request.
        let mut bad = sealed.clone();
        let i = flip.index(bad.len());
        bad[i] ^= 0x01;
        if let Ok(r) = request::open_request(&bad, &v.device, &key.public_key()) {
            prop_assert_eq!(r, v);
        }
    }

    #[test]
    fn round_trip_class_stats(v in class_stats(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_shard_status(v in shard_status(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_device_resources(v in device_resources(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_rejection_counters(v in rejection_counters(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_instruction_ack(v in instruction_ack(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_device_status(v in device_status(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_instruction(v in instruction(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_operation(v in operation(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_key_rotation(v in key_rotation(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_key_set(v in key_set(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_signed_envelope(v in signed_envelope(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_enroll_request(v in enroll_request(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_acceptance_state(v in acceptance_state(), cut in any::<prop::sample::Index>()) {
        round_trip(&v, cut)?;
    }

    #[test]
    fn round_trip_small_enums(
        c in traffic_class(), s in shard_state(), e in enforcement(), f in shard_failure(),
        r in reject_reason(), o in ack_outcome(), d in domain(), cut in any::<prop::sample::Index>(),
    ) {
        round_trip(&c, cut)?;
        round_trip(&s, cut)?;
        round_trip(&e, cut)?;
        round_trip(&f, cut)?;
        round_trip(&r, cut)?;
        round_trip(&o, cut)?;
        round_trip(&d, cut)?;
    }

    #[test]
    fn round_trip_ids(d in device_id(), s in shard_ref(), k in key_id(), cut in any::<prop::sample::Index>()) {
        round_trip(&d, cut)?;
        round_trip(&s, cut)?;
        round_trip(&k, cut)?;
        prop_assert_eq!(s.to_string().parse::<ShardRef>().ok(), Some(s));
    }
}

// ------------------------------------------------------------ never panic

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn me() -> DeviceId {
    DeviceId::new("router-1").unwrap()
}

/// A device at epoch 1 trusting key 1 that has applied seq 10.
fn device_state() -> AcceptanceState {
    AcceptanceState {
        keys: KeySet::of(1, &[&key(1)]),
        last_applied_seq: 10,
        last_applied_digest: Some([7; 32]),
        time_floor_ms: T0 - 60_000,
    }
}

/// Decodes `bytes` as every wire type; only the absence of a panic matters.
fn decode_as_everything(bytes: &[u8]) {
    let _ = decode::<QosReport>(bytes);
    let _ = decode::<ClassStats>(bytes);
    let _ = decode::<ShardStatus>(bytes);
    let _ = decode::<InstructionAck>(bytes);
    let _ = decode::<DeviceStatus>(bytes);
    let _ = decode::<Instruction>(bytes);
    let _ = decode::<Operation>(bytes);
    let _ = decode::<KeyRotation>(bytes);
    let _ = decode::<KeySet>(bytes);
    let _ = decode::<SignedEnvelope>(bytes);
    let _ = decode::<AcceptanceState>(bytes);
    let _ = decode::<RejectionCounters>(bytes);
    let _ = decode::<DeviceId>(bytes);
    let _ = decode::<ShardRef>(bytes);
    let _ = decode::<DeviceResources>(bytes);
    let _ = decode::<Activation>(bytes);
    let _ = decode::<PublicKeyEntry>(bytes);
    let _ = decode::<SignatureEntry>(bytes);
    let _ = decode::<AckOutcome>(bytes);
    let _ = decode::<ShardFailure>(bytes);
    let _ = decode::<TrafficClass>(bytes);
    let _ = decode::<Domain>(bytes);
    let _ = decode::<EnrollRequest>(bytes);
    let _ = decode::<AppRequest>(bytes);
    let _ = decode::<RequestAnswer>(bytes);
    let _ = decode::<Assignment>(bytes);
    let _ = decode::<AssignmentState>(bytes);
    let _ = decode::<GroupId>(bytes);
    let _ = decode::<Region>(bytes);
    let _ = decode::<ServerId>(bytes);
    let _ = decode::<shardline_shared::diag::Diagnostics>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_in_decode_or_acceptance(
        raw in vec(any::<u8>(), 0..300),
        now in any::<u64>(),
    ) {
        // Raw, and behind the right version byte so decoding gets past it.
        let mut framed = vec![codec::FORMAT_VERSION];
        framed.extend_from_slice(&raw);
        let state = device_state();
        for bytes in [&raw[..], &framed[..]] {
            decode_as_everything(bytes);
            let _ = sign::parse_envelope(bytes, codec::MAX_PAYLOAD);
            // Random bytes never make a request signed by the key it names.
            prop_assert!(sign::open_enroll(bytes).is_err());
            let k1 = KeyPair::from_seed(&[1; 32]);
            prop_assert!(request::open_request(bytes, &me(), &k1.public_key()).is_err());
            prop_assert!(request::open_answer(bytes, |_| Some(k1.public_key())).is_err());
            let held = assignment_state();
            let a = handle_assignment(&held, bytes, now, &KeySet::of(1, &[&k1]), &[]);
            prop_assert!(matches!(a.verdict, AssignmentVerdict::Refused(_)), "{:?}", a.verdict);
            prop_assert_eq!(a.state, held);
            prop_assert!(shardline_shared::diag::open(bytes, &k1.public_key()).is_err());
            let d = handle_incoming(&state, &me(), bytes, now, &AcceptancePolicy::default());
            // Random bytes are never a valid signature by key 1.
            prop_assert!(
                matches!(d.verdict, Verdict::Reject { .. } | Verdict::RotationRefused(_)),
                "{:?}", d.verdict
            );
            prop_assert_eq!(d.state, state.clone());
        }
    }

    #[test]
    fn structured_envelopes_with_junk_signatures_never_apply(
        mut env in signed_envelope(),
        instr in instruction(),
        use_real_payload in any::<bool>(),
        now in any::<u64>(),
    ) {
        // Envelopes that parse, with well-formed or junk payloads, and
        // signatures that are random bytes (sometimes under the pinned key id).
        if use_real_payload {
            env.payload = encode(&instr);
        }
        if let Some(first) = env.signatures.first_mut() {
            first.key_id = key(1).id();
        }
        let state = device_state();
        let bytes = encode(&env);
        let d = handle_incoming(&state, &me(), &bytes, now, &AcceptancePolicy::default());
        prop_assert!(
            matches!(d.verdict, Verdict::Reject { .. } | Verdict::RotationRefused(_)),
            "{:?}", d.verdict
        );
        prop_assert_eq!(d.state, state);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any number of signatures encodes; a decoder keeps at most
    /// `MAX_SIGNATURES` and refuses more with the count named.
    #[test]
    fn envelopes_over_the_signature_cap_never_decode(
        mut env in signed_envelope(),
        extra in vec(signature_entry(), 0..8),
    ) {
        env.signatures.extend(extra);
        let n = env.signatures.len();
        let bytes = encode(&env);
        let parsed = sign::parse_envelope(&bytes, codec::MAX_PAYLOAD);
        if n <= sign::MAX_SIGNATURES {
            prop_assert_eq!(parsed, Ok(env.clone()));
            prop_assert_eq!(decode::<SignedEnvelope>(&bytes), Ok(env));
        } else {
            prop_assert_eq!(
                parsed,
                Err(sign::OpenError::Envelope(codec::DecodeError::TooManySignatures {
                    count: n,
                    max: sign::MAX_SIGNATURES,
                }))
            );
            prop_assert!(decode::<SignedEnvelope>(&bytes).is_err());
            let d = handle_incoming(&device_state(), &me(), &bytes, T0, &AcceptancePolicy::default());
            prop_assert_eq!(d.verdict, Verdict::Reject { seq: None, reason: RejectReason::Malformed });
        }
    }
}

// ------------------------------------------------------------ acceptance rules

/// Instructions for this device or another, with times and sequence numbers
/// spread around the device's clock and state so every rule is exercised.
fn nearby_instruction() -> impl Strategy<Value = Instruction> {
    (
        prop_oneof![4 => Just(me()), 1 => device_id()],
        prop_oneof![1 => Just(0u64), 6 => 5u64..=30, 1 => any::<u64>()],
        -60_000i64..90_000,
        -30_000i64..200_000,
        vec(operation(), 0..2),
    )
        .prop_map(|(device, seq, issued, expires, ops)| Instruction {
            device,
            seq,
            issued_at_ms: T0.wrapping_add_signed(issued),
            expires_at_ms: T0.wrapping_add_signed(expires),
            ops,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn validly_signed_instructions_follow_the_design_rules(
        instr in nearby_instruction(),
        now_offset in -80_000i64..80_000,
        floor_offset in -120_000i64..20_000,
        applied_is_this in proptest::bool::weighted(0.2),
    ) {
        let policy = AcceptancePolicy::default();
        let skew = policy.max_clock_skew_ms;
        let now = T0.wrapping_add_signed(now_offset);
        let bytes = sign::seal(Domain::Instruction, &instr, &[&key(1)]);
        let env = sign::parse_envelope(&bytes, codec::MAX_PAYLOAD).unwrap();
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&env.payload).into();
        let mut state = device_state();
        state.time_floor_ms = T0.wrapping_add_signed(floor_offset);
        if applied_is_this {
            // Pretend this very instruction was the last one applied.
            state.last_applied_seq = instr.seq;
            state.last_applied_digest = Some(digest);
        }

        let d = handle_incoming(&state, &me(), &bytes, now, &policy);
        let clock_ok = now + skew >= state.time_floor_ms;
        let fresh = instr.expires_at_ms > now && instr.issued_at_ms <= now + skew;
        let ours = instr.device == me();
        let limits_ok = instr.ops.iter().all(|op| match op {
            Operation::Activate(a) => limits_in_range(&a.limits),
            Operation::ActivateShard(a) => a.variants().all(|v| limits_in_range(&v.limits)),
            Operation::Deactivate { .. } | Operation::RequestDiagnostics { .. } => true,
        });
        match &d.verdict {
            Verdict::Apply(applied) => {
                prop_assert_eq!(applied, &instr);
                prop_assert!(ours && clock_ok && fresh && limits_ok);
                prop_assert!(instr.seq > state.last_applied_seq);
                prop_assert_eq!(d.state.last_applied_seq, instr.seq);
                prop_assert_eq!(d.state.last_applied_digest, Some(digest));
                // The floor moves to the signed issue time, never to the
                // device clock: it stays within skew of the clock that
                // accepted it and carries no jump of that clock.
                prop_assert_eq!(
                    d.state.time_floor_ms,
                    state.time_floor_ms.max(instr.issued_at_ms)
                );
                prop_assert_eq!(&d.state.keys, &state.keys);
            }
            Verdict::Ignore { seq } => {
                prop_assert_eq!(*seq, instr.seq);
                prop_assert!(applied_is_this && ours && clock_ok);
                prop_assert_eq!(&d.state, &state);
            }
            Verdict::Reject { seq, reason } => {
                prop_assert_eq!(*seq, Some(instr.seq));
                prop_assert_eq!(&d.state, &state);
                let why = match reason {
                    RejectReason::WrongDevice => !ours,
                    RejectReason::ClockBehindFloor => !clock_ok,
                    RejectReason::Rollback => instr.seq <= state.last_applied_seq,
                    RejectReason::Equivocation => {
                        instr.seq == state.last_applied_seq
                            && state.last_applied_digest != Some(digest)
                    }
                    RejectReason::Expired => instr.expires_at_ms <= now,
                    RejectReason::FromFuture => instr.issued_at_ms > now + skew,
                    RejectReason::LimitsOutOfRange => !limits_ok,
                    other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                };
                prop_assert!(why, "{reason:?} without its cause");
            }
            other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
        }
        // Completeness: when every rule holds, it is applied.
        if ours && clock_ok && fresh && limits_ok && instr.seq > state.last_applied_seq {
            prop_assert!(matches!(d.verdict, Verdict::Apply(_)), "{:?}", d.verdict);
        }
    }

    #[test]
    fn rotations_signed_by_the_current_key_only_move_one_epoch_forward(
        epoch in prop_oneof![3 => Just(2u64), 1 => any::<u64>()],
        seeds in vec(3u8..6, 0..3),
        junk in option::weighted(0.2, public_key_entry()),
        issued_offset in -60_000i64..60_000,
        sign_with_new in any::<bool>(),
        real_new_key in any::<bool>(),
    ) {
        // Real keys (consistent ids), sometimes key 2 which signs, sometimes
        // a junk entry whose id does not match its key.
        let mut new_set = KeySet {
            epoch,
            keys: seeds.iter().map(|&s| key(s).public_entry()).collect(),
        };
        new_set.keys.extend(junk);
        if real_new_key {
            new_set.keys.push(key(2).public_entry());
        }
        let rotation = KeyRotation {
            new_set: new_set.clone(),
            issued_at_ms: T0.wrapping_add_signed(issued_offset),
        };
        let (k1, k2) = (key(1), key(2));
        let signers: Vec<&KeyPair> = if sign_with_new { vec![&k1, &k2] } else { vec![&k1] };
        let bytes = sign::seal(Domain::Rotation, &rotation, &signers);
        let state = device_state();
        let d = handle_incoming(&state, &me(), &bytes, T0, &AcceptancePolicy::default());
        match d.verdict {
            Verdict::Rotated { epoch } => {
                prop_assert_eq!(epoch, 2);
                prop_assert_eq!(&d.state.keys, &new_set);
                prop_assert!(sign_with_new && real_new_key);
                prop_assert!(new_set.keys.iter().all(|k| k.key_id == KeyId::of_public_key(&k.public_key)));
                prop_assert_eq!((d.state.last_applied_seq, d.state.last_applied_digest), (0, None));
            }
            Verdict::RotationRefused(_) => prop_assert_eq!(d.state, state),
            other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
        }
    }
}

// ------------------------------------------------------------ mutations

/// The signed instruction and the device state after applying it, computed
/// once: signing and key derivation dominate the run time under qemu.
fn mutation_base() -> &'static (Instruction, Vec<u8>, AcceptanceState) {
    static BASE: std::sync::OnceLock<(Instruction, Vec<u8>, AcceptanceState)> =
        std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let (instr, bytes) = signed_instruction();
        let policy = AcceptancePolicy::default();
        let after = handle_instruction(&device_state(), &me(), &bytes, T0, &policy).state;
        assert_eq!(
            after.last_applied_seq, instr.seq,
            "the base instruction applies"
        );
        (instr, bytes, after)
    })
}

/// A valid instruction for this device, signed by the pinned key.
fn signed_instruction() -> (Instruction, Vec<u8>) {
    let instr = Instruction {
        device: me(),
        seq: 11,
        issued_at_ms: T0,
        expires_at_ms: T0 + 60_000,
        ops: vec![
            Operation::Activate(Activation {
                shard: ShardRef::new("tunnel", "1.0").unwrap(),
                capability: "vpn".into(),
                kind: ShardKind::Data,
                sha256: [3; 32],
                config: vec![1, 2, 3, 4],
                limits: ResourceLimits {
                    cpu_quota_permille: 200,
                    cpu_weight: 100,
                    memory_max_bytes: 1 << 24,
                    nice: 0,
                },
                priority: 1,
                lease_expires_at_ms: T0 + 120_000,
            }),
            Operation::Deactivate {
                shard: ShardRef::new("aes", "1.0").unwrap(),
            },
        ],
    };
    let bytes = sign::seal(Domain::Instruction, &instr, &[&key(1)]);
    (instr, bytes)
}

/// Checks one mutated message against a device that has not applied the
/// original yet and one that has.
fn check_mutant(original: &Instruction, mutant: &[u8]) -> Result<(), TestCaseError> {
    let policy = AcceptancePolicy::default();
    let before = device_state();
    let d = handle_incoming(&before, &me(), mutant, T0, &policy);
    if let Verdict::Apply(applied) = &d.verdict {
        prop_assert_eq!(applied, original, "a mutation applied another instruction");
    }
    let (_, _, after) = mutation_base();
    let d = handle_incoming(after, &me(), mutant, T0, &policy);
    prop_assert!(
        !matches!(d.verdict, Verdict::Apply(_) | Verdict::Rotated { .. }),
        "a mutation was applied on top of the original: {:?}",
        d.verdict
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutating_any_byte_never_applies_a_different_instruction(
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let (original, bytes, _) = mutation_base();
        let mut mutant = bytes.clone();
        let i = at.index(mutant.len());
        prop_assume!(mutant[i] != value);
        mutant[i] = value;
        check_mutant(original, &mutant)?;
    }

    #[test]
    fn inserting_or_deleting_a_byte_never_applies_a_different_instruction(
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
        insert in any::<bool>(),
    ) {
        let (original, bytes, _) = mutation_base();
        let mut mutant = bytes.clone();
        let i = at.index(mutant.len());
        if insert {
            mutant.insert(i, value);
        } else {
            mutant.remove(i);
        }
        check_mutant(original, &mutant)?;
    }
}

#[test]
fn every_single_bit_flip_of_a_signed_instruction_is_rejected() {
    // Exhaustive over the whole message: every byte is part of the version,
    // domain, length prefixes, signed payload or signature, so no flip may
    // leave an instruction the device applies.
    let (original, bytes) = signed_instruction();
    let state = device_state();
    let mut checked = 0;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut mutant = bytes.clone();
            mutant[i] ^= 1 << bit;
            let d = handle_incoming(&state, &me(), &mutant, T0, &AcceptancePolicy::default());
            assert!(
                matches!(
                    d.verdict,
                    Verdict::Reject { .. } | Verdict::RotationRefused(_)
                ),
                "flip of bit {bit} in byte {i}: {:?}",
                d.verdict
            );
            assert_eq!(d.state, state);
            checked += 1;
        }
    }
    assert_eq!(checked, bytes.len() * 8);
    // And the unmutated message does apply, so the rejections mean something.
    let d = handle_incoming(&state, &me(), &bytes, T0, &AcceptancePolicy::default());
    assert_eq!(d.verdict, Verdict::Apply(original));
}

// ------------------------------------------------------------ enrolment

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A sealed enrolment request opens as itself; changing any one byte of
    /// it either is refused or (a no-op change postcard tolerates) opens as
    /// the very same request: never as another device, key or token.
    #[test]
    fn enrolment_requests_open_only_unchanged(
        seed in any::<[u8; 32]>(),
        device in device_id(),
        token in "[0-9a-f]{1,64}",
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let k = KeyPair::from_seed(&seed);
        let req = EnrollRequest { device, public_key: k.public_key(), token };
        let sealed = sign::seal_enroll(&req, &k);
        prop_assert_eq!(sign::open_enroll(&sealed), Ok(req.clone()));
        let mut bent = sealed.clone();
        let i = at.index(bent.len());
        bent[i] ^= flip;
        if let Ok(opened) = sign::open_enroll(&bent) {
            prop_assert_eq!(opened, req);
        }
    }

    /// Requests whose token is empty or longer than the cap never open,
    /// however well signed.
    #[test]
    fn enrolment_tokens_outside_the_cap_never_open(
        seed in any::<[u8; 32]>(),
        long in any::<bool>(),
    ) {
        let k = KeyPair::from_seed(&seed);
        let token = if long { "a".repeat(MAX_ENROLL_TOKEN_LEN + 1) } else { String::new() };
        let req = EnrollRequest { device: me(), public_key: k.public_key(), token };
        prop_assert!(sign::open_enroll(&sign::seal_enroll(&req, &k)).is_err());
    }
}

// ------------------------------------------------------------ assignments (seed 001)

fn part() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,12}"
}

fn group_id() -> impl Strategy<Value = GroupId> {
    (part(), part(), part()).prop_map(|(t, r, c)| GroupId::of(&t, &r, &c).expect("valid"))
}

fn endpoint() -> impl Strategy<Value = String> {
    (
        select(vec!["mqtt", "mqtts"]),
        "[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?",
        option::of(1u16..),
    )
        .prop_map(|(scheme, host, port)| match port {
            Some(p) => format!("{scheme}://{host}:{p}"),
            None => format!("{scheme}://{host}"),
        })
}

fn assignment() -> impl Strategy<Value = Assignment> {
    (
        group_id(),
        1u64..,
        (0u64..u64::MAX / 2, 1u64..u64::MAX / 2),
        part(),
        token(),
        vec(endpoint(), 1..=8),
    )
        .prop_map(
            |(group, version, (issued, life), region, server, endpoints)| Assignment {
                group,
                version,
                issued_at_ms: issued,
                expires_at_ms: issued + life,
                region: Region::new(region).expect("valid"),
                server: ServerId::new(server).expect("valid"),
                endpoints,
            },
        )
}

fn assign_group() -> GroupId {
    GroupId::new("acme.eu-west.vpn").unwrap()
}

/// A device holding version 10 of its group's assignment.
fn assignment_state() -> AssignmentState {
    AssignmentState {
        group: assign_group(),
        current: Some(HeldAssignment {
            assignment: Assignment {
                group: assign_group(),
                version: 10,
                issued_at_ms: T0,
                expires_at_ms: T0 + 900_000,
                region: Region::new("eu-west").unwrap(),
                server: ServerId::new("alloc-1").unwrap(),
                endpoints: vec!["mqtt://a1:1883".into()],
            },
            digest: [3; 32],
        }),
    }
}

/// One object a (possibly confused or split-brained) allocator might send:
/// small versions, two servers, issue times around `T0`, seen at `now`.
fn nearby_assignment() -> impl Strategy<Value = (Assignment, u64)> {
    (
        1u64..6,
        select(vec!["alloc-1", "alloc-2"]),
        0u64..4,
        1u64..4,
        0u64..6,
    )
        .prop_map(|(version, server, issued, life, now)| {
            let issued_at_ms = T0 + issued * 100_000;
            (
                Assignment {
                    group: assign_group(),
                    version,
                    issued_at_ms,
                    expires_at_ms: issued_at_ms + life * 100_000,
                    region: Region::new("eu-west").unwrap(),
                    server: ServerId::new(server).unwrap(),
                    endpoints: vec![format!("mqtt://{server}:1883")],
                },
                T0 + now * 100_000,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_assignment(v in assignment(), cut in any::<prop::sample::Index>()) {
        prop_assert_eq!(v.validate(), Ok(()));
        round_trip(&v, cut)?;
        prop_assert!(assign::decode_assignment(&encode(&v)).is_ok());
    }

    #[test]
    fn round_trip_assignment_state(
        v in option::of(assignment()), g in group_id(), digest in any::<[u8; 32]>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let state = AssignmentState {
            group: g,
            current: v.map(|assignment| HeldAssignment { assignment, digest }),
        };
        round_trip(&state, cut)?;
    }

    #[test]
    fn structured_assignments_with_junk_signatures_never_take_effect(
        mut env in signed_envelope(),
        a in assignment(),
        use_real_payload in any::<bool>(),
        now in any::<u64>(),
    ) {
        if use_real_payload {
            env.payload = encode(&a);
        }
        env.domain = Domain::Assignment;
        if let Some(first) = env.signatures.first_mut() {
            first.key_id = key(1).id();
        }
        let held = assignment_state();
        let d = handle_assignment(&held, &encode(&env), now, &KeySet::of(1, &[&key(1)]), &[]);
        prop_assert!(matches!(d.verdict, AssignmentVerdict::Refused(_)), "{:?}", d.verdict);
        prop_assert_eq!(d.state, held);
    }

    /// Any sequence of validly signed objects: refusals never mutate, the
    /// held version never goes down, a version once held keeps its routing
    /// (no equivocation gets in), and the expiry of a version only grows.
    #[test]
    fn validly_signed_assignments_keep_versions_monotonic(
        seq in vec(nearby_assignment(), 1..24),
    ) {
        let keys = KeySet::of(1, &[&key(1)]);
        let mut state = AssignmentState::bootstrap(assign_group());
        let mut first_routing: std::collections::BTreeMap<u64, Assignment> = Default::default();
        for (a, now) in seq {
            let bytes = assign::seal_assignment(&a, &[&key(1)]);
            let d = handle_assignment(&state, &bytes, now, &keys, &[]);
            let before = state.current.as_ref().map(|h| h.assignment.clone());
            match &d.verdict {
                AssignmentVerdict::Refused(_) | AssignmentVerdict::Duplicate { .. } => {
                    prop_assert_eq!(&d.state, &state);
                }
                AssignmentVerdict::Accepted { version, previous } => {
                    prop_assert_eq!(*previous, before.as_ref().map(|b| b.version));
                    prop_assert!(before.as_ref().is_none_or(|b| b.version < *version));
                    prop_assert!(a.expires_at_ms > now);
                }
                AssignmentVerdict::Renewed { .. } => {
                    let b = before.clone().expect("a renewal needs a held object");
                    prop_assert!(b.same_routing(&a));
                    prop_assert!(a.expires_at_ms > b.expires_at_ms);
                }
            }
            if let Some(h) = &d.state.current {
                let first = first_routing.entry(h.assignment.version).or_insert_with(|| h.assignment.clone());
                prop_assert!(first.same_routing(&h.assignment), "equivocation got in");
                if let Some(b) = &before {
                    prop_assert!(h.assignment.version >= b.version);
                }
                // What routes is the held object while valid, else bootstrap.
                let e = assign::endpoint_at(&d.state, now, &[]);
                prop_assert_eq!(e.urls.is_empty(), now >= h.assignment.expires_at_ms);
            }
            state = d.state;
        }
    }
}
