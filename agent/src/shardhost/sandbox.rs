//! The shard host sandbox: what a host process does to itself after it has
//! opened (and hashed) its libraries and *before* it maps any of them, so no
//! shard code — not even an ELF constructor — ever runs with the agent's
//! identity, files or signals.
//!
//! Order (each step before the next; [`enter`]):
//! 1. `no_new_privs`, then every capability dropped: the ambient set
//!    cleared, the bounding set emptied (root, or `CAP_SETPCAP`), `capset`
//!    to zero after step 2;
//! 2. identity: when the host may change ids — the agent is root, or (the
//!    packaged systemd unit, issue 15) it holds `CAP_SETUID` and
//!    `CAP_SETGID`, which a re-executed host inherits as ambient
//!    capabilities — a **dedicated unprivileged uid/gid** per host
//!    ([`SANDBOX_UID_BASE`] + n, no supplementary groups), so a shard can
//!    neither read the agent's `0600` files (`device.key`) nor signal the
//!    agent or another host, and its sent packets can be rate-capped by uid
//!    (`bandwidth`); otherwise an unshared **user namespace** (its
//!    capabilities there mean nothing on the host's resources);
//! 3. `RLIMIT_NPROC` for the dedicated uid (threads count against it);
//! 4. **Landlock**: reads only beneath the shard directory and the system
//!    library directories the dynamic loader needs (plus `/etc/ld.so.cache`
//!    and name-resolution files), writes nowhere (so no `/dev/shm`, no
//!    `/tmp`, no `state.json`), read-write-ioctl only on device files the
//!    plan names (none today: a TUN device is opened by the host before the
//!    sandbox and passed in as a descriptor); scoped so no signal reaches a
//!    process outside the host's domain (Landlock ABI 6);
//! 5. **seccomp** deny-list (x86-64 and aarch64): no process creation
//!    (`fork`, `vfork`, `clone` without `CLONE_THREAD`; `clone3` answers
//!    `ENOSYS` so libc falls back to `clone` for threads), no `execve`, no
//!    signal to any process but the host itself, no `ptrace` or access to
//!    other processes' memory, no namespaces, mounts, BPF, perf, keyrings,
//!    modules, `io_uring`, SysV shared memory (it would outlive the host),
//!    `AF_PACKET` or raw sockets. Other architectures (armv7) log that
//!    seccomp is not enforced and rely on the rest.
//!
//! Every step that the kernel does not support is logged with what is
//! missing, never skipped silently; a step that fails where it is supported
//! is an error and the host refuses to load anything.
#![forbid(unsafe_code)]

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::path::{Path, PathBuf};

/// First uid/gid of the per-host identities (agent root, or holding
/// `CAP_SETUID` + `CAP_SETGID`).
/// Far above any distribution's user ranges and below the 32-bit limit
/// (`0x5348_0000` = 1 397 227 520); host `n` runs as `BASE + n % 65536`.
pub const SANDBOX_UID_BASE: u32 = 0x5348_0000;
/// The identity of `shards list` probes (`BASE + 0xFFFF`).
pub const PROBE_SLOT: u32 = 0xFFFF;
/// `RLIMIT_NPROC` of a host with a dedicated uid: threads a shard may run.
pub const NPROC_LIMIT: u64 = 64;

/// System directories the dynamic loader may read shard dependencies from.
const LIB_DIRS: &[&str] = &[
    "/lib",
    "/lib64",
    "/lib32",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/local/lib",
];
/// Single files the loader and name resolution read (no secrets).
const READ_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/dev/null",
    "/dev/urandom",
];

/// What one host is allowed, decided by the host from its setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// Which per-host identity to take when the host may (`BASE + slot`).
    pub slot: u32,
    /// Directories and files readable (besides the system libraries).
    pub read: Vec<PathBuf>,
    /// Device files the shards may open read-write with ioctls (none today:
    /// privileged devices are passed in as descriptors instead).
    pub devices: Vec<PathBuf>,
}

impl SandboxPlan {
    /// The sandbox of a host whose libraries live in `shard_dir`.
    pub fn for_shard_dir(shard_dir: &Path, slot: u32) -> Self {
        Self {
            slot,
            read: vec![shard_dir.to_owned()],
            devices: Vec::new(),
        }
    }

