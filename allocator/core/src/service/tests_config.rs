//! Per-device configuration through the service core: secrets are sealed
//! to the device just before signing, open with the device's key, and are
//! never in clear in an instruction, a reply or a record's `Debug`.

use super::*;
use crate::policy::{Agreements, Catalog, PolicyConfig};
use crypto_box::aead::rand_core::{CryptoRng, RngCore};
use shardline_shared::ids::ShardRef;
use shardline_shared::msg::*;
use shardline_shared::seal::open_config;

/// A seeded generator for tests (deterministic; not for production).
struct TestRng(crate::policy::prng::SplitMix64);

impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.0.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), crypto_box::aead::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for TestRng {}

const PSK: &str = "5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d";

fn core() -> Core {
    use crate::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
    let catalog = Catalog::from_toml_str(EXAMPLE_CATALOG, "catalog.toml").unwrap();
    let agreements = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).unwrap();
    let engine = Engine::new(catalog, agreements, PolicyConfig::default());
    let mut core = Core::new(
        engine,
        KeyPair::from_seed(&[1; 32]),
        Loaded::default(),
        super::tests::test_config(),
        Arc::new(Metrics::default()),
        1_000_000,
    );
    core.set_seal_rng(SealRng(Box::new(TestRng(
        crate::policy::prng::SplitMix64::new(7),
    ))));
    core
}

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

fn enroll(core: &mut Core, name: &str, n: u8) -> DeviceId {
    let d = DeviceId::new(name).unwrap();
    let r = core.on_command(
        1_000_000,
        Command::Enroll {
            device: d.clone(),
            public_key: key(n).public_key(),
            tier: "standard".into(),
            tenant: None,
        },
    );
    assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    core.take_step();
    d
}

