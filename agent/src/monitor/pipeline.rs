//! The sans-IO monitoring pipeline: frames and timestamps in, QoS window
//! summaries and run totals out. No I/O and no clock: the caller passes the
//! time of every frame and of every poll, so a live interface, a capture
//! file, the tests and the benchmark drive exactly the same code.
//!
//! Call [`Pipeline::poll_window`] with the frame's time before each
//! [`Pipeline::handle_frame`] (and periodically when no frames arrive), so a
//! window closes before packets of the next one are counted.

use super::config::{MonitorConfig, Rules};
use super::dns;
use super::evidence::{self, EndpointMemory, Evidence};
use super::flow::{
    ClassSource, Flow, FlowKey, FlowTable, Removal, EV_BITTORRENT, EV_RTP0, EV_RTP1, EV_SSH,
    EV_STUN, F_INSPECTED,
};
use super::names::{DnsCache, NameClasses, NameTable};
use super::parse::{parse, parse_cut, LinkType, Proto};
use super::Timestamp;
use super::{quic, tls};
use shardline_shared::msg::{ClassStats, QosNeed, TrafficClass};
use std::net::SocketAddr;
use std::time::Duration;

const RESERVOIR: usize = 128;
const NCLASS: usize = TrafficClass::ALL.len();
/// Flows are checked for idleness at most this often (packet time).
const EXPIRE_EVERY_NS: u64 = 1_000_000_000;
/// A flow's name marks: the name came from the TLS SNI (else from DNS).
const F_SNI: u16 = 1 << 15;

/// One flow as reported in windows and totals.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSummary {
    /// Initiator (the sender of the first packet seen).
    pub src: SocketAddr,
    /// Responder.
    pub dst: SocketAddr,
    pub proto: Proto,
    pub class: TrafficClass,
    pub packets: u64,
    /// IP bytes, both directions.
    pub bytes: u64,
    /// IP bytes initiator → responder and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Minimum RTT from the capture point (handshake and timestamp echoes), µs.
    pub rtt_min_us: Option<u32>,
    /// Smoothed RTT (median-of-three filtered EWMA of the same samples), µs.
    pub srtt_us: Option<u32>,
    pub retransmits: u32,
    pub out_of_order: u32,
    pub jitter_us: Option<u32>,
    pub dscp: u8,
    /// Host name from the TLS ClientHello.
    pub sni: Option<String>,
    /// Host name the responder's address was resolved from (DNS answer).
    pub dns_name: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
}

/// One QoS window: per-class statistics, ready to send, and its top flows.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSummary {
    pub start: Timestamp,
    pub duration: Duration,
    pub packets: u64,
    pub bytes: u64,
    pub malformed: u64,
    /// Classes with traffic or active flows in the window.
    pub classes: Vec<ClassStats>,
    /// Largest flows (total bytes) active in the window.
    pub top_flows: Vec<FlowSummary>,
    /// Flows in the table at the end of the window.
    pub flows_in_table: u64,
}

/// Per-class totals over a run (flows counted by their final class).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassTotal {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// Totals over the whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// IP packets decoded (malformed and non-IP frames excluded).
    pub packets: u64,
    /// IP bytes (from the IP length fields).
    pub bytes: u64,
    /// Flows created (a flow expired and seen again counts twice).
    pub flows: u64,
    /// Frames that could not be decoded (truncated or invalid headers).
    pub malformed: u64,
    /// Frames that are not IP (ARP, LLDP, …).
    pub non_ip: u64,
    /// Frames of link types the parser does not read (set by the capture
    /// reader's user; the pipeline never sees them).
    pub unsupported_link: u64,
    /// Flows removed because the table was full (overflow).
    pub evicted: u64,
    /// Flows removed after their idle timeout.
    pub expired: u64,
    pub classes: Vec<(TrafficClass, ClassTotal)>,
    pub top_flows: Vec<FlowSummary>,
    /// Bytes of flow state per flow slot (entry + index share).
    pub flow_state_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct ClassWindow {
    bytes: u64,
    packets: u64,
    loss: u64,
    samples: [u32; RESERVOIR],
    seen: u32,
}

