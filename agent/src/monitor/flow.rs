//! The bounded flow table: flows keyed by the 5-tuple with both directions
//! folded into one entry, with per-protocol idle timeouts, eviction of the
//! least recently seen flow when full, and the per-flow TCP/UDP metrics.
//!
//! Memory is allocated once, at creation: a slab of `max_flows` entries and an
//! open-addressing index of `u32` slots (load ≤ 1/2, linear probing,
//! backward-shift deletion). Each protocol group (TCP, UDP, other) keeps an
//! intrusive LRU list, so expiring idle flows and finding the oldest flow are
//! O(1) per flow. Nothing in the per-packet path allocates.
//!
//! Times inside an entry are microseconds truncated to `u32`; differences are
//! taken with wrapping arithmetic, valid for intervals below ~71 minutes.

use super::evidence::RtpTrack;
use super::parse::{tcp_flags, Packet, Proto};
use shardline_shared::msg::TrafficClass;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const NIL: u32 = u32::MAX;

/// A flow's identity, the endpoints in canonical order (`a` ≤ `b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    a: [u8; 16],
    b: [u8; 16],
    a_port: u16,
    b_port: u16,
    proto: u8,
    v6: bool,
}

fn addr16(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
        IpAddr::V6(v6) => (v6.octets(), true),
    }
}

/// The address a flow key (or the kernel counter's key) stores as 16 bytes,
/// IPv4 mapped into IPv6.
pub(crate) fn addr_of(b: [u8; 16], v6: bool) -> IpAddr {
    let a = Ipv6Addr::from(b);
    if v6 {
        IpAddr::V6(a)
    } else {
        IpAddr::V4(a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED))
    }
}

impl FlowKey {
    /// Key of a packet and whether the packet goes from endpoint `a` to `b`.
    #[inline]
    pub fn of(p: &Packet<'_>) -> (FlowKey, bool) {
        let (s, v6) = addr16(p.src);
        let (d, _) = addr16(p.dst);
        let forward = (s, p.sport) <= (d, p.dport);
        let key = if forward {
            FlowKey {
                a: s,
                b: d,
                a_port: p.sport,
                b_port: p.dport,
                proto: p.proto.number(),
                v6,
            }
        } else {
            FlowKey {
                a: d,
                b: s,
                a_port: p.dport,
                b_port: p.sport,
                proto: p.proto.number(),
                v6,
            }
        };
        (key, forward)
    }

    pub fn proto(&self) -> Proto {
        match self.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            1 => Proto::Icmp,
            58 => Proto::Icmpv6,
            n => Proto::Other(n),
        }
    }

    fn hash(&self, seed: u64) -> u32 {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let w = |b: &[u8; 16], i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let mut h = seed;
        for x in [
            w(&self.a, 0),
            w(&self.a, 8),
            w(&self.b, 0),
            w(&self.b, 8),
            u64::from(self.a_port) | u64::from(self.b_port) << 16 | u64::from(self.proto) << 32,
        ] {
            h = (h ^ x).wrapping_mul(K);
            h ^= h >> 29;
        }
        h = h.wrapping_mul(K);
        (h >> 32) as u32
    }
}

/// LRU group of a flow: each has its own idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Tcp = 0,
    Udp = 1,
    Other = 2,
}

/// How a flow got its class (a stronger source is not overridden by a weaker one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClassSource {
    None = 0,
    Behaviour = 1,
    Port = 2,
    /// What the payload carries (STUN, RTP, BitTorrent, SSH; see `evidence`),
    /// or an endpoint that such evidence tied to a class.
    Payload = 3,
    Name = 4,
}

// flag bits
const F_INIT_IS_A: u16 = 1 << 0;
const F_SEQ0: u16 = 1 << 1;
const F_SEQ1: u16 = 1 << 2;
const F_TSP0: u16 = 1 << 3;
const F_TSP1: u16 = 1 << 4;
const F_SYN: u16 = 1 << 5;
const F_SYNACK: u16 = 1 << 6;
const F_HS_DONE: u16 = 1 << 7;
const F_HALF0: u16 = 1 << 8;
const F_HALF1: u16 = 1 << 9;
const F_GAP0: u16 = 1 << 10;
const F_GAP1: u16 = 1 << 11;
const F_ARR0: u16 = 1 << 12;
const F_ARR1: u16 = 1 << 13;
/// The payload was inspected for a name (SNI) already.
pub(crate) const F_INSPECTED: u16 = 1 << 14;

