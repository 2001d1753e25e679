//! Golden bytes: the exact wire encoding of every type in `msg.rs`,
//! `sign.rs`, `request.rs` and `assign.rs` (and the identifiers and persisted
//! acceptance and assignment state they carry), built from fixed values and
//! compared with hex checked into this file.
//!
//! A field added, removed, reordered or retyped, a variant inserted anywhere
//! but at the end, a changed domain tag or key-id derivation: each changes
//! these bytes and fails a test here, before it can silently break a peer
//! running the previous build. If a change is intended, it needs a new
//! `FORMAT_VERSION` (structs) or a variant at the end (enums), and the hex
//! here is updated in the same commit, with the reason.
//!
//! Every golden is also decoded back and compared with the value, so the
//! checked-in bytes stay readable by this build.

use serde::{de::DeserializeOwned, Serialize};
use shardline_shared::accept::AcceptanceState;
use shardline_shared::assign::{
    self, Assignment, AssignmentState, GroupId, HeldAssignment, Region, ServerId,
};
use shardline_shared::codec::DecodeError;
use shardline_shared::msg::EnrollRequest;
use shardline_shared::msg::{
    AckOutcome, Activation, ClassStats, DeviceResources, DeviceStatus, Enforcement, Instruction,
    InstructionAck, KeyRotation, KeySet, Operation, Presence, QosNeed, QosReport, RejectReason,
    RejectionCounters, ResourceLimits, ShardActivation, ShardFailure, ShardKind, ShardState,
    ShardStatus, ShardVariant, TrafficClass,
};
use shardline_shared::request::{
    self, Answer, AppRequest, Grant, GrantOutcome, InstanceStanding, RequestAnswer, RequestOp,
    RequestRefusal,
};
use shardline_shared::seal::SealedConfigBody;
use shardline_shared::sign::{self, Domain, KeyPair, SignatureEntry, SignedEnvelope};
use shardline_shared::AppName;
use shardline_shared::{decode, encode, DeviceId, ShardRef};
use std::fmt::Debug;

const T0: u64 = 1_780_000_000_000;

/// Encodes `value`, compares with `golden` (hex), decodes `golden` back.
#[track_caller]
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(what: &str, value: &T, golden: &str) {
    let actual = hex::encode(encode(value));
    assert_eq!(
        actual, golden,
        "wire encoding of {what} changed: a peer on the previous build cannot read it"
    );
    let bytes = hex::decode(golden).expect("golden is hex");
    let back: T = decode(&bytes).unwrap_or_else(|e| panic!("golden {what} does not decode: {e}"));
    assert_eq!(&back, value, "golden {what} decodes to another value");
}

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn device() -> DeviceId {
    DeviceId::new("rtr-1").unwrap()
}

fn shard() -> ShardRef {
    ShardRef::new("tun", "1.2").unwrap()
}

fn class_stats() -> ClassStats {
    ClassStats {
        class: TrafficClass::Calls,
        bytes: 1_500_000,
        packets: 3_000,
        rate_bps: 1_200_000,
        rtt_p50_us: Some(18_000),
        rtt_p95_us: Some(45_000),
        jitter_us: None,
        loss_permille: 7,
        active_flows: 2,
        need: QosNeed {
            latency_sensitive: true,
            bandwidth_heavy: false,
            needs_encryption: true,
        },
    }
}

fn resources() -> DeviceResources {
    DeviceResources {
        cpu_cores: 4,
        cpu_load_permille: 310,
        mem_total_kib: 1_048_576,
        mem_available_kib: 524_288,
        aes_hw: true,
        arch: "aarch64".into(),
    }
}

fn shard_status() -> ShardStatus {
    ShardStatus {
        shard: shard(),
        capability: "vpn".into(),
        state: ShardState::Backoff,
        cpu_permille: 120,
        rss_kib: 8_192,
        restarts: 2,
        errors: 1,
        last_failure: Some(ShardFailure::Crashed { signal: 11 }),
        lease_expires_at_ms: T0 + 600_000,
        enforcement: Enforcement::CgroupV2,
    }
}

fn counters() -> RejectionCounters {
    RejectionCounters {
        bad_signature: 1,
        unknown_key: 2,
        wrong_device: 3,
        rollback: 4,
        equivocation: 5,
        expired: 6,
        from_future: 7,
        clock_behind_floor: 8,
        malformed: 9,
    }
}

fn report() -> QosReport {
    QosReport {
        device: device(),
        seq: 42,
        window_start_ms: T0,
        window_ms: 10_000,
        classes: vec![
            class_stats(),
            ClassStats {
                class: TrafficClass::Bulk,
                bytes: 90_000_000,
                packets: 60_000,
                rate_bps: 72_000_000,
                rtt_p50_us: None,
                rtt_p95_us: None,
                jitter_us: None,
                loss_permille: 0,
                active_flows: 1,
                need: QosNeed {
                    latency_sensitive: false,
                    bandwidth_heavy: true,
                    needs_encryption: false,
                },
            },
        ],
        resources: resources(),
        shards: vec![shard_status()],
        applied_instruction_seq: 17,
        rejections: counters(),
        lending: Default::default(),
    }
}

