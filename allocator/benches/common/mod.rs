//! Helpers the end-to-end allocator benches share: free ports, the clock,
//! the allocator process, device keys, `/metrics` readings, medians and the
//! machine line of a BENCHMARKS.md row.
#![allow(dead_code)] // each bench uses its own subset

// The core crate's bench helpers (machine, thread CPU, sections of
// BENCHMARKS.md between markers): one copy for both crates' benches.
#[path = "../../core/benches/common/mod.rs"]
mod core_common;
#[allow(unused_imports)] // each bench uses its own subset
pub use core_common::{cpu_ns, write_marked_table};

use shardline_allocator::service::http;
use shardline_shared::sign::KeyPair;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The allocator (or mosquitto) process, killed when the bench lets go of it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A simulated device's key: `salt` keeps the benches' fleets apart.
pub fn device_key(salt: u8, i: usize) -> KeyPair {
    let mut seed = [salt; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    KeyPair::from_seed(&seed)
}

pub fn metric(api: &str, name: &str) -> f64 {
    let r = http::request(api, "GET", "/metrics", None, None).expect("metrics");
    r.body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Puts `section` (which starts with its own `## heading` line) into
/// BENCHMARKS.md: in place of the section under `heading` (up to the next
/// `## `), else right before the section under `before`, else at the end.
pub fn put_section(heading: &str, section: &str, before: Option<&str>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match old.find(heading) {
        Some(start) => {
            let rest = &old[start + 2..];
            let end = rest
                .find("\n## ")
                .map(|e| start + 2 + e + 1)
                .unwrap_or(old.len());
            format!("{}{}\n{}", &old[..start], section, &old[end..])
        }
        None => match before.and_then(|b| old.find(b)) {
            Some(at) => format!("{}{}\n{}", &old[..at], section, &old[at..]),
            None => format!("{}\n\n{section}", old.trim_end()),
        },
    };
    std::fs::write(&path, new).expect("write BENCHMARKS.md");
}

pub fn machine(load_at_start: &str) -> String {
    format!(
        "{}; load average {load_at_start} when the bench started",
        core_common::machine()
    )
}

/// Writes the allocator's configuration into `dir` (broker `url`, empty for
/// the embedded one listening on `mqtt_port`; the shipped catalog and
/// tiers), starts the binary `bin` and waits for its API. Returns the
/// process and the API's base URL.
pub async fn start_allocator(
    bin: &Path,
    dir: &Path,
    url: &str,
    mqtt_port: u16,
    api_port: u16,
) -> (Killed, String) {
    // The shipped catalog asks each device for the qos shaper's own
    // addresses (device_config); simulated devices have none, so the shaper
    // gets fleet-wide placeholders (as in the service tests), or nothing
    // that needs it would ever be planned.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
    let cat = dir.join("catalog");
    std::fs::create_dir_all(&cat).unwrap();
    std::fs::copy(shipped.join("tiers.toml"), cat.join("tiers.toml")).unwrap();
    let text = std::fs::read_to_string(shipped.join("catalog.toml")).unwrap();
    let text = shardline_allocator_core::policy::bench_load::bench_catalog(&text)
        .unwrap_or_else(|e| panic!("{e}: update policy::bench_load"));
    std::fs::write(cat.join("catalog.toml"), text).unwrap();
    std::fs::write(
        dir.join("allocator.toml"),
        format!(
            "[broker]\nurl = \"{url}\"\nlisten = \"127.0.0.1:{mqtt_port}\"\nclient_id = \"bench-allocator\"\n\
             [store]\npath = \"{d}/allocator.redb\"\n[signer]\nkey_file = \"{d}/signing.key\"\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken_file = \"{d}/api-token\"\n\
             [policy]\ncatalog = \"{c}/catalog.toml\"\nagreements = \"{c}/tiers.toml\"\ntick_ms = 1000\n",
            d = dir.display(),
            c = cat.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("allocator.log")).unwrap();
    let alloc = Killed(
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(dir.join("allocator.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{api_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http::request(&api, "GET", "/v1/health", None, None)
        .map(|r| r.status)
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "allocator did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (alloc, api)
}

/// CPU time (user + system, in microseconds) each thread of process `pid`
/// has used so far, by thread name (`/proc/{pid}/task/*/stat`). Threads of
/// one name (the runtime's workers, say) are summed.
pub fn cpu_by_thread(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: the name may hold spaces, so split at the
        // last ')'; utime and stime are the 12th and 13th fields after it.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // USER_HZ is 100 in the kernel's ABI on every architecture we run.
        *out.entry(name).or_insert(0) += (ticks(11) + ticks(12)) * 10_000;
    }
    out
}

/// What each named thread used between two [`cpu_by_thread`] readings.
pub fn cpu_between(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, &t)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), t.saturating_sub(was))
        })
        .collect()
}
