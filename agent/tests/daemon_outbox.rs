//! The outbox cap: with no broker at all, reports pile up on disk up to
//! `state.outbox_cap`; beyond it the oldest are dropped and counted. When the
//! broker comes, the kept (newest) reports arrive, in order, none missing
//! after the dropped ones.

mod daemon_support;

use daemon_support::{wait_for, Agent, Broker, Cloud};
use std::collections::BTreeSet;
use std::time::Duration;

const CAP: usize = 40;

#[test]
fn a_full_outbox_drops_the_oldest_reports_and_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(tmp.path()) else {
        return;
    };
    let mut agent = Agent::new(
        tmp.path(),
        "outbox-1",
        &broker.url(),
        20,
        &format!("outbox_cap = {CAP}\n"),
    );
    let cloud = Cloud::connect(broker.port, &agent.device);
    // Let the cloud's persistent session reach the broker's disk, then take
    // the broker away before the agent ever connects.
    std::thread::sleep(Duration::from_millis(1500));
    broker.kill9();
    agent.start(&[]);

    let outbox = tmp.path().join("state/outbox");
    let dropped = wait_for(Duration::from_secs(10), || {
        let status = agent.status()?;
        let dropped = status["outbox_dropped"].as_u64()?;
        (dropped >= 20).then_some(dropped)
    })
    .expect("the cap was reached and the oldest reports dropped");
    let files = std::fs::read_dir(&outbox)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".msg"))
        })
        .count();
    assert!(files <= CAP, "{files} messages on disk, cap {CAP}");

    broker.restart();
    let mut seqs = BTreeSet::new();
    wait_for(Duration::from_secs(15), || {
        let bytes = cloud.recv_kind("/report", Duration::from_millis(200))?;
        seqs.insert(agent.open_report(&bytes).seq);
        // Enough to be past the backlog and into live reports.
        (seqs.len() >= CAP + 20).then_some(())
    })
    .expect("reports after the broker came back");
    let first = *seqs.first().unwrap();
    let last = *seqs.last().unwrap();
    eprintln!("dropped at least {dropped}; received seqs {first}..={last}");
    assert!(first > 1, "the oldest reports were dropped, not sent");
    let missing: Vec<u64> = (first..=last).filter(|s| !seqs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "gaps after the dropped ones: {missing:?}"
    );
    // Exactly the oldest ones were dropped: as many as the agent counted.
    let total_dropped = agent.status().unwrap()["outbox_dropped"].as_u64().unwrap();
    assert_eq!(
        first,
        total_dropped + 1,
        "dropped {total_dropped}, first received {first}"
    );
    agent.sigterm();
}
