//! Test support for the monitor tests: synthesizes frames (Ethernet, VLAN,
//! Linux SLL/SLL2 around IPv4/IPv6 TCP/UDP/ICMP) and writes pcap / pcapng
//! files, keeping exact ground truth of what was written.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Link framing of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Eth,
    Vlan(u16),
    /// Two stacked tags (802.1ad outer, 802.1Q inner).
    QinQ(u16, u16),
    Sll,
    Sll2,
    /// PPP with address and control bytes (`LINKTYPE_PPP`).
    Ppp,
    /// PPP without them and with a compressed one-byte protocol (`LINKTYPE_PPP_HDLC`
    /// carries the same framing; ACFC + PFC as negotiated links send it).
    PppCompressed,
    /// PPPoE session inside Ethernet.
    Pppoe,
    CiscoHdlc,
    /// 802.11 QoS data frame with LLC/SNAP.
    Wifi,
    /// Radiotap header, then 802.11.
    Radiotap,
    /// PPI header naming Ethernet, then Ethernet.
    Ppi,
    /// Cisco FabricPath: outer Ethernet (0x8903), FTag/TTL, inner Ethernet.
    FabricPath,
    /// Two MPLS labels inside Ethernet.
    Mpls,
}

fn csum_fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An IPv4 or IPv6 packet around `l4`.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, dscp: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + l4.len();
            let mut h = vec![0x45, dscp << 2];
            h.extend_from_slice(&(total as u16).to_be_bytes());
            h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = csum_fold(sum16(&h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(l4);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let tc = dscp << 2;
            let mut h = vec![0x60 | (tc >> 4), tc << 4, 0, 0];
            h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(l4);
            h
        }
        _ => panic!("mixed address families"),
    }
}

