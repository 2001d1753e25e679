//! The daemon's event loop: the I/O edge around the sans-IO pieces.
//!
//! One single-threaded tokio runtime waits on: MQTT link events, the QoS
//! window timer, the next lease deadline, a 200 ms shard-host poll (exits,
//! hangs, restarts), a one-second housekeeping tick (leases, enrolment,
//! systemd watchdog, time floor, status file), the request socket's
//! connections and the next request deadline ([`RequestCore`]), SIGTERM
//! and SIGHUP. Every decision is the [`CapabilityManager`]'s; this file only
//! executes its [`Action`]s in order and moves bytes.
//!
//! Crash test hook: `SHARDLINE_TEST_CRASH_AT=<point>` makes the process abort
//! (as `kill -9` would, no cleanup) when an instruction reaches `<point>`:
//! `before-persist` (decided, state not yet written), `after-persist` (state
//! written, shards not yet changed, nothing acknowledged) or
//! `before-broker-ack` (everything done except the MQTT PUBACK). The
//! integration tests use it to prove that a crash at each point ends in
//! exactly one application of the instruction.

use super::assignment::{RouteAction, RouteCore, SwitchReason};
use super::assignment_io;
use super::config::Config;
use super::enroll::{self, BootstrapToken, EnrollPolicy, Enroller, Marker, Phase};
use super::link::{self, LinkCore, LinkEvent, Sent};
use super::local_api::{ApiEvent, LocalApi, Reply};
use super::manager::{Action, CapabilityManager, PersistedState};
use super::outbox::{Kind, Outbox};
use super::persist;
use super::requests::{self, ConnId, RequestCore, SeqReservation};
use super::resources::ResourceSampler;
use super::runtime::{QosSource, ShardRuntime};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use shardline_shared::accept::AcceptancePolicy;
use shardline_shared::codec;
use shardline_shared::msg::{
    AckOutcome, DeviceStatus, EnrollRequest, InstructionAck, KeySet, Presence, PublicKeyEntry,
    QosReport,
};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::{topics, KeyId};
use shardline_support::notify::Notifier;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// The environment variable of the crash test hook (see the module docs).
pub const CRASH_ENV: &str = "SHARDLINE_TEST_CRASH_AT";

