//! Bounded, allocation-free decoding of captured frames down to the transport
//! header: link layer (Ethernet with stacked VLAN tags, Linux cooked capture
//! SLL/SLL2, raw IP), IPv4/IPv6 (with IPv6 extension headers), TCP/UDP/ICMP.
//!
//! Nothing here trusts a length field: every read is bounds-checked against the
//! captured bytes and a failure is a [`ParseError`], never a panic. Byte counts
//! come from the IP total length, not from the captured length, because
//! offload-merged (GRO/TSO) packets are larger than the capture buffer and
//! short captures (snaplen) are smaller than the packet.

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
    /// BSD loopback: 4-byte host-order address family (`LINKTYPE_NULL` = 0).
    Null,
}

impl LinkType {
    /// The link type for a pcap/pcapng `LINKTYPE_*` number, `None` if unsupported.
    pub fn from_linktype(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Null),
            1 => Some(Self::Ethernet),
            101 | 228 | 229 | 12 | 14 => Some(Self::RawIp),
            113 => Some(Self::LinuxSll),
            276 => Some(Self::LinuxSll2),
            _ => None,
        }
    }

    /// The pcap `LINKTYPE_*` number (used by writers).
    pub fn linktype(self) -> u32 {
        match self {
            Self::Null => 0,
            Self::Ethernet => 1,
            Self::RawIp => 101,
            Self::LinuxSll => 113,
            Self::LinuxSll2 => 276,
        }
    }
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

    fn from_number(n: u8) -> Self {
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
const MAX_VLAN_TAGS: usize = 4;
const MAX_IPV6_EXT: usize = 8;

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

#[inline]
fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decode one frame of the given link type.
pub fn parse(link: LinkType, frame: &[u8]) -> Result<Packet<'_>, ParseError> {
    let (ethertype, ip) = match link {
        LinkType::Ethernet => {
            let mut et = be16(frame, 12).ok_or(ParseError::TruncatedLink)?;
            let mut off = 14;
            let mut tags = 0;
            while matches!(et, 0x8100 | 0x88a8 | 0x9100) {
                tags += 1;
                if tags > MAX_VLAN_TAGS {
                    return Err(ParseError::TruncatedLink);
                }
                et = be16(frame, off + 2).ok_or(ParseError::TruncatedLink)?;
                off += 4;
            }
            (et, &frame[off..])
        }
        LinkType::LinuxSll => {
            let et = be16(frame, 14).ok_or(ParseError::TruncatedLink)?;
            (et, &frame[16..])
        }
        LinkType::LinuxSll2 => {
            let et = be16(frame, 0).ok_or(ParseError::TruncatedLink)?;
            if frame.len() < 20 {
                return Err(ParseError::TruncatedLink);
            }
            (et, &frame[20..])
        }
        LinkType::Null => {
            let fam = frame.get(..4).ok_or(ParseError::TruncatedLink)?;
            // Host byte order of the capturing machine: accept either.
            let v = u32::from_le_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let v = if v > 0xffff { v.swap_bytes() } else { v };
            let et = match v {
                2 => ETH_IPV4,
                24 | 28 | 30 => ETH_IPV6,
                other => return Err(ParseError::NotIp(other as u16)),
            };
            (et, &frame[4..])
        }
        LinkType::RawIp => {
            let v = frame.first().ok_or(ParseError::TruncatedIp)? >> 4;
            let et = match v {
                4 => ETH_IPV4,
                6 => ETH_IPV6,
                _ => return Err(ParseError::BadIp),
            };
            (et, frame)
        }
    };
    match ethertype {
        ETH_IPV4 => parse_ipv4(ip),
        ETH_IPV6 => parse_ipv6(ip),
        other => Err(ParseError::NotIp(other)),
    }
}

fn parse_ipv4(b: &[u8]) -> Result<Packet<'_>, ParseError> {
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
    let frag = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
    let dscp = b[1] >> 2;
    let proto = if frag != 0 {
        Proto::Other(b[9])
    } else {
        Proto::from_number(b[9])
    };
    // The transport view ends at the IP total length (Ethernet padding is not payload).
    let end = b.len().min(total as usize);
    let l4 = &b[ihl..end];
    transport(src, dst, proto, total, total - ihl as u32, dscp, l4)
}

fn parse_ipv6(b: &[u8]) -> Result<Packet<'_>, ParseError> {
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
    transport(
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        proto,
        total,
        payload_len,
        tclass >> 2,
        l4,
    )
}

fn transport<'a>(
    src: IpAddr,
    dst: IpAddr,
    proto: Proto,
    ip_len: u32,
    l4_len: u32,
    dscp: u8,
    l4: &'a [u8],
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
    };
    match proto {
        Proto::Tcp => {
            if l4.len() < 20 {
                return Err(ParseError::TruncatedTransport);
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff as u32 > l4_len {
                return Err(ParseError::BadTransport);
            }
            if l4.len() < doff {
                return Err(ParseError::TruncatedTransport);
            }
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            let ack = u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]);
            p.tcp = Some(TcpInfo {
                seq,
                ack,
                flags: l4[13],
                ts: tcp_timestamps(&l4[20..doff]),
            });
            p.payload_len = l4_len - doff as u32;
            p.payload = &l4[doff..];
        }
        Proto::Udp => {
            if l4.len() < 8 {
                return Err(ParseError::TruncatedTransport);
            }
            if l4_len < 8 {
                return Err(ParseError::BadTransport);
            }
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            p.payload_len = l4_len - 8;
            p.payload = &l4[8..];
        }
        Proto::Icmp | Proto::Icmpv6 => {
            if l4.len() < 8 {
                return Err(ParseError::TruncatedTransport);
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
            for link in [
                LinkType::Ethernet,
                LinkType::LinuxSll,
                LinkType::LinuxSll2,
                LinkType::RawIp,
                LinkType::Null,
            ] {
                let _ = parse(link, &buf[..len]);
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
