//! Explicit shard requests end to end, with real processes: the allocator
//! (embedded broker), an enrolled agent, and applications on the device
//! asking through the agent's Unix socket (the client crate, and the
//! `shardline-agent request` CLI). Every answer crosses the broker signed:
//! the request by the device key, the answer by the allocator's key.
//!
//! One loop, in order: a grant; a refusal with its reason; a queued request
//! granted on the same connection when units free up; a short grant that
//! expires and returns its units; reputation moving with outcomes; a
//! flooding instance rate-limited at its own cost only; the operator's
//! request and reputation endpoints through `shardctl`; and a request while
//! the broker is down, answered at once with a clear error.

use shardline_client::wire::{Answer, Kind, Outcome, Request};
use shardline_client::Client;
use shardline_tests::kit::json::Json;
use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::proc::TempDir;
use shardline_tests::kit::stack::{Capture, LoopConfig, Stack};
use shardline_tests::{bins, wait_until, workspace_root};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const DEVICE: &str = "req-gw";

fn logs(st: &Stack) -> String {
    format!(
        "---- allocator log ----\n{}\n---- agent log ----\n{}",
        st.allocator.log_tail(30),
        st.agent
            .as_ref()
            .map(|a| a.log_tail(30))
            .unwrap_or_default()
    )
}

fn client(st: &Stack) -> Client {
    Client::connect(socket(st)).unwrap_or_else(|e| panic!("connect: {e}\n{}", logs(st)))
}

fn socket(st: &Stack) -> std::path::PathBuf {
    st.dir.join("agent.sock")
}

fn acquire(st: &Stack, app: &str, instance: &str, units: u32, secs: u64) -> Answer {
    client(st)
        .acquire(
            app,
            instance,
            Kind::Compute,
            units,
            Duration::from_secs(secs),
            Duration::ZERO,
        )
        .unwrap_or_else(|e| panic!("acquire {app}:{instance}: {e}\n{}", logs(st)))
}

fn granted(a: &Answer, st: &Stack) -> u64 {
    match a {
        Answer::Granted { grant, .. } => *grant,
        other => panic!("expected a grant, got {other:?}\n{}", logs(st)),
    }
}

/// `shardctl --json reputation DEVICE:APP:INSTANCE`: parsed, and as printed.
fn reputation(st: &Stack, app: &str, instance: &str) -> (Json, String) {
    let text = st
        .shardctl(&[
            "--json",
            "reputation",
            &format!("{DEVICE}:{app}:{instance}"),
        ])
        .unwrap_or_else(|e| panic!("shardctl reputation: {e}"));
    let json =
        Json::parse(&text).unwrap_or_else(|e| panic!("shardctl reputation output: {e}: {text}"));
    (json, text)
}

fn standing(st: &Stack, app: &str, instance: &str) -> (f64, u32) {
    match client(st).query(app, instance) {
        Ok(Answer::Standing {
            reputation,
            compute_in_use,
            ..
        }) => (reputation, compute_in_use),
        other => panic!("query {app}:{instance}: {other:?}\n{}", logs(st)),
    }
}

fn device_reputation(st: &Stack) -> f64 {
    let text = st
        .shardctl(&["--json", "device", DEVICE])
        .expect("shardctl device");
    Json::parse(&text)
        .expect("device JSON")
        .get("policy")
        .get("reputation")
        .as_f64()
        .expect("a device reputation")
}

fn write_quiet_capture(dir: &Path) -> std::path::PathBuf {
    let capture = dir.join("quiet.pcap");
    std::fs::write(
        &capture,
        pcap::write_pcap(&pcap::scenario(
            &[Phase::Quiet(Duration::from_secs(600))],
            1_700_000_000_000_000_000,
        )),
    )
    .expect("write pcap");
    capture
}

