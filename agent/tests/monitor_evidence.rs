//! Classification from payload evidence and the behaviour rules that need
//! more than ports: STUN and the media that follows it on the same local
//! port, RTP both ways and one way, BitTorrent's DHT node and its uTP peers,
//! SSH off its port and file transfers over SSH, a call service's names for
//! UDP only, and streaming told from a download by its pauses. Each case is
//! a generated capture fed to the sans-IO pipeline with its expected class
//! per flow.

mod monitor_support;

use monitor_support::*;
use shardline_agent::monitor::{LinkType, MonitorConfig, Pipeline, Timestamp};
use std::net::SocketAddr;

const T0: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;

/// Run the capture through the pipeline: the class of each named flow at the end.
fn classes(c: &Capture) -> Vec<(String, String)> {
    let mut frames = c.frames.clone();
    frames.sort_by_key(|f| f.0);
    let cfg = MonitorConfig {
        top_flows: 1000,
        ..MonitorConfig::default()
    };
    let mut p = Pipeline::new(cfg);
    for (ts, _, frame) in &frames {
        p.poll_window(Timestamp::from_nanos(*ts));
        p.handle_frame(Timestamp::from_nanos(*ts), LinkType::Ethernet, frame);
    }
    let totals = p.totals();
    c.flows
        .iter()
        .map(|(name, truth)| {
            let f = totals
                .top_flows
                .iter()
                .find(|f| {
                    (f.src, f.dst) == (truth.client, truth.server)
                        || (f.dst, f.src) == (truth.client, truth.server)
                })
                .unwrap_or_else(|| panic!("flow {name} not in the totals"));
            (name.clone(), f.class.as_str().to_string())
        })
        .collect()
}

fn assert_classes(c: &Capture) {
    let got = classes(c);
    for (name, class) in &got {
        assert_eq!(
            class, c.flows[name].class,
            "flow {name}: got {class}, expected {}; all: {got:?}",
            c.flows[name].class
        );
    }
}

fn stun_message(kind: u16, txid: u8) -> Vec<u8> {
    let mut m = kind.to_be_bytes().to_vec();
    m.extend_from_slice(&12u16.to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[txid; 12]);
    // XOR-MAPPED-ADDRESS, IPv4.
    m.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0x11, 0x22]);
    m.extend_from_slice(&[0x2b, 0x12, 0xa4, 0x43]);
    m
}

fn rtp(pt: u8, seq: u16, ssrc: u32, len: usize) -> Vec<u8> {
    let mut p = vec![0x80, pt];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 960).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    // Encrypted media looks like noise.
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(37) ^ (seq as u8)));
    p
}

/// Opaque datagrams both ways at `pps` for `secs`, sizes `up`/`down`.
#[allow(clippy::too_many_arguments)]
fn opaque_udp(c: &mut Capture, name: &str, t0: u64, secs: u64, pps: u64, up: usize, down: usize) {
    let gap = 1_000_000_000 / pps;
    for i in 0..secs * pps {
        let t = t0 + i * gap;
        let body: Vec<u8> = (0..up).map(|j| (i as u8) ^ (j as u8) ^ 0x5a).collect();
        c.packet(t, Link::Eth, name, true, 0, |s, d| udp(s, d, &body));
        let body: Vec<u8> = (0..down).map(|j| (i as u8) ^ (j as u8) ^ 0xa5).collect();
        c.packet(t + 4 * MS, Link::Eth, name, false, 0, |s, d| {
            udp(s, d, &body)
        });
    }
}

#[test]
fn media_after_a_stun_binding_on_the_same_local_port_is_a_call() {
    let mut c = Capture::default();
    // Binding to a STUN server on a port no rule names, then opaque media
    // (not RTP, like some messengers' own protocols) from the same local
    // port to the peer's relay, also on an unnamed port, and at a rate and
    // sizes that no behaviour rule would call a call (asymmetric video).
    c.flow(
        "stun",
        "10.0.0.2:51000",
        "198.51.100.1:40003",
        "udp",
        "calls",
    );
    c.flow(
        "media",
        "10.0.0.2:51000",
        "203.0.113.50:45395",
        "udp",
        "calls",
    );
    // Another application's flow from another port stays out of it.
    c.flow(
        "other",
        "10.0.0.2:51001",
        "203.0.113.50:45395",
        "udp",
        "other",
    );
    c.packet(T0, Link::Eth, "stun", true, 0, |s, d| {
        udp(s, d, &stun_message(0x0001, 1))
    });
    c.packet(T0 + 30 * MS, Link::Eth, "stun", false, 0, |s, d| {
        udp(s, d, &stun_message(0x0101, 1))
    });
    opaque_udp(&mut c, "media", T0 + 50 * MS, 10, 60, 1100, 120);
    c.packet(T0 + 60 * MS, Link::Eth, "other", true, 0, |s, d| {
        udp(s, d, &[9; 40])
    });
    assert_classes(&c);
}

