//! The allocator's core thread without its I/O: verified reports and acks
//! through `service::Core` (sequence floors, QoS history, the engine's
//! plan, signed instructions, the records and engine state of each step's
//! store batch), on one thread and simulated time, for the fleet and load
//! of `service_e2e` (30,000 devices, one report each per simulated second,
//! a tenth of them per round starting to need encryption so `vpn` replaces
//! `qos`, every instruction acked). It measures the "core" column of
//! service_e2e's CPU table in isolation: CPU time of this thread
//! (/proc/thread-self/schedstat), so that a change to the core can be
//! judged on this shared 2-core machine, where the end-to-end figures move
//! by a fifth from run to run with nothing changed.
//!
//! CPU time here still moves by about ±15 % from run to run. Where
//! `valgrind` is installed the bench also counts the instructions a
//! sustained report costs, which do not move: it runs itself twice under
//! callgrind on 2,000 devices, for 4 and for 10 rounds, and divides the
//! difference by the reports of the 6 rounds between (set-up and cold start
//! are the same in both). That count judges a change to the core exactly;
//! its crypto takes valgrind's paths (no SHA extensions), so it weighs
//! hashing more than this CPU does.
//!
//! Run: `cargo bench -p shardline-allocator-core --bench service_core`
//! (`CORE_BENCH_DEVICES`, `CORE_BENCH_ROUNDS`, `CORE_BENCH_RUNS` override the
//! defaults; `CORE_BENCH_NO_WRITE=1` only prints; `CORE_BENCH_COUNT=0` skips
//! the count). Writes its row into BENCHMARKS.md between the service-core
//! markers.

use shardline_allocator_core::policy::bench_load::bench_report;
use shardline_allocator_core::service::VerifiedMsg;

mod common;
use common::{cpu_ns, env_or, machine, median};
#[path = "common/service_fleet.rs"]
mod service_fleet;
use service_fleet::{applied_ack, enrolled_core, instruction_in};

/// What one run measured.
struct Run {
    /// Microseconds of this thread's CPU per report in the sustained rounds
    /// (the acks those rounds caused included).
    sustained_us: f64,
    /// The same for the first round (every device's first plan).
    cold_us: f64,
    reports: u64,
    acks: u64,
    instructions: u64,
}

/// Messages fed between two steps: the core thread's `max_batch` order of size.
const BATCH: usize = 512;

fn one_run(devices: usize, rounds: usize) -> Run {
    let now0 = 1_000_000u64;
    let (mut core, ids) = enrolled_core("bench", devices, now0);
    let mut acks: Vec<VerifiedMsg> = Vec::new();
    let (mut cold_ns, mut sustained_ns) = (0u64, 0u64);
    let (mut sustained_reports, mut total_reports) = (0u64, 0u64);
    let (mut ack_count, mut instructions) = (0u64, 0u64);
    // The sustained phase starts once the cold start's backlog would have
    // drained (service_e2e's warm-up of 3 rounds).
    let warmup = 3;
    for round in 0..rounds {
        let now = now0 + 1000 * (round as u64 + 1);
        // A tenth more of the fleet needs encryption each sustained round.
        let encrypting = devices * round.saturating_sub(warmup) / 10;
        let c0 = cpu_ns().unwrap_or(0);
        core.on_tick(now);
        let mut fed = 0;
        for (i, id) in ids.iter().enumerate() {
            let r = bench_report(id, round as u64 + 1, now, i < encrypting);
            core.on_verified(now, VerifiedMsg::Report(id.clone(), Box::new(r)));
            fed += 1;
            if fed == BATCH || i + 1 == ids.len() {
                fed = 0;
                // The acks of the last step's instructions arrive among the
                // next reports, as the devices answer within the round.
                for a in acks.drain(..) {
                    core.on_verified(now, a);
                    ack_count += 1;
                }
                core.pace_lazy_writes(now);
                let step = core.take_step();
                for instruction in step.publish.iter().filter_map(instruction_in) {
                    instructions += 1;
                    acks.push(applied_ack(&instruction, now));
                }
            }
        }
        let spent = cpu_ns().unwrap_or(0).saturating_sub(c0);
        total_reports += devices as u64;
        if round == 0 {
            cold_ns += spent;
        } else if round >= warmup {
            sustained_ns += spent;
            sustained_reports += devices as u64;
        }
    }
    Run {
        sustained_us: sustained_ns as f64 / 1000.0 / sustained_reports.max(1) as f64,
        cold_us: cold_ns as f64 / 1000.0 / devices.max(1) as f64,
        reports: total_reports,
        acks: ack_count,
        instructions,
    }
}

