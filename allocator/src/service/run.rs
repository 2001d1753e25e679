//! Start-up: wires the store, the signer, the broker (embedded or external),
//! the MQTT link (`mqtt`), the verifier threads (`verifiers`), the core
//! thread (`core_loop`), the ticker, the admin API and systemd notifications
//! together. Decisions live in the core crate ([`super::core`]).
//!
//! With a shared store (several instances behind one broker), the core's
//! records are a cache: before a batch is handled, the versions of the
//! devices it names are read from the store and stale copies reloaded; a
//! commit that still meets a newer version (another instance won a race) is
//! refused by the store, its writes and publishes for those devices are
//! dropped, and the core reloads them. Fleet-wide periodic work runs only on
//! the instance holding the store's lead.

use super::audit::{AuditEntry, AuditLog, Outcome};
use super::catalog_files::{self, CatalogFileError};
use super::config::{BrokerUrl, Config};
use super::core::{self, Core, CoreConfig};
use super::inbound::{now_ms, Inbound};
use super::store::{RedbStore, Store};
use super::{api_token, broker, broker_acl, core_loop, keys, mqtt, tls, verifiers};
use rumqttc::{AsyncClient, MqttOptions};
use shardline_allocator_core::policy::Engine;
use shardline_allocator_core::service::counters::Metrics;
use shardline_support::notify::Notifier;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The user name the service logs in to its own embedded broker with.
const SELF_LOGIN: &str = "shardline-allocator-self";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Catalog(#[from] CatalogFileError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("admin API: cannot listen on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] api_token::ApiTokenError),
    #[error("the OS random number generator failed: {0}")]
    Random(String),
    #[error("cannot start a service thread: {0}")]
    Thread(std::io::Error),
    /// `[instance]` is invalid (checked at load already; a `Config` built
    /// in code may still carry one).
    #[error("[{section}] {field}: {message}")]
    Instance {
        section: &'static str,
        field: &'static str,
        message: String,
    },
}

/// Opens the configured store: PostgreSQL shared with other instances when
/// `store.url` is set, else the embedded redb file.
fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    match &config.store.url {
        Some(url) => Ok(Arc::new(super::store_pg::PgStore::connect(url)?)),
        None => Ok(Arc::new(RedbStore::open(&config.store.path)?)),
    }
}

/// A started service (for `run` and for tests that embed it).
#[derive(Debug)]
pub struct Handle {
    pub tx: mpsc::Sender<Inbound>,
    pub metrics: Arc<Metrics>,
    pub api_addr: SocketAddr,
    pub core_thread: std::thread::JoinHandle<()>,
}

