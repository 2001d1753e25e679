//! Bounded, allocation-free decoding of captured frames down to the transport
//! header: link layer (Ethernet with stacked VLAN tags, PPPoE, MPLS and
//! Cisco FabricPath inside it; Linux cooked capture SLL/SLL2; raw IP; BSD
//! loopback; PPP; Cisco HDLC; 802.11 bare, behind radiotap or PPI),
//! IPv4/IPv6 (with IPv6 extension headers and fragments), TCP/UDP/ICMP.
//!
//! Nothing here trusts a length field: every read is bounds-checked against the
//! captured bytes and a failure is a [`ParseError`], never a panic. Byte counts
//! come from the IP total length, not from the captured length, because
//! offload-merged (GRO/TSO) packets are larger than the capture buffer and
//! short captures (snaplen) are smaller than the packet. A frame the capture
//! cut ([`parse_cut`]) may also end inside its transport header; a complete
//! frame ([`parse`]) that does is malformed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Link-layer header type of a frame, as pcap's `LINKTYPE_*` values name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkType {
    /// Ethernet II, possibly with 802.1Q / 802.1ad tags (`LINKTYPE_ETHERNET` = 1).
    Ethernet,
    /// Linux cooked capture v1 (`LINKTYPE_LINUX_SLL` = 113).
    LinuxSll,
    /// Linux cooked capture v2 (`LINKTYPE_LINUX_SLL2` = 276).
    LinuxSll2,
    /// Raw IPv4 or IPv6 without a link header (`LINKTYPE_RAW` = 101, 228, 229).
    RawIp,
    /// BSD loopback: 4-byte address family in either byte order
    /// (`LINKTYPE_NULL` = 0, `LINKTYPE_LOOP` = 108).
    Null,
    /// PPP, with or without the HDLC-like address and control bytes, with a
    /// one- or two-byte protocol field (`LINKTYPE_PPP` = 9,
    /// `LINKTYPE_PPP_HDLC` = 50).
    Ppp,
    /// PPPoE session frames without their Ethernet header
    /// (`LINKTYPE_PPP_ETHER` = 51).
    PppEther,
    /// Cisco HDLC: address, control, then an Ethernet type
    /// (`LINKTYPE_C_HDLC` = 104).
    CiscoHdlc,
    /// IEEE 802.11 data frames with an LLC/SNAP header (`LINKTYPE_IEEE802_11` = 105).
    Ieee80211,
    /// 802.11 behind a radiotap header (`LINKTYPE_IEEE802_11_RADIOTAP` = 127).
    Radiotap,
    /// Per-Packet Information header naming the link type of what follows
    /// (`LINKTYPE_PPI` = 192): Ethernet, 802.11 and the others above.
    Ppi,
}

impl LinkType {
    /// The link type for a pcap/pcapng `LINKTYPE_*` number, `None` if unsupported.
    pub fn from_linktype(value: u32) -> Option<Self> {
        match value {
            0 | 108 => Some(Self::Null),
            1 => Some(Self::Ethernet),
            101 | 228 | 229 | 12 | 14 => Some(Self::RawIp),
            9 | 50 => Some(Self::Ppp),
            51 => Some(Self::PppEther),
            104 => Some(Self::CiscoHdlc),
            105 => Some(Self::Ieee80211),
            113 => Some(Self::LinuxSll),
            127 => Some(Self::Radiotap),
            192 => Some(Self::Ppi),
            276 => Some(Self::LinuxSll2),
            _ => None,
        }
    }

    /// The pcap `LINKTYPE_*` number (used by writers).
    pub fn linktype(self) -> u32 {
        match self {
            Self::Null => 0,
            Self::Ethernet => 1,
            Self::Ppp => 9,
            Self::PppEther => 51,
            Self::RawIp => 101,
            Self::CiscoHdlc => 104,
            Self::Ieee80211 => 105,
            Self::LinuxSll => 113,
            Self::Radiotap => 127,
            Self::Ppi => 192,
            Self::LinuxSll2 => 276,
        }
    }

