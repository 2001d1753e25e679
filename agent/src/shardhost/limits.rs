//! Resource limits for shard host processes.
//!
//! - In the host, before anything is loaded: `RLIMIT_DATA` (heap and anonymous
//!   mappings, the closest rlimit to resident memory), `RLIMIT_CORE = 0`, and
//!   niceness.
//! - In the agent, before the host gets its setup message: a cgroup per host.
//!   cgroup v2 when the agent's own cgroup has the `memory` and `cpu`
//!   controllers delegated (systemd `Delegate=yes`): the agent moves itself
//!   into a `supervisor` leaf, enables the controllers for its subtree and
//!   creates `shard-…` children with `memory.max`, `memory.swap.max`,
//!   `cpu.max`, `cpu.weight`, and `pids.max` when `pids` is delegated too.
//!   Else cgroup v1 `memory` and `cpu` hierarchies when writable (hybrid
//!   systems), plus the v1 `pids` hierarchy when present. Else rlimits only.
//!   [`Enforcement`] says which is in force.
//! - Ending a host ends everything in its cgroup: [`HostCgroup::kill_all`]
//!   writes `cgroup.kill` (v2) or sends SIGKILL to every pid listed until
//!   none is left (v1; the pids limit bounds how many can appear), so the
//!   `rmdir` in [`HostCgroup::remove`] succeeds and nothing a shard started
//!   outlives its host, not even across an agent crash ([`CgroupBackend::remove_stale`]).
#![forbid(unsafe_code)]

use shardline_shared::msg::{Enforcement, ResourceLimits};
use std::path::{Path, PathBuf};

/// cgroup v1/v2 CPU period used for quotas (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;
/// Minimum headroom above `memory_max_bytes` for `RLIMIT_DATA`, which is set
/// to twice the cap or cap + headroom, whichever is larger: the cgroup or the
/// agent's RSS watchdog is the precise cap (and reports `OverLimit`); the
/// rlimit is the backstop when neither is fast enough.
pub const RLIMIT_DATA_HEADROOM: u64 = 64 << 20;
/// `pids.max` of a host cgroup: tasks (threads included) a host may have.
pub const PIDS_MAX: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("setrlimit {what}: {source}")]
    Rlimit {
        what: &'static str,
        source: nix::Error,
    },
    #[error("setpriority({nice}): {source}")]
    Nice { nice: i8, source: std::io::Error },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Applies rlimits and niceness to the calling process (the host).
pub fn apply_process_limits(limits: &ResourceLimits) -> Result<(), LimitError> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| LimitError::Rlimit {
        what: "CORE",
        source,
    })?;
    if limits.memory_max_bytes > 0 {
        let cap = limits
            .memory_max_bytes
            .saturating_mul(2)
            .max(limits.memory_max_bytes.saturating_add(RLIMIT_DATA_HEADROOM));
        // rlim_t is 32 bits on armv7: saturate rather than wrap.
        let cap = libc::rlim_t::try_from(cap).unwrap_or(libc::rlim_t::MAX);
        setrlimit(Resource::RLIMIT_DATA, cap, cap).map_err(|source| LimitError::Rlimit {
            what: "DATA",
            source,
        })?;
    }
    super::sys::set_nice(limits.nice).map_err(|source| LimitError::Nice {
        nice: limits.nice,
        source,
    })?;
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), LimitError> {
    std::fs::write(path, value).map_err(|source| LimitError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

/// Where the agent can create host cgroups, decided once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupBackend {
    V2 {
        parent: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        /// The v1 `pids` hierarchy, when mounted and writable.
        pids: Option<PathBuf>,
    },
    None,
}

/// Reads `/proc/self/mountinfo` for mount points: (cgroup2 mount, v1 mounts with their options).
fn cgroup_mounts() -> (Option<PathBuf>, Vec<(PathBuf, String)>) {
    let mut v2 = None;
    let mut v1 = Vec::new();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return (None, v1);
    };
    for line in info.lines() {
        // fields: id parent maj:min root mountpoint opts ... - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).map(PathBuf::from);
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let superopts = r.nth(1).unwrap_or("").to_owned();
        match (fstype, mount) {
            ("cgroup2", Some(m)) => v2 = Some(m),
            ("cgroup", Some(m)) => v1.push((m, superopts)),
            _ => {}
        }
    }
    (v2, v1)
}