impl Default for ClassWindow {
    fn default() -> Self {
        ClassWindow {
            bytes: 0,
            packets: 0,
            loss: 0,
            samples: [0; RESERVOIR],
            seen: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Closed {
    classes: [ClassTotal; NCLASS],
    top: Vec<FlowSummary>,
}

/// The monitoring pipeline. See the module docs.
#[derive(Debug)]
pub struct Pipeline {
    cfg: MonitorConfig,
    table: FlowTable,
    names: NameTable,
    dns: DnsCache,
    /// Endpoints that payload evidence tied to a class (ICE agents, DHT nodes).
    endpoints: EndpointMemory,
    packets: u64,
    bytes: u64,
    flows: u64,
    malformed: u64,
    non_ip: u64,
    evicted: u64,
    expired: u64,
    win: [ClassWindow; NCLASS],
    win_malformed: u64,
    win_start: Option<u64>,
    next_expire: u64,
    closed: Closed,
    rng: u64,
    fragments: FragmentPorts,
    /// When each class last carried a packet (0 = never).
    last_seen: [u64; NCLASS],
    /// When a class with a need (latency, encryption) showed up after more
    /// than [`ONSET_QUIET_NS`] without a packet: the caller may report it at
    /// once rather than at the window's end (see [`Pipeline::take_onset`]).
    onset: Option<u64>,
}

/// The ports of recent fragmented datagrams, so that later fragments (which
/// carry no transport header) count in the flow of their first fragment
/// instead of a port-0 flow of their own. Direct-mapped and fixed in size:
/// no allocation per packet, and a flood of fragments only overwrites slots.
#[derive(Debug, Clone)]
struct FragmentPorts {
    slots: Box<[FragmentSlot; FRAGMENT_SLOTS]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct FragmentSlot {
    /// Hash of (addresses, id, protocol); 0 = empty.
    tag: u64,
    sport: u16,
    dport: u16,
    seen_ns: u64,
}

const FRAGMENT_SLOTS: usize = 256;
/// A datagram's fragments arrive within this of each other (Linux's
/// reassembly timeout is 30 s).
const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

impl FragmentPorts {
    fn new() -> Self {
        Self {
            slots: Box::new([FragmentSlot::default(); FRAGMENT_SLOTS]),
        }
    }

    fn tag(p: &super::parse::Packet<'_>, f: &super::parse::Fragment) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (p.src, p.dst, f.id, f.proto).hash(&mut h);
        h.finish() | 1
    }

    /// Remembers a first fragment's ports; gives a later fragment the ports
    /// (and transport protocol) of its first, when that was seen recently.
    fn attribute(&mut self, now: u64, p: &mut super::parse::Packet<'_>) {
        let Some(f) = p.fragment else { return };
        let tag = Self::tag(p, &f);
        let slot = &mut self.slots[(tag % FRAGMENT_SLOTS as u64) as usize];
        if f.first {
            *slot = FragmentSlot {
                tag,
                sport: p.sport,
                dport: p.dport,
                seen_ns: now,
            };
        } else if slot.tag == tag && now.saturating_sub(slot.seen_ns) <= FRAGMENT_TIMEOUT_NS {
            p.proto = Proto::from_number(f.proto);
            p.sport = slot.sport;
            p.dport = slot.dport;
            // Mid-datagram bytes: nothing a payload inspector may read as a header.
            p.payload = &[];
        }
    }
}

fn summary(flow: &Flow, class: TrafficClass, names: &NameTable) -> FlowSummary {
    let (src, dst) = flow.endpoints();
    let name = names.get(flow.name).map(str::to_string);
    let from_sni = flow.flags & F_SNI != 0;
    FlowSummary {
        src,
        dst,
        proto: flow.key.proto(),
        class,
        packets: flow.total_packets(),
        bytes: flow.total_bytes(),
        bytes_up: flow.bytes[0],
        bytes_down: flow.bytes[1],
        rtt_min_us: flow.rtt_min(),
        srtt_us: flow.rtt(),
        retransmits: flow.retransmits,
        out_of_order: flow.out_of_order,
        jitter_us: flow.jitter_us(),
        dscp: flow.dscp,
        sni: if from_sni { name.clone() } else { None },
        dns_name: if from_sni { None } else { name },
        first_seen: Timestamp::from_nanos(flow.first_ns),
        last_seen: Timestamp::from_nanos(flow.last_ns),
    }
}

/// The class behaviour rules give a flow now (or its current class).
/// A class unseen for longer than this is new when it shows up again: time
/// by the class's own packets, not by windows, so a need is new after a
/// pause whatever the window boundaries.
const ONSET_QUIET_NS: u64 = 1_000_000_000;

/// The first packet count at which behaviour rules look at a flow; then at
/// every doubling.
const BEHAVIOUR_FIRST_LOOK: u64 = 16;

/// The class the behaviour rules give the flow from its whole life so far,
/// starting from its port or name class (`base_class`).
fn behaviour_class(rules: &Rules, f: &Flow) -> Option<TrafficClass> {
    if f.class_src == ClassSource::Name {
        return None;
    }
    let pk = f.total_packets();
    if pk == 0 {
        return None;
    }
    let bytes = f.total_bytes();
    let dur = (f.last_ns.saturating_sub(f.first_ns)).max(1_000_000) as f64 / 1e9;
    let pps = pk as f64 / dur;
    let avg = bytes as f64 / pk as f64;
    let (hi, lo) = (f.bytes[0].max(f.bytes[1]), f.bytes[0].min(f.bytes[1]));
    let ratio = hi as f64 / (lo as f64 + 1.0);
    let rate = bytes as f64 * 8.0 / dur;
    let [p0, p1] = f.packets.map(|p| p as f64);
    let pps_ratio = p0.max(p1) / p0.min(p1).max(1.0);
    let size = |d: usize| f.bytes[d] as f64 / (f.packets[d] as f64).max(1.0);
    let size_ratio = size(0).max(size(1)) / size(0).min(size(1)).max(1.0);
    rules.behaviours().iter().find_map(|b| {
        let ok = b.from.contains(&f.base_class)
            && b.proto.is_none_or(|p| p == f.key.proto().number())
            && pk >= b.min_packets
            && bytes >= b.min_bytes
            && pps >= b.min_pps
            && pps <= b.max_pps
            && avg >= b.min_avg_size
            && avg <= b.max_avg_size
            && ratio >= b.min_ratio
            && ratio <= b.max_ratio
            && rate <= b.max_rate_bps
            && pps_ratio <= b.max_pps_ratio
            && size_ratio <= b.max_size_ratio
            && u32::from(f.pauses) >= b.min_pauses
            && u32::from(f.pauses) <= b.max_pauses;
        ok.then_some(b.class)
    })
}

/// How many packets of a UDP flow are looked at for payload evidence: media
/// and peer-to-peer protocols show themselves from their first packets.
const EVIDENCE_PACKETS: u64 = 64;

/// One-way RTP is a stream (a camera, IPTV) when the other direction sends
/// at most this share of the packets (receiver reports); a call's media
/// flows both ways.
const ONE_WAY_SHARE: u32 = 10;

/// The class the payload evidence gives a flow so far.
fn payload_class(f: &Flow) -> Option<TrafficClass> {
    let ev = f.evidence;
    if ev & EV_BITTORRENT != 0 {
        return Some(TrafficClass::Bulk);
    }
    if ev & EV_SSH != 0 {
        return Some(TrafficClass::Interactive);
    }
    if ev & EV_STUN != 0 || ev & (EV_RTP0 | EV_RTP1) == EV_RTP0 | EV_RTP1 {
        return Some(TrafficClass::Calls);
    }
    let d = match ev & (EV_RTP0 | EV_RTP1) {
        EV_RTP0 => 0,
        EV_RTP1 => 1,
        _ => return None,
    };
    let (mine, other) = (f.packets[d], f.packets[1 - d]);
    // A port rule knows better than the guess that one-way media is a
    // stream (a cloud game's video is one-way RTP too), and so does an
    // endpoint tied to a call. The guess is made once, at the first look.
    if u64::from(mine) < BEHAVIOUR_FIRST_LOOK || f.base_src >= ClassSource::Port {
        return None;
    }
    Some(if other.saturating_mul(ONE_WAY_SHARE) <= mine {
        TrafficClass::Streaming
    } else {
        TrafficClass::Calls
    })
}

/// Fold one payload's evidence into its flow; an ICE agent's or a DHT
/// node's endpoint is remembered so its later flows start in its class.
/// Returns whether the flow learnt something new.
fn note_evidence(
    flow: &mut Flow,
    endpoints: &mut EndpointMemory,
    p: &super::parse::Packet<'_>,
    d: usize,
    now: u64,
) -> bool {
    let before = flow.evidence;
    let found = match p.proto {
        Proto::Udp => evidence::udp(p.payload),
        Proto::Tcp => evidence::tcp(p.payload),
        _ => None,
    };
    match found {
        Some(Evidence::Stun { request }) => {
            flow.evidence |= EV_STUN;
            if request {
                endpoints.remember(SocketAddr::new(p.src, p.sport), TrafficClass::Calls, now);
            }
        }
        Some(Evidence::Rtp { ssrc, seq }) => {
            let mut track = flow.rtp_track(d);
            if track.add(ssrc, seq) {
                flow.evidence |= if d == 0 { EV_RTP0 } else { EV_RTP1 };
            }
            flow.set_rtp_track(d, track);
        }
        Some(Evidence::BitTorrent) => {
            flow.evidence |= EV_BITTORRENT;
            // A DHT node's port also carries its uTP peers; a TCP peer's
            // listening port is the one it answers on.
            let listener = if p.proto == Proto::Udp || d == 1 {
                SocketAddr::new(p.src, p.sport)
            } else {
                SocketAddr::new(p.dst, p.dport)
            };
            endpoints.remember(listener, TrafficClass::Bulk, now);
        }
        Some(Evidence::Ssh) => flow.evidence |= EV_SSH,
        Some(Evidence::Rtcp) | None => {}
    }
    flow.evidence != before
}

fn offer_top(top: &mut Vec<FlowSummary>, n: usize, s: FlowSummary) {
    if n == 0 {
        return;
    }
    if top.len() < n {
        top.push(s);
        return;
    }
    if let Some((i, min)) = top.iter().enumerate().min_by_key(|(_, f)| f.bytes) {
        if s.bytes > min.bytes {
            top[i] = s;
        }
    }
}

fn percentile(sorted: &[u32], p: usize) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) * p + 50) / 100;
    Some(sorted[idx.min(sorted.len() - 1)])
}

impl Pipeline {
    pub fn new(cfg: MonitorConfig) -> Self {
        let idle = [cfg.tcp_idle, cfg.udp_idle, cfg.other_idle]
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64);
        let table = FlowTable::new(cfg.max_flows, idle);
        let names = NameTable::new((cfg.dns_cache as usize).saturating_mul(2).max(1024));
        let dns = DnsCache::new(cfg.dns_cache as usize);
        let endpoints = EndpointMemory::new(cfg.dns_cache as usize);
        Pipeline {
            cfg,
            table,
            names,
            dns,
            endpoints,
            packets: 0,
            bytes: 0,
            flows: 0,
            malformed: 0,
            non_ip: 0,
            evicted: 0,
            expired: 0,
            win: [ClassWindow::default(); NCLASS],
            win_malformed: 0,
            win_start: None,
            next_expire: 0,
            closed: Closed::default(),
            rng: 0x2545_f491_4f6c_dd1d,
            fragments: FragmentPorts::new(),
            last_seen: [0; NCLASS],
            onset: None,
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.cfg
    }

