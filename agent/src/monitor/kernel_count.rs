//! Per-flow counting in the kernel, so that user space sees only the first
//! packets of each flow that classification needs.
//!
//! The BPF program (`agent/bpf/flow_count.bpf.c`, its compiled object
//! committed beside it and embedded here) is a socket filter attached with
//! `SO_ATTACH_BPF` to the capture's own `AF_PACKET` socket, in front of its
//! `TPACKET_V3` ring ([`super::packet_socket::Ring`]). For each TCP/UDP
//! packet it counts packets and IP bytes per flow (both directions in one
//! LRU hash entry) and lets the frame into the ring only while the flow
//! needs it: its first [`KernelCountOptions::first_packets`] packets (the
//! payload inspectors and the behaviour rules' first looks), TCP packets
//! with one of [`KernelCountOptions::tcp_flags`], DNS (the name cache), the
//! first packet after a pause ([`KernelCountOptions::deliver_after_gap`]:
//! the pipeline counts pauses) and, optionally, one packet in
//! [`KernelCountOptions::sample_every`]. Every
//! other frame (non-IP, fragments, extension headers, anything it does not
//! read completely) goes through uncounted, so the pipeline counts it as
//! before.
//!
//! [`KernelCounter`] loads and attaches the program through `aya` (no
//! hand-written `bpf()` calls), and [`KernelCounter::apply`] reads the map
//! and hands the pipeline what it did not see
//! ([`Pipeline::handle_kernel_counts`]), so windows and totals stay exact:
//!
//! - The kernel's counters are cumulative and never reset; user space keeps
//!   the last values it applied per entry and applies the difference, so a
//!   counter read while the kernel updates it is simply picked up at the
//!   next read (no read-and-delete race).
//! - Only packets the kernel did *not* deliver are applied (its "skipped"
//!   counters), so a frame is never counted twice, whatever the map does.
//! - An entry idle for the pipeline's idle timeout of its protocol is
//!   deleted (the pipeline expires the flow at the same time), so the
//!   flow's next packet starts a new entry and is delivered again.
//! - The LRU map may drop an entry when it is full; that is counted
//!   ([`KernelCountStats::evicted`]). What the kernel counted into it after
//!   the last read is lost; a later packet of the flow makes a new entry
//!   (recognised by its first-seen time) whose counts are applied from
//!   zero. Nothing is counted twice.
//! - The first frames of a flow may still sit in the ring when its first
//!   skipped packets are read: such counts wait (up to [`CREATE_AFTER`]) for
//!   the pipeline to have the flow, so it is classified from its frames.
//!
//! Kernel times are `CLOCK_MONOTONIC`; they are moved to the wall clock
//! with the offset between the two clocks at each read.
//!
//! The only `unsafe` here: `aya::Pod` for the three `#[repr(C)]` types
//! shared with the BPF program.
#![allow(unsafe_code)]

use super::pipeline::{KernelCounts, KernelCountsApplied};
use super::{LinkType, Pipeline, Timestamp};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::SocketFilter;
use std::collections::HashMap as StdHashMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// The compiled program (`cargo xtask bpf` rebuilds it from its source).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/flow_count.bpf.o");

/// Counts of a flow whose first frames have not reached the pipeline yet
/// are created from the counts alone after this long.
pub const CREATE_AFTER: Duration = Duration::from_secs(1);

/// TCP flag bits (for [`KernelCountOptions::tcp_flags`]).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
}

/// Settings of the in-kernel flow counter.
#[derive(Debug, Clone)]
pub struct KernelCountOptions {
    /// Packets of each flow delivered to user space before the kernel only
    /// counts. The pipeline's behaviour rules first look at a flow at its
    /// 16th packet, then at every doubling; payload inspection (TLS and
    /// QUIC SNI) needs the first client packets.
    pub first_packets: u32,
    /// Also deliver one packet in this many beyond `first_packets` (0 = none).
    pub sample_every: u32,
    /// TCP packets with any of these flags are always delivered. SYN by
    /// default (a new connection on a reused 5-tuple); FIN and RST are not:
    /// the pipeline does nothing with them yet.
    pub tcp_flags: u8,
    /// The first packet of a flow after a pause this long is delivered:
    /// the pipeline counts a flow's pauses (a player fetching segments
    /// pauses, a download does not; [`super::flow::PAUSE_NS`]). Zero: never.
    pub deliver_after_gap: Duration,
    /// Entries of the kernel's LRU flow map.
    pub max_flows: u32,
    /// How often the map is read.
    pub read_interval: Duration,
}

