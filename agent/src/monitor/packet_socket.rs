//! The kernel boundary of the live capture: creating the `AF_PACKET` socket
//! that pnet's datalink channel then uses (pnet 0.35 accepts it through
//! `Config::socket_fd`), so that this module keeps its descriptor to read the
//! kernel's `PACKET_STATISTICS` drop counter and to set socket options pnet
//! does not expose. Every `unsafe` block of the monitor is here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

// ABI constants from <linux/if_packet.h> and <asm-generic/socket.h>; the same
// on x86-64, aarch64 and armv7.
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const SO_RCVBUFFORCE: libc::c_int = 33;

#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: libc::c_uint,
    tp_drops: libc::c_uint,
}

/// Open a raw `AF_PACKET` socket receiving every protocol (`ETH_P_ALL`).
/// The caller hands the descriptor to pnet, which owns and closes it.
pub(crate) fn open_raw() -> io::Result<RawFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain system call with constant arguments; no memory is passed.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Close a descriptor that was never handed to pnet.
pub(crate) fn close(fd: RawFd) {
    // SAFETY: `fd` was returned by `open_raw` and not given away, so nothing
    // else owns or closes it.
    unsafe {
        libc::close(fd);
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` lives for the call and the length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Do not deliver frames this host sends (on `lo` every packet would
/// otherwise be seen twice: once outgoing, once incoming). Linux ≥ 4.20.
pub(crate) fn ignore_outgoing(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
}

/// Enlarge the kernel receive queue (bursts are queued instead of dropped).
/// Tries the privileged `SO_RCVBUFFORCE` first, then the capped `SO_RCVBUF`.
pub(crate) fn set_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, v)
        .or_else(|_| set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v))
}

/// Read and reset the kernel counters: (frames queued to the socket, frames
/// dropped because its queue was full) since the previous call.
pub(crate) fn take_stats(fd: RawFd) -> io::Result<(u32, u32)> {
    let mut st = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `st` and `len` are valid for writes for the duration of the call
    // and `len` holds the size of `st`; the kernel writes at most that much.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            (&mut st as *mut TpacketStats).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // tp_packets counts drops too (see packet(7)).
    Ok((st.tp_packets, st.tp_drops))
}
