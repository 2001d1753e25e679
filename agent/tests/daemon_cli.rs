//! The agent binary's edges: `check-config` (errors naming file, line and
//! field, exit 78; the device public key for enrolment), and the systemd
//! contract of `run`: READY=1, WATCHDOG=1, SIGHUP reload (RELOADING=1, the
//! new QoS window takes effect), SIGTERM (STOPPING=1, clean exit 0).

mod daemon_support;

use daemon_support::{Agent, Broker, Cloud};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_shardline-agent");

#[test]
fn check_config_names_file_line_and_field_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[device]\nid = \"a/b\"\n\n[allocator]\nkeys = []\n\n[broker]\nurl = \"mqtt://h\"\n",
    )
    .unwrap();
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: field `device.id`", path.display())),
        "{err}"
    );

    let missing = dir.path().join("nope.toml");
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[test]
fn check_config_prints_the_device_public_key_for_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path(), "cli-1", "mqtt://127.0.0.1:1", 1000, "");
    let key_file = dir.path().join("device.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Same key on a second call; the summary shows it too.
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&hex::encode(agent.public_key)), "{text}");
    assert!(text.contains("cli-1"), "{text}");
}

fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {want} within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_ready_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(dir.path()) else {
        return;
    };
    let mut agent = Agent::new(dir.path(), "notify-1", &broker.url(), 1000, "");
    let cloud = Cloud::connect(broker.port, &agent.device);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    agent.start(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    recv_until(&sock, "READY=1", Duration::from_secs(10));
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3));

    // One-second windows: at most a couple of reports in 1.5 s.
    cloud
        .recv_kind("/report", Duration::from_secs(5))
        .expect("a report");
    let slow = count_reports(&cloud, Duration::from_millis(1500));
    assert!(slow <= 2, "{slow} reports with a 1 s window");

    let text = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("window_ms = 1000", "window_ms = 50");
    std::fs::write(&agent.config, text).unwrap();
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    recv_until(&sock, "RELOADING=1", Duration::from_secs(3));
    recv_until(&sock, "READY=1", Duration::from_secs(3));
    let fast = count_reports(&cloud, Duration::from_millis(1500));
    assert!(
        fast >= 10,
        "{fast} reports in 1.5 s after reloading a 50 ms window"
    );
    assert!(agent.log().contains("configuration reloaded"));

    let status = agent.sigterm();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    recv_until(&sock, "STOPPING=1", Duration::from_secs(1));
    assert!(agent.log().contains("stopped"), "{}", agent.log());
}

fn count_reports(cloud: &Cloud, window: Duration) -> usize {
    cloud
        .drain(window)
        .iter()
        .filter(|(t, _)| t.ends_with("/report"))
        .count()
}
