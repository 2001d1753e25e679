//! Seed 002 in the engine (issue 17): borrowing frequency, returns, the
//! lender's QoS while lent, good-neighbour reports, consent and offers —
//! one test per rule case, then property tests of the invariants: a
//! device's own reports never move its reputation, one reporter's
//! influence is bounded, low-reputation colluders cannot push an honest
//! borrower below the borrow threshold, and loans never over-commit a
//! budget.
// Each test states only the settings it changes from the defaults.
#![allow(clippy::field_reassign_with_default)]

mod policy_common;
use policy_common::*;
use proptest::prelude::*;
use shardline_allocator_core::policy::lending::LendingConfig;
use shardline_allocator_core::policy::{
    Action, BorrowRefusal, ComplianceKind, Engine, Event, PolicyConfig, Refusal,
};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{
    ClassStats, HarmObservation, LendConsent, LendingReport, ShardKind, TrafficClass,
};

fn rep(e: &Engine, d: &DeviceId) -> f64 {
    e.device(d).unwrap().reputation
}

/// The lender's traffic (needs vpn: 2 of its 4 data units) with this loss.
fn lender_traffic(loss_permille: u16) -> Vec<ClassStats> {
    let mut c = secure(100_000);
    c.loss_permille = loss_permille;
    vec![c]
}

fn harm(loss_permille: u16) -> LendingReport {
    LendingReport {
        harm: vec![HarmObservation {
            class: TrafficClass::Sensitive,
            baseline_loss_permille: 2,
            loss_permille,
            baseline_rtt_p95_us: Some(40_000),
            rtt_p95_us: Some(40_000),
        }],
        consent: None,
    }
}

/// A report of `device` carrying `lending`, its shards healthy.
fn send_lending(
    e: &mut Engine,
    now: u64,
    device: &DeviceId,
    seq: u64,
    classes: Vec<ClassStats>,
    lending: LendingReport,
) -> Vec<Action> {
    let mut r = report(device, seq, classes, healthy_statuses(e, device), true);
    r.lending = lending;
    e.handle(now, Event::Report(r))
}

/// `lender` (tier four: 4 data units, uses 2) and `borrower` (tier tight:
/// 3, wants vpn + qos = 4) in tenant `t`; the borrower borrows 1 data unit
/// at `T0`. The lender's consent is `consent`.
const T0: u64 = 10 * MIN;

fn loan(config: PolicyConfig, consent: Option<LendConsent>) -> (Engine, DeviceId, DeviceId) {
    let mut e = engine_with(config);
    let (l, b) = (dev("lender"), dev("borrower"));
    enroll(&mut e, 0, &l, "four", Some("t"));
    enroll(&mut e, 0, &b, "tight", Some("t"));
    send_lending(
        &mut e,
        MIN,
        &l,
        1,
        lender_traffic(2),
        LendingReport {
            harm: vec![],
            consent,
        },
    );
    send(&mut e, 2 * MIN, &b, 1, vec![]);
    send(&mut e, T0, &b, 2, vec![secure(100_000), calls(100_000)]);
    (e, l, b)
}

/// A borrow threshold (40) the reports of these tests never cross, so the
/// borrower keeps its loan (and its lender keeps lending) throughout.
fn keeps_loans() -> PolicyConfig {
    let mut cfg = PolicyConfig::default();
    cfg.borrow_min_reputation = 40.0;
    cfg
}

fn borrow_refusal(e: &Engine, d: &DeviceId) -> Option<BorrowRefusal> {
    e.device(d)
        .unwrap()
        .refusals
        .values()
        .find_map(|r| match r {
            Refusal::BorrowRefused { reason, .. } => Some(*reason),
            _ => None,
        })
}

fn decisions(e: &Engine, d: &DeviceId) -> Vec<String> {
    e.device(d)
        .unwrap()
        .lending
        .decisions
        .iter()
        .map(|x| x.text.clone())
        .collect()
}

