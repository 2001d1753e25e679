//! Ctrl-C without a signal handler (xtask is plain `std`, no libc).
//!
//! A terminal's Ctrl-C sends SIGINT to its foreground process group. The
//! orchestrator re-executes itself through `env --ignore-signal=INT`, so it
//! survives SIGINT, and keeps a sentinel child (`sleep`, with SIGINT reset
//! to the default) in its own, foreground, group. Ctrl-C kills only the
//! sentinel; the orchestrator sees it gone and shuts everything down in
//! order. The programs it starts live in process groups of their own, so
//! they never see the terminal's SIGINT and are stopped by the orchestrator.
//! Where `env` lacks these options the run still works; Ctrl-C then ends
//! it without cleanup, which is said at start.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// Set in the environment of the re-executed orchestrator.
const MARK: &str = "SHARDLINE_XTASK_SIGINT_IGNORED";

fn env_supports_signals() -> bool {
    Command::new("env")
        .args(["--ignore-signal=INT", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Re-executes the current command under `env --ignore-signal=INT` once.
/// Returns only when that is not possible (or already done).
pub fn reexec_ignoring_sigint() {
    if std::env::var_os(MARK).is_some() || !env_supports_signals() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = Command::new("env")
        .arg("--ignore-signal=INT")
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(MARK, "1")
        .exec();
    eprintln!("xtask: cannot re-execute to handle Ctrl-C ({err}); continuing without");
}

/// Watches for Ctrl-C through the sentinel child.
#[derive(Debug)]
pub struct Interrupt {
    sentinel: Option<Child>,
}

impl Interrupt {
    pub fn watch() -> Interrupt {
        if std::env::var_os(MARK).is_none() {
            eprintln!(
                "xtask: note: `env --ignore-signal` is unavailable; Ctrl-C will not clean up"
            );
            return Interrupt { sentinel: None };
        }
        let sentinel = Command::new("env")
            .args(["--default-signal=INT", "sleep", "86400"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Interrupt { sentinel }
    }

    /// True once Ctrl-C was pressed.
    pub fn fired(&mut self) -> bool {
        matches!(
            self.sentinel.as_mut().map(Child::try_wait),
            Some(Ok(Some(_)))
        )
    }

    /// A command that must stay interruptible from the terminal (e.g. the
    /// cargo build): SIGINT back to the default for it.
    pub fn interruptible(program: &str) -> Command {
        if std::env::var_os(MARK).is_some() {
            let mut c = Command::new("env");
            c.arg("--default-signal=INT").arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