fn limits() -> ResourceLimits {
    ResourceLimits {
        cpu_quota_permille: 500,
        cpu_weight: 100,
        memory_max_bytes: 67_108_864,
        nice: -5,
    }
}

fn activation() -> Activation {
    Activation {
        shard: shard(),
        capability: "vpn".into(),
        kind: ShardKind::Data,
        sha256: [0xab; 32],
        config: vec![1, 2, 3],
        limits: limits(),
        priority: 9,
        lease_expires_at_ms: T0 + 600_000,
    }
}

fn instruction() -> Instruction {
    Instruction {
        device: device(),
        seq: 300,
        issued_at_ms: T0,
        expires_at_ms: T0 + 60_000,
        ops: vec![
            Operation::Activate(activation()),
            Operation::Deactivate {
                shard: ShardRef::new("aes", "0.1").unwrap(),
            },
        ],
    }
}

// ------------------------------------------------------------ keys and ids

#[test]
fn golden_key_derivation_from_seed() {
    // Ed25519 public key of a fixed seed, and KeyId = SHA-256(public)[..8].
    let k = key(1);
    assert_eq!(
        hex::encode(k.public_key()),
        "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    );
    let digest = <sha2::Sha256 as sha2::Digest>::digest(k.public_key());
    assert_eq!(k.id().0[..], digest[..8]);
    assert_eq!(k.id().to_string(), "34750f98bd59fcfc");
}

#[test]
fn golden_ids() {
    check("DeviceId", &device(), "01057274722d31");
    check("ShardRef", &shard(), "010374756e03312e32");
    check("KeyId", &key(1).id(), "0134750f98bd59fcfc");
}

// ------------------------------------------------------------ enums, every variant

#[test]
fn golden_traffic_class_every_variant() {
    let golden = [
        "0100", "0101", "0102", "0103", "0104", "0105", "0106", "0107", "0108",
    ];
    for (c, g) in TrafficClass::ALL.iter().zip(golden) {
        check(&format!("TrafficClass::{c:?}"), c, g);
    }
}

#[test]
fn golden_shard_state_every_variant() {
    let cases = [
        (ShardState::Starting, "0100"),
        (ShardState::Running, "0101"),
        (ShardState::Backoff, "0102"),
        (ShardState::Stopped, "0103"),
        (ShardState::Quarantined, "0104"),
        (ShardState::Expired, "0105"),
    ];
    for (v, g) in cases {
        check(&format!("ShardState::{v:?}"), &v, g);
    }
}

#[test]
fn golden_enforcement_every_variant() {
    let cases = [
        (Enforcement::CgroupV2, "0100"),
        (Enforcement::CgroupV1, "0101"),
        (Enforcement::RlimitsOnly, "0102"),
    ];
    for (v, g) in cases {
        check(&format!("Enforcement::{v:?}"), &v, g);
    }
}

#[test]
fn golden_shard_failure_every_variant() {
    let cases = [
        (ShardFailure::Crashed { signal: 11 }, "010016"),
        (ShardFailure::Exited { code: -1 }, "010101"),
        (ShardFailure::Hung, "0102"),
        (ShardFailure::OverLimit, "0103"),
        (
            ShardFailure::LoadRefused {
                reason: "sha256".into(),
            },
            "010406736861323536",
        ),
        (
            ShardFailure::InitFailed {
                reason: "psk".into(),
            },
            "01050370736b",
        ),
    ];
    for (v, g) in cases {
        check(&format!("ShardFailure::{v:?}"), &v, g);
    }
}

#[test]
fn golden_reject_reason_every_variant() {
    let cases = [
        (RejectReason::Malformed, "0100"),
        (RejectReason::BadSignature, "0101"),
        (RejectReason::UnknownKey, "0102"),
        (RejectReason::WrongDevice, "0103"),
        (RejectReason::Rollback, "0104"),
        (RejectReason::Equivocation, "0105"),
        (RejectReason::Expired, "0106"),
        (RejectReason::FromFuture, "0107"),
        (RejectReason::ClockBehindFloor, "0108"),
        // Grown at the end: the bytes above did not move.
        (RejectReason::LimitsOutOfRange, "0109"),
    ];
    for (v, g) in cases {
        check(&format!("RejectReason::{v:?}"), &v, g);
    }
}

#[test]
fn golden_presence_shard_kind_domain_every_variant() {
    check("Presence::Online", &Presence::Online, "0100");
    check("Presence::Offline", &Presence::Offline, "0101");
    check("ShardKind::Compute", &ShardKind::Compute, "0100");
    check("ShardKind::Data", &ShardKind::Data, "0101");
    check("Domain::Instruction", &Domain::Instruction, "0100");
    check("Domain::Report", &Domain::Report, "0101");
    check("Domain::Rotation", &Domain::Rotation, "0102");
    check("Domain::Ack", &Domain::Ack, "0103");
    // Added after the others, at the end: their bytes above are unchanged.
    check("Domain::Enroll", &Domain::Enroll, "0104");
    check("Domain::AppRequest", &Domain::AppRequest, "0105");
    check("Domain::RequestAnswer", &Domain::RequestAnswer, "0106");
    check("Domain::Assignment", &Domain::Assignment, "0107");
}

#[test]
fn golden_domain_tags() {
    // The tags are inside every signature; changing one invalidates them all.
    assert_eq!(Domain::Instruction.tag(), b"shardline/v1/sig/instruction\0");
    assert_eq!(Domain::Report.tag(), b"shardline/v1/sig/report\0");
    assert_eq!(Domain::Rotation.tag(), b"shardline/v1/sig/rotation\0");
    assert_eq!(Domain::Ack.tag(), b"shardline/v1/sig/ack\0");
    assert_eq!(Domain::Enroll.tag(), b"shardline/v1/sig/enroll\0");
    assert_eq!(Domain::AppRequest.tag(), b"shardline/v1/sig/app-request\0");
    assert_eq!(
        Domain::RequestAnswer.tag(),
        b"shardline/v1/sig/request-answer\0"
    );
    assert_eq!(Domain::Assignment.tag(), b"shardline/v1/sig/assignment\0");
}

// ------------------------------------------------------------ reports

#[test]
fn golden_qos_need() {
    check("QosNeed", &class_stats().need, "01010001");
}

#[test]
fn golden_class_stats() {
    check(
        "ClassStats",
        &class_stats(),
        "0101e0c65bb817809f4901d08c0101c8df02000702010001",
    );
}

#[test]
fn golden_device_resources() {
    check(
        "DeviceResources",
        &resources(),
        "0104b602808040808020010761617263683634",
    );
}

#[test]
fn golden_shard_status() {
    check(
        "ShardStatus",
        &shard_status(),
        "010374756e03312e320376706e027880400201010016c0dfb682e73300",
    );
}

#[test]
fn golden_rejection_counters() {
    check("RejectionCounters", &counters(), "01010203040506070809");
}

#[test]
fn golden_qos_report_with_classes_resources_and_shards() {
    check(
        "QosReport",
        &report(),
        concat!(
            "01057274722d312a80909282e733904e0201e0c65bb817809f4901d08c0101c8",
            "df02000702010001048095f52ae0d40380c4aa22000000000100010004b60280",
            "8040808020010761617263683634010374756e03312e320376706e0278804002",
            "01010016c0dfb682e7330011010203040506070809",
            // `lending` (issue 17): no harm, no consent.
            "0000",
        ),
    );
}

/// A report as an agent from before `QosReport::lending` encoded it (the
/// golden bytes above without their last two): it still decodes, with the
/// field empty, and only through `decode_report` (plain `decode` refuses it).
#[test]
fn golden_qos_report_of_an_older_agent_decodes_with_lending_empty() {
    let old = hex::decode(concat!(
        "01057274722d312a80909282e733904e0201e0c65bb817809f4901d08c0101c8",
        "df02000702010001048095f52ae0d40380c4aa22000000000100010004b60280",
        "8040808020010761617263683634010374756e03312e320376706e0278804002",
        "01010016c0dfb682e7330011010203040506070809",
    ))
    .unwrap();
    assert_eq!(
        shardline_shared::msg::decode_report(&old).unwrap(),
        report()
    );
    assert!(decode::<QosReport>(&old).is_err());
    // The new layout goes through `decode_report` too.
    let new = encode(&report());
    assert_eq!(
        shardline_shared::msg::decode_report(&new).unwrap(),
        report()
    );
    // Padding never turns garbage into a report.
    assert!(shardline_shared::msg::decode_report(&old[..old.len() - 3]).is_err());
}

#[test]
fn golden_lending_report_with_harm_and_consent() {
    let lr = shardline_shared::msg::LendingReport {
        harm: vec![shardline_shared::msg::HarmObservation {
            class: TrafficClass::Bulk,
            baseline_loss_permille: 2,
            loss_permille: 40,
            baseline_rtt_p95_us: Some(20_000),
            rtt_p95_us: None,
        }],
        consent: Some(shardline_shared::msg::LendConsent {
            max_compute_units: 1,
            max_data_units: 2,
            from_hour_utc: 22,
            to_hour_utc: 6,
        }),
    };
    check("LendingReport", &lr, "010104022801a09c01000101021606");
}

#[test]
fn empty_lending_report_is_the_legacy_tail() {
    let empty = encode(&shardline_shared::msg::LendingReport::default());
    assert_eq!(&empty[1..], shardline_shared::msg::REPORT_LEGACY_TAIL);
}

// ------------------------------------------------------------ acks and status

#[test]
fn golden_instruction_ack_for_each_outcome() {
    let ack = |outcome| InstructionAck {
        device: device(),
        instruction_seq: 300,
        outcome,
        at_ms: T0 + 5,
    };
    let cases = [
        (AckOutcome::Applied, "01057274722d31ac020085909282e733"),
        (AckOutcome::Duplicate, "01057274722d31ac020185909282e733"),
        (
            AckOutcome::Rejected(RejectReason::Equivocation),
            "01057274722d31ac02020585909282e733",
        ),
        (
            AckOutcome::Failed {
                reason: "load".into(),
            },
            "01057274722d31ac0203046c6f616485909282e733",
        ),
    ];
    for (outcome, g) in cases {
        check(&format!("InstructionAck({outcome:?})"), &ack(outcome), g);
    }
}

#[test]
fn golden_device_status() {
    let status = DeviceStatus {
        device: device(),
        presence: Presence::Online,
        applied_instruction_seq: 300,
        agent_version: "0.1.0".into(),
        at_ms: T0,
    };
    check(
        "DeviceStatus",
        &status,
        "01057274722d3100ac0205302e312e3080909282e733",
    );
}

// ------------------------------------------------------------ instructions

#[test]
fn golden_resource_limits() {
    check("ResourceLimits", &limits(), "01f4036480808020fb");
}

#[test]
fn golden_activation() {
    check(
        "Activation",
        &activation(),
        concat!(
            "010374756e03312e320376706e01abababababababababababababababababab",
            "abababababababababababababab03010203f4036480808020fb09c0dfb682e7",
            "33",
        ),
    );
}

#[test]
fn golden_operations_activate_and_deactivate() {
    check(
        "Operation::Activate",
        &Operation::Activate(activation()),
        concat!(
            "01000374756e03312e320376706e01ababababababababababababababababab",
            "ababababababababababababababab03010203f4036480808020fb09c0dfb682",
            "e733",
        ),
    );
    check(
        "Operation::Deactivate",
        &Operation::Deactivate { shard: shard() },
        "01010374756e03312e32",
    );
}

#[test]
fn golden_instruction_with_activate_and_deactivate() {
    check(
        "Instruction",
        &instruction(),
        concat!(
            "01057274722d31ac0280909282e733e0e49582e73302000374756e03312e3203",
            "76706e01abababababababababababababababababababababababababababab",
            "abababab03010203f4036480808020fb09c0dfb682e733010361657303302e31",
        ),
    );
}

fn shard_activation() -> ShardActivation {
    let variant = |id: &str, byte: u8| ShardVariant {
        shard: ShardRef::new(id, "1.2").unwrap(),
        sha256: [byte; 32],
        config: b"a=1".to_vec(),
        sealed_config: vec![0x5e, 0x11],
        limits: limits(),
        bandwidth_kbps: 40_000,
    };
    ShardActivation {
        primary: variant("aes", 0xab),
        alternatives: vec![variant("chacha", 0xcd)],
        capability: "vpn".into(),
        kind: ShardKind::Compute,
        priority: 70,
        lease_expires_at_ms: T0 + 60_000,
    }
}

#[test]
fn golden_shard_activation_with_an_alternative() {
    check(
        "ShardActivation",
        &shard_activation(),
        concat!(
            "010361657303312e32ababababababababababababababababababababababab",
            "ababababababababab03613d31025e11f4036480808020fbc0b8020106636861",
            "63686103312e32cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
            "cdcdcdcdcdcdcd03613d31025e11f4036480808020fbc0b8020376706e0046e0",
            "e49582e733",
        ),
    );
    check(
        "Operation::ActivateShard",
        &Operation::ActivateShard(shard_activation()),
        concat!(
            "01020361657303312e32abababababababababababababababababababababab",
            "abababababababababab03613d31025e11f4036480808020fbc0b80201066368",
            "6163686103312e32cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
            "cdcdcdcdcdcdcdcd03613d31025e11f4036480808020fbc0b8020376706e0046",
            "e0e49582e733",
        ),
    );
}

#[test]
fn golden_sealed_config_body() {
    check(
        "SealedConfigBody",
        &SealedConfigBody {
            device: device(),
            shard: shard(),
            secret_config: b"psk=00".to_vec(),
        },
        "01057274722d310374756e03312e320670736b3d3030",
    );
}

// ------------------------------------------------------------ keys, rotation, signing

#[test]
fn golden_public_key_entry_and_key_set() {
    check(
        "PublicKeyEntry",
        &key(1).public_entry(),
        concat!(
            "0134750f98bd59fcfc8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d9412",
            "1bf3748801b40f6f5c",
        ),
    );
    check(
        "KeySet",
        &KeySet::of(3, &[&key(1), &key(2)]),
        concat!(
            "01030234750f98bd59fcfc8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d",
            "94121bf3748801b40f6f5c6a3803d5f059902a8139770ea87d175f56a35466c3",
            "4c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
        ),
    );
}

#[test]
fn golden_key_rotation() {
    let r = KeyRotation {
        new_set: KeySet::of(2, &[&key(2)]),
        issued_at_ms: T0,
    };
    check(
        "KeyRotation",
        &r,
        concat!(
            "0102016a3803d5f059902a8139770ea87d175f56a35466c34c7ecccb8d8a91b4",
            "ee37a25df60f5b8fc9b39480909282e733",
        ),
    );
}

#[test]
fn golden_signature_entry() {
    // Ed25519 is deterministic: same key, same message, same signature.
    let payload = encode(&instruction());
    let entry: SignatureEntry = key(1).sign_entry(Domain::Instruction, &payload);
    check(
        "SignatureEntry",
        &entry,
        concat!(
            "0134750f98bd59fcfc40eec746df11c1938527b15a532045ceb074413d6c693b",
            "c9b8faf890fb92fe189fffc6a94657eba3d764f8163e09a3af1bd2cae81913d7",
            "f077c5703a3b80eafc0b",
        ),
    );
}

#[test]
fn golden_signed_envelope_of_an_instruction() {
    let bytes = sign::seal(Domain::Instruction, &instruction(), &[&key(1)]);
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope",
        &env,
        concat!(
            "01006001057274722d31ac0280909282e733e0e49582e73302000374756e0331",
            "2e320376706e01ababababababababababababababababababababababababab",
            "ababababababab03010203f4036480808020fb09c0dfb682e733010361657303",
            "302e310134750f98bd59fcfc40eec746df11c1938527b15a532045ceb074413d",
            "6c693bc9b8faf890fb92fe189fffc6a94657eba3d764f8163e09a3af1bd2cae8",
            "1913d7f077c5703a3b80eafc0b",
        ),
    );
    assert_eq!(env.payload, encode(&instruction()));
    assert_eq!(encode(&env), bytes);
    // The pinned bytes still verify and open as the same instruction: a
    // change of tag, signed-bytes layout or key-id derivation breaks this.
    let (opened, signers) = sign::open::<Instruction>(
        &bytes,
        Domain::Instruction,
        shardline_shared::codec::MAX_PAYLOAD,
        |id| KeySet::of(1, &[&key(1)]).public_key(id),
    )
    .unwrap();
    assert_eq!((opened, signers), (instruction(), vec![key(1).id()]));
}