#[test]
fn a_fresh_device_borrows_and_both_records_say_so() {
    let (e, l, b) = loan(PolicyConfig::default(), None);
    let v = e.device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{:?}", v.refusals);
    assert_eq!(
        (v.lending.borrow_requests, v.lending.borrow_granted),
        (1, 1)
    );
    assert!(decisions(&e, &b)
        .iter()
        .any(|t| t.starts_with("borrowed 1 data unit(s) (1 from lender)")));
    let lv = e.device(&l).unwrap();
    assert_eq!(lv.lending.qos_at_lend_start, Some(998.0));
    assert!(decisions(&e, &l)
        .iter()
        .any(|t| t == "lent 1 data unit(s) to borrower"));
}

// ------------------------------------------------------ good-neighbour reports

#[test]
fn a_lenders_harm_report_moves_its_borrowers_reputation_with_the_reason() {
    // The borrower keeps its loan after the charge: losing it would end its
    // leases cleanly, and `clean_lease` would hide the charge in the score.
    let (mut e, l, b) = loan(keeps_loans(), None);
    let before = rep(&e, &b);
    // 10 % loss where its baseline was 0.2 %: severity 0.98, QoS score
    // 900, 98 below the loan's start.
    send_lending(&mut e, T0 + 2 * MIN, &l, 2, lender_traffic(100), harm(100));
    let v = e.device(&b).unwrap();
    assert!(v.lending.harm_received > 0.0);
    let weight = rep(&e, &l) / 100.0;
    let expected = 1.5 * 0.98 * weight;
    assert!(
        (v.lending.harm_received - expected).abs() < 0.02,
        "{} vs {expected}",
        v.lending.harm_received
    );
    assert!(
        rep(&e, &b) < before - expected + 0.05,
        "{} {before}",
        rep(&e, &b)
    );
    let text = decisions(&e, &b).join("\n");
    assert!(
        text.contains("lender lender reported its QoS worse than its baseline"),
        "{text}"
    );
    assert_eq!(e.device(&l).unwrap().lending.harm_accepted, 1);
    // Announced with its reason.
    assert!(v
        .reputation_history
        .iter()
        .any(|h| h.reason == "neighbour_harm"));
}

/// A reporter, its traffic and its lending report.
type Sent = (DeviceId, Vec<ClassStats>, LendingReport);

/// One row per reason a harm report moves nothing; each is counted on the
/// reporter under its name and nobody's reputation moves.
#[test]
fn ignored_harm_reports_table() {
    struct Row {
        case: &'static str,
        /// Runs on a fresh loan; returns the reporter and its report.
        setup: fn(&mut Engine, &DeviceId, &DeviceId) -> Sent,
        reason: &'static str,
    }
    let rows = [
        Row {
            case: "not lending: a device with no loan reports harm",
            setup: |e, _, _| {
                let o = dev("other");
                enroll(e, 0, &o, "four", Some("t"));
                (o, lender_traffic(100), harm(100))
            },
            reason: "not_lending",
        },
        Row {
            case: "the borrower reports harm (it lends nothing)",
            setup: |_, _, b| (b.clone(), lender_traffic(100), harm(100)),
            reason: "not_lending",
        },
        Row {
            case: "no observation worse than its baseline",
            setup: |_, l, _| (l.clone(), lender_traffic(100), harm(2)),
            reason: "no_harm",
        },
        Row {
            case: "its QoS score as the engine computes it did not drop",
            setup: |_, l, _| (l.clone(), lender_traffic(2), harm(100)),
            reason: "not_corroborated",
        },
        Row {
            case: "a reporter below the reputation threshold",
            setup: |e, l, _| {
                e.handle(
                    T0 + MIN,
                    Event::ComplianceEvent {
                        device: l.clone(),
                        kind: ComplianceKind::ReplayedReport,
                    },
                );
                (l.clone(), lender_traffic(100), harm(100))
            },
            reason: "low_reputation",
        },
    ];
    for row in rows {
        let (mut e, l, b) = loan(PolicyConfig::default(), None);
        let (reporter, traffic, lr) = (row.setup)(&mut e, &l, &b);
        let others: Vec<(DeviceId, f64)> = e
            .devices()
            .iter()
            .filter(|s| s.device != reporter)
            .map(|s| (s.device.clone(), s.reputation))
            .collect();
        send_lending(&mut e, T0 + 2 * MIN, &reporter, 50, traffic, lr);
        let v = e.device(&reporter).unwrap();
        assert_eq!(
            v.lending.harm_ignored.get(row.reason),
            Some(&1),
            "{}: {:?}",
            row.case,
            v.lending.harm_ignored
        );
        assert!(
            decisions(&e, &reporter)
                .iter()
                .any(|t| t.starts_with("harm report ignored")),
            "{}",
            row.case
        );
        for (d, r) in others {
            let now = e.device(&d).unwrap();
            assert_eq!(now.lending.harm_received, 0.0, "{}: {d}", row.case);
            // Decay only (toward 50): no step down.
            assert!(now.reputation >= r.min(50.0) - 1e-9, "{}: {d}", row.case);
        }
    }
}

