//! The regional assignment, wired (issue 19), against a real allocator
//! process with its embedded broker and `[assignment] enabled`: a plain MQTT
//! subscriber on `assign/+` gets a retained object that the device's own
//! acceptance logic (`handle_assignment`) takes under the allocator's public
//! key; renewals keep the version and move the expiry; after a SIGKILL and
//! a restart on the same store the version never goes back; the API and
//! `shardctl assignment` show the group, the instance and the history. A
//! region short of capacity is shown from the store, with its start kept
//! across a restart. A group taken out of the configuration is withdrawn at
//! the next start, or at a SIGHUP: recorded in its history, its retained copy
//! cleared at a real mosquitto, not renewed; added back (SIGHUP), it
//! continues from its version.

mod service_common;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use service_common::{Allocator, BrokerMode, Mosquitto, TempDir};
use shardline_shared::assign::{handle_assignment, AssignmentState, AssignmentVerdict, GroupId};
use shardline_shared::msg::{KeySet, PublicKeyEntry};
use shardline_shared::topics;
use shardline_shared::KeyId;
use std::time::Duration;
use tokio::sync::mpsc;

const GROUP: &str = "acme.eu-west.vpn";

const EXTRA: &str = r#"
[instance]
id = "alloc-a"
region = "eu-west"
capacity_reports_per_s = 500
endpoints = ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.2:1883"]
[assignment]
enabled = true
ttl_s = 4
period_s = 2
[[assignment.groups]]
tenant = "acme"
region = "eu-west"
capability = "vpn"
expected_reports_per_s = 10
"#;