    /// Every link type the parser reads (tests, fuzzing).
    pub const ALL: [LinkType; 11] = [
        LinkType::Ethernet,
        LinkType::LinuxSll,
        LinkType::LinuxSll2,
        LinkType::RawIp,
        LinkType::Null,
        LinkType::Ppp,
        LinkType::PppEther,
        LinkType::CiscoHdlc,
        LinkType::Ieee80211,
        LinkType::Radiotap,
        LinkType::Ppi,
    ];
}

/// Transport protocol of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    /// Any other IP protocol number (also non-first fragments, which carry no ports).
    Other(u8),
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
            Proto::Other(n) => n,
        }
    }

    pub fn from_number(n: u8) -> Self {
        match n {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            1 => Proto::Icmp,
            58 => Proto::Icmpv6,
            n => Proto::Other(n),
        }
    }

    /// Lower-case name used in JSON (`tcp`, `udp`, `icmp`, `icmpv6`, `ip-<n>`).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Proto::Tcp => "tcp".into(),
            Proto::Udp => "udp".into(),
            Proto::Icmp => "icmp".into(),
            Proto::Icmpv6 => "icmpv6".into(),
            Proto::Other(n) => format!("ip-{n}").into(),
        }
    }
}

/// TCP flag bits as they appear in the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The TCP fields the flow table needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpInfo {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Timestamp option (TSval, TSecr) if present.
    pub ts: Option<(u32, u32)>,
}

/// A decoded packet: addresses, ports, sizes and a view of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    /// Source / destination port (ICMP echo: identifier on both; otherwise 0).
    pub sport: u16,
    pub dport: u16,
    /// IP bytes of the packet, IP header included, from the IP length field.
    pub ip_len: u32,
    /// Transport payload length from the IP length field (not the captured length).
    pub payload_len: u32,
    /// DSCP (upper six bits of the traffic class / TOS byte).
    pub dscp: u8,
    pub tcp: Option<TcpInfo>,
    /// The captured part of the transport payload (may be shorter than `payload_len`).
    pub payload: &'a [u8],
    /// Set when the packet is an IP fragment: which datagram it belongs to
    /// and where it sits, so the flow table can give a later fragment (which
    /// carries no ports) to the flow of the first.
    pub fragment: Option<Fragment>,
    /// The transport header was cut by the capture's snapshot length: the
    /// ports (and TCP sequence numbers, flags) are known, the rest is not.
    pub transport_truncated: bool,
}

/// Where an IP fragment belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// The IP identification (16 bits in IPv4, 32 in IPv6).
    pub id: u32,
    /// The transport protocol of the datagram (from the IPv4 header or the
    /// IPv6 fragment header's next header).
    pub proto: u8,
    /// Offset 0: this fragment carries the transport header.
    pub first: bool,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame shorter than its link header")]
    TruncatedLink,
    #[error("not an IP packet (ethertype {0:#06x})")]
    NotIp(u16),
    #[error("IP header truncated")]
    TruncatedIp,
    #[error("bad IP header")]
    BadIp,
    #[error("transport header truncated")]
    TruncatedTransport,
    #[error("bad transport header")]
    BadTransport,
}

impl ParseError {
    /// Non-IP frames (ARP, LLDP, …) are not malformed; they are just not counted.
    pub fn is_malformed(self) -> bool {
        !matches!(self, ParseError::NotIp(_))
    }
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const MAX_IPV6_EXT: usize = 8;

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

#[inline]
fn le16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

#[inline]
fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decode one complete frame of the given link type: a header shorter than
/// its lengths say is malformed.
pub fn parse(link: LinkType, frame: &[u8]) -> Result<Packet<'_>, ParseError> {
    let (ethertype, rest) = link_header(link, frame)?;
    network(ethertype, rest, Capture::Complete)
}

/// Decode a frame the capture cut at its snapshot length (captured length
/// below the length on the wire): a transport header cut after its ports
/// is then expected, not malformed (see [`Packet::transport_truncated`]).
pub fn parse_cut(link: LinkType, frame: &[u8]) -> Result<Packet<'_>, ParseError> {
    let (ethertype, rest) = link_header(link, frame)?;
    network(ethertype, rest, Capture::Cut)
}

