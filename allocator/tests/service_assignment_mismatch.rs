//! `[[assignment.groups]]` consistency across instances (issue 19): two
//! real allocator processes share one real PostgreSQL store, each with its
//! embedded broker. The second instance's groups differ from the lead's:
//! the lead sees another digest in its stored heartbeat, logs a warning
//! naming it, counts it in `shardline_assignment_config_mismatch` and gives
//! it no group — although the groups do not fit on the lead alone, which
//! with matching files puts one on each instance. After the second
//! instance reads matching groups (SIGHUP), the gauge is 0 and it gets a
//! group.

mod service_common;

use service_common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `[instance]` and `[assignment]`: the lead's capacity (15 reports/s,
/// 12 usable) fits one of the two 10/s groups, not both.
fn config(id: &str, capabilities: &[&str]) -> String {
    let mut out = format!(
        r#"
[instance]
id = "{id}"
region = "eu-west"
capacity_reports_per_s = 15
endpoints = ["mqtt://127.0.0.1:1883"]
[assignment]
enabled = true
ttl_s = 60
period_s = 2
[assignment.engine]
heartbeat_interval_ms = 1000
heartbeat_timeout_ms = 3000
min_dwell_ms = 0
"#
    );
    for c in capabilities {
        out += &format!(
            "[[assignment.groups]]\ntenant = \"acme\"\nregion = \"eu-west\"\n\
             capability = \"{c}\"\nexpected_reports_per_s = 10\n"
        );
    }
    out
}

/// The stored owner (server) of each group, as an instance's API answers.
fn owners(x: &Allocator) -> BTreeMap<String, String> {
    x.assignment_owners()
        .into_iter()
        .map(|(group, (server, _))| (group, server))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_groups_differ_from_the_leads_is_flagged_and_gets_no_group() {
    let dir = TempDir::new("assign-mismatch");
    let pg = match xtask::kit::postgres::TestPostgres::start(&dir.0.join("pg")) {
        Ok(pg) => pg,
        Err(e) => {
            println!("SKIP: no PostgreSQL server can be started here: {e}");
            return;
        }
    };
    let both = ["vpn", "qos"];
    let a = Allocator::start_on_shared_store_with(
        &dir.0.join("a"),
        BrokerMode::Embedded,
        &pg.url(),
        None,
        &config("alloc-a", &both),
    );
    a.wait_metric("shardline_assignment_leading", 1.0, Duration::from_secs(20));
    let mut b = Allocator::start_on_shared_store_with(
        &dir.0.join("b"),
        BrokerMode::Embedded,
        &pg.url(),
        Some(&a),
        &config("alloc-b", &["vpn"]),
    );

    a.wait_metric(
        "shardline_assignment_config_mismatch",
        1.0,
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a
        .log()
        .lines()
        .any(|l| l.contains("differ from the lead's") && l.contains("server=alloc-b"))
    {
        assert!(
            Instant::now() < deadline,
            "no warning naming alloc-b; log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several runs (every 2 s) with alloc-b's heartbeats fresh: nothing
    // is placed on it, though the lead is short of capacity.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let o = owners(&a);
        assert!(
            !o.values().any(|s| s == "alloc-b"),
            "a group on the mismatched instance: {o:?}; log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(owners(&a).len(), 2, "both groups published");
    assert!(
        a.log().contains("config_mismatch") || a.log().contains("ConfigMismatch"),
        "the run names why; log:\n{}",
        a.log()
    );
    // The warning is rate-limited: once a minute per instance.
    let warnings = a
        .log()
        .lines()
        .filter(|l| l.contains("differ from the lead's"))
        .count();
    assert_eq!(warnings, 1, "{}", a.log());
    // alloc-b is not the lead: it counts nothing. Any instance's API and
    // shardctl say which instance differs.
    assert_eq!(b.metric("shardline_assignment_config_mismatch"), 0.0);
    let (_, v) = b.api("GET", "/v1/assignments", None);
    let differ: BTreeMap<&str, bool> = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["server"].as_str().unwrap(),
                s["groups_differ"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        differ,
        BTreeMap::from([("alloc-a", false), ("alloc-b", true)]),
        "{v}"
    );
    let out = b.shardctl(&["assignment"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("alloc-b") && l.contains("GROUPS DIFFER FROM THE LEAD'S")),
        "{text}"
    );

    // The same groups on alloc-b now: no longer flagged, and it takes the
    // group the lead had no room for.
    b.extra_config = config("alloc-b", &both);
    std::fs::write(dir.0.join("b").join("allocator.toml"), b.config_text()).unwrap();
    b.sighup();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mismatch = a.metric("shardline_assignment_config_mismatch");
        let o = owners(&a);
        if mismatch == 0.0 && o.values().any(|s| s == "alloc-b") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mismatch {mismatch}, owners {o:?}; logs:\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