    /// Account one complete captured frame. Never panics on any input.
    pub fn handle_frame(&mut self, ts: Timestamp, link: LinkType, frame: &[u8]) {
        self.account(ts, link, frame, false);
    }

    /// Account one captured frame that was `wire_len` bytes on the wire:
    /// when the capture cut it (snapshot length), a transport header cut
    /// after its ports still counts in its flow. Never panics on any input.
    pub fn handle_frame_of_len(
        &mut self,
        ts: Timestamp,
        link: LinkType,
        frame: &[u8],
        wire_len: u32,
    ) {
        self.account(ts, link, frame, wire_len as usize > frame.len());
    }

    fn account(&mut self, ts: Timestamp, link: LinkType, frame: &[u8], cut: bool) {
        let now = ts.as_nanos();
        if self.win_start.is_none() {
            self.win_start = Some(now);
        }
        let parsed = if cut {
            parse_cut(link, frame)
        } else {
            parse(link, frame)
        };
        let mut p = match parsed {
            Ok(p) => p,
            Err(e) if e.is_malformed() => {
                self.malformed += 1;
                self.win_malformed += 1;
                return;
            }
            Err(_) => {
                self.non_ip += 1;
                return;
            }
        };
        if now >= self.next_expire {
            self.expire(now);
            self.next_expire = now.saturating_add(EXPIRE_EVERY_NS);
        }
        self.packets += 1;
        self.bytes += u64::from(p.ip_len);
        self.fragments.attribute(now, &mut p);
        let (key, a_to_b) = FlowKey::of(&p);
        let (id, _) = self.flow_of(&key, a_to_b, &p, now, now);
        let flow = self.table.get_mut(id);
        let d = flow.dir(a_to_b);
        let ev = flow.update(&p, d, now);
        if !p.payload.is_empty() {
            match p.proto {
                Proto::Tcp if d == 0 && flow.flags & F_INSPECTED == 0 => {
                    flow.flags |= F_INSPECTED;
                    if let Some(sni) = tls::client_hello_sni(p.payload) {
                        let id_name = self.names.intern(sni);
                        flow.name = id_name;
                        flow.flags |= F_SNI;
                        if let Some(c) = self.cfg.rules.name_class(sni, 6) {
                            flow.set_base_class(c, ClassSource::Name);
                        }
                    }
                }
                // The first client datagram of a QUIC connection: its
                // Initial packet names the server like a TLS ClientHello.
                Proto::Udp
                    if d == 0
                        && flow.flags & F_INSPECTED == 0
                        && quic::looks_like_initial(p.payload) =>
                {
                    flow.flags |= F_INSPECTED;
                    if let Some(sni) = quic::initial_sni(p.payload) {
                        let id_name = self.names.intern(&sni);
                        flow.name = id_name;
                        flow.flags |= F_SNI;
                        if let Some(c) = self.cfg.rules.name_class(&sni, 17) {
                            flow.set_base_class(c, ClassSource::Name);
                        }
                    }
                }
                Proto::Udp | Proto::Tcp if matches!(p.sport, 53 | 5353) => {
                    let payload = if p.proto == Proto::Tcp {
                        p.payload.get(2..).unwrap_or(&[])
                    } else {
                        p.payload
                    };
                    if let Some(ans) = dns::parse_response(payload) {
                        let name_id = self.names.intern(ans.name());
                        let rules = &self.cfg.rules;
                        let classes = NameClasses {
                            tcp: rules.name_class(ans.name(), 6),
                            udp: rules.name_class(ans.name(), 17),
                            other: rules.name_class(ans.name(), 0),
                        };
                        for a in ans.addrs() {
                            self.dns.insert(*a, (name_id, classes));
                        }
                    }
                }
                _ => {}
            }
        }
        let seen = flow.total_packets();
        let young = match p.proto {
            Proto::Udp => seen <= EVIDENCE_PACKETS,
            // The first payload of each side comes within a few packets.
            Proto::Tcp => seen <= 8 && flow.evidence == 0,
            _ => false,
        };
        let learnt =
            young && !p.payload.is_empty() && note_evidence(flow, &mut self.endpoints, &p, d, now);
        // Behaviour rules look at a flow at fixed points of its own life
        // (its 16th, 32nd, 64th, … packet), never at window boundaries: the
        // class a flow gets must not depend on the window length.
        let look = seen >= BEHAVIOUR_FIRST_LOOK && seen.is_power_of_two();
        if learnt || (look && flow.evidence != 0) {
            if let Some(c) = payload_class(flow) {
                flow.raise_class(c, ClassSource::Payload);
            }
        }
        if look {
            if let Some(c) = behaviour_class(&self.cfg.rules, flow) {
                flow.class = c;
                flow.class_src = ClassSource::Behaviour;
            }
        }
        let class = flow.class;
        let last = std::mem::replace(&mut self.last_seen[class as usize], now);
        if self.onset.is_none() && (last == 0 || now.saturating_sub(last) > ONSET_QUIET_NS) {
            let need = self.cfg.rules.need(class);
            if need.latency_sensitive || need.needs_encryption {
                self.onset = Some(now);
            }
        }
        let w = &mut self.win[class as usize];
        w.bytes += u64::from(p.ip_len);
        w.packets += 1;
        w.loss += u64::from(ev.loss_events);
        if let Some(s) = ev.rtt_sample_us {
            let seen = w.seen as usize;
            if seen < RESERVOIR {
                w.samples[seen] = s;
            } else {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let j = (self.rng % (seen as u64 + 1)) as usize;
                if j < RESERVOIR {
                    w.samples[j] = s;
                }
            }
            w.seen = w.seen.saturating_add(1);
        }
    }

