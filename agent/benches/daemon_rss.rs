//! Resident memory of the agent daemon (`shardline-agent run`, the release
//! binary): idle (connected to a real mosquitto, reporting, no capture) and
//! with 10,000 active flows (a generated capture file of 10,000 UDP flows
//! replayed in real time and looped, so every flow stays active). The flow
//! count is read back from the device's own signed reports (sum of
//! `active_flows`), so the row says what was really measured.
//!
//! Writes the "Agent daemon" section of BENCHMARKS.md (replacing an older
//! one): `cargo bench -p shardline-agent --bench daemon_rss`.
//! Targets (issue 7): idle ≤ 8 MB, 10,000 flows ≤ 12 MB.

#[path = "../tests/daemon_support/mod.rs"]
mod daemon_support;

use daemon_support::{Agent, Broker, Cloud};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const RUNS: usize = 5;
const FLOWS: u32 = 10_000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A classic pcap (Ethernet) with `FLOWS` UDP flows, two packets each (one
/// per direction), spread over one second.
fn write_pcap(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut head = Vec::new();
    head.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    head.extend_from_slice(&2u16.to_le_bytes());
    head.extend_from_slice(&4u16.to_le_bytes());
    head.extend_from_slice(&0i32.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&65535u32.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes());
    f.write_all(&head).unwrap();
    let base_s: u32 = 1_800_000_000;
    for i in 0..FLOWS {
        let client = [10, 1, (i >> 8) as u8, i as u8];
        let server = [192, 0, 2, 10];
        let cport = 20_000 + (i % 40_000) as u16;
        for (n, (src, dst, sport, dport)) in [
            (client, server, cport, 5004u16),
            (server, client, 5004u16, cport),
        ]
        .into_iter()
        .enumerate()
        {
            let usec = (u64::from(i) * 1_000_000 / u64::from(FLOWS)) as u32 + n as u32;
            let frame = udp_frame(src, dst, sport, dport, 120);
            let mut rec = Vec::new();
            rec.extend_from_slice(&base_s.to_le_bytes());
            rec.extend_from_slice(&usec.min(999_999).to_le_bytes());
            rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            f.write_all(&rec).unwrap();
            f.write_all(&frame).unwrap();
        }
    }
    f.flush().unwrap();
}

fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut fr = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = 20 + 8 + payload;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10] = (sum >> 8) as u8;
    ip[11] = sum as u8;
    fr.extend_from_slice(&ip);
    let ulen = (8 + payload) as u16;
    fr.extend_from_slice(&sport.to_be_bytes());
    fr.extend_from_slice(&dport.to_be_bytes());
    fr.extend_from_slice(&ulen.to_be_bytes());
    fr.extend_from_slice(&[0, 0]);
    fr.extend(std::iter::repeat_n(0xabu8, payload));
    fr
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// One run: (RSS KiB after settling, active flows the reports counted).
fn run(extra: &str, settle: Duration) -> Option<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path())?;
    let pcap = dir.path().join("flows.pcap");
    write_pcap(&pcap);
    let extra = extra.replace("{pcap}", &pcap.display().to_string());
    let mut agent = Agent::new(dir.path(), "bench-1", &broker.url(), 1000, "");
    // The capture settings belong in [monitor]; splice them in.
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("[monitor]\n", &format!("[monitor]\n{extra}"));
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[("SHARDLINE_LOG", "warn")]);
    let start = Instant::now();
    let mut flows = 0;
    let mut peak = 0;
    while start.elapsed() < settle {
        if let Some(b) = cloud.recv_kind("/report", Duration::from_millis(200)) {
            let r = agent.open_report(&b);
            flows = r.classes.iter().map(|c| u64::from(c.active_flows)).sum();
        }
        peak = peak.max(rss_kib(agent.pid()));
    }
    let rss = rss_kib(agent.pid());
    agent.sigterm();
    eprintln!("run: rss {rss} KiB (peak {peak}), active flows {flows}");
    Some((rss, flows))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores, {}", std::env::consts::ARCH)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing heavy.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut flows = Vec::new();
    for _ in 0..RUNS {
        let Some((rss, _)) = run("", Duration::from_secs(4)) else {
            eprintln!("SKIP: mosquitto is not installed");
            return;
        };
        idle.push(rss);
        let (rss, f) = run("pcap = \"{pcap}\"\n", Duration::from_secs(6)).unwrap();
        busy.push(rss);
        flows.push(f);
    }
    let (idle_kib, busy_kib, flows_med) =
        (median(idle.clone()), median(busy.clone()), median(flows));
    let mb = |k: u64| k as f64 / 1024.0;
    let verdict = |k: u64, target_mb: f64| {
        if mb(k) <= target_mb {
            format!("meets ≤ {target_mb} MB")
        } else {
            format!("MISSES ≤ {target_mb} MB")
        }
    };
    let cmd = "`cargo bench -p shardline-agent --bench daemon_rss`";
    let m = machine();
    let rows = [
        format!(
            "| agent RSS, idle (connected, 1 s reports, no capture) | {:.1} MB (median of {RUNS}; runs {:?} KiB) | {m} | {cmd} | {} |",
            mb(idle_kib), idle, verdict(idle_kib, 8.0)
        ),
        format!(
            "| agent RSS, {flows_med} active flows (pcap replay of {FLOWS} UDP flows, looped) | {:.1} MB (median of {RUNS}; runs {:?} KiB) | {m} | {cmd} | {} |",
            mb(busy_kib), busy, verdict(busy_kib, 12.0)
        ),
    ];
    for r in &rows {
        println!("{r}");
    }
    write_section(&rows);
}

fn write_section(rows: &[String]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let mut section = String::from("## Agent daemon\n\n");
    section.push_str(
        "Written by `cargo bench -p shardline-agent --bench daemon_rss` (agent/benches/daemon_rss.rs): \
         VmRSS of the release `shardline-agent run` process after it settled, against a real \
         mosquitto; the flow count comes from the agent's own reports.\n\n",
    );
    section.push_str("| what | result | machine | command | notes |\n|---|---|---|---|---|\n");
    for r in rows {
        section.push_str(r);
        section.push('\n');
    }
    section.push('\n');
    let new = match old.find("## Agent daemon") {
        Some(start) => {
            let rest = &old[start + 1..];
            let end = rest.find("\n## ").map_or(old.len(), |e| start + 1 + e + 1);
            format!("{}{}{}", &old[..start], section, &old[end..])
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(&path, new).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
