//! Kernel-boundary helpers of the shard host process: the fatal-signal
//! reporter, niceness, the capability calls nix does not wrap (`capget`,
//! `capset`, the ambient and bounding sets) and opening a TUN device for a sandboxed
//! shard. The only other `unsafe` in `shardhost` is `loader`.
//!
//! The fatal-signal reporter lets the agent attribute a crash to the shard
//! that was executing: the host loop stores the index of the shard it is
//! calling into [`CURRENT_SHARD`]; a handler for SIGSEGV/SIGBUS/SIGILL/SIGFPE/
//! SIGABRT writes one fixed-size datagram (`FATAL_TAG`, shard index, signal)
//! to the IPC socket with async-signal-safe calls only, restores the default
//! action and re-raises, so the process still dies from the original signal.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// No shard is executing.
pub const NO_SHARD: u32 = u32::MAX;
/// Index of the shard the host is calling into, or [`NO_SHARD`].
pub static CURRENT_SHARD: AtomicU32 = AtomicU32::new(NO_SHARD);
static FATAL_FD: AtomicI32 = AtomicI32::new(-1);

/// First byte of the raw datagram the signal handler writes (postcard frames
/// start with [`super::ipc::FRAME_TAG`] instead).
pub const FATAL_TAG: u8 = 0xFA;
/// Length of the fatal datagram: tag, shard index (u32 LE), signal (i32 LE).
pub const FATAL_LEN: usize = 9;

extern "C" fn on_fatal(sig: libc::c_int) {
    let idx = CURRENT_SHARD.load(Ordering::Relaxed);
    let fd = FATAL_FD.load(Ordering::Relaxed);
    let mut msg = [0u8; FATAL_LEN];
    msg[0] = FATAL_TAG;
    msg[1..5].copy_from_slice(&idx.to_le_bytes());
    msg[5..9].copy_from_slice(&sig.to_le_bytes());
    if fd >= 0 {
        // SAFETY: send(2) is async-signal-safe; `msg` is a valid local buffer.
        unsafe {
            libc::send(
                fd,
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe; restoring the default action and
    // re-raising makes the process die from the original signal, as the agent expects.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Installs the fatal-signal reporter writing to `ipc_fd`.
pub fn install_fatal_reporter(ipc_fd: i32) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    FATAL_FD.store(ipc_fd, Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(on_fatal),
        SaFlags::SA_NODEFER,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGILL,
        Signal::SIGFPE,
        Signal::SIGABRT,
    ] {
        // SAFETY: `on_fatal` only uses async-signal-safe functions and atomics.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Sets this process's niceness (`setpriority(PRIO_PROCESS, 0, nice)`).
pub fn set_nice(nice: i8) -> std::io::Result<()> {
    let nice = libc::c_int::from(nice.clamp(-20, 19));
    // SAFETY: plain syscall wrapper on our own process with integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sleeps in `poll(2)` until the IPC socket or one of the shards' descriptors
/// is readable, or `timeout_ms` passes. Returns whether the IPC socket is readable.
pub fn wait_readable(ipc: std::os::fd::BorrowedFd<'_>, shard_fds: &[i32], timeout_ms: u16) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    let mut pfds = Vec::with_capacity(shard_fds.len() + 1);
    pfds.push(PollFd::new(ipc, PollFlags::POLLIN));
    for &fd in shard_fds.iter().filter(|&&fd| fd >= 0) {
        // SAFETY: the shard promises the descriptor is open until its next poll; the borrow
        // lives only for this poll(2) call, and a descriptor it closed anyway yields POLLNVAL.
        pfds.push(PollFd::new(
            unsafe { BorrowedFd::borrow_raw(fd) },
            PollFlags::POLLIN,
        ));
    }
    match poll(&mut pfds, PollTimeout::from(timeout_ms)) {
        Ok(n) if n > 0 => pfds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        }),
        _ => false,
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability of the calling thread (and so of threads it starts
/// later) and sets `no_new_privs`: after its shards are initialised (TUN
/// attached, sockets bound) a host runs unprivileged even when the agent is
/// root. Threads a shard started during `init` keep theirs.
pub fn drop_privileges() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) reads one header and, for version 3, two data structs; both are
    // valid #[repr(C)] values matching the kernel's layout for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `CAP_KILL` (capability.h): signal processes of other uids (the agent's
/// hosts, once they run as their own uid).
pub const CAP_KILL: u32 = 5;
/// `CAP_SETGID`: change gids and supplementary groups.
pub const CAP_SETGID: u32 = 6;
/// `CAP_SETUID`: change uids.
pub const CAP_SETUID: u32 = 7;
/// `CAP_SETPCAP`: drop capabilities from the bounding set.
pub const CAP_SETPCAP: u32 = 8;
/// `CAP_NET_ADMIN`: nftables.
pub const CAP_NET_ADMIN: u32 = 12;

/// The calling thread's effective capability set (bit `n` = capability `n`).
pub fn effective_caps() -> std::io::Result<u64> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget(2) reads the header and, for version 3, writes two data structs; both
    // are valid, writable #[repr(C)] values matching the kernel's layout during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// Whether `cap` is in the calling thread's ambient set, i.e. whether a
/// program it executes (a shard host, `nft`) starts with it although the
/// caller is not root. False where the kernel has no ambient set.
pub fn ambient_has(cap: u32) -> bool {
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap, 0, 0) takes integers only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET,
            libc::c_ulong::from(cap),
            0,
            0,
        )
    };
    rc == 1
}

/// Makes `cmd`'s child keep only `cap` of the ambient set it inherits
/// (least privilege for `nft`, which needs `CAP_NET_ADMIN` and nothing else
/// of what the packaged unit gives the agent). Lowering an ambient
/// capability needs no privilege; what this process keeps is unchanged.
pub fn keep_only_ambient(cmd: &mut std::process::Command, cap: u32) {
    use std::os::unix::process::CommandExt;
    let keep = libc::c_ulong::from(cap);
    // SAFETY: the closure runs in the forked child before execve and calls only
    // prctl(2), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            for c in 0..64 {
                if c == keep {
                    continue;
                }
                // EINVAL past the kernel's last capability (or without ambient
                // capabilities at all): nothing more to lower.
                if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_LOWER, c, 0, 0) != 0 {
                    break;
                }
            }
            Ok(())
        })
    };
}

/// Clears the ambient capability set (the systemd unit gives the agent its
/// capabilities as ambient ones, which a re-executed host would otherwise
/// keep).
pub fn clear_ambient_caps() -> std::io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) takes integers only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel without ambient capabilities has none to clear.
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Empties the capability bounding set (needs `CAP_SETPCAP`, so call it
/// before the identity change and the `capset` that drop it): nothing this process or a descendant executes can
/// ever regain a capability.
pub fn drop_bounding_set() -> std::io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) takes integers only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability: done.
                Some(libc::EINVAL) => break,
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens `/dev/net/tun` and attaches it to the existing or new TUN device
/// `name` (`IFF_TUN | IFF_NO_PI`, non-blocking), while this host is still
/// privileged: the descriptor is then passed to the sandboxed shard, which
/// could open neither the device node nor attach without `CAP_NET_ADMIN`.
pub fn open_tun(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // SAFETY: all-zero bytes are a valid `struct ifreq`.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` on a descriptor we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}
