//! `cargo xtask bench e2e`: end-to-end activation latency, from the first
//! packet of a new traffic class on the wire to its shard active on the
//! device, over the whole real loop (agent capture → QoS window → signed
//! report → broker → allocator policy → signed instruction → agent
//! verification and persistence → shard host → shard running).
//!
//! Setup as in the demo, live mode: a veth into a network namespace the
//! agent watches, the allocator with its embedded broker. Each run starts
//! game traffic (UDP to port 27015, ⇒ `latency_sensitive` ⇒ `qos`) from
//! quiet; t0 is when the first datagram left the socket. "Active" is
//! observed from outside, functionally: the `qos-shaper` shard forwards a
//! probe datagram from its listen address to the bench's socket; t1 is when
//! the first probe comes through. Then the traffic stops and the run waits
//! until the capability is released again before the next one.
//!
//! A new need is reported when the agent sees it, not when its QoS window
//! closes, so the target is p99 ≤ 300 ms whatever the window. Needs root
//! (network namespace, live capture); rows go to BENCHMARKS.md, section
//! "End to end".

use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xtask::kit::netns::Netns;
use xtask::kit::proc::{Proc, TempDir};
use xtask::kit::stack::{self, Bins, Capture, LoopConfig, Stack};
use xtask::kit::traffic;

const USAGE: &str = "usage: cargo xtask bench e2e [--runs N] [--window-ms MS] [--no-write]";

pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let mut runs = 50usize;
    let mut window_ms = 1_000u32;
    let mut write = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).ok_or(USAGE)?,
            "--window-ms" => window_ms = it.next().and_then(|v| v.parse().ok()).ok_or(USAGE)?,
            "--no-write" => write = false,
            _ => return Err(USAGE.into()),
        }
    }
    if !crate::sh::is_root() {
        eprintln!("xtask: SKIP bench e2e: needs root (network namespace, live capture on a veth)");
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile = exe.parent().ok_or("xtask has no directory")?.to_owned();
    let target = profile.parent().ok_or("no target directory")?.to_owned();
    stack::build(root, &target, false)?;
    let bins = Bins::in_profile(&profile)?;
    let tmp = TempDir::new("shardline-bench-e2e")?;
    let ns = Netns::create("e2e")?;
    let mut server_cmd = ns.command(&exe);
    server_cmd.args(["demo-traffic", "serve"]);
    let mut server = Proc::spawn("traffic server", server_cmd, &tmp.path.join("server.log"))?;
    traffic::wait_for_server(ns.peer_addr, Duration::from_secs(10))?;
    let mut cfg = LoopConfig::demo(Capture::Interfaces(vec![ns.host_if.clone()]));
    cfg.device = "bench-router".into();
    cfg.window_ms = window_ms;
    cfg.tick_ms = 50;
    cfg.hysteresis_ms = 1_000;
    let mut st = Stack::prepare(root, &bins, &tmp.path, cfg)?;
    st.start_agent()?;
    let result = measure(&mut st, &ns, runs);
    st.stop();
    server.stop(Duration::from_secs(2));
    drop(ns);
    let samples = result?;
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    let (p50, p99, max) = (pct(0.5), pct(0.99), sorted[sorted.len() - 1]);
    // Issue 16: a new class's onset is reported when it is seen, not when
    // its window closes, so the target no longer depends on the window.
    let target = TARGET_P99_MS;
    println!(
        "e2e: {} runs, first packet -> qos shard forwarding: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (target p99 <= {target:.0} ms)",
        sorted.len()
    );
    if write {
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let runs_line = sorted
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        write_rows(
            root,
            window_ms,
            runs,
            (p50, p99, max, sorted[0]),
            target,
            &format!("Runs (ms, sorted): {runs_line}. Load average at the end: {load}."),
        )?;
    }
    Ok(())
}

/// A probe through the qos-shaper: true when a datagram sent to its listen
/// address arrives at its forward address within `wait`.
struct Probe {
    tx: UdpSocket,
    rx: UdpSocket,
    to: std::net::SocketAddr,
    n: u64,
}

impl Probe {
    fn new(st: &Stack) -> Result<Probe, String> {
        let rx = UdpSocket::bind(("127.0.0.1", st.ports.shaper_forward))
            .map_err(|e| format!("bind the shaper's forward port: {e}"))?;
        rx.set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(|e| e.to_string())?;
        let tx = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        Ok(Probe {
            tx,
            rx,
            to: ([127, 0, 0, 1], st.ports.shaper_listen).into(),
            n: 0,
        })
    }