#[test]
fn golden_signed_envelope_of_a_rotation_with_two_signatures() {
    let r = KeyRotation {
        new_set: KeySet::of(2, &[&key(2)]),
        issued_at_ms: T0,
    };
    let bytes = sign::seal(Domain::Rotation, &r, &[&key(1), &key(2)]);
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope(rotation)",
        &env,
        concat!(
            "0102310102016a3803d5f059902a8139770ea87d175f56a35466c34c7ecccb8d",
            "8a91b4ee37a25df60f5b8fc9b39480909282e7330234750f98bd59fcfc40591c",
            "f2cf3b2e667962f663bececcfdc4f6bc1f9ab7eb9cc9008a6221cc8e1adb95c4",
            "d48eb3ca53e9190bce662c7e2714768110aaa7fe338d431ff3873f8727006a38",
            "03d5f059902a40f01cdc73e63bef551c1d32a3b03a2eec56baec6109b2492b72",
            "53610b5747c393b9b34d5983c5e0b15d250f2b3deb62620705a48554047f1d58",
            "7bdf069be85008",
        ),
    );
}

/// An instruction envelope carrying `n` signatures (by keys 1..=n), built by
/// hand: `seal` would make it too, but receivers must refuse it.
fn envelope_with_signatures(n: u8) -> Vec<u8> {
    let payload = encode(&instruction());
    encode(&SignedEnvelope {
        domain: Domain::Instruction,
        signatures: (1..=n)
            .map(|i| key(i).sign_entry(Domain::Instruction, &payload))
            .collect(),
        payload,
    })
}

