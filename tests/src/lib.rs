//! Helpers for the workspace-level integration tests: locate (and build
//! once) the real programs in this test run's target directory, a real
//! mosquitto on a free loopback port, waiting with a deadline, and the
//! agent's shard host processes. The loop itself (shards, catalog,
//! allocator, enrolment, agent, traffic) comes from xtask's std-only kit,
//! the same code `cargo xtask demo` runs.
#![forbid(unsafe_code)]

pub use xtask::kit;

use kit::proc::{free_tcp_port, Proc};
use kit::stack::Bins;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_owned()
}

/// `target/<profile>` of this test run (the test binary is in its `deps/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_owned()
}

/// Builds the agent, the allocator and the shard libraries into this run's
/// target directory and profile (once per test binary) and returns them.
pub fn bins() -> Bins {
    static BUILT: OnceLock<Result<Bins, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile = profile_dir();
            let target = profile.parent().ok_or("no target dir")?.to_owned();
            let release = profile.file_name().is_some_and(|n| n == "release");
            kit::stack::build(&workspace_root(), &target, release)?;
            Bins::in_profile(&profile)
        })
        .clone()
        .unwrap_or_else(|e| panic!("building the loop's programs: {e}"))
}

/// Effective uid 0 (read from /proc: no libc here).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A real mosquitto on a free loopback port; stopped on drop.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
}

impl Mosquitto {
    /// `None`, with the reason printed, when mosquitto is not installed.
    pub fn start(dir: &Path) -> Option<Mosquitto> {
        let Some(bin) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            println!("SKIP: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        };
        let port = free_tcp_port();
        let conf = dir.join("mosquitto.conf");
        let user = if is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}log_dest stderr\n"),
        )
        .expect("write mosquitto.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let proc =
            Proc::spawn("mosquitto", cmd, &dir.join("mosquitto.log")).expect("start mosquitto");
        let m = Mosquitto { port, proc };
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .unwrap_or_else(|| panic!("mosquitto did not listen on {port}:\n{}", m.proc.log_text()));
        Some(m)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Calls `f` every `every` until it returns `Some` or `within` has passed.
pub fn wait_until<T>(
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Pids of the processes whose parent is `pid` and whose command line has a
/// `host` argument: the agent's shard host processes.
pub fn shard_hosts(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{child}/status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if ppid == Some(pid) && cmdline.split(|&b| b == 0).any(|a| a == b"host") {
            out.push(child);
        }
    }
    out
}
