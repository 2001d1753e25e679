//! The shard host sandbox against a malicious shard, with real processes:
//! `fixture-misbehave` tries, from its `init`, to read a root-only
//! `device.key` and a world-readable file outside its directory, to write
//! `state.json`, `/etc`, `/root`, `/tmp` and `/dev/shm`, to open an
//! `AF_PACKET` socket, to create SysV shared memory, to fork a child that
//! outlives it and to SIGKILL its parent (this test process, which runs the
//! supervisor as the agent does). Every attempt must fail, and the fixture
//! counts each one (`errors` = succeeded, `dropped` = refused) so "blocked"
//! cannot be mistaken for "never tried". Also: forged heartbeats do not keep
//! a hung shard running, a FIFO at a shard path is refused at once, and
//! `shards list` runs a library's constructor only inside the sandbox.
//!
//! The attacks need root (the agent's usual identity on a router and the one
//! that makes them dangerous); without it the tests say why they skip.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::{HostEvent, Supervisor};
use shardline_shared::msg::ShardFailure;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pids of processes whose name (`comm`) is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn every_attack_from_inside_a_shard_fails_and_the_agent_survives() {
    if !is_root() {
        eprintln!(
            "SKIP: the attacks are meaningful (and shard files loadable) only as root; run as root"
        );
        return;
    }
    let dir = shard_dir();
    // A state directory laid out like the agent's: 0700, device.key and state.json 0600, root's.
    let state = tempfile::Builder::new()
        .prefix("sl-state-")
        .tempdir()
        .expect("state dir");
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = state.path().join("device.key");
    std::fs::write(&key, b"SECRET-DEVICE-KEY-BYTES").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state_json = state.path().join("state.json");
    std::fs::write(&state_json, b"{\"trusted_keys\":[\"original\"]}").unwrap();
    std::fs::set_permissions(&state_json, std::fs::Permissions::from_mode(0o600)).unwrap();
    // World-readable and world-writable places: only Landlock keeps a shard out of them.
    let pid = std::process::id();
    let readable = std::env::temp_dir().join(format!("sl-readable-{pid}"));
    std::fs::write(&readable, b"not for shards").unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let writes = [
        state_json.display().to_string(),
        format!("/etc/sl-escape-{pid}"),
        format!("/root/sl-escape-{pid}"),
        std::env::temp_dir()
            .join(format!("sl-escape-{pid}"))
            .display()
            .to_string(),
        format!("/dev/shm/sl-escape-{pid}"),
    ];
    let config = format!(
        "mode = ok\nprivs = 1\nread = {},{}\nwrite = {}\npacket = 1\nsysv_shm = 1\nfork = 1\nkill_parent = 1",
        key.display(),
        readable.display(),
        writes.join(","),
    );
    // 1 privs + 2 reads + 5 writes + packet + shm + fork + kill.
    let attempts = 1 + 2 + writes.len() as u64 + 4;

    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(dir.path(), "fixture", "fixture-misbehave", &config, LIMITS);
    sup.activate("fixture", vec![s], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "host did not start: {events:?}");
    let host = sup.host_pid("fixture").expect("host pid");

    // The host runs as a dedicated unprivileged uid, with no capabilities,
    // no_new_privs and a seccomp filter.
    let uid = status_field(host, "Uid:");
    assert!(
        !uid.split_whitespace().any(|u| u == "0"),
        "host runs with uid 0: {uid}"
    );
    assert_eq!(status_field(host, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(host, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(host, "NoNewPrivs:"), "1");
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    assert_eq!(status_field(host, "Seccomp:"), "2");

    // The counters arrive with the next heartbeats.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut stats = Vec::new();
    while Instant::now() < deadline {
        let events = sup.poll(Instant::now());
        assert!(
            !events.iter().any(|e| matches!(e, HostEvent::Failed { .. })),
            "host failed: {events:?}"
        );
        stats = sup.shard_stats("fixture");
        if stats
            .first()
            .is_some_and(|s| s.dropped + s.errors >= attempts)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = stats.first().copied().expect("stats from the host");
    assert_eq!(
        st.errors, 0,
        "{} attack(s) succeeded (see the host's log lines 'ATTACK SUCCEEDED')",
        st.errors
    );
    assert_eq!(st.dropped, attempts, "not every attack was attempted");

    // Independent checks on the outside world.
    assert_eq!(
        std::fs::read(&state_json).unwrap(),
        b"{\"trusted_keys\":[\"original\"]}"
    );
    for w in &writes[1..] {
        assert!(!Path::new(w).exists(), "{w} was written by a shard");
    }
    assert!(
        processes_named("sl-escapee").is_empty(),
        "a child forked by the shard is running"
    );
    // This process (the agent's role) is alive — or this line would not run — and the
    // host still is too: the kill attempt did not take the host down either.
    assert!(sup.host_pid("fixture").is_some());
    let cgroups: Vec<String> = std::fs::read_to_string(format!("/proc/{host}/cgroup"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    sup.deactivate("fixture");
    assert!(
        !Path::new(&format!("/proc/{host}")).exists()
            || status_field(host, "State:").starts_with('Z'),
        "host survived its stop"
    );
    // Every cgroup the host was put in is gone.
    for line in cgroups {
        let rel = line.rsplit(':').next().unwrap_or("");
        if rel.contains("shardline-fixture") {
            let gone = !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .any(|m| Path::new(m).join(rel.trim_start_matches('/')).exists());
            assert!(gone, "host cgroup {rel} left behind");
        }
    }
    let _ = std::fs::remove_file(&readable);
}

#[test]
fn forged_heartbeats_do_not_keep_a_hung_shard_running() {
    if !is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(
        dir.path(),
        "fixture",
        "fixture-misbehave",
        "mode = hang\nafter_polls = 5\nforge_heartbeat = 1",
        LIMITS,
    );
    sup.activate("fixture", vec![s], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    let t_started = Instant::now();
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::Failed { .. })
    });
    let at = at.unwrap_or_else(|| {
        panic!("a hung shard with a heartbeat forger was never reported: {events:?}")
    });
    let took = at.duration_since(t_started);
    println!(
        "hang with forged heartbeats detected after {took:?} (polls at 20 ms, hang from the 5th)"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            HostEvent::Failed {
                failure: ShardFailure::Hung,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "hang reported after {took:?}"
    );
}

#[test]
fn a_fifo_at_a_shard_path_is_refused_at_once_not_reported_hung() {
    if !is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let dir = shard_dir();
    let fifo = dir.path().join("fixture-fifo@0.1.0.so");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    // Directly: the loader refuses it without blocking.
    let t0 = Instant::now();
    let err = shardline_agent::shardhost::loader::open_verified(dir.path(), &fifo, None, 0)
        .expect_err("a FIFO must be refused");
    assert!(t0.elapsed() < Duration::from_millis(200));
    assert!(err.to_string().contains("not a regular file"), "{err}");
    // Through a host: a load refusal, not a hang.
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let mut s = spec(dir.path(), "fixture", "fixture-misbehave", "", LIMITS);
    s.path = Some(fifo);
    let t0 = Instant::now();
    sup.activate("fixture", vec![s], t0).expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::Failed { .. })
    });
    assert!(
        at.is_some_and(|t| t.duration_since(t0) < Duration::from_secs(1)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            HostEvent::Failed { failure: ShardFailure::LoadRefused { reason }, .. }
                if reason.contains("not a regular file"))),
        "{events:?}"
    );
}

