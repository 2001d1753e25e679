//! The kernel boundary of the live capture. Every `unsafe` block of the
//! monitor is here.
//!
//! - [`Ring`]: a `TPACKET_V3` receive ring (`PACKET_RX_RING`) mapped into
//!   the process, read in place block by block as libpcap does: no system
//!   call per frame, kernel (or hardware) timestamps, the captured and the
//!   wire length of each frame.
//! - The fallback: a plain `AF_PACKET` socket that pnet's datalink channel
//!   then reads with one `recvfrom` per frame (pnet 0.35 accepts it through
//!   `Config::socket_fd`); this module keeps its descriptor to read the
//!   kernel's `PACKET_STATISTICS` drop counter and to set socket options
//!   pnet does not expose.
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

/// Settings of a `TPACKET_V3` receive ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingSpec {
    /// Bytes per block (a power of two, a multiple of the page size).
    pub block_size: usize,
    pub blocks: usize,
    /// The kernel hands over a block that is not full after this long
    /// (libpcap's "timeout"): bounds the delay a quiet link adds.
    pub retire_ms: u32,
}

/// Room per frame slot the kernel plans with (V3 packs frames of any size
/// into blocks; this only has to divide the block size).
const RING_FRAME_SIZE: usize = 2048;
/// `SOF_TIMESTAMPING_RAW_HARDWARE` (<linux/net_tstamp.h>): ask for the NIC's
/// timestamps in the ring where the driver provides them.
const SOF_TIMESTAMPING_RAW_HARDWARE: libc::c_int = 1 << 6;

/// A frame in the ring, valid until the next [`Ring::next`].
#[derive(Debug)]
pub(crate) struct RingFrame<'a> {
    /// Kernel (or, where flagged, hardware) receive time, ns since the epoch.
    pub ts_ns: u64,
    pub data: &'a [u8],
    /// Length on the wire (more than `data.len()` when cut at the snapshot length).
    pub wire_len: u32,
    pub hardware_ts: bool,
}

/// A `PACKET_RX_RING` of `TPACKET_V3` blocks mapped into this process, as
/// libpcap reads it: the kernel fills a block with frames and hands it over
/// (when full or after `retire_ms`); we read every frame of it in place, with
/// no system call per frame, and give it back.
pub(crate) struct Ring {
    fd: std::os::fd::OwnedFd,
    map: std::ptr::NonNull<u8>,
    map_len: usize,
    spec: RingSpec,
    current: usize,
    /// The current block is ours (its status said `TP_STATUS_USER`).
    held: bool,
    remaining: u32,
    next_offset: usize,
}

