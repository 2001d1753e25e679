//! Policy engine throughput and memory, single core, release build:
//! reports/s through `Engine::handle` with 100,000 devices in memory, the cost
//! of one fleet-wide tick, and memory per device (process RSS growth and the
//! serialized state size), and explicit requests (acquire/release pairs of
//! application instances at steady state). Writes its rows into the "Policy engine" section
//! of BENCHMARKS.md (between the policy-bench markers).
//!
//! Run: `cargo bench -p shardline-allocator-core --bench policy`
//! (`POLICY_BENCH_DEVICES`, `POLICY_BENCH_RUNS` override the defaults;
//! `POLICY_BENCH_NO_WRITE=1` only prints).

use shardline_allocator_core::policy::prng::SplitMix64;
use shardline_allocator_core::policy::simulate::{EXAMPLE_CATALOG, EXAMPLE_TIERS};
use shardline_allocator_core::policy::{Agreements, Catalog, Engine, Event, PolicyConfig};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::{
    ClassStats, DeviceResources, Enforcement, QosNeed, QosReport, RejectionCounters, ShardState,
    ShardStatus, TrafficClass,
};
use std::time::Instant;

mod common;
use common::{cpu_ns, median};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn class(class: TrafficClass, rate_bps: u64, need: QosNeed) -> ClassStats {
    ClassStats {
        class,
        bytes: rate_bps / 8 * 10,
        packets: rate_bps / 8 * 10 / 800 + 1,
        rate_bps,
        rtt_p50_us: Some(20_000),
        rtt_p95_us: Some(40_000),
        jitter_us: Some(1_000),
        loss_permille: 2,
        active_flows: 3,
        need,
    }
}

