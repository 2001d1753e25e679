//! Writes a small seed corpus for the fuzz targets into `fuzz/corpus/<target>/`
//! (gitignored): validly signed instructions and rotations, near misses of
//! each acceptance rule, and one encoding of every wire type. Starting from
//! valid messages lets libFuzzer reach the code behind signature checks
//! instead of spending its time on framing errors.
//!
//! Run from `fuzz/`: `cargo run --example seed_corpus` (stable toolchain).

use shardline_shared::assign::{self, Assignment, GroupId, Region, ServerId};
use shardline_shared::codec;
use shardline_shared::msg::{
    AckOutcome, Activation, ClassStats, DeviceResources, DeviceStatus, Instruction, InstructionAck,
    KeyRotation, KeySet, Operation, Presence, QosNeed, QosReport, RejectionCounters,
    ResourceLimits, ShardKind, TrafficClass,
};
use shardline_shared::request::{self, Answer, AppRequest, Grant, RequestAnswer, RequestOp};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::{AppName, DeviceId, ShardRef};
use std::path::{Path, PathBuf};

/// Must match the targets' clock.
const NOW: u64 = 1_780_000_000_000;

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn instr(seq: u64, device: &str) -> Instruction {
    Instruction {
        device: DeviceId::new(device).expect("valid"),
        seq,
        issued_at_ms: NOW - 1_000,
        expires_at_ms: NOW + 60_000,
        ops: vec![
            Operation::Activate(Activation {
                shard: ShardRef::new("tunnel", "1.0").expect("valid"),
                capability: "vpn".into(),
                kind: ShardKind::Data,
                sha256: [9; 32],
                config: b"psk".to_vec(),
                limits: ResourceLimits {
                    cpu_quota_permille: 300,
                    cpu_weight: 100,
                    memory_max_bytes: 1 << 26,
                    nice: 5,
                },
                priority: 2,
                lease_expires_at_ms: NOW + 600_000,
            }),
            Operation::Deactivate {
                shard: ShardRef::new("aes", "1.0").expect("valid"),
            },
        ],
    }
}

