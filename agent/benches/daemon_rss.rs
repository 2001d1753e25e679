//! Resident memory of the agent daemon (`shardline-agent run`): idle (connected to a real mosquitto, reporting, no capture) and
//! with 10,000 active flows (a generated capture file of 10,000 UDP flows
//! replayed in real time and looped, so every flow stays active). The flow
//! count is read back from the device's own signed reports (sum of
//! `active_flows`), so the row says what was really measured.
//!
//! Both builds are measured, each made by this bench with `cargo build
//! --profile P -p shardline-agent --bin shardline-agent` (the binary alone,
//! without the features the tests add): `release` and `device`
//! (size-optimised, what `cross/build.sh --release` and the packages ship).
//!
//! Writes the "Agent daemon" section of BENCHMARKS.md (replacing an older
//! one): `cargo bench -p shardline-agent --bench daemon_rss`.
//! Targets (issue 16 §4): idle ≤ 5 MB, 10,000 flows ≤ 10 MB (MiB here).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/daemon_support/mod.rs"]
mod daemon_support;

use daemon_support::{Agent, Broker, Cloud};
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

/// One run: (RSS KiB after settling, active flows the reports counted).
fn run(extra: &str, settle: Duration, binary: &Path) -> Option<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path())?;
    let pcap = dir.path().join("flows.pcap");
    daemon_support::write_udp_flows_pcap(&pcap, FLOWS);
    let extra = extra.replace("{pcap}", &pcap.display().to_string());
    let mut agent = Agent::new(dir.path(), "bench-1", &broker.url(), 1000, "");
    agent.binary = binary.to_path_buf();
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

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing heavy.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let load_at_start = common::load_average();
    let mut rows = Vec::new();
    for profile in ["release", "device"] {
        let binary = common::build_agent(profile);
        match measure(profile, &binary) {
            Some(r) => rows.extend(r),
            None => {
                eprintln!("SKIP: mosquitto is not installed");
                return;
            }
        }
    }
    for r in &rows {
        println!("{r}");
    }
    write_section(&rows, &load_at_start);
}

/// Rows for one build of the agent; `None` when there is no broker.
fn measure(build: &str, binary: &Path) -> Option<Vec<String>> {
    let size = std::fs::metadata(binary).map_or(0, |m| m.len());
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut flows = Vec::new();
    for _ in 0..RUNS {
        let (rss, _) = run("", Duration::from_secs(4), binary)?;
        idle.push(rss);
        let (rss, f) = run("pcap = \"{pcap}\"\n", Duration::from_secs(6), binary).unwrap();
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
    let m = common::machine();
    let build = format!("{build} build ({:.1} MB binary)", size as f64 / 1e6);
    Some(vec![
        format!(
            "| agent RSS, idle (connected, 1 s reports, no capture), {build} | {:.1} MB (median of {RUNS}; runs {:?} KiB) | {m} | {cmd} | {} |",
            mb(idle_kib), idle, verdict(idle_kib, 5.0)
        ),
        format!(
            "| agent RSS, {flows_med} active flows (pcap replay of {FLOWS} UDP flows, looped), {build} | {:.1} MB (median of {RUNS}; runs {:?} KiB) | {m} | {cmd} | {} |",
            mb(busy_kib), busy, verdict(busy_kib, 10.0)
        ),
    ])
}

fn write_section(rows: &[String], load_at_start: &str) {
    let mut section = String::from("## Agent daemon\n\n");
    section.push_str(
        "Written by `cargo bench -p shardline-agent --bench daemon_rss` (agent/benches/daemon_rss.rs): \
         VmRSS of the `shardline-agent run` process after it settled, against a real \
         mosquitto; the flow count comes from the agent's own reports. MB here are MiB \
         (KiB / 1024). The `device` build (opt-level z, fat LTO, one codegen unit, panic = abort) is the one \
         `cross/build.sh --release` and the packages ship; most of an idle agent's RSS is \
         code pages (its own and glibc's), which is what the size-optimised build cuts.\n\n",
    );
    section.push_str(&format!(
        "Load average when the bench started: {load_at_start} (2 cores); commit {}.\n\n",
        common::commit()
    ));
    section.push_str("| what | result | machine | command | notes |\n|---|---|---|---|---|\n");
    for r in rows {
        section.push_str(r);
        section.push('\n');
    }
    common::replace_section("## Agent daemon", &section);
}
