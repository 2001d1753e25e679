//! Issue 14, attack 8, end to end: the real daemon runs a malicious shard
//! (a signed instruction activates `fixture-misbehave` configured to read the
//! agent's `device.key`, rewrite its `state.json` and `kill(getppid(),
//! SIGKILL)`), and again after the agent is restarted offline, when the
//! last-known-good profile starts the shard before any broker is reached.
//! The agent must survive both, with its key and state untouched.

mod daemon_support;
#[path = "shard_common/mod.rs"]
mod shard_common;

use daemon_support::{allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::msg::{AckOutcome, Instruction, Operation, ShardState};
use shardline_shared::sign::{seal, Domain};
use std::time::Duration;

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn a_shard_cannot_kill_the_agent_or_touch_its_key_and_state_even_after_a_restart() {
    if !shard_common::is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(tmp.path()) else {
        eprintln!("SKIP: no MQTT broker binary to run the daemon against");
        return;
    };
    let shards = shard_common::shard_dir();
    let mut agent = Agent::new(tmp.path(), "attack-1", &broker.url(), 100, "");
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        &format!("dir = \"{}\"", tmp.path().join("shards").display()),
        &format!("dir = \"{}\"", shards.path().display()),
    );
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    // The hosts inherit RUST_LOG: their info lines say which attacks were refused.
    agent.start(&[("RUST_LOG", "info")]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");
    let key_before = std::fs::read(tmp.path().join("device.key")).unwrap();

    let now = now_ms();
    let config = format!(
        "mode = ok\nread = {}\nwrite = {}\nkill_parent = 1",
        tmp.path().join("device.key").display(),
        tmp.path().join("state/state.json").display(),
    );
    let mut activation = shard_common::spec(
        shards.path(),
        "fixture",
        "fixture-misbehave",
        &config,
        shard_common::LIMITS,
    )
    .activation;
    activation.lease_expires_at_ms = now + 120_000;
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
    let pid = agent.pid();
    let running = wait_for(Duration::from_secs(5), || {
        let report = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(200))?);
        report
            .shards
            .into_iter()
            .find(|s| s.shard.id() == "fixture-misbehave" && s.state == ShardState::Running)
    });
    if running.is_none() {
        agent.dump_log_on_failure();
    }
    let running = running.expect("the shard is reported running");
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(pid), "the shard killed the agent");
    assert_eq!(agent.applied_seq(), 1, "state.json unreadable or rewritten");
    let log = agent.log();
    assert!(!log.contains("ATTACK SUCCEEDED"), "{log}");
    assert!(
        log.contains("attack blocked: kill(getppid(), SIGKILL)"),
        "attack not tried:\n{log}"
    );
    eprintln!(
        "shard running (restarts {}), agent {pid} alive",
        running.restarts
    );

    // Offline restart: the last-known-good profile starts the shard before the
    // broker is reached; it tries again and the agent stays up.
    broker.kill9();
    agent.kill9();
    // The hosts inherit RUST_LOG: their info lines say which attacks were refused.
    agent.start(&[("RUST_LOG", "info")]);
    let pid = agent.pid();
    let tries = wait_for(Duration::from_secs(10), || {
        let n = agent
            .log()
            .matches("attack blocked: kill(getppid(), SIGKILL)")
            .count();
        (n >= 2).then_some(n)
    });
    assert!(
        tries.is_some(),
        "the restored shard did not run:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(pid), "the restored shard killed the restarted agent");
    assert!(!agent.log().contains("ATTACK SUCCEEDED"));
    assert_eq!(
        std::fs::read(tmp.path().join("device.key")).unwrap(),
        key_before
    );
    assert_eq!(agent.applied_seq(), 1);
    agent.sigterm();
}
