//! Issue 15: digests per architecture and per-device configuration in the
//! catalog, and what the planner makes of them.

mod policy_common;

use policy_common::*;
use shardline_allocator_core::policy::catalog::Builds;
use shardline_allocator_core::policy::{
    Action, Agreements, Catalog, CatalogError, Engine, Event, PolicyConfig, Refusal,
};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{
    DeviceResources, Operation, QosReport, RejectionCounters, ShardActivation, TrafficClass,
};

fn hex(b: u8) -> String {
    format!("{b:02x}").repeat(32)
}

/// A vpn capability whose crypto has a build for x86_64 only, with a
/// portable alternative; the tunnel has builds for x86_64 and aarch64.
fn catalog_text(tunnel_arches: &str) -> String {
    format!(
        r#"
[[shard]]
id = "tunnel"
version = "1.0.0"
sha256 = {{ {tunnel_arches} }}
capability = "vpn"
kind = "data"
cpu_permille = 100
memory_kib = 16384
bandwidth_kbps = 10000
priority = 70
depends_on = ["auth"]
device_config = ["peer"]
config = '''
retry_ms = 1000
peer = 198.51.100.1:1
'''

[[shard]]
id = "fast"
version = "1.0.0"
sha256 = {{ x86_64 = "{fast}" }}
capability = "vpn"
kind = "compute"
cpu_permille = 100
memory_kib = 16384
priority = 70
alternatives = ["portable"]

[[shard]]
id = "portable"
version = "1.0.0"
sha256 = "{portable}"
capability = "vpn"
kind = "compute"
cpu_permille = 100
memory_kib = 16384
priority = 70

[[shard]]
id = "auth"
version = "1.0.0"
sha256 = "{auth}"
capability = "vpn"
kind = "compute"
cpu_permille = 100
memory_kib = 16384
priority = 70
secret_config = ["psk"]

[[rule]]
need = "needs_encryption"
capabilities = ["vpn"]
"#,
        fast = hex(0xfa),
        portable = hex(0x90),
        auth = hex(0xa0),
    )
}

const TIERS: &str = r#"
[[tier]]
name = "t"
capabilities = ["vpn"]
compute_units = 8
data_units = 8
max_priority = 100
lease_cap_s = 3600
"#;

fn engine(tunnel_arches: &str) -> Engine {
    let c = Catalog::from_toml_str(&catalog_text(tunnel_arches), "cat.toml").unwrap();
    let a = Agreements::from_toml_str(TIERS, "tiers.toml", &c).unwrap();
    Engine::new(c, a, PolicyConfig::default())
}

const BOTH: &str = "x86_64 = \"1111111111111111111111111111111111111111111111111111111111111111\", aarch64 = \"2222222222222222222222222222222222222222222222222222222222222222\"";

