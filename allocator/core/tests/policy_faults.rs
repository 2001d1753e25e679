//! Issue 15: operator faults are not device misbehaviour. Start failures
//! never cost reputation, a catalog entry failing on several devices is
//! marked failing and planned around, one device alone cannot mark it, a
//! runtime crash still counts, refusals carry their reasons, and two agents
//! sharing one identity are flagged instead of penalised. Simulated time.

mod policy_common;
use policy_common::*;
use shardline_allocator_core::policy::{
    Action, ComplianceKind, Engine, Event, PolicyConfig, Refusal,
};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{AckOutcome, RejectReason, ShardFailure, ShardState, ShardStatus};

const VPN_AES: [&str; 3] = ["auth-psk", "crypto-aes256gcm", "vpn-tunnel"];

fn rep(e: &Engine, d: &DeviceId) -> f64 {
    e.device(d).unwrap().reputation
}

/// Not lowered by a penalty: reputation above neutral decays a little as
/// simulated time passes, penalties take whole points.
fn not_penalised(before: f64, after: f64) -> bool {
    after > before - 0.5
}

/// Enrols `d` and grants it the vpn (aes) at t=0, acknowledged.
fn with_vpn(e: &mut Engine, d: &DeviceId) {
    enroll(e, 0, d, "roomy", None);
    send(e, 0, d, 1, vec![secure(100_000)]);
    e.handle(
        0,
        Event::Ack {
            device: d.clone(),
            seq: 1,
            outcome: AckOutcome::Applied,
        },
    );
    assert_eq!(profile(e, d), strs(&VPN_AES));
}

/// The device's statuses with `shard` failed once with `failure`.
fn failing(
    e: &Engine,
    d: &DeviceId,
    shard: &str,
    failure: ShardFailure,
    restart: bool,
) -> Vec<ShardStatus> {
    let mut s = healthy_statuses(e, d);
    for x in &mut s {
        if x.shard.id() == shard {
            if restart {
                x.restarts += 1;
            } else {
                x.state = ShardState::Stopped;
            }
            x.last_failure = Some(failure.clone());
        }
    }
    s
}

fn init_failed() -> ShardFailure {
    ShardFailure::InitFailed {
        reason: "missing key psk".into(),
    }
}