/// Whether the capture kept the whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Complete,
    Cut,
}

const ETH_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const ETH_PPPOE_SESSION: u16 = 0x8864;
const ETH_MPLS: [u16; 2] = [0x8847, 0x8848];
const ETH_FABRICPATH: u16 = 0x8903;
/// Most encapsulation layers (VLAN tags, PPPoE, MPLS labels, FabricPath)
/// walked before a frame is called malformed: bounds the work per frame.
const MAX_ENCAPSULATIONS: usize = 8;

/// The link header of `frame`: the Ethernet type of what follows and the
/// bytes after the header.
fn link_header(link: LinkType, frame: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    match link {
        LinkType::Ethernet => ethernet(frame),
        LinkType::LinuxSll => {
            let et = be16(frame, 14).ok_or(ParseError::TruncatedLink)?;
            Ok((et, &frame[16..]))
        }
        LinkType::LinuxSll2 => {
            let et = be16(frame, 0).ok_or(ParseError::TruncatedLink)?;
            if frame.len() < 20 {
                return Err(ParseError::TruncatedLink);
            }
            Ok((et, &frame[20..]))
        }
        LinkType::Null => {
            let fam = frame.get(..4).ok_or(ParseError::TruncatedLink)?;
            // Host byte order of the capturing machine (network order for
            // LINKTYPE_LOOP): accept either.
            let v = u32::from_le_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let v = if v > 0xffff { v.swap_bytes() } else { v };
            let et = match v {
                2 => ETH_IPV4,
                24 | 28 | 30 => ETH_IPV6,
                other => return Err(ParseError::NotIp(other as u16)),
            };
            Ok((et, &frame[4..]))
        }
        LinkType::RawIp => Ok((ip_version(frame)?, frame)),
        LinkType::Ppp => {
            // Address 0xff and control 0x03 unless compressed away (ACFC).
            let body = match frame {
                [0xff, 0x03, rest @ ..] => rest,
                _ => frame,
            };
            ppp(body)
        }
        LinkType::PppEther => pppoe_session(frame),
        LinkType::CiscoHdlc => {
            // Address (0x0f unicast, 0x8f broadcast), control 0, then an Ethernet type.
            let et = be16(frame, 2).ok_or(ParseError::TruncatedLink)?;
            Ok((et, &frame[4..]))
        }
        LinkType::Ieee80211 => ieee80211(frame),
        LinkType::Radiotap => {
            let len = usize::from(le16(frame, 2).ok_or(ParseError::TruncatedLink)?);
            let rest = frame.get(len..).ok_or(ParseError::TruncatedLink)?;
            ieee80211(rest)
        }
        LinkType::Ppi => {
            let len = usize::from(le16(frame, 2).ok_or(ParseError::TruncatedLink)?);
            let dlt = le32(frame, 4).ok_or(ParseError::TruncatedLink)?;
            let rest = frame.get(len..).ok_or(ParseError::TruncatedLink)?;
            match LinkType::from_linktype(dlt) {
                // PPI inside PPI is not a thing; refusing it bounds the recursion.
                Some(LinkType::Ppi) | None => Err(ParseError::NotIp(0)),
                Some(inner) => link_header(inner, rest),
            }
        }
    }
}

fn ethernet(frame: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    let et = be16(frame, 12).ok_or(ParseError::TruncatedLink)?;
    Ok((et, &frame[14..]))
}

/// The Ethernet type for the IP version in the first nibble.
fn ip_version(ip: &[u8]) -> Result<u16, ParseError> {
    match ip.first().ok_or(ParseError::TruncatedIp)? >> 4 {
        4 => Ok(ETH_IPV4),
        6 => Ok(ETH_IPV6),
        _ => Err(ParseError::BadIp),
    }
}

