//! The qos capability on real packets: a host runs the `qos-shaper` UDP
//! forwarder with the `qos-dscp` marker between two loopback addresses. The
//! shaper holds the configured rate within 5 % under a 2× offered load, and
//! (as root, with a raw socket reading IP headers) forwarded packets carry the
//! DSCP the marker chose for their size.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::{HostEvent, Supervisor};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start_qos(
    sup: &mut Supervisor,
    dir: &std::path::Path,
    listen: u16,
    forward: u16,
    rate_bps: u64,
) {
    let shaper_cfg = format!("listen = 127.0.0.1:{listen}\nforward = 127.0.0.1:{forward}\nrate_bps = {rate_bps}\nqueue_packets = 4096\n");
    let shards = vec![
        spec(dir, "qos", "qos-shaper", &shaper_cfg, LIMITS),
        spec(
            dir,
            "qos",
            "qos-dscp",
            "small_bytes = 256\nsmall_dscp = 46\nbulk_dscp = 10",
            LIMITS,
        ),
    ];
    sup.activate("qos", shards, Instant::now())
        .expect("activate");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let ev = sup.poll(Instant::now());
        if ev.iter().any(|e| matches!(e, HostEvent::Started { .. })) {
            return;
        }
        assert!(
            !ev.iter().any(|e| matches!(e, HostEvent::Failed { .. })),
            "{ev:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("qos host did not start");
}

#[test]
fn the_shaper_holds_its_rate_within_five_percent() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let (listen, forward) = (free_port(), free_port());
    let rate_bps: u64 = 4_000_000; // 500 kB/s of UDP payload
    let rx = UdpSocket::bind(("127.0.0.1", forward)).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    start_qos(&mut sup, dir.path(), listen, forward, rate_bps);

    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = rx.recv(&mut buf) {
                    arrivals.push((Instant::now(), n));
                }
            }
            arrivals
        })
    };
    // Offer twice the rate for 3 s: 1000-byte datagrams, 1000 per second.
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        let due = (start.elapsed().as_secs_f64() * 1000.0) as u64;
        while sent < due {
            tx.send_to(&[0xAB; 1000], ("127.0.0.1", listen))
                .expect("send");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
        let _ = sup.poll(Instant::now());
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let arrivals = receiver.join().expect("receiver");
    assert!(
        arrivals.len() > 100,
        "only {} packets forwarded",
        arrivals.len()
    );
    // Skip the first 0.5 s (initial burst), measure the steady rate over the rest of the load.
    let t0 = arrivals[0].0 + Duration::from_millis(500);
    let t_end = start + Duration::from_secs(3);
    let window: Vec<_> = arrivals
        .iter()
        .filter(|(t, _)| *t >= t0 && *t <= t_end)
        .collect();
    let bytes: usize = window.iter().map(|(_, n)| n).sum();
    let secs = window
        .last()
        .expect("arrivals")
        .0
        .duration_since(window[0].0)
        .as_secs_f64();
    let measured = (bytes - window[0].1) as f64 * 8.0 / secs;
    let err = (measured - rate_bps as f64).abs() / rate_bps as f64;
    println!(
        "offered {} bit/s, configured {rate_bps} bit/s, measured {measured:.0} bit/s ({:.2} % off)",
        8_000_000,
        err * 100.0
    );
    assert!(
        err < 0.05,
        "shaped rate {measured:.0} bit/s is more than 5 % off {rate_bps}"
    );
    // The agent watched the host: resident memory and CPU from sysinfo, state from heartbeats.
    let st = sup.statuses();
    assert_eq!(st.len(), 2, "{st:?}");
    for s in &st {
        assert_eq!(s.state, shardline_shared::msg::ShardState::Running, "{s:?}");
        assert!(s.rss_kib > 0, "no RSS sampled: {s:?}");
        assert_eq!(s.restarts, 0);
    }
    let stats = sup.shard_stats("qos");
    assert!(
        stats[0].dropped > 0 || stats[0].packets_in > stats[0].packets_out,
        "2x overload must queue or drop: {stats:?}"
    );
    assert!(
        stats[1].packets_in > 0,
        "the marker was consulted: {stats:?}"
    );
}

#[test]
fn forwarded_packets_carry_the_dscp_the_marker_chose() {
    if !is_root() {
        println!("SKIP: reading IP headers of forwarded packets needs a raw socket (root)");
        return;
    }
    use nix::sys::socket::{
        recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType,
    };
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let (listen, forward) = (free_port(), free_port());
    let _sink = UdpSocket::bind(("127.0.0.1", forward)).expect("bind sink");
    let raw = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .expect("raw socket");
    setsockopt(
        &raw,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )
    .expect("timeout");
    // The raw socket sees every UDP datagram on the machine (other tests too): a big buffer.
    let _ = setsockopt(&raw, sockopt::RcvBuf, &(8 << 20));
    start_qos(&mut sup, dir.path(), listen, forward, 50_000_000);
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    for i in 0..40 {
        let len = if i % 2 == 0 { 100 } else { 1200 };
        tx.send_to(&vec![0x11; len], ("127.0.0.1", listen))
            .expect("send");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut seen = std::collections::BTreeMap::<usize, std::collections::BTreeSet<u8>>::new();
    let mut count = std::collections::BTreeMap::<usize, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    let mut forwarded = 0;
    while Instant::now() < deadline && forwarded < 40 {
        let Ok(n) = recv(raw.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
            continue;
        };
        let ihl = usize::from(buf[0] & 0x0F) * 4;
        if n < ihl + 8 {
            continue;
        }
        let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
        if dport == forward {
            let payload = n - ihl - 8;
            forwarded += 1;
            *count.entry(payload).or_default() += 1;
            seen.entry(payload).or_default().insert(buf[1] >> 2);
        }
    }
    println!("DSCP seen by payload size: {seen:?} (packets per size: {count:?})");
    // A raw socket may drop copies under load from parallel tests; what it sees must be right.
    assert!(
        count.get(&100).copied().unwrap_or(0) >= 5 && count.get(&1200).copied().unwrap_or(0) >= 5,
        "{count:?}"
    );
    assert_eq!(
        seen.get(&100).cloned().unwrap_or_default(),
        [46].into(),
        "small packets must be EF"
    );
    assert_eq!(
        seen.get(&1200).cloned().unwrap_or_default(),
        [10].into(),
        "bulk packets must be AF11"
    );
}
