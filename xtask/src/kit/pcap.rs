//! The demo's traffic as a capture file: Ethernet/IPv4 frames written as a
//! classic pcap, for running the loop without root (the agent replays the
//! file with its original pacing instead of watching an interface).
//!
//! The scenario is a list of [`Phase`]s: a TLS session whose ClientHello
//! names a bank (classified `sensitive`: needs encryption ⇒ `vpn`), UDP
//! game traffic on port 27015 (`gaming`: latency sensitive ⇒ `qos`), and
//! quiet stretches filled with ARP frames only, which carry no IP traffic
//! and so no class, but keep the replay's clock moving (the replay would
//! otherwise jump over a long gap).

use std::net::Ipv4Addr;
use std::time::Duration;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The TLS server name of the banking phase (a `sensitive` suffix of the default rules).
pub const BANK_SNI: &str = "online.bank.example";
/// A game server port (27000–27050 is `gaming` in the default rules).
pub const GAME_PORT: u16 = 27015;

/// One stretch of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// ARP only.
    Quiet(Duration),
    /// TCP handshake to port 443, a ClientHello with [`BANK_SNI`], then
    /// encrypted-looking records both ways (about 500 kbit/s).
    Banking(Duration),
    /// UDP to/from [`GAME_PORT`], 50 small datagrams per second each way.
    Gaming(Duration),
}

impl Phase {
    pub fn duration(&self) -> Duration {
        match *self {
            Phase::Quiet(d) | Phase::Banking(d) | Phase::Gaming(d) => d,
        }
    }
}

const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0x77, 0, 1];
const MAC_SERVER: [u8; 6] = [0x02, 0, 0, 0x77, 0, 2];

fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IPv4 packet (header checksum set) around `l4`; the L4 checksum is
/// filled in over the pseudo-header.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut l4 = l4.to_vec();
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let at = if proto == 6 { 16 } else { 6 };
    let c = csum(&pseudo);
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let total = 20 + l4.len();
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&l4);
    h
}

pub fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An Ethernet frame (padded to the 60-byte minimum).
pub fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

fn arp_request() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&MAC_CLIENT);
    a.extend_from_slice(&CLIENT.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&SERVER.octets());
    ethernet(MAC_CLIENT, [0xff; 6], 0x0806, &a)
}