#[test]
fn one_reporter_takes_at_most_its_cap_per_window() {
    let (mut e, l, b) = loan(keeps_loans(), None);
    for i in 0..20 {
        send_lending(
            &mut e,
            T0 + (2 + i) * MIN,
            &l,
            2 + i,
            lender_traffic(1000),
            harm(1000),
        );
    }
    let v = e.device(&b).unwrap();
    let cap = LendingConfig::default().per_reporter_cap;
    assert!(v.lending.harm_received <= cap + 1e-9);
    assert!(e
        .device(&l)
        .unwrap()
        .lending
        .harm_ignored
        .contains_key("capped"));
}

// ----------------------------------------------------------------- consent

#[test]
fn consent_table() {
    let c = |max_data_units, from_hour_utc, to_hour_utc| LendConsent {
        max_compute_units: 4,
        max_data_units,
        from_hour_utc,
        to_hour_utc,
    };
    // T0 is 00:10 UTC.
    let rows: [(&str, Option<LendConsent>, Option<BorrowRefusal>); 4] = [
        ("no consent policy: lends its spare", None, None),
        ("consents to 1 data unit", Some(c(1, 0, 0)), None),
        (
            "consents to none",
            Some(c(0, 0, 0)),
            Some(BorrowRefusal::NoConsent),
        ),
        (
            "outside its hours",
            Some(c(4, 8, 18)),
            Some(BorrowRefusal::NoConsent),
        ),
    ];
    for (case, consent, refusal) in rows {
        let (e, _, b) = loan(PolicyConfig::default(), consent);
        assert_eq!(borrow_refusal(&e, &b), refusal, "{case}");
        if refusal.is_some() {
            let text = decisions(&e, &b).join("\n");
            assert!(text.contains("lender consents to lend"), "{case}: {text}");
            let reasons = e.device(&b).unwrap().refusal_reasons;
            assert!(
                reasons.values().any(|r| r.contains("do not consent")),
                "{case}: {reasons:?}"
            );
        } else {
            assert_eq!(e.device(&b).unwrap().borrowed.len(), 1, "{case}");
        }
    }
}

// ------------------------------------------------------ frequency and returns

#[test]
fn borrowing_too_often_is_refused_and_charged_once() {
    let mut cfg = keeps_loans();
    cfg.lending.max_borrows_per_hour = 1;
    cfg.borrow_ms = 2 * MIN;
    let (mut e, _, b) = loan(cfg, None);
    assert_eq!(e.device(&b).unwrap().borrowed.len(), 1);
    // The loan expires; the borrower still wants the units and asks again
    // in the same tick.
    let end = T0 + 2 * MIN;
    let before = rep(&e, &b);
    e.handle(end, Event::Tick);
    assert!(e.device(&b).unwrap().borrowed.is_empty());
    assert_eq!(borrow_refusal(&e, &b), Some(BorrowRefusal::TooFrequent));
    let after = rep(&e, &b);
    let churn = e
        .device(&b)
        .unwrap()
        .reputation_history
        .iter()
        .any(|h| h.reason == "borrow_churn");
    assert!(churn, "{before} -> {after}");
    // Asked again: refused, not charged again.
    send(
        &mut e,
        end + 2 * MIN,
        &b,
        4,
        vec![secure(100_000), calls(100_000)],
    );
    assert!(rep(&e, &b) > after - 0.1);
    let v = e.device(&b).unwrap();
    assert_eq!(v.lending.borrow_granted, 1);
    assert!(v.lending.borrow_refused >= 2);
    assert!(decisions(&e, &b)
        .iter()
        .any(|t| t.contains("1 loans granted this hour (limit 1)")));
}

