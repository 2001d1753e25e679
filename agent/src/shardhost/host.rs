//! The shard host process (`shardline-agent host`, started by the agent).
//!
//! Order of events, each step before the next:
//! 1. die with the agent (`PR_SET_PDEATHSIG`), ignore terminal Ctrl-C (the
//!    agent stops hosts), install the fatal-signal reporter;
//! 2. wait for [`HostSetup`] (the agent sends it after placing this process
//!    in its cgroup) and apply rlimits and niceness;
//! 3. verify *every* library (no symlink, not a FIFO or device, owner, mode,
//!    SHA-256) — one refusal and nothing is loaded at all;
//! 4. enter the sandbox ([`super::sandbox`]): `no_new_privs`, no
//!    capabilities, its own uid or user namespace, Landlock, seccomp. A
//!    declared TUN device (`tun = NAME` in a shard's config) is opened first,
//!    while the host is still privileged, and passed in as a descriptor;
//! 5. load the libraries (their constructors run here, sandboxed) and check
//!    each descriptor names the expected `id@version` and capability;
//! 6. initialise every shard, report `Running`, run the event loop: poll
//!    each shard, sleep in `poll(2)` on their descriptors and the IPC
//!    socket, send a heartbeat with per-shard stats every `heartbeat_ms`.
//!
//! Heartbeats come only from the loop thread, after a full round of polls,
//! so a shard hung in `poll` stops them whatever its other threads do. A
//! watchdog thread (host code, started before any shard runs) watches the
//! loop's progress counter and reports `Stuck{shard}` after three heartbeat
//! periods without progress inside a shard and then kills its own process,
//! so a hung host ends within ~350 ms whatever the agent's poll rate, and
//! even if a shard thread forges heartbeat datagrams meanwhile (the agent
//! also kills the host when it reads `Stuck`).
//!
//! Secret configuration lines (opened by the agent from a sealed box; the
//! setup names their keys) are redacted from everything a shard logs through
//! the host and from the reason of an `InitFailed` (the shard's last warning
//! during `init`), so they reach neither the journal nor a report.
//!
//! Exit codes: 0 stop requested, 3 load refused, 4 init failed, 101 a shard
//! panicked (caught at the boundary), 5 setup/IPC/sandbox failure.
#![forbid(unsafe_code)]

use super::ipc::{self, FromHost, HostSetup, StatsWire, ToHost};
use super::loader::{self, HostServices, LoadedShard};
use super::sys::{CURRENT_SHARD, NO_SHARD};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use shardline_shard_sdk::{level, status};
use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const EXIT_STOPPED: u8 = 0;
pub const EXIT_LOAD_REFUSED: u8 = 3;
pub const EXIT_INIT_FAILED: u8 = 4;
pub const EXIT_SETUP: u8 = 5;
pub const EXIT_SHARD_PANICKED: u8 = 101;

/// The shards of this host, reachable from the host API trampolines.
struct Services {
    shards: Vec<RefCell<LoadedShard>>,
    names: Vec<String>,
    errors: Vec<std::cell::Cell<u32>>,
    /// Values of secret configuration lines: never logged or reported.
    secrets: Vec<String>,
    /// The last warning or error each shard logged (redacted): why its
    /// `init` refused, for the agent's report.
    last_complaint: Vec<RefCell<Option<String>>>,
}

/// Longest shard message carried into a failure reason.
const MAX_REASON: usize = 300;

/// Replaces every secret value in `msg` (a shard may echo its config).
fn redact(secrets: &[String], msg: &str) -> String {
    let mut out = msg.to_owned();
    for s in secrets {
        out = out.replace(s.as_str(), "[redacted]");
    }
    out
}

/// Values of the secret lines of `config` (keys named by the agent); very
/// short values are skipped, they would redact ordinary words.
fn secret_values(config: &[u8], keys: &[String]) -> Vec<String> {
    let Ok(kv) = shardline_shard_sdk::config::KeyValues::parse(config) else {
        return Vec::new();
    };
    keys.iter()
        .filter_map(|k| kv.get(k))
        .filter(|v| v.len() >= 4)
        .map(str::to_owned)
        .collect()
}

