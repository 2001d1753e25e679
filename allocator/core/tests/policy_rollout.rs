//! Issue 20: a catalog reload that changes an entry is rolled out in
//! stages on simulated time: the canaries get the new version first, a bad
//! version is rolled back automatically, a good one promoted to the rest,
//! and a restart mid-rollout (state persisted, engine rebuilt) resumes.

mod policy_common;
use policy_common::*;
use shardline_allocator_core::policy::{
    Action, Agreements, Catalog, Engine, Event, PolicyConfig, Rollouts,
};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{AckOutcome, Operation, ShardFailure, ShardState};

fn with_version(v: &str) -> Catalog {
    let text = CATALOG.replacen(
        "id = \"vpn-tunnel\"\nversion = \"0.1.0\"",
        &format!("id = \"vpn-tunnel\"\nversion = \"{v}\""),
        1,
    );
    Catalog::from_toml_str(&text, "catalog.toml").unwrap()
}

fn tiers(c: &Catalog) -> Agreements {
    Agreements::from_toml_str(TEST_TIERS, "tiers.toml", c).unwrap()
}

/// 20 devices in `roomy` running the vpn (0.1.0), acknowledged.
fn fleet() -> (Engine, Vec<DeviceId>) {
    let mut e = engine_with(PolicyConfig::default());
    let ids: Vec<DeviceId> = (0..20).map(|i| dev(&format!("d{i:02}"))).collect();
    for d in &ids {
        enroll(&mut e, 0, d, "roomy", None);
        send(&mut e, 0, d, 1, vec![secure(100_000)]);
        ack_all(&mut e, 0, d, 1);
    }
    (e, ids)
}

fn ack_all(e: &mut Engine, now: u64, d: &DeviceId, seq: u64) {
    e.handle(
        now,
        Event::Sent {
            device: d.clone(),
            seq,
        },
    );
    e.handle(
        now,
        Event::Ack {
            device: d.clone(),
            seq,
            outcome: AckOutcome::Applied,
        },
    );
}

/// The vpn-tunnel version `d`'s lease holds.
fn tunnel(e: &Engine, d: &DeviceId) -> String {
    e.device(d)
        .unwrap()
        .leases
        .iter()
        .find(|l| l.shard.id() == "vpn-tunnel")
        .map(|l| l.shard.version().to_owned())
        .unwrap_or_default()
}

fn tunnel_activations(out: &[Action], d: &DeviceId) -> Vec<String> {
    ops_for(out, d)
        .iter()
        .filter_map(|o| match o {
            Operation::ActivateShard(a) if a.primary.shard.id() == "vpn-tunnel" => {
                Some(a.primary.shard.version().to_owned())
            }
            _ => None,
        })
        .collect()
}

fn reload(e: &mut Engine, now: u64, v: &str) -> Vec<Action> {
    let c = with_version(v);
    let a = tiers(&c);
    let mut out = Vec::new();
    let sum = e.reload(now, c, a, "tiers.toml", &mut out).unwrap();
    assert_eq!(sum.shards_changed.len(), 1, "{sum:?}");
    assert!(sum.shards_changed[0].staged);
    out.extend(e.handle(now, Event::Tick));
    out
}

/// Every device reports its demand and healthy shards at `now` (its
/// sequence number from the time, so it keeps rising); the actions.
fn keep_alive(e: &mut Engine, now: u64, ids: &[DeviceId]) -> Vec<Action> {
    let mut out = Vec::new();
    for d in ids {
        let got = send(e, now, d, 10 + now / 1000, vec![secure(100_000)]);
        applied(e, now, &got);
        out.extend(got);
    }
    out
}

/// Every instruction in `out` is sent and applied (sequence = `now`).
fn applied(e: &mut Engine, now: u64, out: &[Action]) {
    for a in out {
        if let Action::Instruct { device, .. } = a {
            ack_all(e, now, device, now);
        }
    }
}

