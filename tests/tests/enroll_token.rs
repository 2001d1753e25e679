//! Self-enrolment with a bootstrap token, with real processes: the allocator
//! (embedded broker) issues a token through its operator API (`shardctl
//! token create`), a real agent that was never enrolled starts with that
//! token in its `allocator.enroll_token_file` and enrols itself; its signed
//! reports are then accepted, and the first instruction it gets (an
//! operator pin) is what tells it that it is enrolled: it stops sending
//! the request. Agents with
//! a wrong token and with an expired one are refused, and each refusal is
//! counted in the allocator's metrics.

use shardline_tests::kit::json::Json;
use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::proc::{Proc, TempDir};
use shardline_tests::kit::stack::{Capture, LoopConfig, Stack};
use shardline_tests::{bins, wait_until, workspace_root};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Sum of the allocator's metric lines starting with `prefix` (its
/// `/metrics`, with the operator's bearer token).
fn metric(st: &Stack, prefix: &str) -> f64 {
    let addr = st.api.trim_start_matches("http://");
    let token = std::fs::read_to_string(&st.token_file).expect("api token");
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.trim()
    );
    let mut text = String::new();
    if conn.write_all(req.as_bytes()).is_err() || conn.read_to_string(&mut text).is_err() {
        return 0.0;
    }
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_metric(st: &Stack, prefix: &str, at_least: f64, within: Duration) -> f64 {
    wait_until(within, Duration::from_millis(100), || {
        let v = metric(st, prefix);
        (v >= at_least).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "{prefix} = {}, wanted >= {at_least}\n---- allocator log ----\n{}",
            metric(st, prefix),
            st.allocator.log_tail(30)
        )
    })
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
}

fn create_token(st: &Stack, extra: &[&str]) -> String {
    let mut args = vec!["--json", "token", "create", "--tier", "premium"];
    args.extend_from_slice(extra);
    let out = st.shardctl(&args).expect("shardctl token create");
    let json = Json::parse(&out).expect("token create prints JSON");
    json.get("token")
        .as_str()
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_owned()
}

/// A second agent next to the stack's, under its own device id, key, state
/// directory and token file (same broker, same pinned allocator key).
fn extra_agent(st: &Stack, name: &str, token: &str) -> Proc {
    let d = st.dir.display().to_string();
    let text = std::fs::read_to_string(st.agent_config()).expect("agent.toml");
    let text = text
        .replace(
            &format!("id = \"{}\"", st.cfg.device),
            &format!("id = \"{name}\""),
        )
        .replace(&format!("{d}/device.key"), &format!("{d}/{name}.key"))
        .replace(&format!("{d}/agent-state"), &format!("{d}/{name}-state"))
        .replace(
            &st.enroll_token_file().display().to_string(),
            &format!("{d}/{name}-token"),
        );
    assert!(text.contains(&format!("{d}/{name}-token")), "{text}");
    let conf = st.dir.join(format!("{name}.toml"));
    std::fs::write(&conf, text).expect("write agent config");
    write_private(&st.dir.join(format!("{name}-token")), token);
    let mut cmd = Command::new(&st.bins.agent);
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .env("SHARDLINE_LOG", "info")
        .env_remove("NOTIFY_SOCKET");
    Proc::spawn(name, cmd, &st.dir.join(format!("{name}.log"))).expect("start agent")
}

fn device_status(st: &Stack, device: &str) -> Result<String, String> {
    st.shardctl(&["--json", "device", device])
}