/// A PPP frame from its protocol field (one byte when compressed: PFC).
fn ppp(body: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    let first = *body.first().ok_or(ParseError::TruncatedLink)?;
    let (proto, rest) = if first & 1 == 1 {
        (u16::from(first), &body[1..])
    } else {
        let p = be16(body, 0).ok_or(ParseError::TruncatedLink)?;
        (p, &body[2..])
    };
    let et = match proto {
        0x0021 => ETH_IPV4,
        0x0057 => ETH_IPV6,
        0x0281 => ETH_MPLS[0],
        // LCP, IPCP, CHAP, …: control traffic, not IP.
        other => return Err(ParseError::NotIp(other)),
    };
    Ok((et, rest))
}

/// A PPPoE session header (version/type, code, session id, length), then PPP.
fn pppoe_session(b: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    if b.len() < 6 {
        return Err(ParseError::TruncatedLink);
    }
    ppp(&b[6..])
}

/// An 802.11 data frame down to its LLC/SNAP Ethernet type. Management and
/// control frames, null data and protected (encrypted) bodies carry no IP
/// the agent can read: they are not IP, not malformed.
fn ieee80211(b: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    let fc0 = *b.first().ok_or(ParseError::TruncatedLink)?;
    let flags = *b.get(1).ok_or(ParseError::TruncatedLink)?;
    let frame_type = (fc0 >> 2) & 0x3;
    let subtype = fc0 >> 4;
    const DATA: u8 = 2;
    if frame_type != DATA || subtype & 0x4 != 0 || flags & 0x40 != 0 {
        return Err(ParseError::NotIp(0));
    }
    let mut hdr = 24;
    if flags & 0x03 == 0x03 {
        hdr += 6; // a fourth address (WDS)
    }
    if subtype & 0x8 != 0 {
        hdr += 2; // QoS control
        if flags & 0x80 != 0 {
            hdr += 4; // HT control
        }
    }
    let llc = b.get(hdr..hdr + 8).ok_or(ParseError::TruncatedLink)?;
    if llc[..3] != [0xaa, 0xaa, 0x03] {
        return Err(ParseError::NotIp(0));
    }
    Ok((u16::from_be_bytes([llc[6], llc[7]]), &b[hdr + 8..]))
}

/// Walks encapsulations (VLAN tags, PPPoE, MPLS, FabricPath) down to IP.
fn network(mut ethertype: u16, mut b: &[u8], capture: Capture) -> Result<Packet<'_>, ParseError> {
    for _ in 0..MAX_ENCAPSULATIONS {
        match ethertype {
            ETH_IPV4 => return parse_ipv4(b, capture),
            ETH_IPV6 => return parse_ipv6(b, capture),
            et if ETH_VLAN.contains(&et) => {
                ethertype = be16(b, 2).ok_or(ParseError::TruncatedLink)?;
                b = &b[4..];
            }
            ETH_PPPOE_SESSION => (ethertype, b) = pppoe_session(b)?,
            et if ETH_MPLS.contains(&et) => {
                // Labels until the bottom of the stack, then IP by its version.
                let mut off = 0;
                loop {
                    let label = be32(b, off).ok_or(ParseError::TruncatedLink)?;
                    off += 4;
                    if label & 0x100 != 0 {
                        break;
                    }
                    if off >= 4 * MAX_ENCAPSULATIONS {
                        return Err(ParseError::TruncatedLink);
                    }
                }
                b = &b[off..];
                ethertype = ip_version(b)?;
            }
            ETH_FABRICPATH => {
                // FTag and TTL (2 bytes), then the classical Ethernet frame.
                let inner = b.get(2..).ok_or(ParseError::TruncatedLink)?;
                (ethertype, b) = ethernet(inner)?;
            }
            other => return Err(ParseError::NotIp(other)),
        }
    }
    Err(ParseError::TruncatedLink)
}

