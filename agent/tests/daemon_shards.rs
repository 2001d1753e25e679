//! The daemon with real shard host processes: a signed instruction through
//! the broker starts the `qos` capability (the real `qos-dscp` shard, hash
//! checked) in a host process; with the broker killed and the agent killed
//! and restarted offline, the host is restored from the last-known-good
//! profile; the lease running out stops that process on time; back online,
//! the report says `Expired`.
//!
//! Issue 15: a signed `ShardActivation` whose primary cannot run fails over
//! to its alternative on the device, the report says so, and an offline
//! restart from the last-known-good profile does it again; a secret sealed
//! to the device's key configures its shard and never shows in the agent's
//! log or state.

mod daemon_support;
#[path = "shard_common/mod.rs"]
mod shard_common;

use daemon_support::{allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::msg::{
    AckOutcome, Instruction, Operation, ShardActivation, ShardFailure, ShardKind, ShardState,
    ShardVariant,
};
use shardline_shared::sign::{seal, Domain};
use std::time::Duration;

/// Child processes of `pid` running as shard hosts.
fn host_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{child}/status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        let is_host = cmdline.split(|&b| b == 0).any(|a| a == b"host");
        if ppid == Some(pid) && is_host {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_real_shard_host_starts_and_is_stopped_when_its_lease_runs_out_offline() {
    if !shard_common::is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(tmp.path()) else {
        return;
    };
    let shards = shard_common::shard_dir();
    let mut agent = Agent::new(tmp.path(), "shards-1", &broker.url(), 100, "");
    // Point the agent at the installed catalog.
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        &format!("dir = \"{}\"", tmp.path().join("shards").display()),
        &format!("dir = \"{}\"", shards.path().display()),
    );
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");

    let now = now_ms();
    let lease = now + 6_000;
    let mut activation = shard_common::spec(
        shards.path(),
        "qos",
        "qos-dscp",
        "small_bytes = 256\nsmall_dscp = 46\nbulk_dscp = 10",
        shard_common::LIMITS,
    )
    .activation;
    activation.lease_expires_at_ms = lease;
    let instr = Instruction {
        device: agent.device.clone(),
        seq: 1,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ops: vec![Operation::Activate(activation)],
    };
    cloud.send_instruction(
        &agent.device,
        seal(Domain::Instruction, &instr, &[&allocator_key()]),
    );
    let ack = agent.open_ack(
        &cloud
            .recv_kind("/ack", Duration::from_secs(10))
            .expect("ack"),
    );
    assert_eq!(ack.outcome, AckOutcome::Applied);

    // The report shows the shard running in a host process of the agent.
    let running = wait_for(Duration::from_secs(3), || {
        let report = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(200))?);
        report
            .shards
            .into_iter()
            .find(|s| s.shard.id() == "qos-dscp" && s.state == ShardState::Running)
    })
    .expect("qos-dscp reported running");
    assert_eq!(running.lease_expires_at_ms, lease);
    let hosts = host_children(agent.pid());
    assert_eq!(hosts.len(), 1, "one host process for the qos capability");

    // Network cut, then the agent itself is killed: its host dies with it
    // (PR_SET_PDEATHSIG), and the restarted agent restores the
    // last-known-good profile from disk, offline, because the lease is valid.
    broker.kill9();
    agent.kill9();
    agent.start(&[]);
    let restored = wait_for(Duration::from_secs(5), || {
        let hosts = host_children(agent.pid());
        (hosts.len() == 1).then_some(hosts)
    })
    .expect("the restarted agent restored the qos host");
    assert_ne!(restored, hosts, "a new host process");
    assert!(now_ms() < lease, "test setup too slow for the lease");

    let gone_at = wait_for(Duration::from_secs(10), || {
        host_children(agent.pid()).is_empty().then(now_ms)
    })
    .expect("the host process stopped");
    assert!(
        gone_at >= lease,
        "stopped {} ms before the lease ran out",
        lease - gone_at
    );
    eprintln!(
        "host stopped {} ms after its lease ran out (offline)",
        gone_at - lease
    );
    assert!(
        gone_at - lease < 1_000,
        "stopped {} ms late",
        gone_at - lease
    );

    broker.restart();
    let expired = wait_for(Duration::from_secs(15), || {
        let report = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(200))?);
        report
            .shards
            .into_iter()
            .find(|s| s.shard.id() == "qos-dscp" && s.state == ShardState::Expired)
    });
    assert!(expired.is_some(), "a report with the expired shard");
    agent.sigterm();
}

fn variant(dir: &std::path::Path, id: &str, config: &str) -> ShardVariant {
    ShardVariant {
        shard: format!("{id}@0.1.0").parse().unwrap(),
        sha256: shard_common::sha256_file(&shard_common::lib_path(dir, id)),
        config: config.as_bytes().to_vec(),
        sealed_config: Vec::new(),
        limits: shard_common::LIMITS,
        bandwidth_kbps: 0,
    }
}

