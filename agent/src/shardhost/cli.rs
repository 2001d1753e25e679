//! `shardline-agent shards list|run|install` and the hidden `host` mode.
//!
//! `shards list` never maps a library in its own process: each file is
//! probed by a child (`host --describe`) that opens and hashes it, then
//! enters the same sandbox as a capability host (own uid or user namespace,
//! Landlock, seccomp) before `dlopen`, so a library's ELF constructors never
//! run with the caller's privileges.
#![forbid(unsafe_code)]
use super::config::RunConfig;
use super::loader::{self, ShardInfo};
use super::supervisor::{HostEvent, Supervisor, SupervisorConfig};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ShardsArgs {
    #[command(subcommand)]
    command: ShardsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ShardsCommand {
    /// List the shard libraries in DIR: id, version, SHA-256, ABI, or why a file fails the checks.
    List { dir: PathBuf },
    /// Run one capability locally in a host process, as the daemon would.
    Run {
        capability: String,
        /// TOML file listing the shards (paths, hashes, config, limits).
        #[arg(long)]
        config: PathBuf,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
        /// Do not use cgroups (rlimits only).
        #[arg(long)]
        no_cgroups: bool,
    },
    /// Install built shard libraries from a cargo profile dir (e.g. target/release) into DEST.
    Install {
        profile_dir: PathBuf,
        dest: PathBuf,
        /// Also install the test fixtures.
        #[arg(long)]
        fixtures: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Probe one library and print its descriptor as JSON (used by `shards list`).
    #[arg(long, requires = "shard_dir")]
    describe: Option<PathBuf>,
    #[arg(long)]
    shard_dir: Option<PathBuf>,
}

/// What a probe of one library found.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Probe {
    sha256: Option<String>,
    info: Option<ShardInfo>,
    error: Option<String>,
}

fn init_tracing(default: &str) {
    crate::logging::init("RUST_LOG", default, true);
}

pub fn shards(args: ShardsArgs) -> anyhow::Result<ExitCode> {
    init_tracing("info");
    match args.command {
        ShardsCommand::List { dir } => list(&dir),
        ShardsCommand::Run {
            capability,
            config,
            duration,
            no_cgroups,
        } => run(&capability, &config, duration, no_cgroups),
        ShardsCommand::Install {
            profile_dir,
            dest,
            fixtures,
        } => {
            let mut set = super::install::CATALOG.to_vec();
            if fixtures {
                set.extend_from_slice(super::install::FIXTURES);
            }
            for p in super::install::install(&profile_dir, &dest, &set)? {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(dir: &Path) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the agent executable")?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    entries.sort();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<40} {:<28} {:<8} {:<4} {:<18} {:<64} STATUS",
        "FILE", "ID", "VERSION", "ABI", "COST(CPU‰,MEM)", "SHA256"
    )?;
    for path in entries {
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // Loading runs the library's constructors: probe in a child, never in this process.
        let probe = std::process::Command::new(&exe)
            .arg("host")
            .arg("--describe")
            .arg(&path)
            .arg("--shard-dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        let probe: Probe = match probe {
            Ok(o) => match serde_json::from_slice(&o.stdout) {
                Ok(p) => p,
                Err(_) => Probe {
                    sha256: None,
                    info: None,
                    error: Some(format!("probe died ({})", o.status)),
                },
            },
            Err(e) => Probe {
                sha256: None,
                info: None,
                error: Some(format!("cannot run probe: {e}")),
            },
        };
        let (id, version, abi, cost) = match &probe.info {
            Some(i) => (
                i.id.clone(),
                i.version.clone(),
                i.abi_version.to_string(),
                format!("{}‰,{}KiB", i.cost_cpu_permille, i.cost_memory_bytes / 1024),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let mut status = probe.error.clone().unwrap_or_else(|| "ok".into());
        if let Some(i) = &probe.info {
            let expected = format!("{}@{}.so", i.id, i.version);
            if probe.error.is_none() && file != expected {
                status = format!("file name should be {expected}");
            }
        }
        writeln!(
            out,
            "{:<40} {:<28} {:<8} {:<4} {:<18} {:<64} {}",
            file,
            id,
            version,
            abi,
            cost,
            probe.sha256.as_deref().unwrap_or("-"),
            status
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run(
    capability: &str,
    config: &Path,
    duration: Option<f64>,
    no_cgroups: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = RunConfig::load(config, capability)?;
    // Block SIGINT/SIGTERM before any thread or child exists; a thread waits for them.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.thread_block().context("blocking signals")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if set.wait().is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut scfg = SupervisorConfig::new(&cfg.shard_dir)?;
    scfg.use_cgroups = !no_cgroups;
    if let Some(hb) = cfg.heartbeat_ms {
        scfg.heartbeat = Duration::from_millis(hb.clamp(10, 5_000));
        scfg.hang_after = scfg.heartbeat * 5;
    }
    if let Ok(v) = std::env::var("RUST_LOG") {
        scfg.host_env.push(("RUST_LOG".into(), v));
    }
    let mut sup = Supervisor::new(scfg);
    let start = Instant::now();
    let deadline = duration.map(|d| start + Duration::from_secs_f64(d.max(0.0)));
    let mut failures = 0u32;
    let print = |events: Vec<HostEvent>, failures: &mut u32| {
        for e in events {
            if matches!(e, HostEvent::Failed { .. } | HostEvent::GaveUp { .. }) {
                *failures += 1;
            }
            println!("{:>8.3}s {e:?}", start.elapsed().as_secs_f64());
        }
    };
    print(
        sup.activate(capability, cfg.shards, Instant::now())?,
        &mut failures,
    );
    let mut last_status = Instant::now();
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(50));
        print(sup.poll(Instant::now()), &mut failures);
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            for s in sup.statuses() {
                println!("{:>8.3}s status {s:?}", start.elapsed().as_secs_f64());
            }
            for (i, st) in sup.shard_stats(capability).iter().enumerate() {
                println!(
                    "{:>8.3}s stats shard[{i}] {st:?}",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    for s in sup.statuses() {
        println!("{:>8.3}s status {s:?}", start.elapsed().as_secs_f64());
    }
    for (i, st) in sup.shard_stats(capability).iter().enumerate() {
        println!(
            "{:>8.3}s stats shard[{i}] {st:?}",
            start.elapsed().as_secs_f64()
        );
    }
    print(sup.shutdown(), &mut failures);
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn host(args: HostArgs) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    if let (Some(path), Some(dir)) = (args.describe, args.shard_dir) {
        return describe(&path, &dir);
    }
    // The agent passes one end of a seqpacket socketpair as stdin.
    let kind = nix::sys::stat::fstat(0).context("fstat stdin")?;
    if kind.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        anyhow::bail!("host mode is started by the agent with a socket on stdin");
    }
    let ipc = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("dup ipc socket")?;
    // Shards must not read the protocol socket by accident: stdin becomes /dev/null.
    let null = std::fs::File::open("/dev/null").context("open /dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0).context("dup2 /dev/null")?;
    Ok(ExitCode::from(super::host::run(ipc)))
}

fn describe(path: &Path, dir: &Path) -> anyhow::Result<ExitCode> {
    let _ = super::limits::apply_process_limits(&super::config::DEFAULT_LIMITS);
    let uid = nix::unistd::geteuid().as_raw();
    let probe = match loader::open_verified(dir, path, None, uid) {
        Err(e) => Probe {
            sha256: None,
            info: None,
            error: Some(e.to_string()),
        },
        Ok(v) => {
            let sha = hex::encode(v.sha256());
            // Constructors run at load: only inside the sandbox.
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
            let plan =
                super::sandbox::SandboxPlan::for_shard_dir(&canonical, super::sandbox::PROBE_SLOT);
            if let Err(e) = super::sandbox::enter(&plan) {
                let probe = Probe {
                    sha256: Some(sha),
                    info: None,
                    error: Some(format!("not probed: sandbox failed: {e}")),
                };
                println!("{}", serde_json::to_string(&probe)?);
                return Ok(ExitCode::SUCCESS);
            }
            match loader::load(v) {
                Ok(l) => Probe {
                    sha256: Some(sha),
                    info: Some(l.info().clone()),
                    error: None,
                },
                Err(e) => Probe {
                    sha256: Some(sha),
                    info: None,
                    error: Some(e.to_string()),
                },
            }
        }
    };
    println!("{}", serde_json::to_string(&probe)?);
    Ok(ExitCode::SUCCESS)
}