#[test]
fn golden_signature_count_cap_four_decode_five_refused() {
    assert_eq!(sign::MAX_SIGNATURES, 4);
    // The count is the varint right before the first entry: the wire layout
    // is unchanged by the cap, only what a decoder accepts.
    let four = envelope_with_signatures(4);
    let payload_len = encode(&instruction()).len();
    let count_at = 1 + 1 + 1 + payload_len; // version, domain, len varint, payload
    assert!(
        payload_len < 128,
        "the payload length takes one varint byte"
    );
    assert_eq!(four[count_at], 4);
    let env = sign::parse_envelope(&four, shardline_shared::codec::MAX_PAYLOAD).unwrap();
    assert_eq!(env.signatures.len(), 4);
    let back: SignedEnvelope = decode(&four).unwrap();
    assert_eq!(back, env);

    let five = envelope_with_signatures(5);
    assert_eq!(five[count_at], 5);
    assert_eq!(
        sign::parse_envelope(&five, shardline_shared::codec::MAX_PAYLOAD),
        Err(sign::OpenError::Envelope(DecodeError::TooManySignatures {
            count: 5,
            max: 4
        }))
    );
    assert_eq!(
        sign::parse_envelope(&five, shardline_shared::codec::MAX_PAYLOAD)
            .unwrap_err()
            .to_string(),
        "envelope: 5 signatures on one envelope; at most 4 are accepted"
    );
    // Any other decoder of the type refuses it too.
    assert!(decode::<SignedEnvelope>(&five).is_err());
    // A length prefix claiming a huge count over a short body is an error,
    // not an allocation of that many entries.
    let mut lying = four[..count_at].to_vec();
    lying.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(sign::parse_envelope(&lying, shardline_shared::codec::MAX_PAYLOAD).is_err());
}

