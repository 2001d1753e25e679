//! End-to-end tests of `shardline-agent monitor --pcap … --json`: generated
//! captures with exact ground truth (every class, IPv4/IPv6, VLAN and QinQ,
//! SLL/SLL2 in pcapng, truncated and garbage frames), asserted exactly
//! against the totals line the real binary prints.

mod monitor_support;

use monitor_support::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const T0: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;

/// A TCP session: handshake with the given SYN→SYN/ACK and SYN/ACK→ACK gaps,
/// then `data` (client payloads, each answered by a server ACK + reply).
#[allow(clippy::too_many_arguments)]
fn tcp_session(
    c: &mut Capture,
    t: &mut u64,
    link: Link,
    name: &str,
    syn_gap: u64,
    ack_gap: u64,
    first: &[u8],
    replies: usize,
) {
    let (cs, ss) = (1000u32, 5000u32);
    c.packet(*t, link, name, true, 0, |s, d| {
        tcp(s, d, cs, 0, SYN, None, &[])
    });
    *t += syn_gap;
    c.packet(*t, link, name, false, 0, |s, d| {
        tcp(s, d, ss, cs + 1, SYN | ACK, None, &[])
    });
    *t += ack_gap;
    c.packet(*t, link, name, true, 0, |s, d| {
        tcp(s, d, cs + 1, ss + 1, ACK, None, &[])
    });
    *t += MS;
    c.packet(*t, link, name, true, 0, |s, d| {
        tcp(s, d, cs + 1, ss + 1, ACK | PSH, None, first)
    });
    let mut sseq = ss + 1;
    let cack = cs + 1 + first.len() as u32;
    for i in 0..replies {
        *t += MS;
        let body = vec![b'r'; 100 + i * 10];
        c.packet(*t, link, name, false, 0, |s, d| {
            tcp(s, d, sseq, cack, ACK | PSH, None, &body)
        });
        sseq += body.len() as u32;
        *t += MS;
        c.packet(*t, link, name, true, 0, |s, d| {
            tcp(s, d, cack, sseq, ACK, None, &[])
        });
    }
}