fn failing_marks(out: &[Action]) -> Vec<(String, String)> {
    out.iter()
        .filter_map(|a| match a {
            Action::CatalogEntryFailing { shard, arch, .. } => Some((shard.clone(), arch.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn start_failures_never_lower_reputation() {
    let cases: Vec<(&str, ShardFailure, bool)> = vec![
        ("init failed", init_failed(), true),
        (
            "load refused (digest for another arch)",
            ShardFailure::LoadRefused {
                reason: "sha256 mismatch".into(),
            },
            false,
        ),
        ("over limit at start", ShardFailure::OverLimit, true),
        ("crash at start", ShardFailure::Crashed { signal: 11 }, true),
    ];
    for (what, failure, restart) in cases {
        let mut e = engine();
        let d = dev("s");
        with_vpn(&mut e, &d);
        let before = rep(&e, &d);
        let mut s = failing(&e, &d, "auth-psk", failure, restart);
        // The agent counts a failed start among the shard's errors too (the
        // packaged acceptance test's aarch64 device was charged
        // `error_rate` for exactly that).
        for x in &mut s {
            if x.shard.id() == "auth-psk" {
                x.errors += 50;
            }
        }
        let out = e.handle(
            MIN,
            Event::Report(report(&d, 2, vec![secure(100_000)], s, true)),
        );
        assert!(
            not_penalised(before, rep(&e, &d)),
            "{what}: {before} -> {}",
            rep(&e, &d)
        );
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::ReputationChanged { new, old, .. } if new < old)),
            "{what}: {out:?}"
        );
        // Avoided on the device, with the failure named; auth-psk has no
        // alternative, so the vpn is refused for now.
        let v = e.device(&d).unwrap();
        assert!(v.start_failures.contains_key("auth-psk"), "{what}");
        match &v.refusals["vpn"] {
            Refusal::StartFailed { shard, .. } => assert_eq!(shard, "auth-psk", "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            v.refusal_reasons["vpn"].starts_with("start failure of auth-psk on this device"),
            "{what}: {}",
            v.refusal_reasons["vpn"]
        );
        // Once alone, it does not mark the entry failing.
        assert!(failing_marks(&out).is_empty(), "{what}");
    }
}

#[test]
fn limits_out_of_range_and_named_load_failures_in_acks_are_not_charged() {
    let mut e = engine();
    let d = dev("a");
    enroll(&mut e, 0, &d, "roomy", None);
    send(&mut e, 0, &d, 1, vec![secure(100_000)]);
    e.handle(
        0,
        Event::Sent {
            device: d.clone(),
            seq: 1,
        },
    );
    let before = rep(&e, &d);
    e.handle(
        MIN,
        Event::Ack {
            device: d.clone(),
            seq: 1,
            outcome: AckOutcome::Rejected(RejectReason::LimitsOutOfRange),
        },
    );
    assert!(not_penalised(before, rep(&e, &d)));
    let v = e.device(&d).unwrap();
    assert!(v.start_failures.contains_key("vpn-tunnel"), "{v:?}");
    assert_eq!(v.start_failures["vpn-tunnel"].reason, "LimitsOutOfRange");
}

#[test]
fn an_entry_failing_on_two_devices_is_marked_and_its_alternative_planned() {
    let mut e = engine();
    let (a, b, c) = (dev("fa"), dev("fb"), dev("fc"));
    with_vpn(&mut e, &a);
    with_vpn(&mut e, &b);
    let before = (rep(&e, &a), rep(&e, &b));
    let s = failing(&e, &a, "crypto-aes256gcm", init_failed(), true);
    let out = e.handle(
        MIN,
        Event::Report(report(&a, 2, vec![secure(100_000)], s, true)),
    );
    assert!(failing_marks(&out).is_empty(), "one device is not enough");
    // The device itself already gets the alternative.
    assert!(profile(&e, &a).contains(&"crypto-chacha20poly1305".to_owned()));
    let s = failing(&e, &b, "crypto-aes256gcm", init_failed(), true);
    let out = e.handle(
        MIN,
        Event::Report(report(&b, 2, vec![secure(100_000)], s, true)),
    );
    assert_eq!(
        failing_marks(&out),
        vec![("crypto-aes256gcm".to_owned(), "x86_64".to_owned())]
    );
    assert!(not_penalised(before.0, rep(&e, &a)) && not_penalised(before.1, rep(&e, &b)));
    let mark = e
        .catalog_health()
        .failing_on("crypto-aes256gcm", "x86_64")
        .cloned()
        .expect("marked");
    assert_eq!(mark.devices.len(), 2);
    assert!(mark.reason.contains("InitFailed missing key psk"));
    // A third device (same architecture, AES in hardware) is planned the
    // alternative from its first report on.
    enroll(&mut e, 2 * MIN, &c, "roomy", None);
    send(&mut e, 2 * MIN, &c, 1, vec![secure(100_000)]);
    assert_eq!(
        profile(&e, &c),
        strs(&["auth-psk", "crypto-chacha20poly1305", "vpn-tunnel"])
    );
    // Another architecture is not affected.
    let d = dev("fd");
    enroll(&mut e, 2 * MIN, &d, "roomy", None);
    let mut r = report(&d, 1, vec![secure(100_000)], vec![], true);
    r.resources.arch = "aarch64".into();
    e.handle(2 * MIN, Event::Report(r));
    assert!(profile(&e, &d).contains(&"crypto-aes256gcm".to_owned()));
    // The operator retries it: the mark is gone and it is planned again.
    e.handle(
        3 * MIN,
        Event::RetryCatalogEntry {
            shard: "crypto-aes256gcm".into(),
        },
    );
    assert!(e
        .catalog_health()
        .failing_on("crypto-aes256gcm", "x86_64")
        .is_none());
    send(&mut e, 4 * MIN, &c, 2, vec![secure(100_000)]);
    assert_eq!(profile(&e, &c), strs(&VPN_AES));
}

#[test]
fn a_failing_entry_without_alternative_is_refused_with_its_reason() {
    let mut e = engine();
    let (a, b, c) = (dev("na"), dev("nb"), dev("nc"));
    for d in [&a, &b] {
        with_vpn(&mut e, d);
        let s = failing(&e, d, "auth-psk", init_failed(), true);
        e.handle(
            MIN,
            Event::Report(report(d, 2, vec![secure(100_000)], s, true)),
        );
    }
    enroll(&mut e, 2 * MIN, &c, "roomy", None);
    send(&mut e, 2 * MIN, &c, 1, vec![secure(100_000)]);
    let v = e.device(&c).unwrap();
    assert!(matches!(v.refusals["vpn"], Refusal::CatalogFailing { .. }));
    assert_eq!(
        v.refusal_reasons["vpn"],
        "failing catalog entry auth-psk on x86_64: InitFailed missing key psk"
    );
    assert!(v.leases.iter().all(|l| l.capability != "vpn"));
}

#[test]
fn one_device_alone_cannot_mark_an_entry_failing() {
    let mut e = engine();
    let a = dev("lone");
    with_vpn(&mut e, &a);
    let mut out = Vec::new();
    for i in 0..10u64 {
        let s = failing(&e, &a, "crypto-aes256gcm", init_failed(), true);
        out.extend(e.handle(
            (i + 1) * MIN,
            Event::Report(report(&a, i + 2, vec![secure(100_000)], s, true)),
        ));
    }
    assert!(failing_marks(&out).is_empty());
    assert!(e.catalog_health().failing.is_empty());
}

#[test]
fn failures_on_few_devices_do_not_mark_an_entry_that_runs_fine_on_more() {
    let mut e = engine_with(PolicyConfig::default());
    let fine: Vec<DeviceId> = (0..3).map(|i| dev(&format!("ok{i}"))).collect();
    for d in &fine {
        with_vpn(&mut e, d);
        for s in 2..5u64 {
            send(&mut e, s * MIN, d, s, vec![secure(100_000)]);
        }
    }
    let mut out = Vec::new();
    for name in ["bad0", "bad1"] {
        let d = dev(name);
        with_vpn(&mut e, &d);
        let s = failing(&e, &d, "crypto-aes256gcm", ShardFailure::OverLimit, true);
        out.extend(e.handle(
            5 * MIN,
            Event::Report(report(&d, 2, vec![secure(100_000)], s, true)),
        ));
    }
    assert!(failing_marks(&out).is_empty(), "{out:?}");
}

#[test]
fn a_runtime_crash_after_running_fine_still_counts() {
    let mut e = engine();
    let d = dev("rt");
    with_vpn(&mut e, &d);
    send(&mut e, 2 * MIN, &d, 2, vec![secure(100_000)]);
    send(&mut e, 3 * MIN, &d, 3, vec![secure(100_000)]);
    let before = rep(&e, &d);
    let s = crashed(healthy_statuses(&e, &d));
    let out = e.handle(
        4 * MIN,
        Event::Report(report(&d, 4, vec![secure(100_000)], s, true)),
    );
    assert!(rep(&e, &d) < before);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::ReputationChanged { reason, .. } if reason == "shard_crash")));
    assert!(e.device(&d).unwrap().start_failures.is_empty());
}

