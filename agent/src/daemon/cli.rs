//! `shardline-agent run` and `check-config`: the binary's entries into the
//! daemon, and the exit codes systemd acts on.
//!
//! `run` validates everything it can before it starts anything (capture,
//! shard hosts, the MQTT link): the configuration, what it names on the
//! device ([`super::preflight`]), the TLS files, the state directory, the
//! device key, the persisted state and an enrolment token file that exists.
//! A fault found then exits with a sysexits(3) code that says whether a
//! restart can help; the unit's `RestartPreventExitStatus` lists those where
//! it cannot.
//!
//! | code | name | meaning | systemd |
//! |---|---|---|---|
//! | 0 | | stopped cleanly (SIGTERM) | |
//! | 1 | | failed while running, after start | restarted |
//! | 65 | `EX_DATAERR` | persisted state (`state.json`, `request_seq.json`, an outbox message) is corrupt | not restarted |
//! | 71 | `EX_OSERR` | the OS refused a start resource (async runtime, signal handler, RNG) | restarted |
//! | 74 | `EX_IOERR` | I/O error on the state directory, device key or outbox | restarted |
//! | 77 | `EX_NOPERM` | the agent's user may not read or write a file it needs | not restarted |
//! | 78 | `EX_CONFIG` | invalid configuration, or what it names is missing (interface, shard directory, capture file, TLS file, malformed or world-readable key or token file) | not restarted |

use super::agent::{load_state, Daemon, DaemonError};
use super::assignment_io::AssignmentFileError;
use super::capture::{CaptureInput, CaptureSource};
use super::config::{Config, ConfigError, DEFAULT_PATH};
use super::enroll::EnrollTokenError;
use super::hosting::SupervisedRuntime;
use super::keys::DeviceKeyError;
use super::link::LinkSetupError;
use super::outbox::OutboxError;
use super::preflight::EnvironmentError;
use super::runtime::{NoCapture, QosSource, ShardRuntime, Unhosted};
use crate::monitor::MonitorConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `EX_DATAERR` from sysexits.h.
pub const EXIT_DATAERR: u8 = 65;
/// `EX_OSERR` from sysexits.h.
pub const EXIT_OSERR: u8 = 71;
/// `EX_IOERR` from sysexits.h.
pub const EXIT_IOERR: u8 = 74;
/// `EX_NOPERM` from sysexits.h.
pub const EXIT_NOPERM: u8 = 77;
/// `EX_CONFIG` from sysexits.h.
pub const EXIT_CONFIG: u8 = 78;
/// A failure after the daemon started (restartable).
pub const EXIT_RUNTIME: u8 = 1;

/// Why `run` did not get the daemon started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Everything the configuration names that is missing, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Environment(Vec<EnvironmentError>),
    #[error("{path}: broker: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkSetupError,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] DeviceKeyError),
    #[error(transparent)]
    EnrollToken(#[from] EnrollTokenError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(std::io::Error),
}

/// Permission problems need the operator; other I/O errors may pass.
fn io_code(e: &std::io::Error) -> u8 {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        EXIT_NOPERM
    } else {
        EXIT_IOERR
    }
}

fn key_code(e: &DeviceKeyError) -> u8 {
    match e {
        DeviceKeyError::Io { source, .. } => io_code(source),
        DeviceKeyError::Malformed { .. } | DeviceKeyError::TooOpen { .. } => EXIT_CONFIG,
        DeviceKeyError::Random { .. } => EXIT_OSERR,
    }
}

fn token_code(e: &EnrollTokenError) -> u8 {
    match e {
        // The configuration names a token file that is not there.
        EnrollTokenError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            EXIT_CONFIG
        }
        EnrollTokenError::Io { source, .. } => io_code(source),
        EnrollTokenError::TooOpen { .. } | EnrollTokenError::Malformed { .. } => EXIT_CONFIG,
    }
}