    /// The flow `key` names and whether it is new: created (first seen at
    /// `first_ns`, classified from `p`) if need be; a flow evicted to make
    /// room is recorded.
    fn flow_of(
        &mut self,
        key: &FlowKey,
        a_to_b: bool,
        p: &super::parse::Packet<'_>,
        first_ns: u64,
        now: u64,
    ) -> (u32, bool) {
        let closed = &mut self.closed;
        let names = &self.names;
        let rules = &self.cfg.rules;
        let top_n = self.cfg.top_flows;
        let evicted = &mut self.evicted;
        let (id, new) =
            self.table
                .lookup_or_insert(key, a_to_b, first_ns, &mut |f: &Flow, _r: Removal| {
                    *evicted += 1;
                    Self::record_closed(closed, names, rules, top_n, f);
                });
        if new {
            self.flows += 1;
            self.classify_new(id, p, now);
        }
        (id, new)
    }

    fn classify_new(&mut self, id: u32, p: &super::parse::Packet<'_>, now: u64) {
        let rules = &self.cfg.rules;
        let proto = p.proto.number();
        let port_class = rules
            .port_class(proto, p.dport)
            .or_else(|| rules.port_class(proto, p.sport));
        let endpoint_class = self
            .endpoints
            .class_of(p.src, p.sport, now)
            .or_else(|| self.endpoints.class_of(p.dst, p.dport, now));
        let named = self.dns.get(&p.dst).or_else(|| self.dns.get(&p.src));
        let flow = self.table.get_mut(id);
        if let Some(c) = port_class {
            flow.set_base_class(c, ClassSource::Port);
        }
        if let Some(c) = endpoint_class {
            flow.set_base_class(c, ClassSource::Payload);
        }
        if let Some((name, classes)) = named {
            flow.name = name;
            if let Some(c) = classes.for_proto(proto) {
                flow.set_base_class(c, ClassSource::Name);
            }
        }
    }

