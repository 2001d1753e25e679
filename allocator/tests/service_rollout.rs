//! Issue 20, deployments, with a real allocator process and devices on its
//! embedded broker: a bad catalog file is refused with its file, line and
//! field and changes nothing; a reload changing `qos-shaper` reaches only
//! the canary; the canary failing the new version rolls it back
//! automatically (reason in numbers on `GET /v1/rollouts` and in
//! `shardctl rollouts`); a good version is promoted after the soak and
//! reaches every device.

mod service_common;

use service_common::*;
use shardline_shared::ids::ShardRef;
use shardline_shared::msg::{
    AckOutcome, Enforcement, Operation, Presence, ShardFailure, ShardState, ShardStatus,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A device that applies every instruction and reports what it runs.
struct Fleet {
    devs: Vec<Device>,
    /// Device index ⇒ shard id ⇒ (running version, capability).
    running: Vec<BTreeMap<String, (ShardRef, String)>>,
    /// Device index ⇒ shard id the device fails to start (init refused).
    failing: Vec<Option<ShardRef>>,
    /// Every (device index, shard@version) activated, in order.
    activated: Vec<(usize, String)>,
}

impl Fleet {
    /// Takes every pending instruction, applies it, reports.
    async fn step(&mut self, alloc: &Allocator) {
        for i in 0..self.devs.len() {
            while let Some((instr, _)) = self.devs[i]
                .next_instruction(&alloc.public_key, Duration::from_millis(50))
                .await
            {
                for op in &instr.ops {
                    match op {
                        Operation::ActivateShard(a) => {
                            let s = a.primary.shard.clone();
                            self.activated.push((i, s.to_string()));
                            self.running[i].insert(s.id().to_owned(), (s, a.capability.clone()));
                        }
                        Operation::Deactivate { shard } => {
                            self.running[i].remove(shard.id());
                        }
                        _ => {}
                    }
                }
                self.devs[i].ack(instr.seq, AckOutcome::Applied).await;
            }
            let mut r = self.devs[i].report();
            r.shards = self.running[i]
                .values()
                .map(|(s, cap)| {
                    let fails = self.failing[i].as_ref() == Some(s);
                    ShardStatus {
                        shard: s.clone(),
                        capability: cap.clone(),
                        state: if fails {
                            ShardState::Stopped
                        } else {
                            ShardState::Running
                        },
                        cpu_permille: 10,
                        rss_kib: 1024,
                        restarts: 0,
                        errors: 0,
                        last_failure: fails.then(|| ShardFailure::InitFailed {
                            reason: "unknown option rate_bps".into(),
                        }),
                        lease_expires_at_ms: now_ms() + 600_000,
                        enforcement: Enforcement::CgroupV2,
                    }
                })
                .collect();
            let bytes = self.devs[i].seal_report(&r);
            self.devs[i].publish_raw_report(bytes).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    fn got(&self, i: usize, shard: &str) -> bool {
        self.activated.iter().any(|(d, s)| *d == i && s == shard)
    }
}

fn write_catalog(alloc: &Allocator, shaper_version: &str) {
    let path = alloc.dir.join("catalog/catalog.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .split("id = \"qos-shaper\"\nversion = \"")
        .collect::<Vec<_>>();
    assert_eq!(text.len(), 2, "one qos-shaper entry");
    let rest = text[1].split_once('"').unwrap().1;
    std::fs::write(
        &path,
        format!(
            "{}id = \"qos-shaper\"\nversion = \"{shaper_version}\"{rest}",
            text[0]
        ),
    )
    .unwrap();
}

async fn until(
    fleet: &mut Fleet,
    alloc: &Allocator,
    what: &str,
    mut done: impl FnMut(&Fleet, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        fleet.step(alloc).await;
        let (st, v) = alloc.api("GET", "/v1/rollouts", None);
        assert_eq!(st, 200, "{v}");
        if done(fleet, &v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}\n{}", alloc.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_rolls_back_automatically_and_a_good_one_is_promoted() {
    let dir = TempDir::new("rollout");
    // A short soak and start-failure backoff, so the test takes seconds.
    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::Embedded,
        "\n[policy.engine.rollout]\nsoak_ms = 3000\ncanary_permille = 100\n\
         [policy.engine.faults]\nstart_avoid_ms = 500\nstart_avoid_max_ms = 1000\n",
    );
    let mut devs = Vec::new();
    for n in 0..4u8 {
        let key = device_key(n);
        let id = format!("ro-{n}");
        let (st, v) = alloc.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({"device": id, "public_key": hex::encode(key.public_key()), "tier": "basic"})),
        );
        assert_eq!(st, 200, "{v}");
        let d = Device::connect(&id, key, alloc.mqtt_port).await;
        d.publish_status(Presence::Online).await;
        devs.push(d);
    }
    let n = devs.len();
    let mut fleet = Fleet {
        devs,
        running: vec![BTreeMap::new(); n],
        failing: vec![None; n],
        activated: Vec::new(),
    };
    // Everyone runs qos-shaper 0.1.0.
    until(&mut fleet, &alloc, "qos on every device", |f, _| {
        (0..n).all(|i| f.got(i, "qos-shaper@0.1.0"))
    })
    .await;

    // A bad file: refused with file, line and field; nothing changes.
    let path = alloc.dir.join("catalog/catalog.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replacen("priority = ", "priority = \"high\" #", 1),
    )
    .unwrap();
    let (st, v) = alloc.api("POST", "/v1/catalog/reload", None);
    assert_eq!(st, 400, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("catalog.toml:") && msg.contains("field `"),
        "{msg}"
    );
    assert_eq!(alloc.metric("shardline_catalog_reloads_refused_total"), 1.0);
    let (_, r) = alloc.api("GET", "/v1/rollouts", None);
    assert_eq!(r["active"].as_array().unwrap().len(), 0, "{r}");
    std::fs::write(&path, &good).unwrap();

    // 0.2.0: staged; only the canary gets it, and it fails to start there.
    write_catalog(&alloc, "0.2.0");
    let (st, v) = alloc.api("POST", "/v1/catalog/reload", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"], true, "{v}");
    assert_eq!(
        v["details"]["shards_changed"][0]["shard"], "qos-shaper",
        "{v}"
    );
    assert_eq!(v["details"]["shards_changed"][0]["staged"], true, "{v}");
    let (_, r) = alloc.api("GET", "/v1/rollouts", None);
    let canaries: Vec<String> = r["active"][0]["canaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(canaries.len(), 1, "10 % of 4, rounded up: {r}");
    let canary = fleet
        .devs
        .iter()
        .position(|d| d.id.as_str() == canaries[0])
        .unwrap();
    fleet.failing[canary] = Some(ShardRef::new("qos-shaper", "0.2.0").unwrap());
    let v = until(&mut fleet, &alloc, "automatic rollback", |_, v| {
        v["active"][0]["phase"] == "rolled_back"
    })
    .await;
    assert_eq!(
        v["active"][0]["reason"],
        "rollback: qos-shaper 0.2.0 failed on 1 of 1 canaries (100 % > 20 %)",
        "{v}"
    );
    assert!(fleet.got(canary, "qos-shaper@0.2.0"));
    for i in (0..n).filter(|&i| i != canary) {
        assert!(
            !fleet.got(i, "qos-shaper@0.2.0"),
            "non-canary {i} got 0.2.0"
        );
    }
    let out = alloc.shardctl(&["rollouts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("rolled_back"),
        "{text}"
    );
    // The canary is back on 0.1.0 once its backoff is over.
    until(&mut fleet, &alloc, "canary back on 0.1.0", |f, _| {
        f.running[canary]
            .get("qos-shaper")
            .is_some_and(|s| s.0.version() == "0.1.0")
    })
    .await;

    // 0.3.0 works: promoted after the soak, then every device has it.
    fleet.failing[canary] = None;
    write_catalog(&alloc, "0.3.0");
    let out = alloc.shardctl(&["catalog", "reload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("qos-shaper"),
        "{text}"
    );
    let v = until(&mut fleet, &alloc, "promotion", |_, v| {
        v["active"].as_array().unwrap().is_empty() && v["ended"][0]["phase"] == "promoted"
    })
    .await;
    let reason = v["ended"][0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("promote: qos-shaper 0.3.0 failed on 0 of 1 canaries (0 % ≤ 20 %)"),
        "{reason}"
    );
    until(&mut fleet, &alloc, "0.3.0 everywhere", |f, _| {
        (0..n).all(|i| f.got(i, "qos-shaper@0.3.0"))
    })
    .await;
    assert!(alloc.metric("shardline_rollout_changes_total") >= 4.0);
}

/// SIGHUP reloads like the API: a bad file is refused (counted, the
/// running catalog stays), a good one applied (with no device enrolled,
/// nothing to stage: no rollout).
#[test]
fn sighup_reloads_the_catalog() {
    let dir = TempDir::new("rollout-hup");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let pid = alloc.child.as_ref().unwrap().id().to_string();
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let path = alloc.dir.join("catalog/catalog.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "[[shard]]\nid = 3\n").unwrap();
    hup();
    alloc.wait_metric(
        "shardline_catalog_reloads_refused_total",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(alloc.metric("shardline_catalog_reloads_total"), 0.0);
    std::fs::write(&path, &good).unwrap();
    write_catalog(&alloc, "0.4.0");
    hup();
    alloc.wait_metric(
        "shardline_catalog_reloads_total",
        1.0,
        Duration::from_secs(10),
    );
    assert!(
        alloc
            .log()
            .contains("qos-shaper: qos-shaper@0.1.0 → qos-shaper@0.4.0"),
        "{}",
        alloc.log()
    );
    let (_, v) = alloc.api("GET", "/v1/rollouts", None);
    assert_eq!(v["active"].as_array().unwrap().len(), 0, "{v}");
}