#[test]
fn an_in_memory_envelope_over_the_cap_does_not_open() {
    let five = envelope_with_signatures(5);
    let payload = encode(&instruction());
    let env = SignedEnvelope {
        domain: Domain::Instruction,
        signatures: (1..=5u8)
            .map(|i| key(i).sign_entry(Domain::Instruction, &payload))
            .collect(),
        payload,
    };
    assert_eq!(encode(&env), five);
    let all = KeySet::of(1, &[&key(1), &key(2), &key(3), &key(4), &key(5)]);
    assert_eq!(
        sign::open_envelope::<Instruction>(&env, Domain::Instruction, |id| all.public_key(id)),
        Err(sign::OpenError::Envelope(DecodeError::TooManySignatures {
            count: 5,
            max: 4
        }))
    );
}

fn enroll_request() -> EnrollRequest {
    EnrollRequest {
        device: device(),
        public_key: key(3).public_key(),
        token: "0123456789abcdef".into(),
    }
}

#[test]
fn golden_enroll_request() {
    // device "rtr-1", key(3)'s public key, a 16-byte token.
    check(
        "EnrollRequest",
        &enroll_request(),
        concat!(
            "01057274722d31ed4928c628d1c2c6eae90338905995612959273a5c63f93636",
            "c14614ac8737d11030313233343536373839616263646566",
        ),
    );
}

