//! Child processes the loop owns: each in its own process group (so a
//! terminal's Ctrl-C reaches only the orchestrator, which then stops them in
//! order), logged to a file, and stopped on drop — SIGTERM to the whole
//! group, then SIGKILL after a grace period. Signals are sent with the
//! `kill` utility because xtask is plain `std` (no libc).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running child process group (killed on drop).
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` as the leader of a new process group, stdout and stderr
    /// appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `Some(status text)` once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(st))) => Some(st.to_string()),
            Some(Ok(None)) => None,
            Some(Err(e)) => Some(e.to_string()),
            None => Some("stopped".into()),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM to the group, SIGKILL to the group after `grace`; reaps the leader.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        signal("TERM", &group);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                // The leader is gone; anything it left in its group goes too.
                signal("KILL", &group);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal("KILL", &group);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// `kill -SIG -- TARGET` (a pid, or `-pgid` for a group); errors ignored
/// (the target may be gone already).
pub fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A temporary directory removed (with everything in it) on drop.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
    /// Keep it (e.g. for a post-mortem when the run failed).
    pub keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test leaves its logs and configuration for a post-mortem.
            eprintln!("kept {} (failed test)", self.path.display());
            return;
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A free TCP port on loopback BELOW the kernel's ephemeral range, for a
/// server the kit kills and starts again on the same port. A port from
/// [`free_tcp_port`] lies in the ephemeral range, and while its server is
/// down any outgoing connection on the machine may be given it (seen: a
/// restarted RabbitMQ node failed with `eaddrinuse`). Falls back to
/// [`free_tcp_port`] when the range leaves no room below it.
pub fn free_stable_tcp_port() -> u16 {
    stable_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .unwrap_or_else(free_tcp_port)
}

/// [`free_stable_tcp_port`] for UDP: for a shard host that a test or a
/// renewal restarts on its `listen` port (any socket bound to port 0 while
/// it is down may be given an ephemeral one). Falls back to
/// [`free_udp_port`].
pub fn free_stable_udp_port() -> u16 {
    stable_port(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .unwrap_or_else(free_udp_port)
}

/// A port below the ephemeral range that `free` says is free, or `None`
/// when the range leaves no room below it (or none was found).
fn stable_port(free: impl Fn(u16) -> bool) -> Option<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    const SPAN: u32 = 12_000;
    if low < SPAN + 1_024 {
        return None;
    }
    // Spread over the span per process, so that kits of test binaries run
    // one after another rarely start on the same ports.
    let seed = std::process::id().wrapping_mul(2_654_435_761) ^ (now_ms() as u32);
    for _ in 0..2_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low - SPAN + seed.wrapping_add(n.wrapping_mul(7_919)) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if free(port) {
            return Some(port);
        }
    }
    None
}

/// A free UDP port on loopback (bound, then released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