impl Default for KernelCountOptions {
    fn default() -> Self {
        KernelCountOptions {
            first_packets: 64,
            sample_every: 0,
            tcp_flags: tcp_flag::SYN,
            deliver_after_gap: Duration::from_nanos(super::flow::PAUSE_NS),
            max_flows: 65_536,
            read_interval: Duration::from_millis(100),
        }
    }
}

/// Loading or running the in-kernel flow counter failed. Each message
/// carries aya's whole cause chain (the OS error is at its end), so the
/// variants hold no `source()` of their own.
#[derive(Debug, thiserror::Error)]
pub enum KernelCountError {
    #[error("loading the BPF flow counter (needs CAP_BPF or CAP_SYS_ADMIN, a kernel with BPF and enough locked memory): {}", chain(.0))]
    Load(aya::EbpfError),
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    #[error("loading the flow counter's socket filter into the kernel: {}", chain(.0))]
    Program(aya::programs::ProgramError),
    #[error("attaching the flow counter to the capture socket: {}", chain(.0))]
    Attach(aya::programs::ProgramError),
    #[error("the flow counter's map `{name}`: {}", chain(.error))]
    Map { name: &'static str, error: MapError },
    #[error("the in-kernel flow counter needs the TPACKET_V3 ring, which is not available here")]
    NoRing,
    #[error("the in-kernel flow counter reads Ethernet or raw IP, not {0:?}")]
    Link(LinkType),
}

/// An error with its sources, `a: b: c` (aya puts the OS error in a
/// source; a level that repeats the one above it is left out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut last = s.clone();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if text != last {
            s.push_str(": ");
            s.push_str(&text);
        }
        last = text;
        cur = c.source();
    }
    s
}

/// Counters of the in-kernel flow counter since it was attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCountStats {
    /// Frames counted per flow and delivered to user space.
    pub delivered: u64,
    /// Frames counted per flow and not delivered (applied as counts).
    pub skipped: u64,
    /// Frames delivered without counting (not TCP/UDP, fragments, …).
    pub uncounted: u64,
    /// Frames delivered uncounted because the map refused an entry.
    pub no_entry: u64,
    /// Map entries the kernel's LRU dropped before user space deleted them.
    pub evicted: u64,
    /// Idle entries user space deleted.
    pub deleted: u64,
    /// Flows created from counts alone (their first frames never came).
    pub created_from_counts: u64,
    /// Map entries now.
    pub entries: u64,
}

impl KernelCountStats {
    /// Every frame the filter let through to the ring.
    pub fn frames_delivered(&self) -> u64 {
        self.delivered + self.uncounted + self.no_entry
    }
}

/// The map key, as `struct flow_key` in the BPF source.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKeyRaw {
    a: [u8; 16],
    b: [u8; 16],
    a_port: u16,
    b_port: u16,
    proto: u8,
    v6: u8,
    pad: [u8; 2],
}

/// The map value, as `struct flow_value` in the BPF source.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FlowValueRaw {
    first_ns: u64,
    last_ns: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    skipped_packets: [u64; 2],
    skipped_bytes: [u64; 2],
    initiator_is_a: u8,
    pad: [u8; 7],
}

/// The settings map's value, as `struct config` in the BPF source.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ConfigRaw {
    first_packets: u32,
    sample_every: u32,
    tcp_flags: u32,
    link: u32,
    gap_ns: u64,
}

// SAFETY: plain `#[repr(C)]` structs of integers and byte arrays with no
// implicit padding (sizes 40, 88 and 24 bytes, checked in the tests below):
// every bit pattern is a valid value, which is what `Pod` requires.
unsafe impl aya::Pod for FlowKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowValueRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for ConfigRaw {}