    fn record_closed(
        closed: &mut Closed,
        names: &NameTable,
        rules: &Rules,
        top_n: usize,
        f: &Flow,
    ) {
        let class = behaviour_class(rules, f).unwrap_or(f.class);
        let t = &mut closed.classes[class as usize];
        t.packets += f.total_packets();
        t.bytes += f.total_bytes();
        t.flows += 1;
        let would_enter =
            closed.top.len() < top_n || closed.top.iter().any(|s| s.bytes < f.total_bytes());
        if would_enter {
            offer_top(&mut closed.top, top_n, summary(f, class, names));
        }
    }

    fn expire(&mut self, now: u64) {
        let closed = &mut self.closed;
        let names = &self.names;
        let rules = &self.cfg.rules;
        let top_n = self.cfg.top_flows;
        let expired = &mut self.expired;
        self.table.expire(now, &mut |f, _| {
            *expired += 1;
            Self::record_closed(closed, names, rules, top_n, f);
        });
    }

    /// Close the current window if `now` is past its end; returns its summary.
    /// After a long pause without traffic the next window starts at `now`'s
    /// window rather than emitting a run of empty windows.
    pub fn poll_window(&mut self, now: Timestamp) -> Option<WindowSummary> {
        let now = now.as_nanos();
        let len = self.cfg.window.as_nanos() as u64;
        // Windows run from the first frame or poll on, so a quiet link still
        // yields (empty) windows when polled.
        let Some(start) = self.win_start else {
            self.win_start = Some(now);
            return None;
        };
        let end = start.saturating_add(len);
        if now < end {
            return None;
        }
        let s = self.close_window(start, len);
        self.win_start = Some(if now < end.saturating_add(len) {
            end
        } else {
            now - (now - end) % len
        });
        Some(s)
    }

