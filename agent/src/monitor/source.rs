//! Frame sources for the pipeline: a live interface (`AF_PACKET`), and
//! capture files (see [`super::pcap`]).
//!
//! Live capture notes:
//! - The capture reads a `TPACKET_V3` ring ([`super::packet_socket::Ring`]):
//!   the kernel fills blocks of frames, the source reads them in place with
//!   no system call per frame, and a block not yet full is handed over after
//!   `ring_retire_ms` so a quiet link adds at most that delay. Timestamps
//!   are the kernel's (the NIC's where the driver stamps in hardware).
//! - Where the ring cannot be set up (an old kernel, qemu-user, which does
//!   not translate `PACKET_RX_RING`), it falls back to pnet's datalink
//!   channel on a socket created in [`super::packet_socket`] (one `recvfrom`
//!   per frame, user-space timestamps), and says so in the log.
//! - The kernel drop counter (`PACKET_STATISTICS`) is readable either way
//!   ([`LiveCapture::kernel_stats`]).
//! - On a loopback interface every packet passes twice (out and in); the
//!   source sets `PACKET_IGNORE_OUTGOING` there so each is seen once.
//! - pnet's default 4 KiB read buffer truncates GRO/TSO super-packets; the
//!   default here is 256 KiB (byte counts use the IP length anyway).
//! - `promiscuous` is off by default (a router sees what it forwards without
//!   it, and qemu-user cannot set it).

use super::kernel_count::{KernelCountError, KernelCountOptions, KernelCountStats, KernelCounter};
use super::{packet_socket, LinkType, Pipeline, Timestamp};
use pnet::datalink::{self, Channel, DataLinkReceiver, DataLinkSender};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Options of a live capture.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub promiscuous: bool,
    /// How long one read waits before returning `Ok(None)`.
    pub read_timeout: Duration,
    /// Largest frame kept whole; longer frames are truncated.
    pub read_buffer: usize,
    /// Kernel receive queue size requested for the socket, bytes.
    pub socket_buffer: usize,
    /// Ignore frames this host sends; `None` = only on loopback interfaces.
    pub ignore_outgoing: Option<bool>,
    /// Read a `TPACKET_V3` ring (off: pnet's channel, one read per frame).
    pub ring: bool,
    /// Ring block size (a power of two, at least a page) and count. The
    /// whole ring is mapped into the process and counts in its RSS.
    pub ring_block_size: usize,
    pub ring_blocks: usize,
    /// A block not yet full is handed over after this long.
    pub ring_retire_ms: u32,
    /// Whether flows are counted in the kernel (see [`CaptureMode`]).
    pub capture: CaptureMode,
    /// Settings of the in-kernel flow counter.
    pub kernel: KernelCountOptions,
}

/// How a live capture takes packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CaptureMode {
    /// The in-kernel flow counter where BPF is permitted, else the ring
    /// alone (the reason is logged).
    #[default]
    Auto,
    /// The in-kernel flow counter or an error.
    Kernel,
    /// Every frame through the ring (or the one-read-per-frame fallback).
    Ring,
}

impl CaptureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Auto => "auto",
            CaptureMode::Kernel => "kernel",
            CaptureMode::Ring => "ring",
        }
    }
}

impl std::str::FromStr for CaptureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CaptureMode::Auto),
            "kernel" => Ok(CaptureMode::Kernel),
            "ring" => Ok(CaptureMode::Ring),
            other => Err(format!(
                "`{other}`: expected \"auto\", \"kernel\" or \"ring\""
            )),
        }
    }
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            promiscuous: false,
            read_timeout: Duration::from_millis(100),
            read_buffer: 256 * 1024,
            socket_buffer: 8 * 1024 * 1024,
            ignore_outgoing: None,
            ring: true,
            ring_block_size: 256 * 1024,
            ring_blocks: 8,
            ring_retire_ms: 20,
            capture: CaptureMode::Auto,
            kernel: KernelCountOptions::default(),
        }
    }
}

/// Kernel counters of the capture socket since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Frames the kernel queued or dropped for this socket.
    pub packets: u64,
    /// Frames dropped because the socket's queue was full.
    pub drops: u64,
}

/// A live capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("no interface named `{0}`")]
    NoSuchInterface(String),
    #[error("opening a packet socket on `{iface}` (needs CAP_NET_RAW): {source}")]
    Open { iface: String, source: io::Error },
    #[error("pnet returned a channel type other than Ethernet on `{0}`")]
    UnsupportedChannel(String),
    #[error("reading from `{iface}`: {source}")]
    Read { iface: String, source: io::Error },
    /// (`error` carries its causes in its message; boxed, it is large.)
    #[error("in-kernel flow counting on `{iface}`: {error}")]
    KernelCount {
        iface: String,
        error: Box<KernelCountError>,
    },
}

