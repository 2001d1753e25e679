//! `shardline-agent run` and `check-config`: the binary's entries into the
//! daemon. Exit codes: 0 ok, 1 runtime failure, 78 (EX_CONFIG) invalid
//! configuration, which the systemd unit does not restart.

use super::agent::Daemon;
use super::capture::{CaptureInput, CaptureSource};
use super::config::{Config, DEFAULT_PATH};
use super::hosting::SupervisedRuntime;
use super::runtime::{NoCapture, QosSource, ShardRuntime, Unhosted};
use crate::monitor::MonitorConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// `EX_CONFIG` from sysexits.h.
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file.
    #[arg(long, default_value = DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Configuration file.
    #[arg(long, default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// Print only the device's public key (hex), creating the device key
    /// file first if it does not exist yet: what the operator enrols.
    #[arg(long)]
    pub print_pubkey: bool,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardline-agent: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    super::limits::apply(&cfg.limits);
    let (runtime, source) = wire(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let daemon = Daemon::start(cfg, runtime, source)?;
        daemon.run().await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Chooses the shard runtime and the QoS source for this configuration:
/// the real shard host supervisor and the real capture pipeline; the
/// fallbacks only when those cannot be set up (logged).
fn wire(cfg: &Config) -> (Box<dyn ShardRuntime>, Box<dyn QosSource>) {
    let runtime: Box<dyn ShardRuntime> = match SupervisedRuntime::new(&cfg.shard_dir) {
        Ok(r) => Box::new(r),
        Err(e) => {
            tracing::error!(error = %e, "no shard hosting: activations will be reported as failed");
            Box::new(Unhosted::default())
        }
    };
    let input = match (&cfg.monitor.pcap, cfg.monitor.interfaces.is_empty()) {
        (Some(p), _) => Some(CaptureInput::Replay(p.clone())),
        (None, false) => Some(CaptureInput::Interfaces(cfg.monitor.interfaces.clone())),
        (None, true) => None,
    };
    let source: Box<dyn QosSource> = match input {
        Some(input) => {
            let tuning = match &cfg.monitor.tuning_file {
                Some(f) => MonitorConfig::from_file(f).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "monitor tuning file; using defaults");
                    MonitorConfig::default()
                }),
                None => MonitorConfig::default(),
            };
            Box::new(CaptureSource::start(input, tuning, cfg.monitor.window_ms))
        }
        None => {
            tracing::info!(
                "no interfaces and no capture file configured: reports carry no traffic classes"
            );
            Box::new(NoCapture::new(cfg.monitor.window_ms))
        }
    };
    (runtime, source)
}

pub fn check_config(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardline-agent: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if cfg.broker.tls || cfg.broker.password_file.is_some() {
        // Loads the CA, the client certificate and the MQTT password now, so
        // a bad file is found here and not at the first connection attempt.
        if let Err(e) = super::link::mqtt_options(&cfg.broker, String::from("check"), Vec::new()) {
            eprintln!("shardline-agent: {}: broker: {e}", cfg.path.display());
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
    if args.print_pubkey {
        let (key, _) = super::keys::load_or_create(&cfg.device_key_file)?;
        println!("{}", hex::encode(key.public_key()));
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: configuration is valid", cfg.path.display());
    println!("  device:          {}", cfg.device);
    println!(
        "  broker:          {}://{}:{} (client id {})",
        if cfg.broker.tls { "mqtts" } else { "mqtt" },
        cfg.broker.host,
        cfg.broker.port,
        cfg.broker.client_id
    );
    match (&cfg.broker.username, &cfg.broker.password_file) {
        (Some(user), Some(file)) => println!(
            "  broker login:    {user} (password from {})",
            file.display()
        ),
        (Some(user), None) => println!("  broker login:    {user} (no password)"),
        _ => println!("  broker login:    none (anonymous)"),
    }
    println!("  pinned keys:     {}", cfg.allocator_keys.len());
    println!("  state dir:       {}", cfg.state_dir.display());
    println!("  shard dir:       {}", cfg.shard_dir.display());
    println!("  QoS window:      {} ms", cfg.monitor.window_ms);
    println!("  outbox cap:      {}", cfg.outbox_cap);
    match std::fs::metadata(&cfg.device_key_file) {
        Ok(_) => match super::keys::load_or_create(&cfg.device_key_file) {
            Ok((key, _)) => println!(
                "  device key:      {} (public key {})",
                cfg.device_key_file.display(),
                hex::encode(key.public_key())
            ),
            Err(e) => {
                eprintln!("shardline-agent: {e}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
        Err(_) => println!(
            "  device key:      {} (not created yet; `check-config --print-pubkey` creates it)",
            cfg.device_key_file.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
