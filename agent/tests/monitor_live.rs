//! Live capture test: three network namespaces, A ─veth─ M ─veth─ B. M runs a
//! user-space layer-2 relay (pnet) that holds every frame going from A to B
//! for `DELAY`, so the round trip seen from A is `DELAY` plus forwarding
//! noise. The real `shardline-agent monitor --iface va --json` captures in A
//! while real TCP (ping-pong) and UDP traffic runs from A to B; it is stopped
//! with SIGINT (as Ctrl-C) and its totals must match the interface counters
//! and what was sent within 1 %, its RTT the injected delay within 10 %.
//!
//! Needs root (network namespaces, AF_PACKET); otherwise it prints why it
//! skips. Namespaces are named `sl-mon-<pid>-{a,m,b}` and always removed.

mod netns_support;
use netns_support::{enter, sh, Netns};
use pnet::datalink::{self, Channel, DataLinkReceiver, DataLinkSender};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const DELAY: Duration = Duration::from_millis(50);
const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";
const UDP_COUNT: u64 = 3000;
const UDP_PAYLOAD: usize = 1000;
const ROUNDS: usize = 40;
const MSG: usize = 1000;

fn setup() -> Result<(Netns, [String; 3]), String> {
    let pid = std::process::id();
    let ns = [
        format!("sl-mon-{pid}-a"),
        format!("sl-mon-{pid}-m"),
        format!("sl-mon-{pid}-b"),
    ];
    let mut guard = Netns(Vec::new());
    for n in &ns {
        sh(&["ip", "netns", "add", n])?;
        guard.0.push(n.clone());
    }
    let [a, m, b] = &ns;
    sh(&[
        "ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "ma", "netns", m,
    ])?;
    sh(&[
        "ip", "link", "add", "vb", "netns", b, "type", "veth", "peer", "name", "mb", "netns", m,
    ])?;
    // One MTU-sized frame per skb, so the relay can send every frame it reads.
    for (n, dev) in [(a, "va"), (b, "vb")] {
        sh(&[
            "ip",
            "-n",
            n,
            "link",
            "set",
            "dev",
            dev,
            "gso_max_segs",
            "1",
            "gso_max_size",
            "1500",
        ])?;
    }
    sh(&[
        "ip",
        "-n",
        a,
        "addr",
        "add",
        &format!("{A_IP}/24"),
        "dev",
        "va",
    ])?;
    sh(&[
        "ip",
        "-n",
        b,
        "addr",
        "add",
        &format!("{B_IP}/24"),
        "dev",
        "vb",
    ])?;
    for (n, dev) in [
        (a, "va"),
        (m, "ma"),
        (m, "mb"),
        (b, "vb"),
        (a, "lo"),
        (b, "lo"),
    ] {
        // `dev` is spelled out: `ip link set ma …` would parse `ma` as `master`.
        sh(&["ip", "-n", n, "link", "set", "dev", dev, "up"])?;
    }
    Ok((guard, ns))
}

fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns).expect("setns");
        f()
    })
}

/// Recompute IPv4 TCP/UDP checksums: frames read from a veth carry partial
/// (offloaded) checksums that the receiving stack would reject.
fn fix_checksum(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [8, 0] {
        return;
    }
    let ihl = usize::from(f[14] & 15) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let proto = f[23];
    let (l4, end) = (14 + ihl, (14 + total).min(f.len()));
    let at = match proto {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if l4 + at + 2 > end {
        return;
    }
    f[l4 + at] = 0;
    f[l4 + at + 1] = 0;
    let mut sum: u32 = 0;
    for c in f[26..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    sum += u32::from(proto) + (end - l4) as u32;
    for c in f[l4..end].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    f[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
}

struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open(dev: &str) -> (Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>) {
    let ni = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == dev)
        .expect("relay interface");
    let cfg = datalink::Config {
        read_timeout: Some(Duration::from_millis(20)),
        read_buffer_size: 65536,
        write_buffer_size: 65536,
        promiscuous: false,
        ..datalink::Config::default()
    };
    match datalink::channel(&ni, cfg) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        _ => panic!("pnet channel on {dev}"),
    }
}

/// A layer-2 relay in `ns` between `ma` and `mb`; frames from `ma` to `mb` are held for `delay`.
fn relay(ns: &str, delay: Duration) -> Relay {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let s = stop.clone();
    let main = in_ns(ns, move || {
        let (tx_a, rx_a) = open("ma");
        let (tx_b, rx_b) = open("mb");
        let mut threads = Vec::new();
        for (mut rx, mut tx, hold) in [(rx_a, tx_b, delay), (rx_b, tx_a, Duration::ZERO)] {
            if hold.is_zero() {
                // Undelayed direction: forward from the reading thread, no hand-off.
                let stop = s.clone();
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(f) = rx.next() {
                            let mut f = f.to_vec();
                            fix_checksum(&mut f);
                            let _ = tx.send_to(&f, None);
                        }
                    }
                }));
                continue;
            }
            let (q_tx, q_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let stop = s.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(f) = rx.next() {
                        let _ = q_tx.send((Instant::now() + hold, f.to_vec()));
                    }
                }
            }));
            let stop = s.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((due, mut f)) = q_rx.recv_timeout(Duration::from_millis(20)) else {
                        continue;
                    };
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    fix_checksum(&mut f);
                    let _ = tx.send_to(&f, None);
                }
            }));
        }
        let _ = ready_tx.send(());
        for t in threads {
            let _ = t.join();
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("relay started");
    Relay {
        stop,
        threads: vec![main],
    }
}