/// One flow. Direction 0 is the initiator → responder (the sender of the
/// first packet seen), direction 1 the reverse.
#[derive(Debug, Clone)]
pub struct Flow {
    pub key: FlowKey,
    hash: u32,
    prev: u32,
    next: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    /// IP bytes per direction.
    pub bytes: [u64; 2],
    pub packets: [u32; 2],
    /// TCP: next expected sequence number per direction. UDP: the SSRC of
    /// the direction's RTP track (`rtp_track`), in a field UDP never uses.
    next_seq: [u32; 2],
    /// TCP: time the pending TSval was first seen; UDP: last arrival (µs, truncated).
    t: [u32; 2],
    /// TCP: pending TSval; UDP: last inter-arrival gap, µs.
    v: [u32; 2],
    /// TCP: the newest TSval seen after the pending one, and when (µs).
    /// UDP: the RTP track's sequence number and run (`rtp_track`).
    v2: [u32; 2],
    t2: [u32; 2],
    /// TCP: latest half RTT (capture point → that side → back), µs; UDP: jitter × 16, µs.
    half: [u32; 2],
    syn_t: u32,
    synack_t: u32,
    /// Smoothed RTT from the capture point, µs; 0 = none measured.
    pub rtt_us: u32,
    /// Smallest RTT sample, µs (the path RTT without endpoint delays such as
    /// delayed ACKs or application turnaround); 0 = none measured.
    pub rtt_min_us: u32,
    /// The two latest RTT samples (µs), for the median-of-three filter.
    hist: [u32; 2],
    pub retransmits: u32,
    pub out_of_order: u32,
    /// Name id (SNI or DNS), see `NameTable`; `NIL` = none.
    pub name: u32,
    pub class: TrafficClass,
    /// The class from the flow's ports or name, before any behaviour rule:
    /// what a behaviour rule's `from` refers to, so that re-evaluating the
    /// rules later in the flow's life starts from the same place each time.
    pub base_class: TrafficClass,
    pub class_src: ClassSource,
    /// Where `base_class` came from.
    pub base_src: ClassSource,
    pub dscp: u8,
    pub(crate) flags: u16,
    /// Payload evidence seen so far (`EV_*` bits).
    pub evidence: u8,
    /// Gaps of at least [`PAUSE_NS`] between packets: a video player fetches
    /// a segment and then waits, a download does not.
    pub pauses: u16,
}

/// A gap between two packets of a flow that counts as a pause.
pub const PAUSE_NS: u64 = 1_000_000_000;

/// Payload evidence bits of [`Flow::evidence`].
pub const EV_STUN: u8 = 1 << 0;
pub const EV_RTP0: u8 = 1 << 1;
pub const EV_RTP1: u8 = 1 << 2;
pub const EV_BITTORRENT: u8 = 1 << 3;
pub const EV_SSH: u8 = 1 << 4;

/// What one packet contributed to the loss and RTT signals of its flow.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketEvents {
    pub loss_events: u32,
    /// A new RTT sample (µs) from the capture point, if one completed.
    pub rtt_sample_us: Option<u32>,
}

impl Flow {
    fn new(key: FlowKey, hash: u32, initiator_is_a: bool, now_ns: u64) -> Self {
        Flow {
            key,
            hash,
            prev: NIL,
            next: NIL,
            first_ns: now_ns,
            last_ns: now_ns,
            bytes: [0; 2],
            packets: [0; 2],
            next_seq: [0; 2],
            t: [0; 2],
            v: [0; 2],
            v2: [0; 2],
            t2: [0; 2],
            half: [0; 2],
            syn_t: 0,
            synack_t: 0,
            rtt_us: 0,
            rtt_min_us: 0,
            hist: [0; 2],
            retransmits: 0,
            out_of_order: 0,
            name: NIL,
            class: TrafficClass::Other,
            base_class: TrafficClass::Other,
            class_src: ClassSource::None,
            base_src: ClassSource::None,
            dscp: 0,
            flags: if initiator_is_a { F_INIT_IS_A } else { 0 },
            evidence: 0,
            pauses: 0,
        }
    }