/// Subscribes to every group's assignment; yields (topic, payload, retained).
async fn subscriber(port: u16, tag: &str) -> mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    let mut opts = MqttOptions::new(format!("assign-watch-{tag}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(topics::ALL_ASSIGNMENTS, QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic, p.payload.to_vec(), p.retain)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    within: Duration,
    a: &Allocator,
) -> (String, Vec<u8>, bool) {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(m)) => m,
        _ => panic!("no assignment within {within:?}; log:\n{}", a.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_assignment_is_published_retained_renewed_and_survives_a_restart() {
    let dir = TempDir::new("assign-embedded");
    let mut a = Allocator::start(&dir.0, BrokerMode::Embedded, EXTRA);
    let keys = KeySet {
        epoch: 1,
        keys: vec![PublicKeyEntry {
            key_id: KeyId::of_public_key(&a.public_key),
            public_key: a.public_key,
        }],
    };
    let group = GroupId::new(GROUP).unwrap();
    let bootstrap = vec!["mqtt://127.0.0.9:1883".to_owned()];
    let now = service_common::now_ms;

    // The first object: published before this subscriber connected, so it
    // arrives as a retained message.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut rx = subscriber(a.mqtt_port, "1").await;
    let (topic, bytes, retained) = next(&mut rx, Duration::from_secs(10), &a).await;
    assert_eq!(topic, topics::assignment(&group));
    assert!(retained, "the assignment is retained");
    let d = handle_assignment(
        &AssignmentState::bootstrap(group.clone()),
        &bytes,
        now(),
        &keys,
        &bootstrap,
    );
    assert_eq!(
        d.verdict,
        AssignmentVerdict::Accepted {
            version: 1,
            previous: None
        },
        "{:?}",
        d
    );
    let first = d.state.current.clone().unwrap().assignment;
    assert_eq!(first.server.as_str(), "alloc-a");
    assert_eq!(first.region.as_str(), "eu-west");
    assert_eq!(
        first.endpoints,
        vec!["mqtt://127.0.0.1:1883", "mqtt://127.0.0.2:1883"]
    );
    assert_eq!(first.expires_at_ms - first.issued_at_ms, 4_000);
    // A key the device does not trust: refused.
    let stranger = KeySet {
        epoch: 1,
        keys: vec![PublicKeyEntry {
            key_id: KeyId::of_public_key(&[9; 32]),
            public_key: [9; 32],
        }],
    };
    let refused = handle_assignment(
        &AssignmentState::bootstrap(group.clone()),
        &bytes,
        now(),
        &stranger,
        &bootstrap,
    );
    assert!(matches!(refused.verdict, AssignmentVerdict::Refused(_)));

    // Renewals (at half the 4 s lifetime): same version, later expiry.
    let mut state = d.state;
    let mut renewals = 0;
    while renewals < 2 {
        let (_, bytes, _) = next(&mut rx, Duration::from_secs(6), &a).await;
        let d = handle_assignment(&state, &bytes, now(), &keys, &bootstrap);
        match d.verdict {
            AssignmentVerdict::Renewed { version: 1, .. } => renewals += 1,
            AssignmentVerdict::Duplicate { version: 1 } => {}
            v => panic!("expected a renewal of version 1, got {v:?}"),
        }
        state = d.state;
    }
    let renewed = state.current.clone().unwrap().assignment;
    assert!(renewed.expires_at_ms > first.expires_at_ms);

    // The API and shardctl show it.
    let (status, v) = a.api("GET", "/v1/assignments", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["groups"][0]["group"], GROUP);
    assert_eq!(v["groups"][0]["version"], 1);
    assert_eq!(v["groups"][0]["server"], "alloc-a");
    assert_eq!(v["servers"][0]["server"], "alloc-a");
    assert_eq!(v["servers"][0]["alive"], true);
    let out = a.shardctl(&["assignment"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(GROUP) && text.contains("v1") && text.contains("alloc-a"),
        "{text}"
    );
    assert!(
        text.contains("servers:") && text.contains("alive"),
        "{text}"
    );
    let out = a.shardctl(&["assignment", GROUP, "--history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.lines().count(), 1, "renewals add no history: {text}");
    assert!(text.contains("v1") && text.contains("new"), "{text}");
    let metrics = a.metric("shardline_assignment_version{group=\"acme.eu-west.vpn\"}");
    assert_eq!(metrics, 1.0);

    // SIGKILL and restart on the same store: the version never goes back.
    a.kill9();
    drop(rx);
    a.spawn();
    let mut rx = subscriber(a.mqtt_port, "2").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while std::time::Instant::now() < deadline {
        let Ok(Some((_, bytes, _))) = tokio::time::timeout(Duration::from_secs(6), rx.recv()).await
        else {
            break;
        };
        let d = handle_assignment(&state, &bytes, now(), &keys, &bootstrap);
        match d.verdict {
            AssignmentVerdict::Renewed { version: 1, .. }
            | AssignmentVerdict::Duplicate { version: 1 } => seen += 1,
            v => panic!("after the restart: expected version 1 again, got {v:?}"),
        }
        state = d.state;
        if seen >= 2 {
            break;
        }
    }
    assert!(
        seen >= 2,
        "republished after the restart; log:\n{}",
        a.log()
    );
    let (_, v) = a.api("GET", "/v1/assignments", None);
    assert_eq!(v["groups"][0]["version"], 1, "{v}");
}

/// Too little capacity: the group still goes to the least-bad server, and
/// the shortfall is a metric, in the API and in `shardctl assignment`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_short_of_capacity_is_reported() {
    let dir = TempDir::new("assign-short");
    let extra = EXTRA
        .replace(
            "capacity_reports_per_s = 500",
            "capacity_reports_per_s = 20",
        )
        .replace(
            "expected_reports_per_s = 10",
            "expected_reports_per_s = 100",
        );
    let a = Allocator::start(&dir.0, BrokerMode::Embedded, &extra);
    let short = a.wait_metric(
        "shardline_assignment_capacity_shortfall{region=\"eu-west\"}",
        1.0,
        Duration::from_secs(10),
    );
    // 100 reports/s (the interval's upper bound is higher) on 20 × 0.8 usable.
    assert!(short >= 84.0, "shortfall {short}");
    assert!(a.metric("shardline_assignment_capacity_shortfall_total") >= 1.0);
    // Placed on the least-bad server (at the first run, or at the next
    // periodic one when the start-up batch made the first heartbeat's
    // latency look unhealthy).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let v = loop {
        let (_, v) = a.api("GET", "/v1/assignments", None);
        if v["groups"][0]["server"] == "alloc-a" {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group goes to the least-bad server: {v}; log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["shortfalls"][0]["region"], "eu-west", "{v}");
    assert_eq!(v["shortfalls"][0]["groups"][0], GROUP, "{v}");
    let since = v["shortfalls"][0]["since_ms"].as_u64().expect("since_ms");
    assert!(since > 0 && since <= service_common::now_ms(), "{v}");
    let out = a.shardctl(&["assignment"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NEED CAPACITY in eu-west"), "{text}");
    assert!(text.contains(" short since 20"), "{text}");
    assert!(
        a.log().contains("not enough capacity in this region"),
        "a warning is logged"
    );
    // The shortfall is in the store, not only in the lead's memory: right
    // after a SIGKILL and restart (before any run of the new process) the
    // API shows it, and the new lead keeps its start.
    let mut a = a;
    a.kill9();
    a.spawn();
    let (_, v) = a.api("GET", "/v1/assignments", None);
    assert_eq!(v["shortfalls"][0]["region"], "eu-west", "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, v) = a.api("GET", "/v1/assignments", None);
    assert_eq!(v["shortfalls"][0]["since_ms"], since, "{v}");
    assert!(v["shortfalls"][0]["at_ms"].as_u64().unwrap() > since, "{v}");
}

/// A group taken out of `[assignment]` (the allocator restarted without
/// it) is withdrawn: the withdrawal is in its history, its retained object
/// is cleared at the broker (a fresh subscriber gets none), it is no longer
/// listed or renewed; the group still configured is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_taken_out_of_the_configuration_is_withdrawn() {
    let dir = TempDir::new("assign-withdraw");
    let Some(m) = Mosquitto::start(&dir.0) else {
        return;
    };
    let qos = GroupId::new("acme.eu-west.qos").unwrap();
    let vpn = GroupId::new(GROUP).unwrap();
    let one = EXTRA.replace("ttl_s = 4", "ttl_s = 600");
    let two = format!(
        "{one}[[assignment.groups]]\ntenant = \"acme\"\nregion = \"eu-west\"\n\
         capability = \"qos\"\nexpected_reports_per_s = 10\n"
    );
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    let mut a = Allocator::start(&dir.0, BrokerMode::External(url), &two);
    let mut rx = subscriber(m.port, "withdraw-1").await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let (topic, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        assert!(!bytes.is_empty());
        seen.insert(topic);
    }
    assert!(seen.contains(&topics::assignment(&qos)), "{seen:?}");

    a.kill9();
    a.extra_config = one.clone();
    a.spawn();
    // The live subscriber sees the clearing (an empty message on the topic).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (topic, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        if topic == topics::assignment(&qos) && bytes.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qos not cleared; log:\n{}",
            a.log()
        );
    }
    // A fresh subscriber gets the configured group's object only.
    let mut fresh = subscriber(m.port, "withdraw-2").await;
    let mut retained = Vec::new();
    while let Ok(Some((topic, bytes, _))) =
        tokio::time::timeout(Duration::from_millis(1500), fresh.recv()).await
    {
        retained.push((topic, bytes.len()));
    }
    assert_eq!(
        retained.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        vec![topics::assignment(&vpn)],
        "{retained:?}"
    );
    let (_, v) = a.api("GET", "/v1/assignments", None);
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(groups, vec![GROUP], "{v}");
    let (st, h) = a.api("GET", "/v1/assignments/acme.eu-west.qos/history", None);
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["versions"][0]["change"], "withdrawn", "{h}");
    assert_eq!(h["versions"][1]["change"], "new", "{h}");
    assert_eq!(h["versions"][0]["version"], h["versions"][1]["version"]);
    let out = a.shardctl(&["assignment", "acme.eu-west.qos", "--history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().unwrap_or("").contains("withdrawn"),
        "{text}"
    );
    assert!(a.log().contains("assignment withdrawn"), "{}", a.log());
    // Withdrawn once, not renewed: nothing more on its topic.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(m) = rx.try_recv() {
        assert_ne!(m.0, topics::assignment(&qos), "{m:?}");
    }
    let (_, h) = a.api("GET", "/v1/assignments/acme.eu-west.qos/history", None);
    assert_eq!(h["versions"].as_array().unwrap().len(), 2, "{h}");
}

/// After a key rotation the stored objects are signed again with the new
/// key and republished (same version), without waiting for a renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_republishes_the_objects_under_the_new_key() {
    let dir = TempDir::new("assign-rotate");
    // A long lifetime: no renewal happens during the test.
    let extra = EXTRA.replace("ttl_s = 4", "ttl_s = 600");
    let a = Allocator::start(&dir.0, BrokerMode::Embedded, &extra);
    let group = GroupId::new(GROUP).unwrap();
    let bootstrap = vec!["mqtt://127.0.0.9:1883".to_owned()];
    let set = |pk: [u8; 32]| KeySet {
        epoch: 1,
        keys: vec![PublicKeyEntry {
            key_id: KeyId::of_public_key(&pk),
            public_key: pk,
        }],
    };
    let mut rx = subscriber(a.mqtt_port, "rot").await;
    let (_, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
    let old = handle_assignment(
        &AssignmentState::bootstrap(group.clone()),
        &bytes,
        service_common::now_ms(),
        &set(a.public_key),
        &bootstrap,
    );
    assert!(matches!(
        old.verdict,
        AssignmentVerdict::Accepted { version: 1, .. }
    ));

    let new_pk = service_common::keygen(&dir.0.join("signing-2.key"));
    let path = std::fs::canonicalize(dir.0.join("signing-2.key")).unwrap();
    let (st, body) = a.api(
        "POST",
        "/v1/rotate",
        Some(serde_json::json!({ "key_file": path.display().to_string() })),
    );
    assert_eq!(st, 200, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        let d = handle_assignment(
            &AssignmentState::bootstrap(group.clone()),
            &bytes,
            service_common::now_ms(),
            &set(new_pk),
            &bootstrap,
        );
        if let AssignmentVerdict::Accepted { version, .. } = d.verdict {
            assert_eq!(version, 1, "same version under the new key");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no object under the new key; log:\n{}",
            a.log()
        );
    }
}

/// The group of `topic`'s retained object as the API shows it (version).
fn api_version(a: &Allocator, group: &str) -> Option<u64> {
    let (_, v) = a.api("GET", "/v1/assignments", None);
    v["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"] == group)
        .and_then(|g| g["version"].as_u64())
}

/// SIGHUP reads `[[assignment.groups]]` again: a group taken out is
/// withdrawn (its retained copy cleared) without a restart; put back, it is
/// published again, never below the version the devices hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_taken_out_by_sighup_is_withdrawn_and_comes_back_at_its_version() {
    let dir = TempDir::new("assign-sighup");
    let Some(m) = Mosquitto::start(&dir.0) else {
        return;
    };
    let qos = GroupId::new("acme.eu-west.qos").unwrap();
    let one = EXTRA.replace("ttl_s = 4", "ttl_s = 600");
    let two = format!(
        "{one}[[assignment.groups]]\ntenant = \"acme\"\nregion = \"eu-west\"\n\
         capability = \"qos\"\nexpected_reports_per_s = 10\n"
    );
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    let mut a = Allocator::start(&dir.0, BrokerMode::External(url), &two);
    let mut rx = subscriber(m.port, "sighup-1").await;
    let held = loop {
        let (topic, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        if topic == topics::assignment(&qos) && !bytes.is_empty() {
            break api_version(&a, "acme.eu-west.qos").expect("qos listed");
        }
    };

    a.extra_config = one.clone();
    std::fs::write(dir.0.join("allocator.toml"), a.config_text()).unwrap();
    a.sighup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (topic, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        if topic == topics::assignment(&qos) && bytes.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qos not cleared after SIGHUP; log:\n{}",
            a.log()
        );
    }
    assert_eq!(api_version(&a, "acme.eu-west.qos"), None);
    assert!(api_version(&a, GROUP).is_some(), "the other group stays");
    let (_, h) = a.api("GET", "/v1/assignments/acme.eu-west.qos/history", None);
    assert_eq!(h["versions"][0]["change"], "withdrawn", "{h}");

    // Back in the configuration: published again, from its version on.
    a.extra_config = two;
    std::fs::write(dir.0.join("allocator.toml"), a.config_text()).unwrap();
    a.sighup();
    loop {
        let (topic, bytes, _) = next(&mut rx, Duration::from_secs(10), &a).await;
        if topic == topics::assignment(&qos) && !bytes.is_empty() {
            break;
        }
    }
    let back = api_version(&a, "acme.eu-west.qos").expect("qos listed again");
    assert!(back >= held, "version {back} below the withdrawn {held}");
    assert!(
        a.log().contains("assignment: groups reloaded"),
        "{}",
        a.log()
    );
}
