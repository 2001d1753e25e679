//! A service core with a simulated fleet enrolled, configured as
//! `service_e2e` configures the service, and the devices' side of its
//! instructions: what the `service_core` bench and the `service_delays`
//! test share (each includes this file).

use shardline_allocator_core::policy::bench_load::bench_catalog;
use shardline_allocator_core::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
use shardline_allocator_core::policy::{Agreements, Catalog, Engine, PolicyConfig};
use shardline_allocator_core::service::counters::Metrics;
use shardline_allocator_core::service::{
    Command, Core, CoreConfig, Loaded, Publish, Reply, VerifiedMsg,
};
use shardline_shared::codec;
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{AckOutcome, Instruction, InstructionAck};
use shardline_shared::sign::{self, KeyPair};
use std::sync::Arc;

/// The shipped (example) catalog and tiers, as the benches configure them.
fn engine() -> Engine {
    let text = bench_catalog(EXAMPLE_CATALOG).expect("update the bench load to the catalog");
    let catalog = Catalog::from_toml_str(&text, "catalog.toml").expect("catalog");
    let tiers = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).expect("tiers");
    Engine::new(catalog, tiers, PolicyConfig::default())
}

/// A core at `now_ms` with `devices` devices named `{prefix}-{n:06}`
/// enrolled (standard tier, each with a key of its own: the service
/// refuses a key already enrolled), its first step taken.
pub fn enrolled_core(prefix: &str, devices: usize, now_ms: u64) -> (Core, Vec<DeviceId>) {
    let mut core = Core::new(
        engine(),
        KeyPair::from_seed(&[1; 32]),
        Loaded::default(),
        CoreConfig {
            max_payload: 65536,
            resend_after_ms: 10_000,
            checkpoint_ms: 60_000,
            engine_flush_ms: 5_000,
            shared_store: false,
            qos_history_window_ms: 60_000,
        },
        Arc::new(Metrics::default()),
        now_ms,
    );
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::new(format!("{prefix}-{i:06}")).expect("id"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let mut seed = [7u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let reply = core.on_command(
            now_ms,
            Command::Enroll {
                device: id.clone(),
                public_key: KeyPair::from_seed(&seed).public_key(),
                tier: "standard".into(),
                tenant: None,
            },
        );
        assert!(matches!(reply, Reply::Enrolled(_)), "{reply:?}");
    }
    core.take_step();
    (core, ids)
}

/// The instruction a publish of the core carries (`None`: not an instruction).
pub fn instruction_in(p: &Publish) -> Option<Instruction> {
    if !p.topic.ends_with("/instr") {
        return None;
    }
    let env = sign::parse_envelope(&p.payload, 1 << 20).expect("envelope");
    Some(codec::decode::<Instruction>(&env.payload).expect("instruction"))
}

/// The device's (verified) ack that it applied `instruction`, sent at `at_ms`.
pub fn applied_ack(instruction: &Instruction, at_ms: u64) -> VerifiedMsg {
    VerifiedMsg::Ack(
        instruction.device.clone(),
        InstructionAck {
            device: instruction.device.clone(),
            instruction_seq: instruction.seq,
            outcome: AckOutcome::Applied,
            at_ms,
        },
    )
}