impl CgroupBackend {
    /// Finds a usable backend: v2 with delegated controllers, else writable v1
    /// `memory` + `cpu`, else none.
    pub fn detect() -> Self {
        let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
            return Self::None;
        };
        let (v2_mount, v1_mounts) = cgroup_mounts();
        if let Some(mount) = v2_mount {
            if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
                let dir = mount.join(path.trim_start_matches('/'));
                if let Some(parent) = prepare_v2(&dir) {
                    return Self::V2 { parent };
                }
            }
        }
        let v1_dir = |controller: &str| -> Option<PathBuf> {
            let rel = own.lines().find_map(|l| {
                let mut it = l.splitn(3, ':');
                let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_owned())
            })?;
            let mount = v1_mounts
                .iter()
                .find(|(_, opts)| opts.split(',').any(|o| o == controller))?
                .0
                .clone();
            let dir = mount.join(rel.trim_start_matches('/'));
            nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).ok()?;
            Some(dir)
        };
        match (v1_dir("memory"), v1_dir("cpu")) {
            (Some(memory), Some(cpu)) => Self::V1 {
                memory,
                cpu,
                pids: v1_dir("pids"),
            },
            _ => Self::None,
        }
    }

    /// Removes empty host cgroups left by an agent that died without
    /// cleaning up (names `shardline-{capability}-{agent pid}-{n}` whose agent
    /// pid is gone). A cgroup that still has processes is kept.
    pub fn remove_stale(&self) {
        let parents: Vec<&Path> = match self {
            Self::V2 { parent } => vec![parent],
            Self::V1 { memory, cpu, pids } => {
                let mut v: Vec<&Path> = vec![memory, cpu];
                v.extend(pids.as_deref());
                v
            }
            Self::None => vec![],
        };
        for parent in parents {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix("shardline-") else {
                    continue;
                };
                let mut parts = rest.rsplitn(3, '-');
                let (_n, pid) = (
                    parts.next(),
                    parts.next().and_then(|p| p.parse::<u32>().ok()),
                );
                let Some(pid) = pid else {
                    continue;
                };
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    // Whatever a host of the dead agent left running dies now.
                    let stale = HostCgroup {
                        dirs: vec![e.path()],
                        v2: matches!(self, Self::V2 { .. }),
                    };
                    let killed = stale.kill_all();
                    if std::fs::remove_dir(e.path()).is_ok() {
                        tracing::info!(path = %e.path().display(), killed, "removed a stale host cgroup");
                    }
                }
            }
        }
    }

    pub fn enforcement(&self) -> Enforcement {
        match self {
            Self::V2 { .. } => Enforcement::CgroupV2,
            Self::V1 { .. } => Enforcement::CgroupV1,
            Self::None => Enforcement::RlimitsOnly,
        }
    }

    /// Creates a cgroup named `name` with `limits`; `None` backend gives `Ok(None)`.
    pub fn create(
        &self,
        name: &str,
        limits: &ResourceLimits,
    ) -> Result<Option<HostCgroup>, LimitError> {
        let mk = |p: &Path| {
            std::fs::create_dir(p).map_err(|source| LimitError::Cgroup {
                path: p.to_owned(),
                source,
            })
        };
        let quota = |permille: u32| u64::from(permille) * CPU_PERIOD_US / 1000;
        match self {
            Self::None => Ok(None),
            Self::V2 { parent } => {
                let dir = parent.join(name);
                mk(&dir)?;
                let cg = HostCgroup {
                    dirs: vec![dir.clone()],
                    v2: true,
                };
                if limits.memory_max_bytes > 0 {
                    write(
                        &dir.join("memory.max"),
                        &limits.memory_max_bytes.to_string(),
                    )?;
                    // No swap: over the cap means the OOM killer, not a slow crawl.
                    let _ = write(&dir.join("memory.swap.max"), "0");
                }
                if limits.cpu_quota_permille > 0 {
                    write(
                        &dir.join("cpu.max"),
                        &format!(
                            "{} {CPU_PERIOD_US}",
                            quota(limits.cpu_quota_permille).max(1000)
                        ),
                    )?;
                }
                write(
                    &dir.join("cpu.weight"),
                    &limits.cpu_weight.clamp(1, 10000).to_string(),
                )?;
                if controller_enabled(parent, "pids") {
                    write(&dir.join("pids.max"), &PIDS_MAX.to_string())?;
                }
                Ok(Some(cg))
            }
            Self::V1 { memory, cpu, pids } => {
                let mdir = memory.join(name);
                let cdir = cpu.join(name);
                mk(&mdir)?;
                let mut cg = HostCgroup {
                    dirs: vec![mdir.clone()],
                    v2: false,
                };
                if mdir != cdir {
                    mk(&cdir)?;
                    cg.dirs.push(cdir.clone());
                }
                if limits.memory_max_bytes > 0 {
                    let m = limits.memory_max_bytes.to_string();
                    write(&mdir.join("memory.limit_in_bytes"), &m)?;
                    // memsw must be ≥ the memory limit; equal means no swap.
                    let _ = write(&mdir.join("memory.memsw.limit_in_bytes"), &m);
                }
                write(&cdir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                if limits.cpu_quota_permille > 0 {
                    write(
                        &cdir.join("cpu.cfs_quota_us"),
                        &quota(limits.cpu_quota_permille).max(1000).to_string(),
                    )?;
                }
                let shares = u64::from(limits.cpu_weight.clamp(1, 10000)) * 1024 / 100;
                write(&cdir.join("cpu.shares"), &shares.max(2).to_string())?;
                if let Some(pids) = pids {
                    let pdir = pids.join(name);
                    mk(&pdir)?;
                    cg.dirs.push(pdir.clone());
                    write(&pdir.join("pids.max"), &PIDS_MAX.to_string())?;
                }
                Ok(Some(cg))
            }
        }
    }
}