/// One row per return case: the borrower's first report after the grace
/// either shows what the loan paid for stopped (timely) or still running
/// (late).
#[test]
fn return_table() {
    for (case, keep_running, timely) in [("stopped", false, true), ("still running", true, false)] {
        // One loan an hour: the borrower cannot borrow the units again
        // at the loan's end, so it must give them back.
        let mut cfg = keeps_loans();
        cfg.borrow_ms = 2 * MIN;
        cfg.lending.max_borrows_per_hour = 1;
        let (mut e, _, b) = loan(cfg, None);
        let with_loan = healthy_statuses(&e, &b);
        let end = T0 + 2 * MIN;
        e.handle(end, Event::Tick);
        assert!(
            e.device(&b).unwrap().lending.pending_return.is_some(),
            "{case}"
        );
        let due = end + LendingConfig::default().return_grace_ms;
        let statuses = if keep_running {
            with_loan
        } else {
            healthy_statuses(&e, &b)
        };
        let r = report(&b, 10, vec![secure(100_000)], statuses, true);
        e.handle(due, Event::Report(r));
        let v = e.device(&b).unwrap();
        assert!(v.lending.pending_return.is_none(), "{case}");
        assert_eq!(
            (v.lending.returns_timely, v.lending.returns_late),
            if timely { (1, 0) } else { (0, 1) },
            "{case}"
        );
        let text = decisions(&e, &b).join("\n");
        assert!(
            text.contains(if timely {
                "on time"
            } else {
                "late or incomplete return"
            }),
            "{case}: {text}"
        );
    }
}

#[test]
fn a_loan_that_hurt_its_lender_is_on_the_borrowers_record() {
    let mut cfg = PolicyConfig::default();
    cfg.borrow_ms = 4 * MIN;
    let (mut e, l, b) = loan(cfg, None);
    // The lender's QoS score falls while it lends (no harm report needed).
    send_lending(
        &mut e,
        T0 + MIN,
        &l,
        2,
        lender_traffic(200),
        LendingReport::default(),
    );
    e.handle(T0 + 4 * MIN, Event::Tick);
    let v = e.device(&b).unwrap();
    assert_eq!(v.lending.loans_harmful, 1);
    assert!(decisions(&e, &b)
        .iter()
        .any(|t| t.contains("the lender's QoS score fell by 198")));
    // The borrower, still short, borrowed again at once: the new loan's
    // baseline is the lender's score now, not the old one.
    assert_eq!(e.device(&l).unwrap().lending.qos_at_lend_start, Some(800.0));
}

// ------------------------------------------------------------------ offers

#[test]
fn units_left_spare_are_offered_and_offering_lenders_go_first() {
    let mut e = engine();
    let (a, z, b) = (dev("a-lender"), dev("z-lender"), dev("borrower"));
    for d in [&a, &z] {
        enroll(&mut e, 0, d, "four", Some("t"));
    }
    enroll(&mut e, 0, &b, "tight", Some("t"));
    // Both lenders use vpn (2 spare each); only z reports for 15 minutes.
    send(&mut e, 0, &a, 1, vec![secure(100_000)]);
    send(&mut e, 0, &z, 1, vec![secure(100_000)]);
    let underuse = LendingConfig::default().underuse_ms;
    send(&mut e, underuse, &z, 2, vec![secure(100_000)]);
    let zv = e.device(&z).unwrap();
    assert_eq!(zv.lending.offer, [0, 2]);
    assert!(decisions(&e, &z)
        .iter()
        .any(|t| t.starts_with("offers 0 compute and 2 data unit(s)")));
    assert_eq!(e.device(&a).unwrap().lending.offer, [0, 0]);
    // The borrower takes from the offering lender, though `a` sorts first.
    send(
        &mut e,
        underuse + MIN,
        &b,
        1,
        vec![secure(100_000), calls(100_000)],
    );
    let v = e.device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{:?}", v.refusals);
    assert_eq!(v.borrowed[0].from, z);
}