/// One round of reports: every device, its shards as the engine granted them.
fn round(engine: &Engine, ids: &[DeviceId], seq: u64, rng: &mut SplitMix64) -> Vec<QosReport> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let mut classes = vec![class(TrafficClass::Web, 300_000, QosNeed::default())];
            // Most devices keep their needs; ~10 % change each round.
            let flip = rng.below(10) == 0;
            let calls = (i % 3 != 0) ^ flip;
            if calls {
                let need = QosNeed {
                    latency_sensitive: true,
                    ..QosNeed::default()
                };
                classes.push(class(
                    TrafficClass::Calls,
                    200_000 + rng.below(100_000),
                    need,
                ));
            }
            if i % 4 == 0 {
                let need = QosNeed {
                    needs_encryption: true,
                    ..QosNeed::default()
                };
                classes.push(class(TrafficClass::Sensitive, 500_000, need));
            }
            let shards = engine
                .device(id)
                .map(|v| {
                    v.leases
                        .iter()
                        .map(|l| ShardStatus {
                            shard: l.shard.clone(),
                            capability: l.capability.clone(),
                            state: ShardState::Running,
                            cpu_permille: l.limits.cpu_quota_permille / 2,
                            rss_kib: 1024,
                            restarts: 0,
                            errors: 0,
                            last_failure: None,
                            lease_expires_at_ms: l.expires_at_ms,
                            enforcement: Enforcement::CgroupV2,
                        })
                        .collect()
                })
                .unwrap_or_default();
            QosReport {
                device: id.clone(),
                seq,
                window_start_ms: 0,
                window_ms: 10_000,
                classes,
                resources: DeviceResources {
                    cpu_cores: 4,
                    cpu_load_permille: 200,
                    mem_total_kib: 1 << 20,
                    mem_available_kib: 512 * 1024,
                    aes_hw: i % 2 == 0,
                    arch: "aarch64".to_owned(),
                },
                shards,
                applied_instruction_seq: seq,
                rejections: RejectionCounters::default(),
                lending: Default::default(),
            }
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let devices: usize = std::env::var("POLICY_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runs: usize = std::env::var("POLICY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let catalog = Catalog::from_toml_str(EXAMPLE_CATALOG, "catalog.toml").expect("catalog");
    let tiers = Agreements::from_toml_str(EXAMPLE_TIERS, "tiers.toml", &catalog).expect("tiers");
    let rss0 = rss_kib();
    let mut engine = Engine::new(catalog, tiers, PolicyConfig::default());
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::new(format!("router-{i:07}")).expect("id"))
        .collect();
    let tiers = ["basic", "standard", "premium"];
    let mut now = 1_000_000u64;
    for (i, id) in ids.iter().enumerate() {
        engine.handle(
            now,
            Event::Enrolled {
                device: id.clone(),
                tier: tiers[i % 3].to_owned(),
                tenant: Some(format!("tenant-{}", i % 100)),
            },
        );
        let config =
            shardline_allocator_core::policy::simulate::placeholder_device_config(engine.catalog());
        engine.handle(
            now,
            Event::DeviceConfig {
                device: id.clone(),
                config,
                changed: Default::default(),
            },
        );
    }
    let mut rng = SplitMix64::new(42);
    let mut seq = 1;
    // Warm-up round: first grants.
    let reports = round(&engine, &ids, seq, &mut rng);
    for r in reports {
        engine.handle(now, Event::Report(r));
    }
    let mut rates = Vec::new();
    let mut wall_rates = Vec::new();
    let mut instructs = 0usize;
    let mut dirty = 0usize;
    for _ in 0..runs {
        seq += 1;
        now += 10_000;
        let reports = round(&engine, &ids, seq, &mut rng);
        let n = reports.len();
        let t = Instant::now();
        let c0 = cpu_ns();
        for r in reports {
            instructs += engine
                .handle(now, Event::Report(r))
                .iter()
                .filter(|a| matches!(a, shardline_allocator_core::policy::Action::Instruct { .. }))
                .count();
            // The service persists what an event changed, right after it.
            dirty += engine.take_dirty().len();
        }
        let secs = t.elapsed().as_secs_f64();
        wall_rates.push(n as f64 / secs);
        let cpu_secs = match (c0, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => secs,
        };
        rates.push(n as f64 / cpu_secs);
    }
    let mut tick_ms = Vec::new();
    for _ in 0..runs {
        now += 10_000;
        let t = Instant::now();
        let c0 = cpu_ns();
        engine.handle(now, Event::Tick);
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        tick_ms.push(match (c0, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
            _ => wall,
        });
    }
    let rss1 = rss_kib();
    let per_device_rss = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / devices as f64;
    let (req_rate, req_wall, req_runs, req_outcomes) =
        requests_phase(&mut engine, &ids, &mut now, runs);
    let json_bytes: usize = ids
        .iter()
        .step_by(97)
        .filter_map(|id| engine.device_state(id))
        .map(|s| serde_json::to_vec(s).map(|v| v.len()).unwrap_or(0))
        .sum::<usize>()
        / ids.iter().step_by(97).count().max(1);
    let runs_str = |v: &[f64], unit: f64| {
        v.iter()
            .map(|x| format!("{:.0}", x / unit))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rate_runs = runs_str(&rates, 1000.0);
    let wall_rate = median(&mut wall_rates);
    let tick_runs = runs_str(&tick_ms, 1.0);
    let rate = median(&mut rates);
    let tick = median(&mut tick_ms);
    let machine = format!(
        "{}, {} cores",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned())
            )
            .unwrap_or_else(|| "unknown CPU".into()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let cmd = "`cargo bench -p shardline-allocator-core --bench policy`";
    let verdict = if rate >= 200_000.0 { "meets" } else { "misses" };
    let rows = format!(
        "| reports through `Engine::handle`, 1 core, {devices} devices in memory | {:.0} k reports/s per CPU-second (median of {runs}: {rate_runs} k; wall clock {:.0} k/s) | {machine} | {cmd} | {verdict} ≥ 200 k/s/core; CPU time of the benchmark thread (/proc/thread-self/schedstat) because the 2-core machine is shared (load ≈ {load}); 2–3 classes per report, ~10 % of devices change needs each round ({instructs} instructions over the runs), `take_dirty` after every report ({dirty} states to persist), release build |\n\
         | one fleet-wide `Tick`, {devices} devices | {tick:.1} ms of CPU (median of {runs}: {tick_runs} ms) | {machine} | {cmd} | devices with nothing due are skipped (per-device wake-up time) |\n\
         | explicit requests through `Engine::handle`, 1 core, acquire + release pairs, {req_devices} devices × 4 instances | {:.0} k requests/s per CPU-second (median of {runs}: {req_runs} k; wall clock {:.0} k/s) | {machine} | {cmd} | {req_verdict} ≥ 50 k/s/core; each request verified elsewhere (the service), here: sequence floor, rate limit, quota, pool, grant or queue, answer; `take_dirty` after every request; {req_outcomes} |\n\
         | memory per device | {per_device_rss:.0} bytes of RSS growth; {json_bytes} bytes of serialized state (JSON) | {machine} | {cmd} | RSS growth of the process over enrolment + {} report rounds / devices; includes the allocator's free lists |\n",
        rate / 1000.0,
        wall_rate / 1000.0,
        req_rate / 1000.0,
        req_wall / 1000.0,
        runs + 1,
        req_devices = REQUEST_DEVICES.min(devices),
        req_verdict = if req_rate >= 50_000.0 { "meets" } else { "misses" },
    );
    print!("{rows}");
    if std::env::var_os("POLICY_BENCH_NO_WRITE").is_none() {
        common::write_marked_table(
            "policy-bench",
            "## Policy engine\n\nWritten by `cargo bench -p shardline-allocator-core --bench policy` (allocator/core/benches/policy.rs).",
            &rows,
        );
    }
}