    /// The uid/gid a host with this plan runs as when it may change ids.
    pub fn dedicated_id(&self) -> u32 {
        SANDBOX_UID_BASE + (self.slot % 0x1_0000)
    }
}

/// Who the host is after [`enter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// The agent was root or held `CAP_SETUID` + `CAP_SETGID`: the host runs
    /// as this unprivileged uid (= gid).
    DedicatedUid(u32),
    /// The agent could not change ids: the host is in a user namespace of its own.
    UserNamespace,
    /// Neither was possible (no id-changing capability and user namespaces
    /// disabled, e.g. systemd's `RestrictNamespaces=yes`).
    Unchanged,
}

/// What the kernel enforced, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxReport {
    pub identity: Identity,
    /// Landlock file-system and signal restrictions.
    pub landlock: LandlockLevel,
    /// The seccomp filter is installed.
    pub seccomp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockLevel {
    Full,
    /// Some rights (e.g. signal scoping on kernels before 6.12) are missing.
    Partial,
    /// The kernel has no Landlock (or it is disabled at boot).
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
    #[error("dropping capabilities: {0}")]
    Capabilities(std::io::Error),
    #[error("switching to the host identity {uid}: {source}")]
    Identity { uid: u32, source: nix::Error },
    #[error("setrlimit(RLIMIT_NPROC): {0}")]
    Nproc(nix::Error),
    #[error("landlock ruleset: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("seccomp filter: {0}")]
    Seccomp(String),
}

/// Whether hosts this agent spawns will get a dedicated uid (checked by the
/// agent, so it knows whether a per-uid bandwidth cap means anything): root,
/// or `CAP_SETUID` and `CAP_SETGID` as *ambient* capabilities — a host is a
/// re-execution of the agent's binary, which carries no file capabilities,
/// so only ambient ones survive the `execve` for a non-root agent — and
/// `CAP_KILL`, without which the agent could not kill a host that runs as
/// another uid (a hung or over-limit host would outlive the agent's verdict).
pub fn hosts_get_dedicated_uid() -> bool {
    use super::sys::{ambient_has, CAP_KILL, CAP_SETGID, CAP_SETUID};
    nix::unistd::geteuid().is_root()
        || (ambient_has(CAP_SETUID) && ambient_has(CAP_SETGID) && ambient_has(CAP_KILL))
}

