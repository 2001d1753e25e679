//! The running service: wires the store, the signer, the broker (embedded or
//! external), the MQTT link, the core thread, the ticker, the admin API and
//! systemd notifications together. All I/O lives here; decisions live in
//! [`super::core`].
//!
//! The core runs on its own OS thread and owns all state. It takes inbound
//! messages in batches, then commits the batch's writes (one transaction,
//! fsync) and only then publishes the instructions and answers the commands
//! of that batch: nothing leaves the process that is not on disk.
//!
//! With a shared store (several instances behind one broker), the core's
//! records are a cache: before a batch is handled, the versions of the
//! devices it names are read from the store and stale copies reloaded; a
//! commit that still meets a newer version (another instance won a race) is
//! refused by the store, its writes and publishes for those devices are
//! dropped, and the core reloads them. Fleet-wide periodic work runs only on
//! the instance holding the store's lead.

use super::broker;
use super::config::{BrokerUrl, Config};
use super::core::{self, Command, Core, CoreConfig, Reply};
use super::keys;
use super::metrics::Metrics;
use super::notify;
use super::store::{RedbStore, Store, StoreError};
use super::tls;
use crate::policy::{Agreements, Catalog, Engine};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shardline_shared::sign;
use shardline_shared::topics::{self, TopicKind};
use shardline_shared::DeviceId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Catalog(#[from] crate::policy::CatalogError),
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
    #[error("API token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("core thread: {0}")]
    Thread(std::io::Error),
}

/// What goes into the core.
#[derive(Debug)]
pub enum Inbound {
    Mqtt {
        topic: String,
        payload: Vec<u8>,
    },
    /// A report or ack a verifier thread checked.
    Verified(core::VerifiedMsg),
    Connected,
    Tick,
    Command(Box<Command>, oneshot::Sender<Reply>),
    /// The store refused writes to these devices (another instance wrote
    /// them first): reload them.
    Reload(Vec<DeviceId>),
    Shutdown,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// Reads (or creates with mode 0600) the admin API bearer token.
fn api_token(path: &std::path::Path) -> Result<String, StartError> {
    let terr = |source| StartError::Token {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(t) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(terr)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(terr(std::io::Error::other(format!(
                    "mode {:04o} lets group or others read the token; chmod 600 it",
                    mode & 0o777
                ))));
            }
            let t = t.trim().to_owned();
            if t.is_empty() {
                return Err(terr(std::io::Error::other("the token file is empty")));
            }
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut seed = [0u8; 24];
            getrandom::getrandom(&mut seed)
                .map_err(|e| terr(std::io::Error::other(e.to_string())))?;
            let token = hex::encode(seed);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(terr)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(terr)?;
            writeln!(f, "{token}").map_err(terr)?;
            tracing::info!(path = %path.display(), "created the admin API token");
            Ok(token)
        }
        Err(e) => Err(terr(e)),
    }
}