/// Devices whose application instances send requests in the request phase.
const REQUEST_DEVICES: usize = 2_000;

/// Acquire/release pairs from 4 instances on each of the first
/// [`REQUEST_DEVICES`] devices, round robin (so no instance exceeds its
/// rate limit), `now` advancing 1 ms per pair. Returns the median rate per
/// CPU-second and per wall second, the runs, and what the answers were.
fn requests_phase(
    engine: &mut Engine,
    ids: &[DeviceId],
    now: &mut u64,
    runs: usize,
) -> (f64, f64, String, String) {
    use shardline_allocator_core::policy::Action;
    use shardline_shared::ids::AppName;
    use shardline_shared::msg::ShardKind;
    use shardline_shared::request::{Answer, AppRequest, GrantOutcome, RequestOp};
    let devices = &ids[..REQUEST_DEVICES.min(ids.len())];
    let apps: Vec<(AppName, AppName)> = (0..4)
        .map(|i| {
            (
                AppName::new("worker").expect("app"),
                AppName::new(format!("w{i}")).expect("instance"),
            )
        })
        .collect();
    let mut seqs = vec![0u64; devices.len()];
    let (mut granted, mut other) = (0u64, 0u64);
    let mut rates = Vec::new();
    let mut walls = Vec::new();
    let pairs = 100_000usize;
    for _ in 0..runs + 1 {
        let t = Instant::now();
        let c0 = cpu_ns();
        for p in 0..pairs {
            *now += 1;
            let d = p % devices.len();
            let (app, instance) = &apps[(p / devices.len()) % apps.len()];
            let kind = if p % 2 == 0 {
                ShardKind::Compute
            } else {
                ShardKind::Data
            };
            let mut ask = |engine: &mut Engine, op: RequestOp| {
                seqs[d] += 1;
                let out = engine.handle(
                    *now,
                    Event::AppRequest {
                        request: AppRequest {
                            device: devices[d].clone(),
                            seq: seqs[d],
                            app: app.clone(),
                            instance: instance.clone(),
                            at_ms: *now,
                            op,
                        },
                    },
                );
                engine.take_dirty();
                out
            };
            let out = ask(
                engine,
                RequestOp::Acquire {
                    kind,
                    units: 1,
                    duration_ms: 30_000,
                    priority: 0,
                },
            );
            let grant = out.iter().find_map(|a| match a {
                Action::Answer(a) => match a.answer {
                    Answer::Granted(g) => Some(g.grant),
                    _ => None,
                },
                _ => None,
            });
            match grant {
                Some(g) => {
                    granted += 1;
                    ask(
                        engine,
                        RequestOp::Release {
                            grant: g,
                            outcome: GrantOutcome::Completed,
                        },
                    );
                }
                None => {
                    other += 1;
                    ask(engine, RequestOp::Query);
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = match (c0, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => secs,
        };
        rates.push((2 * pairs) as f64 / cpu);
        walls.push((2 * pairs) as f64 / secs);
    }
    // The first run warms the instances up (creation, first grants).
    rates.remove(0);
    walls.remove(0);
    let shown = rates
        .iter()
        .map(|x| format!("{:.0}", x / 1000.0))
        .collect::<Vec<_>>()
        .join(", ");
    let outcomes = format!(
        "{granted} acquisitions granted and released, {other} not granted (queried instead)"
    );
    (median(&mut rates), median(&mut walls), shown, outcomes)
}