    /// UDP: the RTP stream direction `d` carries so far. Kept in fields
    /// only TCP uses (the flow table's entry size is a budget).
    pub fn rtp_track(&self, d: usize) -> RtpTrack {
        debug_assert_eq!(self.key.proto, 17);
        RtpTrack::from_words(self.next_seq[d], self.v2[d])
    }

    pub fn set_rtp_track(&mut self, d: usize, track: RtpTrack) {
        debug_assert_eq!(self.key.proto, 17);
        (self.next_seq[d], self.v2[d]) = track.to_words();
    }

    /// Sets the class found from stronger evidence than the flow's class has
    /// now (a name beats payload evidence, which beats a port).
    pub fn raise_class(&mut self, class: TrafficClass, src: ClassSource) {
        if src >= self.base_src {
            self.set_base_class(class, src);
        }
    }

    /// Sets the class found from the flow's ports or name.
    pub fn set_base_class(&mut self, class: TrafficClass, src: ClassSource) {
        self.class = class;
        self.base_class = class;
        self.class_src = src;
        self.base_src = src;
    }

    /// Direction of a packet going from endpoint a to b (`a_to_b`).
    #[inline]
    pub fn dir(&self, a_to_b: bool) -> usize {
        usize::from(a_to_b != (self.flags & F_INIT_IS_A != 0))
    }