/// Confines the calling process (see the module docs for the order). Call
/// it once, in a process that has opened what it needs and loaded nothing.
pub fn enter(plan: &SandboxPlan) -> Result<SandboxReport, SandboxError> {
    use super::sys::{CAP_KILL, CAP_SETGID, CAP_SETPCAP, CAP_SETUID};
    // 1. no_new_privs first: nothing exec'd later can gain privilege, and it is
    //    what lets an unprivileged process install Landlock and seccomp.
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let root = nix::unistd::geteuid().is_root();
    // What this host holds: root's capabilities are not asked for (the root
    // path is decided by uid 0, as before); a non-root host has what the
    // agent had as ambient capabilities (the packaged unit's).
    let caps = if root {
        u64::MAX
    } else {
        super::sys::effective_caps().map_err(SandboxError::Capabilities)?
    };
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    // Without CAP_KILL in the agent (whose ambient set this host inherited)
    // a host under another uid could not be killed by it: stay its uid.
    let may_switch = root || (has(CAP_SETUID) && has(CAP_SETGID) && has(CAP_KILL));
    if root || has(CAP_SETPCAP) {
        // Needs CAP_SETPCAP, so before the identity change and capset drop it.
        super::sys::drop_bounding_set().map_err(SandboxError::Capabilities)?;
    } else if may_switch {
        // Why this is still safe: with no_new_privs (set above) and empty
        // permitted, effective, inheritable and ambient sets (below), nothing
        // this process or a descendant runs can ever raise a capability, so
        // the bounding set only limits what can no longer happen anyway. The
        // packaged unit grants CAP_SETPCAP so that the set is empty too.
        tracing::warn!("no CAP_SETPCAP: the shard host keeps its capability bounding set (unusable: no_new_privs and every other set empty)");
    }
    super::sys::clear_ambient_caps().map_err(SandboxError::Capabilities)?;

    // 2. Identity.
    let identity = if may_switch {
        let id = plan.dedicated_id();
        switch_identity(id).map_err(|source| SandboxError::Identity { uid: id, source })?;
        // 3. Threads of this uid: only this host runs as it. A non-root host
        //    cannot raise its hard limit (no CAP_SYS_RESOURCE): never above it.
        let mut n = libc::rlim_t::try_from(NPROC_LIMIT).unwrap_or(libc::rlim_t::MAX);
        if !root {
            if let Ok((_, hard)) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
            {
                n = n.min(hard);
            }
        }
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, n, n)
            .map_err(SandboxError::Nproc)?;
        Identity::DedicatedUid(id)
    } else {
        match enter_user_namespace() {
            Ok(()) => Identity::UserNamespace,
            Err(e) => {
                tracing::warn!(error = %e, "no user namespace for the shard host (disabled?); it keeps the agent's uid, Landlock and seccomp still apply");
                Identity::Unchanged
            }
        }
    };
    // Whatever is left (the user namespace's full set, a root host's
    // inheritable bits, and — for a non-root host — the permitted and
    // effective sets, which a change between non-zero uids does not clear):
    // zero, so nothing privileged happens from here on.
    super::sys::drop_privileges().map_err(SandboxError::Capabilities)?;
    // After a uid change the kernel marks the process non-dumpable, which makes
    // /proc/self/fd (how the loader maps a checked descriptor) root-only. The uid
    // is this host's alone and ptrace is filtered, so dumpable exposes nothing.
    if matches!(identity, Identity::DedicatedUid(_)) {
        let _ = nix::sys::prctl::set_dumpable(true);
    }

    // 4. Landlock.
    let landlock = restrict_files(plan)?;
    // 5. seccomp.
    let seccomp = install_seccomp()?;
    let report = SandboxReport {
        identity,
        landlock,
        seccomp,
    };
    tracing::debug!(?report, "shard host sandboxed");
    Ok(report)
}

fn switch_identity(id: u32) -> nix::Result<()> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let gid = Gid::from_raw(id);
    setgroups(&[gid])?;
    setresgid(gid, gid, gid)?;
    // From root, with every uid non-zero the kernel clears the permitted and
    // effective capability sets (no SECBIT_KEEP_CAPS is set); from a non-root
    // uid it does not, which is why `enter` capsets to zero afterwards.
    setresuid(Uid::from_raw(id), Uid::from_raw(id), Uid::from_raw(id))
}

/// Unshares a user namespace mapping only our own uid/gid (so file
/// ownership reads the same), with `setgroups` denied.
fn enter_user_namespace() -> std::io::Result<()> {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(())
}

