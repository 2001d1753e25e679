//! Shard benchmarks (`cargo bench -p shardline-agent --bench shard_bench`):
//!
//! 1. Time to activate a capability: `Supervisor::activate` until the host
//!    reports `Running` (spawn host, apply limits, verify + hash, load, init)
//!    for the vpn capability (tunnel + crypto + auth). Target p99 ≤ 20 ms.
//! 2. Tunnel goodput per crypto shard: two vpn hosts on loopback (UDP inner
//!    mode), each host capped at one core (`cpu_quota_permille = 1000`),
//!    1400-byte datagrams offered as fast as the sender can for 2 s.
//!
//! Each figure is the median of several runs; the rows replace the "Shards"
//! section of BENCHMARKS.md.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/shard_common/mod.rs"]
mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::{HostEvent, ShardSpec, Supervisor};
use shardline_shared::msg::ResourceLimits;
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ONE_CORE: ResourceLimits = ResourceLimits {
    cpu_quota_permille: 1000,
    cpu_weight: 100,
    memory_max_bytes: 256 << 20,
    nice: 0,
};

fn port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn vpn(dir: &Path, crypto: &str, tunnel_cfg: &str) -> Vec<ShardSpec> {
    // Limits add up per host: the tunnel carries the core, the others add nothing.
    let none = ResourceLimits {
        cpu_quota_permille: 0,
        memory_max_bytes: 0,
        ..ONE_CORE
    };
    vec![
        spec(dir, "vpn", "vpn-tunnel", tunnel_cfg, ONE_CORE),
        spec(dir, "vpn", crypto, "", none),
        spec(
            dir,
            "vpn",
            "auth-psk",
            &format!("psk = {}", "42".repeat(32)),
            none,
        ),
    ]
}

fn wait_started(sup: &mut Supervisor, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ev = sup.poll(Instant::now());
        if ev.iter().any(|e| matches!(e, HostEvent::Started { .. })) {
            return true;
        }
        if ev.iter().any(|e| matches!(e, HostEvent::Failed { .. })) {
            panic!("activation failed: {ev:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    percentile(&v, 0.5)
}

fn activation(dir: &Path) -> (f64, f64, usize) {
    let mut sup = Supervisor::new(supervisor_config(dir));
    let mut times = Vec::new();
    let runs = 60;
    for i in 0..runs {
        let cfg = "role = responder\nbind = 127.0.0.1:0\ninner_listen = 127.0.0.1:0\ninner_forward = 127.0.0.1:9\n";
        let shards = vpn(dir, "crypto-chacha20poly1305", cfg);
        let t0 = Instant::now();
        sup.activate("vpn", shards, t0).expect("activate");
        assert!(
            wait_started(&mut sup, Duration::from_secs(5)),
            "run {i} did not start"
        );
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if i >= 5 {
            times.push(ms); // the first runs warm the page cache
        }
        sup.deactivate("vpn");
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.len(),
    )
}

fn throughput(dir: &Path, crypto: &str, secs: f64) -> f64 {
    let (pa, pb, ia, ib, sink_port) = (port(), port(), port(), port(), port());
    let sink = UdpSocket::bind(("127.0.0.1", sink_port)).expect("sink");
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut a = Supervisor::new(supervisor_config(dir));
    let mut b = Supervisor::new(supervisor_config(dir));
    let cfg_b = format!("role = responder\nbind = 127.0.0.1:{pb}\ninner_listen = 127.0.0.1:{ib}\ninner_forward = 127.0.0.1:{sink_port}\n");
    let cfg_a = format!("role = initiator\nbind = 127.0.0.1:{pa}\npeer = 127.0.0.1:{pb}\nretry_ms = 100\ninner_listen = 127.0.0.1:{ia}\ninner_forward = 127.0.0.1:9\n");
    b.activate("vpn", vpn(dir, crypto, &cfg_b), Instant::now())
        .expect("activate b");
    a.activate("vpn", vpn(dir, crypto, &cfg_a), Instant::now())
        .expect("activate a");
    assert!(
        wait_started(&mut b, Duration::from_secs(5))
            && wait_started(&mut a, Duration::from_secs(5))
    );
    let tx = UdpSocket::bind("127.0.0.1:0").expect("tx");
    // Wait until the handshake is done: a probe comes out at the sink.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    loop {
        tx.send_to(b"probe", ("127.0.0.1", ia)).expect("probe");
        if sink.recv(&mut buf).is_ok() || Instant::now() > deadline {
            break;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let rx = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = sink.recv(&mut buf) {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let payload = [0x5Au8; 1400];
    let start = Instant::now();
    let mut since_poll = Instant::now();
    received.store(0, Ordering::SeqCst);
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..32 {
            let _ = tx.send_to(&payload, ("127.0.0.1", ia));
        }
        // Pace the sender a little so it does not take the core the hosts need.
        std::thread::sleep(Duration::from_micros(300));
        if since_poll.elapsed() > Duration::from_millis(50) {
            a.poll(Instant::now());
            b.poll(Instant::now());
            since_poll = Instant::now();
        }
    }
    let bytes = received.load(Ordering::SeqCst);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    rx.join().expect("rx");
    bytes as f64 * 8.0 / elapsed / 1e6
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need: run quickly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = shard_dir();
    let (p50, p99, n) = activation(dir.path());
    println!("activation: p50 {p50:.2} ms, p99 {p99:.2} ms over {n} runs");
    let runs = if quick { 1 } else { 5 };
    let secs = if quick { 0.5 } else { 2.0 };
    let mut rows = Vec::new();
    for crypto in ["crypto-chacha20poly1305", "crypto-aes256gcm"] {
        let all: Vec<f64> = (0..runs)
            .map(|_| throughput(dir.path(), crypto, secs))
            .collect();
        let m = median(all.clone());
        println!("{crypto}: median {m:.1} Mbit/s over {runs} runs ({all:.1?})");
        rows.push((crypto, m, all));
    }
    if quick {
        println!("quick run (no --bench): BENCHMARKS.md not updated");
        return;
    }
    let enforcement = Supervisor::new(supervisor_config(dir.path())).enforcement();
    let aes = shardline_agent::shardhost::cpu::aes_hw();
    let mut body = format!(
        "## Shards\n\n\
         Machine: {}; AES instructions: {}; limits enforced by {enforcement:?}.\n\
         Command: `cargo bench -p shardline-agent --bench shard_bench` (release build); commit {}; load average at the end: {}.\n\n\
         | what | figure | target | runs |\n|---|---|---|---|\n\
         | activate the vpn capability (spawn host, limits, verify + SHA-256, load, init of 3 shards) | p50 {p50:.2} ms, p99 {p99:.2} ms | p99 ≤ 20 ms{} | {n} |\n",
        common::machine(),
        if aes { "yes" } else { "no" },
        common::commit(),
        common::load_average(),
        if p99 <= 20.0 { "" } else { " (missed)" },
    );
    for (crypto, m, all) in rows {
        body.push_str(&format!(
            "| tunnel goodput, {crypto}, each host ≤ 1 core, 1400-byte UDP over loopback | median {m:.1} Mbit/s (runs: {}) | — | {} |\n",
            all.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(", "),
            all.len()
        ));
    }
    common::replace_section("## Shards", &body);
    println!("BENCHMARKS.md updated");
}
