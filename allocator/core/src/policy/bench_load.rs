//! The load the allocator's service benchmarks put on it, defined once:
//! `service_e2e` (the real binary over MQTT) and `service_core` (the core
//! thread alone) must measure the same catalog and the same reports, or
//! their figures could not be set side by side.

use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{
    ClassStats, DeviceResources, QosNeed, QosReport, RejectionCounters, TrafficClass,
};

/// The shipped catalog as the benches configure it: simulated devices have
/// no per-device keys and run no tunnel, so the qos shaper and the VPN
/// tunnel get fleet-wide placeholder values (as in the service tests) and
/// the tunnel no secret; otherwise nothing needing them would be planned.
/// `Err` names the entry that no longer looks as expected.
pub fn bench_catalog(shipped: &str) -> Result<String, &'static str> {
    let per_device = "config = \"rate_bps = 20000000\"\ndevice_config = [\"listen\", \"forward\"]";
    let vpn = "device_config = [\"role\", \"bind\", \"peer\"]";
    if !shipped.contains(per_device) {
        return Err("the shipped catalog's qos-shaper configuration changed");
    }
    if !shipped.contains(vpn) {
        return Err("the shipped catalog's vpn-tunnel configuration changed");
    }
    Ok(shipped
        .replace(
            per_device,
            r#"config = "rate_bps = 20000000\nlisten = 127.0.0.1:9\nforward = 127.0.0.1:9""#,
        )
        .replace(
            vpn,
            r#"config = "role = initiator\nbind = 127.0.0.1:9\npeer = 127.0.0.1:9""#,
        )
        .replace("secret_config = [\"psk\"]", ""))
}

/// A simulated device's report at `now_ms`: one latency-sensitive class
/// (which the shipped rules answer with `qos`), also needing encryption
/// when `needs_encryption` (then `vpn`).
pub fn bench_report(device: &DeviceId, seq: u64, now_ms: u64, needs_encryption: bool) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: now_ms.saturating_sub(1000),
        window_ms: 1000,
        classes: vec![ClassStats {
            class: TrafficClass::Sensitive,
            bytes: 200_000,
            packets: 200,
            rate_bps: 1_600_000,
            rtt_p50_us: Some(20_000),
            rtt_p95_us: Some(40_000),
            jitter_us: Some(2_000),
            loss_permille: 5,
            active_flows: 4,
            need: QosNeed {
                latency_sensitive: true,
                bandwidth_heavy: false,
                needs_encryption,
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 100,
            mem_total_kib: 4 << 20,
            mem_available_kib: 3 << 20,
            aes_hw: true,
            arch: "x86_64".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
    use crate::policy::{Agreements, Catalog};

    #[test]
    fn the_bench_catalog_parses_and_asks_no_device_for_its_own_values() {
        let text = bench_catalog(EXAMPLE_CATALOG).expect("the shipped catalog as expected");
        let catalog = Catalog::from_toml_str(&text, "catalog.toml").expect("parses");
        Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).expect("tiers");
        for (id, spec) in &catalog.shards {
            assert!(
                spec.secret_config.is_empty(),
                "{id} still asks for a secret"
            );
        }
        assert!(!text.contains("device_config = [\"listen\", \"forward\"]"));
        assert!(bench_catalog("[shards]").is_err());
    }
}
