//! The daemon with real shard host processes: a signed instruction through
//! the broker starts the `qos` capability (the real `qos-dscp` shard, hash
//! checked) in a host process; with the broker killed and the agent killed
//! and restarted offline, the host is restored from the last-known-good
//! profile; the lease running out stops that process on time; back online,
//! the report says `Expired`.

mod daemon_support;
#[path = "shard_common/mod.rs"]
mod shard_common;

use daemon_support::{allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::msg::{AckOutcome, Instruction, Operation, ShardState};
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