const STAT_DELIVERED: u32 = 0;
const STAT_SKIPPED: u32 = 1;
const STAT_UNCOUNTED: u32 = 2;
const STAT_NO_ENTRY: u32 = 3;

/// What user space last applied of one map entry.
#[derive(Debug, Clone, Copy)]
struct Applied {
    /// Identifies the entry's incarnation (a dropped and re-created entry
    /// has a new one).
    first_ns: u64,
    skipped_packets: [u64; 2],
    skipped_bytes: [u64; 2],
    /// Counts are waiting for the pipeline to have the flow, since then.
    waiting_since: Option<Instant>,
    /// Read in the pass numbered so.
    pass: u64,
}

/// The in-kernel flow counter on one capture socket. See the module docs.
pub struct KernelCounter {
    // Keeps the program loaded while attached (the socket holds its own
    // reference too, so closing the socket is all a crash leaves to do).
    _ebpf: aya::Ebpf,
    flows: HashMap<MapData, FlowKeyRaw, FlowValueRaw>,
    stats_map: PerCpuArray<MapData, u64>,
    applied: StdHashMap<FlowKeyRaw, Applied>,
    pass: u64,
    /// Listing more entries than this in one pass stops it.
    max_listed: usize,
    read_interval: Duration,
    next_read: Instant,
    evicted: u64,
    deleted: u64,
    created: u64,
}

impl std::fmt::Debug for KernelCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounter")
            .field("entries_applied", &self.applied.len())
            .field("read_interval", &self.read_interval)
            .finish_non_exhaustive()
    }
}

/// (wall clock − monotonic clock) now, ns.
fn monotonic_to_wall() -> i128 {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
    });
    i128::from(Timestamp::now().as_nanos()) - mono
}

fn wall(mono_ns: u64, offset: i128) -> Timestamp {
    let t = i128::from(mono_ns) + offset;
    Timestamp::from_nanos(t.clamp(0, i128::from(u64::MAX)) as u64)
}

fn endpoint(addr: [u8; 16], v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(super::flow::addr_of(addr, v6), port)
}

impl KernelCounter {
    /// Loads the program and attaches it to `socket` (the capture's
    /// `AF_PACKET` socket, whose frames are of `link` type). Tries to raise
    /// the locked-memory limit first (kernels before 5.11 charge BPF maps
    /// to it).
    pub(crate) fn attach(
        socket: BorrowedFd<'_>,
        link: LinkType,
        opts: &KernelCountOptions,
    ) -> Result<Self, KernelCountError> {
        let link = match link {
            LinkType::Ethernet => 0,
            LinkType::RawIp => 1,
            other => return Err(KernelCountError::Link(other)),
        };
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        // The program has no CO-RE relocations: it needs none of the
        // kernel's BTF (aya 0.13's loader still parses it once when created,
        // ~10 ms of CPU at start).
        let mut ebpf = aya::EbpfLoader::new()
            .btf(None)
            .set_max_entries("flows", opts.max_flows.max(1))
            .load(OBJECT)
            .map_err(KernelCountError::Load)?;
        let map_err = |name| move |error| KernelCountError::Map { name, error };
        let mut config: Array<MapData, ConfigRaw> = ebpf
            .take_map("config")
            .ok_or(KernelCountError::Missing("map `config`"))?
            .try_into()
            .map_err(map_err("config"))?;
        config
            .set(
                0,
                ConfigRaw {
                    first_packets: opts.first_packets,
                    sample_every: opts.sample_every,
                    tcp_flags: u32::from(opts.tcp_flags),
                    link,
                    gap_ns: opts.deliver_after_gap.as_nanos().min(u128::from(u64::MAX)) as u64,
                },
                0,
            )
            .map_err(map_err("config"))?;
        let flows = ebpf
            .take_map("flows")
            .ok_or(KernelCountError::Missing("map `flows`"))?
            .try_into()
            .map_err(map_err("flows"))?;
        let stats_map = ebpf
            .take_map("stats")
            .ok_or(KernelCountError::Missing("map `stats`"))?
            .try_into()
            .map_err(map_err("stats"))?;
        let prog: &mut SocketFilter = ebpf
            .program_mut("flow_count")
            .ok_or(KernelCountError::Missing("program `flow_count`"))?
            .try_into()
            .map_err(KernelCountError::Program)?;
        prog.load().map_err(KernelCountError::Program)?;
        prog.attach(socket).map_err(KernelCountError::Attach)?;
        Ok(KernelCounter {
            _ebpf: ebpf,
            flows,
            stats_map,
            applied: StdHashMap::new(),
            pass: 0,
            max_listed: (opts.max_flows.max(1) as usize).saturating_mul(4),
            read_interval: opts.read_interval,
            next_read: Instant::now() + opts.read_interval,
            evicted: 0,
            deleted: 0,
            created: 0,
        })
    }

