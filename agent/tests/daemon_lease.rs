//! With the network cut (the broker killed), a lease that runs out stops its
//! shard on time: the agent enforces leases on its own clock, and the
//! last-known-good profile on disk loses the shard at that moment.

mod daemon_support;

use daemon_support::{activation, allocator_key, now_ms, wait_for, Agent, Broker, Cloud};
use shardline_shared::msg::{Instruction, Operation, ShardState};
use shardline_shared::sign::{seal, Domain};
use std::time::Duration;

#[test]
fn an_expiring_lease_stops_its_shard_on_time_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(tmp.path()) else {
        return;
    };
    let mut agent = Agent::new(tmp.path(), "lease-1", &broker.url(), 100, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    cloud
        .recv_kind("/report", Duration::from_secs(10))
        .expect("agent reports");

    let now = now_ms();
    let short = now + 2_500;
    let long = now + 120_000;
    let instr = Instruction {
        device: agent.device.clone(),
        seq: 1,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ops: vec![
            Operation::Activate(activation("shaper@1.0.0", "qos", short)),
            Operation::Activate(activation("tunnel@1.0.0", "vpn", long)),
        ],
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
    assert_eq!(ack.instruction_seq, 1);
    let mut shards = agent.profile_shards();
    shards.sort();
    assert_eq!(shards, vec!["shaper@1.0.0", "tunnel@1.0.0"]);

    // Cut the network: no broker from now on.
    broker.kill9();
    assert!(now_ms() < short, "test setup too slow for the lease");

    let stopped_at = wait_for(Duration::from_secs(10), || {
        (agent.profile_shards() == vec!["tunnel@1.0.0".to_string()]).then(now_ms)
    })
    .expect("the expired shard left the profile");
    assert!(
        stopped_at >= short,
        "stopped {} ms early",
        short - stopped_at
    );
    let late = stopped_at - short;
    eprintln!("lease ran out at {short}, shard stopped after {late} ms");
    assert!(late < 500, "stopped {late} ms after its lease ran out");
    // status.json follows right after state.json.
    let status = wait_for(Duration::from_secs(2), || {
        agent
            .status()
            .filter(|s| s["profile"].as_array().is_some_and(|p| p.len() == 1))
    })
    .expect("status.json shows the one remaining shard");
    assert_eq!(status["connected"], false);

    // Back online: a report tells the cloud the shard expired.
    broker.restart();
    let expired = wait_for(Duration::from_secs(15), || {
        let bytes = cloud.recv_kind("/report", Duration::from_millis(200))?;
        let report = agent.open_report(&bytes);
        report
            .shards
            .iter()
            .find(|s| s.shard.to_string() == "shaper@1.0.0" && s.state == ShardState::Expired)
            .cloned()
    })
    .expect("a report with the expired shard");
    assert_eq!(expired.lease_expires_at_ms, short);
    agent.sigterm();
}