/// How often the time floor is persisted.
const FLOOR_EVERY: Duration = Duration::from_secs(60);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {reason}")]
    StateCorrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Outbox(#[from] super::outbox::OutboxError),
    #[error(transparent)]
    Key(#[from] super::keys::DeviceKeyError),
    #[error(transparent)]
    EnrollToken(#[from] super::enroll::EnrollTokenError),
    #[error(transparent)]
    Link(#[from] super::link::LinkSetupError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Assignment(#[from] assignment_io::AssignmentFileError),
}

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instruction key set pinned by the configuration (epoch 0).
pub fn pinned_key_set(keys: &[[u8; 32]]) -> KeySet {
    KeySet {
        epoch: 0,
        keys: keys
            .iter()
            .map(|k| PublicKeyEntry {
                key_id: KeyId::of_public_key(k),
                public_key: *k,
            })
            .collect(),
    }
}

/// Reads `state.json`; `None` on a first start.
pub fn load_state(path: &std::path::Path) -> Result<Option<PersistedState>, DaemonError> {
    match std::fs::read(path) {
        Ok(bytes) => match PersistedState::from_json(&bytes) {
            Ok((state, migrated)) => {
                if migrated {
                    tracing::info!(
                        path = %path.display(),
                        activations = state.profile.len(),
                        "state.json of format 1 migrated: its activations run without alternatives until the cloud renews them"
                    );
                }
                Ok(Some(state))
            }
            Err(e) => Err(DaemonError::StateCorrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DaemonError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

fn crash_point(hook: &Option<String>, point: &str) {
    if hook.as_deref() == Some(point) {
        tracing::error!(point, "{CRASH_ENV}: aborting on purpose");
        std::process::abort();
    }
}

struct Link {
    client: AsyncClient,
    events: UnboundedReceiver<LinkEvent>,
    driver: JoinHandle<()>,
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    key: KeyPair,
    manager: CapabilityManager,
    outbox: Outbox,
    core: LinkCore,
    link: Link,
    runtime: Box<dyn ShardRuntime>,
    source: Box<dyn QosSource>,
    sampler: ResourceSampler,
    notifier: Notifier,
    state_path: PathBuf,
    status_path: PathBuf,
    crash_at: Option<String>,
    last_report_seq: u64,
    last_status_write: u64,
    status_dirty: bool,
    /// Self-enrolment: when to send the request, and the token it carries
    /// (`None` when not configured or not needed).
    enroller: Enroller,
    enroll_token: Option<BootstrapToken>,
    /// CONNACKs received and connections lost since start (status.json):
    /// how an operator, and the hostile-publisher tests, see a link that
    /// cannot stay up.
    connects: u64,
    /// Set when the broker refused a subscription (a clustered broker's node
    /// refuses QoS 1 subscriptions while it elects new leaders after losing
    /// a peer): subscribe again at the next housekeeping tick, because
    /// without its `instr` subscription the device would hear nothing until
    /// its next reconnect.
    resubscribe_due: bool,
    subscriptions_refused: u64,
    link_drops: u64,
    /// Explicit requests of local applications: the sans-IO core, its
    /// socket (`None` when it could not be opened: logged, the rest of the
    /// agent runs), and the reply channel of each connection with a request
    /// in progress.
    requests: RequestCore,
    api: Option<LocalApi>,
    api_conns: HashMap<ConnId, UnboundedSender<Reply>>,
    seq_path: PathBuf,
    /// Baselines of the device's own QoS per class: what its reports say
    /// got worse (seed 002's good-neighbour observations; see `neighbour`).
    harm: super::neighbour::HarmWatch,
    /// `[assignment]`: the routing core (`None` without a group: the
    /// configured broker and plain topics only) and its file.
    route: Option<RouteCore>,
    assignment_path: PathBuf,
    /// Outcomes of the route core's probes of its first endpoint (url,
    /// accepted), sent by the probe tasks.
    probe_tx: UnboundedSender<(String, bool)>,
    probe_rx: UnboundedReceiver<(String, bool)>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("device", &self.cfg.device)
            .finish_non_exhaustive()
    }
}

/// Starts the link to `endpoint` (an assignment's or bootstrap URL), or to
/// `[broker] url` when `None`.
fn start_link(cfg: &Config, endpoint: Option<&str>) -> Result<Link, DaemonError> {
    let broker = match endpoint.and_then(|u| assignment_io::broker_for(&cfg.broker, u)) {
        Some(b) => b,
        None => cfg.broker.clone(),
    };
    let offline = codec::encode(&DeviceStatus {
        device: cfg.device.clone(),
        presence: Presence::Offline,
        // The will is fixed at connect time; the retained online status
        // carries the current sequence.
        applied_instruction_seq: 0,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        at_ms: now_ms(),
    });
    let options = link::mqtt_options(&broker, topics::status(&cfg.device), offline)?;
    let (client, eventloop): (AsyncClient, EventLoop) =
        AsyncClient::new(options, 4 * link::SEND_WINDOW);
    let (tx, events) = unbounded_channel();
    let driver = tokio::spawn(link::drive(
        eventloop,
        tx,
        cfg.broker.reconnect_min_ms,
        cfg.broker.reconnect_max_ms,
    ));
    Ok(Link {
        client,
        events,
        driver,
    })
}

impl Daemon {
    /// Loads keys and state, restores the last-known-good profile, opens
    /// the outbox and starts the MQTT link. Must run inside a tokio runtime.
    pub fn start(
        cfg: Config,
        runtime: Box<dyn ShardRuntime>,
        source: Box<dyn QosSource>,
    ) -> Result<Self, DaemonError> {
        let state_io = |source| DaemonError::State {
            path: cfg.state_dir.clone(),
            source,
        };
        persist::ensure_private_dir(&cfg.state_dir).map_err(state_io)?;
        let (key, created) = super::keys::load_or_create(&cfg.device_key_file)?;
        let mut runtime = runtime;
        // Before the restored profile starts: its sealed configs need it.
        runtime.set_device_key(&cfg.device, &key);
        if created {
            tracing::info!(
                path = %cfg.device_key_file.display(),
                public_key = %hex::encode(key.public_key()),
                "generated the device key; enrol this public key with the allocator"
            );
        }
        let state_path = cfg.state_dir.join("state.json");
        let persisted = load_state(&state_path)?;
        let now = now_ms();
        let (manager, actions) = CapabilityManager::restore(
            cfg.device.clone(),
            AcceptancePolicy::default(),
            persisted,
            pinned_key_set(&cfg.allocator_keys),
            now,
        );
        let (enroller, enroll_token) = enrolment(
            &cfg,
            &key,
            manager.applied_seq() > 0,
            EnrollPolicy::default(),
        )?;
        let outbox = Outbox::open(&cfg.state_dir.join("outbox"), cfg.outbox_cap)?;
        if !outbox.is_empty() {
            tracing::info!(messages = outbox.len(), "resending what the outbox kept");
        }
        let seq_path = cfg.state_dir.join(SEQ_FILE);
        let requests = RequestCore::new(
            cfg.device.clone(),
            cfg.requests.apps.clone(),
            cfg.requests.policy,
            SeqReservation::resume(load_seq_ceiling(&seq_path)?),
        );
        let api = open_api(&cfg);
        let assignment_path = cfg.state_dir.join(assignment_io::FILE);
        let route = match &cfg.assignment {
            Some(a) => {
                let state = assignment_io::load(&assignment_path, &a.group)?;
                let r = RouteCore::new(state, a.bootstrap.clone(), now)
                    .with_home_probe(a.home_probe_ms);
                tracing::info!(
                    group = %r.group(),
                    endpoint = r.endpoint(),
                    source = ?r.source(),
                    "assignment restored"
                );
                Some(r)
            }
            None => None,
        };
        let link = start_link(&cfg, route.as_ref().map(|r| r.endpoint()))?;
        let (probe_tx, probe_rx) = unbounded_channel();
        let mut d = Self {
            status_path: cfg.state_dir.join("status.json"),
            cfg,
            key,
            manager,
            outbox,
            core: LinkCore::default(),
            link,
            runtime,
            source,
            sampler: ResourceSampler::default(),
            notifier: Notifier::from_env(),
            state_path,
            crash_at: std::env::var(CRASH_ENV).ok(),
            last_report_seq: 0,
            last_status_write: 0,
            status_dirty: true,
            enroller,
            enroll_token,
            connects: 0,
            resubscribe_due: false,
            subscriptions_refused: 0,
            link_drops: 0,
            requests,
            api,
            api_conns: HashMap::new(),
            seq_path,
            harm: super::neighbour::HarmWatch::default(),
            route,
            assignment_path,
            probe_tx,
            probe_rx,
        };
        // Restore: persist what changed (leases that ran out while the agent
        // was down), then start the rest of the last-known-good profile.
        d.execute(actions, None)?;
        d.write_status(now);
        Ok(d)
    }

    /// Runs until SIGTERM (Ok) or a fatal error.
    pub async fn run(mut self) -> Result<(), DaemonError> {
        let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
        let mut window = window_interval(self.cfg.monitor.window_ms);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Shard hosts are polled more often than the rest is kept: a hung
        // or dead host must be seen (and answered) well within a second.
        let mut shard_poll = tokio::time::interval(SHARD_POLL);
        shard_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_every = self.notifier.watchdog_interval();
        let mut last_watchdog = tokio::time::Instant::now();
        let mut last_floor = tokio::time::Instant::now();
        self.notifier.ready();
        tracing::info!(
            device = %self.cfg.device,
            broker = %format!("{}:{}", self.cfg.broker.host, self.cfg.broker.port),
            tls = self.cfg.broker.tls,
            applied_seq = self.manager.applied_seq(),
            "agent running"
        );
        loop {
            let lease_wait = self
                .manager
                .next_deadline()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            let request_wait = self
                .requests
                .next_deadline()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            let route_wait = self
                .route
                .as_ref()
                .and_then(|r| r.next_deadline())
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                ev = api_event(&mut self.api) => self.on_api_event(ev)?,
                _ = tokio::time::sleep(request_wait.unwrap_or(Duration::MAX)), if request_wait.is_some() => {
                    let actions = self.requests.on_tick(now_ms());
                    self.execute_requests(actions);
                }
                ev = self.link.events.recv() => match ev {
                    Some(ev) => self.on_link_event(ev)?,
                    None => {
                        tracing::warn!("MQTT driver ended; restarting the link");
                        self.restart_link()?;
                    }
                },
                _ = window.tick() => self.on_window()?,
                Some((url, accepted)) = self.probe_rx.recv() => {
                    let actions = self.route.as_mut().map(|r| r.on_probe(&url, accepted, now_ms())).unwrap_or_default();
                    if !accepted {
                        tracing::debug!(endpoint = %url, "first endpoint still unreachable");
                    }
                    self.execute_route(actions)?;
                }
                _ = tokio::time::sleep(route_wait.unwrap_or(Duration::MAX)), if route_wait.is_some() => {
                    let actions = self.route.as_mut().map(|r| r.on_tick(now_ms())).unwrap_or_default();
                    self.execute_route(actions)?;
                }
                _ = tokio::time::sleep(lease_wait.unwrap_or(Duration::MAX)), if lease_wait.is_some() => {
                    let actions = self.manager.on_tick(now_ms());
                    self.execute(actions, None)?;
                }
                _ = shard_poll.tick() => {
                    let now = now_ms();
                    let events = self.runtime.poll(now);
                    if !events.is_empty() {
                        for line in events {
                            tracing::info!(event = %line, "shard host");
                        }
                        self.write_status(now);
                    }
                }
                _ = housekeeping.tick() => {
                    if std::mem::take(&mut self.resubscribe_due) {
                        self.subscribe_all();
                    }
                    let now = now_ms();
                    let actions = self.manager.on_tick(now);
                    self.execute(actions, None)?;
                    self.poll_enroll(now);
                    if last_floor.elapsed() >= FLOOR_EVERY {
                        last_floor = tokio::time::Instant::now();
                        let actions = self.manager.advance_floor(super::clock::trusted_now(now));
                        self.execute(actions, None)?;
                    }
                    if let Some(every) = watchdog_every {
                        if last_watchdog.elapsed() >= every {
                            self.notifier.watchdog();
                            last_watchdog = tokio::time::Instant::now();
                        }
                    }
                    self.write_status(now);
                }
                _ = sighup.recv() => {
                    if let Some(ms) = self.reload()? {
                        window = window_interval(ms);
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        self.shutdown().await;
        Ok(())
    }

    fn on_link_event(&mut self, ev: LinkEvent) -> Result<(), DaemonError> {
        match ev {
            LinkEvent::Down {
                error,
                dropped_unsent,
            } => {
                if self.core.is_connected() {
                    self.link_drops += 1;
                    tracing::warn!(%error, drops = self.link_drops, "broker connection lost");
                } else {
                    tracing::debug!(%error, "broker not reachable");
                }
                self.core.on_down(dropped_unsent);
                self.enroller.on_disconnected();
                self.status_dirty = true;
                let actions = self
                    .route
                    .as_mut()
                    .map(|r| r.on_down(now_ms()))
                    .unwrap_or_default();
                self.execute_route(actions)?;
            }
            LinkEvent::Mqtt(Event::Incoming(Packet::ConnAck(ack))) => {
                self.connects += 1;
                tracing::info!(
                    session_present = ack.session_present,
                    connects = self.connects,
                    "connected to the broker"
                );
                self.core.on_connected();
                if let Some(r) = &mut self.route {
                    r.on_connected(now_ms());
                }
                self.resubscribe_due = false;
                self.subscribe_all();
                self.publish_online();
                // Before the outbox: the allocator should know the key
                // before the first report signed with it arrives.
                self.enroller.on_connected(now_ms());
                self.poll_enroll(now_ms());
                self.flush();
                self.status_dirty = true;
            }
            LinkEvent::Mqtt(Event::Incoming(Packet::Publish(p))) => self.on_publish(p)?,
            LinkEvent::Mqtt(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(id) = self.core.on_puback(ack.pkid) {
                    self.outbox.remove(id);
                }
                self.flush();
            }
            LinkEvent::Mqtt(Event::Outgoing(out)) => self.core.on_outgoing(&out),
            LinkEvent::Mqtt(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    self.subscriptions_refused += refused as u64;
                    self.resubscribe_due = true;
                    tracing::warn!(
                        refused,
                        total_refused = self.subscriptions_refused,
                        "the broker refused a subscription; subscribing again within a second"
                    );
                }
            }
            LinkEvent::Mqtt(Event::Incoming(_)) => {}
        }
        Ok(())
    }

    /// The device's subscriptions: its instructions, its answers and, with
    /// an assignment group, the group's (retained) object. Subscribing again
    /// is harmless: the broker replaces the subscription, and the retained
    /// object comes again, a duplicate the route core ignores.
    fn subscribe_all(&mut self) {
        let instr = topics::instr(&self.cfg.device);
        if let Err(e) = self.link.client.try_subscribe(instr, QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "subscribe request failed");
        }
        let answer = topics::answer(&self.cfg.device);
        if let Err(e) = self.link.client.try_subscribe(answer, QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "subscribe request (answers) failed");
        }
        if let Some(r) = &self.route {
            // Retained: the broker hands over the group's current object on
            // every subscribe.
            let t = topics::assignment(r.group());
            if let Err(e) = self.link.client.try_subscribe(t, QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "subscribe request (assignment) failed");
            }
        }
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), DaemonError> {
        if p.topic == topics::instr(&self.cfg.device) {
            let now = now_ms();
            let actions = self.manager.on_instruction(&p.payload, now);
            self.execute(actions, Some(now))?;
            crash_point(&self.crash_at, "before-broker-ack");
        } else if let Some(r) = self
            .route
            .as_mut()
            .filter(|r| p.topic == topics::assignment(r.group()))
        {
            if RouteCore::is_withdrawal(&p.payload) {
                r.on_withdrawn();
                tracing::info!(
                    group = %r.group(),
                    retained = p.retain,
                    held_version = r.state().current.as_ref().map(|h| h.assignment.version),
                    "the group's assignment object was withdrawn; the held one stays in use until it expires"
                );
                if let Err(e) = self.link.client.try_ack(&p) {
                    tracing::warn!(error = %e, "could not queue the PUBACK; the broker will redeliver");
                }
                self.status_dirty = true;
                return Ok(());
            }
            let now = now_ms();
            let (verdict, actions) = r.on_object(&p.payload, now, &self.manager.acceptance().keys);
            log_verdict(r, &verdict, p.retain);
            // Persisted (or refused) before the PUBACK, and the PUBACK goes
            // out on the connection the object came on, before any move: a
            // PUBACK with this packet id on the new connection would
            // acknowledge some other message there.
            let (moves, first): (Vec<_>, Vec<_>) = actions
                .into_iter()
                .partition(|a| matches!(a, RouteAction::Connect { .. }));
            self.execute_route(first)?;
            if let Err(e) = self.link.client.try_ack(&p) {
                tracing::warn!(error = %e, "could not queue the PUBACK; the broker will redeliver");
            }
            self.execute_route(moves)?;
            self.status_dirty = true;
            return Ok(());
        } else if p.topic == topics::answer(&self.cfg.device) {
            // Answers are not persisted: a redelivery after a restart
            // matches no pending request and is dropped.
            let actions =
                self.requests
                    .on_answer(now_ms(), &p.payload, &self.manager.acceptance().keys);
            self.execute_requests(actions);
        } else {
            tracing::warn!(topic = %p.topic, "message on an unexpected topic; ignored");
        }
        // Only now, with the effect on disk, may the broker forget it.
        if let Err(e) = self.link.client.try_ack(&p) {
            tracing::warn!(error = %e, "could not queue the PUBACK; the broker will redeliver");
        }
        Ok(())
    }

    /// Executes manager actions in order. `instruction_at` marks an
    /// instruction's action list (crash hooks apply, acks are published).
    fn execute(
        &mut self,
        actions: Vec<Action>,
        instruction_at: Option<u64>,
    ) -> Result<(), DaemonError> {
        let now = instruction_at.unwrap_or_else(now_ms);
        let mut failure: Option<String> = None;
        let hook = if instruction_at.is_some() {
            self.crash_at.clone()
        } else {
            None
        };
        for action in actions {
            match action {
                Action::Persist(state) => {
                    crash_point(&hook, "before-persist");
                    self.save(&state)?;
                    crash_point(&hook, "after-persist");
                }
                Action::Start { capability, shards } => {
                    tracing::info!(capability, shards = shards.len(), "starting capability");
                    if let Err(e) = self.runtime.activate(&capability, &shards, now) {
                        tracing::warn!(capability, error = %e, "capability failed to start");
                        failure = Some(format!("{capability}: {e}"));
                    }
                    self.status_dirty = true;
                }
                Action::Stop { capability } => {
                    tracing::info!(capability, "stopping capability");
                    self.runtime.deactivate(&capability, now);
                    self.status_dirty = true;
                }
                Action::Ack { seq, outcome } => {
                    let outcome = match (outcome, &failure) {
                        (AckOutcome::Applied, Some(reason)) => AckOutcome::Failed {
                            reason: reason.clone(),
                        },
                        (o, _) => o,
                    };
                    tracing::info!(seq, ?outcome, "instruction handled");
                    if instruction_at.is_some() && enroll::is_evidence(&outcome) {
                        self.on_enrolled(now);
                    }
                    let ack = InstructionAck {
                        device: self.cfg.device.clone(),
                        instruction_seq: seq,
                        outcome,
                        at_ms: now,
                    };
                    let bytes = sign::seal(Domain::Ack, &ack, &[&self.key]);
                    self.outbox
                        .push(Kind::Ack, &topics::ack(&self.cfg.device), &bytes)?;
                    self.flush();
                    self.status_dirty = true;
                }
                Action::Diagnostics { seq, max_lines } => {
                    self.send_diagnostics(seq, max_lines, now)
                }
            }
        }
        if self.status_dirty {
            self.write_status(now);
        }
        Ok(())
    }

    /// Answers an operator's diagnostics request (issue 20): the newest log
    /// lines within the wire caps and the agent's status, sealed with the
    /// device key, published once (QoS 1, not through the outbox: a stale
    /// answer after a restart is worth nothing; the operator asks again).
    fn send_diagnostics(&mut self, seq: u64, max_lines: u16, now: u64) {
        use shardline_shared::diag::{self, DiagShard, DiagStatus, Diagnostics};
        if let Some(r) = &self.route {
            // The wire status has no assignment fields: the answer's newest
            // log line carries it (group, version, server, endpoint, expiry).
            let held = r.state().current.as_ref().map(|h| &h.assignment);
            tracing::info!(
                group = %r.group(),
                source = ?r.source(),
                version = held.map(|a| a.version),
                server = held.map(|a| a.server.as_str()),
                endpoint = r.endpoint(),
                expires_at_ms = held.map(|a| a.expires_at_ms),
                routed = r.routed(now),
                "assignment status"
            );
        }
        let (lines, errors) = crate::logging::recent();
        let keep = usize::from(max_lines).min(diag::MAX_LOG_LINES);
        let from = lines.len().saturating_sub(keep);
        let (log_lines, cut) = diag::newest_within_caps(&lines[from..]);
        let shards = self
            .runtime
            .statuses(now)
            .into_iter()
            .take(diag::MAX_STATUS_ITEMS)
            .map(|s| DiagShard {
                shard: s.shard,
                capability: s.capability,
                state: s.state,
                restarts: s.restarts,
                last_failure: s.last_failure.map(|f| diag::clip_line(&format!("{f:?}"))),
            })
            .collect();
        let capture_source = match &self.cfg.monitor.pcap {
            Some(p) => format!("pcap {}", p.display()),
            None => format!("{:?}", self.cfg.monitor.capture).to_lowercase(),
        };
        let answer = Diagnostics {
            device: self.cfg.device.clone(),
            request_seq: seq,
            at_ms: now,
            status: DiagStatus {
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_s: crate::logging::uptime_s(),
                arch: std::env::consts::ARCH.to_owned(),
                shards,
                capture_source: diag::clip_line(&capture_source),
                broker_connected: self.core.is_connected(),
                last_errors: errors
                    .iter()
                    .rev()
                    .take(diag::MAX_STATUS_ITEMS)
                    .rev()
                    .map(|e| diag::clip_line(e))
                    .collect(),
            },
            truncated: cut || from > 0,
            log_lines,
        };
        let sealed = answer.seal(&self.key);
        let topic = self.uplink_topic(topics::diagnostics(&self.cfg.device));
        if link::try_publish(&self.link.client, &topic, sealed, false) {
            self.core.handed_out(Sent::Other);
            tracing::info!(
                seq,
                lines = answer.log_lines.len(),
                truncated = answer.truncated,
                "diagnostics sent"
            );
        } else {
            tracing::warn!(seq, "diagnostics not sent: the MQTT client is busy");
        }
    }

    fn on_api_event(&mut self, ev: Option<ApiEvent>) -> Result<(), DaemonError> {
        match ev {
            Some(ApiEvent::Request {
                conn,
                caller,
                request,
                reply,
            }) => {
                tracing::debug!(
                    conn,
                    pid = caller.pid,
                    uid = caller.uid,
                    app = request.app(),
                    instance = request.instance(),
                    "request from a local application"
                );
                self.api_conns.insert(conn, reply);
                let connected = self.core.is_connected();
                let actions = self
                    .requests
                    .on_request(now_ms(), conn, caller, request, connected);
                self.execute_requests(actions);
            }
            Some(ApiEvent::Closed { conn }) => {
                self.api_conns.remove(&conn);
                self.requests.on_closed(conn);
            }
            Some(ApiEvent::BadLine {
                conn,
                caller,
                error,
            }) => {
                tracing::debug!(conn, pid = caller.pid, uid = caller.uid, %error, "request line refused");
            }
            None => {
                // The accept task ended (it never does on its own): say so
                // once, and stop polling it.
                tracing::error!("request socket stopped; explicit requests are unavailable");
                if let Some(api) = self.api.take() {
                    api.close();
                }
            }
        }
        Ok(())
    }

    /// Executes the request core's actions in order.
    fn execute_requests(&mut self, actions: Vec<requests::Action>) {
        let mut queue: std::collections::VecDeque<_> = actions.into();
        // Set when a ceiling write failed: the publish after it must not go.
        let mut ceiling_failed: Option<String> = None;
        while let Some(action) = queue.pop_front() {
            match action {
                requests::Action::PersistSeqCeiling(ceiling) => {
                    let bytes = serde_json::to_vec(&SeqFile {
                        reserved_through: ceiling,
                    })
                    .unwrap_or_default();
                    if let Err(e) = persist::write_atomic(&self.seq_path, &bytes, 0o600) {
                        tracing::error!(path = %self.seq_path.display(), error = %e, "could not reserve request sequence numbers");
                        ceiling_failed =
                            Some(format!("could not write {}: {e}", self.seq_path.display()));
                    }
                }
                requests::Action::Publish(req) => {
                    let seq = req.seq;
                    let failed = match ceiling_failed.take() {
                        Some(why) => Some((true, why)),
                        None => {
                            let sealed = shardline_shared::request::seal_request(&req, &self.key);
                            let topic = self.uplink_topic(topics::request(&self.cfg.device));
                            if link::try_publish(&self.link.client, &topic, sealed, false) {
                                self.core.handed_out(Sent::Other);
                                tracing::info!(
                                    seq,
                                    app = %req.app,
                                    instance = %req.instance,
                                    op = ?req.op,
                                    "request sent to the allocator"
                                );
                                None
                            } else {
                                Some((false, "the MQTT client is busy".to_owned()))
                            }
                        }
                    };
                    if let Some((ceiling, why)) = failed {
                        queue.extend(self.requests.on_send_failed(seq, ceiling, &why));
                    }
                }
                requests::Action::Reply { conn, answer, last } => {
                    // Debug: local refusals come as fast as a caller sends (what is
                    // sent is logged at info, bounded by the rate limit).
                    tracing::debug!(conn, last, answer = %answer.describe(), "answer to a local application");
                    if let Some(tx) = self.api_conns.get(&conn) {
                        // A closed connection's receiver is gone: nothing to do.
                        let _ = tx.send(Reply { answer, last });
                    }
                }
                requests::Action::Dropped {
                    reason,
                    request_seq,
                    detail,
                } => {
                    // Anyone able to publish on the answer topic could fill
                    // the journal: warn at the 1st, 2nd, 4th, 8th … drop of
                    // a kind, the rest at debug (status.json counts them all).
                    let c = self.requests.counters();
                    let n = match reason {
                        requests::DropReason::Unverified => c.answers_unverified,
                        requests::DropReason::OtherDevice => c.answers_other_device,
                        requests::DropReason::Unmatched => c.answers_unmatched,
                    };
                    if n.is_power_of_two() {
                        tracing::warn!(
                            reason = reason.as_str(),
                            request_seq,
                            %detail,
                            dropped = n,
                            "answer from the broker dropped"
                        );
                    } else {
                        tracing::debug!(
                            reason = reason.as_str(),
                            request_seq,
                            %detail,
                            dropped = n,
                            "answer from the broker dropped"
                        );
                    }
                    self.status_dirty = true;
                }
            }
        }
    }

    fn save(&self, state: &PersistedState) -> Result<(), DaemonError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| DaemonError::StateCorrupt {
            path: self.state_path.clone(),
            reason: e.to_string(),
        })?;
        persist::write_atomic(&self.state_path, &bytes, 0o600).map_err(|source| {
            DaemonError::State {
                path: self.state_path.clone(),
                source,
            }
        })
    }

    fn on_window(&mut self) -> Result<(), DaemonError> {
        let now = now_ms();
        while let Some(window) = self.source.poll_window(now) {
            self.report(window, now)?;
        }
        Ok(())
    }

    fn report(&mut self, window: super::runtime::QosWindow, now: u64) -> Result<(), DaemonError> {
        let (seq, actions) = self.manager.next_report_seq();
        self.execute(actions, None)?;
        let shards = self
            .manager
            .report_statuses(self.runtime.statuses(now), now);
        let harm = self.harm.observe(&window.classes);
        let report = QosReport {
            device: self.cfg.device.clone(),
            seq,
            window_start_ms: window.start_ms,
            window_ms: window.window_ms,
            classes: window.classes,
            resources: self.sampler.sample(),
            shards,
            applied_instruction_seq: self.manager.applied_seq(),
            rejections: self.manager.rejections().clone(),
            lending: shardline_shared::msg::LendingReport {
                harm,
                consent: self.cfg.lending,
            },
        };
        let bytes = sign::seal(Domain::Report, &report, &[&self.key]);
        self.outbox
            .push(Kind::Report, &topics::report(&self.cfg.device), &bytes)?;
        self.last_report_seq = seq;
        self.flush();
        Ok(())
    }

    /// Publishes the enrolment request when the [`Enroller`] says so:
    /// straight to the client (QoS 1, not retained), never through the
    /// on-disk outbox, and never logged with its token.
    fn poll_enroll(&mut self, now: u64) {
        let Some(token) = &self.enroll_token else {
            return;
        };
        let was = self.enroller.phase();
        if let Some(attempt) = self.enroller.poll(now) {
            let req = EnrollRequest {
                device: self.cfg.device.clone(),
                public_key: self.key.public_key(),
                token: token.as_str().to_owned(),
            };
            let sealed = sign::seal_enroll(&req, &self.key);
            let topic = topics::enroll(&self.cfg.device);
            if link::try_publish(&self.link.client, &topic, sealed, false) {
                self.core.handed_out(Sent::Other);
                tracing::info!(
                    device = %self.cfg.device,
                    attempt,
                    key_id = %self.key.id(),
                    next_in_ms = self.enroller.next_deadline().map(|d| d.saturating_sub(now)),
                    "enrolment request sent"
                );
            } else {
                tracing::warn!(
                    attempt,
                    "enrolment request not queued (client busy); retrying later"
                );
            }
        } else if was == Phase::Pending && self.enroller.phase() == Phase::GaveUp {
            tracing::warn!(
                device = %self.cfg.device,
                attempts = self.enroller.attempts(),
                "no sign of enrolment after the last request; stopped sending it \
                 (check the token with the operator; a restart tries again)"
            );
            self.enroll_token = None;
        }
    }

    /// Evidence of enrolment: remember it, forget the token.
    fn on_enrolled(&mut self, now: u64) {
        if !self.enroller.on_evidence() {
            return;
        }
        let had_token = self.enroll_token.take().is_some();
        let marker = Marker {
            device: self.cfg.device.to_string(),
            public_key: hex::encode(self.key.public_key()),
            at_ms: now,
        };
        match marker.write(&self.cfg.state_dir) {
            Ok(()) => tracing::info!(
                device = %self.cfg.device,
                requests = self.enroller.attempts(),
                had_token,
                "enrolled: a signed instruction from the allocator took effect"
            ),
            Err(e) => tracing::warn!(error = %e, "could not write the enrolment marker"),
        }
    }

    fn publish_online(&mut self) {
        let status = codec::encode(&DeviceStatus {
            device: self.cfg.device.clone(),
            presence: Presence::Online,
            applied_instruction_seq: self.manager.applied_seq(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            at_ms: now_ms(),
        });
        if link::try_publish(
            &self.link.client,
            &topics::status(&self.cfg.device),
            status,
            true,
        ) {
            self.core.handed_out(Sent::Other);
        }
    }

    /// Hands the oldest unsent outbox messages to the client, within the window.
    fn flush(&mut self) {
        for id in self.core.to_send(self.outbox.ids()) {
            match self.outbox.read(id) {
                Ok(Some(m)) => {
                    // The outbox keeps the plain topic; the routing of the
                    // moment picks the one it goes out on (a switch resends
                    // in-flight messages on the new routing's topic).
                    let topic = self.uplink_topic(m.topic);
                    if !link::try_publish(&self.link.client, &topic, m.payload, false) {
                        break;
                    }
                    self.core.handed_out(Sent::Outbox(id));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "dropping an unreadable outbox message");
                    self.outbox.remove(id);
                }
            }
        }
    }

    /// A small JSON file for operators and tests: profile, shard states,
    /// link and outbox; written on changes and at most once a second otherwise.
    fn write_status(&mut self, now: u64) {
        if !self.status_dirty && now.saturating_sub(self.last_status_write) < 1000 {
            return;
        }
        self.status_dirty = false;
        self.last_status_write = now;
        let profile: Vec<_> = self
            .manager
            .profile()
            .map(|a| {
                serde_json::json!({
                    "shard": a.primary.shard.to_string(),
                    "alternatives": a.alternatives.iter().map(|v| v.shard.to_string()).collect::<Vec<_>>(),
                    "capability": a.capability,
                    "lease_expires_at_ms": a.lease_expires_at_ms,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "at_ms": now,
            "device": self.cfg.device.as_str(),
            "connected": self.core.is_connected(),
            "applied_instruction_seq": self.manager.applied_seq(),
            "key_epoch": self.manager.acceptance().keys.epoch,
            "profile": profile,
            "shards": self.runtime.statuses(now),
            "rejections": self.manager.rejections(),
            "last_report_seq": self.last_report_seq,
            "outbox_len": self.outbox.len(),
            "outbox_dropped": self.outbox.dropped(),
            "outbox_unacked": self.core.unacked(),
            "acks_withheld": self.manager.acks_withheld(),
            "connects": self.connects,
            "subscriptions_refused": self.subscriptions_refused,
            "link_drops": self.link_drops,
            "assignment": self.route.as_ref().map(|r| route_status(r, now)),
            "requests": {
                "socket": self.api.as_ref().map(|a| a.path.display().to_string()),
                "pending": self.requests.pending(),
                "next_seq": self.requests.next_seq(),
                "counters": self.requests.counters(),
            },
        });
        // Not fsynced: it is a view, rebuilt every second.
        let tmp = self.status_path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, doc.to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.status_path));
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not write status.json");
        }
    }

    fn restart_link(&mut self) -> Result<(), DaemonError> {
        self.replace_link()?.driver.abort();
        Ok(())
    }

    /// Starts a new link to the endpoint in use and returns the old one.
    fn replace_link(&mut self) -> Result<Link, DaemonError> {
        let endpoint = self.route.as_ref().map(|r| r.endpoint().to_owned());
        let old = std::mem::replace(&mut self.link, start_link(&self.cfg, endpoint.as_deref())?);
        // Whatever was in flight on the old connection is released and
        // sent again from the outbox on the new one.
        self.core = LinkCore::default();
        self.enroller.on_disconnected();
        self.status_dirty = true;
        Ok(old)
    }

    /// The topic an uplink goes out on now: `plain` (a `dev/{id}/…` topic)
    /// or, under a valid assignment, its group-routed form.
    fn uplink_topic(&self, plain: String) -> String {
        let Some(r) = &self.route else {
            return plain;
        };
        match topics::parse(&plain) {
            Some((device, kind)) => r.uplink_topic(&device, kind, now_ms()).unwrap_or(plain),
            None => plain,
        }
    }

    /// Executes the route core's actions in order.
    fn execute_route(&mut self, actions: Vec<RouteAction>) -> Result<(), DaemonError> {
        for action in actions {
            match action {
                RouteAction::Persist(state) => {
                    assignment_io::save(&self.assignment_path, &state)?;
                }
                RouteAction::Connect { url, reason } => {
                    let switches = self
                        .route
                        .as_ref()
                        .map_or(0, |r| r.counters().endpoint_switches);
                    match &reason {
                        SwitchReason::Failover { from } => tracing::warn!(
                            from = %from,
                            to = %url,
                            reason = reason.as_str(),
                            switches,
                            "broker endpoint unreachable; trying the next one"
                        ),
                        _ => tracing::info!(
                            to = %url,
                            reason = reason.as_str(),
                            switches,
                            "switching broker endpoint"
                        ),
                    }
                    if matches!(reason, SwitchReason::Failover { .. }) {
                        self.restart_link()?;
                    } else {
                        // A planned move: leave the old node cleanly (a
                        // DISCONNECT discards the last will, so no "offline"
                        // status races the new connection's "online").
                        let old = self.replace_link()?;
                        tokio::spawn(leave(old));
                    }
                }
                RouteAction::Probe { url } => {
                    let tx = self.probe_tx.clone();
                    tokio::spawn(async move {
                        let accepted = assignment_io::probe(&url).await;
                        let _ = tx.send((url, accepted));
                    });
                }
                RouteAction::Refetch => {
                    if let Some(r) = &self.route {
                        let t = topics::assignment(r.group());
                        tracing::debug!(group = %r.group(), "re-fetching the assignment");
                        let _ = self.link.client.try_unsubscribe(t.clone());
                        if let Err(e) = self.link.client.try_subscribe(t, QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "re-fetch of the assignment not queued");
                        }
                    }
                }
                RouteAction::Expired {
                    version,
                    refetch_unanswered,
                } => {
                    if refetch_unanswered {
                        tracing::warn!(
                            version,
                            "assignment expired: no fresh object came before its expiry; \
                             back to the bootstrap endpoints and plain topics"
                        );
                    } else {
                        tracing::warn!(
                            version,
                            "assignment expired; back to the bootstrap endpoints and plain topics"
                        );
                    }
                }
            }
            self.status_dirty = true;
        }
        Ok(())
    }

    /// SIGHUP: re-reads the configuration. Broker settings (and the MQTT
    /// password file), window, outbox cap and pinned keys take effect; a
    /// changed device id or state directory needs a restart and is refused.
    /// Returns the new window length.
    fn reload(&mut self) -> Result<Option<u32>, DaemonError> {
        self.notifier.reloading();
        let new = match Config::load(&self.cfg.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the running configuration");
                self.notifier.ready();
                return Ok(None);
            }
        };
        if new.device != self.cfg.device
            || new.state_dir != self.cfg.state_dir
            || new.device_key_file != self.cfg.device_key_file
        {
            tracing::error!(
                "reload refused: device id, state dir and key file change only with a restart"
            );
            self.notifier.ready();
            return Ok(None);
        }
        let old = std::mem::replace(&mut self.cfg, new);
        let actions = self.manager.repin(pinned_key_set(&self.cfg.allocator_keys));
        self.execute(actions, None)?;
        self.requests
            .reconfigure(self.cfg.requests.apps.clone(), self.cfg.requests.policy);
        if old.requests.socket != self.cfg.requests.socket
            || old.requests.max_connections != self.cfg.requests.max_connections
        {
            tracing::warn!("request socket path and max_connections change at the next restart");
        }
        self.outbox.set_cap(self.cfg.outbox_cap);
        // A password file may have been rewritten in place (a rotated
        // credential) with the configuration unchanged: log in again.
        if old.broker != self.cfg.broker || self.cfg.broker.password_file.is_some() {
            tracing::info!(
                changed = old.broker != self.cfg.broker,
                "reconnecting with the reloaded broker settings"
            );
            self.restart_link()?;
        }
        let window = (old.monitor.window_ms != self.cfg.monitor.window_ms).then(|| {
            self.source.set_window(self.cfg.monitor.window_ms);
            self.cfg.monitor.window_ms
        });
        if old.assignment != self.cfg.assignment {
            tracing::warn!("[assignment] changes take effect at the next restart");
        }
        if old.monitor.interfaces != self.cfg.monitor.interfaces
            || old.monitor.pcap != self.cfg.monitor.pcap
        {
            tracing::warn!("capture source changes take effect at the next restart");
        }
        tracing::info!("configuration reloaded");
        self.notifier.ready();
        Ok(window)
    }

    /// SIGTERM: stop shard hosts, say offline, leave the outbox for the next start.
    async fn shutdown(mut self) {
        self.notifier.stopping();
        tracing::info!("stopping: shutting down shard hosts");
        self.runtime.shutdown();
        self.status_dirty = true;
        self.write_status(now_ms());
        if self.core.is_connected() {
            let offline = codec::encode(&DeviceStatus {
                device: self.cfg.device.clone(),
                presence: Presence::Offline,
                applied_instruction_seq: self.manager.applied_seq(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                at_ms: now_ms(),
            });
            if link::try_publish(
                &self.link.client,
                &topics::status(&self.cfg.device),
                offline,
                true,
            ) {
                // Give the event loop a moment to put it on the wire.
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(Some(ev)) =
                    tokio::time::timeout_at(deadline, self.link.events.recv()).await
                {
                    if matches!(ev, LinkEvent::Mqtt(Event::Incoming(Packet::PubAck(_)))) {
                        break;
                    }
                }
            }
            let _ = self.link.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(200), self.link.events.recv()).await;
        }
        self.link.driver.abort();
        if let Some(api) = self.api.take() {
            api.close();
        }
        tracing::info!(outbox = self.outbox.len(), "stopped");
    }
}

