use super::*;
use crate::policy::catalog::Catalog;

const CATALOG: &str = include_str!("../../../../catalog/catalog.toml");

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("dev-{i:04}")).unwrap()
}

fn catalogs() -> (Catalog, Catalog) {
    let old = Catalog::from_toml_str(CATALOG, "catalog.toml").unwrap();
    let text = CATALOG.replacen(
        "id = \"vpn-tunnel\"\nversion = \"0.1.0\"",
        "id = \"vpn-tunnel\"\nversion = \"0.2.0\"",
        1,
    );
    assert_ne!(text, CATALOG);
    let new = Catalog::from_toml_str(&text, "catalog.toml").unwrap();
    (old, new)
}

#[test]
fn canaries_are_deterministic_about_the_share_and_in_every_group() {
    let ids: Vec<DeviceId> = (0..2000).map(dev).collect();
    let members: Vec<Member<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, d)| Member {
            device: d,
            group: if i % 4 == 0 { "t/small" } else { "t/big" }.into(),
        })
        .collect();
    let (a, groups) = select_canaries(&members, 100);
    // The share of each group, rounded up.
    assert_eq!(groups["t/small"], (500, 50));
    assert_eq!(groups["t/big"], (1500, 150));
    assert_eq!(a.len(), 200);
    // The same devices in any order (a restart lists them differently).
    let mut rev: Vec<Member<'_>> = members
        .iter()
        .map(|m| Member {
            device: m.device,
            group: m.group.clone(),
        })
        .collect();
    rev.reverse();
    assert_eq!(select_canaries(&rev, 100).0, a);
    // Spread over the ids, not the first ones.
    assert!(a.iter().any(|d| d.as_str() > "dev-1000"));
    // A group of one still gets its canary.
    let one = [Member {
        device: &ids[0],
        group: "x/y".into(),
    }];
    assert_eq!(select_canaries(&one, 100).0.len(), 1);
}

#[test]
fn rollback_above_the_threshold_promotion_after_the_soak() {
    let (old, new) = catalogs();
    let ids: Vec<DeviceId> = (0..50).map(dev).collect();
    let members: Vec<Member<'_>> = ids
        .iter()
        .map(|d| Member {
            device: d,
            group: "-/roomy".into(),
        })
        .collect();
    let cfg = RolloutConfig::default();
    let mut r = Rollouts::default();
    let ev = r.on_reload(&cfg, &old, &new, &members, 1_000);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let ro = &r.active["vpn-tunnel"];
    assert_eq!(ro.canaries.len(), 5);
    let canaries: Vec<DeviceId> = ro.canaries.iter().cloned().collect();
    let next = ro.next.shard.clone();
    // Non-canaries keep the previous entry, canaries plan the new one.
    let other = ids.iter().find(|d| !ro.canaries.contains(*d)).unwrap();
    assert_eq!(
        r.spec_for("vpn-tunnel", other).unwrap().shard.version(),
        "0.1.0"
    );
    assert!(r.spec_for("vpn-tunnel", &canaries[0]).is_none());
    // A failure of the *old* entry or on a non-canary does not count.
    assert!(!r.note_failure(other, &next, "crashed"));
    assert!(!r.note_failure(&canaries[0], &old.shards["vpn-tunnel"].shard, "x"));
    // 1 of 5 = 20 %: not above the threshold.
    for c in &canaries {
        r.note_running(c, &next);
    }
    r.note_failure(&canaries[0], &next, "init failed: bad key");
    assert!(r.poll(&cfg, 2_000).is_empty());
    // Same reload again: the rollout goes on.
    assert!(r.on_reload(&cfg, &new, &new, &members, 3_000).is_empty());
    assert_eq!(r.active["vpn-tunnel"].failed.len(), 1);
    // 2 of 5 = 40 % > 20 %: rolled back, the reason in numbers.
    r.note_failure(&canaries[1], &next, "crashed (signal 11)");
    let ev = r.poll(&cfg, 4_000);
    let RolloutEvent::RolledBack { reason, .. } = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        reason,
        "rollback: vpn-tunnel 0.2.0 failed on 2 of 5 canaries (40 % > 20 %)"
    );
    assert!(r.spec_for("vpn-tunnel", &canaries[0]).is_some());

    // A fixed build (0.3.0): a new rollout from the stable 0.1.0.
    let text = CATALOG.replacen(
        "id = \"vpn-tunnel\"\nversion = \"0.1.0\"",
        "id = \"vpn-tunnel\"\nversion = \"0.3.0\"",
        1,
    );
    let fixed = Catalog::from_toml_str(&text, "catalog.toml").unwrap();
    r.on_reload(&cfg, &new, &fixed, &members, 5_000);
    let ro = &r.active["vpn-tunnel"];
    assert_eq!(ro.previous.shard.version(), "0.1.0");
    assert_eq!(ro.next.shard.version(), "0.3.0");
    assert_eq!(ro.canaries.len(), 5, "the same canaries");
    let next = ro.next.shard.clone();
    // Soak not over: nothing; over but nobody ran it: waiting.
    assert!(r.poll(&cfg, 5_000 + cfg.soak_ms - 1).is_empty());
    assert!(r.poll(&cfg, 5_000 + cfg.soak_ms).is_empty());
    assert!(r.active["vpn-tunnel"].reason.starts_with("waiting"));
    r.note_running(&canaries[0], &next);
    let ev = r.poll(&cfg, 5_000 + cfg.soak_ms + 1);
    assert!(matches!(ev[0], RolloutEvent::Promoted { .. }), "{ev:?}");
    assert!(r.active.is_empty());
    assert!(r.spec_for("vpn-tunnel", other).is_none());
    assert_eq!(r.ended[0].phase, Phase::Promoted);
}

#[test]
fn an_operator_promotes_or_rolls_back_and_restarts_resume() {
    let (old, new) = catalogs();
    let ids: Vec<DeviceId> = (0..10).map(dev).collect();
    let members: Vec<Member<'_>> = ids
        .iter()
        .map(|d| Member {
            device: d,
            group: "-/roomy".into(),
        })
        .collect();
    let cfg = RolloutConfig::default();
    let mut r = Rollouts::default();
    r.on_reload(&cfg, &old, &new, &members, 0);
    // Persisted and restored (a restart): same state, same canaries.
    let bytes = postcard::to_stdvec(&r).unwrap();
    let mut back: Rollouts = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, r);
    assert!(back.reconcile(&cfg, &new).is_empty());
    // Restarted with other files: that rollout ends.
    let mut other = back.clone();
    assert_eq!(other.reconcile(&cfg, &old), vec!["vpn-tunnel".to_owned()]);
    assert!(other.active.is_empty());
    // Manual rollback, then promote does nothing twice.
    let e = back.rollback("vpn-tunnel", "alice", 10).unwrap();
    assert!(matches!(e, RolloutEvent::RolledBack { .. }));
    assert!(back.rollback("vpn-tunnel", "alice", 11).is_none());
    let e = back.promote(&cfg, "vpn-tunnel", "bob", 12).unwrap();
    let RolloutEvent::Promoted { reason, .. } = e else {
        panic!()
    };
    assert!(reason.starts_with("promoted by bob"), "{reason}");
    assert!(back.promote(&cfg, "vpn-tunnel", "bob", 13).is_none());
    // Unstaged: nothing starts.
    let mut r = Rollouts::default();
    let off = RolloutConfig {
        staged: false,
        ..cfg
    };
    assert!(r.on_reload(&off, &old, &new, &members, 0).is_empty());
    assert!(!r.overrides());
}
