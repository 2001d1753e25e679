//! A broker killed with SIGKILL and restarted while reports flow every
//! 15 ms: every report sequence number from 1 to the end arrives at the
//! cloud, signed by the device; duplicates (resends of reports whose PUBACK
//! was lost with the broker) are removed by sequence number.

mod daemon_support;

use daemon_support::{Agent, Broker, Cloud};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const REPORTS: u64 = 1000;

#[test]
fn no_report_is_lost_when_the_broker_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(dir.path()) else {
        return;
    };
    let mut agent = Agent::new(dir.path(), "outage-1", &broker.url(), 15, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    // Let mosquitto's 1 s autosave persist the cloud's subscription, so the
    // restarted broker queues reports for it before it reconnects.
    std::thread::sleep(Duration::from_millis(1500));
    agent.start(&[]);

    let mut seen = BTreeSet::new();
    let mut received = 0u64;
    let mut killed = false;
    let mut kill_at_seq = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < REPORTS as usize {
        assert!(
            Instant::now() < deadline,
            "timed out with {} distinct reports (max seq {:?})",
            seen.len(),
            seen.last()
        );
        let Some(bytes) = cloud.recv_kind("/report", Duration::from_secs(5)) else {
            continue;
        };
        let report = agent.open_report(&bytes);
        assert_eq!(report.device, agent.device);
        received += 1;
        seen.insert(report.seq);
        if !killed && seen.len() >= 300 {
            killed = true;
            kill_at_seq = report.seq;
            broker.kill9();
            // ~100 windows pass with no broker at all.
            std::thread::sleep(Duration::from_millis(1500));
            broker.restart();
        }
    }
    assert!(killed);
    let max = *seen.last().unwrap();
    let missing: Vec<u64> = (1..=max).filter(|s| !seen.contains(s)).collect();
    eprintln!(
        "broker killed after seq {kill_at_seq}; {received} reports received, {} distinct, \
         max seq {max}, {} duplicates removed",
        seen.len(),
        received - seen.len() as u64
    );
    assert!(missing.is_empty(), "lost reports: {missing:?}");
    assert!(max >= REPORTS);
    let log = agent.log();
    assert!(
        log.contains("broker connection lost"),
        "the outage was seen"
    );
    agent.sigterm();
}