// SAFETY: the mapping belongs to this value alone (nothing else holds its
// pointer) and is only touched through `&mut self`; moving the value to
// another thread moves that exclusive access with it.
unsafe impl Send for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("spec", &self.spec)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Opens a ring on interface `ifindex`, bound to it, with the socket
    /// options applied before the ring is mapped.
    pub(crate) fn open(
        ifindex: i32,
        spec: RingSpec,
        promiscuous: bool,
        ignore_outgoing_frames: bool,
    ) -> io::Result<Ring> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let raw = open_raw()?;
        // SAFETY: `raw` was just returned by socket(2) and is owned by nobody
        // else; the OwnedFd closes it on every path from here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let fdr = fd.as_raw_fd();
        set_int(
            fdr,
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            libc::tpacket_versions::TPACKET_V3 as libc::c_int,
        )?;
        if ignore_outgoing_frames {
            ignore_outgoing(fdr)?;
        }
        // Best effort: without driver support the kernel stamps in software.
        let _ = set_int(
            fdr,
            libc::SOL_PACKET,
            libc::PACKET_TIMESTAMP,
            SOF_TIMESTAMPING_RAW_HARDWARE,
        );
        let block_size = libc::c_uint::try_from(spec.block_size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ring block too large"))?;
        let req = libc::tpacket_req3 {
            tp_block_size: block_size,
            tp_block_nr: spec.blocks as libc::c_uint,
            tp_frame_size: RING_FRAME_SIZE as libc::c_uint,
            tp_frame_nr: (spec.block_size / RING_FRAME_SIZE * spec.blocks) as libc::c_uint,
            tp_retire_blk_tov: spec.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        // SAFETY: `req` lives for the call and the length passed is its size.
        let r = unsafe {
            libc::setsockopt(
                fdr,
                libc::SOL_PACKET,
                libc::PACKET_RX_RING,
                (&req as *const libc::tpacket_req3).cast(),
                std::mem::size_of::<libc::tpacket_req3>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let map_len = spec.block_size * spec.blocks;
        // SAFETY: a fresh shared mapping of the ring the kernel just set up
        // for this descriptor, at an address the kernel chooses; the result
        // is checked before use and unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fdr,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = Ring {
            fd,
            map: std::ptr::NonNull::new(map.cast()).ok_or_else(io::Error::last_os_error)?,
            map_len,
            spec,
            current: 0,
            held: false,
            remaining: 0,
            next_offset: 0,
        };
        // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` lives for the call and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fdr,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if promiscuous {
            let mreq = libc::packet_mreq {
                mr_ifindex: ifindex,
                mr_type: libc::PACKET_MR_PROMISC as u16,
                mr_alen: 0,
                mr_address: [0; 8],
            };
            // SAFETY: `mreq` lives for the call and the length passed is its size.
            let r = unsafe {
                libc::setsockopt(
                    fdr,
                    libc::SOL_PACKET,
                    libc::PACKET_ADD_MEMBERSHIP,
                    (&mreq as *const libc::packet_mreq).cast(),
                    std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(ring)
    }

    /// The ring's socket (to attach a socket filter to).
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    fn block(&self, index: usize) -> *mut u8 {
        // SAFETY: index < blocks, so the offset stays inside the mapping.
        unsafe { self.map.as_ptr().add(index * self.spec.block_size) }
    }

    /// The block's status word, shared with the kernel: read with acquire
    /// (the frames it covers are visible once it says `TP_STATUS_USER`),
    /// written with release (we are done with them before the kernel reuses
    /// the block).
    fn status(&self, index: usize) -> &std::sync::atomic::AtomicU32 {
        let offset = std::mem::offset_of!(libc::tpacket_block_desc, hdr)
            + std::mem::offset_of!(libc::tpacket_hdr_v1, block_status);
        // SAFETY: the block descriptor starts each block (page aligned, so
        // the u32 is aligned), lives as long as the mapping, and the kernel
        // accesses this word atomically too.
        unsafe {
            &*self
                .block(index)
                .add(offset)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    }

    fn release_current(&mut self) {
        if self.held {
            self.status(self.current)
                .store(libc::TP_STATUS_KERNEL, std::sync::atomic::Ordering::Release);
            self.held = false;
            self.current = (self.current + 1) % self.spec.blocks;
        }
    }

    /// The next frame; `Ok(None)` when none arrived within `timeout`.
    pub(crate) fn next(
        &mut self,
        timeout: std::time::Duration,
    ) -> io::Result<Option<RingFrame<'_>>> {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        let mut waited = false;
        loop {
            if self.held && self.remaining > 0 {
                let block = self.block(self.current);
                let at = self.next_offset;
                let header_len = std::mem::size_of::<libc::tpacket3_hdr>();
                if at + header_len > self.spec.block_size {
                    // A corrupt offset: give the block back rather than read past it.
                    self.release_current();
                    continue;
                }
                // SAFETY: the header lies inside the block (checked above),
                // which the kernel handed to us; read unaligned-safe.
                let h: libc::tpacket3_hdr =
                    unsafe { std::ptr::read_unaligned(block.add(at).cast()) };
                let start = at + usize::from(h.tp_mac);
                let len = h.tp_snaplen as usize;
                if start + len > self.spec.block_size {
                    self.release_current();
                    continue;
                }
                self.remaining -= 1;
                self.next_offset = at + h.tp_next_offset as usize;
                // SAFETY: the frame lies inside the block (checked above); the
                // block stays ours until the next call releases it, and the
                // slice borrows `self` mutably until then.
                let data = unsafe { std::slice::from_raw_parts(block.add(start), len) };
                return Ok(Some(RingFrame {
                    ts_ns: u64::from(h.tp_sec) * 1_000_000_000 + u64::from(h.tp_nsec),
                    data,
                    wire_len: h.tp_len,
                    hardware_ts: h.tp_status & libc::TP_STATUS_TS_RAW_HARDWARE != 0,
                }));
            }
            self.release_current();
            if self.status(self.current).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0 {
                let desc = self.block(self.current);
                let hdr_at = std::mem::offset_of!(libc::tpacket_block_desc, hdr);
                // SAFETY: the block descriptor's header is at the start of the
                // block, which the kernel just handed to us.
                let h: libc::tpacket_hdr_v1 =
                    unsafe { std::ptr::read_unaligned(desc.add(hdr_at).cast()) };
                self.held = true;
                self.remaining = h.num_pkts;
                self.next_offset = h.offset_to_first_pkt as usize;
                continue;
            }
            if waited {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLERR,
                revents: 0,
            };
            let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(None);
                }
                return Err(e);
            }
            waited = true;
        }
    }

    /// Read and reset the kernel counters: (frames seen, frames dropped
    /// because no block was free) since the previous call.
    pub(crate) fn take_stats(&self) -> io::Result<(u32, u32)> {
        use std::os::fd::AsRawFd;
        // SAFETY: all-zero is a valid tpacket_stats_v3.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writes for the call and `len`
        // holds the size of `st`; the kernel writes at most that much.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.tp_packets, st.tp_drops))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `open` with this length and is not
        // referenced any more (frames borrow `self`, which is being dropped).
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}
