//! The running service: wires the store, the signer, the broker (embedded or
//! external), the MQTT link, the core thread, the ticker, the admin API and
//! systemd notifications together. All I/O lives here; decisions live in
//! [`super::core`].
//!
//! The core runs on its own OS thread and owns all state. It takes inbound
//! messages in batches, then commits the batch's writes (one transaction,
//! fsync) and only then publishes the instructions and answers the commands
//! of that batch: nothing leaves the process that is not on disk.

use super::broker;
use super::config::{BrokerUrl, Config};
use super::core::{self, Command, Core, CoreConfig, Reply};
use super::keys;
use super::metrics::Kind as MetricKind;
use super::metrics::Metrics;
use super::notify;
use super::store::{RedbStore, Store};
use super::tls;
use crate::policy::{Agreements, Catalog, Engine};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shardline_shared::msg::{InstructionAck, QosReport};
use shardline_shared::sign::Domain;
use shardline_shared::topics::{self, TopicKind};
use shardline_shared::DeviceId;
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
    Shutdown,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    let store = RedbStore::open(&config.store.path)?;
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
    tracing::info!(devices = records.len(), store = %config.store.path.display(), "store opened");
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
        std::thread::Builder::new()
            .name("allocator-core".into())
            .spawn(move || core_loop(core, store, rx, client, rt, metrics, heartbeat, max_batch))
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

/// Signature verification is the heaviest per-message work; it runs on its
/// own threads. A device always maps to the same thread, so its reports and
/// acks reach the core in the order the broker delivered them.
fn start_verifiers(
    keys: core::KeyDirectory,
    core_tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    max_payload: usize,
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
                while let Some((device, kind, payload)) = vrx.blocking_recv() {
                    let public = keys.read().ok().and_then(|k| k.get(&device).copied());
                    let msg = match kind {
                        TopicKind::Report => {
                            Metrics::inc(&metrics.reports_received);
                            match core::verify_signed::<QosReport>(
                                &metrics,
                                max_payload,
                                MetricKind::Report,
                                Domain::Report,
                                &device,
                                public,
                                &payload,
                            ) {
                                core::Verified::Ok(r) => Some(core::VerifiedMsg::Report(device, r)),
                                core::Verified::BadSignature => {
                                    Some(core::VerifiedMsg::BadSignature(device))
                                }
                                core::Verified::Dropped => None,
                            }
                        }
                        _ => match core::verify_signed::<InstructionAck>(
                            &metrics,
                            max_payload,
                            MetricKind::Ack,
                            Domain::Ack,
                            &device,
                            public,
                            &payload,
                        ) {
                            core::Verified::Ok(a) => Some(core::VerifiedMsg::Ack(device, a)),
                            core::Verified::BadSignature => {
                                Some(core::VerifiedMsg::BadSignature(device))
                            }
                            core::Verified::Dropped => None,
                        },
                    };
                    if let Some(m) = msg {
                        if core_tx.blocking_send(Inbound::Verified(m)).is_err() {
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
    replies: Vec<(oneshot::Sender<Reply>, Reply)>,
}

#[allow(clippy::too_many_arguments)]
fn core_loop(
    mut core: Core,
    store: RedbStore,
    mut rx: mpsc::Receiver<Inbound>,
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
                    flush(group, &store, &client, &rt, &metrics);
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
    let mut replies: Vec<(oneshot::Sender<Reply>, Reply)> = Vec::new();
    let mut stop = false;
    // The initial step writes every record once (resumed sequence numbers).
    let _ = flush_tx.send(Flush {
        step: core.take_step(),
        replies: Vec::new(),
    });
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut next = Some(first);
        let mut n = 0;
        let t = std::time::Instant::now();
        while let Some(msg) = next.take() {
            let now = now_ms();
            match msg {
                Inbound::Mqtt { topic, payload } => core.on_message(now, &topic, &payload),
                Inbound::Verified(v) => core.on_verified(now, v),
                Inbound::Connected => core.on_connected(now),
                Inbound::Tick => core.on_tick(now),
                Inbound::Command(cmd, reply) => {
                    let r = core.on_command(now, *cmd);
                    replies.push((reply, r));
                }
                Inbound::Shutdown => {
                    core.flush_lazy();
                    stop = true;
                }
            }
            n += 1;
            if n < max_batch && !stop {
                next = rx.try_recv().ok();
            }
        }
        metrics
            .core_handle_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Metrics::inc(&metrics.core_batches);
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

/// Commits a batch (retrying until the store takes it: publishing
/// uncommitted sequence numbers could reuse them after a crash), then
/// publishes its instructions and answers its commands.
fn flush(
    group: Vec<Flush>,
    store: &RedbStore,
    client: &AsyncClient,
    rt: &tokio::runtime::Handle,
    metrics: &Metrics,
) {
    let mut batches = Vec::with_capacity(group.len());
    let mut publish = Vec::new();
    let mut replies = Vec::new();
    for f in group {
        batches.push(f.step.batch);
        publish.extend(f.step.publish);
        replies.extend(f.replies);
    }
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
                Err(e) => {
                    Metrics::inc(&metrics.store_errors);
                    tracing::error!(error = %e, "store commit failed; holding every publish until it succeeds");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
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
    for (tx, r) in replies {
        let _ = tx.send(r);
    }
}
