//! The daemon with the real monitoring pipeline: a capture file replayed in
//! real time (the demo mode that needs no root) ends up, classified, in the
//! device's signed reports: active flows and bytes per traffic class.

mod daemon_support;

use daemon_support::{wait_for, write_udp_flows_pcap, Agent, Broker, Cloud};
use std::time::Duration;

const FLOWS: u32 = 300;

#[test]
fn replayed_traffic_shows_up_classified_in_the_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(tmp.path()) else {
        return;
    };
    let pcap = tmp.path().join("flows.pcap");
    write_udp_flows_pcap(&pcap, FLOWS);
    let mut agent = Agent::new(tmp.path(), "capture-1", &broker.url(), 1000, "");
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        "[monitor]\n",
        &format!("[monitor]\npcap = \"{}\"\n", pcap.display()),
    );
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);

    // The file plays over one second and loops, so a one-second window sees
    // (nearly) every flow.
    let report = wait_for(Duration::from_secs(10), || {
        let r = agent.open_report(&cloud.recv_kind("/report", Duration::from_millis(300))?);
        let flows: u32 = r.classes.iter().map(|c| c.active_flows).sum();
        (flows >= FLOWS * 8 / 10).then_some(r)
    })
    .expect("a report counting the replayed flows");
    let bytes: u64 = report.classes.iter().map(|c| c.bytes).sum();
    let packets: u64 = report.classes.iter().map(|c| c.packets).sum();
    assert!(
        packets > 0 && bytes >= packets * 148,
        "{packets} packets, {bytes} bytes"
    );
    assert!(report.window_ms >= 900, "window {} ms", report.window_ms);
    agent.sigterm();
}
