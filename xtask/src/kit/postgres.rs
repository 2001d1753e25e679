//! A throwaway PostgreSQL server for tests: a fresh cluster (`initdb`, trust
//! authentication) in a temporary directory, listening on loopback on a
//! free port with `fsync=on` (so commit timings are real), stopped and
//! removed on drop. As root it runs as the `postgres` system user, because
//! `initdb` and `postgres` refuse to run as root.
//!
//! Binaries are found on `PATH`, then under `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package, which `cargo xtask setup` installs).

use super::proc::{free_tcp_port, Proc, TempDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running throwaway server (stopped, its directory removed, on drop).
#[derive(Debug)]
pub struct TestPostgres {
    // Field order is drop order: the server stops before its directory goes.
    server: Proc,
    dir: TempDir,
    pub port: u16,
}

impl TestPostgres {
    /// Starts a fresh server in a new temporary directory.
    pub fn start_temp() -> Result<TestPostgres, String> {
        let dir = TempDir::new("shardline-pg")?;
        Self::start_in(dir)
    }

    /// Starts a fresh server in `dir` (created; its data directory, socket
    /// and log go there), removing `dir` on drop. Every directory above it
    /// must be searchable by the `postgres` user when running as root.
    pub fn start(dir: &Path) -> Result<TestPostgres, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Self::start_in(TempDir {
            path: dir.to_owned(),
            keep: false,
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log so far (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }

    /// Its directory (data directory, socket and log).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
}

/// Whether [`TestPostgres`] can find a server to start (tests that need one
/// skip, saying why, when it cannot).
pub fn installed() -> bool {
    bin_dir().is_some()
}

/// The directory holding both `initdb` and `postgres`, if installed.
pub fn bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has_both(d)) {
            return Some(d);
        }
    }
    // Debian: /usr/lib/postgresql/<major>/bin, newest major first.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `program` as the `postgres` user when we are root, else as ourselves.
fn as_server_user(program: &Path) -> Command {
    if !is_root() {
        return Command::new(program);
    }
    // setpriv execs the program itself (no wrapper process left between
    // the process group leader and the server); runuser is the fallback.
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    };
    cmd.arg(program);
    cmd
}

fn run(mut cmd: Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestPostgres {
    /// An `Err` says why no server could be started (PostgreSQL not
    /// installed, no `postgres` user when root, a failed start).
    fn start_in(dir: TempDir) -> Result<TestPostgres, String> {
        let bin = bin_dir().ok_or(
            "PostgreSQL is not installed (no initdb and postgres on PATH or under \
             /usr/lib/postgresql/*/bin; `cargo xtask setup` as root installs Debian's postgresql)",
        )?;
        let data = dir.path.join("data");
        if is_root() {
            run({
                let mut c = Command::new("chown");
                c.arg("postgres:").arg(&dir.path);
                c
            })
            .map_err(|e| format!("giving the test directory to the postgres user: {e}"))?;
        }
        run({
            let mut c = as_server_user(&bin.join("initdb"));
            // No fsync of the template files: the cluster lives for one test.
            c.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ]);
            c
        })?;
        let port = free_tcp_port();
        if port == 0 {
            return Err("no free TCP port on loopback".into());
        }
        let mut cmd = as_server_user(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
            .arg("-k")
            .arg(&dir.path)
            .args(["-c", "fsync=on", "-c", "max_connections=50"]);
        let mut server = Proc::spawn("postgres", cmd, &dir.path.join("postgres.log"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.exited() {
                return Err(format!(
                    "postgres exited ({status}) while starting: {}",
                    server.log_tail(20)
                ));
            }
            if server
                .log_text()
                .contains("database system is ready to accept connections")
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}: {}",
                    server.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(TestPostgres { server, dir, port })
    }
}