#[test]
fn refusals_explain_budget_and_borrowing_in_words() {
    let mut e = engine();
    let d = dev("nb");
    enroll(&mut e, 0, &d, "noborrow", Some("t"));
    send(&mut e, 0, &d, 1, vec![secure(100_000), calls(100_000)]);
    let v = e.device(&d).unwrap();
    assert_eq!(
        v.refusal_reasons["qos"],
        "borrow refused: the tier forbids borrowing (data 1 unit short)"
    );
}

// ----------------------------------------------------------- duplicates

fn stale(d: &DeviceId, seq: u64, window_start_ms: u64, rate: u64) -> Event {
    let mut r = report(d, seq, vec![secure(rate)], vec![], true);
    r.window_start_ms = window_start_ms;
    Event::StaleReport(r)
}

#[test]
fn two_agents_with_one_identity_are_flagged_and_replays_not_charged() {
    let mut e = engine();
    let d = dev("twin");
    enroll(&mut e, 0, &d, "roomy", None);
    // Agent A's stream: seq 1..=5, one-minute windows.
    for s in 1..=5u64 {
        let mut r = report(&d, s, vec![secure(100_000)], vec![], true);
        r.window_start_ms = (s - 1) * MIN;
        e.handle(s * MIN, Event::Report(r));
    }
    // A redelivery of an accepted report, and an old report replayed: no evidence.
    let mut same = report(&d, 5, vec![secure(100_000)], vec![], true);
    same.window_start_ms = 4 * MIN;
    assert!(e.handle(6 * MIN, Event::StaleReport(same)).is_empty());
    assert!(e.handle(6 * MIN, stale(&d, 0, 0, 1)).is_empty());
    assert!(e.device(&d).unwrap().duplicate.is_none());
    // Agent B: its own, lower seq stream with fresh windows.
    let out1 = e.handle(6 * MIN, stale(&d, 3, 5 * MIN, 7_000));
    assert!(out1.is_empty(), "one piece of evidence only: {out1:?}");
    let out = e.handle(7 * MIN, stale(&d, 4, 6 * MIN, 7_000));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::DuplicateSuspected { .. })),
        "{out:?}"
    );
    assert!(out.iter().any(|a| matches!(a, Action::Alert { .. })));
    let flag = e.device(&d).unwrap().duplicate.expect("flagged");
    assert!(flag.reason.contains("seq 4"), "{flag:?}");
    // While flagged: no replay penalty.
    let before = rep(&e, &d);
    e.handle(
        8 * MIN,
        Event::ComplianceEvent {
            device: d.clone(),
            kind: ComplianceKind::ReplayedReport,
        },
    );
    assert!(not_penalised(before, rep(&e, &d)));
    // Other penalties still apply (the exemption is bounded).
    e.handle(
        8 * MIN,
        Event::ComplianceEvent {
            device: d.clone(),
            kind: ComplianceKind::BadReportSignature,
        },
    );
    assert!(rep(&e, &d) < before - 5.0);
    // The flag expires on its own.
    let hold = PolicyConfig::default().faults.duplicate_hold_ms;
    let mut r = report(&d, 6, vec![secure(100_000)], vec![], true);
    r.window_start_ms = 7 * MIN + hold;
    e.handle(8 * MIN + hold, Event::Report(r));
    assert!(e.device(&d).unwrap().duplicate.is_none());
    // Unflagged, a replay is charged again.
    let before = rep(&e, &d);
    e.handle(
        9 * MIN + hold,
        Event::ComplianceEvent {
            device: d.clone(),
            kind: ComplianceKind::ReplayedReport,
        },
    );
    assert!(rep(&e, &d) < before - 1.0);
}

