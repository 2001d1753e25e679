//! The agent binary's edges: `check-config` (errors naming file, line and
//! field, exit 78; what the file names must exist on the device; the device
//! public key for enrolment), `run`'s start checks and exit codes (every
//! configuration, key and state fault is found before capture starts, with a
//! sysexits code), and the systemd contract of `run`: READY=1, WATCHDOG=1,
//! SIGHUP reload (RELOADING=1, the new QoS window takes effect), SIGTERM
//! (STOPPING=1, clean exit 0).

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

const PINNED: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

/// A config in `dir` for a device without a broker (nothing here connects):
/// `monitor` and `shards` are the given TOML lines.
fn write_config(dir: &std::path::Path, monitor: &str, shards: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[device]\nid = \"env-1\"\nkey_file = \"device.key\"\n\n\
             [allocator]\nkeys = [\"{PINNED}\"]\n\n\
             [broker]\nurl = \"mqtt://127.0.0.1:1\"\n\n\
             [monitor]\n{monitor}\n\n\
             [shards]\n{shards}\n\n\
             [state]\ndir = \"state\"\n\n[requests]\nsocket = \"agent.sock\"\n"
        ),
    )
    .unwrap();
    path
}

fn agent(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(AGENT)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("SHARDLINE_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn check_config_refuses_a_missing_interface_and_shard_dir_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // Line 12: the interfaces; line 15: the shard directory.
    let path = write_config(dir.path(), "interfaces = [\"nosuch0\"]", "dir = \"shards\"");
    let out = agent(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        err.contains(&format!(
            "{p}:12: field `monitor.interfaces`: no network interface \"nosuch0\""
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{p}:15: field `shards.dir`: shard directory ")),
        "{err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    assert!(out.stdout.is_empty(), "not called valid");

    // A file where the directory should be.
    std::fs::write(dir.path().join("shards"), b"not a dir").unwrap();
    let out = agent(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));

    // Both in place (the loopback interface exists on every Linux device).
    std::fs::remove_file(dir.path().join("shards")).unwrap();
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    let path = write_config(dir.path(), "interfaces = [\"lo\"]", "dir = \"shards\"");
    let out = agent(&["check-config"], &path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("configuration is valid"), "{text}");
    assert!(text.contains("capture:         lo"), "{text}");
    assert!(text.contains("assignment:      none"), "{text}");
}

#[test]
fn check_config_names_a_defaulted_shard_dir_and_a_missing_capture_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "pcap = \"gone.pcap\"", "");
    let out = agent(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        err.contains(&format!("{p}:12: field `monitor.pcap`: capture file ")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{p}: field `shards.dir` (not set; the default applies): shard directory {}",
            dir.path().join("state/shards").display()
        )),
        "{err}"
    );
    // Enrolment works before the device is cabled: --print-pubkey checks
    // the file, not the machine.
    let out = agent(&["check-config", "--print-pubkey"], &path);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 64);
}

#[test]
fn run_refuses_a_missing_interface_with_78_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    let path = write_config(dir.path(), "interfaces = [\"nosuch0\"]", "dir = \"shards\"");
    let out = agent(&["run"], &path);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no network interface \"nosuch0\""), "{err}");
    // Nothing was set up: no state directory, no device key.
    assert!(!dir.path().join("state").exists());
    assert!(!dir.path().join("device.key").exists());
}

#[test]
fn run_refuses_a_bad_device_key_with_78_before_capture_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    // A live interface: the old start order began capturing on it before
    // the key was read, then exited 1.
    let path = write_config(dir.path(), "interfaces = [\"lo\"]", "dir = \"shards\"");
    let key = dir.path().join("device.key");
    std::fs::write(&key, "not hex\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = agent(&["run"], &path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("not 64 hex digits"), "{err}");
    assert!(!err.contains("capturing"), "capture started: {err}");
    assert!(!dir.path().join("state/state.json").exists());

    // A readable-by-others key is a configuration fault too.
    std::fs::write(&key, format!("{}\n", "11".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&["run"], &path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("lets others read the secret"), "{err}");
    assert!(!err.contains("capturing"), "capture started: {err}");
}

#[test]
fn run_exits_65_on_a_corrupt_state_file_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    let path = write_config(dir.path(), "", "dir = \"shards\"");
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/state.json"), b"{ torn").unwrap();
    let out = agent(&["run"], &path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("state.json is not valid"), "{err}");
    // Refused before the outbox, the link or capture were set up.
    assert!(!dir.path().join("state/outbox").exists(), "{err}");
}

#[test]
fn the_units_do_not_restart_what_a_restart_cannot_fix() {
    // The codes `run` documents as needing the operator are exactly those
    // the agent's unit refuses to restart on.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/shardline-agent.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find(|l| l.starts_with("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus");
    let mut codes: Vec<u8> = line["RestartPreventExitStatus=".len()..]
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    codes.sort();
    use shardline_agent::daemon::cli::{EXIT_CONFIG, EXIT_DATAERR, EXIT_NOPERM};
    assert_eq!(codes, vec![EXIT_DATAERR, EXIT_NOPERM, EXIT_CONFIG]);
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