/// Starts everything on the current tokio runtime and returns once the
/// broker, the API and the core are up.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    let metrics = Arc::new(Metrics::default());
    // Store first: it holds the key in force after a rotation.
    let store = open_store(&config)?;
    if store.is_shared() && config.broker_url().is_none() {
        // Legal for one instance; with several, each would reach only the
        // devices connected to its own embedded broker, while the leader
        // re-sends for all of them.
        tracing::warn!(
            "the store is shared but the broker is embedded: run several instances only behind one external broker ([broker] url)"
        );
    }
    let meta = store.load_meta()?;
    let key_file = meta
        .key_file
        .clone()
        .map_or_else(|| config.signer.key_file.clone(), PathBuf::from);
    let key = keys::read_secret(&key_file)?;
    tracing::info!(key_id = %key.id(), key_file = %key_file.display(), epoch = meta.key_epoch, "signing key loaded");
    let files = catalog_files::load_policy_files(&config.policy)?;
    tracing::info!(
        catalog = %files.catalog_source,
        tiers = %files.agreements_source,
        "policy files"
    );
    for (shard, arch) in catalog_files::not_built(&files.catalog) {
        tracing::warn!(%shard, %arch, "catalog digest is all zero (not built): devices will refuse it");
    }
    let engine = Engine::new(
        files.catalog,
        files.agreements,
        config.policy.engine.clone(),
    );
    let records = store.load_devices()?;
    let tokens = store.load_tokens()?;
    tracing::info!(
        devices = records.len(),
        shared = store.is_shared(),
        "store opened"
    );
    let token = api_token::read_or_create(&api_token::default_token_file(&config))?;

    let external = config.broker_url();
    // Holds devices back while the MQTT link lags the embedded broker.
    let gate = Arc::new(super::ingest_gate::IngestGate::default());
    // The embedded broker's login for this process, when it requires logins.
    let mut self_login: Option<String> = None;
    let (host, port, client_tls) = match &external {
        Some(BrokerUrl::Tcp { host, port }) => (host.clone(), *port, None),
        Some(BrokerUrl::Tls { host, port }) => {
            let ca = config
                .broker
                .ca_file
                .as_deref()
                .ok_or_else(|| tls::TlsError::File {
                    path: "broker.ca_file".into(),
                    message: "an mqtts:// broker needs broker.ca_file".into(),
                })?;
            let client = config
                .broker
                .client_cert
                .as_deref()
                .zip(config.broker.client_key.as_deref());
            (host.clone(), *port, Some(tls::client_config(ca, client)?))
        }
        None => {
            let mut credentials = config
                .broker
                .credentials_file
                .as_deref()
                .map(broker::Credentials::load)
                .transpose()
                .map_err(broker::BrokerError::from)?;
            if let Some(c) = credentials.as_mut() {
                // The service's own client logs in like everyone else, with a
                // password made for this process only.
                let mut secret = [0u8; 24];
                getrandom::getrandom(&mut secret).map_err(|e| StartError::Random(e.to_string()))?;
                let password = hex::encode(secret);
                c.add_allocator(SELF_LOGIN, &password);
                self_login = Some(password);
            }
            // rumqttd checks logins but not topics, and never pushes back on
            // publishers: it listens on a private loopback port behind a
            // front that checks topics (with logins) and holds devices back
            // while the MQTT link lags (`ingest_gate`), with or without logins.
            let devices = Arc::new(
                credentials
                    .as_ref()
                    .map(broker::Credentials::device_logins)
                    .unwrap_or_default(),
            );
            let inner = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_err(|source| broker::BrokerError::Bind {
                    addr: config.broker.listen,
                    source,
                })?;
            let mut private = config.broker.clone();
            private.listen = inner;
            broker::start_embedded_with_credentials(&private, credentials)?;
            broker_acl::front(
                config.broker.listen,
                inner,
                devices,
                broker::MAX_PACKET + 4096,
                gate.clone(),
            )
            .await
            .map_err(|source| broker::BrokerError::Bind {
                addr: config.broker.listen,
                source,
            })?;
            if let Some(tls_listen) = config.broker.tls_listen {
                let (Some(cert), Some(key)) = (&config.broker.tls_cert, &config.broker.tls_key)
                else {
                    return Err(StartError::Tls(tls::TlsError::File {
                        path: "broker.tls_listen".into(),
                        message: "needs broker.tls_cert and broker.tls_key".into(),
                    }));
                };
                let server = tls::server_config(cert, key, config.broker.tls_client_ca.as_deref())?;
                broker::tls_front(tls_listen, config.broker.listen, server).await?;
            }
            let l = config.broker.listen;
            let ip = if l.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                l.ip().to_string()
            };
            (ip, l.port(), None)
        }
    };

    let now = now_ms();
    let core_cfg = CoreConfig {
        max_payload: config.broker.max_payload,
        resend_after_ms: config.dispatch.resend_after_ms,
        checkpoint_ms: config.store.checkpoint_s.saturating_mul(1000).max(1000),
        engine_flush_ms: config.store.engine_flush_ms,
        shared_store: store.is_shared(),
        qos_history_window_ms: config.history.qos_window_s.saturating_mul(1000),
    };
    let loaded = core::Loaded {
        meta,
        records,
        tokens,
        tombstones: store.load_tombstones()?,
        catalog_health: store.load_catalog_health()?,
        rollouts: store.load_rollouts()?,
    };
    let mut core = Core::new(engine, key, loaded, core_cfg, metrics.clone(), now);
    core.restore_diagnostics(store.load_diagnostics()?);
    // Secrets are sealed to devices with fresh ephemeral keys from the OS.
    core.set_seal_rng(core::SealRng(Box::new(crypto_box::aead::OsRng)));

    // MQTT link.
    let client_id = config.mqtt_client_id();
    let mut opts = MqttOptions::new(client_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    // Issue 19: with `uplink = "routed"` (a clustered broker without shared
    // subscriptions) the session persists, so the routed uplinks of this
    // instance's groups queue at the broker across a reconnect; give each
    // instance a fixed client id then (`client_id.rs`: derived from
    // `[instance] id` unless configured). `persistent_session` asks for the same on one instance (`plain`).
    let routed = config.broker.uplink == super::config::UplinkMode::Routed;
    let persistent = external.is_some() && (routed || config.broker.persistent_session);
    opts.set_clean_session(!persistent);
    tracing::info!(%client_id, persistent_session = persistent, "MQTT client");
    // At least the broker's packet cap: a larger retained message would
    // otherwise cut this client off on every reconnect (issue 14).
    let max_in =
        (broker::MAX_PACKET + 4096).max(config.broker.max_payload.saturating_mul(4) + 1024);
    opts.set_max_packet_size(max_in, max_in);
    opts.set_inflight(1000);
    opts.set_request_channel_capacity(20_000);
    if let Some(tls) = client_tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    if let Some(p) = self_login {
        opts.set_credentials(SELF_LOGIN, p);
    } else if let (Some(u), Some(p)) = (&config.broker.username, &config.broker.password) {
        opts.set_credentials(u.clone(), p.clone());
    }
    // Every node of a clustered external broker (`[broker] urls`): the
    // same client, another address.
    let nodes: Vec<MqttOptions> = config
        .broker_urls()
        .into_iter()
        .map(|u| {
            let (BrokerUrl::Tcp { host, port } | BrokerUrl::Tls { host, port }) = u;
            mqtt::options_for_node(&opts, host, port)
        })
        .collect();
    let (client, eventloop) = AsyncClient::new(opts, 20_000);
    // Short: under overload, verified reports wait in the conflating
    // `VerifiedInbox` (one per device, the newest), not here.
    let (tx, rx) = mpsc::channel::<Inbound>(4_096);
    let shared = external.is_some() && config.broker.uplink == super::config::UplinkMode::Shared;
    let assign = Arc::new(super::assign_driver::AssignShared::default());
    if external.is_none() {
        // The link tells the gate which groups' routed uplinks it holds.
        assign.link.attach_gate(gate.clone());
    }
    let verified = Arc::new(super::verified::VerifiedInbox::default());
    let verifiers = verifiers::start(
        core.key_directory(),
        tx.clone(),
        metrics.clone(),
        config.broker.max_payload,
        store.is_shared(),
        verified.clone(),
    )
    .map_err(StartError::Thread)?;
    let _ = metrics
        .overload
        .set(Box::new(super::metrics::OverloadStages {
            stage: verifiers.probe(),
            gate: external.is_none().then(|| gate.clone()),
        }));
    tokio::spawn(mqtt::run(
        eventloop,
        client.clone(),
        tx.clone(),
        verifiers,
        shared,
        routed,
        assign.clone(),
        metrics.clone(),
        nodes,
        external.is_none().then(|| gate.clone()),
    ));
    spawn_assign_driver(
        &config,
        &key_file,
        store.clone(),
        client.clone(),
        &assign,
        &metrics,
    )?;

    // The API reads and writes operator tokens and the audit log itself;
    // anything else acting for an operator (a signal-driven reload) records
    // through a clone of `audit_log` (`AuditLog::record`).
    let api_store = store.clone();
    let audit_log = super::audit::AuditLog::new(store.clone(), config.audit.clone());
    spawn_history_pruner(store.clone(), &config.history);

    // Core thread.
    let heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let live = super::api_fleet::LiveHub::default();
    spawn_audit_events(&audit_log, live.clone());
    let rt = tokio::runtime::Handle::current();
    let core_thread = {
        let metrics = metrics.clone();
        let heartbeat = heartbeat.clone();
        let max_batch = config.dispatch.max_batch;
        let reload_tx = tx.clone();
        let live = live.clone();
        std::thread::Builder::new()
            .name("allocator-core".into())
            .spawn(move || {
                core_loop::run(
                    core, store, rx, reload_tx, client, rt, metrics, heartbeat, max_batch, live,
                    verified,
                )
            })
            .map_err(StartError::Thread)?
    };

    // Ticker.
    {
        let tx = tx.clone();
        let every = Duration::from_millis(config.policy.tick_ms);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(every);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                if tx.send(Inbound::Tick).await.is_err() {
                    break;
                }
            }
        });
    }

    // Admin API.
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| StartError::Api {
            addr: config.api.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| StartError::Api {
        addr: config.api.listen,
        source,
    })?;
    let app = super::api::router(super::api::ApiState {
        tx: tx.clone(),
        metrics: metrics.clone(),
        metrics_public: config.api.metrics_public,
        key_dir: key_dir(&config),
        store: api_store.clone(),
        access: Arc::new(super::access::Access::new(token, api_store.clone())),
        audit: audit_log.clone(),
        live,
        policy: Arc::new(config.policy.clone()),
        assign: assign.clone(),
    });
    // SIGHUP reloads the catalog and the tiers, as `POST /v1/catalog/reload`,
    // and the assignment's groups (`assign_driver::reload_groups`).
    {
        let tx = tx.clone();
        let policy = config.policy.clone();
        let metrics = metrics.clone();
        let audit = audit_log.clone();
        let config_source = config
            .assignment
            .enabled
            .then(|| config.source.clone())
            .flatten();
        let assign_shared = assign.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(StartError::Thread)?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // The assignment's groups first: a refused catalog must not
                // keep a group's withdrawal waiting.
                if let Some(path) = config_source.clone() {
                    let shared = assign_shared.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        super::assign_driver::reload_groups(&path, &shared)
                    })
                    .await;
                }
                let p = policy.clone();
                let cmd = match tokio::task::spawn_blocking(move || {
                    super::api_deploy::reload_from_files(&p)
                })
                .await
                {
                    Ok(Ok(cmd)) => cmd,
                    Ok(Err(e)) => {
                        Metrics::inc(&metrics.catalog_reloads_refused);
                        tracing::warn!(error = %e, "SIGHUP: catalog reload refused: the running catalog stays");
                        audit_signal_reload(&audit, Outcome::Refused, e.to_string()).await;
                        continue;
                    }
                    Err(_) => continue,
                };
                let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                if tx
                    .send(Inbound::Command(Box::new(cmd), reply_tx))
                    .await
                    .is_err()
                {
                    break;
                }
                // The core logs what changed (or why it refused).
                let (outcome, message) = match reply_rx.await {
                    Ok(core::Reply::Error(e)) => (Outcome::Refused, e.to_string()),
                    Ok(_) => (Outcome::Ok, String::new()),
                    Err(_) => (Outcome::Refused, "the core is stopping".to_owned()),
                };
                audit_signal_reload(&audit, outcome, message).await;
            }
        });
    }
    let api_tls = match (&config.api.tls_cert, &config.api.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key, None)?),
        _ => None,
    };
    let https = api_tls.is_some();
    if !https && !api_addr.ip().is_loopback() {
        tracing::warn!(
            %api_addr,
            "the admin API listens beyond loopback without TLS: tokens cross the network in clear; set [api] tls_cert and tls_key"
        );
    }
    match api_tls {
        Some(server) => {
            let listener =
                super::api_tls::TlsListener::new(listener, server).map_err(|source| {
                    StartError::Api {
                        addr: config.api.listen,
                        source,
                    }
                })?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }
    }
    tracing::info!(%api_addr, https, "admin API up");
    if config.api.listen.port() == 0 {
        // Port 0 asked the system for a port: say which, or nobody can reach it.
        println!("admin API listening on {api_addr}");
    }

    // systemd.
    let notifier = Arc::new(Notifier::from_env());
    notifier.ready();
    if let Some(every) = notifier.watchdog_interval() {
        let notifier = notifier.clone();
        let heartbeat = heartbeat.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Only vouch for a core that made progress recently.
                let age = now_ms().saturating_sub(heartbeat.load(Ordering::Relaxed));
                if age < every.as_millis() as u64 * 2 {
                    notifier.watchdog();
                } else {
                    tracing::error!(
                        age_ms = age,
                        "core thread stalled; withholding the watchdog ping"
                    );
                }
            }
        });
    }
    Ok(Handle {
        tx,
        metrics,
        api_addr,
        core_thread,
    })
}

