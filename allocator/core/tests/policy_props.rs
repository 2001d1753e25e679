//! Property tests of the policy engine's invariants over random event
//! sequences: budgets (borrowed units counted), agreements, lease caps,
//! determinism, and no flapping under an alternating class.

mod policy_common;
use policy_common::*;
use proptest::prelude::*;
use shardline_allocator_core::policy::{Action, ComplianceKind, Engine, Event, PolicyConfig};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{Operation, ShardKind};
use std::collections::BTreeMap;

const FLEET: [(&str, &str, Option<&str>); 6] = [
    ("d0", "tight", Some("t")),
    ("d1", "tight", Some("t")),
    ("d2", "four", Some("t")),
    ("d3", "roomy", Some("u")),
    ("d4", "basic", Some("t")),
    ("d5", "noborrow", None),
];

#[derive(Debug, Clone)]
enum Step {
    Report {
        dev: usize,
        enc: bool,
        lat: bool,
        rate_kbps: u64,
        crash: bool,
        overuse: bool,
    },
    Tick {
        advance_min: u64,
    },
    Compliance {
        dev: usize,
    },
    Revoke {
        dev: usize,
        shard: usize,
    },
    Pin {
        dev: usize,
        shard: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..FLEET.len(), any::<bool>(), any::<bool>(), 0u64..3000, prop::bool::weighted(0.1), prop::bool::weighted(0.05))
            .prop_map(|(dev, enc, lat, rate_kbps, crash, overuse)| Step::Report { dev, enc, lat, rate_kbps, crash, overuse }),
        3 => (1u64..40).prop_map(|advance_min| Step::Tick { advance_min }),
        1 => (0..FLEET.len()).prop_map(|dev| Step::Compliance { dev }),
        1 => (0..FLEET.len(), 0usize..6).prop_map(|(dev, shard)| Step::Revoke { dev, shard }),
        1 => (0..FLEET.len(), 0usize..6).prop_map(|(dev, shard)| Step::Pin { dev, shard }),
    ]
}

const SHARDS: [&str; 6] = [
    "vpn-tunnel",
    "crypto-aes256gcm",
    "crypto-chacha20poly1305",
    "auth-psk",
    "qos-shaper",
    "qos-dscp",
];

/// Every event's time and the actions it gave, in order.
type ActionLog = Vec<(u64, Vec<Action>)>;

/// Runs the steps, checking the invariants after every event; returns every action.
fn run(steps: &[Step], check: bool) -> ActionLog {
    run_ticking(steps, check, false).0
}

/// [`run`], ticking either as the service does (only devices with
/// something due) or with the reference tick that visits every device;
/// also returns every device's final state (encoded) to compare.
fn run_ticking(steps: &[Step], check: bool, every_device: bool) -> (ActionLog, Vec<Vec<u8>>) {
    let mut e = engine_with(PolicyConfig::default());
    let ids: Vec<DeviceId> = FLEET.iter().map(|f| dev(f.0)).collect();
    let mut log = Vec::new();
    let mut now = 0u64;
    let mut seqs = [0u64; FLEET.len()];
    for (i, (_, tier, tenant)) in FLEET.iter().enumerate() {
        let out = e.handle(
            now,
            Event::Enrolled {
                device: ids[i].clone(),
                tier: (*tier).into(),
                tenant: tenant.map(Into::into),
            },
        );
        if check {
            check_all(&e, now, &out);
        }
        log.push((now, out));
        let config =
            shardline_allocator_core::policy::simulate::placeholder_device_config(e.catalog());
        let out = e.handle(
            now,
            Event::DeviceConfig {
                device: ids[i].clone(),
                config,
                changed: Default::default(),
            },
        );
        if check {
            check_all(&e, now, &out);
        }
        log.push((now, out));
    }
    for s in steps {
        let event = match s.clone() {
            Step::Report {
                dev,
                enc: en,
                lat: la,
                rate_kbps,
                crash,
                overuse,
            } => {
                seqs[dev] += 1;
                let mut classes = Vec::new();
                if en {
                    classes.push(secure(rate_kbps * 1000));
                }
                if la {
                    classes.push(calls(rate_kbps * 1000));
                }
                let mut st = healthy_statuses(&e, &ids[dev]);
                if crash {
                    st = crashed(st);
                }
                if overuse {
                    st.iter_mut().for_each(|x| x.cpu_permille *= 4);
                }
                Event::Report(report(&ids[dev], seqs[dev], classes, st, dev % 2 == 0))
            }
            Step::Tick { advance_min } => {
                now += advance_min * MIN;
                Event::Tick
            }
            Step::Compliance { dev } => Event::ComplianceEvent {
                device: ids[dev].clone(),
                kind: ComplianceKind::BadReportSignature,
            },
            Step::Revoke { dev, shard } => Event::Revoke {
                device: ids[dev].clone(),
                shard: SHARDS[shard].into(),
            },
            Step::Pin { dev, shard } => Event::Pin {
                device: ids[dev].clone(),
                shard: SHARDS[shard].into(),
            },
        };
        let out = if every_device && matches!(event, Event::Tick) {
            e.tick_visiting_every_device(now)
        } else {
            e.handle(now, event)
        };
        if check {
            check_all(&e, now, &out);
        }
        log.push((now, out));
    }
    let states = ids
        .iter()
        .map(|d| postcard::to_stdvec(e.device_state(d).expect("enrolled")).expect("encodes"))
        .collect();
    (log, states)
}