/// The enrolment state at start: enrolled when the marker names this key or
/// an instruction was ever applied; otherwise the token file is read (a
/// missing file only disables enrolment, since the device may have been
/// enrolled by other means; a readable-by-others or malformed one is an
/// error, like a device key).
fn enrolment(
    cfg: &Config,
    key: &KeyPair,
    applied_any: bool,
    policy: EnrollPolicy,
) -> Result<(Enroller, Option<BootstrapToken>), DaemonError> {
    let enrolled = applied_any || Marker::holds_for(&cfg.state_dir, &key.public_key());
    let Some(path) = &cfg.enroll_token_file else {
        return Ok((Enroller::new(policy, true), None));
    };
    if enrolled {
        tracing::info!(
            token_file = %path.display(),
            "already enrolled; the bootstrap token is not used"
        );
        return Ok((Enroller::new(policy, true), None));
    }
    match enroll::read_token(path) {
        Ok(token) => {
            tracing::info!(
                token_file = %path.display(),
                max_requests = policy.max_attempts,
                "not enrolled yet: will enrol with the bootstrap token"
            );
            Ok((Enroller::new(policy, false), Some(token)))
        }
        Err(enroll::EnrollTokenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            tracing::warn!(
                token_file = %path.display(),
                "enroll_token_file does not exist; not enrolling with a token"
            );
            Ok((Enroller::new(policy, true), None))
        }
        Err(e) => Err(e.into()),
    }
}