fn vpn_report(device: &DeviceId, seq: u64, arch: &str) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: 0,
        window_ms: 60_000,
        classes: vec![class(TrafficClass::Sensitive, 100_000, enc())],
        resources: DeviceResources {
            arch: arch.to_owned(),
            ..resources(false)
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

fn activations(out: &[Action]) -> Vec<ShardActivation> {
    out.iter()
        .flat_map(|a| match a {
            Action::Instruct { ops, .. } => ops.clone(),
            _ => vec![],
        })
        .filter_map(|op| match op {
            Operation::ActivateShard(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn configured(e: &mut Engine, d: &DeviceId) {
    enroll(e, 0, d, "t", None);
}

fn err(text: &str) -> (usize, String, String) {
    match Catalog::from_toml_str(text, "cat.toml") {
        Err(CatalogError::Invalid {
            path,
            line,
            field,
            message,
        }) => {
            assert_eq!(path, "cat.toml");
            (line, field, message)
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn digests_parse_per_architecture_or_for_every_one() {
    let c = Catalog::from_toml_str(&catalog_text(BOTH), "cat.toml").unwrap();
    let tunnel = &c.shards["tunnel"].builds;
    assert_eq!(tunnel.for_arch(Some("x86_64")), Some([0x11; 32]));
    assert_eq!(tunnel.for_arch(Some("aarch64")), Some([0x22; 32]));
    assert_eq!(tunnel.for_arch(Some("arm")), None);
    assert_eq!(
        tunnel.for_arch(None),
        None,
        "unknown arch: only a universal digest fits"
    );
    let portable = &c.shards["portable"].builds;
    assert_eq!(portable, &Builds::universal([0x90; 32]));
    assert_eq!(portable.for_arch(Some("arm")), Some([0x90; 32]));
    assert_eq!(portable.for_arch(None), Some([0x90; 32]));
    assert!(portable.not_built().is_empty());
    // All-zero = not built (check-config warns; see the service tests).
    let zero = "0".repeat(64);
    let c = Catalog::from_toml_str(
        &catalog_text(&format!("x86_64 = \"{zero}\", arm = \"{}\"", hex(3))),
        "cat.toml",
    )
    .unwrap();
    assert_eq!(c.shards["tunnel"].builds.not_built(), ["x86_64"]);
    // The shipped catalog parses and lists its placeholders.
    let shipped = Catalog::from_toml_str(CATALOG, "catalog.toml").unwrap();
    assert_eq!(shipped.shards["qos-shaper"].builds.not_built().len(), 3);
    assert_eq!(shipped.shards["auth-psk"].secret_config, ["psk"]);
    assert_eq!(
        shipped.shards["vpn-tunnel"].device_config,
        ["role", "bind", "peer"]
    );
}

#[test]
fn bad_digests_architectures_and_secrets_in_clear_are_refused_with_line_and_field() {
    let text = catalog_text("x86_64 = \"12\"");
    let (line, field, _) = err(&text);
    let want = text.lines().position(|l| l.contains("\"12\"")).unwrap() + 1;
    assert_eq!((line, field.as_str()), (want, "sha256.x86_64"));

    let text = catalog_text(&format!("amd64 = \"{}\"", hex(1)));
    let (line, field, message) = err(&text);
    let want = text.lines().position(|l| l.contains("amd64")).unwrap() + 1;
    assert_eq!((line, field.as_str()), (want, "sha256.amd64"));
    assert!(message.contains("unknown architecture"), "{message}");

    // The secret key in the fleet-wide config: the line of that key.
    let text = catalog_text(BOTH).replace(
        "secret_config = [\"psk\"]",
        "secret_config = [\"psk\"]\nconfig = '''\nmax_skew_ms = 30000\npsk = 5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d\n'''",
    );
    let (line, field, message) = err(&text);
    let want = text.lines().position(|l| l.starts_with("psk = ")).unwrap() + 1;
    assert_eq!((line, field.as_str()), (want, "config"));
    assert!(message.contains("\"psk\" is secret"), "{message}");
    assert!(
        !message.contains("5d5d"),
        "the message repeats the secret: {message}"
    );

    let text = catalog_text(BOTH).replace(
        "device_config = [\"peer\"]",
        "device_config = [\"Peer Addr\"]",
    );
    let (_, field, _) = err(&text);
    assert_eq!(field, "device_config");
}

#[test]
fn a_device_gets_the_builds_of_its_architecture_and_the_alternative_where_none() {
    let mut e = engine(BOTH);
    let (x, a) = (dev("x86"), dev("arm64"));
    configured(&mut e, &x);
    configured(&mut e, &a);
    let out = e.handle(0, Event::Report(vpn_report(&x, 1, "x86_64")));
    let acts = activations(&out);
    let find = |acts: &[ShardActivation], id: &str| {
        acts.iter()
            .find(|a| a.primary.shard.id() == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not activated: {acts:?}"))
    };
    assert_eq!(find(&acts, "tunnel").primary.sha256, [0x11; 32]);
    let fast = find(&acts, "fast");
    assert_eq!(fast.primary.sha256, [0xfa; 32]);
    // Its alternative travels along for local failover, with its own digest.
    assert_eq!(fast.alternatives.len(), 1);
    assert_eq!(fast.alternatives[0].shard.id(), "portable");
    assert_eq!(fast.alternatives[0].sha256, [0x90; 32]);
    let tunnel = find(&acts, "tunnel");
    assert_eq!(tunnel.primary.bandwidth_kbps, 10_000);
    // The device's value replaces the catalog's line.
    let cfg = String::from_utf8(tunnel.primary.config.clone()).unwrap();
    assert!(
        cfg.contains("retry_ms = 1000") && cfg.contains("peer = sim"),
        "{cfg}"
    );
    assert!(!cfg.contains("198.51.100.1"), "{cfg}");
    assert!(
        find(&acts, "auth").primary.sealed_config.is_empty(),
        "the engine never seals"
    );

    // aarch64: no build of `fast`, so `portable` runs, with no alternative.
    assert_eq!(e.device(&a).unwrap().arch, None, "no report yet");
    let out = e.handle(0, Event::Report(vpn_report(&a, 1, "aarch64")));
    assert_eq!(
        e.device(&a).unwrap().arch.as_deref(),
        Some("aarch64"),
        "learnt from the signed report"
    );
    let acts = activations(&out);
    assert_eq!(find(&acts, "tunnel").primary.sha256, [0x22; 32]);
    let portable = find(&acts, "portable");
    assert!(portable.alternatives.is_empty());
    assert!(acts.iter().all(|x| x.primary.shard.id() != "fast"));
}

#[test]
fn no_build_for_the_architecture_is_a_refusal_naming_it() {
    let mut e = engine(BOTH);
    let d = dev("armv7");
    configured(&mut e, &d);
    let out = e.handle(0, Event::Report(vpn_report(&d, 1, "arm")));
    assert!(activations(&out).is_empty());
    let view = e.device(&d).unwrap();
    assert_eq!(
        view.refusals["vpn"],
        Refusal::NoBuild {
            shard: "tunnel".into(),
            arch: "arm".into()
        }
    );
    assert!(view.leases.is_empty(), "not charged");
    let hint = &view.refusal_reasons["vpn"];
    assert!(hint.contains("tunnel") && hint.contains("arm"), "{hint}");
}

#[test]
fn a_missing_device_key_refuses_the_capability_until_set() {
    let mut e = engine(BOTH);
    let d = dev("bare");
    e.handle(
        0,
        Event::Enrolled {
            device: d.clone(),
            tier: "t".into(),
            tenant: None,
        },
    );
    let out = e.handle(0, Event::Report(vpn_report(&d, 1, "x86_64")));
    assert!(activations(&out).is_empty());
    let view = e.device(&d).unwrap();
    assert!(
        matches!(&view.refusals["vpn"], Refusal::MissingDeviceConfig { shard, key, secret: true } if shard == "auth" && key == "psk"),
        "{:?}",
        view.refusals
    );
    assert!(view.leases.is_empty());
    assert_eq!(view.budget_compute_units, 8);
    // Setting it grants the capability at once.
    configure(&mut e, 1, &d);
    let out = e.handle(2, Event::Tick);
    let granted: Vec<String> = e
        .device(&d)
        .unwrap()
        .leases
        .iter()
        .map(|l| l.shard.id().to_owned())
        .collect();
    assert!(granted.contains(&"auth".to_owned()), "{granted:?} {out:?}");
}

#[test]
fn a_changed_value_re_sends_the_activation() {
    let mut e = engine(BOTH);
    let d = dev("x");
    configured(&mut e, &d);
    e.handle(0, Event::Report(vpn_report(&d, 1, "x86_64")));
    let mut config = e.device_config(&d).cloned().unwrap();
    config
        .get_mut("tunnel")
        .unwrap()
        .clear
        .insert("peer".into(), "203.0.113.9:7".into());
    let out = e.handle(
        10,
        Event::DeviceConfig {
            device: d.clone(),
            config,
            changed: ["tunnel".to_owned()].into(),
        },
    );
    let acts = activations(&out);
    assert_eq!(acts.len(), 1, "{acts:?}");
    let cfg = String::from_utf8(acts[0].primary.config.clone()).unwrap();
    assert!(cfg.contains("peer = 203.0.113.9:7"), "{cfg}");
    // No deactivation: the new activation replaces the running one.
    let deactivated = |out: &[Action]| -> Vec<String> {
        out.iter()
            .flat_map(|a| match a {
                Action::Instruct { ops, .. } => ops.clone(),
                _ => vec![],
            })
            .filter_map(|o| match o {
                Operation::Deactivate { shard } => Some(shard.id().to_owned()),
                _ => None,
            })
            .collect()
    };
    assert!(deactivated(&out).is_empty(), "{out:?}");
    // A required key removed: the capability is released, deactivated.
    let mut config = e.device_config(&d).cloned().unwrap();
    config.get_mut("tunnel").unwrap().clear.remove("peer");
    let out = e.handle(
        20,
        Event::DeviceConfig {
            device: d.clone(),
            config,
            changed: ["tunnel".to_owned()].into(),
        },
    );
    let mut gone = deactivated(&out);
    gone.sort();
    assert_eq!(gone, ["auth", "fast", "tunnel"], "{out:?}");
    assert!(e.device(&d).unwrap().leases.is_empty());
}
