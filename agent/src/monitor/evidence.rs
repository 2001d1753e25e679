//! Payload evidence: what the first packets of a flow say it carries, where
//! ports and names say nothing (calls and peer-to-peer traffic use arbitrary
//! ports and rarely a name).
//!
//! - STUN (RFC 8489) and TURN (RFC 8656): ICE connectivity checks and relays.
//!   A WebRTC, FaceTime or SIP-with-ICE call sends its media on the very
//!   5-tuple its checks ran on, and a device that ran a STUN binding towards
//!   a STUN server sends its media from the same local port to the peer.
//! - RTP and RTCP (RFC 3550, demultiplexed as in RFC 5761 and RFC 7983):
//!   media whose header carries one SSRC and sequence numbers counting up.
//! - BitTorrent: the peer-wire handshake (BEP 3) and DHT messages (BEP 5),
//!   whose sender's port also carries the client's uTP connections.
//! - SSH: the version banner (RFC 4253 §4.2), for SSH on a non-standard port.
//!
//! Every detector reads only the bytes it is given and never panics. The
//! [`EndpointMemory`] remembers, for a bounded time and number, the endpoints
//! that payload evidence tied to a class, so later flows of that endpoint
//! (the media after the STUN binding, the uTP peers of a DHT node) start in
//! that class from their first packet.

use super::names::BoundedMap;
use shardline_shared::msg::TrafficClass;
use std::net::{IpAddr, SocketAddr};

/// What one datagram or first TCP segment looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// A STUN message; `request` for a request (its sender is an ICE agent or
    /// a TURN client), else a response or indication.
    Stun { request: bool },
    /// RTP with this SSRC and sequence number.
    Rtp { ssrc: u32, seq: u16 },
    /// RTCP (sender or receiver reports and the like).
    Rtcp,
    /// A BitTorrent peer handshake or DHT message.
    BitTorrent,
    /// An SSH version banner.
    Ssh,
}

const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// A STUN message: two zero bits, a length that is the rest of the datagram
/// (a multiple of 4) and the magic cookie (RFC 8489 §5).
pub fn stun(p: &[u8]) -> Option<Evidence> {
    if p.len() < 20 || p[0] & 0xc0 != 0 || p[4..8] != STUN_MAGIC_COOKIE {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if len % 4 != 0 || len + 20 != p.len() {
        return None;
    }
    let kind = u16::from_be_bytes([p[0], p[1]]);
    // The class bits C1 C0 are bits 8 and 4 of the type; 00 = request.
    Some(Evidence::Stun {
        request: kind & 0x0110 == 0,
    })
}

/// RTP or RTCP version 2. RTCP's packet types (200–206) sit where RTP's
/// marker bit plus a payload type of 72–78 would, which RFC 5761 keeps free
/// for that reason; RTP's payload type must be a static (0–34) or a dynamic
/// (96–127) one, and the header must fit with its CSRCs and extension.
pub fn rtp(p: &[u8]) -> Option<Evidence> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    if (200..=206).contains(&p[1]) {
        // RTCP: length in 32-bit words minus one, within the datagram.
        let words = usize::from(u16::from_be_bytes([p[2], p[3]])) + 1;
        return (words * 4 <= p.len()).then_some(Evidence::Rtcp);
    }
    let pt = p[1] & 0x7f;
    if !(pt <= 34 || (96..=127).contains(&pt)) {
        return None;
    }
    let csrcs = usize::from(p[0] & 0x0f);
    let mut header = 12 + 4 * csrcs;
    if p[0] & 0x10 != 0 {
        let ext = p.get(header + 2..header + 4)?;
        header += 4 + 4 * usize::from(u16::from_be_bytes([ext[0], ext[1]]));
    }
    if header > p.len() {
        return None;
    }
    let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
    (ssrc != 0).then_some(Evidence::Rtp {
        ssrc,
        seq: u16::from_be_bytes([p[2], p[3]]),
    })
}

const BITTORRENT_HANDSHAKE: &[u8] = b"\x13BitTorrent protocol";