fn check_all(e: &Engine, now: u64, out: &[Action]) {
    let tiers = &e.agreements().tiers;
    let mut pool_used: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    let mut pool_budget: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    for s in e.devices() {
        let v = e.device(&s.device).unwrap();
        let tier = &tiers[&v.tier];
        let borrowed = |k: ShardKind| {
            v.borrowed
                .iter()
                .filter(|t| t.kind == k)
                .map(|t| t.units)
                .sum::<u32>()
        };
        let lent = |k: ShardKind| {
            v.lent
                .iter()
                .filter(|t| t.kind == k)
                .map(|t| t.units)
                .sum::<u32>()
        };
        for (used, budget, k) in [
            (s.compute_units, v.budget_compute_units, ShardKind::Compute),
            (s.data_units, v.budget_data_units, ShardKind::Data),
        ] {
            // Used ≤ effective budget ≤ tier budget + borrowed − lent.
            assert!(
                used <= budget,
                "{}: {k:?} used {used} > budget {budget}: {v:?}",
                s.device
            );
            assert!(
                budget + lent(k) <= tier.budget(k) + borrowed(k),
                "{}: {k:?} budget {budget} + lent {} > tier {} + borrowed {}",
                s.device,
                lent(k),
                tier.budget(k),
                borrowed(k)
            );
            assert!(lent(k) <= tier.budget(k));
        }
        for l in &v.leases {
            assert!(
                tier.capabilities.contains(&l.capability),
                "{} holds {} outside its tier",
                s.device,
                l.capability
            );
            assert!(
                l.expires_at_ms <= now + tier.lease_cap_ms,
                "lease beyond the tier cap"
            );
        }
        if let Some(t) = &v.tenant {
            let u = pool_used.entry(t.clone()).or_default();
            u[0] += u64::from(s.compute_units);
            u[1] += u64::from(s.data_units);
            let b = pool_budget.entry(t.clone()).or_default();
            b[0] += u64::from(tier.compute_units);
            b[1] += u64::from(tier.data_units);
        }
    }
    for (t, u) in &pool_used {
        let b = pool_budget[t];
        assert!(
            u[0] <= b[0] && u[1] <= b[1],
            "pool {t}: used {u:?} > budget {b:?}"
        );
    }
    for a in out {
        if let Action::Instruct {
            device,
            ops,
            expires_at_ms,
        } = a
        {
            assert!(*expires_at_ms > now);
            let tier = &tiers[&e
                .device(device)
                .map(|v| v.tier)
                .unwrap_or_else(|| "tight".into())];
            for op in ops {
                if let Operation::ActivateShard(act) = op {
                    assert!(
                        tier.capabilities.contains(&act.capability),
                        "activated {} outside the agreement",
                        act.capability
                    );
                    assert!(act.lease_expires_at_ms > now);
                    assert!(
                        act.lease_expires_at_ms - now <= tier.lease_cap_ms,
                        "lease over the tier cap"
                    );
                    assert!(act.priority <= tier.max_priority);
                    let spec = &e.catalog().shards[act.primary.shard.id()];
                    // Test devices report x86_64.
                    assert_eq!(
                        Some(act.primary.sha256),
                        spec.builds.for_arch(Some("x86_64"))
                    );
                    assert!(act.alternatives.len() <= shardline_shared::msg::MAX_ALTERNATIVES);
                    for alt in &act.alternatives {
                        let a = &e.catalog().shards[alt.shard.id()];
                        assert_eq!(a.capability, act.capability);
                        assert!(
                            a.units <= spec.units,
                            "a failover may not exceed the budget"
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_over_random_event_sequences(steps in prop::collection::vec(step(), 1..120)) {
        run(&steps, true);
    }

    /// The tick visits only devices with something due (one integer
    /// compared per device, no id cloned): the same actions and the same
    /// device states as visiting every device, on simulated time.
    #[test]
    fn due_scan_tick_equals_visiting_every_device(steps in prop::collection::vec(step(), 1..120)) {
        let due = run_ticking(&steps, false, false);
        let every = run_ticking(&steps, false, true);
        prop_assert_eq!(due, every);
    }

    #[test]
    fn same_events_same_clock_same_actions(steps in prop::collection::vec(step(), 1..80)) {
        let a = run(&steps, false);
        let b = run(&steps, false);
        prop_assert_eq!(a, b);
    }

    /// A class that comes and goes within the hysteresis window never makes
    /// the shards flap: after the first activation there is no deactivation.
    #[test]
    fn no_flapping_under_an_alternating_class(
        pattern in prop::collection::vec(any::<bool>(), 10..80),
        step_min in 1u64..5,
    ) {
        let hold = PolicyConfig::default().hysteresis_ms;
        // Limit gaps to less than the window: at most (hold / step) − 1 absent reports in a row.
        let max_gap = (hold / (step_min * MIN)).saturating_sub(1) as usize;
        let mut gap = 0;
        let pattern: Vec<bool> = pattern.into_iter().map(|p| {
            if p || gap >= max_gap { gap = 0; true } else { gap += 1; false }
        }).collect();
        let mut e = engine();
        let d = dev("alt");
        enroll(&mut e, 0, &d, "roomy", None);
        let mut active = false;
        for (i, on) in pattern.iter().enumerate() {
            let now = i as u64 * step_min * MIN;
            let classes = if *on { vec![calls(200_000)] } else { vec![] };
            let out = send(&mut e, now, &d, i as u64 + 1, classes);
            let ops = ops_for(&out, &d);
            if active {
                prop_assert!(deactivated(&ops).is_empty(), "flap at report {}: {:?}", i, ops);
            }
            active |= !activated(&ops).is_empty();
            let out = e.handle(now, Event::Tick);
            if active {
                prop_assert!(deactivated(&ops_for(&out, &d)).is_empty());
            }
        }
        prop_assert_eq!(e.device(&d).unwrap().flaps, 0);
    }
}