#[test]
fn golden_signed_envelope_of_an_enroll_request() {
    let bytes = sign::seal_enroll(&enroll_request(), &key(3));
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope(enroll)",
        &env,
        concat!(
            "01043801057274722d31ed4928c628d1c2c6eae90338905995612959273a5c63",
            "f93636c14614ac8737d1103031323334353637383961626364656601b62e867f",
            "a2f33afe404f49254a047f123541c4e3c2028d4dd785e7a9de5502953748b8aa",
            "3bc1d5b13ed7492d2e255af0ff2ae7725f2ab09c80d30e7d1151e1572a2c2dd7",
            "88530a0907",
        ),
    );
    assert_eq!(env.domain, Domain::Enroll);
    assert_eq!(encode(&env), bytes);
    // The pinned bytes still open: signed by the key the request names.
    assert_eq!(sign::open_enroll(&bytes), Ok(enroll_request()));
}

// ------------------------------------------------------------ explicit requests

fn app_request(op: RequestOp) -> AppRequest {
    AppRequest {
        device: device(),
        seq: 300,
        app: AppName::new("cam").unwrap(),
        instance: AppName::new("w1").unwrap(),
        at_ms: T0,
        op,
    }
}

#[test]
fn golden_app_request_every_op() {
    check(
        "AppRequest(Acquire)",
        &app_request(RequestOp::Acquire {
            kind: ShardKind::Data,
            units: 2,
            duration_ms: 30_000,
            priority: 5,
        }),
        "01057274722d31ac020363616d02773180909282e733000102b0ea0105",
    );
    check(
        "AppRequest(Renew)",
        &app_request(RequestOp::Renew {
            grant: 9,
            duration_ms: 10_000,
        }),
        "01057274722d31ac020363616d02773180909282e7330109904e",
    );
    check(
        "AppRequest(Release)",
        &app_request(RequestOp::Release {
            grant: 9,
            outcome: GrantOutcome::OverLimit,
        }),
        "01057274722d31ac020363616d02773180909282e733020903",
    );
    check(
        "AppRequest(Query)",
        &app_request(RequestOp::Query),
        "01057274722d31ac020363616d02773180909282e73303",
    );
}

#[test]
fn golden_grant_outcome_every_variant() {
    check("GrantOutcome::Completed", &GrantOutcome::Completed, "0100");
    check("GrantOutcome::Unused", &GrantOutcome::Unused, "0101");
    check("GrantOutcome::Errored", &GrantOutcome::Errored, "0102");
    check("GrantOutcome::OverLimit", &GrantOutcome::OverLimit, "0103");
}

fn answer(answer: Answer) -> RequestAnswer {
    RequestAnswer {
        device: device(),
        app: AppName::new("cam").unwrap(),
        instance: AppName::new("w1").unwrap(),
        request_seq: 300,
        issued_at_ms: T0,
        answer,
    }
}

fn grant() -> Grant {
    Grant {
        grant: 9,
        kind: ShardKind::Compute,
        units: 2,
        expires_at_ms: T0 + 30_000,
    }
}

