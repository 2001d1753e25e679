//! The full loop with real processes: the allocator (embedded broker, or a
//! real mosquitto), an enrolled agent replaying a capture of a TLS session
//! to a bank and then game traffic. The allocator must grant `vpn` and then
//! `qos` with signed instructions, the agent must apply them (its shard
//! host processes really run the shards: the tunnel's socket is bound, the
//! shaper forwards datagrams) and report them running, and both must be
//! released once their traffic stops.

use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::proc::TempDir;
use shardline_tests::kit::stack::{Broker, Capture, DeviceView, LoopConfig, Stack};
use shardline_tests::{bins, shard_hosts, wait_until, workspace_root, Mosquitto};
use std::net::UdpSocket;
use std::time::Duration;

fn logs(st: &Stack) -> String {
    format!(
        "---- allocator log ----\n{}\n---- agent log ----\n{}",
        st.allocator.log_tail(25),
        st.agent
            .as_ref()
            .map(|a| a.log_tail(40))
            .unwrap_or_default()
    )
}

/// Polls the allocator's view of the device until `pred` holds.
fn wait_view(
    st: &mut Stack,
    within: Duration,
    what: &str,
    pred: impl Fn(&DeviceView) -> bool,
) -> DeviceView {
    let mut last = None;
    let found = wait_until(within, Duration::from_millis(100), || {
        if let Err(e) = st.check_alive() {
            panic!("{what}: {e}");
        }
        let v = st.device().ok()?;
        let ok = pred(&v);
        last = Some(v.clone());
        ok.then_some(v)
    });
    found.unwrap_or_else(|| {
        panic!(
            "{what}: not within {within:?}; last view {last:#?}\n{}",
            logs(st)
        )
    })
}

