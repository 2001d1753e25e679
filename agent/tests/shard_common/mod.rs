//! Helpers shared by the shard tests: build the shard cdylibs with the same
//! target dir and profile as the test binary (robust on a clean clone),
//! install them into a temporary shard directory, make activations.
#![allow(dead_code)]

use shardline_agent::shardhost::install::{self, CATALOG, FIXTURES};
use shardline_agent::shardhost::{
    HostEvent, PolicyConfig, ShardSpec, Supervisor, SupervisorConfig,
};
use shardline_shared::msg::{Activation, ResourceLimits, ShardKind};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_shardline-agent");

/// `target/<profile>` of this test run.
pub fn profile_dir() -> PathBuf {
    Path::new(AGENT)
        .parent()
        .expect("binary has a directory")
        .to_owned()
}

/// Builds every shard crate once per test binary.
pub fn build_shards() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile = profile_dir();
            let target_dir = profile.parent().expect("target dir").to_owned();
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.current_dir(root)
                .arg("build")
                .arg("--target-dir")
                .arg(&target_dir);
            if profile.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            for p in [
                "shard-fixture-misbehave",
                "shard-fixture-qos-misbehave",
                "shard-fixture-abi-v2",
                "shard-crypto-chacha20poly1305",
                "shard-crypto-aes256gcm",
                "shard-auth-psk",
                "shard-vpn-tunnel",
                "shard-qos-shaper",
                "shard-qos-dscp",
            ] {
                cmd.arg("-p").arg(p);
            }
            let st = cmd.status().expect("run cargo build for the shard crates");
            assert!(st.success(), "building the shard crates failed");
            profile
        })
        .clone()
}

/// A fresh shard dir with the catalog and the fixtures installed.
pub fn shard_dir() -> tempfile::TempDir {
    let profile = build_shards();
    let dir = tempfile::Builder::new()
        .prefix("sl-shards-")
        .tempdir()
        .expect("tempdir");
    let mut set = CATALOG.to_vec();
    set.extend_from_slice(FIXTURES);
    install::install(&profile, dir.path(), &set).expect("install shards");
    dir
}

pub fn sha256_file(path: &Path) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).expect("read library")).into()
}

pub fn lib_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}@{}.so", install::CATALOG_VERSION))
}

pub const LIMITS: ResourceLimits = ResourceLimits {
    cpu_quota_permille: 1000,
    cpu_weight: 100,
    memory_max_bytes: 256 << 20,
    nice: 0,
};

/// An activation of `id@0.1.0` with the file's real hash.
pub fn spec(
    dir: &Path,
    capability: &str,
    id: &str,
    config: &str,
    limits: ResourceLimits,
) -> ShardSpec {
    let sha256 = sha256_file(&lib_path(dir, id));
    ShardSpec::new(Activation {
        shard: format!("{id}@{}", install::CATALOG_VERSION)
            .parse()
            .expect("shard ref"),
        capability: capability.to_owned(),
        kind: ShardKind::Compute,
        sha256,
        config: config.as_bytes().to_vec(),
        limits,
        priority: 10,
        lease_expires_at_ms: u64::MAX,
    })
}

pub fn supervisor_config(dir: &Path) -> SupervisorConfig {
    let mut cfg = SupervisorConfig::new(dir).expect("config");
    cfg.agent_exe = PathBuf::from(AGENT);
    cfg.heartbeat = Duration::from_millis(100);
    cfg.hang_after = Duration::from_millis(500);
    cfg.policy = PolicyConfig {
        max_failures: 2,
        backoff_base_ms: 50,
        backoff_max_ms: 200,
        stable_after_ms: 60_000,
    };
    cfg
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Resident set of this process, KiB.
pub fn own_rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss");
    pages * 4
}