/// BEP 5 DHT messages are bencoded dictionaries whose sorted keys start with
/// the arguments (`a`), the response (`r`) or the error (`e`).
fn bittorrent_dht(p: &[u8]) -> bool {
    [&b"d1:ad2:id20:"[..], b"d1:rd2:id20:", b"d1:eli"]
        .iter()
        .any(|prefix| p.starts_with(prefix))
}

/// Evidence from a UDP payload.
pub fn udp(p: &[u8]) -> Option<Evidence> {
    // RFC 7983's demultiplexing by the first byte: 0–3 STUN, 128–191
    // RTP/RTCP (20–63 is DTLS, which says nothing of its own here).
    match p.first()? {
        0..=3 => stun(p),
        128..=191 => rtp(p),
        b'd' if bittorrent_dht(p) => Some(Evidence::BitTorrent),
        _ => None,
    }
}

/// Evidence from the first payload of either side of a TCP connection.
pub fn tcp(p: &[u8]) -> Option<Evidence> {
    if p.starts_with(BITTORRENT_HANDSHAKE) {
        Some(Evidence::BitTorrent)
    } else if p.starts_with(b"SSH-2.0-") || p.starts_with(b"SSH-1.99-") {
        Some(Evidence::Ssh)
    } else {
        None
    }
}

/// One direction's RTP stream as seen so far: media is told from chance
/// look-alikes by one SSRC whose sequence numbers keep counting up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtpTrack {
    ssrc: u32,
    seq: u16,
    /// Consecutive RTP packets of `ssrc` in sequence (saturating).
    run: u8,
}

/// Packets in sequence after which a direction counts as carrying RTP.
pub const RTP_RUN: u8 = 4;

impl RtpTrack {
    /// Fold in one RTP header; returns whether the direction now carries RTP.
    pub fn add(&mut self, ssrc: u32, seq: u16) -> bool {
        // A few lost or reordered packets keep the run; another SSRC (a
        // second stream on the 5-tuple, or noise) starts over.
        let step = seq.wrapping_sub(self.seq);
        if self.run > 0 && ssrc == self.ssrc && (1..=8).contains(&step) {
            self.run = self.run.saturating_add(1);
        } else {
            self.run = 1;
            self.ssrc = ssrc;
        }
        self.seq = seq;
        self.is_media()
    }

    pub fn is_media(&self) -> bool {
        self.run >= RTP_RUN
    }

    /// The track as two words (SSRC; sequence number and run), the form a
    /// UDP flow keeps it in (`Flow::rtp_track`).
    pub fn to_words(self) -> (u32, u32) {
        (self.ssrc, u32::from(self.seq) | u32::from(self.run) << 16)
    }

    pub fn from_words(ssrc: u32, seq_run: u32) -> Self {
        RtpTrack {
            ssrc,
            seq: seq_run as u16,
            run: (seq_run >> 16) as u8,
        }
    }
}

/// How long an endpoint stays tied to its class without new evidence: an
/// ICE agent refreshes its bindings every 15–30 s, a DHT node answers and
/// queries every few minutes.
pub const ENDPOINT_TTL_NS: u64 = 300_000_000_000;

/// Endpoints tied to a class by payload evidence, bounded in number (the
/// oldest is forgotten first) and in time ([`ENDPOINT_TTL_NS`]).
#[derive(Debug)]
pub struct EndpointMemory {
    map: BoundedMap<SocketAddr, (TrafficClass, u64)>,
}

impl EndpointMemory {
    pub fn new(cap: usize) -> Self {
        EndpointMemory {
            map: BoundedMap::new(cap),
        }
    }

    /// Tie `endpoint` to `class` as of `now_ns`.
    pub fn remember(&mut self, endpoint: SocketAddr, class: TrafficClass, now_ns: u64) {
        if endpoint.port() != 0 {
            self.map.insert(endpoint, (class, now_ns));
        }
    }