#[test]
fn golden_request_answer_every_variant() {
    check(
        "Answer::Granted",
        &answer(Answer::Granted(grant())),
        "01057274722d310363616d027731ac0280909282e73300090002b0fa9382e733",
    );
    check(
        "Answer::Queued",
        &answer(Answer::Queued {
            ticket: 10,
            position: 1,
            expected_wait_ms: 4_000,
        }),
        "01057274722d310363616d027731ac0280909282e733010a01a01f",
    );
    check(
        "Answer::Released",
        &answer(Answer::Released { grant: 9, units: 2 }),
        "01057274722d310363616d027731ac0280909282e733030902",
    );
    check(
        "Answer::Standing",
        &answer(Answer::Standing(InstanceStanding {
            reputation_tenths: 625,
            device_reputation_tenths: 500,
            compute_quota_units: 3,
            data_quota_units: 1,
            compute_in_use: 2,
            data_in_use: 0,
            queued: 1,
        })),
        "01057274722d310363616d027731ac0280909282e73304f104f4030301020001",
    );
    check(
        "Answer::Renewed",
        &answer(Answer::Renewed(grant())),
        "01057274722d310363616d027731ac0280909282e73305090002b0fa9382e733",
    );
}

#[test]
fn golden_request_refusal_every_variant() {
    let cases = [
        (
            RequestRefusal::InsufficientQuota {
                kind: ShardKind::Compute,
                asked: 4,
                quota: 3,
                in_use: 1,
            },
            "010000040301",
        ),
        (
            RequestRefusal::KindNotAllowed {
                kind: ShardKind::Data,
            },
            "010101",
        ),
        (RequestRefusal::QueueFull { limit: 64 }, "010240"),
        (
            RequestRefusal::RateLimited {
                retry_after_ms: 500,
            },
            "0103f403",
        ),
        (RequestRefusal::UnknownGrant { grant: 9 }, "010409"),
        (
            RequestRefusal::OutOfRange {
                max_units: 64,
                max_duration_ms: 600_000,
            },
            "010540c0cf24",
        ),
        (RequestRefusal::Drained, "0106"),
        (RequestRefusal::QueueTimeout, "0107"),
    ];
    for (refusal, golden) in cases {
        check(&format!("{refusal:?}"), &refusal, golden);
    }
}

#[test]
fn golden_signed_envelope_of_a_request_and_an_answer() {
    let req = app_request(RequestOp::Query);
    let bytes = request::seal_request(&req, &key(3));
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope(request)",
        &env,
        concat!(
            "01051701057274722d31ac020363616d02773180909282e7330301b62e867fa2",
            "f33afe40f53f2897cdc4716cfecfccebb4cbe8458176732cc2db925c7ae3557a",
            "4efd122235857811c6bcbdbdc7cdb090eeae81d0034f4eab6280de1fd4091a10",
            "8d2f3a0d",
        ),
    );
    assert_eq!(env.domain, Domain::AppRequest);
    assert_eq!(
        request::open_request(&bytes, &device(), &key(3).public_key()),
        Ok(req)
    );
    let ans = answer(Answer::Granted(grant()));
    let bytes = request::seal_answer(&ans, &[&key(1)]);
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope(answer)",
        &env,
        concat!(
            "01062001057274722d310363616d027731ac0280909282e73300090002b0fa93",
            "82e7330134750f98bd59fcfc404acc34ed0cdf9e4c36341f2fac50f7107ae123",
            "2978758b9905a152d84c0a82bf73ded60130c9fc63c32febf22a6969633519ea",
            "70f0c5822c5e668502a91f6704",
        ),
    );
    assert_eq!(env.domain, Domain::RequestAnswer);
    let k1 = key(1);
    let lookup = |id| (id == k1.id()).then_some(k1.public_key());
    assert_eq!(request::open_answer(&bytes, lookup), Ok(ans));
}

// ------------------------------------------------------------ persisted state

#[test]
fn golden_acceptance_state() {
    // Not sent on the network but written to disk by the agent; a format change
    // would make an upgraded agent forget its sequence floor.
    let state = AcceptanceState {
        keys: KeySet::of(2, &[&key(2)]),
        last_applied_seq: 300,
        last_applied_digest: Some([0x11; 32]),
        time_floor_ms: T0,
    };
    check(
        "AcceptanceState",
        &state,
        concat!(
            "0102016a3803d5f059902a8139770ea87d175f56a35466c34c7ecccb8d8a91b4",
            "ee37a25df60f5b8fc9b394ac0201111111111111111111111111111111111111",
            "111111111111111111111111111180909282e733",
        ),
    );
}

// ------------------------------------------------------------ assignments (seed 001)

fn assignment() -> Assignment {
    Assignment {
        group: GroupId::new("acme.eu-west.vpn").unwrap(),
        version: 3,
        issued_at_ms: T0,
        expires_at_ms: T0 + 900_000,
        region: Region::new("eu-west").unwrap(),
        server: ServerId::new("alloc-2").unwrap(),
        endpoints: vec![
            "mqtts://b1.eu.example:8883".into(),
            "mqtt://[::1]:1883".into(),
        ],
    }
}

// ------------------------------------------------- remote diagnostics