    /// The capture time of the first packet of a class with a need
    /// (latency-sensitive or needing encryption) after a second or more
    /// without one, once: a new need, which the caller may report without
    /// waiting for the window to end. Taken, it is not returned again until
    /// another such class starts (or this one after a pause).
    pub fn take_onset(&mut self) -> Option<Timestamp> {
        self.onset.take().map(Timestamp::from_nanos)
    }

    /// Close the current (possibly partial) window now, e.g. at the end of a
    /// capture file. `None` if nothing was seen since the last window.
    pub fn flush_window(&mut self, now: Timestamp) -> Option<WindowSummary> {
        let start = self.win_start?;
        let quiet = self.win.iter().all(|w| w.packets == 0) && self.win_malformed == 0;
        if quiet {
            return None;
        }
        let len = now.as_nanos().saturating_sub(start).max(1);
        let s = self.close_window(start, len);
        self.win_start = Some(now.as_nanos());
        Some(s)
    }

    fn close_window(&mut self, start: u64, len_ns: u64) -> WindowSummary {
        let mut active = [0u32; NCLASS];
        let mut jit_sum = [0u64; NCLASS];
        let mut jit_w = [0u64; NCLASS];
        let mut flow_rtts: [Vec<u32>; NCLASS] = Default::default();
        let mut top: Vec<(u64, FlowSummary)> = Vec::new();
        let rules = &self.cfg.rules;
        let names = &self.names;
        let top_n = self.cfg.top_flows;
        self.table.for_each_active(start, |f| {
            let c = f.class as usize;
            active[c] += 1;
            if let Some(j) = f.jitter_us() {
                let w = f.total_packets();
                jit_sum[c] += u64::from(j) * w;
                jit_w[c] += w;
            }
            if let Some(r) = f.rtt() {
                flow_rtts[c].push(r);
            }
            if top_n > 0 {
                let b = f.total_bytes();
                let min = top.iter().map(|t| t.0).min().unwrap_or(0);
                if top.len() < top_n || b > min {
                    if top.len() >= top_n {
                        if let Some(i) = top.iter().position(|t| t.0 == min) {
                            top.swap_remove(i);
                        }
                    }
                    top.push((b, summary(f, f.class, names)));
                }
            }
        });
        top.sort_by_key(|t| std::cmp::Reverse(t.0));
        let mut classes = Vec::new();
        let (mut packets, mut bytes) = (0, 0);
        for class in TrafficClass::ALL {
            let c = class as usize;
            let w = &mut self.win[c];
            if w.packets == 0 && active[c] == 0 {
                continue;
            }
            packets += w.packets;
            bytes += w.bytes;
            let n = (w.seen as usize).min(RESERVOIR);
            let samples = &mut w.samples[..n];
            samples.sort_unstable();
            let (p50, p95) = if samples.is_empty() {
                flow_rtts[c].sort_unstable();
                (percentile(&flow_rtts[c], 50), percentile(&flow_rtts[c], 95))
            } else {
                (percentile(samples, 50), percentile(samples, 95))
            };
            let rate_bps =
                (u128::from(w.bytes) * 8 * 1_000_000_000 / u128::from(len_ns.max(1))) as u64;
            let need = rules.need(class);
            classes.push(ClassStats {
                class,
                bytes: w.bytes,
                packets: w.packets,
                rate_bps,
                rtt_p50_us: p50,
                rtt_p95_us: p95,
                jitter_us: (jit_w[c] > 0).then(|| (jit_sum[c] / jit_w[c]) as u32),
                loss_permille: (w.loss * 1000)
                    .checked_div(w.packets)
                    .unwrap_or(0)
                    .min(1000) as u16,
                active_flows: active[c],
                need: QosNeed {
                    latency_sensitive: need.latency_sensitive,
                    bandwidth_heavy: rate_bps >= need.heavy_bps,
                    needs_encryption: need.needs_encryption,
                },
            });
        }
        self.win = [ClassWindow::default(); NCLASS];
        let malformed = std::mem::take(&mut self.win_malformed);
        WindowSummary {
            start: Timestamp::from_nanos(start),
            duration: Duration::from_nanos(len_ns),
            packets,
            bytes,
            malformed,
            classes,
            top_flows: top.into_iter().map(|t| t.1).collect(),
            flows_in_table: self.table.len() as u64,
        }
    }