/// Starts the assignment driver (issue 19) when `[assignment]` is enabled or
/// the plain uplinks are read only while leading (`uplink = "routed"`).
fn spawn_assign_driver(
    config: &Config,
    key_file: &std::path::Path,
    store: Arc<dyn Store>,
    client: AsyncClient,
    assign: &Arc<super::assign_driver::AssignShared>,
    metrics: &Arc<Metrics>,
) -> Result<(), StartError> {
    let routed = config.broker.uplink == super::config::UplinkMode::Routed;
    if !config.assignment.enabled && !routed {
        return Ok(());
    }
    let instance = config.instance.check().map_err(|e| StartError::Instance {
        section: e.section,
        field: e.field,
        message: e.message,
    })?;
    let driver = super::assign_driver::Driver {
        instance,
        section: config.assignment.clone(),
        uplink: config.broker.uplink,
        tick: Duration::from_millis(config.policy.tick_ms),
        store,
        client,
        rt: tokio::runtime::Handle::current(),
        // Signed like instructions, with the key this instance started with.
        key: keys::read_secret(key_file)?,
        metrics: metrics.clone(),
        shared: assign.clone(),
    };
    driver.spawn().map_err(StartError::Thread)?;
    Ok(())
}

/// The signing key's directory, as `POST /v1/rotate` compares it (absolute,
/// symlinks resolved where it exists).
fn key_dir(config: &Config) -> PathBuf {
    let parent = config
        .signer
        .key_file
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    std::fs::canonicalize(&parent).unwrap_or(parent)
}