#[test]
fn shards_list_runs_constructors_only_inside_the_sandbox() {
    if !is_root() {
        eprintln!("SKIP: shards list loads only root- or caller-owned files; run as root");
        return;
    }
    let dir = shard_dir();
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("constructor-ran");
    let out = std::process::Command::new(AGENT)
        .args(["shards", "list"])
        .arg(dir.path())
        .env("SHARDLINE_FIXTURE_MARKER", &marker)
        .output()
        .expect("run shards list");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("fixture-misbehave@"))
        .unwrap_or_else(|| panic!("fixture not listed:\n{text}"));
    // The descriptor was still read (the library was loaded, sandboxed) ...
    assert!(line.contains(" ok"), "{line}");
    assert!(line.contains("fixture-misbehave "), "{line}");
    // ... but its constructor could not write with the caller's (root's) rights.
    assert!(
        !marker.exists(),
        "a constructor run by `shards list` wrote {}",
        marker.display()
    );
}

#[test]
fn a_hung_host_ends_itself_in_under_a_second_even_if_the_agent_polls_rarely() {
    if !is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    // The daemon polls its supervisor once a second; the host's own watchdog
    // must not depend on that.
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(
        dir.path(),
        "fixture",
        "fixture-misbehave",
        "mode = hang\nafter_polls = 2\nforge_heartbeat = 1",
        LIMITS,
    );
    sup.activate("fixture", vec![s], Instant::now())
        .expect("activate");
    let (events, at) = wait_for(&mut sup, Duration::from_secs(5), started);
    assert!(at.is_some(), "{events:?}");
    let t0 = Instant::now();
    let host = sup.host_pid("fixture").expect("host pid");
    // No supervisor poll from here until the host is dead (a zombie: nobody reaped it yet).
    let dead = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    while !dead(host) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    println!("hung host ended itself {took:?} after start, without an agent poll");
    assert!(dead(host), "hung host still alive after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "hung host ended after {took:?}"
    );
    let (events, at) = wait_for(&mut sup, Duration::from_secs(2), |e| {
        matches!(e, HostEvent::Failed { .. })
    });
    assert!(at.is_some(), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(
            e,
            HostEvent::Failed {
                failure: ShardFailure::Hung,
                ..
            }
        )),
        "{events:?}"
    );
}