fn rollout_events(out: &[Action]) -> Vec<(String, String)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Rollout { phase, reason, .. } => Some((phase.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_bad_version_is_rolled_back_from_its_canaries_automatically() {
    let (mut e, ids) = fleet();
    let t = 10 * MIN;
    let out = reload(&mut e, t, "0.2.0");
    assert_eq!(rollout_events(&out)[0].0, "canary");
    applied(&mut e, t, &out);
    let canaries: Vec<DeviceId> = e.rollouts().active["vpn-tunnel"]
        .canaries
        .iter()
        .cloned()
        .collect();
    assert_eq!(canaries.len(), 2, "10 % of 20");
    for d in &ids {
        let want: Vec<String> = if canaries.contains(d) {
            vec!["0.2.0".into()]
        } else {
            vec![]
        };
        assert_eq!(tunnel_activations(&out, d), want, "{d}");
    }
    // Both canaries fail to start the new version.
    let mut all = Vec::new();
    for (i, d) in canaries.iter().enumerate() {
        let mut s = healthy_statuses(&e, d);
        for x in &mut s {
            if x.shard.id() == "vpn-tunnel" {
                x.state = ShardState::Stopped;
                x.last_failure = Some(ShardFailure::InitFailed {
                    reason: "unknown option".into(),
                });
            }
        }
        all.extend(e.handle(
            t + MIN,
            Event::Report(report(d, 2 + i as u64, vec![secure(100_000)], s, true)),
        ));
    }
    all.extend(e.handle(t + MIN, Event::Tick));
    let ev = rollout_events(&all);
    assert_eq!(
        ev.last().unwrap(),
        &(
            "rolled_back".to_owned(),
            "rollback: vpn-tunnel 0.2.0 failed on 2 of 2 canaries (100 % > 20 %)".to_owned()
        )
    );
    // Canaries get the previous version again once their start-failure
    // backoff (10 min) is over; the rest never saw the new one.
    let mut seen = Vec::new();
    for m in 2..20 {
        let out = keep_alive(&mut e, t + m * MIN, &ids);
        for d in &ids {
            seen.extend(tunnel_activations(&out, d));
        }
        let out = e.handle(t + m * MIN, Event::Tick);
        for d in &ids {
            seen.extend(tunnel_activations(&out, d));
        }
        applied(&mut e, t + m * MIN, &out);
    }
    assert!(!seen.contains(&"0.2.0".to_owned()), "{seen:?}");
    for d in &ids {
        let v = e.device(d).unwrap();
        assert_eq!(
            tunnel(&e, d),
            "0.1.0",
            "{d}: {:?} {:?}",
            v.refusal_reasons,
            v.leases
        );
    }
    assert!(seen.contains(&"0.1.0".to_owned()), "canaries back on 0.1.0");
}

#[test]
fn a_good_version_is_promoted_after_the_soak_and_a_restart_resumes() {
    let (mut e, ids) = fleet();
    let t = 10 * MIN;
    let out = reload(&mut e, t, "0.2.0");
    applied(&mut e, t, &out);
    let canaries: Vec<DeviceId> = e.rollouts().active["vpn-tunnel"]
        .canaries
        .iter()
        .cloned()
        .collect();
    for d in &canaries {
        assert_eq!(tunnel(&e, d), "0.2.0");
        send(&mut e, t + MIN, d, 2, vec![secure(100_000)]);
    }
    assert_eq!(e.rollouts().active["vpn-tunnel"].exposed.len(), 2);

    // Restart mid-rollout: a new engine on the new catalog, device states
    // and the persisted rollouts restored.
    let bytes = postcard::to_stdvec(e.rollouts()).unwrap();
    let c = with_version("0.2.0");
    let a = tiers(&c);
    let mut e2 = Engine::new(c, a, PolicyConfig::default());
    for d in &ids {
        e2.restore_device(d.clone(), e.device_state(d).unwrap().clone());
    }
    e2.restore_rollouts(postcard::from_bytes::<Rollouts>(&bytes).unwrap());
    // (The service hands over each device's configuration at start.)
    let config =
        shardline_allocator_core::policy::simulate::placeholder_device_config(e2.catalog());
    for d in &ids {
        e2.restore_device_config(d.clone(), config.clone());
    }
    assert_eq!(e2.rollouts(), e.rollouts());
    // Nothing changes for anyone at the restart (non-canaries stay on 0.1.0).
    let out = e2.handle(t + 2 * MIN, Event::Tick);
    for d in &ids {
        assert!(tunnel_activations(&out, d).is_empty(), "{d}: {out:?}");
    }
    // Demand goes on; the soak ends: promoted, everyone gets 0.2.0.
    let soak = PolicyConfig::default().rollout.soak_ms;
    keep_alive(&mut e2, t + soak - MIN, &ids);
    let out = e2.handle(t + soak, Event::Tick);
    let ev = rollout_events(&out);
    assert_eq!(ev[0].0, "promoted", "{ev:?}");
    assert!(
        ev[0].1.contains("failed on 0 of 2 canaries (0 % ≤ 20 %)"),
        "{ev:?}"
    );
    for d in ids.iter().filter(|d| !canaries.contains(d)) {
        let v = e2.device(d).unwrap();
        assert_eq!(
            tunnel_activations(&out, d),
            vec!["0.2.0".to_owned()],
            "{d}: {:?} {:?} {:?}",
            v.refusal_reasons,
            v.leases,
            ops_for(&out, d)
        );
    }
    assert!(e2.rollouts().active.is_empty());
}

#[test]
fn a_reload_that_strands_devices_changes_nothing() {
    let (mut e, _ids) = fleet();
    let c = catalog();
    let only_basic = r#"
[[tier]]
name = "basic"
capabilities = ["qos"]
compute_units = 1
data_units = 2
max_priority = 60
lease_cap_s = 1800
"#;
    let a = Agreements::from_toml_str(only_basic, "tiers.toml", &c).unwrap();
    let before = e.catalog().clone();
    let mut out = Vec::new();
    let err = e.reload(MIN, c, a, "tiers.toml", &mut out).unwrap_err();
    assert!(err.to_string().contains("tier.roomy"), "{err}");
    assert!(err.to_string().contains("20 enrolled"), "{err}");
    assert_eq!(e.catalog(), &before);
    assert!(e.agreements().tiers.contains_key("roomy"));
    assert!(out.is_empty());
}

#[test]
fn a_new_digest_under_the_same_version_reaches_the_canaries_at_once() {
    let (mut e, ids) = fleet();
    let t = 10 * MIN;
    let zero = "0".repeat(64);
    let text = CATALOG.replacen(
        &format!("sha256 = {{ x86_64 = \"{zero}\""),
        &format!("sha256 = {{ x86_64 = \"{}\"", "1".repeat(64)),
        1,
    );
    assert_ne!(text, CATALOG);
    let c = Catalog::from_toml_str(&text, "catalog.toml").unwrap();
    let a = tiers(&c);
    let mut out = Vec::new();
    let sum = e.reload(t, c, a, "tiers.toml", &mut out).unwrap();
    assert_eq!(sum.shards_changed.len(), 1, "{sum:?}");
    out.extend(e.handle(t, Event::Tick));
    let canaries = e.rollouts().active["vpn-tunnel"].canaries.clone();
    for d in &ids {
        let digests: Vec<[u8; 32]> = ops_for(&out, d)
            .iter()
            .filter_map(|o| match o {
                Operation::ActivateShard(a) if a.primary.shard.id() == "vpn-tunnel" => {
                    Some(a.primary.sha256)
                }
                _ => None,
            })
            .collect();
        if canaries.contains(d) {
            assert_eq!(digests, vec![[0x11; 32]], "{d}");
        } else {
            assert!(digests.is_empty(), "{d}: {digests:?}");
        }
    }
}