#[test]
fn an_agent_enrols_itself_with_a_bootstrap_token_and_bad_tokens_are_refused() {
    let bins = bins();
    let tmp = TempDir::new("sl-enroll-token").expect("temp dir");
    // Quiet, then a bank session: a need for encryption earns an instruction.
    let capture = tmp.path.join("traffic.pcap");
    let phases = [
        Phase::Quiet(Duration::from_secs(1)),
        Phase::Banking(Duration::from_secs(20)),
        Phase::Quiet(Duration::from_secs(60)),
    ];
    std::fs::write(
        &capture,
        pcap::write_pcap(&pcap::scenario(&phases, 1_700_000_000_000_000_000)),
    )
    .expect("write pcap");
    let mut cfg = LoopConfig::demo(Capture::Pcap(capture));
    cfg.device = "tok-router".into();
    cfg.enroll_with_token = true;
    let mut st = Stack::prepare(&workspace_root(), &bins, &tmp.path, cfg)
        .unwrap_or_else(|e| panic!("setting up the loop: {e}"));
    assert!(
        device_status(&st, "tok-router").is_err(),
        "the device is not enrolled before its agent runs"
    );

    // 1. A good token: the agent enrols itself.
    let token = create_token(&st, &[]);
    write_private(&st.enroll_token_file(), &format!("{token}\n"));
    st.start_agent().expect("start the agent");
    wait_metric(
        &st,
        "shardline_enrolments_total",
        1.0,
        Duration::from_secs(20),
    );
    let detail = device_status(&st, "tok-router").expect("the device is enrolled");
    let detail = Json::parse(&detail).expect("device JSON");
    assert_eq!(detail.get("tier").as_str(), Some("premium"), "{detail:?}");
    // Its signed reports are accepted from then on.
    wait_metric(
        &st,
        "shardline_reports_accepted_total",
        1.0,
        Duration::from_secs(20),
    );
    // An instruction for it is the agent's evidence: it writes its marker
    // and stops sending the request. The operator pins a shard so that one
    // is sent whatever the replayed traffic earns.
    // The qos shaper needs the device's own addresses (as an operator sets
    // them once the device exists).
    st.configure_device().expect("shardctl config set");
    st.shardctl(&["pin", "tok-router", "qos-dscp"])
        .expect("shardctl pin");
    let marker = st.dir.join("agent-state/enrolled.json");
    let seen = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        std::fs::read_to_string(&marker).ok()
    });
    let agent_log = || st.agent.as_ref().map(|a| a.log_text()).unwrap_or_default();
    let marker_text = seen.unwrap_or_else(|| {
        panic!(
            "no enrolment marker\n---- device ----\n{:?}\n---- agent log ----\n{}\n---- allocator log ----\n{}",
            device_status(&st, "tok-router"),
            agent_log(),
            st.allocator.log_tail(30)
        )
    });
    assert!(marker_text.contains("tok-router"), "{marker_text}");
    let sent = |log: &str| log.matches("enrolment request sent").count();
    let before = sent(&agent_log());
    assert!(before >= 1, "{}", agent_log());
    // Longer than the first retry wait (5 s): no further request.
    std::thread::sleep(Duration::from_secs(6));
    let log = agent_log();
    assert_eq!(sent(&log), before, "requests after the evidence:\n{log}");
    assert!(!log.contains(&token), "the token is never logged");
    let status = std::fs::read_to_string(st.dir.join("agent-state/status.json")).unwrap();
    assert!(!status.contains(&token), "the token is not in status.json");
    println!("good token: enrolled after {before} request(s)");

    // 2. A wrong token and an expired one: refused and counted.
    let bad_before = metric(
        &st,
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
    );
    let stale_before = metric(
        &st,
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"stale\"}",
    );
    let expired = create_token(&st, &["--ttl-s", "1"]);
    std::thread::sleep(Duration::from_millis(1_500));
    let mut wrong = extra_agent(&st, "tok-wrong", &"00".repeat(32));
    let mut late = extra_agent(&st, "tok-late", &expired);
    wait_metric(
        &st,
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"bad_signature\"}",
        bad_before + 1.0,
        Duration::from_secs(20),
    );
    wait_metric(
        &st,
        "shardline_messages_dropped_total{kind=\"enroll\",reason=\"stale\"}",
        stale_before + 1.0,
        Duration::from_secs(20),
    );
    assert!(
        device_status(&st, "tok-wrong").is_err(),
        "wrong token enrolled"
    );
    assert!(
        device_status(&st, "tok-late").is_err(),
        "expired token enrolled"
    );
    assert_eq!(
        metric(&st, "shardline_enrolments_total"),
        1.0,
        "only the good token enrolled a device"
    );
    for (p, name) in [(&mut wrong, "tok-wrong"), (&mut late, "tok-late")] {
        assert!(
            p.exited().is_none(),
            "{name} keeps running:\n{}",
            p.log_text()
        );
        assert!(
            !st.dir.join(format!("{name}-state/enrolled.json")).exists(),
            "{name} believes it is enrolled"
        );
        p.stop(Duration::from_secs(5));
    }
    st.check_alive().expect("allocator and agent still run");
    st.stop();
}