pub fn tcp(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    ts: Option<(u32, u32)>,
    payload: &[u8],
) -> Vec<u8> {
    let opt_len = if ts.is_some() { 12 } else { 0 };
    let doff = (20 + opt_len) / 4;
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.extend_from_slice(&[(doff as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    if let Some((v, e)) = ts {
        h.extend_from_slice(&[1, 1, 8, 10]);
        h.extend_from_slice(&v.to_be_bytes());
        h.extend_from_slice(&e.to_be_bytes());
    }
    h.extend_from_slice(payload);
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

pub fn icmp_echo(request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![if request { 8 } else { 0 }, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Wrap an IP packet (or any payload with `ethertype`) in a link header.
pub fn frame(link: Link, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    match link {
        Link::Eth | Link::Vlan(_) | Link::QinQ(..) => {
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
            match link {
                Link::Vlan(v) => {
                    f.extend_from_slice(&0x8100u16.to_be_bytes());
                    f.extend_from_slice(&v.to_be_bytes());
                }
                Link::QinQ(o, i) => {
                    f.extend_from_slice(&0x88a8u16.to_be_bytes());
                    f.extend_from_slice(&o.to_be_bytes());
                    f.extend_from_slice(&0x8100u16.to_be_bytes());
                    f.extend_from_slice(&i.to_be_bytes());
                }
                _ => {}
            }
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::Sll => {
            f.extend_from_slice(&[0, 0, 0, 1, 0, 6, 0x02, 0, 0, 0, 0, 1, 0, 0]);
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::Sll2 => {
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 0x02, 0, 0, 0, 0, 1, 0, 0]);
        }
        Link::Ppp => {
            f.extend_from_slice(&[0xff, 0x03]);
            f.extend_from_slice(&ppp_protocol(ethertype).to_be_bytes());
        }
        Link::PppCompressed => f.push(ppp_protocol(ethertype) as u8),
        Link::Pppoe => {
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x88, 0x64]);
            f.extend_from_slice(&[0x11, 0x00, 0x12, 0x34]);
            f.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
            f.extend_from_slice(&ppp_protocol(ethertype).to_be_bytes());
        }
        Link::CiscoHdlc => {
            f.extend_from_slice(&[0x0f, 0x00]);
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::Wifi | Link::Radiotap => {
            if link == Link::Radiotap {
                // Version 0, pad, length 12, present flags (TSFT absent), 4 bytes of fields.
                f.extend_from_slice(&[0, 0, 12, 0, 0x02, 0, 0, 0, 0x10, 0x02, 0x6c, 0x09]);
            }
            // QoS data (subtype 8), to the AP (ToDS).
            f.extend_from_slice(&[0x88, 0x01, 0x2c, 0x00]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&[0x10, 0x00]);
            f.extend_from_slice(&[0x00, 0x00]);
            f.extend_from_slice(&[0xaa, 0xaa, 0x03, 0, 0, 0]);
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::Ppi => {
            // Version 0, flags 0, length 8, DLT 1 (Ethernet), little endian.
            f.extend_from_slice(&[0, 0, 8, 0, 1, 0, 0, 0]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::FabricPath => {
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 8, 0x02, 0, 0, 0, 0, 7, 0x89, 0x03]);
            f.extend_from_slice(&[0x00, 0x3f]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        Link::Mpls => {
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x88, 0x47]);
            f.extend_from_slice(&[0x00, 0x01, 0x00, 0x40]);
            f.extend_from_slice(&[0x00, 0x02, 0x01, 0x40]);
        }
    }
    f.extend_from_slice(payload);
    // Ethernet minimum frame size: padding must not be counted as IP bytes.
    let ethernet = matches!(
        link,
        Link::Eth | Link::Vlan(_) | Link::QinQ(..) | Link::Pppoe | Link::FabricPath | Link::Mpls
    );
    if ethernet && f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// PPP protocol number of an IP Ethernet type.
fn ppp_protocol(ethertype: u16) -> u16 {
    match ethertype {
        0x0800 => 0x0021,
        0x86dd => 0x0057,
        other => panic!("no PPP protocol for ethertype {other:#06x} in the tests"),
    }
}

pub fn ethertype_of(ip: &[u8]) -> u16 {
    if ip[0] >> 4 == 6 {
        0x86dd
    } else {
        0x0800
    }
}

/// A TLS ClientHello carrying `sni` (the test kit's, one builder for every test).
#[allow(unused_imports)] // not every test file builds ClientHellos
pub use xtask::kit::pcap::client_hello;

fn qname(name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q
}

pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

pub fn dns_response(id: u16, name: &str, addrs: &[IpAddr]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x81, 0x80, 0, 1]);
    m.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12]);
        match a {
            IpAddr::V4(v) => {
                m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 1, 0, 0, 4]);
                m.extend_from_slice(&v.octets());
            }
            IpAddr::V6(v) => {
                m.extend_from_slice(&[0, 28, 0, 1, 0, 0, 1, 0, 0, 16]);
                m.extend_from_slice(&v.octets());
            }
        }
    }
    m
}

/// Ground truth of one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTruth {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub proto: &'static str,
    pub class: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Frames with their ground truth.
#[derive(Debug, Default)]
pub struct Capture {
    /// (timestamp ns, link, frame bytes)
    pub frames: Vec<(u64, Link, Vec<u8>)>,
    pub flows: BTreeMap<String, FlowTruth>,
    pub malformed: u64,
    pub non_ip: u64,
}

impl Capture {
    pub fn flow(
        &mut self,
        name: &str,
        client: &str,
        server: &str,
        proto: &'static str,
        class: &'static str,
    ) {
        self.flows.insert(
            name.to_string(),
            FlowTruth {
                client: client.parse().expect("client addr"),
                server: server.parse().expect("server addr"),
                proto,
                class,
                packets: 0,
                bytes: 0,
            },
        );
    }

    /// Add one packet of flow `name`; `up` = client → server. `l4` builds the
    /// transport bytes from (source port, destination port).
    pub fn packet(
        &mut self,
        ts: u64,
        link: Link,
        name: &str,
        up: bool,
        dscp: u8,
        l4: impl FnOnce(u16, u16) -> Vec<u8>,
    ) {
        let f = self.flows.get_mut(name).expect("flow declared");
        let (s, d) = if up {
            (f.client, f.server)
        } else {
            (f.server, f.client)
        };
        let proto = match f.proto {
            "tcp" => TCP,
            "udp" => UDP,
            _ => ICMP,
        };
        let ipb = ip(s.ip(), d.ip(), proto, dscp, &l4(s.port(), d.port()));
        f.packets += 1;
        f.bytes += ipb.len() as u64;
        let fr = frame(link, ethertype_of(&ipb), &ipb);
        self.frames.push((ts, link, fr));
    }