/// One frame of a live capture, valid until the next read.
#[derive(Debug)]
pub struct LiveFrame<'a> {
    pub ts: Timestamp,
    pub data: &'a [u8],
    /// Length on the wire (above `data.len()` when the capture cut it).
    pub wire_len: u32,
    /// `ts` is the NIC's hardware timestamp (else the kernel's or, in the
    /// fallback, user space's).
    pub hardware_ts: bool,
}

/// How frames are read.
enum Backend {
    Ring(packet_socket::Ring),
    Pnet {
        rx: Box<dyn DataLinkReceiver>,
        _tx: Box<dyn DataLinkSender>,
        fd: RawFd,
    },
}

/// A live capture on one interface.
pub struct LiveCapture {
    iface: String,
    backend: Backend,
    /// The in-kernel flow counter on the ring's socket, if attached.
    kernel: Option<KernelCounter>,
    /// Why `auto` capture runs without the kernel counter.
    kernel_fallback: Option<String>,
    read_timeout: Duration,
    link: LinkType,
    stats: KernelStats,
}

impl std::fmt::Debug for LiveCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCapture")
            .field("iface", &self.iface)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl LiveCapture {
    /// Open a capture on `iface` (in the caller's network namespace).
    pub fn open(iface: &str, opts: &LiveOptions) -> Result<Self, CaptureError> {
        let ni = datalink::interfaces()
            .into_iter()
            .find(|i| i.name == iface)
            .ok_or_else(|| CaptureError::NoSuchInterface(iface.to_string()))?;
        let open_err = |source| CaptureError::Open {
            iface: iface.to_string(),
            source,
        };
        // Interfaces without a hardware address (tun, wireguard) carry bare IP.
        let link = if ni.mac.is_none() && !ni.is_loopback() {
            LinkType::RawIp
        } else {
            LinkType::Ethernet
        };
        let ignore_outgoing = opts.ignore_outgoing.unwrap_or(ni.is_loopback());
        if opts.ring {
            let spec = packet_socket::RingSpec {
                block_size: opts.ring_block_size,
                blocks: opts.ring_blocks.max(1),
                retire_ms: opts.ring_retire_ms,
            };
            match packet_socket::Ring::open(
                ni.index as i32,
                spec,
                opts.promiscuous,
                ignore_outgoing,
            ) {
                Ok(ring) => {
                    tracing::info!(
                        iface,
                        ?link,
                        promiscuous = opts.promiscuous,
                        ring_bytes = spec.block_size * spec.blocks,
                        "live capture opened (TPACKET_V3 ring)"
                    );
                    let (kernel, kernel_fallback) = match opts.capture {
                        CaptureMode::Ring => (None, None),
                        mode => match KernelCounter::attach(ring.socket(), link, &opts.kernel) {
                            Ok(k) => {
                                tracing::info!(
                                    iface,
                                    first_packets = opts.kernel.first_packets,
                                    sample_every = opts.kernel.sample_every,
                                    max_flows = opts.kernel.max_flows,
                                    "flows counted in the kernel (BPF socket filter on the ring)"
                                );
                                (Some(k), None)
                            }
                            Err(error) if mode == CaptureMode::Kernel => {
                                return Err(CaptureError::KernelCount {
                                    iface: iface.to_string(),
                                    error: Box::new(error),
                                })
                            }
                            Err(e) => {
                                tracing::warn!(
                                    iface,
                                    capture = "auto",
                                    reason = %e,
                                    "in-kernel flow counting unavailable; every frame goes through the ring"
                                );
                                (None, Some(e.to_string()))
                            }
                        },
                    };
                    // Discard counters from before we started reading.
                    let _ = ring.take_stats();
                    return Ok(LiveCapture {
                        iface: iface.to_string(),
                        backend: Backend::Ring(ring),
                        kernel,
                        kernel_fallback,
                        read_timeout: opts.read_timeout,
                        link,
                        stats: KernelStats::default(),
                    });
                }
                // No permission is no permission either way: say so now.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(open_err(e)),
                Err(e) => tracing::warn!(
                    iface,
                    error = %e,
                    "no TPACKET_V3 ring here; capturing with one read per frame"
                ),
            }
        }
        let kernel_fallback = match opts.capture {
            CaptureMode::Ring => None,
            CaptureMode::Kernel => {
                return Err(CaptureError::KernelCount {
                    iface: iface.to_string(),
                    error: Box::new(KernelCountError::NoRing),
                })
            }
            CaptureMode::Auto => Some(KernelCountError::NoRing.to_string()),
        };
        let fd = packet_socket::open_raw().map_err(open_err)?;
        let setup = (|| {
            if ignore_outgoing {
                packet_socket::ignore_outgoing(fd)?;
            }
            if opts.socket_buffer > 0 {
                packet_socket::set_rcvbuf(fd, opts.socket_buffer)?;
            }
            Ok(())
        })();
        if let Err(e) = setup {
            packet_socket::close(fd);
            return Err(open_err(e));
        }
        let cfg = datalink::Config {
            read_buffer_size: opts.read_buffer.max(2048),
            write_buffer_size: 2048,
            read_timeout: Some(opts.read_timeout),
            promiscuous: opts.promiscuous,
            socket_fd: Some(fd),
            ..datalink::Config::default()
        };
        // From here pnet owns `fd` (and closes it on every error path).
        let (tx, rx) = match datalink::channel(&ni, cfg) {
            Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
            Ok(_) => return Err(CaptureError::UnsupportedChannel(iface.to_string())),
            Err(e) => return Err(open_err(e)),
        };
        tracing::info!(
            iface,
            ?link,
            promiscuous = opts.promiscuous,
            "live capture opened (one read per frame)"
        );
        // Discard counters from before we started reading.
        let _ = packet_socket::take_stats(fd);
        Ok(LiveCapture {
            iface: iface.to_string(),
            backend: Backend::Pnet { rx, _tx: tx, fd },
            kernel: None,
            kernel_fallback,
            read_timeout: opts.read_timeout,
            link,
            stats: KernelStats::default(),
        })
    }

    /// Link type of the frames this source returns.
    pub fn link_type(&self) -> LinkType {
        self.link
    }

    /// Whether frames come from a `TPACKET_V3` ring (else one read each).
    pub fn uses_ring(&self) -> bool {
        matches!(self.backend, Backend::Ring(_))
    }

    /// Whether flows are counted in the kernel (only their first packets
    /// come as frames; see [`LiveCapture::apply_kernel_counts`]).
    pub fn counts_in_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// Why `auto` capture runs without the in-kernel flow counter.
    pub fn kernel_fallback(&self) -> Option<&str> {
        self.kernel_fallback.as_deref()
    }

    /// How frames are taken, in words (for logs and the CLI).
    pub fn describe(&self) -> &'static str {
        match (&self.backend, &self.kernel) {
            (Backend::Ring(_), Some(_)) => "kernel flow counter + TPACKET_V3 ring",
            (Backend::Ring(_), None) => "TPACKET_V3 ring",
            (Backend::Pnet { .. }, _) => "one read per frame",
        }
    }

    /// Whether the kernel's flow counts are due to be read.
    pub fn kernel_counts_due(&self) -> bool {
        self.kernel.as_ref().is_some_and(KernelCounter::due)
    }

    /// Hands `pipeline` the packets the kernel counted and did not deliver
    /// (when a read is due, or always with `force`, e.g. before the run's
    /// totals). The caller polls the pipeline's window with `now` first.
    /// Nothing to do without the kernel counter.
    pub fn apply_kernel_counts(
        &mut self,
        pipeline: &mut Pipeline,
        now: Timestamp,
        force: bool,
    ) -> Result<(), CaptureError> {
        let Some(k) = &mut self.kernel else {
            return Ok(());
        };
        k.apply(pipeline, now, force)
            .map_err(|error| CaptureError::KernelCount {
                iface: self.iface.clone(),
                error: Box::new(error),
            })
    }

    /// The kernel flow counter's statistics, when it is attached.
    pub fn kernel_count_stats(&self) -> Option<KernelCountStats> {
        self.kernel.as_ref().and_then(|k| k.stats().ok())
    }

    /// The next frame with its receive time (kernel or hardware from the
    /// ring, user space from the fallback); `Ok(None)` when the read
    /// timeout passed without a frame.
    pub fn next_frame(&mut self) -> Result<Option<LiveFrame<'_>>, CaptureError> {
        let rx = match &mut self.backend {
            Backend::Ring(ring) => {
                return match ring.next(self.read_timeout) {
                    Ok(Some(f)) => Ok(Some(LiveFrame {
                        ts: Timestamp::from_nanos(f.ts_ns),
                        data: f.data,
                        wire_len: f.wire_len,
                        hardware_ts: f.hardware_ts,
                    })),
                    Ok(None) => Ok(None),
                    Err(source) => Err(CaptureError::Read {
                        iface: self.iface.clone(),
                        source,
                    }),
                };
            }
            Backend::Pnet { rx, .. } => rx,
        };
        match rx.next() {
            Ok(frame) => Ok(Some(LiveFrame {
                ts: Timestamp::now(),
                data: frame,
                wire_len: frame.len() as u32,
                hardware_ts: false,
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(CaptureError::Read {
                iface: self.iface.clone(),
                source,
            }),
        }
    }

    /// Cumulative kernel counters (`PACKET_STATISTICS`, which resets on each
    /// read, accumulated here).
    pub fn kernel_stats(&mut self) -> io::Result<KernelStats> {
        let (p, d) = match &self.backend {
            Backend::Ring(ring) => ring.take_stats()?,
            Backend::Pnet { fd, .. } => packet_socket::take_stats(*fd)?,
        };
        self.stats.packets += u64::from(p);
        self.stats.drops += u64::from(d);
        Ok(self.stats)
    }
}
