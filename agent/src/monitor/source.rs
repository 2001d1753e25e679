//! Frame sources for the pipeline: a live interface through pnet's datalink
//! channel (`AF_PACKET`), and capture files (see [`super::pcap`]).
//!
//! Live capture notes:
//! - The socket is created in [`super::packet_socket`] and handed to pnet, so
//!   the kernel drop counter (`PACKET_STATISTICS`) stays readable
//!   ([`LiveCapture::kernel_stats`]).
//! - On a loopback interface every packet passes twice (out and in); the
//!   source sets `PACKET_IGNORE_OUTGOING` there so each is seen once.
//! - pnet's default 4 KiB read buffer truncates GRO/TSO super-packets; the
//!   default here is 256 KiB (byte counts use the IP length anyway).
//! - Timestamps are taken in user space when a frame is read (pnet does not
//!   expose kernel timestamps), so they include scheduling delay.
//! - `promiscuous` is off by default (a router sees what it forwards without
//!   it, and qemu-user cannot set it).

use super::{packet_socket, LinkType, Timestamp};
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
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            promiscuous: false,
            read_timeout: Duration::from_millis(100),
            read_buffer: 256 * 1024,
            socket_buffer: 8 * 1024 * 1024,
            ignore_outgoing: None,
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
}

/// A live capture on one interface.
pub struct LiveCapture {
    iface: String,
    rx: Box<dyn DataLinkReceiver>,
    _tx: Box<dyn DataLinkSender>,
    fd: RawFd,
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
        let fd = packet_socket::open_raw().map_err(open_err)?;
        let setup = (|| {
            if opts.ignore_outgoing.unwrap_or(ni.is_loopback()) {
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
        // Interfaces without a hardware address (tun, wireguard) carry bare IP.
        let link = if ni.mac.is_none() && !ni.is_loopback() {
            LinkType::RawIp
        } else {
            LinkType::Ethernet
        };
        tracing::info!(
            iface,
            ?link,
            promiscuous = opts.promiscuous,
            "live capture opened"
        );
        // Discard counters from before we started reading.
        let _ = packet_socket::take_stats(fd);
        Ok(LiveCapture {
            iface: iface.to_string(),
            rx,
            _tx: tx,
            fd,
            link,
            stats: KernelStats::default(),
        })
    }

    /// Link type of the frames this source returns.
    pub fn link_type(&self) -> LinkType {
        self.link
    }

    /// The next frame with its (user-space) receive time; `Ok(None)` when
    /// the read timeout passed without a frame.
    pub fn next_frame(&mut self) -> Result<Option<(Timestamp, &[u8])>, CaptureError> {
        match self.rx.next() {
            Ok(frame) => Ok(Some((Timestamp::now(), frame))),
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
        let (p, d) = packet_socket::take_stats(self.fd)?;
        self.stats.packets += u64::from(p);
        self.stats.drops += u64::from(d);
        Ok(self.stats)
    }
}
