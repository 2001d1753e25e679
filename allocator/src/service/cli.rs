//! `shardline-allocator run|keygen|rotate`: argument parsing, logging setup
//! and the runtime; the work is in [`super::run`].

use super::config::{self, Config};
use super::keys;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (defaults apply when the default path does not exist).
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Use an external broker (mqtt://host:port or mqtts://host:port) instead of the embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Embedded broker: plain MQTT listen address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Embedded broker: MQTT over TLS listen address (needs --tls-cert, --tls-key).
    #[arg(long)]
    pub tls_listen: Option<SocketAddr>,
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Require device client certificates signed by this CA on the TLS listener.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// External mqtts:// broker: CA file to trust.
    #[arg(long)]
    pub broker_ca: Option<PathBuf>,
    /// MQTT client id (unique per allocator instance).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Store file.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Instruction-signing secret key file (mode 0600).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Admin API listen address.
    #[arg(long)]
    pub api: Option<SocketAddr>,
    /// Admin API bearer token file (created with a random token if missing).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[arg(long)]
    pub agreements: Option<PathBuf>,
    /// Policy tick interval in milliseconds.
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Re-send unapplied instructions after this many milliseconds.
    #[arg(long)]
    pub resend_after_ms: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Secret key file to create (mode 0600; never overwritten). The public key
    /// is written beside it as FILE.pub.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The new secret key file (created with a fresh key if it does not exist).
    #[arg(long)]
    pub new_key: PathBuf,
    /// Configuration file (for the API address and token file).
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Admin API base URL (default: from the configuration).
    #[arg(long)]
    pub api: Option<String>,
    /// Admin API token file (default: from the configuration).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// CA (PEM) that signed the API's certificate, when it has `[api]
    /// tls_cert` (the API address is then https://).
    #[arg(long)]
    pub api_ca: Option<PathBuf>,
}

/// Logs to stderr; without colours and timestamps under systemd (the
/// journal adds its own), `RUST_LOG` filters (default `info,rumqttd=warn`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs every client connection and subscription at info: with a
    // fleet that would drown the journal, so it starts at warn.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// The configuration file with the command-line overrides applied.