    /// Totals over the whole run so far: counters, per-class totals (each
    /// flow counted once, in its final class) and the largest flows.
    pub fn totals(&self) -> Totals {
        let rules = &self.cfg.rules;
        let mut classes = self.closed.classes;
        let mut top = self.closed.top.clone();
        let n = self.cfg.top_flows;
        self.table.for_each(|f| {
            let class = behaviour_class(rules, f).unwrap_or(f.class);
            let t = &mut classes[class as usize];
            t.packets += f.total_packets();
            t.bytes += f.total_bytes();
            t.flows += 1;
            if top.len() < n || top.iter().any(|s| s.bytes < f.total_bytes()) {
                offer_top(&mut top, n, summary(f, class, &self.names));
            }
        });
        top.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.src.cmp(&b.src)));
        Totals {
            packets: self.packets,
            bytes: self.bytes,
            flows: self.flows,
            malformed: self.malformed,
            non_ip: self.non_ip,
            unsupported_link: 0,
            evicted: self.evicted,
            expired: self.expired,
            classes: TrafficClass::ALL
                .into_iter()
                .filter(|c| classes[*c as usize].flows > 0)
                .map(|c| (c, classes[c as usize]))
                .collect(),
            top_flows: top,
            flow_state_bytes: self.table.bytes_per_flow(),
        }
    }

    /// Flows currently in the table.
    pub fn flows_in_table(&self) -> usize {
        self.table.len()
    }

    /// Entries in the DNS name cache.
    pub fn dns_cache_len(&self) -> usize {
        self.dns.len()
    }
}

/// Packets of one flow that the in-kernel flow counter
/// ([`super::kernel_count`]) counted and did not hand to user space, for
/// [`Pipeline::handle_kernel_counts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCounts {
    /// The sender of the flow's first packet the kernel counted, and its peer.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// IP protocol number (TCP or UDP).
    pub proto: u8,
    /// Packets and IP bytes not seen as frames since the last call: index 0
    /// `src` → `dst`, 1 the reverse.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// When the kernel first and last counted a packet of the flow.
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
}

/// What [`Pipeline::handle_kernel_counts`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCountsApplied {
    /// Added to a flow in the table.
    Added,
    /// The flow was not in the table and was created from the counts.
    Created,
    /// The flow is not in the table and `create` was false: nothing
    /// changed (its first frames may still be on their way; try later).
    NotInTable,
}