/// Polls the supervisor until an event satisfies `pred` (or `timeout`):
/// every event seen, and when the matching one came.
pub fn wait_for(
    sup: &mut Supervisor,
    timeout: Duration,
    mut pred: impl FnMut(&HostEvent) -> bool,
) -> (Vec<HostEvent>, Option<Instant>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        for e in sup.poll(Instant::now()) {
            let hit = pred(&e);
            seen.push(e);
            if hit {
                return (seen, Some(Instant::now()));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (seen, None)
}

/// A host came up.
pub fn started(e: &HostEvent) -> bool {
    matches!(e, HostEvent::Started { .. })
}

/// A UDP port free on the loopback right now, below the ephemeral range:
/// the tests kill shard hosts and the supervisor starts them again on the
/// same ports (see `xtask::kit::proc::free_stable_udp_port`).
pub fn free_port() -> u16 {
    let port = xtask::kit::proc::free_stable_udp_port();
    assert_ne!(port, 0, "no free UDP port on loopback");
    port
}

/// Throughput (bit/s of UDP payload) arriving at the receiver while a
/// flood of `offered_bps` goes into the shaper, measured over `secs`
/// after a 1 s warm-up (then `during` gets the host's pid, while the flood
/// runs: what a test wants to see of the running host). Returns (forwarded,
/// offered) and leaves the supervisor shut down and dropped.
pub fn flood_through_shaper_in(
    cfg: SupervisorConfig,
    dir: &Path,
    bandwidth_kbps: u64,
    offered_bps: u64,
    secs: u64,
    during: impl FnOnce(u32),
) -> (u64, u64) {
    let mut sup = Supervisor::new(cfg);
    let (listen, forward) = (free_port(), free_port());
    let rx = UdpSocket::bind(("127.0.0.1", forward)).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut shaper: ShardSpec = spec(
        dir,
        "qos",
        "qos-shaper",
        // The shaper itself would pass 500 Mbit/s: only the cap limits.
        &format!("listen = 127.0.0.1:{listen}\nforward = 127.0.0.1:{forward}\nrate_bps = 500000000\nqueue_packets = 4096\n"),
        LIMITS,
    );
    shaper.bandwidth_kbps = bandwidth_kbps;
    sup.activate("qos", vec![shaper], Instant::now())
        .expect("activate");
    let (ev, at) = wait_for(&mut sup, Duration::from_secs(5), |e| {
        matches!(e, HostEvent::Started { .. })
    });
    assert!(at.is_some(), "{ev:?}");
    let host_pid = ev
        .iter()
        .find_map(|e| match e {
            HostEvent::Started { pid, .. } => Some(*pid),
            _ => None,
        })
        .expect("a started host");
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = {
        let (bytes, stop) = (bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = rx.recv(&mut buf) {
                    bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let payload = [0x42u8; 1000];
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Paced to `offered_bps`.
                let due = start + Duration::from_secs_f64((n * 8000) as f64 / offered_bps as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send_to(&payload, ("127.0.0.1", listen)).is_ok() {
                    sent.fetch_add(1000, Ordering::SeqCst);
                }
                n += 1;
            }
        })
    };
    let warm = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm {
        sup.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(20));
    }
    during(host_pid);
    let (b0, s0, t0) = (
        bytes.load(Ordering::SeqCst),
        sent.load(Ordering::SeqCst),
        Instant::now(),
    );
    while t0.elapsed() < Duration::from_secs(secs) {
        let ev = sup.poll(Instant::now());
        assert!(
            !ev.iter().any(|e| matches!(e, HostEvent::Failed { .. })),
            "{ev:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let el = t0.elapsed().as_secs_f64();
    let (b1, s1) = (bytes.load(Ordering::SeqCst), sent.load(Ordering::SeqCst));
    stop.store(true, Ordering::SeqCst);
    flood.join().unwrap();
    counter.join().unwrap();
    sup.shutdown();
    drop(sup);
    (
        ((b1 - b0) as f64 * 8.0 / el) as u64,
        ((s1 - s0) as f64 * 8.0 / el) as u64,
    )
}