/// The generated capture. `alt` switches some flows to SLL/SLL2 (pcapng only).
fn scenario(alt: bool) -> Capture {
    let mut c = Capture::default();
    let l = |eth: Link, other: Link| if alt { other } else { eth };
    let mut t = T0;

    // DNS answer: online.bank.example → 192.0.2.10; a later flow there is sensitive.
    c.flow("dns", "10.0.0.2:40000", "10.0.0.53:53", "udp", "dns");
    c.packet(t, Link::Eth, "dns", true, 0, |s, d| {
        udp(s, d, &dns_query(7, "online.bank.example"))
    });
    t += 2 * MS;
    let addrs = [
        "192.0.2.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    c.packet(t, Link::Eth, "dns", false, 0, |s, d| {
        udp(s, d, &dns_response(7, "online.bank.example", &addrs))
    });
    t += MS;

    // Sensitive by DNS name (no SNI); TCP timestamps refine the handshake RTT.
    c.flow(
        "bank-dns",
        "10.0.0.2:40001",
        "192.0.2.10:443",
        "tcp",
        "sensitive",
    );
    let n = "bank-dns";
    c.packet(t, Link::Eth, n, true, 0, |s, d| {
        tcp(s, d, 100, 0, SYN, Some((1, 0)), &[])
    });
    t += 20 * MS;
    c.packet(t, Link::Eth, n, false, 0, |s, d| {
        tcp(s, d, 900, 101, SYN | ACK, Some((50, 1)), &[])
    });
    t += 10 * MS;
    c.packet(t, Link::Eth, n, true, 0, |s, d| {
        tcp(s, d, 101, 901, ACK, Some((2, 50)), &[])
    });
    // Handshake RTT = 30 ms. Client data with TSval 10 (after the ACK's TSval 2), echoed 10 ms later.
    t += MS;
    c.packet(t, Link::Eth, n, true, 0, |s, d| {
        tcp(s, d, 101, 901, ACK | PSH, Some((10, 50)), b"hello bank")
    });
    t += 10 * MS;
    c.packet(t, Link::Eth, n, false, 0, |s, d| {
        tcp(s, d, 901, 111, ACK | PSH, Some((60, 10)), &[b'x'; 200])
    });
    // The server's TSval 60 is echoed 5 ms later (client half = 5 ms): sample 15 ms.
    t += 5 * MS;
    c.packet(t, Link::Eth, n, true, 0, |s, d| {
        tcp(s, d, 111, 1101, ACK, Some((11, 60)), &[])
    });
    t += MS;

    // Sensitive by TLS SNI, over a VLAN; handshake RTT 12 ms + 3 ms = 15 ms.
    c.flow(
        "bank-sni",
        "10.0.0.2:40002",
        "198.51.100.5:443",
        "tcp",
        "sensitive",
    );
    tcp_session(
        &mut c,
        &mut t,
        Link::Vlan(100),
        "bank-sni",
        12 * MS,
        3 * MS,
        &client_hello("www.bank.example"),
        3,
    );

    // Streaming by SNI, IPv6, stacked VLANs.
    c.flow(
        "video",
        "[2001:db8::2]:40003",
        "[2001:db8::6]:443",
        "tcp",
        "streaming",
    );
    tcp_session(
        &mut c,
        &mut t,
        Link::QinQ(10, 20),
        "video",
        2 * MS,
        MS,
        &client_hello("r3---sn.googlevideo.com"),
        8,
    );

    // Web by port (HTTP), SLL in pcapng.
    c.flow("web", "10.0.0.2:40004", "203.0.113.80:80", "tcp", "web");
    tcp_session(
        &mut c,
        &mut t,
        l(Link::Eth, Link::Sll),
        "web",
        MS,
        MS,
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        2,
    );

    // Interactive: ssh, SLL2 in pcapng.
    c.flow(
        "ssh",
        "10.0.0.2:40005",
        "203.0.113.22:22",
        "tcp",
        "interactive",
    );
    tcp_session(
        &mut c,
        &mut t,
        l(Link::Eth, Link::Sll2),
        "ssh",
        MS,
        MS,
        b"SSH-2.0-test\r\n",
        4,
    );

    // Bulk: rsync, with one retransmitted segment.
    c.flow("bulk", "10.0.0.2:40006", "203.0.113.73:873", "tcp", "bulk");
    tcp_session(&mut c, &mut t, Link::Eth, "bulk", MS, MS, &[b'b'; 1400], 0);
    t += MS;
    c.packet(t, Link::Eth, "bulk", true, 0, |s, d| {
        tcp(s, d, 1001, 5001, ACK | PSH, None, &[b'b'; 1400])
    });

    // Gaming by port, IPv6 over VLAN, DSCP EF.
    c.flow(
        "game",
        "[2001:db8::2]:50100",
        "[2001:db8::30]:3074",
        "udp",
        "gaming",
    );
    for i in 0..10 {
        t += 16 * MS;
        c.packet(t, Link::Vlan(7), "game", i % 2 == 0, 46, |s, d| {
            udp(s, d, &[i as u8; 40])
        });
    }

    // Calls: STUN by port.
    c.flow(
        "stun",
        "10.0.0.2:50200",
        "198.51.100.40:3478",
        "udp",
        "calls",
    );
    for i in 0..6 {
        t += 20 * MS;
        c.packet(t, Link::Eth, "stun", i % 2 == 0, 34, |s, d| {
            udp(s, d, &[0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42])
        });
    }

    // Calls by behaviour: symmetric ~50 pps, ~150-byte packets, unknown ports.
    c.flow(
        "voip",
        "10.0.0.2:41000",
        "198.51.100.41:42000",
        "udp",
        "calls",
    );
    for i in 0..60u64 {
        t += 10 * MS;
        c.packet(t, Link::Eth, "voip", i % 2 == 0, 46, |s, d| {
            udp(s, d, &[0x80; 120])
        });
    }

    // Gaming by behaviour: small packets at ~60 pps, unknown ports.
    c.flow(
        "game2",
        "10.0.0.2:41001",
        "198.51.100.42:42001",
        "udp",
        "gaming",
    );
    for i in 0..40u64 {
        t += 16 * MS;
        c.packet(t, Link::Eth, "game2", i % 3 != 2, 0, |s, d| {
            udp(s, d, &[1; 32])
        });
    }

    // Other: unknown UDP, too few packets for any behaviour; and ICMP echo.
    c.flow("misc", "10.0.0.2:5555", "10.0.0.9:6666", "udp", "other");
    for _ in 0..3 {
        t += MS;
        c.packet(t, Link::Eth, "misc", true, 0, |s, d| udp(s, d, &[9; 300]));
    }
    c.flow("ping", "10.0.0.2:77", "10.0.0.1:77", "icmp", "other");
    t += MS;
    c.packet(t, Link::Eth, "ping", true, 0, |_, _| {
        icmp_echo(true, 77, 1, &[0; 56])
    });
    t += MS;
    c.packet(t, Link::Eth, "ping", false, 0, |_, _| {
        icmp_echo(false, 77, 1, &[0; 56])
    });

    // Malformed: IPv4 header cut short, TCP header cut short, bad versions, IHL < 5.
    let good = ip(
        "10.0.0.2".parse().unwrap(),
        "10.0.0.3".parse().unwrap(),
        TCP,
        0,
        &tcp(1, 2, 0, 0, SYN, None, &[]),
    );
    t += MS;
    let mut f = frame(Link::Eth, 0x0800, &good);
    f.truncate(14 + 12);
    c.malformed_frame(t, Link::Eth, f);
    t += MS;
    let mut f = frame(Link::Eth, 0x0800, &good);
    f.truncate(14 + 20 + 10);
    c.malformed_frame(t, Link::Eth, f);
    t += MS;
    c.malformed_frame(t, Link::Eth, frame(Link::Eth, 0x0800, &[0x00; 40]));
    t += MS;
    c.malformed_frame(t, Link::Eth, frame(Link::Eth, 0x86dd, &[0xff; 60]));
    t += MS;
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x43;
    c.malformed_frame(t, Link::Eth, frame(Link::Eth, 0x0800, &bad_ihl));
    t += MS;
    c.malformed_frame(t, Link::Eth, vec![0xde, 0xad, 0xbe]);
    // Not IP: ARP (neither counted as a packet nor as malformed).
    t += MS;
    c.non_ip += 1;
    c.frames
        .push((t, Link::Eth, frame(Link::Eth, 0x0806, &[0; 28])));
    c
}