fn restrict_files(plan: &SandboxPlan) -> Result<LandlockLevel, SandboxError> {
    let abi = ABI::V6;
    let read = AccessFs::from_read(abi);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let mut readable: Vec<PathBuf> = plan.read.clone();
    readable.extend(LIB_DIRS.iter().map(PathBuf::from));
    readable.extend(READ_FILES.iter().map(PathBuf::from));
    // Paths that do not exist on this system are simply not granted.
    readable.retain(|p| p.exists());
    let devices: Vec<&PathBuf> = plan.devices.iter().filter(|p| p.exists()).collect();
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .scope(Scope::Signal | Scope::AbstractUnixSocket)?
        .create()?
        .add_rules(path_beneath_rules(&readable, read))?
        .add_rules(path_beneath_rules(devices, device))?
        .restrict_self()?;
    let level = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockLevel::Full,
        RulesetStatus::PartiallyEnforced => {
            tracing::warn!(
                "Landlock only partly enforced for the shard host (kernel older than ABI 6: signal scoping or some file rights missing)"
            );
            LandlockLevel::Partial
        }
        RulesetStatus::NotEnforced => {
            tracing::error!(
                "Landlock is not available: the shard host's file access is limited only by its uid"
            );
            LandlockLevel::None
        }
    };
    Ok(level)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn install_seccomp() -> Result<bool, SandboxError> {
    use seccompiler::{
        apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
        SeccompFilter, SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let err = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    #[cfg(target_arch = "x86_64")]
    let arch = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = TargetArch::aarch64;

    let me = u64::from(std::process::id());
    let cond = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, v: u64| {
        SeccompCondition::new(arg, len, op, v).map_err(|e| err(&e))
    };
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(|e| err(&e));
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Unconditionally denied.
    let always: &[libc::c_long] = &[
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_getfd,
        libc::SYS_pidfd_send_signal,
        libc::SYS_kcmp,
        libc::SYS_tkill,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        // (kexec_file_load is not named here: libc lacks it for aarch64 musl, and
        // like kexec_load it needs CAP_SYS_BOOT, which the host no longer has.)
        libc::SYS_kexec_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_mknodat,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fanotify_init,
        libc::SYS_quotactl,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_syslog,
        libc::SYS_shmget,
        libc::SYS_shmat,
        libc::SYS_msgget,
        libc::SYS_semget,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
    ];
    for &nr in always {
        deny.insert(nr, Vec::new());
    }
    #[cfg(target_arch = "x86_64")]
    for nr in [
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_mknod,
        libc::SYS_iopl,
        libc::SYS_ioperm,
    ] {
        deny.insert(nr, Vec::new());
    }
    // clone: threads only (CLONE_THREAD set); a new process is refused.
    let clone_thread = libc::CLONE_THREAD as u64;
    deny.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(clone_thread),
            0,
        )?])?],
    );
    // Signals: only to this process (its own threads), never to a pid, a group or -1.
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        deny.insert(
            nr,
            vec![rule(vec![cond(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                me,
            )?])?],
        );
    }
    // Packet sockets and raw IP sockets: a shard gets those as descriptors or not at all.
    deny.insert(
        libc::SYS_socket,
        vec![
            rule(vec![cond(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::AF_PACKET as u64,
            )?])?,
            rule(vec![cond(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xf),
                libc::SOCK_RAW as u64,
            )?])?,
        ],
    );
    let filter = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    let prog: BpfProgram = filter.try_into().map_err(|e| err(&e))?;
    // clone3 passes its flags in a struct seccomp cannot read: answer ENOSYS,
    // which makes libc fall back to clone(2), checked above.
    let mut c3: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    c3.insert(libc::SYS_clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        c3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    let prog3: BpfProgram = clone3.try_into().map_err(|e| err(&e))?;
    match apply_filter(&prog3) {
        Ok(()) => {}
        // A kernel built without seccomp filters, or an emulator that cannot
        // let the emulated process filter the syscalls it makes itself
        // (qemu-user answers ENOSYS/EINVAL): the same as an architecture
        // without a filter, said loudly, not a reason to run nothing.
        Err(seccompiler::Error::Seccomp(e) | seccompiler::Error::Prctl(e))
            if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) =>
        {
            tracing::warn!(error = %e, "this kernel (or emulator) does not take seccomp filters; the shard host relies on its uid, Landlock, no_new_privs and the pids limit");
            return Ok(false);
        }
        Err(e) => return Err(err(&e)),
    }
    apply_filter(&prog).map_err(|e| err(&e))?;
    Ok(true)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn install_seccomp() -> Result<bool, SandboxError> {
    tracing::warn!(
        arch = std::env::consts::ARCH,
        "seccomp filter not available on this architecture (seccompiler supports x86-64 and aarch64); the shard host relies on its uid, Landlock, no_new_privs and the pids limit"
    );
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedicated_ids_are_unprivileged_and_distinct_per_slot() {
        let a = SandboxPlan::for_shard_dir(Path::new("/x"), 1);
        let b = SandboxPlan::for_shard_dir(Path::new("/x"), 2);
        assert_ne!(a.dedicated_id(), b.dedicated_id());
        assert!(a.dedicated_id() >= SANDBOX_UID_BASE);
        let wrap = SandboxPlan::for_shard_dir(Path::new("/x"), 0x1_0001);
        assert_eq!(wrap.dedicated_id(), a.dedicated_id());
        assert!(SANDBOX_UID_BASE.checked_add(0xFFFF).is_some());
    }
}