#[test]
fn a_seq_signed_twice_with_different_content_is_evidence() {
    let mut e = engine();
    let d = dev("eq");
    enroll(&mut e, 0, &d, "roomy", None);
    for s in 1..=3u64 {
        let mut r = report(&d, s, vec![secure(100_000)], vec![], true);
        r.window_start_ms = (s - 1) * MIN;
        e.handle(s * MIN, Event::Report(r));
    }
    // Same seqs, old windows, different content.
    e.handle(4 * MIN, stale(&d, 2, MIN, 5_000));
    e.handle(4 * MIN, stale(&d, 3, 2 * MIN, 5_000));
    let flag = e.device(&d).unwrap().duplicate.expect("flagged");
    assert!(flag.reason.contains("signed twice"), "{flag:?}");
}

#[test]
fn failing_marks_persist_and_clear_when_the_entry_changes() {
    let mut e = engine();
    for name in ["pa", "pb"] {
        let d = dev(name);
        with_vpn(&mut e, &d);
        let s = failing(&e, &d, "crypto-aes256gcm", init_failed(), true);
        e.handle(
            MIN,
            Event::Report(report(&d, 2, vec![secure(100_000)], s, true)),
        );
    }
    assert!(e.take_health_dirty(), "the new mark is to be persisted");
    let bytes = postcard::to_stdvec(e.catalog_health()).unwrap();
    // Another engine (a restart) with the same catalog keeps the mark.
    let mut again = engine();
    again.restore_catalog_health(postcard::from_bytes(&bytes).unwrap());
    assert!(again
        .catalog_health()
        .failing_on("crypto-aes256gcm", "x86_64")
        .is_some());
    // The operator fixes the entry's config: the mark is cleared.
    let mut fixed = again.catalog().clone();
    if let Some(s) = fixed.shards.get_mut("crypto-aes256gcm") {
        s.config = b"psk_file = \"/etc/psk\"".to_vec();
    }
    again.replace_catalog(fixed);
    assert!(again.catalog_health().failing.is_empty());
    assert!(again.take_health_dirty());
}