pub fn effective_config(args: &RunArgs) -> anyhow::Result<Config> {
    let required = args.config != Path::new(config::DEFAULT_PATH);
    let mut c = Config::load(&args.config, required)?;
    if let Some(b) = &args.broker {
        config::BrokerUrl::parse(b).map_err(|message| config::ConfigError::Flag {
            flag: "--broker",
            message,
        })?;
        c.broker.url = b.clone();
    }
    macro_rules! set {
        ($flag:expr, $field:expr) => {
            if let Some(v) = &$flag {
                $field = v.clone();
            }
        };
        (opt $flag:expr, $field:expr) => {
            if let Some(v) = &$flag {
                $field = Some(v.clone());
            }
        };
    }
    set!(args.listen, c.broker.listen);
    set!(opt args.tls_listen, c.broker.tls_listen);
    set!(opt args.tls_cert, c.broker.tls_cert);
    set!(opt args.tls_key, c.broker.tls_key);
    set!(opt args.tls_client_ca, c.broker.tls_client_ca);
    set!(opt args.broker_ca, c.broker.ca_file);
    set!(args.client_id, c.broker.client_id);
    set!(args.store, c.store.path);
    set!(args.key, c.signer.key_file);
    set!(args.api, c.api.listen);
    set!(opt args.api_token_file, c.api.token_file);
    set!(args.catalog, c.policy.catalog);
    set!(args.agreements, c.policy.agreements);
    set!(args.tick_ms, c.policy.tick_ms);
    set!(args.resend_after_ms, c.dispatch.resend_after_ms);
    if c.broker.url.is_empty() {
        if let Some(addr) = c.broker.zero_port() {
            return Err(config::ConfigError::Flag {
                flag: if addr == c.broker.listen {
                    "--listen"
                } else {
                    "--tls-listen"
                },
                message: config::ZERO_PORT.into(),
            }
            .into());
        }
    }
    if c.broker.tls_listen.is_some() && (c.broker.tls_cert.is_none() || c.broker.tls_key.is_none())
    {
        return Err(config::ConfigError::Flag {
            flag: "--tls-listen",
            message: "needs --tls-cert and --tls-key".into(),
        }
        .into());
    }
    Ok(c)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = effective_config(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("allocator-io")
        .build()?;
    rt.block_on(async move {
        let handle = super::run::start(config).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        shardline_support::notify::Notifier::from_env().stopping();
        // The core commits what it holds before it stops; the embedded broker
        // has no graceful shutdown and ends with the process.
        let _ = handle.tx.send(super::inbound::Inbound::Shutdown).await;
        let _ = tokio::task::spawn_blocking(move || handle.core_thread.join()).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `check-config`: everything `run` reads before it starts (the file with
/// the flags applied, the catalog and tiers, the signing key, TLS files),
/// checked without starting anything. Exit 0, or 78 (EX_CONFIG) with the
/// reason.
pub fn check_config(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = effective_config(&args)?;
    let files = super::catalog_files::load_policy_files(&config.policy)?;
    let (catalog, agreements) = (&files.catalog, &files.agreements);
    // Placeholders are allowed (the example catalog is all placeholders)
    // but an operator must know: a device refuses a library with them.
    let mut not_built: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (shard, arch) in super::catalog_files::not_built(catalog) {
        not_built.entry(shard).or_default().push(arch);
    }
    for (shard, arches) in &not_built {
        eprintln!(
            "warning: catalog shard {shard}: all-zero sha256 (not built) for {}; devices refuse it",
            arches.join(", ")
        );
    }
    let key = keys::read_secret(&config.signer.key_file)?;
    if let Some(f) = &config.broker.credentials_file {
        super::broker::Credentials::load(f).map_err(super::broker::BrokerError::from)?;
    }
    for (field, file) in [
        ("broker.tls_cert", &config.broker.tls_cert),
        ("broker.tls_key", &config.broker.tls_key),
        ("broker.tls_client_ca", &config.broker.tls_client_ca),
        ("broker.ca_file", &config.broker.ca_file),
    ] {
        if let Some(f) = file {
            std::fs::metadata(f).map_err(|e| config::ConfigError::Flag {
                flag: field,
                message: format!("{}: {e}", f.display()),
            })?;
        }
    }
    // The API's certificate and key are loaded as the service would.
    if let (Some(cert), Some(key)) = (&config.api.tls_cert, &config.api.tls_key) {
        super::tls::server_config(cert, key, None).map_err(|e| config::ConfigError::Flag {
            flag: "api.tls_cert/api.tls_key",
            message: e.to_string(),
        })?;
    }
    println!(
        "ok: {} capabilities, {} tiers, signing key {}, broker {}\ncatalog: {}\ntiers: {}",
        catalog.capabilities.len(),
        agreements.tiers.len(),
        key.id(),
        if config.broker.url.is_empty() {
            format!("embedded on {}", config.broker.listen)
        } else {
            config.broker.url.clone()
        },
        files.catalog_source,
        files.agreements_source,
    );
    Ok(ExitCode::SUCCESS)
}

/// The process exit code for an error that ended a command: 78 (EX_CONFIG)
/// when the configuration, a catalog or tiers file, or a key or TLS file is
/// what is wrong (the unit's `RestartPreventExitStatus=78` then stops
/// systemd from restarting into the same error), 69 (EX_UNAVAILABLE) when an
/// address could not be bound, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use super::run::StartError;
    const EX_CONFIG: u8 = 78;
    const EX_UNAVAILABLE: u8 = 69;
    for cause in err.chain() {
        if cause.is::<config::ConfigError>()
            || cause.is::<super::broker::CredentialsError>()
            || cause.is::<super::catalog_files::CatalogFileError>()
            || cause.is::<keys::KeyError>()
            || cause.is::<super::tls::TlsError>()
        {
            return EX_CONFIG;
        }
        if let Some(e) = cause.downcast_ref::<StartError>() {
            return match e {
                StartError::Catalog(_)
                | StartError::Key(_)
                | StartError::Tls(_)
                | StartError::Token(_)
                | StartError::Instance { .. } => EX_CONFIG,
                StartError::Broker(super::broker::BrokerError::Credentials(_)) => EX_CONFIG,
                StartError::Api { .. } | StartError::Broker(_) => EX_UNAVAILABLE,
                StartError::Store(_) | StartError::Thread(_) | StartError::Random(_) => 1,
            };
        }
    }
    1
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let key = keys::generate()?;
    keys::write_secret(&args.out, &key)?;
    let public = hex::encode(key.public_key());
    let mut pub_path = args.out.clone().into_os_string();
    pub_path.push(".pub");
    std::fs::write(&pub_path, format!("{public}\n"))?;
    println!("public_key {public}");
    println!("key_id {}", key.id());
    Ok(ExitCode::SUCCESS)
}

pub fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config, args.config != Path::new(config::DEFAULT_PATH))?;
    if !args.new_key.exists() {
        let key = keys::generate()?;
        keys::write_secret(&args.new_key, &key)?;
        eprintln!("created {} (key id {})", args.new_key.display(), key.id());
    }
    // Check it locally too, for a clear error before asking the service.
    let key = keys::read_secret(&args.new_key)?;
    let scheme = if config.api.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let api = args
        .api
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", config.api.listen));
    let token_file = args
        .api_token_file
        .clone()
        .unwrap_or_else(|| super::api_token::default_token_file(&config));
    let token =
        shardline_support::secret_file::read_text(&token_file, super::api_token::MAX_TOKEN_FILE)?;
    let abs = std::fs::canonicalize(&args.new_key)?;
    let body = serde_json::json!({ "key_file": abs.display().to_string() });
    let r = super::http::request_with_ca(
        &api,
        args.api_ca.as_deref(),
        "POST",
        "/v1/rotate",
        Some(token.trim()),
        Some(&body),
    )?;
    if r.status != 200 {
        anyhow::bail!("rotation refused ({}): {}", r.status, r.body);
    }
    println!("{}", r.body);
    println!("public_key {}", hex::encode(key.public_key()));
    Ok(ExitCode::SUCCESS)
}