/// Devices and rounds of the counted runs: small enough for callgrind's
/// slowdown (about 15 s in all here), the same load per report.
const COUNT_DEVICES: usize = 2_000;
const COUNT_ROUNDS: [usize; 2] = [4, 10];

/// Instructions per sustained report, counted by callgrind (see the module
/// docs), or why they were not counted.
fn counted_instructions() -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let mut counts = Vec::new();
    for rounds in COUNT_ROUNDS {
        let out = std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .arg("--bench")
            .env("CORE_BENCH_DEVICES", COUNT_DEVICES.to_string())
            .env("CORE_BENCH_ROUNDS", rounds.to_string())
            .env("CORE_BENCH_RUNS", "1")
            .env("CORE_BENCH_NO_WRITE", "1")
            .env("CORE_BENCH_COUNT", "0")
            .output()
            .map_err(|e| format!("valgrind not run ({e}); `apt-get install valgrind` to count"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("valgrind failed: {}", stderr.trim()));
        }
        // "==pid== Collected : 1234567"
        let collected = stderr
            .lines()
            .find_map(|l| l.split("Collected :").nth(1))
            .and_then(|n| n.trim().replace(',', "").parse::<u64>().ok())
            .ok_or_else(|| format!("no instruction count in valgrind's output: {stderr}"))?;
        counts.push(collected);
    }
    let reports = (COUNT_ROUNDS[1] - COUNT_ROUNDS[0]) * COUNT_DEVICES;
    Ok(counts[1].saturating_sub(counts[0]) / reports as u64)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let devices = env_or("CORE_BENCH_DEVICES", 30_000);
    let rounds = env_or("CORE_BENCH_ROUNDS", 13).max(4);
    let runs = env_or("CORE_BENCH_RUNS", 5).max(1);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let mut sustained = Vec::new();
    let mut cold = Vec::new();
    let mut last = None;
    for i in 0..runs {
        let r = one_run(devices, rounds);
        println!(
            "run {i}: sustained {:.1} us/report, cold start {:.1} us/report ({} reports, {} instructions, {} acks)",
            r.sustained_us, r.cold_us, r.reports, r.instructions, r.acks
        );
        // Every device is planned at least once (its first `qos`): a run
        // that sent fewer instructions measured a core that did not work.
        assert!(
            r.instructions >= devices as u64,
            "{} instructions for {devices} devices",
            r.instructions
        );
        sustained.push(r.sustained_us);
        cold.push(r.cold_us);
        last = Some(r);
    }
    let shown = sustained
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    let last = last.expect("at least one run");
    let counted = if std::env::var("CORE_BENCH_COUNT").is_ok_and(|v| v == "0") {
        String::new()
    } else {
        match counted_instructions() {
            Ok(n) => {
                println!("counted: {n} instructions per sustained report");
                format!(
                    "; {n} instructions per sustained report (callgrind, {COUNT_DEVICES} devices, the same from run to run)"
                )
            }
            Err(why) => {
                eprintln!("instructions not counted: {why}");
                format!("; instructions not counted: {why}")
            }
        }
    };
    let row = format!(
        "| verified reports through the service core (`Core::on_verified` + `take_step`), 1 core, {devices} devices, {rounds} rounds | sustained {:.1} us of CPU per report (median of {runs}: {shown}); cold start {:.1} us{counted} | {} | `cargo bench -p shardline-allocator-core --bench service_core` | the core thread of `service_e2e` without I/O: simulated time, `service_e2e`'s reports (a tenth of the fleet per round starts to need encryption after 3 rounds), every instruction acked ({} instructions per run), a step every {BATCH} messages; per report: sequence floor, QoS history, engine, signed instructions, records and engine state for the store batch; CPU time of the thread (/proc/thread-self/schedstat); load {load} at start |\n",
        median(&mut sustained),
        median(&mut cold),
        machine(),
        last.instructions,
    );
    print!("{row}");
    if std::env::var_os("CORE_BENCH_NO_WRITE").is_none() {
        common::write_marked_table(
            "service-core",
            "## Allocator service core\n\nWritten by `cargo bench -p shardline-allocator-core --bench service_core` (allocator/core/benches/service_core.rs): the `core` column of the service table above, measured alone.",
            &row,
        );
    }
}
