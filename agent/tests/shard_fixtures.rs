//! Misbehaving shards: a segfault, a panic, a hang, a memory hog, a library
//! built for another ABI version and one whose hash does not match. The agent
//! (this test process, which runs the Supervisor) survives each, reports each
//! within one second, restarts with backoff and quarantines; a failing shard
//! with an alternative fails over to it.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::{HostEvent, ShardSpec, Supervisor};
use shardline_shared::msg::{ResourceLimits, ShardFailure, ShardState};
use std::time::{Duration, Instant};

/// Polls until `pred` matches an event or `timeout`; returns all events seen and the match time.
/// Starts `fixture-misbehave` with `config`; waits for the first failure after it started.
fn run_fixture(
    config: &str,
    limits: ResourceLimits,
) -> (
    Supervisor,
    ShardFailure,
    Duration,
    Vec<HostEvent>,
    tempfile::TempDir,
) {
    run_fixture_with(config, limits, true)
}

fn run_fixture_with(
    config: &str,
    limits: ResourceLimits,
    cgroups: bool,
) -> (
    Supervisor,
    ShardFailure,
    Duration,
    Vec<HostEvent>,
    tempfile::TempDir,
) {
    let dir = shard_dir();
    let mut cfg = supervisor_config(dir.path());
    cfg.use_cgroups = cgroups;
    let mut sup = Supervisor::new(cfg);
    let t0 = Instant::now();
    let mut events = sup
        .activate(
            "fixture",
            vec![spec(
                dir.path(),
                "fixture",
                "fixture-misbehave",
                config,
                limits,
            )],
            t0,
        )
        .expect("activate");
    let (ev, _) = wait_for(&mut sup, Duration::from_secs(5), started);
    events.extend(ev);
    let t_started = Instant::now();
    let (ev, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::Failed { .. })
    });
    events.extend(ev);
    let at = at.unwrap_or_else(|| panic!("no failure reported for {config:?}; events: {events:?}"));
    let failure = events
        .iter()
        .rev()
        .find_map(|e| match e {
            HostEvent::Failed { failure, shard, .. } => {
                assert_eq!(
                    shard.as_ref().map(|s| s.id()),
                    Some("fixture-misbehave"),
                    "failure not attributed to the shard"
                );
                Some(failure.clone())
            }
            _ => None,
        })
        .expect("failure event");
    (sup, failure, at.duration_since(t_started), events, dir)
}

#[test]
fn a_segfaulting_shard_is_reported_restarted_then_quarantined() {
    let (mut sup, failure, took, _, _dir) = run_fixture("mode = segv\nafter_polls = 3", LIMITS);
    assert_eq!(failure, ShardFailure::Crashed { signal: 11 });
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
    // max_failures = 2: one restart, then quarantine.
    let (events, hit) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::GaveUp { .. })
    });
    assert!(hit.is_some(), "never quarantined: {events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, HostEvent::Restarted { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, HostEvent::Quarantined { .. })),
        "{events:?}"
    );
    let st = sup.statuses();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].state, ShardState::Quarantined);
    assert_eq!(
        st[0].last_failure,
        Some(ShardFailure::Crashed { signal: 11 })
    );
    assert!(st[0].restarts >= 1);
}

#[test]
fn a_panicking_shard_is_contained_and_reported() {
    let (_sup, failure, took, _, _dir) = run_fixture("mode = panic\nafter_polls = 2", LIMITS);
    assert_eq!(
        failure,
        ShardFailure::Exited { code: 101 },
        "caught panic exits the host with 101"
    );
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
}

#[test]
fn a_hanging_shard_is_detected_by_missed_heartbeats() {
    let (_sup, failure, took, _, _dir) = run_fixture("mode = hang\nafter_polls = 2", LIMITS);
    println!("hang reported {took:?} after the host started (hang from the 2nd poll, 20 ms apart)");
    assert_eq!(failure, ShardFailure::Hung);
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
}