impl StartError {
    /// The process exit code for this failure (see the module docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) | StartError::Environment(_) | StartError::Link { .. } => {
                EXIT_CONFIG
            }
            StartError::StateDir { source, .. } => io_code(source),
            StartError::Key(e) => key_code(e),
            StartError::EnrollToken(e) => token_code(e),
            StartError::AsyncRuntime(_) => EXIT_OSERR,
            StartError::Daemon(e) => match e {
                DaemonError::State { source, .. } => io_code(source),
                DaemonError::StateCorrupt { .. } => EXIT_DATAERR,
                DaemonError::Outbox(OutboxError::Io { source, .. }) => io_code(source),
                DaemonError::Outbox(OutboxError::Corrupt { .. }) => EXIT_DATAERR,
                DaemonError::Key(e) => key_code(e),
                DaemonError::EnrollToken(e) => token_code(e),
                DaemonError::Link(_) => EXIT_CONFIG,
                DaemonError::Signal(_) => EXIT_OSERR,
                DaemonError::Assignment(AssignmentFileError::Io { source, .. }) => io_code(source),
                DaemonError::Assignment(AssignmentFileError::Corrupt { .. }) => EXIT_DATAERR,
            },
        }
    }
}

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
    crate::logging::init("SHARDLINE_LOG", "info", false);
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let cfg = match preflight(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => return Ok(refuse_start(&e)),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Ok(refuse_start(&StartError::AsyncRuntime(e))),
    };
    // Only now does anything start: the agent's own limits, the shard host
    // supervisor and capture.
    super::limits::apply(&cfg.limits);
    let (runtime, source) = wire(&cfg);
    let ran = rt.block_on(async move {
        let daemon = match Daemon::start(cfg, runtime, source) {
            Ok(d) => d,
            Err(e) => return Err(StartError::Daemon(e)),
        };
        Ok(daemon.run().await)
    });
    match ran {
        Err(e) => Ok(refuse_start(&e)),
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => {
            tracing::error!(error = %e, exit_code = EXIT_RUNTIME, "the agent failed while running");
            eprintln!("shardline-agent: {e}");
            Ok(ExitCode::from(EXIT_RUNTIME))
        }
    }
}

/// Logs and prints why the agent did not start; returns its exit code.
fn refuse_start(e: &StartError) -> ExitCode {
    let code = e.exit_code();
    tracing::error!(error = %e, exit_code = code, "the agent cannot start");
    print_error(e);
    ExitCode::from(code)
}

/// One `shardline-agent: ` line per problem (environment errors list all).
fn print_error(e: &StartError) {
    for line in e.to_string().lines() {
        eprintln!("shardline-agent: {line}");
    }
}

/// Everything `run` checks before it starts anything; the configuration it
/// will run with. Reads (and on first start creates) the device key.
pub fn preflight(path: &Path) -> Result<Config, StartError> {
    let cfg = load_and_check(path)?;
    check_link(&cfg)?;
    super::persist::ensure_private_dir(&cfg.state_dir).map_err(|source| StartError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    super::keys::load_or_create(&cfg.device_key_file)?;
    load_state(&cfg.state_dir.join("state.json")).map_err(StartError::Daemon)?;
    if let Some(token) = &cfg.enroll_token_file {
        // Once enrolled the operator may delete the token file; one that is
        // there must be usable (the daemon decides whether it needs it).
        if token.exists() {
            super::enroll::read_token(token)?;
        }
    }
    Ok(cfg)
}

/// Parses the file and checks what it names on this device.
fn load_and_check(path: &Path) -> Result<Config, StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let cfg = Config::parse(path, &text)?;
    super::preflight::check(&cfg, &text).map_err(StartError::Environment)?;
    Ok(cfg)
}

