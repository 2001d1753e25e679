//! The in-kernel flow counter (issue 16 §1) against the ring, on real
//! packets: two network namespaces joined by a veth pair, real UDP and TCP
//! traffic from one end, and at the other two captures at once on the same
//! interface — one with the BPF flow counter on its socket, one taking
//! every frame through the ring — each feeding its own pipeline. The
//! per-flow and per-class totals must be equal, and the counter must have
//! delivered only the first packets of each flow.
//!
//! The fallback: the real `shardline-agent monitor` without CAP_BPF and
//! CAP_SYS_ADMIN (dropped with `setpriv`) captures with the ring under
//! `--capture auto` and says why; `--capture kernel` refuses to start.
//!
//! Under pressure (more flows than the kernel's LRU map holds) the drops
//! are counted and nothing is counted twice.
//!
//! Needs root (network namespaces, AF_PACKET, BPF); otherwise each test
//! prints why it skips. Namespaces are `sl-kc-<pid>-*` and always removed.

mod netns_support;

use netns_support::{enter, veth_pair, Netns};
use shardline_agent::monitor::kernel_count::{KernelCountOptions, KernelCountStats};
use shardline_agent::monitor::source::{CaptureMode, LiveCapture, LiveOptions};
use shardline_agent::monitor::{MonitorConfig, Pipeline, Timestamp, Totals};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const S_IP: &str = "10.79.0.1";
const C_IP: &str = "10.79.0.2";
const FIRST: u32 = 64;
const LONG_UDP: u64 = 3000;
const SHORT_FLOWS: u64 = 6;
const SHORT_UDP: u64 = 20;
const TCP_BYTES: usize = 1 << 20;
/// Packets of the long UDP flow after a pause of more than a second.
const AFTER_PAUSE: u64 = 5;

/// Two namespaces `…-s` (sender, `sa`) and `…-c` (capture, `cb`).
fn setup(tag: &str) -> Result<(Netns, String, String), String> {
    veth_pair(&format!("sl-kc-{}-{tag}", std::process::id()), S_IP, C_IP)
}

fn skip_unless_root(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP {test}: needs root (network namespaces, AF_PACKET, BPF)");
        return true;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP {test}: `ip` (iproute2) is not installed");
        return true;
    }
    false
}

/// What one capture saw: the pipeline's totals, frames read, kernel drops,
/// and the flow counter's statistics (kernel mode).
struct Seen {
    totals: Totals,
    frames: u64,
    drops: u64,
    kernel: Option<KernelCountStats>,
}

/// A capture in `ns` on `cb` with `mode`; `Err` carries why it could not open.
fn capture(
    ns: String,
    mode: CaptureMode,
    ready: mpsc::Sender<Result<(), String>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<Seen>> {
    let kernel = KernelCountOptions {
        first_packets: FIRST,
        ..KernelCountOptions::default()
    };
    capture_with(ns, mode, kernel, ready, stop)
}

fn capture_with(
    ns: String,
    mode: CaptureMode,
    kernel: KernelCountOptions,
    ready: mpsc::Sender<Result<(), String>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<Seen>> {
    std::thread::spawn(move || {
        enter(&ns).expect("setns");
        let opts = LiveOptions {
            read_timeout: Duration::from_millis(50),
            capture: mode,
            kernel,
            ..LiveOptions::default()
        };
        let mut cap = match LiveCapture::open("cb", &opts) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return None;
            }
        };
        let cfg = MonitorConfig {
            top_flows: 100,
            ..MonitorConfig::default()
        };
        let mut p = Pipeline::new(cfg);
        let link = cap.link_type();
        let _ = ready.send(Ok(()));
        let mut frames = 0u64;
        let mut idle = 0;
        loop {
            match cap.next_frame().expect("read") {
                Some(f) => {
                    frames += 1;
                    while p.poll_window(f.ts).is_some() {}
                    p.handle_frame_of_len(f.ts, link, f.data, f.wire_len);
                }
                None if stop.load(Ordering::SeqCst) => {
                    idle += 1;
                    if idle >= 3 {
                        break;
                    }
                }
                None => {}
            }
            if cap.kernel_counts_due() {
                let now = Timestamp::now();
                while p.poll_window(now).is_some() {}
                cap.apply_kernel_counts(&mut p, now, false)
                    .expect("kernel counts");
            }
        }
        let now = Timestamp::now();
        while p.poll_window(now).is_some() {}
        cap.apply_kernel_counts(&mut p, now, true)
            .expect("kernel counts");
        let drops = cap.kernel_stats().expect("stats").drops;
        Some(Seen {
            totals: p.totals(),
            frames,
            drops,
            kernel: cap.kernel_count_stats(),
        })
    })
}