    /// Initiator (client) and responder (server) socket addresses.
    pub fn endpoints(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let a = std::net::SocketAddr::new(addr_of(self.key.a, self.key.v6), self.key.a_port);
        let b = std::net::SocketAddr::new(addr_of(self.key.b, self.key.v6), self.key.b_port);
        if self.flags & F_INIT_IS_A != 0 {
            (a, b)
        } else {
            (b, a)
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes[0] + self.bytes[1]
    }

    pub fn total_packets(&self) -> u64 {
        u64::from(self.packets[0]) + u64::from(self.packets[1])
    }

    /// UDP inter-arrival jitter (RFC 3550 estimator over arrival gaps), µs:
    /// the larger of the two directions. `None` for non-UDP or too few packets.
    pub fn jitter_us(&self) -> Option<u32> {
        if self.key.proto != 17 || self.flags & (F_GAP0 | F_GAP1) == 0 {
            return None;
        }
        Some(self.half[0].max(self.half[1]) / 16)
    }

    /// Smoothed RTT (µs).
    pub fn rtt(&self) -> Option<u32> {
        (self.rtt_us != 0).then_some(self.rtt_us)
    }

    /// Minimum RTT (µs).
    pub fn rtt_min(&self) -> Option<u32> {
        (self.rtt_min_us != 0).then_some(self.rtt_min_us)
    }

    /// Adds packets of direction `d` that were counted outside user space
    /// (the in-kernel flow counter) and were never seen as frames: `packets`
    /// and `bytes` (IP bytes), the last of them at `last_ns`. The sequence
    /// and arrival trackers of that direction start over at the next frame,
    /// so the skipped packets are not read as a gap (loss) or a long pause
    /// (jitter).
    pub fn add_uncaptured(&mut self, d: usize, packets: u64, bytes: u64, last_ns: u64) {
        if packets == 0 {
            return;
        }
        self.bytes[d] += bytes;
        let add = u32::try_from(packets).unwrap_or(u32::MAX);
        self.packets[d] = self.packets[d].saturating_add(add);
        self.last_ns = self.last_ns.max(last_ns);
        self.flags &= !if d == 0 {
            F_SEQ0 | F_ARR0
        } else {
            F_SEQ1 | F_ARR1
        };
    }

    fn group(&self) -> Group {
        match self.key.proto {
            6 => Group::Tcp,
            17 => Group::Udp,
            _ => Group::Other,
        }
    }

    /// Account one packet; `d` is its direction.
    #[inline]
    pub fn update(&mut self, p: &Packet<'_>, d: usize, now_ns: u64) -> PacketEvents {
        let mut ev = PacketEvents::default();
        if now_ns.saturating_sub(self.last_ns) >= PAUSE_NS {
            self.pauses = self.pauses.saturating_add(1);
        }
        self.last_ns = now_ns;
        self.bytes[d] += u64::from(p.ip_len);
        self.packets[d] = self.packets[d].saturating_add(1);
        self.dscp = p.dscp;
        let now = (now_ns / 1000) as u32;
        if let Some(tcp) = p.tcp {
            self.tcp(d, now, &tcp, p.payload_len, &mut ev);
        } else if self.key.proto == 17 {
            self.udp(d, now);
        }
        ev
    }

    fn tcp(
        &mut self,
        d: usize,
        now: u32,
        tcp: &super::parse::TcpInfo,
        payload_len: u32,
        ev: &mut PacketEvents,
    ) {
        let f = tcp.flags;
        let syn = f & tcp_flags::SYN != 0;
        let ack = f & tcp_flags::ACK != 0;
        // Handshake RTT: SYN (dir 0) → SYN/ACK (dir 1) → ACK (dir 0).
        if syn && !ack && d == 0 {
            if self.flags & F_SYN == 0 {
                self.syn_t = now;
                self.flags |= F_SYN;
            }
        } else if syn && ack && d == 1 {
            if self.flags & F_SYN != 0 && self.flags & F_SYNACK == 0 {
                self.synack_t = now;
                self.flags |= F_SYNACK;
            }
        } else if ack && d == 0 && self.flags & (F_SYNACK | F_HS_DONE) == F_SYNACK {
            self.flags |= F_HS_DONE;
            let server = self.synack_t.wrapping_sub(self.syn_t);
            let client = now.wrapping_sub(self.synack_t);
            self.half = [server, client];
            self.flags |= F_HALF0 | F_HALF1;
            let rtt = server.saturating_add(client).max(1);
            self.add_rtt_sample(rtt);
            ev.rtt_sample_us = Some(rtt);
        }
        // Sequence tracking: retransmissions and out-of-order as loss signals.
        let seg = payload_len + u32::from(syn) + u32::from(f & tcp_flags::FIN != 0);
        let seq_bit = if d == 0 { F_SEQ0 } else { F_SEQ1 };
        if self.flags & seq_bit == 0 {
            self.next_seq[d] = tcp.seq.wrapping_add(seg);
            self.flags |= seq_bit;
        } else if seg > 0 {
            let diff = tcp.seq.wrapping_sub(self.next_seq[d]) as i32;
            if diff == 0 {
                self.next_seq[d] = tcp.seq.wrapping_add(seg);
            } else if diff < 0 {
                // Below what was already seen: a retransmission (or a late reordered segment).
                self.retransmits = self.retransmits.saturating_add(1);
                ev.loss_events += 1;
                let end = tcp.seq.wrapping_add(seg);
                if (end.wrapping_sub(self.next_seq[d]) as i32) > 0 {
                    self.next_seq[d] = end;
                }
            } else {
                // A gap: something upstream of the capture point was lost or reordered.
                self.out_of_order = self.out_of_order.saturating_add(1);
                ev.loss_events += 1;
                self.next_seq[d] = tcp.seq.wrapping_add(seg);
            }
        }
        // Continuous RTT from timestamp echoes (as pping does), bounded: per
        // direction the oldest unechoed TSval and the newest one after it. An
        // echo of either in the other direction closes a half RTT (capture
        // point → that side → back); the two halves add up to the RTT.
        if let Some((tsval, tsecr)) = tcp.ts {
            let o = 1 - d;
            let pend_o = if o == 0 { F_TSP0 } else { F_TSP1 };
            if self.flags & pend_o != 0 && ack {
                let started = if tsecr == self.v[o] {
                    Some(self.t[o])
                } else if tsecr == self.v2[o] && self.t2[o] != 0 {
                    Some(self.t2[o])
                } else {
                    None
                };
                if let Some(start) = started {
                    self.half[o] = now.wrapping_sub(start);
                    self.flags &= !pend_o;
                    self.t2[o] = 0;
                    self.flags |= if o == 0 { F_HALF0 } else { F_HALF1 };
                    if self.flags & (F_HALF0 | F_HALF1) == F_HALF0 | F_HALF1 {
                        let sample = self.half[0].saturating_add(self.half[1]).max(1);
                        self.add_rtt_sample(sample);
                        ev.rtt_sample_us = Some(sample);
                    }
                } else if tsecr.wrapping_sub(self.v2[o]) as i32 > 0 && self.t2[o] != 0 {
                    // Something newer than both was echoed: neither ever will be.
                    self.flags &= !pend_o;
                    self.t2[o] = 0;
                }
            }
            let pend_d = if d == 0 { F_TSP0 } else { F_TSP1 };
            // Only a TSval newer than any recorded starts a sample, so repeated
            // TSvals (retransmissions) never give a too-short RTT.
            if self.flags & pend_d == 0 {
                if tsval.wrapping_sub(self.v[d]) as i32 > 0 || self.t[d] == 0 {
                    self.v[d] = tsval;
                    self.t[d] = now.max(1);
                    self.v2[d] = tsval;
                    self.t2[d] = 0;
                    self.flags |= pend_d;
                }
            } else if tsval.wrapping_sub(self.v[d]) as i32 > 0 && tsval != self.v2[d] {
                self.v2[d] = tsval;
                self.t2[d] = now.max(1);
            }
        }
    }

    /// Smooth RTT samples: a median of the last three (so one delayed ACK,
    /// e.g. the last one of a flow, does not move the estimate) fed into an
    /// EWMA with gain 1/8 (as TCP's SRTT).
    fn add_rtt_sample(&mut self, s: u32) {
        let [h0, h1] = self.hist;
        let m = if h1 != 0 {
            s.max(h0.min(h1)).min(h0.max(h1))
        } else {
            s
        };
        self.hist = [s, h0];
        self.rtt_min_us = if self.rtt_min_us == 0 {
            s
        } else {
            self.rtt_min_us.min(s)
        };
        self.rtt_us = if self.rtt_us == 0 {
            m
        } else {
            ((u64::from(self.rtt_us) * 7 + u64::from(m)) / 8) as u32
        };
    }

    fn udp(&mut self, d: usize, now: u32) {
        let arr = if d == 0 { F_ARR0 } else { F_ARR1 };
        let gap_bit = if d == 0 { F_GAP0 } else { F_GAP1 };
        if self.flags & arr != 0 {
            let gap = now.wrapping_sub(self.t[d]);
            if self.flags & gap_bit != 0 {
                // RFC 3550 §6.4.1 estimator, J += (|D| - J) / 16, kept scaled by 16.
                let dv = i64::from(gap) - i64::from(self.v[d]);
                let j = i64::from(self.half[d]);
                let nj = j + dv.abs() - ((j + 8) >> 4);
                self.half[d] = nj.clamp(0, i64::from(u32::MAX)) as u32;
            }
            self.v[d] = gap;
            self.flags |= gap_bit;
        }
        self.t[d] = now;
        self.flags |= arr;
    }
}

/// Why a flow left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Idle,
    /// The table was full and this was the least recently seen flow.
    Evicted,
}

