//! Packet-level QoS monitoring: capture sources, a bounded flow table, traffic
//! classification and per-class QoS windows (`shardline-agent monitor`).
//!
//! # API boundary
//!
//! The decision logic is the sans-IO [`Pipeline`]: the caller hands it frames
//! with their timestamps and polls it with the current time; it never reads a
//! clock or does I/O.
//!
//! ```no_run
//! use shardline_agent::monitor::{MonitorConfig, Pipeline, LinkType, Timestamp};
//! let mut p = Pipeline::new(MonitorConfig::default());
//! # let (ts, frame): (Timestamp, &[u8]) = (Timestamp::from_nanos(0), &[]);
//! if let Some(window) = p.poll_window(ts) {
//!     // window.classes: Vec<shardline_shared::msg::ClassStats>, ready to report.
//! #   let _ = window;
//! }
//! p.handle_frame(ts, LinkType::Ethernet, frame);
//! let totals = p.totals();
//! # let _ = totals;
//! ```
//!
//! Frames come from [`source::LiveCapture`] (a `TPACKET_V3` ring, pnet's
//! AF_PACKET channel as the fallback, kernel drop counter via
//! `PACKET_STATISTICS`; where BPF is allowed, [`kernel_count`] counts flows
//! in the kernel and delivers only the packets classification needs) or [`pcap::CaptureReader`] (pcap and
//! pcapng files). [`MonitorConfig`] loads from TOML; classification rules are
//! TOML data (shipped defaults in `agent/rules/default.toml`).
//!
//! # Invariants
//!
//! - Memory is bounded: at most `max_flows` flows (oldest evicted and counted),
//!   bounded name and DNS caches, bounded RTT sample reservoirs.
//! - No input panics or stalls the pipeline: malformed frames are counted and
//!   skipped; payload parsers (TLS SNI, QUIC, DNS, the `evidence` detectors) read only captured bytes.
//! - Byte counts are IP bytes from the IP length fields, never captured lengths.
//! - The per-packet path does not allocate (except when a new host name is
//!   interned from an SNI or DNS answer, and when the first client packet
//!   of a QUIC flow is decrypted to read its SNI: once per flow).

pub mod cli;
pub mod config;
pub mod dns;
pub mod evidence;
pub mod flow;
pub mod kernel_count;
pub mod names;
pub mod parse;
pub mod pcap;
pub mod pipeline;
pub mod quic;
pub mod source;
pub mod tls;

mod packet_socket;

pub use config::{ConfigError, MonitorConfig, Rules};
pub use parse::LinkType;
pub use pipeline::{
    ClassTotal, FlowSummary, KernelCounts, KernelCountsApplied, Pipeline, Totals, WindowSummary,
};

/// A capture timestamp: nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_nanos(ns: u64) -> Self {
        Timestamp(ns)
    }

    pub fn from_duration(since_epoch: std::time::Duration) -> Self {
        Timestamp(since_epoch.as_nanos().min(u128::from(u64::MAX)) as u64)
    }

    /// The current wall-clock time (for the I/O edges only).
    pub fn now() -> Self {
        Self::from_duration(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0)
    }
}