fn parse_ipv4(b: &[u8], capture: Capture) -> Result<Packet<'_>, ParseError> {
    if b.len() < 20 {
        return Err(ParseError::TruncatedIp);
    }
    if b[0] >> 4 != 4 {
        return Err(ParseError::BadIp);
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError::BadIp);
    }
    if b.len() < ihl {
        return Err(ParseError::TruncatedIp);
    }
    let mut total = u32::from(u16::from_be_bytes([b[2], b[3]]));
    if total == 0 {
        // TSO/BIG-TCP super-packets may carry 0: the captured length is all we know.
        total = b.len() as u32;
    }
    if (total as usize) < ihl {
        return Err(ParseError::BadIp);
    }
    let frag_field = u16::from_be_bytes([b[6], b[7]]);
    let frag_offset = frag_field & 0x1fff;
    let more_fragments = frag_field & 0x2000 != 0;
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
    let dscp = b[1] >> 2;
    let fragment = (frag_offset != 0 || more_fragments).then(|| Fragment {
        id: u32::from(u16::from_be_bytes([b[4], b[5]])),
        proto: b[9],
        first: frag_offset == 0,
    });
    let proto = if frag_offset != 0 {
        Proto::Other(b[9])
    } else {
        Proto::from_number(b[9])
    };
    // The transport view ends at the IP total length (Ethernet padding is not payload).
    let end = b.len().min(total as usize);
    let l4 = &b[ihl..end];
    let mut p = transport(
        src,
        dst,
        proto,
        total,
        total - ihl as u32,
        dscp,
        l4,
        capture,
    )?;
    p.fragment = fragment;
    Ok(p)
}