/// The shard states (id -> state) the agent itself reports in `status.json`
/// for one capability.
fn agent_shard_states(st: &Stack, capability: &str) -> Vec<(String, String)> {
    let Some(status) = st.agent_status() else {
        return Vec::new();
    };
    status
        .get("shards")
        .items()
        .iter()
        .filter(|s| s.get("capability").as_str() == Some(capability))
        .map(|s| {
            (
                s.get("shard").get("id").as_str().unwrap_or("?").to_owned(),
                s.get("state").as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn udp_port_in_use(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_err()
}

/// The two loops run one after the other: each is an allocator, an agent,
/// shard hosts and a paced capture replay, and on a 2-core machine two at
/// once starve the replay (its windows then miss the traffic they should
/// carry), which tests the machine, not the loop.
static ONE_LOOP_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn full_loop(
    tag: &str,
    broker: impl FnOnce(&std::path::Path) -> Option<(Broker, Option<Mosquitto>)>,
) {
    let _one = ONE_LOOP_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bins = bins();
    let tmp = TempDir::new(&format!("sl-full-loop-{tag}")).expect("temp dir");
    let Some((broker, _mosquitto)) = broker(&tmp.path) else {
        return;
    };
    let capture = tmp.path.join("traffic.pcap");
    let phases = [
        Phase::Quiet(Duration::from_secs(1)),
        Phase::Banking(Duration::from_secs(6)),
        Phase::Gaming(Duration::from_secs(6)),
        Phase::Quiet(Duration::from_secs(120)),
    ];
    std::fs::write(
        &capture,
        pcap::write_pcap(&pcap::scenario(&phases, 1_700_000_000_000_000_000)),
    )
    .expect("write pcap");
    let mut cfg = LoopConfig::demo(Capture::Pcap(capture));
    cfg.device = format!("loop-{tag}");
    cfg.broker = broker;
    cfg.hysteresis_ms = 2_000;
    let mut st = Stack::prepare(&workspace_root(), &bins, &tmp.path, cfg)
        .unwrap_or_else(|e| panic!("setting up the loop: {e}"));
    assert!(
        st.enrolled.contains(&st.cfg.device),
        "enrol answer names the device: {}",
        st.enrolled
    );
    st.start_agent().expect("start the agent");
    let agent_pid = st.agent.as_ref().map(|a| a.pid()).expect("agent pid");

    // 1. The bank session: vpn granted, applied, running in a shard host.
    let v = wait_view(
        &mut st,
        Duration::from_secs(20),
        "vpn granted and reported running",
        |v| v.leases.contains_key("vpn") && v.running.get("vpn") == v.leases.get("vpn"),
    );
    let vpn = &v.leases["vpn"];
    assert!(
        vpn.contains(&"vpn-tunnel".to_owned()) && vpn.contains(&"auth-psk".to_owned()),
        "{vpn:?}"
    );
    assert!(
        vpn.iter().any(|s| s.starts_with("crypto-")),
        "a crypto shard: {vpn:?}"
    );
    assert!(
        v.applied_instruction_seq >= 1 && v.instructions_applied >= 1,
        "the device acknowledged the instruction as applied: {v:?}"
    );
    assert!(
        v.classes
            .iter()
            .any(|c| c.eq_ignore_ascii_case("sensitive")),
        "{v:?}"
    );
    let states = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let s = agent_shard_states(&st, "vpn");
        (s.len() == 3 && s.iter().all(|(_, state)| state == "Running")).then_some(s)
    });
    assert!(
        states.is_some(),
        "the agent reports the 3 vpn shards Running: {:?}",
        agent_shard_states(&st, "vpn")
    );
    assert!(
        !shard_hosts(agent_pid).is_empty(),
        "a shard host process runs under the agent"
    );
    assert!(
        udp_port_in_use(st.ports.tunnel_bind),
        "the vpn-tunnel shard bound its socket (its configuration came in the signed instruction)"
    );

    // 2. Game traffic: qos granted; the shaper really forwards datagrams.
    let forward = UdpSocket::bind(("127.0.0.1", st.ports.shaper_forward))
        .expect("bind the shaper's forward port");
    forward
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let v = wait_view(
        &mut st,
        Duration::from_secs(20),
        "qos granted and reported running",
        |v| v.leases.contains_key("qos") && v.running.get("qos") == v.leases.get("qos"),
    );
    assert_eq!(
        v.leases["qos"],
        vec!["qos-dscp".to_owned(), "qos-shaper".to_owned()]
    );
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let forwarded = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        tx.send_to(b"probe", ("127.0.0.1", st.ports.shaper_listen))
            .ok()?;
        let mut buf = [0u8; 64];
        let (n, _) = forward.recv_from(&mut buf).ok()?;
        (&buf[..n] == b"probe").then_some(())
    });
    assert!(
        forwarded.is_some(),
        "the qos-shaper shard forwards datagrams\n{}",
        logs(&st)
    );

    // 3. The bank session ended: vpn released, its host gone, its socket closed.
    wait_view(&mut st, Duration::from_secs(20), "vpn released", |v| {
        !v.leases.contains_key("vpn") && !v.running.contains_key("vpn")
    });
    let closed = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (!udp_port_in_use(st.ports.tunnel_bind)).then_some(())
    });
    assert!(
        closed.is_some(),
        "the vpn shard host stopped (its socket is closed)"
    );

    // 4. Quiet: qos released too; no shard host left.
    let v = wait_view(&mut st, Duration::from_secs(20), "qos released", |v| {
        v.leases.is_empty() && v.running.is_empty()
    });
    assert!(
        v.applied_instruction_seq >= 3,
        "activations and releases were all applied: {v:?}"
    );
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        shard_hosts(agent_pid).is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "no shard host left: {:?}",
        shard_hosts(agent_pid)
    );
    let devices = st.shardctl(&["devices"]).expect("shardctl devices");
    assert!(
        devices.contains(&st.cfg.device) && devices.contains("online"),
        "{devices}"
    );
    st.stop();
}

#[test]
fn full_loop_with_the_embedded_broker() {
    full_loop("embedded", |_| Some((Broker::Embedded, None)));
}

#[test]
fn full_loop_with_mosquitto() {
    full_loop("mosquitto", |dir| {
        let m = Mosquitto::start(dir)?;
        Some((Broker::External(m.url()), Some(m)))
    });
}