#[test]
fn a_memory_hog_is_killed_over_its_limit_and_the_agent_does_not_grow() {
    let before = own_rss_kib();
    let limits = ResourceLimits {
        memory_max_bytes: 48 << 20,
        ..LIMITS
    };
    let (sup, failure, took, events, _dir) = run_fixture("mode = memhog", limits);
    let enforcement = events.iter().find_map(|e| match e {
        HostEvent::Started { enforcement, .. } => Some(*enforcement),
        _ => None,
    });
    println!("enforcement in force: {enforcement:?}");
    assert_eq!(failure, ShardFailure::OverLimit, "events: {events:?}");
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
    let after = own_rss_kib();
    assert!(
        after < before + 16 * 1024,
        "agent RSS moved from {before} KiB to {after} KiB"
    );
    if is_root() {
        assert_ne!(
            enforcement,
            Some(shardline_shared::msg::Enforcement::RlimitsOnly),
            "as root on this machine a cgroup must be in force"
        );
    }
    drop(sup);
}

#[test]
fn without_cgroups_the_rss_watchdog_kills_a_memory_hog() {
    let limits = ResourceLimits {
        memory_max_bytes: 48 << 20,
        ..LIMITS
    };
    let (sup, failure, took, events, _dir) = run_fixture_with("mode = memhog", limits, false);
    assert!(events.iter().any(|e| matches!(
        e,
        HostEvent::Started {
            enforcement: shardline_shared::msg::Enforcement::RlimitsOnly,
            ..
        }
    )));
    assert_eq!(failure, ShardFailure::OverLimit, "events: {events:?}");
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
    drop(sup);
}

#[test]
fn a_library_for_another_abi_version_is_refused_and_quarantined() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let t0 = Instant::now();
    sup.activate(
        "fixture",
        vec![spec(dir.path(), "fixture", "fixture-abi-v2", "", LIMITS)],
        t0,
    )
    .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::GaveUp { .. })
    });
    assert!(
        at.is_some_and(|t| t.duration_since(t0) < Duration::from_secs(1)),
        "{events:?}"
    );
    let reason = events
        .iter()
        .find_map(|e| match e {
            HostEvent::Failed {
                failure: ShardFailure::LoadRefused { reason },
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .expect("load refused");
    assert!(reason.contains("ABI version 2"), "{reason}");
    assert!(!events.iter().any(started));
}

#[test]
fn a_library_with_the_wrong_hash_never_runs_its_constructor() {
    let dir = shard_dir();
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("constructor-ran");
    let mut cfg = supervisor_config(dir.path());
    cfg.host_env.push((
        "SHARDLINE_FIXTURE_MARKER".into(),
        marker.display().to_string(),
    ));
    let mut sup = Supervisor::new(cfg);

    let mut bad = spec(dir.path(), "fixture", "fixture-misbehave", "", LIMITS);
    bad.activation.sha256[0] ^= 0xFF;
    let t0 = Instant::now();
    sup.activate("fixture", vec![bad], t0).expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::GaveUp { .. })
    });
    assert!(
        at.is_some_and(|t| t.duration_since(t0) < Duration::from_secs(1)),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e,
        HostEvent::Failed { failure: ShardFailure::LoadRefused { reason }, .. } if reason.contains("SHA-256"))));
    assert!(
        !marker.exists(),
        "the constructor of a library with a wrong hash ran"
    );

    // Control: with the right hash the same library loads and its constructor
    // runs (it reports so in its stats) — inside the sandbox, where its marker
    // write is refused. The refusal above happens before the sandbox is even
    // entered (every file is verified before any is mapped).
    let good = spec(dir.path(), "fixture", "fixture-misbehave", "", LIMITS);
    sup.activate("fixture", vec![good], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut stats = Vec::new();
    while Instant::now() < deadline && stats.is_empty() {
        sup.poll(Instant::now());
        stats = sup.shard_stats("fixture");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        stats.first().map(|s| s.packets_out),
        Some(1),
        "control: the constructor should run for the verified library: {stats:?}"
    );
    assert_eq!(
        stats[0].errors, 0,
        "the constructor wrote its marker outside the sandbox"
    );
    assert!(
        !marker.exists(),
        "the constructor wrote its marker outside the sandbox"
    );
}