#[test]
fn rtp_both_ways_is_a_call_and_one_way_rtp_is_a_stream() {
    let mut c = Capture::default();
    c.flow(
        "call",
        "10.0.0.2:40100",
        "203.0.113.7:41234",
        "udp",
        "calls",
    );
    c.flow(
        "camera",
        "10.0.0.3:40200",
        "10.0.0.9:41500",
        "udp",
        "streaming",
    );
    for i in 0..500u16 {
        let t = T0 + u64::from(i) * 20 * MS;
        c.packet(t, Link::Eth, "call", true, 0, |s, d| {
            udp(s, d, &rtp(111, 1000 + i, 0x1111, 120))
        });
        c.packet(t + 7 * MS, Link::Eth, "call", false, 0, |s, d| {
            udp(s, d, &rtp(111, 9000 + i, 0x2222, 120))
        });
        // A camera: RTP video one way, an RTCP receiver report back every 5 s.
        c.packet(t + 3 * MS, Link::Eth, "camera", false, 0, |s, d| {
            udp(s, d, &rtp(96, 20 + i, 0x3333, 1200))
        });
        if i % 250 == 0 {
            let mut rr = vec![0x81, 201, 0x00, 0x07];
            rr.resize(32, 0);
            c.packet(t + 5 * MS, Link::Eth, "camera", true, 0, |s, d| {
                udp(s, d, &rr)
            });
        }
    }
    assert_classes(&c);
}

#[test]
fn a_dht_node_and_its_utp_peers_and_a_peer_wire_handshake_are_bulk() {
    let mut c = Capture::default();
    c.flow(
        "dht",
        "10.0.0.2:51413",
        "198.51.100.20:36001",
        "udp",
        "bulk",
    );
    c.flow("utp", "10.0.0.2:51413", "203.0.113.33:48555", "udp", "bulk");
    c.flow(
        "peer",
        "10.0.0.2:45002",
        "203.0.113.34:33333",
        "tcp",
        "bulk",
    );
    c.packet(T0, Link::Eth, "dht", true, 0, |s, d| {
        udp(
            s,
            d,
            b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz123456e1:q9:get_peers1:t2:aa1:y1:qe",
        )
    });
    c.packet(T0 + 80 * MS, Link::Eth, "dht", false, 0, |s, d| {
        udp(
            s,
            d,
            b"d1:rd2:id20:0123456789abcdefghij5:token8:aoeusnthe1:t2:aa1:y1:re",
        )
    });
    // uTP data: opaque to the classifier, 1400-byte datagrams down.
    for i in 0..400u64 {
        let t = T0 + 200 * MS + i * 2 * MS;
        c.packet(t, Link::Eth, "utp", false, 0, |s, d| {
            udp(s, d, &[0x01; 1400])
        });
        if i % 4 == 0 {
            c.packet(t + MS, Link::Eth, "utp", true, 0, |s, d| {
                udp(s, d, &[0x21; 20])
            });
        }
    }
    let mut t = T0 + 100 * MS;
    c.packet(t, Link::Eth, "peer", true, 0, |s, d| {
        tcp(s, d, 1, 0, SYN, None, &[])
    });
    t += MS;
    c.packet(t, Link::Eth, "peer", false, 0, |s, d| {
        tcp(s, d, 100, 2, SYN | ACK, None, &[])
    });
    t += MS;
    let mut hs = b"\x13BitTorrent protocol".to_vec();
    hs.extend_from_slice(&[0; 8]);
    hs.extend_from_slice(&[7; 40]);
    c.packet(t, Link::Eth, "peer", true, 0, |s, d| {
        tcp(s, d, 2, 101, ACK | PSH, None, &hs)
    });
    assert_classes(&c);
}

