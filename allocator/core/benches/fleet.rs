//! The fleet simulation as a benchmark (issue 17's targets): 1,000
//! devices for 7 simulated days under every policy variant, for several
//! seeds; the figures over the first 24 h, 72 h and 168 h of each run,
//! as the median over the seeds with their range. Writes its rows into
//! BENCHMARKS.md between the fleet-sim markers.
//!
//! Run: `cargo bench -p shardline-allocator-core --bench fleet`
//! (`FLEET_BENCH_SEEDS=1,2,3`, `FLEET_BENCH_DEVICES`, `FLEET_BENCH_HOURS`
//! override the defaults; `FLEET_BENCH_NO_WRITE=1` only prints). The
//! simulation is deterministic: a seed gives the same figures on every
//! machine and run, so "several runs" are several seeds (fleets).

use shardline_allocator_core::policy::simulate::{run_all, SimParams, SimReport, VariantResult};
use std::time::Instant;

mod common;
use common::{env_or, machine};

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Tracked files changed, BENCHMARKS.md aside (the benches' own output).
fn dirty() -> bool {
    std::process::Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ":(top)",
            ":(top,exclude)BENCHMARKS.md",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .is_ok_and(|o| !o.stdout.is_empty())
}

/// "median (min–max)" of `xs` formatted by `f`.
fn spread(mut xs: Vec<f64>, f: impl Fn(f64) -> String) -> String {
    xs.sort_by(f64::total_cmp);
    let (lo, hi) = (xs[0], xs[xs.len() - 1]);
    let med = xs[xs.len() / 2];
    if xs.len() == 1 || f(lo) == f(hi) {
        f(med)
    } else {
        format!("{} ({}–{})", f(med), f(lo), f(hi))
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it too.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seeds: Vec<u64> = std::env::var("FLEET_BENCH_SEEDS")
        .unwrap_or_else(|_| "1,2,3".to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let devices: u32 = env_or("FLEET_BENCH_DEVICES", 1000);
    let hours: u32 = env_or("FLEET_BENCH_HOURS", 168);
    let started = Instant::now();
    // Seeds run in parallel: they are independent fleets.
    let reports: Vec<SimReport> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| {
                s.spawn(move || {
                    let params = SimParams {
                        devices,
                        hours,
                        seed,
                        tick_ms: 300_000,
                        misbehaving_permille: 50,
                    };
                    run_all(&params)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().and_then(Result::ok))
            .collect()
    });
    if reports.len() != seeds.len() || reports.is_empty() {
        eprintln!("a simulation failed");
        std::process::exit(1);
    }
    for r in &reports {
        print!("{}", r.table());
    }
    let wall = started.elapsed().as_secs_f64();
    let names: Vec<String> = reports[0]
        .variants
        .iter()
        .map(|v| v.variant.clone())
        .collect();
    let horizons: Vec<u32> = reports[0]
        .horizons
        .iter()
        .filter_map(|h| h.first().map(|v| v.hours))
        .collect();
    let mut rows = String::new();
    let mut verdicts = Vec::new();
    for &h in &horizons {
        let at = |name: &str| -> Vec<&VariantResult> {
            reports.iter().filter_map(|r| r.at(h, name)).collect()
        };
        for name in &names {
            let vs = at(name);
            let statics = at("static");
            let reactives = at("reactive");
            let of_static: Vec<f64> = vs
                .iter()
                .zip(&statics)
                .map(|(v, s)| v.mean_units / s.mean_units.max(1e-9))
                .collect();
            let hit: Vec<f64> = vs
                .iter()
                .map(|v| v.preactivation_hits as f64 / (v.preactivations.max(1)) as f64)
                .collect();
            let beats_reactive = vs
                .iter()
                .zip(&reactives)
                .all(|(v, r)| v.served_fraction >= r.served_fraction);
            rows.push_str(&format!(
                "| {h} h | {name} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |\n",
                spread(vs.iter().map(|v| v.served_fraction).collect(), pct),
                spread(
                    vs.iter().map(|v| v.well_behaved_served_fraction).collect(),
                    pct
                ),
                spread(vs.iter().map(|v| v.mean_units).collect(), |x| format!(
                    "{x:.0}"
                )),
                spread(of_static, |x| format!("{:.0} %", x * 100.0)),
                spread(
                    vs.iter().map(|v| v.served_mbit_per_unit_hour).collect(),
                    |x| format!("{x:.0}")
                ),
                spread(
                    vs.iter().map(|v| f64::from(v.reaction_ticks_max)).collect(),
                    |x| format!("{x:.0}")
                ),
                spread(
                    vs.iter()
                        .map(|v| f64::from(v.max_flaps_per_stabilization))
                        .collect(),
                    |x| format!("{x:.0}")
                ),
                if vs.iter().any(|v| v.preactivations > 0) {
                    spread(hit, pct)
                } else {
                    "–".to_owned()
                },
                if beats_reactive { "yes" } else { "no" },
            ));
            if name == "full" {
                let good = vs.iter().all(|v| v.well_behaved_served_fraction >= 0.95);
                let units = vs
                    .iter()
                    .zip(&statics)
                    .all(|(v, s)| v.mean_units <= 0.70 * s.mean_units);
                let react = vs.iter().all(|v| v.reaction_ticks_max <= 5);
                let flaps = vs.iter().all(|v| v.max_flaps_per_stabilization <= 1);
                verdicts.push(format!(
                    "{h} h: full ≥ reactive {}, ≥ 95 % well-behaved {}, ≤ 70 % of static's units {}, quota cut within 5 ticks {}, ≤ 1 flap per stabilization period {}",
                    yes(beats_reactive),
                    yes(good),
                    yes(units),
                    yes(react),
                    yes(flaps)
                ));
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    let seeds_text = seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let header = format!(
        "Written by `cargo bench -p shardline-allocator-core --bench fleet` on {} (commit {}{}; {wall:.0} s wall, seeds in parallel, load {load} at the end): {devices} devices, {hours} h, 5-minute ticks, seeds {seeds_text}; each cell is the median over the seeds (range in brackets). Deterministic: a seed gives the same figures on any machine.\n\nTargets (issue 17): {}.\n\n",
        machine(),
        commit(),
        if dirty() { ", with local changes: not the project's figures" } else { "" },
        verdicts.join("; ")
    );
    let table = format!(
        "| horizon | variant | served | well-behaved served | mean units (of static's) | Mbit per unit-hour | quota cut, ticks (max) | flaps per stabilization period (max, one capability) | pre-activations followed by demand | ≥ reactive |\n|---|---|---|---|---|---|---|---|---|---|\n{rows}"
    );
    println!("{header}{table}");
    if std::env::var_os("FLEET_BENCH_NO_WRITE").is_none() {
        common::write_marked(
            "fleet-sim",
            "## Fleet simulation",
            &format!("{header}{table}"),
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "MISSED"
    }
}