fn parse_ipv6(b: &[u8], capture: Capture) -> Result<Packet<'_>, ParseError> {
    if b.len() < 40 {
        return Err(ParseError::TruncatedIp);
    }
    if b[0] >> 4 != 6 {
        return Err(ParseError::BadIp);
    }
    let tclass = ((b[0] & 0x0f) << 4) | (b[1] >> 4);
    let mut plen = u32::from(u16::from_be_bytes([b[4], b[5]]));
    if plen == 0 {
        // Jumbogram / BIG TCP: fall back to the captured length.
        plen = (b.len() - 40) as u32;
    }
    let total = plen + 40;
    let mut src = [0u8; 16];
    src.copy_from_slice(&b[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&b[24..40]);
    let end = b.len().min(total as usize);
    let mut next = b[6];
    let mut off = 40usize;
    let mut ext = 0;
    let mut fragmented = false;
    let mut fragment = None;
    // Walk a bounded number of extension headers.
    loop {
        match next {
            0 | 43 | 60 => {
                let h = b.get(off..off + 2).ok_or(ParseError::TruncatedTransport)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                let h = b.get(off..off + 8).ok_or(ParseError::TruncatedTransport)?;
                next = h[0];
                let frag_off = u16::from_be_bytes([h[2], h[3]]) >> 3;
                fragmented |= frag_off != 0;
                fragment = Some(Fragment {
                    id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                    proto: h[0],
                    first: frag_off == 0,
                });
                off += 8;
            }
            51 => {
                let h = b.get(off..off + 2).ok_or(ParseError::TruncatedTransport)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            _ => break,
        }
        ext += 1;
        if ext > MAX_IPV6_EXT || off > total as usize {
            return Err(ParseError::BadIp);
        }
    }
    let proto = if fragmented {
        Proto::Other(next)
    } else {
        Proto::from_number(next)
    };
    let l4 = b.get(off..end).unwrap_or(&[]);
    let payload_len = total.saturating_sub(off as u32);
    let mut p = transport(
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        proto,
        total,
        payload_len,
        tclass >> 2,
        l4,
        capture,
    )?;
    p.fragment = fragment;
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn transport<'a>(
    src: IpAddr,
    dst: IpAddr,
    proto: Proto,
    ip_len: u32,
    l4_len: u32,
    dscp: u8,
    l4: &'a [u8],
    capture: Capture,
) -> Result<Packet<'a>, ParseError> {
    let mut p = Packet {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        ip_len,
        payload_len: l4_len,
        dscp,
        tcp: None,
        payload: &[],
        fragment: None,
        transport_truncated: false,
    };
    // A capture with a short snapshot length cuts headers too: as long as
    // the ports were captured the packet is counted in its flow (bytes come
    // from the IP length anyway); what was cut is simply not known. In a
    // complete frame a short header is malformed.
    let cut = capture == Capture::Cut;
    let full = |header: usize| if cut { header.min(4) } else { header };
    const PORTS: usize = 4;
    if cut && l4.len() < PORTS && matches!(proto, Proto::Tcp | Proto::Udp) {
        // Even the ports were cut (e.g. IPv6 behind two VLAN tags in 64
        // bytes): the packet and its bytes still count, in a flow of its
        // addresses alone.
        p.transport_truncated = true;
        p.payload_len = l4_len.saturating_sub(if proto == Proto::Tcp { 20 } else { 8 });
        return Ok(p);
    }
    match proto {
        Proto::Tcp => {
            if l4.len() < PORTS.max(full(20)) {
                return Err(ParseError::TruncatedTransport);
            }
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            // Data offset, sequence numbers and flags need 14 bytes.
            let Some(&[doff_byte, flags]) = l4.get(12..14) else {
                p.transport_truncated = true;
                p.payload_len = l4_len.saturating_sub(20);
                return Ok(p);
            };
            let doff = usize::from(doff_byte >> 4) * 4;
            if doff < 20 || doff as u32 > l4_len {
                return Err(ParseError::BadTransport);
            }
            if l4.len() < full(doff) {
                return Err(ParseError::TruncatedTransport);
            }
            let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            let ack = u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]);
            let options = l4.get(20..doff.min(l4.len())).unwrap_or(&[]);
            p.tcp = Some(TcpInfo {
                seq,
                ack,
                flags,
                ts: tcp_timestamps(options),
            });
            p.transport_truncated = l4.len() < doff;
            p.payload_len = l4_len - doff as u32;
            p.payload = l4.get(doff..).unwrap_or(&[]);
        }
        Proto::Udp => {
            if l4.len() < PORTS.max(full(8)) {
                return Err(ParseError::TruncatedTransport);
            }
            if l4_len < 8 {
                return Err(ParseError::BadTransport);
            }
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            p.transport_truncated = l4.len() < 8;
            p.payload_len = l4_len - 8;
            p.payload = l4.get(8..).unwrap_or(&[]);
        }
        Proto::Icmp | Proto::Icmpv6 => {
            if l4.len() < 8 {
                if !cut {
                    return Err(ParseError::TruncatedTransport);
                }
                p.transport_truncated = true;
                p.payload_len = l4_len.saturating_sub(8);
                return Ok(p);
            }
            // Echo request/reply: the identifier keeps pings of different
            // processes apart and is the same in both directions.
            let t = l4[0];
            let is_echo = matches!(
                (proto, t),
                (Proto::Icmp, 0 | 8) | (Proto::Icmpv6, 128 | 129)
            );
            if is_echo {
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                p.sport = id;
                p.dport = id;
            }
            p.payload_len = l4_len.saturating_sub(8);
            p.payload = &l4[8..];
        }
        Proto::Other(_) => {
            p.payload = l4;
        }
    }
    Ok(p)
}

/// Find the TCP timestamp option (kind 8) in the option bytes; bounded by them.
fn tcp_timestamps(opts: &[u8]) -> Option<(u32, u32)> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 8 && len == 10 {
                    return Some((be32(opts, i + 2)?, be32(opts, i + 6)?));
                }
                i += len;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 12345;
        let mut buf = [0u8; 128];
        for _ in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let len = (x as usize) % buf.len();
            for link in LinkType::ALL {
                let _ = parse(link, &buf[..len]);
                let _ = parse_cut(link, &buf[..len]);
            }
            // Force a plausible IPv4/IPv6 header to reach the deeper parsers.
            buf[0] = 0x45;
            let _ = parse(LinkType::RawIp, &buf[..len]);
            buf[0] = 0x60;
            let _ = parse(LinkType::RawIp, &buf[..len]);
        }
    }

    #[test]
    fn tcp_timestamp_option() {
        let opts = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
        assert_eq!(tcp_timestamps(&opts), Some((7, 9)));
        assert_eq!(tcp_timestamps(&[8, 10, 0]), None);
        assert_eq!(tcp_timestamps(&[2, 0, 8]), None);
    }
}