/// (rx_packets, tx_packets, rx_bytes, tx_bytes) of `dev` in `ns`.
fn counters(ns: &str, dev: &str) -> [u64; 4] {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip -s");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let s = &v[0]["stats64"];
    [
        &s["rx"]["packets"],
        &s["tx"]["packets"],
        &s["rx"]["bytes"],
        &s["tx"]["bytes"],
    ]
    .map(|x| x.as_u64().unwrap_or(0))
}

fn within(got: f64, want: f64, frac: f64) -> bool {
    (got - want).abs() <= want * frac
}

#[test]
fn live_capture_between_namespaces_counts_and_rtt() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP live_capture_between_namespaces_counts_and_rtt: needs root (network namespaces, AF_PACKET)");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        println!(
            "SKIP live_capture_between_namespaces_counts_and_rtt: `ip` (iproute2) is not installed"
        );
        return;
    }
    let (_ns_guard, [a, m, b]) = setup().expect("namespaces");
    let _relay = relay(&m, DELAY);

    // Servers in B: a TCP echo (ping-pong) and a UDP sink.
    let stop = Arc::new(AtomicBool::new(false));
    let (srv_ready_tx, srv_ready_rx) = mpsc::channel();
    let st = stop.clone();
    let servers = in_ns(&b, move || {
        let l = TcpListener::bind((B_IP, 5001)).expect("tcp bind");
        let u = UdpSocket::bind((B_IP, 5002)).expect("udp bind");
        u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let _ = srv_ready_tx.send(());
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) {
                if u.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        });
        let (mut c, _) = l.accept().expect("accept");
        c.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; MSG];
        while c.read_exact(&mut buf).is_ok() {
            c.write_all(&buf).expect("echo");
        }
        udp.join().unwrap_or(0)
    });
    srv_ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("servers up");

    // Resolve ARP first: datagrams sent while the (delayed) ARP exchange is
    // pending would be dropped by the neighbour queue before reaching va.
    in_ns(&a, || {
        let u = UdpSocket::bind((A_IP, 0)).expect("udp warm-up");
        u.send_to(b"warm-up", (B_IP, 5002)).expect("warm-up send");
        std::thread::sleep(DELAY * 4);
    })
    .join()
    .expect("warm-up");

    // The monitor in A, the real binary.
    let mut mon = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            env!("CARGO_BIN_EXE_shardline-agent"),
            "monitor",
            "--iface",
            "va",
            "--json",
            "--top",
            "5",
        ])
        .args(["--duration", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monitor");
    let mut err = BufReader::new(mon.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("monitor exited before capturing");
        }
        if line.contains("capturing on va") {
            // The kernel hands frames over in blocks of a mapped ring (and
            // stamps them itself): the fast path is the one under test.
            assert!(line.contains("TPACKET_V3 ring"), "{line}");
            break;
        }
    }
    let err_rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let before = counters(&a, "va");

    // Traffic from A: UDP datagrams, then TCP ping-pong through the delay.
    let client = in_ns(&a, move || {
        let u = UdpSocket::bind((A_IP, 0)).expect("udp client");
        for i in 0..UDP_COUNT {
            u.send_to(&[i as u8; UDP_PAYLOAD], (B_IP, 5002))
                .expect("udp send");
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let udp_port = u.local_addr().unwrap().port();
        let mut c = TcpStream::connect((B_IP, 5001)).expect("connect");
        c.set_nodelay(true).unwrap();
        let tcp_port = c.local_addr().unwrap().port();
        let mut buf = vec![0u8; MSG];
        for i in 0..ROUNDS {
            c.write_all(&vec![i as u8; MSG]).expect("send");
            c.read_exact(&mut buf).expect("echo back");
        }
        drop(c);
        (udp_port, tcp_port)
    });
    let (udp_port, tcp_port) = client.join().expect("client");
    std::thread::sleep(Duration::from_millis(400));
    let after = counters(&a, "va");
    stop.store(true, Ordering::SeqCst);
    let received = servers.join().expect("servers");

    // Ctrl-C: the monitor must stop cleanly and still print its totals.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mon.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut out = String::new();
    mon.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = mon.wait().unwrap();
    let stderr = err_rest.join().unwrap_or_default();
    assert!(status.success(), "monitor: {status}\n{stderr}");
    let totals: Value =
        serde_json::from_str(out.lines().last().expect("totals line")).expect("JSON");
    for w in out.lines().rev().skip(1) {
        let w: Value = serde_json::from_str(w).expect("window JSON");
        for c in w["window"]["classes"].as_array().into_iter().flatten() {
            println!(
                "window class {} rtt p50 {} p95 {}",
                c["class"], c["rtt_p50_ms"], c["rtt_p95_ms"]
            );
        }
    }
    let t = &totals["totals"];
    println!("totals: {t}");

    // Everything that crossed va (IP bytes = frame bytes − 14) within 1 %.
    let pk = (after[0] + after[1] - before[0] - before[1]) as f64;
    let by = (after[2] + after[3] - before[2] - before[3]) as f64 - 14.0 * pk;
    let got_pk = t["packets"].as_u64().unwrap() as f64 + t["non_ip"].as_u64().unwrap() as f64;
    assert!(
        within(got_pk, pk, 0.01),
        "packets: monitor {got_pk}, interface {pk}"
    );
    assert!(
        within(t["bytes"].as_u64().unwrap() as f64, by, 0.01),
        "bytes: monitor {}, interface {by}",
        t["bytes"]
    );
    assert_eq!(t["kernel"]["drops"], 0, "kernel drops on a light load");

    let flows = t["top_flows"].as_array().unwrap();
    let find = |port: u16| {
        flows
            .iter()
            .find(|f| f["src"] == format!("{A_IP}:{port}"))
            .unwrap_or_else(|| panic!("flow from port {port} missing: {t}"))
    };
    // UDP: what the client sent, within 1 %.
    let u = find(udp_port);
    let sent_bytes = (UDP_COUNT * (UDP_PAYLOAD as u64 + 28)) as f64;
    assert!(
        within(
            u["packets"].as_u64().unwrap() as f64,
            UDP_COUNT as f64,
            0.01
        ),
        "udp packets {u}"
    );
    assert!(
        within(u["bytes"].as_u64().unwrap() as f64, sent_bytes, 0.01),
        "udp bytes {u}"
    );
    assert!(
        received > 0,
        "the UDP sink received nothing through the relay"
    );
    // TCP: each message is one segment of MSG + 52 bytes (IP 20 + TCP 20 + timestamps 12) each way.
    let c = find(tcp_port);
    let want = (2 * ROUNDS * (MSG + 52)) as f64;
    assert!(
        within(c["bytes"].as_u64().unwrap() as f64, want, 0.01),
        "tcp bytes {c}, want ≈ {want}"
    );
    // rtt_ms is the flow's minimum RTT; the smoothed one (srtt_ms) also
    // carries the endpoints' delayed ACKs and application turnaround.
    println!("tcp rtt_ms {} srtt_ms {}", c["rtt_ms"], c["srtt_ms"]);
    let rtt = c["rtt_ms"].as_f64().expect("rtt measured");
    let d = DELAY.as_secs_f64() * 1000.0;
    assert!(within(rtt, d, 0.10), "rtt {rtt} ms, injected {d} ms");
}
