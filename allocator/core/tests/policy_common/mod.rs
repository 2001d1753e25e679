//! Helpers shared by the policy engine tests: the shipped catalog, custom
//! tiers, report builders and action filters.
#![allow(dead_code)]

use shardline_allocator_core::policy::{Action, Agreements, Catalog, Engine, Event, PolicyConfig};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{
    ClassStats, DeviceResources, Enforcement, Operation, QosNeed, QosReport, RejectionCounters,
    ShardFailure, ShardState, ShardStatus, TrafficClass,
};

pub const CATALOG: &str = include_str!("../../../catalog/catalog.toml");
pub const TIERS: &str = include_str!("../../../catalog/tiers.toml");

/// Tiers for tests: `tight` cannot hold vpn + qos (data 3 < 4) but may
/// borrow; `noborrow` is the same without borrowing; `basic` has no vpn.
pub const TEST_TIERS: &str = r#"
[[tier]]
name = "tight"
capabilities = ["vpn", "qos"]
compute_units = 3
data_units = 3
max_priority = 80
lease_cap_s = 3600
borrowing = true

[[tier]]
name = "noborrow"
capabilities = ["vpn", "qos"]
compute_units = 3
data_units = 3
max_priority = 80
lease_cap_s = 3600
borrowing = false

[[tier]]
name = "roomy"
capabilities = ["vpn", "qos"]
compute_units = 4
data_units = 6
max_priority = 100
lease_cap_s = 7200
borrowing = true

[[tier]]
name = "four"
capabilities = ["vpn", "qos"]
compute_units = 3
data_units = 4
max_priority = 80
lease_cap_s = 3600
borrowing = false

[[tier]]
name = "basic"
capabilities = ["qos"]
compute_units = 1
data_units = 2
max_priority = 60
lease_cap_s = 1800
borrowing = false
"#;

pub const MIN: u64 = 60_000;
pub const HOUR: u64 = 3_600_000;

pub fn catalog() -> Catalog {
    Catalog::from_toml_str(CATALOG, "catalog.toml").expect("shipped catalog loads")
}

pub fn engine_with(config: PolicyConfig) -> Engine {
    let c = catalog();
    let a = Agreements::from_toml_str(TEST_TIERS, "tiers.toml", &c).expect("test tiers load");
    Engine::new(c, a, config)
}

pub fn engine() -> Engine {
    engine_with(PolicyConfig::default())
}

pub fn dev(name: &str) -> DeviceId {
    DeviceId::new(name).expect("valid id")
}

pub fn enc() -> QosNeed {
    QosNeed {
        needs_encryption: true,
        ..QosNeed::default()
    }
}

pub fn lat() -> QosNeed {
    QosNeed {
        latency_sensitive: true,
        ..QosNeed::default()
    }
}

pub fn class(class: TrafficClass, rate_bps: u64, need: QosNeed) -> ClassStats {
    ClassStats {
        class,
        bytes: rate_bps / 8 * 60,
        packets: rate_bps / 8 * 60 / 800 + 1,
        rate_bps,
        rtt_p50_us: Some(20_000),
        rtt_p95_us: Some(40_000),
        jitter_us: Some(1_000),
        loss_permille: 2,
        active_flows: 2,
        need,
    }
}

pub fn resources(aes_hw: bool) -> DeviceResources {
    DeviceResources {
        cpu_cores: 4,
        cpu_load_permille: 200,
        mem_total_kib: 1 << 20,
        mem_available_kib: 512 * 1024,
        aes_hw,
        arch: "x86_64".to_owned(),
    }
}

/// A healthy status for every shard the engine believes the device runs.
pub fn healthy_statuses(engine: &Engine, device: &DeviceId) -> Vec<ShardStatus> {
    engine
        .device(device)
        .map(|v| {
            v.leases
                .iter()
                .map(|l| ShardStatus {
                    shard: l.shard.clone(),
                    capability: l.capability.clone(),
                    state: ShardState::Running,
                    cpu_permille: l.limits.cpu_quota_permille / 2,
                    rss_kib: l.limits.memory_max_bytes / 2048,
                    restarts: l.restarts_seen,
                    errors: l.errors_seen,
                    last_failure: None,
                    lease_expires_at_ms: l.expires_at_ms,
                    enforcement: Enforcement::CgroupV2,
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn crashed(mut s: Vec<ShardStatus>) -> Vec<ShardStatus> {
    for x in &mut s {
        x.restarts += 1;
        x.last_failure = Some(ShardFailure::Crashed { signal: 11 });
    }
    s
}

pub fn report(
    device: &DeviceId,
    seq: u64,
    classes: Vec<ClassStats>,
    shards: Vec<ShardStatus>,
    aes_hw: bool,
) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: 0,
        window_ms: 60_000,
        classes,
        resources: resources(aes_hw),
        shards,
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

/// Sends a report whose shard statuses are the engine's current profile (healthy).
pub fn send(
    engine: &mut Engine,
    now: u64,
    device: &DeviceId,
    seq: u64,
    classes: Vec<ClassStats>,
) -> Vec<Action> {
    let shards = healthy_statuses(engine, device);
    engine.handle(
        now,
        Event::Report(report(device, seq, classes, shards, true)),
    )
}

pub fn enroll(engine: &mut Engine, now: u64, device: &DeviceId, tier: &str, tenant: Option<&str>) {
    let out = engine.handle(
        now,
        Event::Enrolled {
            device: device.clone(),
            tier: tier.to_owned(),
            tenant: tenant.map(str::to_owned),
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Alert { .. })),
        "enrolment alerted: {out:?}"
    );
    configure(engine, now, device);
}

/// Gives the device every per-device key the catalog requires (the vpn
/// tunnel's ends, the pair's key name), as an operator would.
pub fn configure(engine: &mut Engine, now: u64, device: &DeviceId) {
    let config =
        shardline_allocator_core::policy::simulate::placeholder_device_config(engine.catalog());
    engine.handle(
        now,
        Event::DeviceConfig {
            device: device.clone(),
            config,
            changed: Default::default(),
        },
    );
}

/// All operations instructed to `device`.
pub fn ops_for(actions: &[Action], device: &DeviceId) -> Vec<Operation> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Instruct { device: d, ops, .. } if d == device => Some(ops.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

pub fn activated(ops: &[Operation]) -> Vec<String> {
    let mut v: Vec<String> = ops
        .iter()
        .filter_map(|o| match o {
            Operation::ActivateShard(a) => Some(a.primary.shard.id().to_owned()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

pub fn deactivated(ops: &[Operation]) -> Vec<String> {
    let mut v: Vec<String> = ops
        .iter()
        .filter_map(|o| match o {
            Operation::Deactivate { shard } => Some(shard.id().to_owned()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Shard ids the engine holds leases for.
pub fn profile(engine: &Engine, device: &DeviceId) -> Vec<String> {
    let mut v: Vec<String> = engine
        .device(device)
        .map(|v| v.leases.iter().map(|l| l.shard.id().to_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

pub fn strs(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

pub const VPN_AES: [&str; 3] = ["auth-psk", "crypto-aes256gcm", "vpn-tunnel"];
pub const VPN_CHACHA: [&str; 3] = ["auth-psk", "crypto-chacha20poly1305", "vpn-tunnel"];
pub const QOS: [&str; 2] = ["qos-dscp", "qos-shaper"];

pub fn secure(rate: u64) -> ClassStats {
    class(TrafficClass::Sensitive, rate, enc())
}

pub fn calls(rate: u64) -> ClassStats {
    class(TrafficClass::Calls, rate, lat())
}