/// The traffic, from `s` to `c`: a long UDP flow, short UDP flows, and a
/// TCP transfer (both directions). Returns the long flow's source port.
fn traffic(s: &str, c: &str) -> u16 {
    let c2 = c.to_string();
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        enter(&c2).expect("setns");
        let u = UdpSocket::bind((C_IP, 5002)).expect("udp sink");
        let l = TcpListener::bind((C_IP, 5001)).expect("tcp listen");
        tx.send(()).unwrap();
        let (mut conn, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < TCP_BYTES {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        conn.write_all(b"done").expect("reply");
        drop(u);
        got
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("servers up");
    let s2 = s.to_string();
    let port = std::thread::spawn(move || {
        enter(&s2).expect("setns");
        let u = UdpSocket::bind((S_IP, 0)).expect("udp");
        for i in 0..LONG_UDP {
            u.send_to(&[i as u8; 200], (C_IP, 5002)).expect("send");
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        for _ in 0..SHORT_FLOWS {
            let t = UdpSocket::bind((S_IP, 0)).expect("udp");
            for i in 0..SHORT_UDP {
                t.send_to(&[i as u8; 80], (C_IP, 5002)).expect("send");
            }
        }
        let mut t = TcpStream::connect((C_IP, 5001)).expect("connect");
        let chunk = vec![7u8; 16384];
        let mut sent = 0;
        while sent < TCP_BYTES {
            t.write_all(&chunk).expect("tcp send");
            sent += chunk.len();
            if sent % (128 * 1024) == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut done = [0u8; 4];
        t.read_exact(&mut done).expect("reply");
        drop(t);
        // A pause in the long flow: its next packet is delivered again.
        std::thread::sleep(Duration::from_millis(1100));
        for i in 0..AFTER_PAUSE {
            u.send_to(&[i as u8; 200], (C_IP, 5002)).expect("send");
        }
        u.local_addr().unwrap().port()
    })
    .join()
    .expect("client");
    assert_eq!(server.join().expect("server"), TCP_BYTES);
    port
}

type FlowRow = (String, String, String, String, u64, u64, u64, u64);

fn flows(t: &Totals) -> Vec<FlowRow> {
    let mut v: Vec<_> = t
        .top_flows
        .iter()
        .map(|f| {
            (
                f.src.to_string(),
                f.dst.to_string(),
                f.proto.name().to_string(),
                f.class.as_str().to_string(),
                f.packets,
                f.bytes,
                f.bytes_up,
                f.bytes_down,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn kernel_counts_equal_the_ring_and_deliver_only_first_packets() {
    let name = "kernel_counts_equal_the_ring_and_deliver_only_first_packets";
    if skip_unless_root(name) {
        return;
    }
    let (_guard, s, c) = setup("eq").expect("namespaces");
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let kernel = capture(
        c.clone(),
        CaptureMode::Kernel,
        ready_tx.clone(),
        stop.clone(),
    );
    let ring = capture(c.clone(), CaptureMode::Ring, ready_tx, stop.clone());
    for _ in 0..2 {
        if let Err(e) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("capture ready")
        {
            stop.store(true, Ordering::SeqCst);
            if e.contains("in-kernel flow counting") {
                println!("SKIP {name}: the kernel does not let this process load BPF: {e}");
                return;
            }
            panic!("capture: {e}");
        }
    }
    let long_port = traffic(&s, &c);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let k = kernel.join().expect("kernel capture").expect("kernel seen");
    let r = ring.join().expect("ring capture").expect("ring seen");
    let ks = k.kernel.expect("kernel counter statistics");
    println!(
        "ring: {} frames, {} packets, {} bytes, {} flows; kernel path: {} frames, {ks:?}",
        r.frames, r.totals.packets, r.totals.bytes, r.totals.flows, k.frames
    );
    assert_eq!((k.drops, r.drops), (0, 0), "kernel drops on a light load");

    // Everything counted the same: run totals, per class, per flow.
    assert_eq!(k.totals.packets, r.totals.packets, "packets");
    assert_eq!(k.totals.bytes, r.totals.bytes, "bytes");
    assert_eq!(k.totals.flows, r.totals.flows, "flows");
    assert_eq!(k.totals.non_ip, r.totals.non_ip, "non-IP frames");
    assert_eq!(k.totals.malformed, r.totals.malformed, "malformed");
    assert_eq!(k.totals.classes, r.totals.classes, "per-class totals");
    assert_eq!(flows(&k.totals), flows(&r.totals), "per-flow totals");
    assert!(r.totals.flows as usize <= 100, "every flow is listed");
    let long = r
        .totals
        .top_flows
        .iter()
        .find(|f| f.src.port() == long_port)
        .expect("the long UDP flow");
    assert_eq!(long.packets, LONG_UDP + AFTER_PAUSE);

    // User space got only the first FIRST packets of each counted flow and
    // the first after the long flow's pause, plus the frames the filter
    // does not count (ARP, ICMPv6, …).
    let first_n: u64 = r
        .totals
        .top_flows
        .iter()
        .filter(|f| matches!(f.proto.name().as_ref(), "tcp" | "udp"))
        .map(|f| f.packets.min(u64::from(FIRST)))
        .sum();
    assert_eq!(ks.delivered, first_n + 1, "frames counted and delivered");
    assert_eq!(
        ks.frames_delivered(),
        k.frames,
        "frames read = frames delivered"
    );
    assert_eq!(ks.delivered + ks.skipped + ks.uncounted, r.frames);
    assert!(
        k.frames * 10 < r.frames,
        "kernel path read {} frames, ring {}",
        k.frames,
        r.frames
    );
    assert_eq!(ks.evicted, 0);
    assert_eq!(
        ks.created_from_counts, 0,
        "every flow was created from its frames"
    );
}

fn agent_under_setpriv(ns: &str, mode: &str) -> std::process::Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
        ])
        .arg(env!("CARGO_BIN_EXE_shardline-agent"))
        .args([
            "monitor",
            "--iface",
            "cb",
            "--json",
            "--duration",
            "0.5",
            "--capture",
            mode,
        ])
        .output()
        .expect("run the agent under setpriv")
}

#[test]
fn without_cap_bpf_auto_falls_back_to_the_ring_and_kernel_refuses() {
    let name = "without_cap_bpf_auto_falls_back_to_the_ring_and_kernel_refuses";
    if skip_unless_root(name) {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIP {name}: setpriv (util-linux) is not installed");
        return;
    }
    let (_guard, _s, c) = setup("fb").expect("namespaces");
    let auto = agent_under_setpriv(&c, "auto");
    let err = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "auto: {}\n{err}", auto.status);
    assert!(
        err.contains("in-kernel flow counting unavailable")
            && err.contains("needs CAP_BPF")
            && err.contains("Operation not permitted"),
        "the reason is reported: {err}"
    );
    assert!(err.contains("capturing on cb (TPACKET_V3 ring)"), "{err}");
    let out = String::from_utf8_lossy(&auto.stdout);
    let totals: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("totals")).expect("JSON");
    assert_eq!(totals["totals"]["capture"], "TPACKET_V3 ring");
    assert!(totals["totals"]["kernel_count"].is_null());

    let kernel = agent_under_setpriv(&c, "kernel");
    let err = String::from_utf8_lossy(&kernel.stderr);
    assert!(
        !kernel.status.success(),
        "kernel must fail without CAP_BPF: {err}"
    );
    assert!(
        err.contains("in-kernel flow counting on `cb`") && err.contains("needs CAP_BPF"),
        "{err}"
    );
    assert!(!err.contains("capturing on"), "{err}");
}

/// Many more flows than the kernel map holds, interleaved: the LRU drops
/// entries the agent has read, re-created entries start from zero, and
/// nothing is counted twice (what the kernel counted into a dropped entry
/// after its last read is lost, so the counter's totals may only be lower).
#[test]
fn lru_pressure_is_counted_and_never_double_counts() {
    let name = "lru_pressure_is_counted_and_never_double_counts";
    if skip_unless_root(name) {
        return;
    }
    let (_guard, s, c) = setup("lru").expect("namespaces");
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let kernel = capture_with(
        c.clone(),
        CaptureMode::Kernel,
        KernelCountOptions {
            first_packets: 8,
            max_flows: 16,
            ..KernelCountOptions::default()
        },
        ready_tx.clone(),
        stop.clone(),
    );
    let ring = capture(c.clone(), CaptureMode::Ring, ready_tx, stop.clone());
    for _ in 0..2 {
        if let Err(e) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("capture ready")
        {
            stop.store(true, Ordering::SeqCst);
            if e.contains("in-kernel flow counting") {
                println!("SKIP {name}: the kernel does not let this process load BPF: {e}");
                return;
            }
            panic!("capture: {e}");
        }
    }
    // 8 hot flows send every 25 ms for 1.5 s (their entries go past the
    // first packets and count in the kernel); 56 cold flows, 4 of them a
    // round, keep the 16-entry map under pressure.
    let s2 = s.clone();
    std::thread::spawn(move || {
        enter(&s2).expect("setns");
        let hot: Vec<UdpSocket> = (0..8)
            .map(|_| UdpSocket::bind((S_IP, 0)).expect("udp"))
            .collect();
        let cold: Vec<UdpSocket> = (0..56)
            .map(|_| UdpSocket::bind((S_IP, 0)).expect("udp"))
            .collect();
        for round in 0..60usize {
            for u in hot
                .iter()
                .chain(cold.iter().cycle().skip(round * 4).take(4))
            {
                u.send_to(&[round as u8; 100], (C_IP, 5002)).expect("send");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    })
    .join()
    .expect("sender");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let k = kernel.join().expect("kernel capture").expect("kernel seen");
    let r = ring.join().expect("ring capture").expect("ring seen");
    let ks = k.kernel.expect("kernel counter statistics");
    println!(
        "ring: {} packets, {} flows; kernel path: {} packets, {} flows, {} frames, {ks:?}",
        r.totals.packets, r.totals.flows, k.totals.packets, k.totals.flows, k.frames
    );
    assert!(ks.evicted > 0, "the LRU dropped entries: {ks:?}");
    assert!(ks.skipped > 0, "and counted packets in the kernel: {ks:?}");
    assert!(
        k.totals.packets <= r.totals.packets && k.totals.bytes <= r.totals.bytes,
        "never more than every packet: kernel path {} packets / {} bytes, ring {} / {}",
        k.totals.packets,
        k.totals.bytes,
        r.totals.packets,
        r.totals.bytes
    );
    assert_eq!(k.totals.flows, r.totals.flows, "no flow made up or lost");
    for f in &k.totals.top_flows {
        let same = r
            .totals
            .top_flows
            .iter()
            .find(|g| g.src == f.src && g.dst == f.dst)
            .expect("the same flow in the ring's totals");
        assert!(f.packets <= same.packets, "{f:?} vs {same:?}");
    }
}

/// The daemon's capture source (`[monitor] capture = "kernel"`) feeds the
/// kernel's counts into its pipeline: a long UDP flow, of which user space
/// receives 64 frames, shows up whole in the reported windows.
#[test]
fn the_daemons_capture_source_reports_kernel_counted_packets() {
    use shardline_agent::daemon::capture::{CaptureInput, CaptureSource};
    use shardline_agent::daemon::runtime::QosSource;
    let name = "the_daemons_capture_source_reports_kernel_counted_packets";
    if skip_unless_root(name) {
        return;
    }
    let (_guard, s, c) = setup("dm").expect("namespaces");
    const SENT: u64 = 2000;
    let c2 = c.clone();
    let s2 = s.clone();
    let result = std::thread::spawn(move || {
        enter(&c2).expect("setns");
        let _sink = UdpSocket::bind((C_IP, 5002)).expect("udp sink");
        let mut src = CaptureSource::start_with(
            CaptureInput::Interfaces(vec!["cb".into()]),
            MonitorConfig::default(),
            300,
            CaptureMode::Kernel,
        );
        std::thread::sleep(Duration::from_millis(300));
        std::thread::spawn(move || {
            enter(&s2).expect("setns");
            let u = UdpSocket::bind((S_IP, 0)).expect("udp");
            for i in 0..SENT {
                u.send_to(&[i as u8; 100], (C_IP, 5002)).expect("send");
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
        .join()
        .expect("sender");
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let mut udp = 0u64;
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < until {
            if let Some(w) = src.poll_window(now_ms()) {
                udp += w.classes.iter().map(|c| c.packets).sum::<u64>();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        udp
    })
    .join()
    .expect("capture thread");
    // Everything sent (and whatever else crossed cb: ARP, IPv6 noise).
    assert!(
        (SENT..SENT + 20).contains(&result),
        "reported {result} packets of {SENT} sent"
    );
}