/// Whether `controller` is enabled for the children of v2 cgroup `parent`.
fn controller_enabled(parent: &Path, controller: &str) -> bool {
    std::fs::read_to_string(parent.join("cgroup.subtree_control"))
        .map(|s| s.split_whitespace().any(|c| c == controller))
        .unwrap_or(false)
}

/// Enables `memory` and `cpu` (and `pids` when delegated) for children of
/// the agent's v2 cgroup, moving the agent into a `supervisor` leaf first
/// (no processes in inner nodes).
pub(crate) fn prepare_v2(dir: &Path) -> Option<PathBuf> {
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if !has("memory") || !has("cpu") {
        return None;
    }
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
    let on = |c: &str| enabled.split_whitespace().any(|x| x == c);
    if !(on("memory") && on("cpu")) {
        let leaf = dir.join("supervisor");
        if !leaf.exists() {
            std::fs::create_dir(&leaf).ok()?;
        }
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).ok()?;
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu").ok()?;
    }
    if has("pids") && !on("pids") {
        // Optional: without it the host still has RLIMIT_NPROC and seccomp's fork ban.
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), "+pids") {
            tracing::warn!(error = %e, "cannot enable the pids controller for shard hosts");
        }
    }
    Some(dir.to_owned())
}

/// One host's cgroup (v2: one directory; v1: memory and cpu directories).
#[derive(Debug)]
pub struct HostCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl HostCgroup {
    /// Moves process `pid` into the cgroup.
    pub fn attach(&self, pid: u32) -> Result<(), LimitError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The kernel OOM-killed a process in this cgroup (or refused a charge).
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = self.dirs.first() else {
            return false;
        };
        let count = |file: &str, key: &str| -> u64 {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == key).then(|| v.trim().parse().ok()).flatten()
                    })
                })
                .unwrap_or(0)
        };
        if self.v2 {
            count("memory.events", "oom_kill") > 0 || count("memory.events", "oom") > 0
        } else {
            count("memory.oom_control", "oom_kill") > 0
                || std::fs::read_to_string(dir.join("memory.failcnt"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    > 0
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Pids in the cgroup (all its directories; unreadable ones count as empty).
    pub fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills every process in the cgroup — the host and whatever it started —
    /// and waits (up to 1 s) until none is left. v2 uses `cgroup.kill`; v1
    /// sends SIGKILL to each listed pid and looks again, since a process may
    /// have forked between the read and the kill (a killed process cannot
    /// fork any more, and the pids limit bounds the rest). Returns how many
    /// pids were signalled.
    pub fn kill_all(&self) -> usize {
        use nix::sys::signal::{kill, Signal};
        let mut signalled = 0usize;
        if self.v2 {
            if let Some(d) = self.dirs.first() {
                let _ = std::fs::write(d.join("cgroup.kill"), "1");
            }
        }
        let me = std::process::id() as i32;
        for _ in 0..500 {
            let pids = self.pids();
            if pids.is_empty() {
                return signalled;
            }
            for pid in pids.into_iter().filter(|&p| p > 1 && p != me) {
                if kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    signalled += 1;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        tracing::warn!(paths = ?self.dirs, "processes still in a host cgroup after 1 s of SIGKILL");
        signalled
    }

    /// Kills what is left in the cgroup, then removes the directories.
    /// Retries briefly, because the kernel frees the last task
    /// asynchronously after it exits.
    pub fn remove(self) {
        let killed = self.kill_all();
        if killed > 0 {
            tracing::info!(paths = ?self.dirs, killed, "killed processes left in a host cgroup");
        }
        for d in &self.dirs {
            for attempt in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        if attempt == 49 {
                            tracing::warn!(path = %d.display(), error = %e, "could not remove host cgroup");
                        }
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The cgroup v2 code paths on a directory tree laid out like a delegated
    //! v2 subtree (this machine's v2 mount has no controllers to delegate):
    //! which files are written with which values. The v1 paths and the kill
    //! of real processes are tested on the real kernel in `tests/shard_limits.rs`.
    use super::*;

    fn limits() -> ResourceLimits {
        ResourceLimits {
            cpu_quota_permille: 250,
            cpu_weight: 50,
            memory_max_bytes: 32 << 20,
            nice: 0,
        }
    }

    #[test]
    fn v2_creates_memory_cpu_and_pids_limits_when_delegated() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.subtree_control"),
            "cpu memory pids",
        )
        .unwrap();
        let backend = CgroupBackend::V2 {
            parent: root.path().to_owned(),
        };
        let cg = backend
            .create("shardline-x-1-1", &limits())
            .unwrap()
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(cg.paths()[0].join(f)).unwrap();
        assert_eq!(read("memory.max"), (32u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "25000 100000");
        assert_eq!(read("cpu.weight"), "50");
        assert_eq!(read("pids.max"), PIDS_MAX.to_string());
    }

    #[test]
    fn v2_without_delegated_pids_writes_no_pids_max() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "cpu memory").unwrap();
        let backend = CgroupBackend::V2 {
            parent: root.path().to_owned(),
        };
        let cg = backend
            .create("shardline-x-1-2", &limits())
            .unwrap()
            .unwrap();
        assert!(!cg.paths()[0].join("pids.max").exists());
    }

    #[test]
    fn v2_kill_all_writes_cgroup_kill() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("shardline-x-1-3");
        std::fs::create_dir(&dir).unwrap();
        let cg = HostCgroup {
            dirs: vec![dir.clone()],
            v2: true,
        };
        assert_eq!(cg.kill_all(), 0);
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.kill")).unwrap(),
            "1"
        );
    }

    #[test]
    fn v2_prepare_moves_the_agent_to_a_leaf_and_enables_controllers() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids io").unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        assert_eq!(prepare_v2(root.path()), Some(root.path().to_owned()));
        assert_eq!(
            std::fs::read_to_string(root.path().join("supervisor/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        // Without memory and cpu there is no v2 backend at all.
        let bare = tempfile::tempdir().unwrap();
        std::fs::write(bare.path().join("cgroup.controllers"), "pids").unwrap();
        assert_eq!(prepare_v2(bare.path()), None);
    }
}