impl HostServices for Services {
    fn log(&self, lvl: u32, msg: &str) {
        let idx = CURRENT_SHARD.load(Ordering::Relaxed);
        let shard = self
            .names
            .get(idx as usize)
            .map(String::as_str)
            .unwrap_or("-");
        let msg = redact(&self.secrets, msg);
        if lvl <= level::WARN {
            if let Some(slot) = self.last_complaint.get(idx as usize) {
                let mut m = msg.clone();
                if m.len() > MAX_REASON {
                    let mut cut = MAX_REASON;
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m.truncate(cut);
                }
                *slot.borrow_mut() = Some(m);
            }
        }
        let msg = msg.as_str();
        match lvl {
            level::ERROR => tracing::error!(shard, "{msg}"),
            level::WARN => tracing::warn!(shard, "{msg}"),
            level::INFO => tracing::info!(shard, "{msg}"),
            _ => tracing::debug!(shard, "{msg}"),
        }
    }

    fn metric(&self, name: &str, value: i64) {
        tracing::trace!(metric = name, value, "shard metric");
    }

    fn call_service(
        &self,
        service: &str,
        method: u32,
        input: &[u8],
        out: &mut [u8],
    ) -> (i32, usize) {
        let Some(idx) = self.shards.iter().position(|s| {
            s.try_borrow()
                .map(|s| s.info().service == service)
                .unwrap_or(false)
        }) else {
            // No such service (a shard calling its own service is busy, so not found either).
            return (status::NO_SUCH_SERVICE, 0);
        };
        let Ok(mut callee) = self.shards[idx].try_borrow_mut() else {
            return (status::BUSY, 0);
        };
        let caller = CURRENT_SHARD.swap(idx as u32, Ordering::Relaxed);
        let (rc, n) = callee.call(method, input, out);
        CURRENT_SHARD.store(caller, Ordering::Relaxed);
        if rc == status::PANICKED {
            // The callee's state is unknown after a panic: the host exits after this loop turn.
            tracing::error!(shard = %self.names[idx], "shard panicked in a service call");
            self.errors[idx].set(u32::MAX);
        }
        (rc, n)
    }
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64 + 1
}

/// Runs the host on IPC socket `ipc`; returns the process exit code.
pub fn run(ipc: OwnedFd) -> u8 {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        return EXIT_SETUP; // the agent died before we armed the death signal
    }
    let mut block = nix::sys::signal::SigSet::empty();
    block.add(nix::sys::signal::Signal::SIGINT);
    let _ = block.thread_block();
    if let Err(e) = super::sys::install_fatal_reporter(ipc.as_raw_fd()) {
        tracing::warn!(error = %e, "fatal-signal reporter not installed");
    }

    let mut buf = vec![0u8; ipc::MAX_DATAGRAM];
    let mut setup = match wait_setup(ipc.as_fd(), &mut buf) {
        Some(s) => s,
        None => return EXIT_SETUP,
    };
    if let Err(e) = super::limits::apply_process_limits(&setup.limits) {
        tracing::warn!(error = %e, "could not apply all process limits");
    }
    let send = |m: &FromHost| {
        if let Err(e) = ipc::send(ipc.as_fd(), m) {
            tracing::debug!(error = %e, "ipc send failed");
        }
    };

    // 3. Verify every file first: a single refusal loads nothing.
    let mut verified = Vec::new();
    for (i, s) in setup.shards.iter().enumerate() {
        match loader::open_verified(&setup.shard_dir, &s.path, Some(&s.sha256), setup.agent_uid) {
            Ok(v) => verified.push(v),
            Err(e) => {
                send(&FromHost::LoadRefused {
                    index: i as u32,
                    reason: e.to_string(),
                });
                return EXIT_LOAD_REFUSED;
            }
        }
    }
    // 4. The sandbox, before anything of a shard is mapped.
    if let Err(reason) = enter_sandbox(&mut setup) {
        tracing::error!(capability = %setup.capability, %reason, "shard host sandbox failed; nothing loaded");
        send(&FromHost::SandboxFailed { reason });
        return EXIT_SETUP;
    }
    let mut shards = Vec::new();
    for (i, (v, s)) in verified.into_iter().zip(&setup.shards).enumerate() {
        CURRENT_SHARD.store(i as u32, Ordering::Relaxed);
        let loaded = match loader::load(v) {
            Ok(l) => l,
            Err(e) => {
                send(&FromHost::LoadRefused {
                    index: i as u32,
                    reason: e.to_string(),
                });
                return EXIT_LOAD_REFUSED;
            }
        };
        let info = loaded.info().clone();
        let found = format!("{}@{} ({})", info.id, info.version, info.capability);
        let expected = format!("{} ({})", s.shard, setup.capability);
        if info.id != s.shard.id()
            || info.version != s.shard.version()
            || info.capability != setup.capability
        {
            let e = loader::LoadError::IdentityMismatch {
                path: loaded.path().to_owned(),
                found,
                expected,
            };
            send(&FromHost::LoadRefused {
                index: i as u32,
                reason: e.to_string(),
            });
            return EXIT_LOAD_REFUSED;
        }
        send(&FromHost::Loaded {
            index: i as u32,
            info,
        });
        shards.push(RefCell::new(loaded));
    }
    CURRENT_SHARD.store(NO_SHARD, Ordering::Relaxed);

    // The services table must not move while shards hold its address: box it.
    let services = Box::new(Services {
        names: setup.shards.iter().map(|s| s.shard.to_string()).collect(),
        errors: (0..shards.len()).map(|_| std::cell::Cell::new(0)).collect(),
        secrets: setup
            .shards
            .iter()
            .flat_map(|s| secret_values(&s.config, &s.secret_keys))
            .collect(),
        last_complaint: (0..shards.len()).map(|_| RefCell::new(None)).collect(),
        shards,
    });
    let api = Box::new(loader::host_api(&*services));
    for (i, s) in setup.shards.iter().enumerate() {
        CURRENT_SHARD.store(i as u32, Ordering::Relaxed);
        let rc = services.shards[i].borrow_mut().init(&api, &s.config);
        CURRENT_SHARD.store(NO_SHARD, Ordering::Relaxed);
        if rc < 0 {
            let said = services.last_complaint[i]
                .borrow_mut()
                .take()
                .unwrap_or_else(|| "no reason given".to_owned());
            send(&FromHost::InitFailed {
                index: i as u32,
                status: rc,
                reason: format!("{}: init refused its configuration: {said}", s.shard),
            });
            return if rc == status::PANICKED {
                EXIT_SHARD_PANICKED
            } else {
                EXIT_INIT_FAILED
            };
        }
    }
    send(&FromHost::Running);

    let code = event_loop(&setup, &services, ipc.as_fd(), &mut buf);
    // Destroy shards before the API table they point at.
    drop(services);
    drop(api);
    code
}