#[test]
fn the_device_view_shows_the_lending_record() {
    let (e, _, b) = loan(PolicyConfig::default(), None);
    let json = serde_json::to_value(e.device(&b).unwrap()).unwrap();
    assert_eq!(json["lending"]["borrow_granted"], 1);
    assert!(!json["lending"]["decisions"].as_array().unwrap().is_empty());
}

// --------------------------------------------------------------- properties

/// A harm report a device might send: any class, any numbers.
fn any_harm() -> impl Strategy<Value = LendingReport> {
    (
        prop::collection::vec(
            (
                any::<u16>(),
                any::<u16>(),
                any::<Option<u32>>(),
                any::<Option<u32>>(),
            ),
            0..12,
        ),
        any::<bool>(),
    )
        .prop_map(|(obs, consent)| LendingReport {
            harm: obs
                .into_iter()
                .map(|(b, l, br, r)| HarmObservation {
                    class: TrafficClass::Bulk,
                    baseline_loss_permille: b,
                    loss_permille: l,
                    baseline_rtt_p95_us: br,
                    rtt_p95_us: r,
                })
                .collect(),
            consent: consent.then_some(LendConsent {
                max_compute_units: 1,
                max_data_units: 1,
                from_hour_utc: 0,
                to_hour_utc: 0,
            }),
        })
}