#[test]
fn a_shard_activation_fails_over_on_the_device_and_again_after_an_offline_restart() {
    if !shard_common::is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(tmp.path()) else {
        return;
    };
    let shards = shard_common::shard_dir();
    let mut agent = Agent::new(tmp.path(), "failover-1", &broker.url(), 100, "");
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        &format!("dir = \"{}\"", tmp.path().join("shards").display()),
        &format!("dir = \"{}\"", shards.path().display()),
    );
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");

    // The shaper's rate is a "secret" here: only in the sealed box.
    let secret_rate = "3141592";
    let mut shaper = variant(
        shards.path(),
        "qos-shaper",
        "listen = 127.0.0.1:0\nforward = 127.0.0.1:9\n",
    );
    shaper.sealed_config = shardline_shared::seal::seal_config(
        &mut crypto_box::aead::OsRng,
        &agent.public_key,
        &agent.device,
        &shaper.shard,
        format!("rate_bps = {secret_rate}\n").as_bytes(),
    )
    .unwrap();
    // A primary with the wrong digest, and its alternative.
    let mut broken = variant(shards.path(), "fixture-qos-misbehave", "");
    broken.sha256 = [1; 32];
    let dscp = variant(shards.path(), "qos-dscp", "");
    let now = now_ms();
    let lease = now + 60_000;
    let act = |primary: ShardVariant, alternatives: Vec<ShardVariant>| {
        Operation::ActivateShard(ShardActivation {
            primary,
            alternatives,
            capability: "qos".into(),
            kind: ShardKind::Compute,
            priority: 3,
            lease_expires_at_ms: lease,
        })
    };
    let instr = Instruction {
        device: agent.device.clone(),
        seq: 1,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ops: vec![act(shaper, vec![]), act(broken, vec![dscp])],
    };
    cloud.send_instruction(
        &agent.device,
        seal(Domain::Instruction, &instr, &[&allocator_key()]),
    );
    let ack = agent.open_ack(
        &cloud
            .recv_kind("/ack", Duration::from_secs(10))
            .expect("ack"),
    );
    assert_eq!(ack.outcome, AckOutcome::Applied);

    let report = wait_for(Duration::from_secs(5), || {
        let report = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(200))?);
        let ok = |id: &str, st: ShardState| {
            report
                .shards
                .iter()
                .any(|s| s.shard.id() == id && s.state == st)
        };
        (ok("qos-shaper", ShardState::Running)
            && ok("qos-dscp", ShardState::Running)
            && ok("fixture-qos-misbehave", ShardState::Quarantined))
        .then_some(report)
    });
    let Some(report) = report else {
        agent.dump_log_on_failure();
        panic!("no report with the failover");
    };
    let broken = report
        .shards
        .iter()
        .find(|s| s.shard.id() == "fixture-qos-misbehave")
        .unwrap();
    assert!(
        matches!(&broken.last_failure, Some(ShardFailure::LoadRefused { .. })),
        "{broken:?}"
    );
    let alt = report
        .shards
        .iter()
        .find(|s| s.shard.id() == "qos-dscp")
        .unwrap();
    assert_eq!(
        alt.lease_expires_at_ms, lease,
        "the alternative holds the lease"
    );
    let log = agent.log();
    assert!(
        log.contains("failed over locally")
            && log.contains("fixture-qos-misbehave@0.1.0")
            && log.contains("qos-dscp@0.1.0"),
        "no structured failover line:\n{log}"
    );

    // Offline: broker and agent killed, the agent restarts from disk and
    // fails over again on its own.
    broker.kill9();
    agent.kill9();
    agent.start(&[]);
    let restored = wait_for(Duration::from_secs(8), || {
        let status = agent.status()?;
        let shards = status["shards"].as_array()?.clone();
        let state = |id: &str| {
            shards
                .iter()
                .find(|s| s["shard"]["id"] == id)
                .map(|s| s["state"].as_str().unwrap_or("").to_owned())
        };
        (state("qos-shaper").as_deref() == Some("Running")
            && state("qos-dscp").as_deref() == Some("Running")
            && state("fixture-qos-misbehave").as_deref() == Some("Quarantined"))
        .then_some(shards)
    });
    if restored.is_none() {
        agent.dump_log_on_failure();
    }
    assert!(
        restored.is_some(),
        "no local failover after the offline restart"
    );

    // The secret never reached the log or the state in clear.
    let log = agent.log();
    assert!(!log.contains(secret_rate), "the secret is in the agent log");
    for file in ["state/state.json", "state/status.json"] {
        let text = std::fs::read_to_string(tmp.path().join(file)).unwrap_or_default();
        assert!(!text.contains(secret_rate), "the secret is in {file}");
    }
    agent.sigterm();
}