fn vpn_report(device: &DeviceId, seq: u64) -> QosReport {
    QosReport {
        device: device.clone(),
        seq,
        window_start_ms: 990_000,
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Sensitive,
            bytes: 1_000_000,
            packets: 1000,
            rate_bps: 800_000,
            rtt_p50_us: None,
            rtt_p95_us: None,
            jitter_us: None,
            loss_permille: 0,
            active_flows: 2,
            need: QosNeed {
                latency_sensitive: false,
                bandwidth_heavy: false,
                needs_encryption: true,
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 50,
            mem_total_kib: 4 << 20,
            mem_available_kib: 3 << 20,
            aes_hw: true,
            arch: "aarch64".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending: Default::default(),
    }
}

fn instructions(step: &Step, device: &DeviceId) -> Vec<Instruction> {
    step.publish
        .iter()
        .filter(|p| p.topic == topics::instr(device))
        .map(|p| {
            let env = sign::parse_envelope(&p.payload, 1 << 20).unwrap();
            codec::decode::<Instruction>(&env.payload).unwrap()
        })
        .collect()
}

fn activations(instrs: &[Instruction]) -> Vec<ShardActivation> {
    instrs
        .iter()
        .flat_map(|i| i.ops.iter())
        .filter_map(|op| match op {
            Operation::ActivateShard(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn set(
    core: &mut Core,
    d: &DeviceId,
    shard: &str,
    clear: &[(&str, &str)],
    secret: &[(&str, &str)],
) -> Reply {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    core.on_command(
        1_000_050,
        Command::SetDeviceConfig {
            device: d.clone(),
            shard: shard.into(),
            change: ConfigChange {
                clear: map(clear),
                secret: map(secret),
                unset: vec![],
            },
        },
    )
}

#[test]
fn a_missing_key_refuses_vpn_and_a_set_secret_travels_sealed_only() {
    let mut core = core();
    let d = enroll(&mut core, "gw-a", 2);
    let bytes = sign::seal(Domain::Report, &vpn_report(&d, 1), &[&key(2)]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    assert!(
        activations(&instructions(&step, &d)).is_empty(),
        "vpn is not activated without its device configuration"
    );
    let view = core.engine().device(&d).unwrap();
    let hint = &view.refusal_reasons["vpn"];
    assert_eq!(
        hint,
        "vpn needs device config auth-psk:psk — shardctl config set gw-a auth-psk --secret psk=…"
    );
    assert_eq!(view.budget_data_units, 3);
    assert!(
        view.leases.is_empty(),
        "a refused capability is not charged"
    );

    // A secret given as clear is refused, naming the key, not its value.
    let r = set(&mut core, &d, "auth-psk", &[("psk", PSK)], &[]);
    match r {
        Reply::Error(CommandError::Invalid(m)) => {
            assert!(m.contains("psk") && !m.contains(PSK), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        set(&mut core, &d, "auth-psk", &[], &[("psk", PSK)]),
        Reply::Ok
    ));
    let step = core.take_step();
    assert!(
        activations(&instructions(&step, &d)).is_empty(),
        "role, bind, peer still missing"
    );
    assert!(matches!(
        core.engine().device(&d).unwrap().refusals["vpn"],
        policy::Refusal::MissingDeviceConfig { ref key, secret: false, .. } if key == "role"
    ));
    assert!(matches!(
        set(
            &mut core,
            &d,
            "vpn-tunnel",
            &[
                ("role", "initiator"),
                ("bind", "10.0.0.1:5000"),
                ("peer", "10.0.0.2:5000")
            ],
            &[]
        ),
        Reply::Ok
    ));
    let step = core.take_step();
    // The record is written with the change; its Debug never shows the secret.
    let rec = step
        .batch
        .put_devices
        .iter()
        .find(|r| r.device == d)
        .unwrap();
    assert_eq!(rec.shard_config["auth-psk"].secret["psk"], PSK);
    assert!(!format!("{rec:?}").contains(PSK));
    let instrs = instructions(&step, &d);
    let acts = activations(&instrs);
    let ids: Vec<&str> = acts.iter().map(|a| a.primary.shard.id()).collect();
    assert!(
        ids.contains(&"vpn-tunnel") && ids.contains(&"auth-psk"),
        "{ids:?}"
    );
    for p in step.publish.iter().filter(|p| p.topic == topics::instr(&d)) {
        assert!(
            !contains(&p.payload, PSK.as_bytes()),
            "the secret is on the wire in clear"
        );
    }
    let catalog = core.engine().catalog();
    for a in &acts {
        // The digest is the device's architecture's (aarch64).
        let spec = &catalog.shards[a.primary.shard.id()];
        assert_eq!(
            Some(a.primary.sha256),
            spec.builds.for_arch(Some("aarch64"))
        );
        assert!(a.alternatives.len() <= MAX_ALTERNATIVES);
        assert_eq!(a.primary.bandwidth_kbps, spec.cost.bandwidth_kbps);
        if a.primary.shard.id() == "auth-psk" {
            let secret =
                open_config(&key(2), &d, &a.primary.shard, &a.primary.sealed_config).unwrap();
            assert_eq!(String::from_utf8(secret).unwrap(), format!("psk = {PSK}\n"));
            assert!(!contains(&a.primary.config, b"psk"));
        } else {
            assert!(a.primary.sealed_config.is_empty());
        }
        if a.primary.shard.id() == "vpn-tunnel" {
            let c = String::from_utf8(a.primary.config.clone()).unwrap();
            assert!(
                c.contains("role = initiator") && c.contains("peer = 10.0.0.2:5000"),
                "{c}"
            );
        }
        if a.primary.shard.id() == "crypto-aes256gcm" {
            let alts: Vec<&str> = a.alternatives.iter().map(|v| v.shard.id()).collect();
            assert_eq!(alts, ["crypto-chacha20poly1305"]);
        }
    }
    // Another device's key does not open it.
    let auth = acts
        .iter()
        .find(|a| a.primary.shard.id() == "auth-psk")
        .unwrap();
    assert!(open_config(
        &key(9),
        &d,
        &auth.primary.shard,
        &auth.primary.sealed_config
    )
    .is_err());

    // The operator's view names the secret key, never its value.
    match core.on_command(1_000_200, Command::DeviceConfig { device: d.clone() }) {
        Reply::DeviceConfig(shown) => {
            let json = serde_json::to_string(&shown).unwrap();
            assert!(!json.contains(PSK), "{json}");
            assert_eq!(shown.shards["auth-psk"].secret_keys, ["psk"]);
            assert!(shown.shards["auth-psk"].missing.is_empty());
        }
        other => panic!("{other:?}"),
    }

    // A changed secret re-sends the activation, sealed again.
    assert!(matches!(
        set(&mut core, &d, "auth-psk", &[], &[("psk", &"ab".repeat(32))]),
        Reply::Ok
    ));
    let step = core.take_step();
    let acts = activations(&instructions(&step, &d));
    let auth = acts
        .iter()
        .find(|a| a.primary.shard.id() == "auth-psk")
        .expect("re-sent");
    let secret = open_config(
        &key(2),
        &d,
        &auth.primary.shard,
        &auth.primary.sealed_config,
    )
    .unwrap();
    assert_eq!(secret, format!("psk = {}\n", "ab".repeat(32)).into_bytes());
}

#[test]
fn vpn_pair_configures_both_ends_with_one_key_sealed_to_each() {
    let mut core = core();
    let a = enroll(&mut core, "gw-a", 2);
    let b = enroll(&mut core, "gw-b", 3);
    for (d, k) in [(&a, 2), (&b, 3)] {
        let bytes = sign::seal(Domain::Report, &vpn_report(d, 1), &[&key(k)]);
        core.on_message(1_000_100, &topics::report(d), &bytes);
    }
    core.take_step();
    let psk = [0x42u8; 32];
    let r = core.on_command(
        1_000_200,
        Command::VpnPair(VpnPair {
            a: a.clone(),
            b: b.clone(),
            a_endpoint: "192.0.2.1:51820".parse().unwrap(),
            b_endpoint: "192.0.2.2:51820".parse().unwrap(),
            psk,
        }),
    );
    assert!(matches!(r, Reply::Ok), "{r:?}");
    let step = core.take_step();
    let mut sealed = Vec::new();
    for (d, k, role, peer) in [
        (&a, 2, "initiator", "192.0.2.2:51820"),
        (&b, 3, "responder", "192.0.2.1:51820"),
    ] {
        for p in step.publish.iter().filter(|p| p.topic == topics::instr(d)) {
            assert!(!contains(&p.payload, hex::encode(psk).as_bytes()));
        }
        let acts = activations(&instructions(&step, d));
        let tunnel = acts
            .iter()
            .find(|x| x.primary.shard.id() == "vpn-tunnel")
            .expect("tunnel");
        let c = String::from_utf8(tunnel.primary.config.clone()).unwrap();
        assert!(
            c.contains(&format!("role = {role}")) && c.contains(&format!("peer = {peer}")),
            "{c}"
        );
        let auth = acts
            .iter()
            .find(|x| x.primary.shard.id() == "auth-psk")
            .expect("auth");
        let secret =
            open_config(&key(k), d, &auth.primary.shard, &auth.primary.sealed_config).unwrap();
        assert_eq!(secret, format!("psk = {}\n", hex::encode(psk)).into_bytes());
        sealed.push(auth.primary.sealed_config.clone());
    }
    assert_ne!(sealed[0], sealed[1], "sealed separately to each device");
    // One device cannot open the other's box.
    let b_auth = ShardRef::new("auth-psk", "0.1.0").unwrap();
    assert!(open_config(&key(2), &b, &b_auth, &sealed[1]).is_err());
}

#[test]
fn without_randomness_an_activation_with_a_secret_is_not_sent() {
    let mut core = core();
    core.seal_rng = None;
    let d = enroll(&mut core, "gw-a", 2);
    set(
        &mut core,
        &d,
        "vpn-tunnel",
        &[
            ("role", "initiator"),
            ("bind", "10.0.0.1:5000"),
            ("peer", "10.0.0.2:5000"),
        ],
        &[],
    );
    set(&mut core, &d, "auth-psk", &[], &[("psk", PSK)]);
    let bytes = sign::seal(Domain::Report, &vpn_report(&d, 1), &[&key(2)]);
    core.on_message(1_000_100, &topics::report(&d), &bytes);
    let step = core.take_step();
    let acts = activations(&instructions(&step, &d));
    assert!(acts.iter().all(|a| a.primary.shard.id() != "auth-psk"));
    for p in &step.publish {
        assert!(!contains(&p.payload, PSK.as_bytes()));
    }
}