    fn passes(&mut self, wait: Duration) -> bool {
        self.n += 1;
        let tag = self.n.to_be_bytes();
        let _ = self.tx.send_to(&tag, self.to);
        let end = Instant::now() + wait;
        let mut buf = [0u8; 64];
        while Instant::now() < end {
            if let Ok((n, _)) = self.rx.recv_from(&mut buf) {
                if buf[..n] == tag {
                    return true;
                }
            }
        }
        false
    }
}

fn qos_leased(st: &Stack) -> bool {
    st.device()
        .map(|v| v.leases.contains_key("qos"))
        .unwrap_or(true)
}

fn measure(st: &mut Stack, ns: &Netns, runs: usize) -> Result<Vec<f64>, String> {
    let mut probe = Probe::new(st)?;
    // The agent is connected once the allocator sees it online.
    let deadline = Instant::now() + Duration::from_secs(30);
    while st.device()?.presence != "online" {
        st.check_alive()?;
        if Instant::now() > deadline {
            return Err("the agent did not come online".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut samples = Vec::new();
    for run in 0..runs {
        // Quiet until the capability is released and the shard is gone.
        let deadline = Instant::now() + Duration::from_secs(60);
        while qos_leased(st) || probe.passes(Duration::from_millis(20)) {
            st.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!("run {run}: qos was not released"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A random phase against the agent's window clock.
        std::thread::sleep(Duration::from_millis(200 + (run as u64 * 397) % 1000));
        let stop = Arc::new(AtomicBool::new(false));
        let t0: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let gen = {
            let (stop, t0, peer) = (stop.clone(), t0.clone(), ns.peer_addr);
            std::thread::spawn(move || {
                traffic::gaming(peer, Duration::from_secs(30), &stop, || {
                    if let Ok(mut t) = t0.lock() {
                        *t = Some(Instant::now());
                    }
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let t1 = loop {
            if probe.passes(Duration::from_millis(2)) {
                break Some(Instant::now());
            }
            if Instant::now() > deadline {
                break None;
            }
        };
        stop.store(true, Ordering::Relaxed);
        let _ = gen.join();
        let t0 = t0.lock().ok().and_then(|t| *t);
        match (t0, t1) {
            (Some(t0), Some(t1)) => {
                let ms = t1.duration_since(t0).as_secs_f64() * 1000.0;
                eprintln!("e2e: run {:>2}: {ms:.0} ms", run + 1);
                samples.push(ms);
            }
            _ => {
                st.check_alive()?;
                return Err(format!(
                    "run {run}: the qos shard did not become active within 20 s"
                ));
            }
        }
    }
    Ok(samples)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    format!("{model}, {cores} cores, {}", std::env::consts::ARCH)
}

/// Target of the first-packet-to-shard-active latency (issue 16).
const TARGET_P99_MS: f64 = 300.0;

fn write_rows(
    root: &Path,
    window_ms: u32,
    runs: usize,
    (p50, p99, max, min): (f64, f64, f64, f64),
    target: f64,
    runs_line: &str,
) -> Result<(), String> {
    let path = root.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let verdict = if p99 <= target { "met" } else { "missed" };
    let section = format!(
        "## End to end\n\n\
         Written by `cargo xtask bench e2e` (xtask/src/bench_e2e.rs): the whole loop as real processes \
         (debug build) on one machine — the agent watching a veth into a network namespace, the allocator \
         with its embedded broker and store. Each run starts game traffic (UDP to port 27015) from quiet; \
         latency is from the first datagram leaving the socket to the `qos-shaper` shard forwarding a probe \
         datagram (the capability's shard host started by a signed instruction, verified, loaded and running). \
         A new need is reported when it is seen: the agent closes its window at the first packet of a \
         latency-sensitive or encrypted class after a second without one, and reports the class's own \
         100 ms window right after (so its rate in the report is its real rate).\n\n\
         | what | result | target | machine | command | runs |\n\
         |---|---|---|---|---|---|\n\
         | first packet of a new class → its shard active on the device, {window_ms} ms QoS window | p50 {p50:.0} ms, p99 {p99:.0} ms (min {min:.0}, max {max:.0}) | p99 ≤ {target:.0} ms ({verdict}) | {m} | `cargo xtask bench e2e --runs {runs}` | {runs} |\n\n{runs_line}\n",
        m = machine(),
    );
    let new = match text.find("## End to end") {
        Some(start) => {
            let rest = &text[start + 3..];
            let end = rest.find("\n## ").map_or(text.len(), |i| start + 3 + i + 1);
            format!("{}{section}{}", &text[..start], &text[end..])
        }
        None => format!(
            "{}\n{section}",
            text.trim_end_matches('\n').to_owned() + "\n"
        ),
    };
    std::fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "e2e: wrote the \"End to end\" section of {}",
        path.display()
    );
    Ok(())
}