/// Devices a shard declares in its configuration (`tun = NAME`): handed to
/// the host's sandbox identity while the host is privileged.
fn declared_tun(config: &[u8]) -> Option<String> {
    let kv = shardline_shard_sdk::config::KeyValues::parse(config).ok()?;
    kv.get("tun").map(str::to_owned)
}

/// Opens the privileged resources the shards declared, enters the sandbox.
///
/// A shard declaring `tun = NAME` gets the device opened and attached here,
/// while the host still has the agent's privileges, and finds the descriptor
/// number under `tun_fd` (`shardline_shard_sdk::config::PASSED_TUN_FD`) in
/// its configuration: inside the sandbox it could not open `/dev/net/tun`.
fn enter_sandbox(setup: &mut HostSetup) -> Result<(), String> {
    let dir = setup
        .shard_dir
        .canonicalize()
        .map_err(|e| format!("shard dir {}: {e}", setup.shard_dir.display()))?;
    let plan = super::sandbox::SandboxPlan::for_shard_dir(&dir, setup.sandbox_slot);
    for shard in &mut setup.shards {
        let Some(name) = declared_tun(&shard.config) else {
            continue;
        };
        let fd = super::sys::open_tun(&name)
            .map_err(|e| format!("opening TUN device {name:?} for {}: {e}", shard.shard))?;
        // The shard owns the descriptor from its init on; the host never closes it.
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let mut config = shard.config.clone();
        if !config.is_empty() && !config.ends_with(b"\n") {
            config.push(b'\n');
        }
        config.extend_from_slice(
            format!("{} = {raw}\n", shardline_shard_sdk::config::PASSED_TUN_FD).as_bytes(),
        );
        shard.config = config;
        tracing::info!(shard = %shard.shard, tun = %name, fd = raw, "TUN device passed in as a descriptor");
    }
    let report = super::sandbox::enter(&plan).map_err(|e| e.to_string())?;
    tracing::info!(
        capability = %setup.capability,
        identity = ?report.identity,
        landlock = ?report.landlock,
        seccomp = report.seccomp,
        "shard host sandboxed"
    );
    Ok(())
}