fn report() -> QosReport {
    QosReport {
        device: DeviceId::new("router-1").expect("valid"),
        seq: 1,
        window_start_ms: NOW,
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Calls,
            bytes: 1,
            packets: 1,
            rate_bps: 1,
            rtt_p50_us: Some(1),
            rtt_p95_us: None,
            jitter_us: Some(2),
            loss_permille: 0,
            active_flows: 1,
            need: QosNeed::default(),
        }],
        resources: DeviceResources {
            cpu_cores: 2,
            cpu_load_permille: 5,
            mem_total_kib: 1,
            mem_available_kib: 1,
            aes_hw: false,
            arch: "arm".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let env_dir = root.join("envelope_decode_verify");
    let wire_dir = root.join("wire_decode");
    let signed_dir = root.join("signed_instruction_accept");
    for d in [&env_dir, &wire_dir, &signed_dir] {
        std::fs::create_dir_all(d).expect("create corpus dir");
    }
    let (k1, k2, k9) = (key(1), key(2), key(9));
    let rot = |epoch, signers: &[&KeyPair]| {
        let r = KeyRotation {
            new_set: KeySet::of(epoch, &[&k2]),
            issued_at_ms: NOW,
        };
        sign::seal(Domain::Rotation, &r, signers)
    };
    let mut expired = instr(11, "router-1");
    expired.expires_at_ms = NOW - 1;

    let envelopes: [(&str, Vec<u8>); 9] = [
        (
            "valid",
            sign::seal(Domain::Instruction, &instr(11, "router-1"), &[&k1]),
        ),
        (
            "rollback",
            sign::seal(Domain::Instruction, &instr(3, "router-1"), &[&k1]),
        ),
        (
            "wrong-device",
            sign::seal(Domain::Instruction, &instr(11, "router-2"), &[&k1]),
        ),
        ("expired", sign::seal(Domain::Instruction, &expired, &[&k1])),
        (
            "unknown-key",
            sign::seal(Domain::Instruction, &instr(11, "router-1"), &[&k9]),
        ),
        ("report", sign::seal(Domain::Report, &report(), &[&k1])),
        ("rotation", rot(2, &[&k1, &k2])),
        ("rotation-old-only", rot(2, &[&k1])),
        ("rotation-skip", rot(3, &[&k1, &k2])),
    ];
    for (name, bytes) in &envelopes {
        write(&env_dir, name, bytes);
        write(&wire_dir, &format!("envelope-{name}"), bytes);
    }

    let ack = InstructionAck {
        device: DeviceId::new("router-1").expect("valid"),
        instruction_seq: 11,
        outcome: AckOutcome::Failed { reason: "x".into() },
        at_ms: NOW,
    };
    let status = DeviceStatus {
        device: DeviceId::new("router-1").expect("valid"),
        presence: Presence::Online,
        applied_instruction_seq: 11,
        agent_version: "0.1.0".into(),
        at_ms: NOW,
    };
    write(&wire_dir, "report", &codec::encode(&report()));
    write(&wire_dir, "ack", &codec::encode(&ack));
    write(&wire_dir, "status", &codec::encode(&status));
    write(
        &wire_dir,
        "instruction",
        &codec::encode(&instr(11, "router-1")),
    );
    write(
        &wire_dir,
        "keyset",
        &codec::encode(&KeySet::of(1, &[&k1, &k2])),
    );
    // Seed 001's assignment object: plain, sealed by the key the target
    // pins (1) and by an unknown key.
    let assignment = Assignment {
        group: GroupId::new("acme.eu-west.vpn").expect("valid"),
        version: 2,
        issued_at_ms: NOW - 1_000,
        expires_at_ms: NOW + 900_000,
        region: Region::new("eu-west").expect("valid"),
        server: ServerId::new("alloc-1").expect("valid"),
        endpoints: vec!["mqtts://b1.example:8883".into(), "mqtt://[::1]:1883".into()],
    };
    write(&wire_dir, "assignment", &codec::encode(&assignment));
    write(
        &wire_dir,
        "assignment-sealed",
        &assign::seal_assignment(&assignment, &[&k1]),
    );
    write(
        &wire_dir,
        "assignment-unknown-key",
        &assign::seal_assignment(&assignment, &[&k9]),
    );

    // signed_instruction_accept: 8-byte clock offset, then the payload.
    for (name, offset, i) in [
        ("valid", 0i64, instr(11, "router-1")),
        ("late", 120_000, instr(11, "router-1")),
        ("behind-floor", -100_000_000, instr(11, "router-1")),
        ("rollback", 0, instr(3, "router-1")),
    ] {
        let mut bytes = offset.to_le_bytes().to_vec();
        bytes.extend(codec::encode(&i));
        write(&signed_dir, name, &bytes);
    }

    // request_open: a request signed by the device key (3) and an answer
    // signed by the pinned allocator key (1), each also under the wrong key.
    let req_dir = root.join("request_open");
    std::fs::create_dir_all(&req_dir).expect("create corpus dir");
    let k3 = key(3);
    let req = AppRequest {
        device: DeviceId::new("router-1").expect("valid"),
        seq: 4,
        app: AppName::new("cam").expect("valid"),
        instance: AppName::new("w1").expect("valid"),
        at_ms: NOW,
        op: RequestOp::Acquire {
            kind: ShardKind::Compute,
            units: 2,
            duration_ms: 30_000,
            priority: 1,
        },
    };
    let answer = RequestAnswer {
        device: req.device.clone(),
        app: req.app.clone(),
        instance: req.instance.clone(),
        request_seq: 4,
        issued_at_ms: NOW,
        answer: Answer::Granted(Grant {
            grant: 1,
            kind: ShardKind::Compute,
            units: 2,
            expires_at_ms: NOW + 30_000,
        }),
    };
    write(&req_dir, "request", &request::seal_request(&req, &k3));
    write(
        &req_dir,
        "request-wrong-key",
        &request::seal_request(&req, &k9),
    );
    write(&req_dir, "answer", &request::seal_answer(&answer, &[&k1]));
    write(
        &req_dir,
        "answer-wrong-key",
        &request::seal_answer(&answer, &[&k9]),
    );
    write(&wire_dir, "app-request", &codec::encode(&req));
    write(&wire_dir, "request-answer", &codec::encode(&answer));
    println!("seed corpus written under {}", root.display());
}