#[test]
fn an_unprivileged_agents_host_gets_a_user_namespace_and_the_attacks_still_fail() {
    if !is_root() {
        eprintln!("SKIP: needs root to run the agent as another (unprivileged) user");
        return;
    }
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let installed = shard_dir();
    // A shard dir and a secret the unprivileged "agent" can reach: the secret is
    // the agent user's own 0600 file, so only Landlock keeps the host from it.
    let base = tempfile::Builder::new()
        .prefix("sl-unpriv-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shards = base.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    std::fs::set_permissions(&shards, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = shards.join("fixture-misbehave@0.1.0.so");
    std::fs::copy(lib_path(installed.path(), "fixture-misbehave"), &lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = base.path().join("device.key");
    std::fs::write(&key, b"SECRET").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(NOBODY)), None).unwrap();
    // A directory the agent user may write: the host must not.
    let writable = base.path().join("state");
    std::fs::create_dir(&writable).unwrap();
    nix::unistd::chown(&writable, Some(nix::unistd::Uid::from_raw(NOBODY)), None).unwrap();
    let escape = writable.join("state.json");
    let config = base.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "shard_dir = \"{}\"\n[[shard]]\nref = \"fixture-misbehave@0.1.0\"\nsha256 = \"{}\"\n\
             [shard.config]\nmode = \"ok\"\nprivs = \"1\"\nread = \"{}\"\nwrite = \"{}\"\n\
             kill_parent = \"1\"\nfork = \"1\"\npacket = \"1\"\n",
            shards.display(),
            hex::encode(sha256_file(&lib)),
            key.display(),
            escape.display(),
        ),
    )
    .unwrap();
    // The build directory may be one nobody cannot enter (CI keeps it under
    // /root/.cache): run a copy of the agent from the shared directory.
    let agent = base.path().join("shardline-agent");
    std::fs::copy(AGENT, &agent).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&agent)
        .args([
            "shards",
            "run",
            "fixture",
            "--no-cgroups",
            "--duration",
            "1.5",
            "--config",
        ])
        .arg(&config)
        .env("RUST_LOG", "info")
        .uid(NOBODY)
        // std drops supplementary groups itself when a root parent sets the uid.
        .gid(NOBODY)
        .output()
        .expect("run the agent as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The "agent" (this `shards run` process) survived the kill attempt and saw no failure.
    assert!(
        out.status.success(),
        "agent exit {}:\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("UserNamespace"),
        "host not in a user namespace:\n{stderr}"
    );
    let stats = stdout
        .lines()
        .rev()
        .find(|l| l.contains("stats shard[0]"))
        .unwrap_or_else(|| panic!("no stats:\n{stdout}"));
    assert!(
        stats.contains("errors: 0"),
        "an attack succeeded: {stats}\n{stderr}"
    );
    assert!(
        stats.contains("dropped: 6"),
        "not every attack was tried: {stats}"
    );
    assert!(
        !escape.exists(),
        "the host wrote into the agent's state dir"
    );
    assert!(processes_named("sl-escapee").is_empty());
}