/// Used units ≤ effective budget per device; lent ≤ quota; every loan
/// appears on both sides; the pool never uses more than its tiers' budgets.
fn check_budgets(e: &Engine) {
    let tiers = &e.agreements().tiers;
    let mut used_pool = [0u64; 2];
    let mut budget_pool = [0u64; 2];
    for s in e.devices() {
        let v = e.device(&s.device).unwrap();
        let tier = &tiers[&v.tier];
        assert!(s.compute_units <= v.budget_compute_units, "{v:?}");
        assert!(s.data_units <= v.budget_data_units, "{v:?}");
        for t in &v.lent {
            let other = e.device(&t.to).unwrap();
            // The same loan: a shift's `evaluated` mark lives on the
            // recipient's copy only.
            let same = |b: &shardline_allocator_core::policy::Transfer| {
                (&b.from, &b.to, b.kind, b.units, b.since_ms, b.expires_at_ms)
                    == (&t.from, &t.to, t.kind, t.units, t.since_ms, t.expires_at_ms)
            };
            assert!(
                other.borrowed.iter().any(same),
                "a loan on one side only: {t:?}"
            );
        }
        for k in [ShardKind::Compute, ShardKind::Data] {
            let lent: u32 = v.lent.iter().filter(|t| t.kind == k).map(|t| t.units).sum();
            assert!(lent <= tier.budget(k));
        }
        used_pool[0] += u64::from(s.compute_units);
        used_pool[1] += u64::from(s.data_units);
        budget_pool[0] += u64::from(tier.compute_units);
        budget_pool[1] += u64::from(tier.data_units);
    }
    assert!(used_pool[0] <= budget_pool[0] && used_pool[1] <= budget_pool[1]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A device's own reports — whatever harm they claim, lending or not —
    /// move its reputation exactly as the same report without them.
    #[test]
    fn a_devices_own_harm_reports_never_move_its_reputation(
        lr in any_harm(),
        lender_reports in any::<bool>(),
        loss in 0u16..1000,
    ) {
        let run = |with: bool| {
            let (mut e, l, b) = loan(PolicyConfig::default(), None);
            let me = if lender_reports { l } else { b };
            let mut sent = lr.clone();
            if !with {
                sent.harm.clear();
            }
            send_lending(&mut e, T0 + 2 * MIN, &me, 77, lender_traffic(loss), sent);
            rep(&e, &me)
        };
        prop_assert_eq!(run(true), run(false));
    }

    /// However many harm reports one lender sends, at whatever times, its
    /// borrower loses at most `per_reporter_cap` per window to it.
    #[test]
    fn one_reporters_influence_is_bounded(
        reports in prop::collection::vec((1u64..30, any_harm(), 0u16..1000), 1..30),
    ) {
        let cfg = keeps_loans();
        let (mut e, l, b) = loan(cfg.clone(), None);
        let mut now = T0;
        let mut lowest = rep(&e, &b);
        let start = lowest;
        for (i, (dt, lr, loss)) in reports.into_iter().enumerate() {
            now += dt * MIN;
            send_lending(&mut e, now, &l, 10 + i as u64, lender_traffic(loss), lr);
            let v = e.device(&b).unwrap();
            prop_assert!(
                v.lending.harm_by_reporter.values().all(|x| *x <= cfg.lending.per_reporter_cap + 1e-9)
            );
            prop_assert!(v.lending.harm_received <= cfg.lending.per_borrower_cap + 1e-9);
            lowest = lowest.min(v.reputation);
        }
        // Within one window (≤ 15 h here, so at most three), decay only
        // pulls toward 50 and the borrower's own reports are not sent.
        let windows = 1.0 + ((now - T0) / cfg.lending.harm_window_ms) as f64;
        prop_assert!(
            lowest >= start.min(50.0) - windows * cfg.lending.per_reporter_cap - 1e-6,
            "{} from {}", lowest, start
        );
    }

    /// Colluders whose reputation is below `reporter_min_reputation` lend
    /// to an honest borrower and report harm as they like: the borrower's
    /// reputation never goes below the borrow threshold.
    #[test]
    fn low_reputation_colluders_cannot_push_an_honest_borrower_below_the_threshold(
        colluders in 1usize..4,
        reports in prop::collection::vec((0usize..4, 1u64..20, any_harm(), 0u16..1000), 1..30),
    ) {
        let cfg = PolicyConfig::default();
        let mut e = engine_with(cfg.clone());
        let b = dev("honest");
        let cs: Vec<DeviceId> = (0..colluders).map(|i| dev(&format!("c{i}"))).collect();
        for c in &cs {
            enroll(&mut e, 0, c, "four", Some("t"));
            send(&mut e, MIN, c, 1, vec![secure(100_000)]);
            // Below 50, still trusted to lend (quota intact above 45).
            e.handle(MIN, Event::ComplianceEvent { device: c.clone(), kind: ComplianceKind::ReplayedReport });
        }
        enroll(&mut e, 0, &b, "tight", Some("t"));
        send(&mut e, 2 * MIN, &b, 1, vec![secure(100_000), calls(100_000)]);
        prop_assert_eq!(e.device(&b).unwrap().borrowed.len(), 1, "borrows from a colluder");
        let mut now = 2 * MIN;
        let mut seq = 10;
        for (who, dt, lr, loss) in reports {
            now += dt * MIN;
            seq += 1;
            let c = &cs[who % colluders];
            send_lending(&mut e, now, c, seq, lender_traffic(loss), lr);
            send(&mut e, now, &b, seq, vec![secure(100_000), calls(100_000)]);
            prop_assert!(
                rep(&e, &b) >= cfg.borrow_min_reputation,
                "honest borrower at {}", rep(&e, &b)
            );
            prop_assert_eq!(e.device(&b).unwrap().lending.harm_received, 0.0);
        }
    }

    /// Random lending traffic — consents, harm reports, need changes,
    /// ticks — never over-commits a budget with loans.
    #[test]
    fn loans_never_over_commit_a_budget(
        steps in prop::collection::vec((0usize..4, 0u8..4, any_harm(), 1u64..10), 1..40),
    ) {
        let mut cfg = PolicyConfig::default();
        cfg.borrow_ms = 5 * MIN;
        let mut e = engine_with(cfg);
        let fleet = [("d0", "tight"), ("d1", "tight"), ("d2", "four"), ("d3", "four")];
        for (d, tier) in fleet {
            enroll(&mut e, 0, &dev(d), tier, Some("t"));
        }
        let mut now = MIN;
        for (i, (who, what, lr, dt)) in steps.into_iter().enumerate() {
            now += dt * MIN;
            let d = dev(fleet[who].0);
            let seq = 1 + i as u64;
            match what {
                0 => { e.handle(now, Event::Tick); }
                1 => { send_lending(&mut e, now, &d, seq, vec![secure(100_000)], lr); }
                2 => { send_lending(&mut e, now, &d, seq, vec![secure(100_000), calls(100_000)], lr); }
                _ => { send_lending(&mut e, now, &d, seq, vec![], lr); }
            }
            check_budgets(&e);
        }
    }
}