#[test]
fn a_refused_crypto_shard_fails_over_to_its_alternative() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let mut aes = spec(dir.path(), "vpn", "crypto-aes256gcm", "", LIMITS);
    aes.activation.sha256 = [0; 32];
    let chacha = spec(dir.path(), "vpn", "crypto-chacha20poly1305", "", LIMITS);
    let primary = ShardSpec {
        alternatives: vec![chacha],
        ..aes
    };
    sup.activate("vpn", vec![primary], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    assert!(events.iter().any(|e| matches!(e,
        HostEvent::FailedOver { from, to, .. } if from.id() == "crypto-aes256gcm" && to.id() == "crypto-chacha20poly1305")));
    let running: Vec<_> = sup
        .statuses()
        .into_iter()
        .map(|s| (s.shard.id().to_owned(), s.state))
        .collect();
    assert!(
        running.contains(&("crypto-chacha20poly1305".into(), ShardState::Running)),
        "{running:?}"
    );
    assert!(
        running.contains(&("crypto-aes256gcm".into(), ShardState::Quarantined)),
        "{running:?}"
    );
}

#[test]
fn renewing_a_lease_keeps_the_host_and_a_new_config_restarts_it() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(
        dir.path(),
        "fixture",
        "fixture-misbehave",
        "mode = ok",
        LIMITS,
    );
    sup.activate("fixture", vec![s.clone()], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    let pid = sup.host_pid("fixture").expect("host running");
    let mut renewed = s.clone();
    renewed.activation.lease_expires_at_ms = 42;
    assert!(sup
        .activate("fixture", vec![renewed], Instant::now())
        .expect("renew")
        .is_empty());
    assert_eq!(
        sup.host_pid("fixture"),
        Some(pid),
        "a renewal restarted the host"
    );
    assert_eq!(sup.statuses()[0].lease_expires_at_ms, 42);
    let mut changed = s;
    changed.activation.config = b"mode = ok\nafter_polls = 5".to_vec();
    sup.activate("fixture", vec![changed], Instant::now())
        .expect("reconfigure");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    assert_ne!(
        sup.host_pid("fixture"),
        Some(pid),
        "a new config must restart the host"
    );
}

#[test]
fn a_running_host_has_no_capabilities_left() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(
        dir.path(),
        "fixture",
        "fixture-misbehave",
        "mode = ok",
        LIMITS,
    );
    sup.activate("fixture", vec![s], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    let pid = sup.host_pid("fixture").expect("host running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("host status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    if is_root() {
        let own = std::fs::read_to_string("/proc/self/status").expect("own status");
        assert!(
            !own.contains("CapEff:\t0000000000000000"),
            "control: the agent (root) has capabilities"
        );
    }
    assert_eq!(
        field("CapEff:"),
        "0000000000000000",
        "host kept capabilities"
    );
    assert_eq!(
        field("CapPrm:"),
        "0000000000000000",
        "host kept permitted capabilities"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
}

#[test]
fn a_library_of_another_capability_is_refused() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let now = Instant::now();
    for (cap, cfg) in [
        ("a", "mode = segv\nafter_polls = 2"),
        ("b", "mode = hang\nafter_polls = 2"),
        ("ok", "mode = ok"),
    ] {
        let mut s = spec(dir.path(), cap, "fixture-misbehave", cfg, LIMITS);
        s.activation.capability = cap.into();
        // The descriptor says capability "fixture": only "fixture" may load it.
        let _ = sup.activate(cap, vec![s], now);
    }
    let (events, _) = wait_for(&mut sup, Duration::from_secs(2), |_| false);
    // Capability mismatch is a load refusal for all three (descriptor says "fixture").
    let refused = events
        .iter()
        .filter(|e| matches!(e, HostEvent::Failed { failure: ShardFailure::LoadRefused { reason }, .. } if reason.contains("fixture")))
        .count();
    assert_eq!(refused, 3, "{events:?}");
    sup.shutdown();
}