/// Loads the CA and the client certificate now, so a bad file is found at
/// start and not at the first connection attempt.
fn check_link(cfg: &Config) -> Result<(), StartError> {
    // Loads the CA, the client certificate and the MQTT password now, so a
    // bad file is found here and not at the first connection attempt.
    if cfg.broker.tls || cfg.broker.password_file.is_some() {
        super::link::mqtt_options(&cfg.broker, String::from("check"), Vec::new()).map_err(
            |source| StartError::Link {
                path: cfg.path.clone(),
                source,
            },
        )?;
    }
    Ok(())
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
            Box::new(CaptureSource::start_with(
                input,
                tuning,
                cfg.monitor.window_ms,
                cfg.monitor.capture,
            ))
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
    // `--print-pubkey` is how a device is enrolled, possibly before it is
    // cabled or has its shards: it checks the file, not the machine.
    let checked = if args.print_pubkey {
        Config::load(&args.config).map_err(StartError::from)
    } else {
        load_and_check(&args.config)
    };
    let cfg = match checked.and_then(|cfg| check_link(&cfg).map(|()| cfg)) {
        Ok(c) => c,
        Err(e) => {
            print_error(&e);
            return Ok(ExitCode::from(e.exit_code()));
        }
    };
    if args.print_pubkey {
        return match super::keys::load_or_create(&cfg.device_key_file) {
            Ok((key, _)) => {
                println!("{}", hex::encode(key.public_key()));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("shardline-agent: {e}");
                Ok(ExitCode::from(key_code(&e)))
            }
        };
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
    match &cfg.assignment {
        Some(a) => println!(
            "  assignment:      group {} (bootstrap {})",
            a.group,
            a.bootstrap.join(", ")
        ),
        None => println!("  assignment:      none (the broker above, plain topics)"),
    }
    println!("  pinned keys:     {}", cfg.allocator_keys.len());
    println!("  state dir:       {}", cfg.state_dir.display());
    println!("  shard dir:       {}", cfg.shard_dir.display());
    match (&cfg.monitor.pcap, cfg.monitor.interfaces.is_empty()) {
        (Some(p), _) => println!("  capture:         replay {}", p.display()),
        (None, false) => println!("  capture:         {}", cfg.monitor.interfaces.join(", ")),
        (None, true) => println!("  capture:         none (reports carry no traffic classes)"),
    }
    println!("  QoS window:      {} ms", cfg.monitor.window_ms);
    println!("  outbox cap:      {}", cfg.outbox_cap);
    println!(
        "  request socket:  {} ({} apps declared{})",
        cfg.requests.socket.display(),
        cfg.requests.apps.len(),
        if cfg.requests.apps.is_empty() {
            ": every request is refused"
        } else {
            ""
        }
    );
    match std::fs::metadata(&cfg.device_key_file) {
        Ok(_) => match super::keys::load_or_create(&cfg.device_key_file) {
            Ok((key, _)) => println!(
                "  device key:      {} (public key {})",
                cfg.device_key_file.display(),
                hex::encode(key.public_key())
            ),
            Err(e) => {
                eprintln!("shardline-agent: {e}");
                return Ok(ExitCode::from(key_code(&e)));
            }
        },
        Err(_) => println!(
            "  device key:      {} (not created yet; `check-config --print-pubkey` creates it)",
            cfg.device_key_file.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn io(kind: ErrorKind) -> Error {
        Error::new(kind, "test")
    }

    #[test]
    fn faults_a_restart_cannot_fix_get_codes_the_unit_does_not_restart() {
        let path = PathBuf::from("/x");
        let key = |e| StartError::Key(e);
        assert_eq!(
            key(DeviceKeyError::Malformed { path: path.clone() }).exit_code(),
            EXIT_CONFIG
        );
        assert_eq!(
            key(DeviceKeyError::TooOpen {
                path: path.clone(),
                mode: 0o644
            })
            .exit_code(),
            EXIT_CONFIG
        );
        assert_eq!(
            key(DeviceKeyError::Io {
                path: path.clone(),
                source: io(ErrorKind::PermissionDenied)
            })
            .exit_code(),
            EXIT_NOPERM
        );
        assert_eq!(
            StartError::Daemon(DaemonError::StateCorrupt {
                path: path.clone(),
                reason: "torn".into()
            })
            .exit_code(),
            EXIT_DATAERR
        );
        assert_eq!(
            StartError::Daemon(DaemonError::Outbox(OutboxError::Corrupt {
                path: path.clone()
            }))
            .exit_code(),
            EXIT_DATAERR
        );
        // The configuration names a token file that is not there.
        assert_eq!(
            StartError::EnrollToken(EnrollTokenError::Io {
                path: path.clone(),
                source: io(ErrorKind::NotFound)
            })
            .exit_code(),
            EXIT_CONFIG
        );
    }

    #[test]
    fn passing_faults_get_codes_the_unit_restarts() {
        let path = PathBuf::from("/x");
        assert_eq!(
            StartError::StateDir {
                path: path.clone(),
                source: io(ErrorKind::Other)
            }
            .exit_code(),
            EXIT_IOERR
        );
        assert_eq!(
            StartError::Key(DeviceKeyError::Random {
                path: path.clone(),
                reason: "no entropy".into()
            })
            .exit_code(),
            EXIT_OSERR
        );
        assert_eq!(
            StartError::AsyncRuntime(io(ErrorKind::OutOfMemory)).exit_code(),
            EXIT_OSERR
        );
        assert_eq!(
            StartError::Daemon(DaemonError::Signal(io(ErrorKind::Other))).exit_code(),
            EXIT_OSERR
        );
    }
}