fn run_monitor(file: &Path, extra: &[&str]) -> (Vec<Value>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .arg("monitor")
        .arg("--pcap")
        .arg(file)
        .arg("--json")
        .args(extra)
        .output()
        .expect("run shardline-agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "monitor failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let totals = lines.pop().expect("a totals line");
    (lines, totals["totals"].clone())
}

fn assert_totals_exact(c: &Capture, t: &Value) {
    assert_eq!(t["packets"], c.total_packets(), "packets");
    assert_eq!(t["bytes"], c.total_bytes(), "bytes");
    assert_eq!(t["flows"], c.flows.len() as u64, "flows");
    assert_eq!(t["malformed"], c.malformed, "malformed");
    assert_eq!(t["non_ip"], c.non_ip, "non-IP");
    let mut want: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for f in c.flows.values() {
        let e = want.entry(f.class.to_string()).or_default();
        e.0 += f.packets;
        e.1 += f.bytes;
        e.2 += 1;
    }
    let got: BTreeMap<String, (u64, u64, u64)> = t["classes"]
        .as_object()
        .expect("classes object")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v["packets"].as_u64().unwrap(),
                    v["bytes"].as_u64().unwrap(),
                    v["flows"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, want, "per-class totals");
}

fn find_flow<'a>(t: &'a Value, f: &FlowTruth) -> &'a Value {
    t["top_flows"]
        .as_array()
        .expect("top_flows")
        .iter()
        .find(|v| v["src"] == f.client.to_string() && v["dst"] == f.server.to_string())
        .unwrap_or_else(|| panic!("flow {} → {} not listed", f.client, f.server))
}