/// A TLS 1.2/1.3 ClientHello record naming `sni`.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let n = sni.as_bytes();
    let mut ext = vec![0xff, 0x01, 0, 1, 0]; // renegotiation_info
    ext.extend_from_slice(&[0, 0]); // server_name
    ext.extend_from_slice(&((n.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
    ext.extend_from_slice(n);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(32);
    body.extend_from_slice(&[0x11; 32]);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A TLS application-data record of `len` pseudo-random bytes (looks encrypted).
pub fn app_data(len: usize, seed: &mut u64) -> Vec<u8> {
    let mut rec = vec![23, 3, 3];
    rec.extend_from_slice(&(len as u16).to_be_bytes());
    for _ in 0..len {
        // xorshift64*: cheap bytes with no visible structure.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        rec.push((seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8);
    }
    rec
}

/// Frames of the scenario, with timestamps in nanoseconds from `start_ns`.
pub fn scenario(phases: &[Phase], start_ns: u64) -> Vec<(u64, Vec<u8>)> {
    const SYN: u8 = 0x02;
    const PSH_ACK: u8 = 0x18;
    const ACK: u8 = 0x10;
    let mut frames = Vec::new();
    let mut t = start_ns;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let c2s = |l4: Vec<u8>, proto: u8| {
        ethernet(
            MAC_CLIENT,
            MAC_SERVER,
            0x0800,
            &ipv4(CLIENT, SERVER, proto, &l4),
        )
    };
    let s2c = |l4: Vec<u8>, proto: u8| {
        ethernet(
            MAC_SERVER,
            MAC_CLIENT,
            0x0800,
            &ipv4(SERVER, CLIENT, proto, &l4),
        )
    };
    for (n, phase) in phases.iter().enumerate() {
        let end = t + phase.duration().as_nanos() as u64;
        match phase {
            Phase::Quiet(_) => {
                while t < end {
                    frames.push((t, arp_request()));
                    t += 500_000_000;
                }
            }
            Phase::Banking(_) => {
                let (cp, sp) = (41_000 + n as u16, 443);
                let (mut cs, mut ss) = (1_000u32, 50_000u32);
                let rtt = 12_000_000u64;
                frames.push((t, c2s(tcp(cp, sp, cs, 0, SYN, &[]), 6)));
                frames.push((t + rtt, s2c(tcp(sp, cp, ss, cs + 1, 0x12, &[]), 6)));
                cs += 1;
                ss += 1;
                frames.push((t + rtt + 100_000, c2s(tcp(cp, sp, cs, ss, ACK, &[]), 6)));
                let hello = client_hello(BANK_SNI);
                frames.push((
                    t + rtt + 200_000,
                    c2s(tcp(cp, sp, cs, ss, PSH_ACK, &hello), 6),
                ));
                cs += hello.len() as u32;
                t += 2 * rtt;
                // Records every 20 ms: 1200 bytes down, 300 up (~600 kbit/s in all).
                while t < end {
                    let down = app_data(1_200, &mut seed);
                    frames.push((t, s2c(tcp(sp, cp, ss, cs, PSH_ACK, &down), 6)));
                    ss += down.len() as u32;
                    let up = app_data(300, &mut seed);
                    frames.push((t + rtt, c2s(tcp(cp, sp, cs, ss, PSH_ACK, &up), 6)));
                    cs += up.len() as u32;
                    t += 20_000_000;
                }
            }
            Phase::Gaming(_) => {
                let cp = 52_000 + n as u16;
                let mut tick = 0u32;
                while t < end {
                    let mut p = tick.to_be_bytes().to_vec();
                    p.resize(96, 0x42);
                    frames.push((t, c2s(udp(cp, GAME_PORT, &p), 17)));
                    p.resize(128, 0x24);
                    frames.push((t + 9_000_000, s2c(udp(GAME_PORT, cp, &p), 17)));
                    tick += 1;
                    t += 20_000_000;
                }
            }
        }
        t = t.max(end);
    }
    // Replies are stamped ahead of the next request within a phase; keep the file in time order.
    frames.sort_by_key(|f| f.0);
    frames
}

/// Classic pcap (little endian, microseconds, Ethernet).
pub fn write_pcap(frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for (ts, f) in frames {
        out.extend_from_slice(&((ts / 1_000_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((ts % 1_000_000_000 / 1000) as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = ipv4(CLIENT, SERVER, 17, &udp(1, 2, b"hello"));
        assert_eq!(csum(&p[..20]), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&CLIENT.octets());
        pseudo.extend_from_slice(&SERVER.octets());
        pseudo.extend_from_slice(&[0, 17, 0, 13]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(csum(&pseudo), 0, "UDP checksum");
    }

    #[test]
    fn the_scenario_is_paced_and_ordered() {
        let phases = [
            Phase::Quiet(Duration::from_secs(1)),
            Phase::Banking(Duration::from_secs(2)),
            Phase::Gaming(Duration::from_secs(2)),
            Phase::Quiet(Duration::from_secs(1)),
        ];
        let frames = scenario(&phases, 0);
        assert!(frames.windows(2).all(|w| w[0].0 <= w[1].0 + 20_000_000));
        let last = frames.last().unwrap().0;
        assert!((5_500_000_000..6_000_000_000).contains(&last), "{last}");
        let hello = client_hello(BANK_SNI);
        assert!(frames
            .iter()
            .any(|(_, f)| f.windows(hello.len()).any(|w| w == hello)));
        let pcap = write_pcap(&frames);
        assert_eq!(&pcap[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    }
}