    /// The class `endpoint` was tied to, if that is recent enough.
    pub fn class_of(&self, ip: IpAddr, port: u16, now_ns: u64) -> Option<TrafficClass> {
        let (class, at) = self.map.get(&SocketAddr::new(ip, port))?;
        (now_ns.saturating_sub(at) <= ENDPOINT_TTL_NS).then_some(class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_binding_request() -> Vec<u8> {
        let mut m = vec![0x00, 0x01, 0x00, 0x08];
        m.extend_from_slice(&STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]); // transaction id
        m.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b'w', b'e', b'b', b'r']); // SOFTWARE
        m
    }

    fn rtp_packet(pt: u8, seq: u16, ssrc: u32, payload: usize) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&1234u32.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.resize(12 + payload, 0xab);
        p
    }

    #[test]
    fn stun_needs_cookie_and_exact_length() {
        let m = stun_binding_request();
        assert_eq!(udp(&m), Some(Evidence::Stun { request: true }));
        let mut resp = m.clone();
        resp[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
        assert_eq!(udp(&resp), Some(Evidence::Stun { request: false }));
        let mut no_cookie = m.clone();
        no_cookie[5] ^= 1;
        assert_eq!(udp(&no_cookie), None);
        assert_eq!(udp(&m[..m.len() - 4]), None, "length field disagrees");
        for cut in 0..m.len() {
            let _ = udp(&m[..cut]);
        }
    }

    #[test]
    fn rtp_rtcp_bittorrent_and_ssh_are_told_apart() {
        assert!(matches!(
            udp(&rtp_packet(111, 7, 0xdead_beef, 80)),
            Some(Evidence::Rtp {
                ssrc: 0xdead_beef,
                seq: 7
            })
        ));
        assert_eq!(udp(&rtp_packet(50, 7, 1, 80)), None, "no such payload type");
        let mut rtcp = vec![0x81, 200, 0x00, 0x06];
        rtcp.resize(28, 0);
        assert_eq!(udp(&rtcp), Some(Evidence::Rtcp));
        assert_eq!(
            udp(b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe"),
            Some(Evidence::BitTorrent)
        );
        assert_eq!(
            tcp(b"\x13BitTorrent protocol\0\0\0\0\0\0\0\0"),
            Some(Evidence::BitTorrent)
        );
        assert_eq!(tcp(b"SSH-2.0-OpenSSH_9.2p1\r\n"), Some(Evidence::Ssh));
        assert_eq!(tcp(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn rtp_track_needs_one_ssrc_counting_up() {
        let mut t = RtpTrack::default();
        for seq in [10u16, 11, 12] {
            assert!(!t.add(99, seq));
        }
        assert!(t.add(99, 14), "one lost packet keeps the run");
        let mut noise = RtpTrack::default();
        for (i, ssrc) in [1u32, 2, 3, 4, 5, 6].into_iter().enumerate() {
            assert!(!noise.add(ssrc, i as u16), "random SSRCs are not media");
        }
        let mut wrap = RtpTrack::default();
        for seq in [65534u16, 65535, 0, 1] {
            wrap.add(5, seq);
        }
        assert!(wrap.is_media(), "sequence numbers wrap");
    }

    #[test]
    fn endpoint_memory_is_bounded_and_forgets() {
        let mut m = EndpointMemory::new(2);
        let ep = |p: u16| SocketAddr::from(([10, 0, 0, 1], p));
        m.remember(ep(1), TrafficClass::Calls, 0);
        m.remember(ep(2), TrafficClass::Bulk, 0);
        m.remember(ep(3), TrafficClass::Calls, 0);
        assert_eq!(m.class_of(ep(2).ip(), 2, 0), Some(TrafficClass::Bulk));
        assert_eq!(m.class_of(ep(1).ip(), 1, 0), None, "oldest forgotten");
        assert_eq!(m.class_of(ep(3).ip(), 3, 1), Some(TrafficClass::Calls));
        assert_eq!(m.class_of(ep(3).ip(), 3, ENDPOINT_TTL_NS + 1), None);
    }
}
