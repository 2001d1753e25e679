//! Issue 20, remote diagnostics end to end with real processes: the
//! allocator (embedded broker) and an enrolled agent running the vpn from a
//! replayed bank session. `shardctl diagnostics DEVICE --ask` sends the ask
//! as a signed instruction; the agent answers with its own recent log
//! lines (from its in-memory ring) and its status, signed by its key. A
//! forged answer (another key) and an oversized one, published on the
//! device's topic by a plain MQTT client, are refused and counted.

use rumqttc::{Client, MqttOptions, QoS};
use shardline_shared::diag::{DiagStatus, Diagnostics, MAX_DIAGNOSTICS_BYTES};
use shardline_shared::sign::KeyPair;
use shardline_shared::{topics, DeviceId};
use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::proc::TempDir;
use shardline_tests::kit::stack::{Capture, LoopConfig, Stack};
use shardline_tests::{bins, wait_until, workspace_root};
use std::time::Duration;

fn metric(st: &Stack, name: &str) -> f64 {
    let token = std::fs::read_to_string(&st.token_file).unwrap();
    let r = shardline_allocator::service::http::request(
        &st.api,
        "GET",
        "/metrics",
        Some(token.trim()),
        None,
    )
    .unwrap();
    r.body
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn an_agent_answers_with_its_real_log_lines_and_forgeries_are_refused() {
    let bins = bins();
    let tmp = TempDir::new("sl-diagnostics").expect("temp dir");
    let capture = tmp.path.join("traffic.pcap");
    let phases = [
        Phase::Quiet(Duration::from_secs(1)),
        Phase::Banking(Duration::from_secs(60)),
    ];
    std::fs::write(
        &capture,
        pcap::write_pcap(&pcap::scenario(&phases, 1_700_000_000_000_000_000)),
    )
    .expect("write pcap");
    let mut cfg = LoopConfig::demo(Capture::Pcap(capture));
    cfg.device = "diag-1".into();
    let mut st = Stack::prepare(&workspace_root(), &bins, &tmp.path, cfg)
        .unwrap_or_else(|e| panic!("setting up: {e}"));
    st.start_agent().expect("start the agent");
    // The vpn runs on the device (so its status has shards to show).
    let running = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let v = st.device().ok()?;
        (v.running.contains_key("vpn")).then_some(())
    });
    assert!(
        running.is_some(),
        "vpn running\n{}",
        st.agent
            .as_ref()
            .map(|a| a.log_tail(30))
            .unwrap_or_default()
    );

    // Ask and wait for the answer.
    let text = st
        .shardctl(&["diagnostics", "diag-1", "--ask"])
        .unwrap_or_else(|e| panic!("shardctl diagnostics --ask: {e}"));
    assert!(text.contains("last "), "{text}");
    let json = st
        .shardctl(&["--json", "diagnostics", "diag-1"])
        .expect("diagnostics json");
    let v = shardline_tests::kit::json::Json::parse(&json).expect("json");
    let lines: Vec<String> = v
        .get("log_lines")
        .items()
        .iter()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();
    // Real lines of this agent: its connection and the vpn it started.
    assert!(
        lines.iter().any(|l| l.contains("connected to the broker")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("starting capability") && l.contains("vpn")),
        "{lines:#?}"
    );
    assert!(lines.len() <= 200);
    assert!(json.contains("\"arch\""), "{json}");
    assert!(json.contains(std::env::consts::ARCH), "{json}");
    assert!(
        json.contains("vpn-tunnel"),
        "the status lists the running shards: {json}"
    );
    let seq = v.get("request_seq").as_u64().expect("request_seq");
    let received = metric(&st, "shardline_diagnostics_received_total");
    assert!(received >= 1.0);

    // Forged and oversized answers from a plain client on the device topic.
    let mut o = MqttOptions::new("diag-forger", "127.0.0.1", st.mqtt_port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(o, 10);
    let device = DeviceId::new("diag-1").unwrap();
    let forged = Diagnostics {
        device: device.clone(),
        request_seq: seq + 1,
        at_ms: 1,
        status: DiagStatus {
            agent_version: "forged".into(),
            uptime_s: 0,
            arch: "x".into(),
            shards: vec![],
            capture_source: "x".into(),
            broker_connected: true,
            last_errors: vec![],
        },
        log_lines: vec!["all is well".into()],
        truncated: false,
    };
    let mut big = forged.seal(&KeyPair::from_seed(&[3; 32]));
    big.resize(MAX_DIAGNOSTICS_BYTES + 100, b'x');
    for bytes in [forged.seal(&KeyPair::from_seed(&[9; 32])), big] {
        client
            .publish(topics::diagnostics(&device), QoS::AtLeastOnce, false, bytes)
            .unwrap();
    }
    let refused = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let _ = conn.recv_timeout(Duration::from_millis(10));
        (metric(&st, "shardline_diagnostics_refused_total") >= 2.0).then_some(())
    });
    assert!(refused.is_some(), "both refused and counted");
    let after = st
        .shardctl(&["--json", "diagnostics", "diag-1"])
        .expect("diagnostics json");
    assert_eq!(after, json, "nothing of the forgeries was kept");
    st.stop();
}