/// Prunes the device history by age and count every `prune_every_s`, on a
/// blocking thread (a full pass reads the whole history table).
fn spawn_history_pruner(store: Arc<dyn Store>, cfg: &super::config::HistoryConfig) {
    let every = Duration::from_secs(cfg.prune_every_s);
    let retention_ms = cfg.retention_days.saturating_mul(86_400_000);
    let max = cfg.max_entries_per_device;
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let store = store.clone();
            let before = now_ms().saturating_sub(retention_ms);
            let pruned =
                tokio::task::spawn_blocking(move || store.prune_history(before, max)).await;
            match pruned {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(entries = n, "device history pruned"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pruning the device history failed; retrying later")
                }
                Err(e) => tracing::warn!(error = %e, "the history pruner stopped"),
            }
        }
    });
}

/// Records a SIGHUP reload in the audit log (actor `sighup`: whoever may
/// signal the service acts as an admin).
async fn audit_signal_reload(audit: &AuditLog, outcome: Outcome, message: String) {
    let audit = audit.clone();
    let entry = AuditEntry::system(
        "sighup",
        "catalog reload",
        "",
        "catalog and tiers files",
        outcome,
        &message,
        now_ms(),
    );
    let written = tokio::task::spawn_blocking(move || audit.record(&entry)).await;
    if !matches!(written, Ok(Ok(_))) {
        tracing::error!("the SIGHUP reload could not be written to the audit log");
    }
}

/// Hands every finished audit entry to the dashboard's live stream.
fn spawn_audit_events(audit: &AuditLog, live: super::api_fleet::LiveHub) {
    let mut entries = audit.subscribe();
    tokio::spawn(async move {
        loop {
            match entries.recv().await {
                Ok(e) => {
                    let data = serde_json::to_value(&e).unwrap_or_default();
                    let device = (!e.target.is_empty()).then_some(e.target.as_str());
                    live.publish("audit", device, &data);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}