    /// Whether [`KernelCounter::apply`] would read the map now.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next_read
    }

    /// Reads the map (if due, or always with `force`) and hands the
    /// pipeline the packets it did not see, at time `now` (the caller polls
    /// the pipeline's window with `now` first). With `force` (the end of a
    /// capture) counts still waiting for their flow's frames create it.
    pub fn apply(
        &mut self,
        pipeline: &mut Pipeline,
        now: Timestamp,
        force: bool,
    ) -> Result<(), KernelCountError> {
        if !force && !self.due() {
            return Ok(());
        }
        let started = Instant::now();
        self.next_read = started + self.read_interval;
        self.pass += 1;
        let offset = monotonic_to_wall();
        let idle = {
            let c = pipeline.config();
            [c.tcp_idle, c.udp_idle, c.other_idle]
                .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        };
        let now_mono = (i128::from(now.as_nanos()) - offset).max(0) as u64;
        let mut idle_keys = Vec::new();
        // The listing restarts from the first key when the entry it stood on
        // goes away (LRU), so an entry may come twice (skipped below); it
        // is bounded all the same.
        let mut entries: Vec<(FlowKeyRaw, FlowValueRaw)> = Vec::new();
        let mut complete = true;
        for r in self.flows.iter().take(self.max_listed) {
            match r {
                Ok(kv) => entries.push(kv),
                // Deleted between listing and reading.
                Err(MapError::KeyNotFound) => {}
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        complete &= entries.len() < self.max_listed;
        for (k, v) in entries {
            let prev = self.applied.get(&k).copied();
            if prev.is_some_and(|a| a.pass == self.pass && a.first_ns == v.first_ns) {
                continue;
            }
            // A re-created entry (the LRU dropped the old one) starts from zero.
            let base = match prev {
                Some(a) if a.first_ns == v.first_ns => a,
                other => {
                    if other.is_some() {
                        self.evicted += 1;
                    }
                    Applied {
                        first_ns: v.first_ns,
                        skipped_packets: [0; 2],
                        skipped_bytes: [0; 2],
                        waiting_since: None,
                        pass: self.pass,
                    }
                }
            };
            let dp = [0, 1].map(|i| v.skipped_packets[i].saturating_sub(base.skipped_packets[i]));
            let db = [0, 1].map(|i| v.skipped_bytes[i].saturating_sub(base.skipped_bytes[i]));
            let mut next = Applied {
                pass: self.pass,
                ..base
            };
            if dp != [0, 0] {
                // Index 0 of the counts is initiator → responder.
                let a = endpoint(k.a, k.v6 != 0, k.a_port);
                let b = endpoint(k.b, k.v6 != 0, k.b_port);
                let (src, dst, order) = if v.initiator_is_a != 0 {
                    (a, b, [0, 1])
                } else {
                    (b, a, [1, 0])
                };
                let counts = KernelCounts {
                    src,
                    dst,
                    proto: k.proto,
                    packets: order.map(|i| dp[i]),
                    bytes: order.map(|i| db[i]),
                    first_seen: wall(v.first_ns, offset),
                    last_seen: wall(v.last_ns, offset),
                };
                let delivered = v.packets[0] + v.packets[1]
                    - (v.skipped_packets[0] + v.skipped_packets[1])
                        .min(v.packets[0] + v.packets[1]);
                let waited = base
                    .waiting_since
                    .is_some_and(|t| started.duration_since(t) >= CREATE_AFTER);
                let create = force || delivered == 0 || waited;
                match pipeline.handle_kernel_counts(now, &counts, create) {
                    KernelCountsApplied::NotInTable => {
                        next.waiting_since = Some(base.waiting_since.unwrap_or(started));
                        self.applied.insert(k, next);
                        continue;
                    }
                    KernelCountsApplied::Created => {
                        if delivered > 0 {
                            self.created += 1;
                        }
                    }
                    KernelCountsApplied::Added => {}
                }
                next.skipped_packets = v.skipped_packets;
                next.skipped_bytes = v.skipped_bytes;
                next.waiting_since = None;
            }
            self.applied.insert(k, next);
            let group = match k.proto {
                6 => 0,
                17 => 1,
                _ => 2,
            };
            if next.waiting_since.is_none() && now_mono.saturating_sub(v.last_ns) >= idle[group] {
                idle_keys.push(k);
            }
        }
        // Entries that were applied before and are gone: the LRU dropped
        // them. Only after a complete listing (otherwise an entry not
        // listed would later be taken for a new one and counted again).
        if complete {
            let pass = self.pass;
            let before = self.applied.len();
            self.applied.retain(|_, a| a.pass == pass);
            self.evicted += (before - self.applied.len()) as u64;
        }
        for k in idle_keys {
            match self.flows.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => {
                    return Err(KernelCountError::Map {
                        name: "flows",
                        error,
                    })
                }
            }
            self.applied.remove(&k);
            self.deleted += 1;
        }
        Ok(())
    }

    /// The filter's counters since it was attached.
    pub fn stats(&self) -> Result<KernelCountStats, KernelCountError> {
        let sum = |i: u32| -> Result<u64, KernelCountError> {
            let v = self
                .stats_map
                .get(&i, 0)
                .map_err(|error| KernelCountError::Map {
                    name: "stats",
                    error,
                })?;
            Ok(v.iter().sum())
        };
        Ok(KernelCountStats {
            delivered: sum(STAT_DELIVERED)?,
            skipped: sum(STAT_SKIPPED)?,
            uncounted: sum(STAT_UNCOUNTED)?,
            no_entry: sum(STAT_NO_ENTRY)?,
            evicted: self.evicted,
            deleted: self.deleted,
            created_from_counts: self.created,
            entries: self.applied.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn shared_layouts_match_the_bpf_source() {
        // struct flow_key, struct flow_value, struct config.
        assert_eq!(std::mem::size_of::<FlowKeyRaw>(), 40);
        assert_eq!(std::mem::size_of::<FlowValueRaw>(), 88);
        assert_eq!(std::mem::size_of::<ConfigRaw>(), 24);
    }

    /// Frames 0..64 of each flow as frames, the rest as kernel counts: the
    /// same totals as every frame (sans-IO, no kernel needed).
    #[test]
    fn counts_instead_of_frames_give_the_same_totals() {
        use crate::monitor::{MonitorConfig, Pipeline};
        use std::net::SocketAddrV4;
        use xtask::kit::pcap::{ethernet, ipv4, udp};
        const MS: u64 = 1_000_000;
        let t0 = 1_700_000_000_000 * MS;
        let (c, s) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(192, 0, 2, 9));
        // (flow, up?, size) for 300 packets of a game flow and 40 of a web one.
        let mut pkts = Vec::new();
        for i in 0..300u64 {
            pkts.push((27015u16, i % 3 != 0, 60 + (i % 7) as usize * 10));
        }
        for i in 0..40u64 {
            pkts.insert((i * 7) as usize, (443, i % 2 == 0, 1200));
        }
        let frame = |dport: u16, up: bool, size: usize| {
            let ip = if up {
                ipv4(c, s, 17, &udp(40_000, dport, &vec![0; size]))
            } else {
                ipv4(s, c, 17, &udp(dport, 40_000, &vec![0; size]))
            };
            (
                ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 0x0800, &ip),
                ip.len() as u64,
            )
        };
        let cfg = MonitorConfig {
            top_flows: 10,
            ..MonitorConfig::default()
        };
        let mut all = Pipeline::new(cfg.clone());
        let mut counted = Pipeline::new(cfg);
        let mut seen = std::collections::HashMap::new();
        let mut skipped: std::collections::HashMap<u16, ([u64; 2], [u64; 2], u64)> =
            Default::default();
        for (i, &(port, up, size)) in pkts.iter().enumerate() {
            let ts = Timestamp::from_nanos(t0 + i as u64 * MS);
            let (f, ip_len) = frame(port, up, size);
            all.handle_frame(ts, LinkType::Ethernet, &f);
            let n = seen.entry(port).or_insert(0u32);
            *n += 1;
            if *n <= 64 {
                counted.handle_frame(ts, LinkType::Ethernet, &f);
            } else {
                let e = skipped.entry(port).or_default();
                e.0[usize::from(!up)] += 1;
                e.1[usize::from(!up)] += ip_len;
                e.2 = ts.as_nanos();
            }
        }
        let end = Timestamp::from_nanos(t0 + 400 * MS);
        for (port, (packets, bytes, last)) in skipped {
            let counts = KernelCounts {
                src: SocketAddr::V4(SocketAddrV4::new(c, 40_000)),
                dst: SocketAddr::V4(SocketAddrV4::new(s, port)),
                proto: 17,
                packets,
                bytes,
                first_seen: Timestamp::from_nanos(t0),
                last_seen: Timestamp::from_nanos(last),
            };
            assert_eq!(
                counted.handle_kernel_counts(end, &counts, false),
                KernelCountsApplied::Added
            );
        }
        let (a, b) = (all.totals(), counted.totals());
        assert_eq!((a.packets, a.bytes, a.flows), (b.packets, b.bytes, b.flows));
        assert_eq!(a.classes, b.classes);
        let key = |t: &crate::monitor::Totals| {
            let mut v: Vec<_> = t
                .top_flows
                .iter()
                .map(|f| {
                    (
                        f.src,
                        f.dst,
                        f.class,
                        f.packets,
                        f.bytes,
                        f.bytes_up,
                        f.bytes_down,
                        f.last_seen,
                    )
                })
                .collect();
            v.sort_by_key(|r| r.0);
            v
        };
        assert_eq!(key(&a), key(&b));
        // The window holds the same packets and bytes per class (kernel
        // counts carry no RTT or jitter samples of their own).
        let per_class = |p: &mut Pipeline| {
            p.flush_window(end).map(|w| {
                w.classes
                    .iter()
                    .map(|c| (c.class, c.packets, c.bytes))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(per_class(&mut all), per_class(&mut counted), "window");

        // A flow the pipeline does not have: left alone unless `create`.
        let unknown = KernelCounts {
            src: "10.9.9.9:5000".parse().unwrap(),
            dst: "10.9.9.8:53".parse().unwrap(),
            proto: 17,
            packets: [3, 1],
            bytes: [300, 100],
            first_seen: end,
            last_seen: end,
        };
        assert_eq!(
            counted.handle_kernel_counts(end, &unknown, false),
            KernelCountsApplied::NotInTable
        );
        assert_eq!(counted.totals().packets, b.packets);
        assert_eq!(
            counted.handle_kernel_counts(end, &unknown, true),
            KernelCountsApplied::Created
        );
        let t = counted.totals();
        assert_eq!(
            (t.packets, t.bytes, t.flows),
            (b.packets + 4, b.bytes + 400, b.flows + 1)
        );
    }

    #[test]
    fn the_embedded_object_parses() {
        let obj = aya_obj_names();
        for name in ["flows", "config", "stats", "flow_count"] {
            assert!(obj.iter().any(|n| n == name), "{name} missing: {obj:?}");
        }
    }

    /// Section-independent check that the object is an ELF for BPF with our
    /// symbols (loading it needs privileges; the live tests do that).
    fn aya_obj_names() -> Vec<String> {
        let text = OBJECT
            .split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .map(str::to_string)
            .collect::<Vec<_>>();
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247, "EM_BPF");
        text
    }
}