    /// A frame that must be counted as malformed.
    pub fn malformed_frame(&mut self, ts: u64, link: Link, bytes: Vec<u8>) {
        self.malformed += 1;
        self.frames.push((ts, link, bytes));
    }

    pub fn total_packets(&self) -> u64 {
        self.flows.values().map(|f| f.packets).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.flows.values().map(|f| f.bytes).sum()
    }
}

fn linktype(link: Link) -> u32 {
    match link {
        Link::Eth
        | Link::Vlan(_)
        | Link::QinQ(..)
        | Link::Pppoe
        | Link::FabricPath
        | Link::Mpls => 1,
        Link::Sll => 113,
        Link::Sll2 => 276,
        Link::Ppp => 9,
        Link::PppCompressed => 50,
        Link::CiscoHdlc => 104,
        Link::Wifi => 105,
        Link::Radiotap => 127,
        Link::Ppi => 192,
    }
}

/// Classic pcap (little endian, microseconds). Every frame must use an
/// Ethernet-family link, or all the same link.
pub fn write_pcap(frames: &[(u64, Link, Vec<u8>)], snaplen: u32) -> Vec<u8> {
    let lt = frames.first().map_or(1, |f| linktype(f.1));
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&snaplen.to_le_bytes());
    out.extend_from_slice(&lt.to_le_bytes());
    for (ts, link, f) in frames {
        assert_eq!(linktype(*link), lt, "one link type per pcap file");
        let cap = f.len().min(snaplen as usize);
        out.extend_from_slice(&((ts / 1_000_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((ts % 1_000_000_000 / 1000) as u32).to_le_bytes());
        out.extend_from_slice(&(cap as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&f[..cap]);
    }
    out
}

/// pcapng (big endian, to exercise the other byte order), one interface per
/// link type with nanosecond resolution.
pub fn write_pcapng(frames: &[(u64, Link, Vec<u8>)]) -> Vec<u8> {
    fn block(out: &mut Vec<u8>, btype: u32, body: &[u8]) {
        let padded = body.len().div_ceil(4) * 4;
        let len = (12 + padded) as u32;
        out.extend_from_slice(&btype.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out.resize(out.len() + padded - body.len(), 0);
        out.extend_from_slice(&len.to_be_bytes());
    }
    let mut out = Vec::new();
    let mut shb = 0x1a2b_3c4du32.to_be_bytes().to_vec();
    shb.extend_from_slice(&[0, 1, 0, 0]);
    shb.extend_from_slice(&u64::MAX.to_be_bytes());
    block(&mut out, 0x0a0d_0d0a, &shb);
    let mut ifaces: Vec<u32> = Vec::new();
    for (_, link, _) in frames {
        let lt = linktype(*link);
        if !ifaces.contains(&lt) {
            ifaces.push(lt);
            let mut idb = (lt as u16).to_be_bytes().to_vec();
            idb.extend_from_slice(&[0, 0, 0, 4, 0, 0]);
            // if_tsresol = 9 (nanoseconds), then opt_endofopt.
            idb.extend_from_slice(&[0, 9, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0]);
            block(&mut out, 1, &idb);
        }
    }
    // An unknown block type in the middle must be skipped.
    block(&mut out, 0x0bad_0001, &[1, 2, 3, 4, 5]);
    for (ts, link, f) in frames {
        let id = ifaces
            .iter()
            .position(|&l| l == linktype(*link))
            .unwrap_or(0) as u32;
        let mut epb = id.to_be_bytes().to_vec();
        epb.extend_from_slice(&((ts >> 32) as u32).to_be_bytes());
        epb.extend_from_slice(&(*ts as u32).to_be_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_be_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_be_bytes());
        epb.extend_from_slice(f);
        block(&mut out, 6, &epb);
    }
    out
}