/// The request sequence ceiling in the state directory (see
/// [`requests::SeqReservation`]).
pub const SEQ_FILE: &str = "request_seq.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SeqFile {
    reserved_through: u64,
}

/// Reads the request sequence ceiling; `None` on a first start.
fn load_seq_ceiling(path: &Path) -> Result<Option<u64>, DaemonError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<SeqFile>(&bytes)
            .map(|f| Some(f.reserved_through))
            .map_err(|e| DaemonError::StateCorrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DaemonError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Opens the request socket; a failure is logged and leaves the agent
/// without one (its main work, QoS reports and shards, goes on).
fn open_api(cfg: &Config) -> Option<LocalApi> {
    let r = &cfg.requests;
    match LocalApi::open(&r.socket, r.max_connections) {
        Ok(api) => {
            tracing::info!(
                socket = %r.socket.display(),
                apps = r.apps.len(),
                max_per_second = r.policy.max_per_second,
                burst = r.policy.burst,
                "request socket open"
            );
            if r.apps.is_empty() {
                tracing::warn!("no [[apps]] declared: every request on the socket is refused");
            }
            Some(api)
        }
        Err(e) => {
            tracing::error!(error = %e, "explicit requests are unavailable");
            None
        }
    }
}

/// The next event of the request socket; pends forever without one.
async fn api_event(api: &mut Option<LocalApi>) -> Option<ApiEvent> {
    match api {
        Some(a) => a.events.recv().await,
        None => std::future::pending().await,
    }
}

/// How often shard hosts are polled (exits, hangs, restarts due).
const SHARD_POLL: Duration = Duration::from_millis(200);

fn window_interval(ms: u32) -> tokio::time::Interval {
    // Tick several times per window so the source closes it close to on
    // time, and at least every 25 ms so a new need is reported within that
    // of being seen (a lock and two comparisons per tick).
    let mut i = tokio::time::interval(Duration::from_millis(u64::from((ms / 4).clamp(2, 25))));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Logs what became of an assignment object: accepted and renewed at info,
/// refusals at warn for the 1st, 2nd, 4th … of a reason (anyone able to
/// publish on the topic could fill the journal; status.json counts all).
fn log_verdict(
    r: &RouteCore,
    verdict: &shardline_shared::assign::AssignmentVerdict,
    retained: bool,
) {
    use shardline_shared::assign::AssignmentVerdict as V;
    let held = r.state().current.as_ref().map(|h| &h.assignment);
    match verdict {
        V::Accepted { version, previous } => tracing::info!(
            group = %r.group(),
            version,
            previous,
            server = held.map(|a| a.server.as_str()),
            endpoints = ?held.map(|a| &a.endpoints),
            expires_at_ms = held.map(|a| a.expires_at_ms),
            "assignment accepted"
        ),
        V::Renewed {
            version,
            expires_at_ms,
        } => tracing::info!(group = %r.group(), version, expires_at_ms, "assignment renewed"),
        V::Duplicate { version } => {
            tracing::debug!(group = %r.group(), version, retained, "assignment unchanged")
        }
        V::Refused(reason) => {
            let name = super::assignment::refusal_name(reason);
            let n = r.counters().refused.get(name).copied().unwrap_or(0);
            if n.is_power_of_two() {
                tracing::warn!(group = %r.group(), reason = name, detail = ?reason, refused = n, retained, "assignment refused");
            } else {
                tracing::debug!(group = %r.group(), reason = name, detail = ?reason, refused = n, retained, "assignment refused");
            }
        }
    }
}

/// The `assignment` part of status.json.
fn route_status(r: &RouteCore, now: u64) -> serde_json::Value {
    use shardline_shared::assign::EndpointSource;
    let held = r.state().current.as_ref().map(|h| &h.assignment);
    let source = match r.source() {
        EndpointSource::Assigned { .. } => "assigned",
        EndpointSource::BootstrapNone => "bootstrap",
        EndpointSource::BootstrapExpired { .. } => "expired",
    };
    serde_json::json!({
        "group": r.group().as_str(),
        "source": source,
        "routed": r.routed(now),
        "endpoint": r.endpoint(),
        "version": held.map(|a| a.version),
        "server": held.map(|a| a.server.as_str()),
        "region": held.map(|a| a.region.as_str()),
        "endpoints": held.map(|a| &a.endpoints),
        "expires_at_ms": held.map(|a| a.expires_at_ms),
        "counters": r.counters(),
    })
}

/// Closes a link cleanly: DISCONNECT, then up to 500 ms for it to reach the
/// wire, then the driver stops. What was still queued in the old client may
/// go out first; the outbox sends it again on the new link (at least once).
async fn leave(mut old: Link) {
    let _ = old.client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(ev) = old.events.recv().await {
            if matches!(
                ev,
                LinkEvent::Mqtt(Event::Outgoing(rumqttc::Outgoing::Disconnect))
                    | LinkEvent::Down { .. }
            ) {
                break;
            }
        }
    })
    .await;
    old.driver.abort();
}