/// A TCP connection: handshake, then `segments` server → client segments of
/// `size` bytes, `gap` apart, with a pause of `pause` after every
/// `burst` segments, the client ACKing every other one.
#[allow(clippy::too_many_arguments)]
fn tcp_download(
    c: &mut Capture,
    name: &str,
    t0: u64,
    first: &[u8],
    segments: u32,
    size: usize,
    gap: u64,
    burst: u32,
    pause: u64,
) {
    let mut t = t0;
    c.packet(t, Link::Eth, name, true, 0, |s, d| {
        tcp(s, d, 1, 0, SYN, None, &[])
    });
    t += 10 * MS;
    c.packet(t, Link::Eth, name, false, 0, |s, d| {
        tcp(s, d, 100, 2, SYN | ACK, None, &[])
    });
    t += 10 * MS;
    c.packet(t, Link::Eth, name, true, 0, |s, d| {
        tcp(s, d, 2, 101, ACK | PSH, None, first)
    });
    let cseq = 2 + first.len() as u32;
    let mut sseq = 101u32;
    let body = vec![0x42; size];
    for i in 0..segments {
        t += gap;
        if i > 0 && i % burst == 0 {
            t += pause;
        }
        c.packet(t, Link::Eth, name, false, 0, |s, d| {
            tcp(s, d, sseq, cseq, ACK, None, &body)
        });
        sseq = sseq.wrapping_add(size as u32);
        if i % 2 == 1 {
            c.packet(t + MS / 2, Link::Eth, name, true, 0, |s, d| {
                tcp(s, d, cseq, sseq, ACK, None, &[])
            });
        }
    }
}

#[test]
fn ssh_off_its_port_is_interactive_and_a_copy_over_ssh_is_bulk() {
    let mut c = Capture::default();
    c.flow(
        "ssh2222",
        "10.0.0.2:40500",
        "203.0.113.60:2222",
        "tcp",
        "interactive",
    );
    c.flow("scp", "10.0.0.2:40501", "203.0.113.60:22", "tcp", "bulk");
    let banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n";
    // Someone typing: small segments, a few a second, with thinking pauses.
    tcp_download(
        &mut c,
        "ssh2222",
        T0,
        banner,
        300,
        90,
        120 * MS,
        20,
        3000 * MS,
    );
    // scp of 20 MB down, without a pause.
    tcp_download(
        &mut c,
        "scp",
        T0,
        banner,
        14_000,
        1448,
        MS / 2,
        1_000_000,
        0,
    );
    assert_classes(&c);
}

#[test]
fn a_player_pauses_between_segments_and_a_download_does_not() {
    let mut c = Capture::default();
    // Neither name is known to any rule: only the shape tells them apart.
    c.flow(
        "player",
        "10.0.0.2:41000",
        "203.0.113.80:443",
        "tcp",
        "streaming",
    );
    c.flow(
        "download",
        "10.0.0.2:41001",
        "203.0.113.81:443",
        "tcp",
        "bulk",
    );
    let hello = b"\x16\x03\x01 not a parsable hello";
    // 2 MB segments every 6 s: 1400 segments of 1448 B, bursts of 1400 at
    // line rate then 5 s of quiet.
    tcp_download(
        &mut c,
        "player",
        T0,
        hello,
        8000,
        1448,
        MS / 4,
        1400,
        5000 * MS,
    );
    tcp_download(
        &mut c,
        "download",
        T0,
        hello,
        14_000,
        1448,
        MS / 4,
        1_000_000,
        0,
    );
    assert_classes(&c);
}

#[test]
fn a_call_services_names_hold_for_its_media_only() {
    let mut c = Capture::default();
    // DNS answers name both servers under whatsapp.net.
    c.flow("dns", "10.0.0.2:40000", "10.0.0.53:53", "udp", "dns");
    let media: std::net::IpAddr = "157.240.1.60".parse().unwrap();
    let files: std::net::IpAddr = "157.240.1.61".parse().unwrap();
    c.packet(T0, Link::Eth, "dns", true, 0, |s, d| {
        udp(s, d, &dns_query(1, "g.whatsapp.net"))
    });
    c.packet(T0 + MS, Link::Eth, "dns", false, 0, |s, d| {
        udp(s, d, &dns_response(1, "g.whatsapp.net", &[media]))
    });
    c.packet(T0 + 2 * MS, Link::Eth, "dns", true, 0, |s, d| {
        udp(s, d, &dns_query(2, "mmg.whatsapp.net"))
    });
    c.packet(T0 + 3 * MS, Link::Eth, "dns", false, 0, |s, d| {
        udp(s, d, &dns_response(2, "mmg.whatsapp.net", &[files]))
    });
    let call: SocketAddr = SocketAddr::new(media, 45000);
    let download: SocketAddr = SocketAddr::new(files, 443);
    c.flow("call", "10.0.0.2:50000", &call.to_string(), "udp", "calls");
    c.flow(
        "file",
        "10.0.0.2:50001",
        &download.to_string(),
        "tcp",
        "bulk",
    );
    opaque_udp(&mut c, "call", T0 + 10 * MS, 5, 50, 160, 160);
    tcp_download(
        &mut c,
        "file",
        T0 + 10 * MS,
        b"GET",
        14_000,
        1448,
        MS / 4,
        1_000_000,
        0,
    );
    assert_classes(&c);
}