fn wait_setup(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<HostSetup> {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    match nix::poll::poll(&mut pfd, PollTimeout::from(10_000u16)) {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    let n = ipc::recv(fd, buf, false).ok()??;
    match ipc::decode_to_host(&buf[..n]) {
        Ok(ToHost::Setup(s)) => Some(s),
        _ => None,
    }
}

fn event_loop(
    setup: &HostSetup,
    services: &Services,
    ipc_fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> u8 {
    let start = Instant::now();
    let hb = Duration::from_millis(u64::from(setup.heartbeat_ms.clamp(10, 5_000)));
    let progress = Arc::new(AtomicU64::new(now_ms(start)));
    spawn_watchdog(ipc_fd, progress.clone(), start, hb);
    let mut next_hb = Instant::now();
    let mut seq = 0u64;
    let mut fds: Vec<i32> = Vec::new();
    let mut shard_errors = vec![0u32; services.shards.len()];
    loop {
        let now = now_ms(start);
        let mut wake = now + hb.as_millis() as u64;
        for (i, cell) in services.shards.iter().enumerate() {
            CURRENT_SHARD.store(i as u32, Ordering::Relaxed);
            let (rc, next) = cell.borrow_mut().poll(now);
            CURRENT_SHARD.store(NO_SHARD, Ordering::Relaxed);
            if rc == status::PANICKED || services.errors[i].get() == u32::MAX {
                let _ = ipc::send(
                    ipc_fd,
                    &FromHost::ShardFailed {
                        index: i as u32,
                        status: status::PANICKED,
                    },
                );
                return EXIT_SHARD_PANICKED;
            }
            if rc < 0 {
                shard_errors[i] = shard_errors[i].saturating_add(1);
            }
            wake = wake.min(next.max(now));
        }
        progress.store(now_ms(start), Ordering::Relaxed);
        if Instant::now() >= next_hb {
            seq += 1;
            let stats = services
                .shards
                .iter()
                .map(|s| {
                    s.borrow_mut()
                        .stats()
                        .map(StatsWire::from)
                        .unwrap_or_default()
                })
                .collect();
            let _ = ipc::send(
                ipc_fd,
                &FromHost::Heartbeat {
                    seq,
                    stats,
                    errors: shard_errors.clone(),
                },
            );
            next_hb = Instant::now() + hb;
        }
        fds.clear();
        for cell in &services.shards {
            cell.borrow_mut().fds(&mut fds);
        }
        let until_hb = next_hb
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let timeout = wake.saturating_sub(now_ms(start)).min(until_hb).min(1_000) as u16;
        let ready = super::sys::wait_readable(ipc_fd, &fds, timeout);
        if ready {
            loop {
                match ipc::recv(ipc_fd, buf, true) {
                    Ok(Some(n)) => match ipc::decode_to_host(&buf[..n]) {
                        Ok(ToHost::Stop) => return EXIT_STOPPED,
                        Ok(ToHost::Setup(_)) => tracing::warn!("duplicate setup ignored"),
                        Err(e) => tracing::warn!(error = %e, "bad message from agent"),
                    },
                    Ok(None) => break,
                    Err(_) => return EXIT_STOPPED, // the agent closed the socket: it is gone
                }
            }
        }
    }
}

/// Reports `Stuck{shard}` once when the loop stalls inside a shard for 3 heartbeats.
fn spawn_watchdog(ipc_fd: BorrowedFd<'_>, progress: Arc<AtomicU64>, start: Instant, hb: Duration) {
    let Ok(fd) = ipc_fd.try_clone_to_owned() else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut reported = false;
            loop {
                std::thread::sleep(hb / 2);
                let stalled = now_ms(start).saturating_sub(progress.load(Ordering::Relaxed));
                let cur = CURRENT_SHARD.load(Ordering::Relaxed);
                if stalled > 3 * hb.as_millis() as u64 && cur != NO_SHARD {
                    if !reported {
                        let _ = ipc::send(fd.as_fd(), &FromHost::Stuck { index: cur });
                        reported = true;
                        // Do not wait for the agent's next poll (the daemon polls once
                        // a second): a hung host ends itself, the agent reports `Hung`.
                        tracing::error!(
                            shard = cur,
                            stalled_ms = stalled,
                            "host loop stuck in a shard; exiting"
                        );
                        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    }
                } else {
                    reported = false;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted_from_what_a_shard_says() {
        let config = b"bind = 127.0.0.1:1\npsk = 5a5a5a5a5a\nx = ab\n";
        let keys = vec!["psk".to_owned(), "x".to_owned(), "missing".to_owned()];
        let secrets = secret_values(config, &keys);
        assert_eq!(
            secrets,
            vec!["5a5a5a5a5a".to_owned()],
            "short values skipped"
        );
        assert_eq!(
            redact(&secrets, "bad psk 5a5a5a5a5a on 127.0.0.1:1"),
            "bad psk [redacted] on 127.0.0.1:1"
        );
        assert!(secret_values(b"\xff\xfe garbage", &keys).is_empty());
    }
}