fn diagnostics() -> shardline_shared::diag::Diagnostics {
    use shardline_shared::diag::{DiagShard, DiagStatus, Diagnostics};
    Diagnostics {
        device: device(),
        request_seq: 7,
        at_ms: T0,
        status: DiagStatus {
            agent_version: "0.1.0".into(),
            uptime_s: 3600,
            arch: "x86_64".into(),
            shards: vec![DiagShard {
                shard: shard(),
                capability: "vpn".into(),
                state: ShardState::Running,
                restarts: 1,
                last_failure: Some("crashed".into()),
            }],
            capture_source: "ring".into(),
            broker_connected: true,
            last_errors: vec!["e".into()],
        },
        log_lines: vec!["a".into(), "bc".into()],
        truncated: true,
    }
}

#[test]
fn golden_assignment_ids() {
    check(
        "GroupId",
        &GroupId::new("acme.eu-west.vpn").unwrap(),
        "011061636d652e65752d776573742e76706e",
    );
    check(
        "Region",
        &Region::new("eu-west").unwrap(),
        "010765752d77657374",
    );
    check(
        "ServerId",
        &ServerId::new("alloc-2").unwrap(),
        "0107616c6c6f632d32",
    );
}

#[test]
fn golden_assignment() {
    check(
        "Assignment",
        &assignment(),
        concat!(
            "011061636d652e65752d776573742e76706e0380909282e733a087c982e73307",
            "65752d7765737407616c6c6f632d32021a6d717474733a2f2f62312e65752e65",
            "78616d706c653a38383833116d7174743a2f2f5b3a3a315d3a31383833",
        ),
    );
}

#[test]
fn golden_signed_envelope_of_an_assignment() {
    let bytes = assign::seal_assignment(&assignment(), &[&key(1)]);
    let env: SignedEnvelope = decode(&bytes).unwrap();
    check(
        "SignedEnvelope(assignment)",
        &env,
        concat!(
            "01075d011061636d652e65752d776573742e76706e0380909282e733a087c982",
            "e7330765752d7765737407616c6c6f632d32021a6d717474733a2f2f62312e65",
            "752e6578616d706c653a38383833116d7174743a2f2f5b3a3a315d3a31383833",
            "0134750f98bd59fcfc40d482bf7f4421795cfe8d812114df3a100ba7343daca2",
            "44db8f5fd6c9e0119fb234f3fa1e8da359c288e6446c70a0bbb1638afa189ff3",
            "ccb8502aa1436cec0008",
        ),
    );
    assert_eq!(env.domain, Domain::Assignment);
    assert_eq!(env.payload, encode(&assignment()));
    let k1 = key(1);
    let lookup = |id| (id == k1.id()).then_some(k1.public_key());
    assert_eq!(assign::open_assignment(&bytes, lookup), Ok(assignment()));
}

#[test]
fn golden_assignment_state() {
    // Persisted by the agent (not wired yet): a format change would make an
    // upgraded agent forget its version floor.
    let state = AssignmentState {
        group: GroupId::new("acme.eu-west.vpn").unwrap(),
        current: Some(HeldAssignment {
            assignment: assignment(),
            digest: [0x22; 32],
        }),
    };
    check(
        "AssignmentState",
        &state,
        concat!(
            "011061636d652e65752d776573742e76706e011061636d652e65752d77657374",
            "2e76706e0380909282e733a087c982e7330765752d7765737407616c6c6f632d",
            "32021a6d717474733a2f2f62312e65752e6578616d706c653a38383833116d71",
            "74743a2f2f5b3a3a315d3a313838332222222222222222222222222222222222",
            "222222222222222222222222222222",
        ),
    );
    check(
        "AssignmentState(bootstrap)",
        &AssignmentState::bootstrap(GroupId::new("acme.eu-west.vpn").unwrap()),
        "011061636d652e65752d776573742e76706e00",
    );
}

#[test]
fn golden_diagnostics_request_and_answer() {
    // Added at the end of `Operation` and `Domain`: the bytes of the
    // variants before them (above) are unchanged.
    check(
        "Operation::RequestDiagnostics",
        &Operation::RequestDiagnostics { max_lines: 200 },
        "0103c801",
    );
    check("Domain::Diagnostics", &Domain::Diagnostics, "0108");
    assert_eq!(Domain::Diagnostics.tag(), b"shardline/v1/sig/diagnostics\0");
    check("Diagnostics", &diagnostics(), "01057274722d310780909282e73305302e312e30901c067838365f3634010374756e03312e320376706e01010107637261736865640472696e670101016502016102626301");
    // Sealed with the device key (deterministic Ed25519), opened back.
    let sealed = diagnostics().seal(&key(3));
    assert_eq!(hex::encode(&sealed), "01084501057274722d310780909282e73305302e312e30901c067838365f3634010374756e03312e320376706e01010107637261736865640472696e67010101650201610262630101b62e867fa2f33afe401376b78a591d6589bdb07b27bb81c40770f9d0fcd215a679b54dbb10fa99a6a969f160549ccc892363aba51c11608d759f5b947e22cd07689a96b9cf4533d50c");
    let opened = shardline_shared::diag::open(&sealed, &key(3).public_key()).unwrap();
    assert_eq!(opened, diagnostics());
}