#[test]
fn applications_ask_for_shards_and_get_grants_queues_and_refusals() {
    let bins = bins();
    let tmp = TempDir::new("sl-app-requests").expect("temp dir");
    let mut cfg = LoopConfig::demo(Capture::Pcap(write_quiet_capture(&tmp.path)));
    cfg.device = DEVICE.into();
    // Premium: 4 compute units; at the starting reputation an instance may
    // hold half of them.
    cfg.tier = "premium".into();
    cfg.agent_extra = "\n[[apps]]\nname = \"cam\"\nuids = [0]\n\n\
                       [[apps]]\nname = \"nvr\"\nuids = [0]\n"
        .into();
    let mut st = Stack::prepare(&workspace_root(), &bins, &tmp.path, cfg)
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    st.start_agent().expect("start the agent");
    // Online once a query is answered by the allocator (not by a local error).
    let online = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        st.check_alive().ok()?;
        let mut c = Client::connect(socket(&st)).ok()?;
        matches!(c.query("cam", "w1"), Ok(Answer::Standing { .. })).then_some(())
    });
    assert!(
        online.is_some(),
        "the agent never got an answer\n{}",
        logs(&st)
    );

    // 1. A grant: 2 compute units for cam:w1.
    let g1 = granted(&acquire(&st, "cam", "w1", 2, 30), &st);
    assert_eq!(standing(&st, "cam", "w1").1, 2, "cam:w1 holds its 2 units");

    // 2. A refusal with its reason: w1 already holds its whole quota.
    match acquire(&st, "cam", "w1", 1, 30) {
        Answer::Refused { reason, detail } => {
            assert_eq!(reason, "insufficient_quota", "{detail}");
            assert!(detail.contains("insufficient quota"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // 3. Queue, then grant on the same connection when units free up: nvr:a
    // takes the device's other 2 units, nvr:b waits, cam:w1 releases.
    let g2 = granted(&acquire(&st, "nvr", "a", 2, 30), &st);
    let sock = socket(&st);
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).expect("connect");
        let mut seen = Vec::new();
        let last = c.call(
            &Request::Acquire {
                app: "nvr".into(),
                instance: "b".into(),
                kind: Kind::Compute,
                units: 1,
                for_ms: 30_000,
                priority: 0,
                wait_ms: 20_000,
            },
            |a| seen.push(a.clone()),
        );
        (seen, last)
    });
    let queued = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let (_, in_use) = standing(&st, "nvr", "b");
        let (r, _) = reputation(&st, "nvr", "b");
        let queued = r.get("standing").get("queued").as_u64().unwrap_or(0);
        (in_use == 0 && queued == 1).then_some(())
    });
    assert!(queued.is_some(), "nvr:b never queued\n{}", logs(&st));
    let released = client(&st)
        .release("cam", "w1", g1, Outcome::Completed)
        .expect("release");
    assert!(
        matches!(released, Answer::Released { grant, units: 2 } if grant == g1),
        "{released:?}"
    );
    let (seen, last) = waiter.join().expect("waiter thread");
    assert!(
        matches!(seen.first(), Some(Answer::Queued { position: 1, .. })),
        "first answer: {seen:?}"
    );
    let g3 = match last {
        Ok(Answer::Granted {
            grant, units: 1, ..
        }) => grant,
        other => panic!(
            "the queued request was not granted: {other:?}\n{}",
            logs(&st)
        ),
    };

    // 4. Reputation moves with outcomes: a completed grant raises cam:w1's.
    let (rep_w1, _) = standing(&st, "cam", "w1");
    assert!(rep_w1 > 50.0, "cam:w1 after a completed grant: {rep_w1}");

    // 5. Expiry returns the units: cam:w2 holds 1 unit for 2 s, never
    // releases it; its units come back and the unused grant costs it a little.
    let _g4 = granted(&acquire(&st, "cam", "w2", 1, 2), &st);
    let returned = wait_until(Duration::from_secs(15), Duration::from_millis(250), || {
        (standing(&st, "cam", "w2").1 == 0).then_some(())
    });
    assert!(
        returned.is_some(),
        "cam:w2's expired grant kept its units\n{}",
        logs(&st)
    );
    let (rep_w2, _) = standing(&st, "cam", "w2");
    assert!(rep_w2 < 50.0, "an expired, unused grant: {rep_w2}");

    // 6. A flooding instance is rate-limited at its own cost only.
    let before_device = device_reputation(&st);
    let (before_nvr, _) = standing(&st, "nvr", "a");
    // Ten connections at once, 30 queries each.
    let floods: Vec<_> = (0..10)
        .map(|_| {
            let sock = socket(&st);
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).expect("connect");
                (0..30)
                    .filter(|_| {
                        matches!(c.query("cam", "flood"),
                            Ok(Answer::Refused { reason, .. }) if reason == "rate_limited")
                    })
                    .count()
            })
        })
        .collect();
    let limited: usize = floods.into_iter().map(|t| t.join().expect("flood")).sum();
    assert!(limited > 0, "300 queries at once were never rate limited");
    let (after_flood, _) = wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
        // Its next query may itself still be limited: retry until answered.
        match client(&st).query("cam", "flood") {
            Ok(Answer::Standing { reputation, .. }) => Some((reputation, ())),
            _ => None,
        }
    })
    .expect("cam:flood answered again");
    assert!(
        after_flood < 50.0,
        "the flood cost cam:flood nothing: {after_flood}"
    );
    // (Healthy reports keep nudging the device's score up meanwhile; a
    // flood charged to it would take points off.)
    let (after_nvr, _) = standing(&st, "nvr", "a");
    assert!(
        after_nvr >= before_nvr - 0.05,
        "the flood cost nvr:a: {before_nvr} -> {after_nvr}"
    );
    let after_device = device_reputation(&st);
    assert!(
        after_device >= before_device - 0.05,
        "the flood cost the device: {before_device} -> {after_device}"
    );

    // 7. The operator's endpoints: a request on behalf of an instance and an
    // audited adjustment, both through shardctl.
    let out = st
        .shardctl(&[
            "request",
            &format!("{DEVICE}:nvr:op"),
            "--type",
            "compute",
            "--units",
            "1",
            "--for",
            "5s",
        ])
        .unwrap_or_else(|e| panic!("shardctl request: {e}"));
    assert!(out.contains("granted") || out.contains("queued"), "{out}");
    st.shardctl(&[
        "reputation",
        &format!("{DEVICE}:cam:w1"),
        "--delta",
        "-20",
        "--reason",
        "abuse report 42",
    ])
    .unwrap_or_else(|e| panic!("shardctl reputation --delta: {e}"));
    let (r, text) = reputation(&st, "cam", "w1");
    let now = r.get("reputation").as_f64().expect("reputation");
    assert!(
        (now - (rep_w1 - 20.0)).abs() < 1.0,
        "adjusted {rep_w1} by -20, now {now}"
    );
    assert!(
        text.contains("abuse report 42"),
        "the adjustment's reason is not in the history: {text}"
    );
    // What the allocator knows of the instance: its app and name from the
    // requests, its tier (and tenant) from the device's enrolment.
    assert_eq!(r.get("app").as_str(), Some("cam"), "{text}");
    assert_eq!(r.get("instance_name").as_str(), Some("w1"), "{text}");
    assert_eq!(r.get("tier").as_str(), Some("premium"), "{text}");
    let _ = (g2, g3);

    // 8. The broker down (the allocator holds the embedded broker): a
    // request gets a clear error at once, not a hang.
    st.allocator.stop(Duration::from_secs(5));
    let down = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let started = Instant::now();
        match client(&st).query("cam", "w1") {
            // An `error` line comes back as the client's `Agent` error.
            Err(e) if e.to_string().contains("not connected") => Some(started.elapsed()),
            _ => None,
        }
    });
    let took = down.unwrap_or_else(|| panic!("no clear error with the broker down\n{}", logs(&st)));
    assert!(took < Duration::from_secs(1), "the error took {took:?}");
    // The CLI says the same, with exit code 1.
    let out = Command::new(&st.bins.agent)
        .args(["request", "--socket"])
        .arg(socket(&st))
        .args(["--app", "cam", "--query"])
        .output()
        .expect("run shardline-agent request");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("not connected"), "{text}");
    st.stop();
}