impl Pipeline {
    /// Accounts packets the kernel counted for a flow but did not deliver as
    /// frames, so that windows and totals (per class, per flow) come out as
    /// if every packet had been seen. The counts go to the window open at
    /// `now` (call [`Pipeline::poll_window`] with `now` first); the flow's
    /// last-seen time moves to `last_seen`. Behaviour rules look at the flow
    /// when its packet count passes one of their points (16, 32, 64, …)
    /// here, as they would for frames, and at its end. Skipped packets carry
    /// no RTT, loss or jitter samples. When the flow is not in the table it
    /// is created (classified by its ports and known names) only if
    /// `create`; otherwise nothing changes.
    pub fn handle_kernel_counts(
        &mut self,
        now: Timestamp,
        counts: &KernelCounts,
        create: bool,
    ) -> KernelCountsApplied {
        let now = now.as_nanos();
        let pk = counts.packets[0].saturating_add(counts.packets[1]);
        let by = counts.bytes[0].saturating_add(counts.bytes[1]);
        let p = super::parse::Packet {
            src: counts.src.ip(),
            dst: counts.dst.ip(),
            proto: Proto::from_number(counts.proto),
            sport: counts.src.port(),
            dport: counts.dst.port(),
            ip_len: 0,
            payload_len: 0,
            dscp: 0,
            tcp: None,
            payload: &[],
            fragment: None,
            transport_truncated: false,
        };
        let (key, a_to_b) = FlowKey::of(&p);
        let known = self.table.find_id(&key).is_some();
        if !known && !create {
            return KernelCountsApplied::NotInTable;
        }
        if pk == 0 {
            return KernelCountsApplied::Added;
        }
        if self.win_start.is_none() {
            self.win_start = Some(now);
        }
        self.packets += pk;
        self.bytes += by;
        let first = counts.first_seen.as_nanos();
        let (id, new) = self.flow_of(&key, a_to_b, &p, first, now);
        let flow = self.table.get_mut(id);
        let before = flow.total_packets();
        let d = flow.dir(a_to_b);
        let last = counts.last_seen.as_nanos();
        flow.add_uncaptured(d, counts.packets[0], counts.bytes[0], last);
        flow.add_uncaptured(1 - d, counts.packets[1], counts.bytes[1], last);
        let after = flow.total_packets();
        // The next look of the behaviour rules (16, 32, 64, …) was passed.
        let next_look = before.max(BEHAVIOUR_FIRST_LOOK - 1).saturating_add(1);
        let next_look = next_look.checked_next_power_of_two().unwrap_or(u64::MAX);
        if after >= next_look {
            if flow.evidence != 0 {
                if let Some(c) = payload_class(flow) {
                    flow.raise_class(c, ClassSource::Payload);
                }
            }
            if let Some(c) = behaviour_class(&self.cfg.rules, flow) {
                flow.class = c;
                flow.class_src = ClassSource::Behaviour;
            }
        }
        let class = flow.class;
        // The class is carrying traffic: no onset when its next frame comes.
        self.last_seen[class as usize] = self.last_seen[class as usize].max(now);
        let w = &mut self.win[class as usize];
        w.bytes += by;
        w.packets += pk;
        if new {
            KernelCountsApplied::Created
        } else {
            KernelCountsApplied::Added
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use xtask::kit::pcap::{ethernet, ipv4, udp};

    const MS: u64 = 1_000_000;

    fn frame(dport: u16) -> Vec<u8> {
        let ip = ipv4(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(192, 0, 2, 9),
            17,
            &udp(40_000, dport, &[0; 80]),
        );
        ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 0x0800, &ip)
    }

    #[test]
    fn a_new_need_is_flagged_once_at_its_first_packet() {
        let mut p = Pipeline::new(MonitorConfig::default());
        let t0 = 1_700_000_000_000 * MS;
        let at = |ms: u64| Timestamp::from_nanos(t0 + ms * MS);
        // Web traffic needs nothing: no onset.
        p.handle_frame(at(0), LinkType::Ethernet, &frame(443));
        assert_eq!(p.take_onset(), None);
        // The first game datagram (port 27015 ⇒ gaming ⇒ latency) is one.
        p.handle_frame(at(40), LinkType::Ethernet, &frame(27015));
        p.handle_frame(at(60), LinkType::Ethernet, &frame(27015));
        assert_eq!(p.take_onset(), Some(at(40)));
        assert_eq!(p.take_onset(), None, "taken once");
        // Across a window boundary, without a pause: not new.
        assert!(p.flush_window(at(100)).is_some());
        p.handle_frame(at(900), LinkType::Ethernet, &frame(27015));
        assert_eq!(p.take_onset(), None);
        // After more than a second without it, whatever the windows did
        // meanwhile: new again.
        assert!(p.flush_window(at(1000)).is_some());
        p.handle_frame(at(1500), LinkType::Ethernet, &frame(443));
        assert!(p.flush_window(at(1800)).is_some());
        p.handle_frame(at(2000), LinkType::Ethernet, &frame(27015));
        assert_eq!(p.take_onset(), Some(at(2000)));
    }
}