/// The flow table.
#[derive(Debug)]
pub struct FlowTable {
    flows: Vec<Flow>,
    /// Free slab slots (stack).
    free: Vec<u32>,
    index: Box<[u32]>,
    mask: usize,
    seed: u64,
    heads: [u32; 3],
    tails: [u32; 3],
    idle_ns: [u64; 3],
    max: usize,
    len: usize,
}

impl FlowTable {
    /// A table holding at most `max_flows`, with idle timeouts (ns) for TCP, UDP, other.
    pub fn new(max_flows: u32, idle_ns: [u64; 3]) -> Self {
        let max = max_flows.max(1) as usize;
        let slots = (max * 2).next_power_of_two();
        // Random per table so that crafted 5-tuples cannot target one chain.
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(max);
            h.finish() | 1
        };
        FlowTable {
            flows: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            index: vec![NIL; slots].into_boxed_slice(),
            mask: slots - 1,
            seed,
            heads: [NIL; 3],
            tails: [NIL; 3],
            idle_ns,
            max,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Bytes held by the table per flow slot: entry, index share, free-list share.
    pub fn bytes_per_flow(&self) -> usize {
        std::mem::size_of::<Flow>() + self.index.len() * 4 / self.max + 4
    }

    pub fn get(&self, id: u32) -> &Flow {
        &self.flows[id as usize]
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Flow {
        &mut self.flows[id as usize]
    }

    /// Find the flow of `key`; `Err(slot)` gives the index slot to insert at.
    #[inline]
    fn find(&self, key: &FlowKey, hash: u32) -> Result<u32, usize> {
        let mut i = hash as usize & self.mask;
        loop {
            let s = self.index[i];
            if s == NIL {
                return Err(i);
            }
            let f = &self.flows[s as usize];
            if f.hash == hash && f.key == *key {
                return Ok(s);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The id of the flow of `key`, if it is in the table (no LRU touch).
    pub fn find_id(&self, key: &FlowKey) -> Option<u32> {
        self.find(key, key.hash(self.seed)).ok()
    }

    /// Look a packet's flow up, creating it if needed. Returns the flow id and
    /// whether it is new. When the table is full, the least recently seen flow
    /// is removed first and handed to `on_remove`.
    #[inline]
    pub fn lookup_or_insert(
        &mut self,
        key: &FlowKey,
        a_to_b: bool,
        now_ns: u64,
        on_remove: &mut impl FnMut(&Flow, Removal),
    ) -> (u32, bool) {
        let hash = key.hash(self.seed);
        match self.find(key, hash) {
            Ok(id) => {
                self.touch(id);
                (id, false)
            }
            Err(mut slot) => {
                if self.len >= self.max {
                    self.evict_oldest(on_remove);
                    // The index changed; find the slot again.
                    slot = match self.find(key, hash) {
                        Err(s) => s,
                        Ok(id) => return (id, false),
                    };
                }
                let flow = Flow::new(*key, hash, a_to_b, now_ns);
                let id = if let Some(id) = self.free.pop() {
                    self.flows[id as usize] = flow;
                    id
                } else {
                    self.flows.push(flow);
                    (self.flows.len() - 1) as u32
                };
                self.index[slot] = id;
                self.len += 1;
                self.push_tail(id);
                (id, true)
            }
        }
    }

    /// Remove flows idle longer than their group's timeout at `now_ns`.
    pub fn expire(&mut self, now_ns: u64, on_remove: &mut impl FnMut(&Flow, Removal)) {
        for g in 0..3 {
            loop {
                let h = self.heads[g];
                if h == NIL {
                    break;
                }
                let f = &self.flows[h as usize];
                if now_ns.saturating_sub(f.last_ns) < self.idle_ns[g] {
                    break;
                }
                on_remove(f, Removal::Idle);
                self.remove(h);
            }
        }
    }

    fn evict_oldest(&mut self, on_remove: &mut impl FnMut(&Flow, Removal)) {
        let mut best = NIL;
        for g in 0..3 {
            let h = self.heads[g];
            if h != NIL
                && (best == NIL
                    || self.flows[h as usize].last_ns < self.flows[best as usize].last_ns)
            {
                best = h;
            }
        }
        if best != NIL {
            on_remove(&self.flows[best as usize], Removal::Evicted);
            self.remove(best);
        }
    }

    /// Visit flows seen at or after `since_ns`, newest first (cheap: stops at
    /// the first older flow of each group).
    pub fn for_each_active(&mut self, since_ns: u64, mut f: impl FnMut(&mut Flow)) {
        for g in 0..3 {
            let mut id = self.tails[g];
            while id != NIL {
                let flow = &mut self.flows[id as usize];
                if flow.last_ns < since_ns {
                    break;
                }
                let prev = flow.prev;
                f(flow);
                id = prev;
            }
        }
    }

    /// Visit every flow.
    pub fn for_each(&self, mut f: impl FnMut(&Flow)) {
        for g in 0..3 {
            let mut id = self.heads[g];
            while id != NIL {
                let flow = &self.flows[id as usize];
                f(flow);
                id = flow.next;
            }
        }
    }

    fn remove(&mut self, id: u32) {
        self.unlink(id);
        let hash = self.flows[id as usize].hash;
        // Locate its index slot (it is in the table, so the probe ends), then
        // backward-shift the cluster behind it.
        let mut i = hash as usize & self.mask;
        while self.index[i] != id {
            i = (i + 1) & self.mask;
        }
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let s = self.index[j];
            if s == NIL {
                break;
            }
            let k = self.flows[s as usize].hash as usize & self.mask;
            // Move s back into the hole at i unless its home lies in (i, j].
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.index[i] = s;
                i = j;
            }
        }
        self.index[i] = NIL;
        self.free.push(id);
        self.len -= 1;
    }

    #[inline]
    fn touch(&mut self, id: u32) {
        let g = self.flows[id as usize].group() as usize;
        if self.tails[g] == id {
            return;
        }
        self.unlink(id);
        self.push_tail(id);
    }

    fn unlink(&mut self, id: u32) {
        let g = self.flows[id as usize].group() as usize;
        let (prev, next) = {
            let f = &self.flows[id as usize];
            (f.prev, f.next)
        };
        if prev != NIL {
            self.flows[prev as usize].next = next;
        } else {
            self.heads[g] = next;
        }
        if next != NIL {
            self.flows[next as usize].prev = prev;
        } else {
            self.tails[g] = prev;
        }
    }

    fn push_tail(&mut self, id: u32) {
        let g = self.flows[id as usize].group() as usize;
        let tail = self.tails[g];
        {
            let f = &mut self.flows[id as usize];
            f.prev = tail;
            f.next = NIL;
        }
        if tail != NIL {
            self.flows[tail as usize].next = id;
        } else {
            self.heads[g] = id;
        }
        self.tails[g] = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::parse::Packet;

    fn pkt(sport: u16, dport: u16, proto: Proto) -> Packet<'static> {
        Packet {
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            proto,
            sport,
            dport,
            ip_len: 100,
            payload_len: 72,
            dscp: 0,
            tcp: None,
            payload: &[],
            fragment: None,
            transport_truncated: false,
        }
    }

    #[test]
    fn a_flow_costs_at_most_200_bytes() {
        // The budget BENCHMARKS.md holds the table to (flow state). Payload evidence
        // lives in fields UDP does not otherwise use to stay within it.
        let t = FlowTable::new(65_536, [1; 3]);
        assert!(
            t.bytes_per_flow() <= 200,
            "{} bytes per flow (entry {})",
            t.bytes_per_flow(),
            std::mem::size_of::<Flow>()
        );
    }

    #[test]
    fn bounded_with_eviction_and_expiry_and_consistent_index() {
        let mut t = FlowTable::new(64, [10_000, 5_000, 1_000]);
        let mut removed = Vec::new();
        let mut on = |f: &Flow, r: Removal| removed.push((f.key.a_port, r));
        for i in 0..200u16 {
            let p = pkt(1000 + i, 53, Proto::Udp);
            let (k, fwd) = FlowKey::of(&p);
            let (id, new) = t.lookup_or_insert(&k, fwd, u64::from(i), &mut on);
            assert!(new);
            t.get_mut(id).last_ns = u64::from(i);
            assert!(t.len() <= 64);
        }
        assert_eq!(removed.len(), 200 - 64);
        assert!(removed.iter().all(|r| r.1 == Removal::Evicted));
        // Oldest were evicted first; the newest 64 are all still findable.
        assert_eq!(removed[0].0, 1000);
        for i in 136..200u16 {
            let p = pkt(1000 + i, 53, Proto::Udp);
            let (k, fwd) = FlowKey::of(&p);
            let (_, new) = t.lookup_or_insert(&k, fwd, 300, &mut |_, _| {});
            assert!(!new, "flow {i} lost");
        }
        let mut n = 0;
        t.expire(300 + 5_000, &mut |_, r| {
            assert_eq!(r, Removal::Idle);
            n += 1
        });
        assert_eq!(n, 64);
        assert!(t.is_empty());
        assert!(t.index.iter().all(|&s| s == NIL));
    }

    #[test]
    fn both_directions_fold_into_one_flow() {
        let p = pkt(40000, 443, Proto::Tcp);
        let mut r = p;
        r.src = p.dst;
        r.dst = p.src;
        r.sport = p.dport;
        r.dport = p.sport;
        let (k1, f1) = FlowKey::of(&p);
        let (k2, f2) = FlowKey::of(&r);
        assert_eq!(k1, k2);
        assert_ne!(f1, f2);
        let flow = Flow::new(k1, 0, f1, 0);
        assert_eq!(flow.dir(f1), 0);
        assert_eq!(flow.dir(f2), 1);
        assert_eq!(flow.endpoints().0.port(), 40000);
    }
}