#[test]
fn pcap_totals_match_ground_truth_exactly() {
    let c = scenario(false);
    let dir = std::env::temp_dir().join(format!("sl-monitor-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mix.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 65535)).unwrap();
    let (windows, t) = run_monitor(&file, &["--top", "50"]);
    assert_totals_exact(&c, &t);
    // Every flow listed with its exact counts, class and addresses (IPv6 in brackets).
    for (name, f) in &c.flows {
        let v = find_flow(&t, f);
        assert_eq!(v["packets"], f.packets, "{name} packets");
        assert_eq!(v["bytes"], f.bytes, "{name} bytes");
        assert_eq!(v["class"], f.class, "{name} class");
        assert_eq!(v["proto"], f.proto, "{name} proto");
    }
    let flows = &c.flows;
    assert_eq!(find_flow(&t, &flows["video"])["src"], "[2001:db8::2]:40003");
    assert_eq!(
        find_flow(&t, &flows["video"])["sni"],
        "r3---sn.googlevideo.com"
    );
    assert_eq!(find_flow(&t, &flows["bank-sni"])["sni"], "www.bank.example");
    assert_eq!(find_flow(&t, &flows["bank-dns"])["sni"], Value::Null);
    assert_eq!(
        find_flow(&t, &flows["bank-dns"])["dns_name"],
        "online.bank.example"
    );
    // RTT from the capture point: handshake, then refined by TS echoes (EWMA 7/8).
    assert_eq!(find_flow(&t, &flows["bank-sni"])["rtt_ms"], 15.0);
    // Samples: handshake 30 ms (20 + 10), the ACK's echo of the SYN/ACK TSval
    // 30 ms, the echo of TSval 10 gives 10 + 10 = 20 ms, the echo of TSval 60
    // 10 + 5 = 15 ms. Median of three, then EWMA 7/8 in integer microseconds:
    // 30, 30, median(20,30,30) = 30, median(15,20,30) = 20.
    // rtt_ms is the smallest sample, srtt_ms the smoothed value.
    let want = ((30_000 * 7 + 20_000) / 8) as f64 / 1000.0;
    assert_eq!(find_flow(&t, &flows["bank-dns"])["srtt_ms"], want);
    assert_eq!(find_flow(&t, &flows["bank-dns"])["rtt_ms"], 15.0);
    assert_eq!(find_flow(&t, &flows["stun"])["rtt_ms"], Value::Null);
    assert_eq!(find_flow(&t, &flows["bulk"])["retransmits"], 1);
    assert_eq!(find_flow(&t, &flows["ssh"])["retransmits"], 0);
    assert_eq!(find_flow(&t, &flows["game"])["dscp"], 46);
    // Jitter of a perfectly periodic flow is zero; of an irregular one not.
    assert_eq!(find_flow(&t, &flows["voip"])["jitter_ms"], 0.0);

    // Windows: 1 s each, their packets add up to the totals, and classes carry needs.
    assert!(
        windows.len() >= 2,
        "expected several windows, got {}",
        windows.len()
    );
    let wp: u64 = windows
        .iter()
        .map(|w| w["window"]["packets"].as_u64().unwrap())
        .sum();
    let wb: u64 = windows
        .iter()
        .map(|w| w["window"]["bytes"].as_u64().unwrap())
        .sum();
    let wm: u64 = windows
        .iter()
        .map(|w| w["window"]["malformed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        (wp, wb, wm),
        (c.total_packets(), c.total_bytes(), c.malformed)
    );
    let all_classes: Vec<&Value> = windows
        .iter()
        .flat_map(|w| w["window"]["classes"].as_array().unwrap())
        .collect();
    let sens = all_classes
        .iter()
        .find(|c| c["class"] == "sensitive")
        .expect("sensitive in a window");
    assert_eq!(sens["need"]["needs_encryption"], true);
    let calls = all_classes
        .iter()
        .find(|c| c["class"] == "calls")
        .expect("calls in a window");
    assert_eq!(calls["need"]["latency_sensitive"], true);
    assert!(all_classes
        .iter()
        .any(|c| c["class"] == "sensitive" && !c["rtt_p50_ms"].is_null()));

    // Default --top is 10, largest first.
    let (_, t10) = run_monitor(&file, &[]);
    let top = t10["top_flows"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    let bytes: Vec<u64> = top.iter().map(|f| f["bytes"].as_u64().unwrap()).collect();
    let mut sorted = bytes.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(bytes, sorted);
    let mut all: Vec<u64> = c.flows.values().map(|f| f.bytes).collect();
    all.sort_by(|a, b| b.cmp(a));
    assert_eq!(bytes, all[..10].to_vec());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pcapng_with_sll_and_sll2_matches_too() {
    let c = scenario(true);
    let dir = std::env::temp_dir().join(format!("sl-monitor-pcapng-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mix.pcapng");
    std::fs::write(&file, write_pcapng(&c.frames)).unwrap();
    let (_, t) = run_monitor(&file, &["--top", "50"]);
    assert_totals_exact(&c, &t);
    assert_eq!(t["read_error"], Value::Null);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snaplen_truncation_counts_ip_length() {
    // Headers captured, payload cut by a 96-byte snaplen: bytes come from the
    // IP length, so the totals are those of the full packets.
    let c = scenario(false);
    let dir = std::env::temp_dir().join(format!("sl-monitor-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snap.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 96)).unwrap();
    let (_, t) = run_monitor(&file, &[]);
    assert_eq!(t["packets"], c.total_packets());
    assert_eq!(t["bytes"], c.total_bytes());
    // SNI and DNS lie beyond 96 bytes here: those flows fall back to port classes.
    assert_eq!(t["malformed"], c.malformed);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_and_garbage_files_never_panic() {
    let c = scenario(false);
    let dir = std::env::temp_dir().join(format!("sl-monitor-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Cut in the middle of a record: totals of what was read, with the error named.
    let full = write_pcap(&c.frames, 65535);
    let cut = dir.join("cut.pcap");
    std::fs::write(&cut, &full[..full.len() / 2 + 7]).unwrap();
    let (_, t) = run_monitor(&cut, &[]);
    assert!(
        t["read_error"].as_str().unwrap_or("").contains("truncated"),
        "{t}"
    );
    assert!(t["packets"].as_u64().unwrap() > 0);
    // Random bytes after a valid header, many seeds: always a clean exit.
    let mut x: u64 = 0x9e37_79b9;
    for seed in 0..20 {
        let mut data = full[..24].to_vec();
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push(x as u8);
        }
        // Make some records plausible so the frame parsers see garbage too.
        if seed % 2 == 0 {
            data[24 + 8..24 + 12].copy_from_slice(&200u32.to_le_bytes());
        }
        let f = dir.join(format!("garbage{seed}.pcap"));
        std::fs::write(&f, &data).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
            .args(["monitor", "--json", "--pcap"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "seed {seed}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Not a capture file at all: an error naming the file, exit code 1, no panic.
    let f = dir.join("not-a-capture.txt");
    std::fs::write(&f, b"hello world, not a pcap").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .args(["monitor", "--pcap"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not-a-capture.txt") && err.contains("not a pcap"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_rules_extend_defaults_and_bad_rules_name_line_and_field() {
    let c = scenario(false);
    let dir = std::env::temp_dir().join(format!("sl-monitor-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mix.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 65535)).unwrap();
    let rules = dir.join("extra.toml");
    std::fs::write(
        &rules,
        "[[port]]\nclass = \"bulk\"\nproto = \"udp\"\nports = [6666]\n",
    )
    .unwrap();
    let (_, t) = run_monitor(&file, &["--top", "50", "--rules", rules.to_str().unwrap()]);
    assert_eq!(find_flow(&t, &c.flows["misc"])["class"], "bulk");
    assert_eq!(
        find_flow(&t, &c.flows["ssh"])["class"],
        "interactive",
        "defaults still apply"
    );
    std::fs::write(
        &rules,
        "# extra\n[[port]]\nclass = \"bulk\"\nproto = \"sctp\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .args(["monitor", "--pcap"])
        .arg(&file)
        .arg("--rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("extra.toml:4: field `proto`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn full_flow_table_evicts_oldest_and_counts_every_flow_once() {
    // max_flows = 4: every further flow evicts the least recently seen one.
    // Flows in the scenario are contiguous in time, so each is created once
    // and the per-class totals still add up exactly (evicted flows are
    // accounted when they leave the table).
    let c = scenario(false);
    let dir = std::env::temp_dir().join(format!("sl-monitor-evict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mix.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 65535)).unwrap();
    let cfg = dir.join("monitor.toml");
    std::fs::write(&cfg, "window_ms = 500\nmax_flows = 4\n").unwrap();
    let (windows, t) = run_monitor(&file, &["--config", cfg.to_str().unwrap(), "--top", "50"]);
    assert_totals_exact(&c, &t);
    assert_eq!(t["evicted"], c.flows.len() as u64 - 4, "overflow counter");
    for (i, w) in windows.iter().enumerate() {
        assert!(w["window"]["flows_in_table"].as_u64().unwrap() <= 4);
        // The last window is the partial one closed at the end of the file.
        if i + 1 < windows.len() {
            assert_eq!(w["window"]["duration_ms"], 500);
        } else {
            assert!(w["window"]["duration_ms"].as_u64().unwrap() <= 500);
        }
    }
    // The evicted flows are still listed in the totals with their counts.
    for f in c.flows.values() {
        assert_eq!(find_flow(&t, f)["bytes"], f.bytes);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A few flows of every kind (TCP with options over IPv4, UDP over IPv6,
/// ICMP) framed with `link`.
fn small_mix(link: Link) -> Capture {
    let mut c = Capture::default();
    let mut t = T0;
    c.flow("web", "10.0.0.2:40000", "192.0.2.10:443", "tcp", "web");
    c.flow(
        "dns6",
        "[2001:db8::2]:5353",
        "[2001:db8::53]:53",
        "udp",
        "dns",
    );
    c.flow(
        "game",
        "10.0.0.2:50000",
        "198.51.100.7:27015",
        "udp",
        "gaming",
    );
    for i in 0..6u32 {
        let up = i % 2 == 0;
        c.packet(t, link, "web", up, 0, |s, d| {
            tcp(s, d, 1000 + i, 2000 + i, ACK, Some((i, i)), &[b'w'; 300])
        });
        c.packet(t, link, "dns6", up, 0, |s, d| udp(s, d, &[0x35; 40]));
        c.packet(t, link, "game", up, 46, |s, d| udp(s, d, &[7; 90]));
        t += 20 * MS;
    }
    c
}

fn run_on_pcap(name: &str, bytes: Vec<u8>) -> Value {
    let dir = std::env::temp_dir().join(format!("sl-monitor-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.pcap"));
    std::fs::write(&file, bytes).unwrap();
    let (_, t) = run_monitor(&file, &["--top", "50"]);
    let _ = std::fs::remove_dir_all(&dir);
    t
}

fn assert_flows_exact(c: &Capture, t: &Value, what: &str) {
    assert_eq!(t["packets"], c.total_packets(), "{what}: packets");
    assert_eq!(t["bytes"], c.total_bytes(), "{what}: bytes");
    assert_eq!(t["flows"], c.flows.len() as u64, "{what}: flows");
    assert_eq!(t["malformed"], 0, "{what}: malformed");
    assert_eq!(t["non_ip"], 0, "{what}: non-IP");
    assert_eq!(t["unsupported_link"], 0, "{what}: unsupported link");
    for (name, f) in &c.flows {
        let v = find_flow(t, f);
        assert_eq!(v["packets"], f.packets, "{what}: {name} packets");
        assert_eq!(v["bytes"], f.bytes, "{what}: {name} bytes");
        assert_eq!(v["proto"], f.proto, "{what}: {name} proto");
    }
}

#[test]
fn ppp_pppoe_hdlc_wifi_ppi_fabricpath_and_mpls_count_exactly() {
    // Link types real captures come in that the monitor used to drop
    // silently (PPP, Cisco HDLC, PPI) or count as non-IP (PPPoE,
    // FabricPath), each with TCP/IPv4, UDP/IPv6 and DSCP-marked UDP.
    for link in [
        Link::Ppp,
        Link::PppCompressed,
        Link::Pppoe,
        Link::CiscoHdlc,
        Link::Wifi,
        Link::Radiotap,
        Link::Ppi,
        Link::FabricPath,
        Link::Mpls,
    ] {
        let c = small_mix(link);
        let t = run_on_pcap("links", write_pcap(&c.frames, 65535));
        assert_flows_exact(&c, &t, &format!("{link:?}"));
        assert_eq!(find_flow(&t, &c.flows["game"])["dscp"], 46, "{link:?}");
    }
}

#[test]
fn a_file_of_an_unreadable_link_type_fails_loudly() {
    // LINKTYPE_USB_LINUX (189): nothing the monitor can read. It must say
    // so on stderr and exit non-zero, not print empty totals and exit 0.
    let mut bytes = write_pcap(&small_mix(Link::Eth).frames, 65535);
    bytes[20..24].copy_from_slice(&189u32.to_le_bytes());
    let dir = std::env::temp_dir().join(format!("sl-monitor-usb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("usb.pcap");
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .args(["monitor", "--json", "--pcap"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 on a file it cannot read");
    assert!(
        stderr.contains("18 frames of unsupported link types skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("none of its 18 frames"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_64_byte_snapshot_length_keeps_every_packet_and_byte() {
    // 64 bytes hold Ethernet + IPv4 + the first 30 bytes of TCP: the TCP
    // options (and for IPv6, the UDP header's second half) are cut. Every
    // packet still counts in its flow with its IP length.
    for snaplen in [64, 58] {
        let c = small_mix(Link::Eth);
        let t = run_on_pcap("snap64", write_pcap(&c.frames, snaplen));
        assert_flows_exact(&c, &t, &format!("snaplen {snaplen}"));
    }
    // The whole scenario too (VLAN tags, IPv6 behind two tags, whose TCP
    // ports fall beyond 64 bytes: it still counts, as a flow of its
    // addresses); its malformed frames stay malformed.
    let c = scenario(false);
    let t = run_on_pcap("snap64-mix", write_pcap(&c.frames, 64));
    assert_eq!(t["packets"], c.total_packets());
    assert_eq!(t["bytes"], c.total_bytes());
    assert_eq!(t["flows"], c.flows.len() as u64);
    assert_eq!(t["malformed"], c.malformed);
}

/// Fragments of one UDP datagram of `payload` bytes, `mtu`-sized IP packets.
fn ipv4_fragments(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    id: u16,
    udp_datagram: &[u8],
    per_fragment: usize,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = udp_datagram.chunks(per_fragment).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut p = ip(src.into(), dst.into(), UDP, 0, chunk);
        let offset = (i * per_fragment / 8) as u16;
        let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6..8].copy_from_slice(&(offset | more).to_be_bytes());
        out.push(p);
    }
    out
}

fn ipv6_fragments(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    id: u32,
    udp_datagram: &[u8],
    per_fragment: usize,
) -> Vec<Vec<u8>> {
    const FRAGMENT_HEADER: u8 = 44;
    let chunks: Vec<&[u8]> = udp_datagram.chunks(per_fragment).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let offset = (i * per_fragment) as u16;
        let more = u16::from(i + 1 < chunks.len());
        let mut l = vec![UDP, 0];
        l.extend_from_slice(&(offset | more).to_be_bytes());
        l.extend_from_slice(&id.to_be_bytes());
        l.extend_from_slice(chunk);
        out.push(ip(src.into(), dst.into(), FRAGMENT_HEADER, 0, &l));
    }
    out
}

#[test]
fn later_fragments_count_in_the_flow_of_their_first() {
    // A large UDP datagram in three IPv4 fragments and one in three IPv6
    // fragments: each belongs to one UDP flow with its ports, not to a
    // port-0 flow of its own.
    let mut c = Capture::default();
    c.flow("v4", "10.0.0.2:40000", "10.0.0.9:4000", "udp", "other");
    c.flow(
        "v6",
        "[2001:db8::2]:40001",
        "[2001:db8::9]:4001",
        "udp",
        "other",
    );
    let mut t = T0;
    let v4 = ipv4_fragments(
        "10.0.0.2".parse().unwrap(),
        "10.0.0.9".parse().unwrap(),
        0x4242,
        &udp(40000, 4000, &[3; 3000]),
        1480,
    );
    let v6 = ipv6_fragments(
        "2001:db8::2".parse().unwrap(),
        "2001:db8::9".parse().unwrap(),
        0x0102_0304,
        &udp(40001, 4001, &[4; 3000]),
        1448,
    );
    for (name, packets) in [("v4", v4), ("v6", v6)] {
        for p in packets {
            let f = c.flows.get_mut(name).unwrap();
            f.packets += 1;
            f.bytes += p.len() as u64;
            c.frames
                .push((t, Link::Eth, frame(Link::Eth, ethertype_of(&p), &p)));
            t += MS;
        }
    }
    let t = run_on_pcap("frag", write_pcap(&c.frames, 65535));
    assert_eq!(t["flows"], 2, "one flow per datagram, no port-0 flows: {t}");
    for (name, f) in &c.flows {
        let v = find_flow(&t, f);
        assert_eq!(v["packets"], 3, "{name}");
        assert_eq!(v["bytes"], f.bytes, "{name}");
        assert_eq!(v["proto"], "udp", "{name}");
    }
}

/// Bytes per class summed over every window the monitor printed.
fn window_class_bytes(windows: &[Value]) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for w in windows {
        for c in w["window"]["classes"].as_array().into_iter().flatten() {
            *sums
                .entry(c["class"].as_str().unwrap().to_owned())
                .or_default() += c["bytes"].as_u64().unwrap();
        }
    }
    sums
}

#[test]
fn classes_do_not_depend_on_the_window_length() {
    // A call on ports no rule names (50 packets/s each way, 20 ms audio
    // frames) and a game (64 small packets/s up, 30 larger down). Behaviour
    // rules used to run on in-progress flows at each window close, the
    // first match sticking: with short windows the call was caught with
    // 30-49 packets and became gaming for good.
    let mut c = Capture::default();
    c.flow(
        "call",
        "10.0.0.2:41000",
        "198.51.100.9:42000",
        "udp",
        "calls",
    );
    c.flow(
        "game",
        "10.0.0.2:41001",
        "203.0.113.4:40500",
        "udp",
        "gaming",
    );
    let start = T0;
    for i in 0..1000u64 {
        let t = start + i * 20 * MS;
        c.packet(t, Link::Eth, "call", true, 46, |s, d| udp(s, d, &[1; 160]));
        c.packet(t + 3 * MS, Link::Eth, "call", false, 46, |s, d| {
            udp(s, d, &[2; 160])
        });
    }
    for i in 0..1250u64 {
        let t = start + i * 15_625_000;
        c.packet(t + MS, Link::Eth, "game", true, 0, |s, d| {
            udp(s, d, &[3; 60])
        });
        if i % 2 == 0 {
            c.packet(t + 2 * MS, Link::Eth, "game", false, 0, |s, d| {
                udp(s, d, &[4; 140])
            });
        }
    }
    c.frames.sort_by_key(|f| f.0);
    let dir = std::env::temp_dir().join(format!("sl-monitor-win-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("win.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 65535)).unwrap();
    let mut seen = Vec::new();
    for window_ms in ["100", "350", "1000", "7000"] {
        let (windows, t) = run_monitor(&file, &["--window-ms", window_ms, "--top", "10"]);
        let sums = window_class_bytes(&windows);
        let call = find_flow(&t, &c.flows["call"]);
        let game = find_flow(&t, &c.flows["game"]);
        assert_eq!(call["class"], "calls", "window {window_ms} ms: {call}");
        assert_eq!(game["class"], "gaming", "window {window_ms} ms: {game}");
        // Reported per window (what the agent sends), the call is
        // overwhelmingly calls and the game gaming, at every window length.
        let (calls, gaming) = (sums["calls"], sums["gaming"]);
        assert!(
            calls * 10 > c.flows["call"].bytes * 9,
            "window {window_ms} ms: calls {calls} of {}: {sums:?}",
            c.flows["call"].bytes
        );
        assert!(
            gaming * 10 > c.flows["game"].bytes * 9,
            "window {window_ms} ms: gaming {gaming}: {sums:?}"
        );
        seen.push((window_ms, sums));
    }
    for pair in seen.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].1,
            "bytes per class differ between {} ms and {} ms windows",
            pair[0].0, pair[1].0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