/// The token file used when the config names none: beside the store.
pub fn default_token_file(config: &Config) -> PathBuf {
    config.api.token_file.clone().unwrap_or_else(|| {
        config
            .store
            .path
            .parent()
            .map_or_else(|| PathBuf::from("api-token"), |d| d.join("api-token"))
    })
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
    let catalog = Catalog::load(&config.policy.catalog)?;
    let agreements = Agreements::load(&config.policy.agreements, &catalog)?;
    let engine = Engine::new(catalog, agreements, config.policy.engine.clone());
    let records = store.load_devices()?;
    let tokens = store.load_tokens()?;
    tracing::info!(
        devices = records.len(),
        shared = store.is_shared(),
        "store opened"
    );
    let token = api_token(&default_token_file(&config))?;

    let external = config.broker_url();
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
            broker::start_embedded(&config.broker)?;
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
    };
    let loaded = core::Loaded {
        meta,
        records,
        tokens,
    };
    let core = Core::new(engine, key, loaded, core_cfg, metrics.clone(), now);

    // MQTT link.
    let mut opts = MqttOptions::new(config.broker.client_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    let max_in = config.broker.max_payload.saturating_mul(4).max(1 << 20) + 1024;
    opts.set_max_packet_size(max_in, max_in);
    opts.set_inflight(1000);
    opts.set_request_channel_capacity(20_000);
    if let Some(tls) = client_tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    if let (Some(u), Some(p)) = (&config.broker.username, &config.broker.password) {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, eventloop) = AsyncClient::new(opts, 20_000);
    let (tx, rx) = mpsc::channel::<Inbound>(65_536);
    let shared = external.is_some();
    let verifiers = start_verifiers(
        core.key_directory(),
        tx.clone(),
        metrics.clone(),
        config.broker.max_payload,
        store.is_shared(),
    )?;
    tokio::spawn(mqtt_loop(
        eventloop,
        client.clone(),
        tx.clone(),
        verifiers,
        shared,
        metrics.clone(),
    ));

    // Core thread.
    let heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let rt = tokio::runtime::Handle::current();
    let core_thread = {
        let metrics = metrics.clone();
        let heartbeat = heartbeat.clone();
        let max_batch = config.dispatch.max_batch;
        let reload_tx = tx.clone();
        std::thread::Builder::new()
            .name("allocator-core".into())
            .spawn(move || {
                core_loop(
                    core, store, rx, reload_tx, client, rt, metrics, heartbeat, max_batch,
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
        token: Arc::new(token),
        metrics: metrics.clone(),
        metrics_public: config.api.metrics_public,
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tracing::info!(%api_addr, "admin API up");

    // systemd.
    notify::notify("READY=1");
    if let Some(every) = notify::watchdog_interval() {
        let heartbeat = heartbeat.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Only vouch for a core that made progress recently.
                let age = now_ms().saturating_sub(heartbeat.load(Ordering::Relaxed));
                if age < every.as_millis() as u64 * 2 {
                    notify::notify("WATCHDOG=1");
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

/// A device-signed message waiting for its signature check.
type ToVerify = (DeviceId, TopicKind, Vec<u8>);
type VerifierTx = mpsc::Sender<ToVerify>;

/// Most messages a verifier thread checks in one signature batch.
const VERIFY_BATCH: usize = 64;
/// A verifier thread that found fewer messages than this waits
/// [`VERIFY_GATHER`] once for more before checking them.
const VERIFY_GATHER_BELOW: usize = 16;
const VERIFY_GATHER: Duration = Duration::from_millis(1);

/// What a verifier thread does with one message of its batch.
enum Verdict {
    /// Passed on as is (refused before the signature math, or for the core
    /// to verify once it has loaded the device).
    Forward(Inbound),
    /// Waiting for the batch's signature check (index into it).
    Check(DeviceId, TopicKind, core::Prepared, usize),
    Dropped,
}

/// Signature verification is the heaviest per-message work; it runs on its
/// own threads. A device always maps to the same thread, so its reports and
/// acks reach the core in the order the broker delivered them. Under load a
/// thread takes what has queued up (up to [`VERIFY_BATCH`]) and checks the
/// signatures as one Ed25519 batch, about half the CPU of checking them one
/// by one; results go to the core in arrival order.
fn start_verifiers(
    keys: core::KeyDirectory,
    core_tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    shared_store: bool,
) -> Result<Vec<VerifierTx>, StartError> {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        let (vtx, mut vrx) = mpsc::channel::<ToVerify>(16_384);
        let (keys, core_tx, metrics) = (keys.clone(), core_tx.clone(), metrics.clone());
        std::thread::Builder::new()
            .name(format!("verify-{i}"))
            .spawn(move || {
                let mut batch = Vec::with_capacity(VERIFY_BATCH);
                while let Some(first) = vrx.blocking_recv() {
                    batch.push(first);
                    for wait in [false, true] {
                        if wait {
                            if batch.len() >= VERIFY_GATHER_BELOW {
                                break;
                            }
                            // A small batch costs nearly twice the CPU per
                            // signature; a moment's wait lets one form when
                            // messages are flowing, at 1 ms of latency.
                            std::thread::sleep(VERIFY_GATHER);
                        }
                        while batch.len() < VERIFY_BATCH {
                            match vrx.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
                    }
                    let mut verdicts = Vec::with_capacity(batch.len());
                    let mut checks = Vec::with_capacity(batch.len());
                    for (device, kind, payload) in batch.drain(..) {
                        let public = keys.read().ok().and_then(|k| k.get(&device).copied());
                        if public.is_none() && shared_store {
                            // Perhaps enrolled through another instance: the
                            // core loads it from the store and verifies there.
                            let topic = if kind == TopicKind::Report {
                                topics::report(&device)
                            } else {
                                topics::ack(&device)
                            };
                            verdicts.push(Verdict::Forward(Inbound::Mqtt { topic, payload }));
                            continue;
                        }
                        verdicts.push(
                            match core::prepare_device_message(
                                &metrics,
                                max_payload,
                                kind,
                                &device,
                                public,
                                &payload,
                            ) {
                                Ok((prepared, check)) => {
                                    checks.push(check);
                                    Verdict::Check(device, kind, prepared, checks.len() - 1)
                                }
                                Err(core::Refused::BadSignature) => Verdict::Forward(
                                    Inbound::Verified(core::VerifiedMsg::BadSignature(device)),
                                ),
                                Err(core::Refused::Dropped) => Verdict::Dropped,
                            },
                        );
                    }
                    let results = sign::verify_checks(&checks);
                    if !checks.is_empty() {
                        Metrics::inc(&metrics.signature_batches);
                        metrics
                            .signatures_checked
                            .fetch_add(checks.len() as u64, Ordering::Relaxed);
                    }
                    for verdict in verdicts {
                        let msg = match verdict {
                            Verdict::Forward(m) => m,
                            Verdict::Dropped => continue,
                            Verdict::Check(device, kind, prepared, i) => {
                                match core::finish_device_message(
                                    &metrics,
                                    kind,
                                    device,
                                    prepared,
                                    results[i].is_ok(),
                                ) {
                                    Some(m) => Inbound::Verified(m),
                                    None => continue,
                                }
                            }
                        };
                        if core_tx.blocking_send(msg).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(StartError::Thread)?;
        senders.push(vtx);
    }
    Ok(senders)
}

fn shard_of(device: &DeviceId, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % n as u64) as usize
}

async fn mqtt_loop(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    tx: mpsc::Sender<Inbound>,
    verifiers: Vec<VerifierTx>,
    shared: bool,
    metrics: Arc<Metrics>,
) {
    let report_filter = if shared {
        topics::shared(topics::ALL_REPORTS)
    } else {
        topics::ALL_REPORTS.to_owned()
    };
    let ack_filter = if shared {
        topics::shared(topics::ALL_ACKS)
    } else {
        topics::ALL_ACKS.to_owned()
    };
    let enroll_filter = if shared {
        topics::shared(topics::ALL_ENROLL)
    } else {
        topics::ALL_ENROLL.to_owned()
    };
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some((device, kind @ (TopicKind::Report | TopicKind::Ack))) =
                    topics::parse(&p.topic)
                {
                    let v = &verifiers[shard_of(&device, verifiers.len())];
                    if v.send((device, kind, p.payload.to_vec())).await.is_err() {
                        return;
                    }
                    continue;
                }
                let msg = Inbound::Mqtt {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                Metrics::inc(&metrics.mqtt_reconnects);
                tracing::info!("connected to the MQTT broker");
                // Statuses are never shared: retained ones are not delivered
                // through shared subscriptions, and every instance wants them.
                let filters = [
                    report_filter.clone(),
                    ack_filter.clone(),
                    enroll_filter.clone(),
                    topics::ALL_STATUS.to_owned(),
                ];
                let client = client.clone();
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::error!(filter = %f, error = %e, "subscribe failed");
                        }
                    }
                });
                if tx.send(Inbound::Connected).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// One batch's writes with what may only happen after they are on disk.
struct Flush {
    step: core::Step,
    /// Command answers, with the device each command changed (a refused
    /// write turns its answer into an error).
    replies: Vec<(oneshot::Sender<Reply>, Reply, Option<DeviceId>)>,
}

#[allow(clippy::too_many_arguments)]
fn core_loop(
    mut core: Core,
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Inbound>,
    reload_tx: mpsc::Sender<Inbound>,
    client: AsyncClient,
    rt: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    heartbeat: Arc<AtomicU64>,
    max_batch: usize,
) {
    // Commits run on their own thread so the core handles the next batch
    // while the previous one is fsynced. Batches are committed, published
    // and answered strictly in order, each only after its commit. The
    // bounded channel holds the core back when the disk falls behind.
    let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel::<Flush>(64);
    let store_thread = {
        let metrics = metrics.clone();
        let store = store.clone();
        std::thread::Builder::new()
            .name("allocator-store".into())
            .spawn(move || {
                while let Ok(first) = flush_rx.recv() {
                    // Group commit: everything queued meanwhile goes into
                    // the same transaction (one fsync).
                    let mut group = vec![first];
                    while let Ok(more) = flush_rx.try_recv() {
                        group.push(more);
                    }
                    flush(group, &*store, &client, &rt, &metrics, &reload_tx);
                }
            })
    };
    let store_thread = match store_thread {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the store thread");
            return;
        }
    };
    let shared = store.is_shared();
    if shared {
        refresh_from_shared_store(&mut core, &*store, now_ms());
    }
    let mut replies = Vec::new();
    let mut stop = false;
    // The initial step writes every record once (resumed sequence numbers).
    let _ = flush_tx.send(Flush {
        step: core.take_step(),
        replies: Vec::new(),
    });
    let mut inbox: Vec<Inbound> = Vec::with_capacity(max_batch);
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        inbox.push(first);
        while inbox.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => inbox.push(m),
                Err(_) => break,
            }
        }
        let t = std::time::Instant::now();
        if shared {
            check_copies(&mut core, &*store, &inbox, now_ms());
        }
        for msg in inbox.drain(..) {
            let now = now_ms();
            match msg {
                Inbound::Mqtt { topic, payload } => core.on_message(now, &topic, &payload),
                Inbound::Verified(v) => core.on_verified(now, v),
                Inbound::Connected => core.on_connected(now),
                Inbound::Tick => {
                    if shared {
                        refresh_from_shared_store(&mut core, &*store, now);
                    }
                    core.on_tick(now)
                }
                Inbound::Command(cmd, reply) => {
                    let device = cmd.device().cloned();
                    let r = core.on_command(now, *cmd);
                    replies.push((reply, r, device));
                }
                Inbound::Reload(devices) => reload(&mut core, &*store, &devices, now),
                Inbound::Shutdown => {
                    core.flush_lazy();
                    stop = true;
                    break;
                }
            }
        }
        inbox.clear();
        metrics
            .core_handle_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Metrics::inc(&metrics.core_batches);
        core.pace_lazy_writes(now_ms());
        let f = Flush {
            step: core.take_step(),
            replies: std::mem::take(&mut replies),
        };
        if flush_tx.send(f).is_err() {
            break;
        }
        heartbeat.store(now_ms(), Ordering::Relaxed);
    }
    drop(flush_tx);
    let _ = store_thread.join();
    tracing::info!("core stopped");
}

/// The device an inbound message is about, if any.
fn device_of(msg: &Inbound) -> Option<DeviceId> {
    match msg {
        Inbound::Mqtt { topic, .. } => topics::parse(topic).map(|(d, _)| d),
        Inbound::Verified(v) => Some(v.device().clone()),
        Inbound::Command(cmd, _) => cmd.device().cloned(),
        _ => None,
    }
}

/// Shared store: makes sure the copies of the devices a batch is about are
/// not older than what other instances committed (one query per batch).
fn check_copies(core: &mut Core, store: &dyn Store, inbox: &[Inbound], now: u64) {
    let mut ids: Vec<DeviceId> = inbox.iter().filter_map(device_of).collect();
    if ids.is_empty() {
        return;
    }
    ids.sort();
    ids.dedup();
    let stored = match store.device_versions(Some(&ids)) {
        Ok(v) => v,
        Err(e) => {
            // Handling on a possibly stale copy is still safe: its commit
            // would be refused.
            tracing::warn!(error = %e, "cannot check device versions in the shared store");
            return;
        }
    };
    let stored: HashMap<DeviceId, u64> = stored.into_iter().collect();
    let mut stale = Vec::new();
    let mut gone = Vec::new();
    for id in ids {
        match (stored.get(&id), core.version_of(&id)) {
            (Some(&s), Some(mine)) if s > mine => stale.push(id),
            (Some(_), None) => stale.push(id),
            (None, Some(_)) => gone.push(id),
            _ => {}
        }
    }
    core.forget_devices(&gone);
    if !stale.is_empty() {
        reload(core, store, &stale, now);
    }
}

/// Reloads devices from the store (dropping the copies held here).
fn reload(core: &mut Core, store: &dyn Store, devices: &[DeviceId], now: u64) {
    match store.load_device_records(devices) {
        Ok(records) => {
            let found: std::collections::HashSet<&DeviceId> =
                records.iter().map(|r| &r.device).collect();
            let gone: Vec<DeviceId> = devices
                .iter()
                .filter(|d| !found.contains(d))
                .cloned()
                .collect();
            core.install_records(now, records);
            core.forget_devices(&gone);
        }
        Err(e) => {
            tracing::warn!(error = %e, devices = devices.len(), "cannot reload device records from the shared store")
        }
    }
}

/// Shared store, every tick: take or keep (or lose) the lead, follow
/// enrolments, unenrolments, tokens and key rotations made elsewhere, and
/// (as leader, before the fleet-wide tick) refresh every stale copy.
fn refresh_from_shared_store(core: &mut Core, store: &dyn Store, now: u64) {
    let lead = store.try_lead().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot take the lead in the shared store");
        false
    });
    core.set_leader(lead);
    match store.load_meta() {
        Ok(meta) if meta.key_epoch > core.key_epoch() => {
            let file = meta.key_file.clone().map(PathBuf::from);
            match file.as_deref().map(keys::read_secret) {
                Some(Ok(key)) => core.install_rotation(meta, key),
                Some(Err(e)) => {
                    tracing::error!(error = %e, epoch = meta.key_epoch, "another instance rotated the signing key but its key file cannot be read here")
                }
                None => tracing::error!(
                    epoch = meta.key_epoch,
                    "another instance rotated the signing key without naming its key file"
                ),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the shared store's metadata"),
    }
    match store.load_tokens() {
        Ok(tokens) => core.install_tokens(tokens),
        Err(e) => tracing::warn!(error = %e, "cannot read bootstrap tokens from the shared store"),
    }
    let stored = match store.device_versions(None) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list devices in the shared store");
            return;
        }
    };
    let mine: HashMap<DeviceId, u64> = core.versions().into_iter().collect();
    let mut load = Vec::new();
    for (id, v) in &stored {
        match mine.get(id) {
            None => load.push(id.clone()),
            Some(&m) if lead && *v > m => load.push(id.clone()),
            _ => {}
        }
    }
    let present: std::collections::HashSet<&DeviceId> = stored.iter().map(|(d, _)| d).collect();
    let gone: Vec<DeviceId> = mine
        .keys()
        .filter(|d| !present.contains(d))
        .cloned()
        .collect();
    core.forget_devices(&gone);
    for chunk in load.chunks(1000) {
        reload(core, store, chunk, now);
    }
}

/// Commits a batch (retrying until the store takes it: publishing
/// uncommitted sequence numbers could reuse them after a crash), then
/// publishes its instructions and answers its commands. Writes the store
/// refuses as stale (another instance wrote those devices first) are
/// dropped with their publishes, and the core is told to reload them.
fn flush(
    group: Vec<Flush>,
    store: &dyn Store,
    client: &AsyncClient,
    rt: &tokio::runtime::Handle,
    metrics: &Metrics,
    reload_tx: &mpsc::Sender<Inbound>,
) {
    let mut batches = Vec::with_capacity(group.len());
    let mut publish = Vec::new();
    let mut replies = Vec::new();
    for f in group {
        batches.push(f.step.batch);
        publish.extend(f.step.publish);
        replies.extend(f.replies);
    }
    let mut refused: std::collections::HashSet<DeviceId> = Default::default();
    if !batches.iter().all(|b| b.is_empty()) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let t = std::time::Instant::now();
            match store.commit_all(&batches) {
                Ok(()) => {
                    Metrics::inc(&metrics.store_commits);
                    metrics
                        .store_commit_micros
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    break;
                }
                Err(StoreError::Conflict { devices }) => {
                    Metrics::inc(&metrics.store_conflicts);
                    tracing::info!(
                        devices = devices.len(),
                        first = %devices[0],
                        "another instance wrote these devices first; dropping what was decided from the stale copies"
                    );
                    for b in &mut batches {
                        b.put_devices.retain(|r| !devices.contains(&r.device));
                        b.report_seqs.retain(|w| !devices.contains(&w.device));
                    }
                    // Never block here: the core may itself be waiting for
                    // room in the flush queue this thread drains.
                    if let Err(mpsc::error::TrySendError::Full(msg)) =
                        reload_tx.try_send(Inbound::Reload(devices.clone()))
                    {
                        let reload_tx = reload_tx.clone();
                        rt.spawn(async move {
                            let _ = reload_tx.send(msg).await;
                        });
                    }
                    refused.extend(devices);
                }
                Err(e) => {
                    Metrics::inc(&metrics.store_errors);
                    tracing::error!(error = %e, "store commit failed; holding every publish until it succeeds");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    if !refused.is_empty() {
        publish.retain(|p| topics::parse(&p.topic).is_none_or(|(d, _)| !refused.contains(&d)));
    }
    let t = std::time::Instant::now();
    for p in publish {
        let sent = rt.block_on(client.publish(p.topic, QoS::AtLeastOnce, false, p.payload));
        if let Err(e) = sent {
            Metrics::inc(&metrics.publish_errors);
            tracing::warn!(error = %e, "publish could not be queued; it will be re-sent");
        }
    }
    metrics
        .core_publish_micros
        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    for (tx, r, device) in replies {
        let r = match device {
            Some(d) if refused.contains(&d) => {
                Reply::Error(core::CommandError::Concurrent(d.to_string()))
            }
            _ => r,
        };
        let _ = tx.send(r);
    }
}
