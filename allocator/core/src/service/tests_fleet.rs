//! The dashboard's reads: the device list page (filters, order, paging),
//! the fleet summary (presence buckets, units per tier and tenant, the
//! reputation histogram) and the live notes a step carries.

use super::fleet::{DeviceQuery, MAX_PAGE, STALE_TIMEOUTS};
use super::live::LiveNote;
use super::*;
use crate::policy::{Agreements, Catalog, PolicyConfig};
use shardline_shared::msg::*;

const T0: u64 = 1_000_000;

fn core() -> Core {
    use crate::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
    let catalog = Catalog::from_toml_str(EXAMPLE_CATALOG, "catalog.toml").unwrap();
    let agreements = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).unwrap();
    Core::new(
        Engine::new(catalog, agreements, PolicyConfig::default()),
        KeyPair::from_seed(&[1; 32]),
        Loaded::default(),
        super::tests::test_config(),
        Arc::new(Metrics::default()),
        T0,
    )
}

/// `n` devices `gw-00`…: even ones standard for tenant "a", odd ones basic
/// for tenant "b".
fn fleet(n: u8) -> Core {
    let mut core = core();
    for i in 0..n {
        let (tier, tenant) = if i % 2 == 0 {
            ("standard", "a")
        } else {
            ("basic", "b")
        };
        let r = core.on_command(
            T0,
            Command::Enroll {
                device: DeviceId::new(format!("gw-{i:02}")).unwrap(),
                public_key: KeyPair::from_seed(&[i + 10; 32]).public_key(),
                tier: tier.into(),
                tenant: Some(tenant.into()),
            },
        );
        assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    }
    core.take_step();
    core
}

fn page(core: &mut Core, q: DeviceQuery) -> super::fleet::DevicePage {
    match core.on_command(T0, Command::DevicePage(q)) {
        Reply::DevicePage(p) => p,
        other => panic!("{other:?}"),
    }
}

fn ids(p: &super::fleet::DevicePage) -> Vec<&str> {
    p.devices.iter().map(|r| r.device.as_str()).collect()
}

#[test]
fn device_pages_filter_sort_and_page_on_the_server() {
    let mut core = fleet(25);
    let all = page(&mut core, DeviceQuery::default());
    assert_eq!((all.total, all.offset, all.limit), (25, 0, 50));
    assert_eq!(all.devices.len(), 25);
    // Same rows, same order as the unpaged list shardctl reads.
    let Reply::Devices(list) = core.on_command(T0, Command::ListDevices) else {
        panic!("no list");
    };
    let listed: Vec<&str> = list.iter().map(|r| r.device.as_str()).collect();
    assert_eq!(ids(&all), listed);

    let second = page(
        &mut core,
        DeviceQuery {
            offset: 10,
            limit: Some(10),
            ..DeviceQuery::default()
        },
    );
    assert_eq!(second.total, 25);
    assert_eq!(ids(&second).first(), Some(&"gw-10"));
    assert_eq!(ids(&second).last(), Some(&"gw-19"));

    let search = page(
        &mut core,
        DeviceQuery {
            q: Some("GW-1".into()),
            ..DeviceQuery::default()
        },
    );
    assert_eq!(search.total, 10, "gw-10…gw-19, case-insensitive");

    let tier = page(
        &mut core,
        DeviceQuery {
            tier: Some("basic".into()),
            tenant: Some("b".into()),
            ..DeviceQuery::default()
        },
    );
    assert_eq!(tier.total, 12);
    assert!(tier.devices.iter().all(|r| r.tier == "basic"));
    let none = page(
        &mut core,
        DeviceQuery {
            tier: Some("basic".into()),
            tenant: Some("a".into()),
            ..DeviceQuery::default()
        },
    );
    assert_eq!((none.total, none.devices.len()), (0, 0));

    let past = page(
        &mut core,
        DeviceQuery {
            offset: 100,
            limit: Some(1_000_000),
            ..DeviceQuery::default()
        },
    );
    assert_eq!(
        (past.total, past.devices.len(), past.limit),
        (25, 0, MAX_PAGE)
    );
}

fn report(device: &DeviceId, seq: u64) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: T0 - 1_000,
        window_ms: 1_000,
        classes: vec![],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 50,
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

fn summary(core: &mut Core, now: u64) -> super::fleet::FleetSummary {
    match core.on_command(now, Command::Fleet) {
        Reply::Fleet(f) => *f,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_fleet_summary_counts_presence_units_tenants_and_reputation() {
    let mut core = fleet(6);
    let d = DeviceId::new("gw-00").unwrap();
    core.apply_report(T0, d.clone(), report(&d, 1));
    let step = core.take_step();
    assert!(
        matches!(&step.live[..], [LiveNote::Report { device, seq: 1, .. }] if device == &d),
        "the accepted report is a live note: {:?}",
        step.live
    );

    let f = summary(&mut core, T0);
    assert_eq!(f.devices, 6);
    assert_eq!((f.presence.online, f.presence.unknown), (1, 5));
    assert_eq!(f.reputation_histogram.iter().sum::<u64>(), 6);
    assert_eq!(f.reputation_histogram[5], 6, "everyone starts at 50");
    let tier = |name: &str| f.tiers.iter().find(|t| t.name == name).unwrap().clone();
    assert_eq!((tier("standard").devices, tier("basic").devices), (3, 3));
    assert_eq!(
        tier("premium").devices,
        0,
        "every configured tier is listed"
    );
    assert!(tier("standard").compute_units_capacity > 0);
    let tenants: Vec<(&str, u64)> = f
        .tenants
        .iter()
        .map(|t| (t.name.as_str(), t.devices))
        .collect();
    assert_eq!(tenants, [("a", 3), ("b", 3)]);
    assert!(f.failing_catalog.is_empty());

    // Past the presence timeout (30 s here) the device is stale, then offline.
    core.on_tick(T0 + 31_000);
    let f = summary(&mut core, T0 + 31_000);
    assert_eq!((f.presence.online, f.presence.stale), (0, 1));
    let later = T0 + 30_000 * STALE_TIMEOUTS + 1;
    core.on_tick(later);
    let f = summary(&mut core, later);
    assert_eq!((f.presence.stale, f.presence.offline), (0, 1));
}

/// The gauges that take a pass over every device are counted again only
/// after `FLEET_GAUGES_MS`; the device count is always current.
#[test]
fn fleet_wide_gauges_are_recounted_at_most_every_ten_seconds() {
    let mut core = fleet(4);
    let tier_devices = |core: &Core| -> u64 {
        let g = core.metrics.gauges.lock().unwrap();
        g.tiers.iter().map(|t| t.1).sum()
    };
    let bucketed = |core: &Core| -> u64 {
        core.metrics
            .gauges
            .lock()
            .unwrap()
            .reputation_buckets
            .iter()
            .sum()
    };
    core.on_tick(T0 + 1_000);
    assert_eq!((tier_devices(&core), bucketed(&core)), (4, 4));
    let r = core.on_command(
        T0 + 1_500,
        Command::Enroll {
            device: DeviceId::new("gw-new").unwrap(),
            public_key: KeyPair::from_seed(&[99; 32]).public_key(),
            tier: "basic".into(),
            tenant: Some("b".into()),
        },
    );
    assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    core.on_tick(T0 + 2_000);
    assert_eq!(core.metrics.gauges.lock().unwrap().devices, 5);
    assert_eq!((tier_devices(&core), bucketed(&core)), (4, 4), "not yet");
    core.on_tick(T0 + 1_000 + super::tick::FLEET_GAUGES_MS);
    assert_eq!((tier_devices(&core), bucketed(&core)), (5, 5));
}
