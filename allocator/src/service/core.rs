//! The service core: ingest, verification, dedupe, dispatch and resend around
//! the policy engine. Single-threaded and free of I/O: the runner feeds it
//! inbound MQTT messages, ticks and operator commands with `now`, then takes
//! a [`Step`] (a store [`Batch`] and the publishes it allows) and carries it
//! out: commit first, publish after.
//!
//! Invariants kept here:
//! - A report or ack is used only if its signature verifies under the key the
//!   device was enrolled with and it names the device of its topic; anything
//!   else is counted and dropped, and for an enrolled device a bad signature is
//!   a compliance event.
//! - A report sequence at or below the last accepted one is dropped.
//! - Every instruction gets a fresh per-device sequence number from the
//!   device record (reserved ahead in blocks); the record is in the same batch
//!   as the publish, which the runner commits before publishing.
//! - An instruction stays pending until the device (signed) reports it applied
//!   or rejected it, or it expires; pending ones are re-sent on reconnect and
//!   after `resend_after_ms`. A rejected or failed one is dropped and never
//!   holds back those after it.

use super::metrics::{Drop, Kind, Metrics};
use super::store::{Batch, DeviceRecord, Meta, PendingInstruction, ReportSeq, TokenRecord};
use crate::policy::{self, Action, ComplianceKind, DeviceView, Engine, Event};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use shardline_shared::codec;
use shardline_shared::ids::{DeviceId, KeyId};
use shardline_shared::msg::MAX_ENROLL_BYTES;
use shardline_shared::msg::{
    AckOutcome, DeviceStatus, Instruction, InstructionAck, KeyRotation, KeySet, Presence,
    QosReport, RejectReason,
};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::topics::{self, TopicKind};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One MQTT publish to make (always QoS 1, never retained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What the runner must do after feeding the core: commit, then publish.
#[derive(Debug, Default)]
pub struct Step {
    pub batch: Batch,
    pub publish: Vec<Publish>,
}

/// Why an operator command failed (mapped to HTTP statuses by the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum CommandError {
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
    #[error("device {0} is already enrolled with another key")]
    KeyConflict(String),
    #[error("{0}")]
    Invalid(String),
    /// Another allocator instance changed the device at the same moment;
    /// nothing was written and the command can be repeated.
    #[error("device {0} was changed by another allocator instance at the same time; nothing was written, repeat the command")]
    Concurrent(String),
}

/// An operator action on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorOp {
    Pin,
    Unpin,
    Revoke,
    Unrevoke,
    Drain,
    Resume,
}

/// A row of `GET /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRow {
    pub device: String,
    pub tier: String,
    pub tenant: Option<String>,
    pub reputation: f64,
    pub compute_units: u32,
    pub data_units: u32,
    pub active_shards: usize,
    pub last_report_ms: Option<u64>,
    pub presence: String,
    pub drained: bool,
    pub pending_instructions: usize,
}

/// `GET /v1/devices/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: String,
    pub public_key: String,
    pub key_id: String,
    pub tier: String,
    pub enrolled_at_ms: u64,
    pub presence: String,
    pub last_report_seq: u64,
    pub last_report_ms: Option<u64>,
    pub next_instruction_seq: u64,
    pub applied_instruction_seq: u64,
    pub pending_instructions: Vec<u64>,
    pub instructions_sent: u64,
    pub instructions_applied: u64,
    pub instructions_rejected: u64,
    /// The engine's view: profile (leases), reputation and its history, last QoS.
    pub policy: Option<DeviceView>,
}

/// A tier with its usage, for `GET /v1/tiers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierRow {
    pub tier: policy::Tier,
    pub usage: policy::TierUsage,
}

/// A created bootstrap token (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub tier: String,
    pub expires_at_ms: u64,
    pub uses: u32,
}

/// Operator commands handled by the core.
#[derive(Debug)]
pub enum Command {
    Enroll {
        device: DeviceId,
        public_key: [u8; 32],
        tier: String,
        tenant: Option<String>,
    },
    Unenroll {
        device: DeviceId,
    },
    CreateToken {
        tier: String,
        tenant: Option<String>,
        ttl_ms: u64,
        uses: u32,
        /// 32 random bytes from the runner (the core has no RNG).
        secret: [u8; 32],
    },
    ListDevices,
    Device {
        device: DeviceId,
    },
    Tiers,
    Operator {
        device: DeviceId,
        op: OperatorOp,
        shard: Option<String>,
    },
    Rotate {
        new_key: KeyPair,
        key_file: String,
    },
}

/// The answer to a [`Command`].
#[derive(Debug)]
pub enum Reply {
    Ok,
    Enrolled(DeviceRow),
    Token(TokenCreated),
    Devices(Vec<DeviceRow>),
    Device(Box<DeviceDetail>),
    Tiers(Vec<TierRow>),
    Rotated { epoch: u64, key_id: String },
    Error(CommandError),
}

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub meta: Meta,
    pub records: Vec<DeviceRecord>,
    pub tokens: Vec<(String, TokenRecord)>,
}

/// Tunables the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub max_payload: usize,
    pub resend_after_ms: u64,
    pub checkpoint_ms: u64,
    /// Engine state changed by reports and ticks alone is written this often.
    pub engine_flush_ms: u64,
    /// Other instances write the same store: records are checked and
    /// reloaded by the runner, and the start does not rewrite every record.
    pub shared_store: bool,
}

/// Device public keys by id, written by the core, read by verifier threads.
pub type KeyDirectory = Arc<std::sync::RwLock<HashMap<DeviceId, [u8; 32]>>>;

/// A device message after signature verification, for [`Core::on_verified`].
#[derive(Debug)]
pub enum VerifiedMsg {
    Report(DeviceId, QosReport),
    Ack(DeviceId, InstructionAck),
    /// An enrolled device's message whose signature did not verify.
    BadSignature(DeviceId),
}

impl VerifiedMsg {
    pub fn device(&self) -> &DeviceId {
        match self {
            Self::Report(d, _) | Self::Ack(d, _) | Self::BadSignature(d) => d,
        }
    }
}

impl Command {
    /// The device a command reads or changes, if it names one.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Self::Enroll { device, .. }
            | Self::Unenroll { device }
            | Self::Device { device }
            | Self::Operator { device, .. } => Some(device),
            _ => None,
        }
    }
}

/// The result of [`verify_signed`].
#[derive(Debug)]
pub enum Verified<T> {
    Ok(T),
    /// Counted; for an enrolled device this is a compliance event.
    BadSignature,
    /// Counted (oversize, garbage, unknown device) and dropped.
    Dropped,
}

/// Why a device-signed message was refused before its signature math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Counted; for an enrolled device this is a compliance event.
    BadSignature,
    /// Counted (oversize, garbage, unknown device) and dropped.
    Dropped,
}

/// A device-signed message that passed every check but the signature
/// itself, which is checked separately (in a batch when the runner has
/// several): see [`sign::verify_checks`].
#[derive(Debug)]
pub struct Prepared {
    payload: Vec<u8>,
}

/// Checks size, envelope, domain and signer of a device-signed message
/// against the device's enrolled key (`public`), counting every refusal.
pub fn prepare_signed(
    metrics: &Metrics,
    max_payload: usize,
    kind: Kind,
    domain: Domain,
    device: &DeviceId,
    public: Option<[u8; 32]>,
    payload: &[u8],
) -> Result<(Prepared, sign::SignatureCheck), Refused> {
    if payload.len() > max_payload {
        metrics.dropped(kind, Drop::Oversize);
        return Err(Refused::Dropped);
    }
    let Some(public) = public else {
        metrics.dropped(kind, Drop::UnknownDevice);
        return Err(Refused::Dropped);
    };
    let envelope = match sign::parse_envelope(payload, max_payload) {
        Ok(e) => e,
        Err(_) => {
            metrics.dropped(kind, Drop::Garbage);
            return Err(Refused::Dropped);
        }
    };
    match sign::signature_check(&envelope, domain, KeyId::of_public_key(&public), &public) {
        Ok(check) => Ok((
            Prepared {
                payload: envelope.payload,
            },
            check,
        )),
        Err(e) => {
            tracing::debug!(%device, error = %e, "signature refused");
            metrics.dropped(kind, Drop::BadSignature);
            Err(Refused::BadSignature)
        }
    }
}

/// Completes a prepared message once its signature was checked
/// (`signature_ok`): decodes the payload, counting every refusal.
pub fn finish_signed<T: serde::de::DeserializeOwned>(
    metrics: &Metrics,
    kind: Kind,
    device: &DeviceId,
    prepared: Prepared,
    signature_ok: bool,
) -> Verified<T> {
    if !signature_ok {
        tracing::debug!(%device, "signature does not verify");
        metrics.dropped(kind, Drop::BadSignature);
        return Verified::BadSignature;
    }
    match codec::decode(&prepared.payload) {
        Ok(obj) => Verified::Ok(obj),
        Err(_) => {
            // Signed by the device but not decodable: garbage, not forgery.
            metrics.dropped(kind, Drop::Garbage);
            Verified::Dropped
        }
    }
}

/// [`prepare_signed`] for a device's report or ack (by its topic kind).
pub fn prepare_device_message(
    metrics: &Metrics,
    max_payload: usize,
    kind: TopicKind,
    device: &DeviceId,
    public: Option<[u8; 32]>,
    payload: &[u8],
) -> Result<(Prepared, sign::SignatureCheck), Refused> {
    let (metric, domain) = if kind == TopicKind::Report {
        Metrics::inc(&metrics.reports_received);
        (Kind::Report, Domain::Report)
    } else {
        (Kind::Ack, Domain::Ack)
    };
    prepare_signed(
        metrics,
        max_payload,
        metric,
        domain,
        device,
        public,
        payload,
    )
}

/// [`finish_signed`] for a device's report or ack: what the core gets, if
/// anything.
pub fn finish_device_message(
    metrics: &Metrics,
    kind: TopicKind,
    device: DeviceId,
    prepared: Prepared,
    signature_ok: bool,
) -> Option<VerifiedMsg> {
    Some(if kind == TopicKind::Report {
        match finish_signed(metrics, Kind::Report, &device, prepared, signature_ok) {
            Verified::Ok(r) => VerifiedMsg::Report(device, r),
            Verified::BadSignature => VerifiedMsg::BadSignature(device),
            Verified::Dropped => return None,
        }
    } else {
        match finish_signed(metrics, Kind::Ack, &device, prepared, signature_ok) {
            Verified::Ok(a) => VerifiedMsg::Ack(device, a),
            Verified::BadSignature => VerifiedMsg::BadSignature(device),
            Verified::Dropped => return None,
        }
    })
}

/// [`prepare_signed`], the signature check alone, then [`finish_signed`]:
/// one message. Pure CPU work, so the runner spreads it over threads (per
/// device in order) and batches the signature checks.
pub fn verify_signed<T: serde::de::DeserializeOwned>(
    metrics: &Metrics,
    max_payload: usize,
    kind: Kind,
    domain: Domain,
    device: &DeviceId,
    public: Option<[u8; 32]>,
    payload: &[u8],
) -> Verified<T> {
    match prepare_signed(metrics, max_payload, kind, domain, device, public, payload) {
        Ok((prepared, check)) => {
            let ok = sign::verify_checks(std::slice::from_ref(&check))[0].is_ok();
            finish_signed(metrics, kind, device, prepared, ok)
        }
        Err(Refused::BadSignature) => Verified::BadSignature,
        Err(Refused::Dropped) => Verified::Dropped,
    }
}

/// The core state. See the module docs for its invariants.
#[derive(Debug)]
pub struct Core {
    engine: Engine,
    key: KeyPair,
    meta: Meta,
    records: HashMap<DeviceId, DeviceRecord>,
    presence: HashMap<DeviceId, Presence>,
    tokens: HashMap<String, TokenRecord>,
    cfg: CoreConfig,
    metrics: Arc<Metrics>,
    dirty: BTreeSet<DeviceId>,
    /// Engine state changed without an action: written within `engine_flush_ms`,
    /// a few records per step (see [`Core::pace_lazy_writes`]).
    lazy: LazyQueue,
    /// Fractional records owed to the store by the lazy pacing.
    lazy_credit: f64,
    /// Only the report sequence floor changed.
    seq_dirty: BTreeSet<DeviceId>,
    last_lazy_ms: u64,
    keydir: KeyDirectory,
    step: Step,
    last_checkpoint_ms: u64,
    last_tick_ms: u64,
    accepted_at_last_tick: u64,
    /// Whether this instance does the fleet-wide periodic work (engine
    /// ticks, re-sends, checkpoints). Always true with an embedded store;
    /// with a shared store exactly one live instance leads.
    leader: bool,
}

fn hex_key_id(public: &[u8; 32]) -> String {
    KeyId::of_public_key(public).to_string()
}

fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn presence_str(p: Option<&Presence>) -> String {
    match p {
        Some(Presence::Online) => "online",
        Some(Presence::Offline) => "offline",
        None => "unknown",
    }
    .into()
}

/// Devices whose records are owed a lazy write, oldest first, each with
/// the time it was queued. A device is queued once; removing it (its record
/// was written or reloaded) leaves a stale entry that `pop_front` skips.
#[derive(Debug, Default)]
struct LazyQueue {
    members: std::collections::HashSet<DeviceId>,
    order: std::collections::VecDeque<(DeviceId, u64)>,
}

impl LazyQueue {
    fn insert(&mut self, device: DeviceId, at_ms: u64) {
        if self.members.insert(device.clone()) {
            self.order.push_back((device, at_ms));
        }
        // Stale entries are bounded by the writes since the queue last
        // drained; compact if churn ever lets them pile up.
        if self.order.len() > 4 * self.members.len() + 1024 {
            let mut seen = std::collections::HashSet::new();
            let members = &self.members;
            self.order
                .retain(|(d, _)| members.contains(d) && seen.insert(d.clone()));
        }
    }

    fn remove(&mut self, device: &DeviceId) {
        self.members.remove(device);
    }

    fn pop_front(&mut self) -> Option<DeviceId> {
        while let Some((device, _)) = self.order.pop_front() {
            if self.members.remove(&device) {
                return Some(device);
            }
        }
        None
    }

    /// When the oldest live entry was queued.
    fn oldest_ms(&mut self) -> Option<u64> {
        while let Some((device, at)) = self.order.front() {
            if self.members.contains(device) {
                return Some(*at);
            }
            self.order.pop_front();
        }
        None
    }

    fn len(&self) -> usize {
        self.members.len()
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Core {
    /// Builds the core from what the store holds. Records are resumed above
    /// their reserved sequence blocks; engine state is restored or, when
    /// missing or unreadable, the device is enrolled afresh in the engine.
    pub fn new(
        mut engine: Engine,
        key: KeyPair,
        loaded: Loaded,
        cfg: CoreConfig,
        metrics: Arc<Metrics>,
        now_ms: u64,
    ) -> Self {
        let Loaded {
            meta,
            records,
            tokens,
        } = loaded;
        let mut map = HashMap::with_capacity(records.len());
        let mut fresh = Vec::new();
        for mut rec in records {
            rec.resume_after_restart();
            match postcard::from_bytes::<policy::DeviceState>(&rec.engine_state) {
                Ok(state) if !rec.engine_state.is_empty() => {
                    engine.restore_device(rec.device.clone(), state)
                }
                _ => fresh.push(rec.device.clone()),
            }
            map.insert(rec.device.clone(), rec);
        }
        let mut core = Self {
            engine,
            key,
            meta,
            records: map,
            presence: HashMap::new(),
            tokens: tokens.into_iter().collect(),
            cfg,
            metrics,
            dirty: BTreeSet::new(),
            lazy: LazyQueue::default(),
            lazy_credit: 0.0,
            seq_dirty: BTreeSet::new(),
            last_lazy_ms: now_ms,
            keydir: KeyDirectory::default(),
            step: Step::default(),
            last_checkpoint_ms: now_ms,
            last_tick_ms: now_ms,
            accepted_at_last_tick: 0,
            leader: true,
        };
        for rec in core.records.values() {
            core.publish_key(&rec.device, Some(rec.public_key));
        }
        for device in fresh {
            let (tier, tenant) = {
                let r = &core.records[&device];
                (r.tier.clone(), r.tenant.clone())
            };
            core.feed(
                now_ms,
                Event::Enrolled {
                    device,
                    tier,
                    tenant,
                },
            );
        }
        // Every record is written once at start: the resumed sequence
        // numbering must be on disk before any instruction leaves. Not so
        // with a shared store, where other instances are writing these
        // records now: there every instruction's record (with its raised
        // reservation) is committed before the instruction leaves anyway.
        if !core.cfg.shared_store {
            core.dirty.extend(core.records.keys().cloned());
        }
        core
    }

    // ------------------------------------------------- shared-store upkeep

    /// The write version of the copy held here (see [`DeviceRecord::version`]).
    pub fn version_of(&self, device: &DeviceId) -> Option<u64> {
        self.records.get(device).map(|r| r.version)
    }

    /// Every device held here with its version.
    pub fn versions(&self) -> Vec<(DeviceId, u64)> {
        self.records
            .iter()
            .map(|(d, r)| (d.clone(), r.version))
            .collect()
    }

    pub fn set_leader(&mut self, leader: bool) {
        if leader != self.leader {
            tracing::info!(
                leader,
                "fleet-wide periodic work {}",
                if leader {
                    "taken over"
                } else {
                    "left to another instance"
                }
            );
        }
        self.leader = leader;
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Replaces the copies of these devices with what another instance
    /// committed. Whatever this instance changed in them and has not
    /// committed is dropped: its commit would conflict anyway, and nothing
    /// decided from a stale copy may leave the process.
    pub fn install_records(&mut self, now_ms: u64, records: Vec<DeviceRecord>) {
        for rec in records {
            let device = rec.device.clone();
            self.dirty.remove(&device);
            self.lazy.remove(&device);
            self.seq_dirty.remove(&device);
            self.publish_key(&device, Some(rec.public_key));
            let state = (!rec.engine_state.is_empty())
                .then(|| postcard::from_bytes::<policy::DeviceState>(&rec.engine_state).ok())
                .flatten();
            let (tier, tenant) = (rec.tier.clone(), rec.tenant.clone());
            Metrics::inc(&self.metrics.store_reloads);
            self.records.insert(device.clone(), rec);
            match state {
                Some(state) => self.engine.restore_device(device, state),
                None => self.feed(
                    now_ms,
                    Event::Enrolled {
                        device,
                        tier,
                        tenant,
                    },
                ),
            }
        }
    }

    /// Drops devices another instance unenrolled.
    pub fn forget_devices(&mut self, devices: &[DeviceId]) {
        for device in devices {
            if self.records.remove(device).is_some() {
                self.dirty.remove(device);
                self.lazy.remove(device);
                self.seq_dirty.remove(device);
                self.presence.remove(device);
                self.engine.evict_device(device);
                self.publish_key(device, None);
            }
        }
    }

    /// Takes the bootstrap tokens another instance may have created or used.
    pub fn install_tokens(&mut self, tokens: Vec<(String, TokenRecord)>) {
        self.tokens = tokens.into_iter().collect();
    }

    /// The key epoch this instance signs in.
    pub fn key_epoch(&self) -> u64 {
        self.meta.key_epoch
    }

    /// Follows a key rotation another instance made: sign with the new key.
    pub fn install_rotation(&mut self, meta: Meta, key: KeyPair) {
        tracing::info!(epoch = meta.key_epoch, key_id = %key.id(), "following a key rotation made by another instance");
        self.meta = meta;
        self.key = key;
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn key_id(&self) -> KeyId {
        self.key.id()
    }

    pub fn record(&self, device: &DeviceId) -> Option<&DeviceRecord> {
        self.records.get(device)
    }

    /// Everything to commit and publish since the last call.
    pub fn take_step(&mut self) -> Step {
        // Engine state that changed without any action (forecast updates,
        // reputation decay) is written lazily, within `engine_flush_ms`.
        for device in self.engine.take_dirty() {
            if !self.dirty.contains(&device) {
                self.lazy.insert(device, self.last_lazy_ms);
            }
        }
        let mut step = std::mem::take(&mut self.step);
        for device in std::mem::take(&mut self.seq_dirty) {
            if self.dirty.contains(&device) {
                continue;
            }
            if let Some(rec) = self.records.get_mut(&device) {
                rec.version += 1;
                step.batch.report_seqs.push(ReportSeq {
                    device,
                    seq: rec.last_report_seq,
                    version: rec.version,
                });
            }
        }
        for device in std::mem::take(&mut self.dirty) {
            self.lazy.remove(&device);
            if let Some(rec) = self.records.get_mut(&device) {
                if let Some(state) = self.engine.device_state(&device) {
                    rec.engine_state = postcard::to_stdvec(state).unwrap_or_default();
                }
                rec.version += 1;
                step.batch.put_devices.push(rec.clone());
            }
        }
        step
    }

    // ------------------------------------------------------------ inbound

    /// One MQTT message from the broker.
    pub fn on_message(&mut self, now_ms: u64, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = topics::parse(topic) else {
            self.metrics.dropped(Kind::Report, Drop::UnknownTopic);
            return;
        };
        match kind {
            TopicKind::Report => self.on_report(now_ms, device, payload),
            TopicKind::Ack => self.on_ack(now_ms, device, payload),
            TopicKind::Status => self.on_status(now_ms, device, payload),
            // Our own instructions echoed back (not subscribed; harmless).
            TopicKind::Instr => {}
            TopicKind::Enroll => self.on_enroll_message(now_ms, topic, payload),
        }
    }

    /// A bootstrap-token enrolment request (`shared::sign::open_enroll`):
    /// it must be signed by the key it enrols, name the device of its topic
    /// and carry a live token.
    pub fn on_enroll_message(&mut self, now_ms: u64, topic: &str, payload: &[u8]) {
        let Some(device) = topics::enroll_device(topic) else {
            self.metrics.dropped(Kind::Enroll, Drop::UnknownTopic);
            return;
        };
        if payload.len() > MAX_ENROLL_BYTES.min(self.cfg.max_payload) {
            self.metrics.dropped(Kind::Enroll, Drop::Oversize);
            return;
        }
        let req = match sign::open_enroll(payload) {
            Ok(req) => req,
            Err(e @ (sign::OpenError::Envelope(_) | sign::OpenError::Payload(_))) => {
                tracing::debug!(%device, error = %e, "undecodable enrolment request");
                self.metrics.dropped(Kind::Enroll, Drop::Garbage);
                return;
            }
            Err(e) => {
                // Not signed by the key it names: no proof of possession.
                tracing::warn!(%device, error = %e, "enrolment request without a valid signature refused");
                self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
                return;
            }
        };
        if req.device != device {
            self.metrics.dropped(Kind::Enroll, Drop::WrongDevice);
            return;
        }
        if let Some(rec) = self.records.get(&device) {
            if rec.public_key != req.public_key {
                tracing::warn!(%device, "enrolment request for an enrolled device with another key refused");
                self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
            }
            // Same key: a device repeating its request after a restart.
            return;
        }
        let hash = token_hash(&req.token);
        let Some(tok) = self.tokens.get(&hash).cloned() else {
            self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
            tracing::warn!(%device, "enrolment with an unknown token refused");
            return;
        };
        if tok.expires_at_ms <= now_ms || tok.uses_left == 0 {
            self.tokens.remove(&hash);
            self.step.batch.tokens.push((hash, None));
            self.metrics.dropped(Kind::Enroll, Drop::Stale);
            tracing::warn!(%device, "enrolment with an expired token refused");
            return;
        }
        let mut left = tok.clone();
        left.uses_left -= 1;
        if left.uses_left == 0 {
            self.tokens.remove(&hash);
            self.step.batch.tokens.push((hash, None));
        } else {
            self.tokens.insert(hash.clone(), left.clone());
            self.step.batch.tokens.push((hash, Some(left)));
        }
        match self.enroll(now_ms, device.clone(), req.public_key, tok.tier, tok.tenant) {
            Ok(_) => tracing::info!(%device, "device enrolled itself with a bootstrap token"),
            Err(e) => tracing::warn!(%device, error = %e, "token enrolment failed"),
        }
    }

    /// Opens a device-signed envelope with the device's enrolled key.
    fn verify<T: serde::de::DeserializeOwned>(
        &mut self,
        now_ms: u64,
        kind: Kind,
        domain: Domain,
        device: &DeviceId,
        payload: &[u8],
    ) -> Option<T> {
        let public = self.records.get(device).map(|r| r.public_key);
        match verify_signed(
            &self.metrics,
            self.cfg.max_payload,
            kind,
            domain,
            device,
            public,
            payload,
        ) {
            Verified::Ok(obj) => Some(obj),
            Verified::BadSignature => {
                self.compliance(now_ms, device, ComplianceKind::BadReportSignature);
                None
            }
            Verified::Dropped => None,
        }
    }

    /// A message a verifier thread already checked (see [`verify_signed`]).
    pub fn on_verified(&mut self, now_ms: u64, msg: VerifiedMsg) {
        match msg {
            VerifiedMsg::Report(device, report) => self.apply_report(now_ms, device, report),
            VerifiedMsg::Ack(device, ack) => self.apply_ack(now_ms, device, ack),
            VerifiedMsg::BadSignature(device) => {
                if self.records.contains_key(&device) {
                    self.compliance(now_ms, &device, ComplianceKind::BadReportSignature);
                }
            }
        }
    }

    /// The enrolled public keys, shared read-only with verifier threads.
    pub fn key_directory(&self) -> KeyDirectory {
        self.keydir.clone()
    }

    fn publish_key(&self, device: &DeviceId, key: Option<[u8; 32]>) {
        if let Ok(mut dir) = self.keydir.write() {
            match key {
                Some(k) => dir.insert(device.clone(), k),
                None => dir.remove(device),
            };
        }
    }

    fn compliance(&mut self, now_ms: u64, device: &DeviceId, kind: ComplianceKind) {
        Metrics::inc(&self.metrics.compliance_events);
        self.feed(
            now_ms,
            Event::ComplianceEvent {
                device: device.clone(),
                kind,
            },
        );
    }

    fn on_report(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        Metrics::inc(&self.metrics.reports_received);
        let Some(report) =
            self.verify::<QosReport>(now_ms, Kind::Report, Domain::Report, &device, payload)
        else {
            return;
        };
        self.apply_report(now_ms, device, report);
    }

    fn apply_report(&mut self, now_ms: u64, device: DeviceId, report: QosReport) {
        if report.device != device {
            self.metrics.dropped(Kind::Report, Drop::WrongDevice);
            self.compliance(now_ms, &device, ComplianceKind::BadReportSignature);
            return;
        }
        let Some(rec) = self.records.get_mut(&device) else {
            return;
        };
        if report.seq == rec.last_report_seq {
            // An MQTT redelivery: not the device's fault.
            self.metrics.dropped(Kind::Report, Drop::Duplicate);
            return;
        }
        if report.seq < rec.last_report_seq {
            self.metrics.dropped(Kind::Report, Drop::Stale);
            self.compliance(now_ms, &device, ComplianceKind::ReplayedReport);
            return;
        }
        rec.last_report_seq = report.seq;
        rec.last_report_ms = Some(now_ms);
        self.mark_applied(&device, report.applied_instruction_seq);
        self.seq_dirty.insert(device.clone());
        Metrics::inc(&self.metrics.reports_accepted);
        self.feed(now_ms, Event::Report(report));
    }

    /// The device (signed) says it applied everything up to `seq`.
    fn mark_applied(&mut self, device: &DeviceId, seq: u64) {
        let Some(rec) = self.records.get_mut(device) else {
            return;
        };
        if seq <= rec.applied_seq && rec.pending.iter().all(|p| p.seq > seq) {
            return;
        }
        rec.applied_seq = rec.applied_seq.max(seq);
        let before = rec.pending.len();
        rec.pending.retain(|p| p.seq > seq);
        let done = (before - rec.pending.len()) as u64;
        rec.instructions_applied += done;
        self.metrics
            .instructions_applied
            .fetch_add(done, Ordering::Relaxed);
        self.dirty.insert(device.clone());
    }

    fn on_ack(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        let Some(ack) =
            self.verify::<InstructionAck>(now_ms, Kind::Ack, Domain::Ack, &device, payload)
        else {
            return;
        };
        self.apply_ack(now_ms, device, ack);
    }

    fn apply_ack(&mut self, now_ms: u64, device: DeviceId, ack: InstructionAck) {
        if ack.device != device {
            self.metrics.dropped(Kind::Ack, Drop::WrongDevice);
            return;
        }
        Metrics::inc(&self.metrics.acks_accepted);
        match &ack.outcome {
            AckOutcome::Applied | AckOutcome::Duplicate => {
                self.mark_applied(&device, ack.instruction_seq)
            }
            AckOutcome::Rejected(RejectReason::UnknownKey) if self.meta.key_epoch > 0 => {
                // The device missed the key rotation: send it, then the
                // instruction again (it stays pending).
                self.send_rotation(&device);
                self.resend_pending(now_ms, &device, 0, true);
            }
            AckOutcome::Rejected(_) | AckOutcome::Failed { .. } => {
                if let Some(rec) = self.records.get_mut(&device) {
                    let before = rec.pending.len();
                    rec.pending.retain(|p| p.seq != ack.instruction_seq);
                    if rec.pending.len() != before {
                        rec.instructions_rejected += 1;
                        let c = if matches!(ack.outcome, AckOutcome::Failed { .. }) {
                            &self.metrics.instructions_failed
                        } else {
                            &self.metrics.instructions_rejected
                        };
                        Metrics::inc(c);
                        self.dirty.insert(device.clone());
                    }
                }
                tracing::info!(%device, seq = ack.instruction_seq, outcome = ?ack.outcome, "instruction not applied");
            }
        }
        self.feed(
            now_ms,
            Event::Ack {
                device,
                seq: ack.instruction_seq,
                outcome: ack.outcome,
            },
        );
    }

    fn on_status(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        Metrics::inc(&self.metrics.statuses);
        if payload.is_empty() {
            // A cleared retained message.
            return;
        }
        let status = match codec::decode_capped::<DeviceStatus>(payload, self.cfg.max_payload) {
            Ok(s) if s.device == device => s,
            Ok(_) => {
                self.metrics.dropped(Kind::Status, Drop::WrongDevice);
                return;
            }
            Err(codec::DecodeError::Oversize { .. }) => {
                self.metrics.dropped(Kind::Status, Drop::Oversize);
                return;
            }
            Err(_) => {
                self.metrics.dropped(Kind::Status, Drop::Garbage);
                return;
            }
        };
        if !self.records.contains_key(&device) {
            self.metrics.dropped(Kind::Status, Drop::UnknownDevice);
            return;
        }
        self.presence.insert(device.clone(), status.presence);
        // Every instance sees statuses; only the leader answers them, so a
        // reconnecting device gets its pending instructions once.
        if status.presence == Presence::Online && self.leader {
            // Unsigned, so it only ever triggers sending, never forgets anything.
            let rotation_due = self
                .records
                .get(&device)
                .is_some_and(|r| r.rotation_epoch_sent < self.meta.key_epoch);
            if rotation_due {
                self.send_rotation(&device);
            }
            self.resend_pending(now_ms, &device, status.applied_instruction_seq, true);
        }
    }

    /// Re-publishes pending instructions above `above` (all of them when
    /// `force`, else only those not sent for `resend_after_ms`). Expired ones
    /// are dropped instead.
    fn resend_pending(&mut self, now_ms: u64, device: &DeviceId, above: u64, force: bool) {
        let resend_after = self.cfg.resend_after_ms;
        let Some(rec) = self.records.get_mut(device) else {
            return;
        };
        let before = rec.pending.len();
        rec.pending.retain(|p| p.expires_at_ms > now_ms);
        let expired = (before - rec.pending.len()) as u64;
        let mut changed = expired > 0;
        self.metrics
            .instructions_expired
            .fetch_add(expired, Ordering::Relaxed);
        let topic = topics::instr(device);
        for p in rec.pending.iter_mut() {
            if p.seq <= above {
                continue;
            }
            if force || p.last_sent_ms + resend_after <= now_ms {
                p.last_sent_ms = now_ms;
                p.attempts += 1;
                changed = true;
                Metrics::inc(&self.metrics.instructions_resent);
                self.step.publish.push(Publish {
                    topic: topic.clone(),
                    payload: p.sealed.clone(),
                });
            }
        }
        if changed {
            self.dirty.insert(device.clone());
        }
    }

    fn send_rotation(&mut self, device: &DeviceId) {
        if self.meta.rotation.is_empty() {
            return;
        }
        if let Some(rec) = self.records.get_mut(device) {
            rec.rotation_epoch_sent = self.meta.key_epoch;
            self.dirty.insert(device.clone());
        }
        Metrics::inc(&self.metrics.rotations_sent);
        self.step.publish.push(Publish {
            topic: topics::instr(device),
            payload: self.meta.rotation.clone(),
        });
    }

    /// Periodic work: the engine's tick, re-sends, gauges, checkpoints.
    pub fn on_tick(&mut self, now_ms: u64) {
        if !self.leader {
            self.refresh_gauges(now_ms);
            return;
        }
        // The engine marks every device it ticked as changed (reputation
        // decays continuously); writing the whole fleet every tick would
        // dominate the store. Devices the tick acted on are written now (their
        // records are marked by `feed`); the rest at the next checkpoint.
        self.feed(now_ms, Event::Tick);
        let devices: Vec<DeviceId> = self
            .records
            .iter()
            .filter(|(_, r)| !r.pending.is_empty())
            .map(|(d, _)| d.clone())
            .collect();
        for device in devices {
            if self.presence.get(&device) != Some(&Presence::Offline) {
                self.resend_pending(now_ms, &device, 0, false);
            } else {
                // Still drop the expired ones of offline devices.
                let Some(rec) = self.records.get_mut(&device) else {
                    continue;
                };
                let before = rec.pending.len();
                rec.pending.retain(|p| p.expires_at_ms > now_ms);
                if rec.pending.len() != before {
                    self.metrics
                        .instructions_expired
                        .fetch_add((before - rec.pending.len()) as u64, Ordering::Relaxed);
                    self.dirty.insert(device);
                }
            }
        }
        if now_ms.saturating_sub(self.last_checkpoint_ms) >= self.cfg.checkpoint_ms {
            self.last_checkpoint_ms = now_ms;
            // Paced like any lazy write: a whole-fleet commit would stall
            // every report behind it.
            // Queued as if spread over the last period, so they fall due
            // one by one rather than all at the same moment.
            let all: Vec<DeviceId> = self.records.keys().cloned().collect();
            let (n, period) = (all.len().max(1) as u64, self.cfg.engine_flush_ms);
            for (i, device) in all.into_iter().enumerate() {
                if !self.dirty.contains(&device) {
                    let at = now_ms.saturating_sub(period) + period * i as u64 / n;
                    self.lazy.insert(device, at);
                }
            }
        }
        self.refresh_gauges(now_ms);
    }

    fn refresh_gauges(&mut self, now_ms: u64) {
        let accepted = self.metrics.reports_accepted.load(Ordering::Relaxed);
        let dt = now_ms.saturating_sub(self.last_tick_ms);
        let rate = if dt > 0 {
            (accepted - self.accepted_at_last_tick.min(accepted)) as f64 * 1000.0 / dt as f64
        } else {
            0.0
        };
        self.last_tick_ms = now_ms;
        self.accepted_at_last_tick = accepted;
        let mut buckets = [0u64; 10];
        for d in self.engine.devices() {
            let b = ((d.reputation / 10.0).floor().max(0.0) as usize).min(9);
            buckets[b] += 1;
        }
        let tiers = self
            .engine
            .units_by_tier()
            .into_iter()
            .map(|(t, u)| {
                (
                    t,
                    u.devices,
                    u.compute_units_used,
                    u.data_units_used,
                    u.compute_units_budget,
                    u.data_units_budget,
                )
            })
            .collect();
        self.metrics.set_gauges(super::metrics::Gauges {
            devices: self.records.len() as u64,
            pending_instructions: self.records.values().map(|r| r.pending.len() as u64).sum(),
            reputation_buckets: buckets,
            tiers,
            reports_per_second: rate,
            key_epoch: self.meta.key_epoch,
        });
    }

    /// Schedules every lazily kept engine state for the next commit (on
    /// shutdown).
    pub fn flush_lazy(&mut self) {
        for device in self.engine.take_dirty() {
            self.lazy.insert(device, self.last_lazy_ms);
        }
        while let Some(device) = self.lazy.pop_front() {
            self.dirty.insert(device);
        }
    }

    /// Moves lazily kept records into the next commit, oldest first, at the
    /// even rate that writes the queue by the time its oldest entry has
    /// waited `engine_flush_ms` (and anything overdue at once). No single commit carries the fleet, so no
    /// report waits behind one. Call before each [`Core::take_step`].
    pub fn pace_lazy_writes(&mut self, now_ms: u64) {
        // Devices the engine marked since are queued by `take_step` (at this
        // time, `last_lazy_ms`).
        let elapsed = now_ms.saturating_sub(self.last_lazy_ms);
        self.last_lazy_ms = now_ms;
        if self.lazy.is_empty() {
            self.lazy_credit = 0.0;
            return;
        }
        let period = self.cfg.engine_flush_ms.max(1);
        // Drain evenly so that the oldest entry (and with it, the whole
        // queue) is written by its deadline.
        let until_due = self
            .lazy
            .oldest_ms()
            .map_or(period, |at| {
                at.saturating_add(period).saturating_sub(now_ms)
            })
            .max(1);
        self.lazy_credit += self.lazy.len() as f64 * (elapsed as f64 / until_due as f64).min(1.0);
        loop {
            let overdue = self
                .lazy
                .oldest_ms()
                .is_some_and(|at| at.saturating_add(period) <= now_ms);
            if !overdue && self.lazy_credit < 1.0 {
                break;
            }
            let Some(device) = self.lazy.pop_front() else {
                break;
            };
            self.dirty.insert(device);
            self.lazy_credit = (self.lazy_credit - 1.0).max(0.0);
        }
    }

    /// Re-sends everything pending (after the MQTT link (re)connected).
    pub fn on_connected(&mut self, now_ms: u64) {
        if !self.leader {
            return;
        }
        let devices: Vec<DeviceId> = self
            .records
            .iter()
            .filter(|(_, r)| !r.pending.is_empty())
            .map(|(d, _)| d.clone())
            .collect();
        for device in devices {
            self.resend_pending(now_ms, &device, 0, true);
        }
    }

    // ------------------------------------------------------------ engine

    /// Feeds the engine and carries out its actions (instructions get their
    /// sequence number here; `Sent` goes back to the engine).
    fn feed(&mut self, now_ms: u64, event: Event) {
        let mut queue: Vec<Action> = self.engine.handle(now_ms, event);
        queue.reverse();
        while let Some(action) = queue.pop() {
            match action {
                Action::Instruct {
                    device,
                    ops,
                    expires_at_ms,
                } => {
                    let Some(seq) = self.instruct(now_ms, &device, ops, expires_at_ms) else {
                        continue;
                    };
                    let mut more = self.engine.handle(now_ms, Event::Sent { device, seq });
                    more.reverse();
                    queue.extend(more);
                }
                Action::ReputationChanged {
                    device,
                    old,
                    new,
                    reason,
                } => {
                    Metrics::inc(&self.metrics.reputation_changes);
                    self.dirty.insert(device.clone());
                    tracing::info!(%device, old, new, %reason, "reputation changed");
                }
                Action::Alert { device, message } => {
                    Metrics::inc(&self.metrics.alerts);
                    tracing::warn!(%device, %message, "policy alert");
                }
            }
        }
    }

    fn instruct(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        ops: Vec<shardline_shared::msg::Operation>,
        expires_at_ms: u64,
    ) -> Option<u64> {
        let Some(rec) = self.records.get_mut(device) else {
            tracing::warn!(%device, "engine instructed a device the service does not know");
            return None;
        };
        let seq = rec.take_seq();
        let instr = Instruction {
            device: device.clone(),
            seq,
            issued_at_ms: now_ms,
            expires_at_ms,
            ops,
        };
        let sealed = sign::seal(Domain::Instruction, &instr, &[&self.key]);
        rec.pending.push(PendingInstruction {
            seq,
            sealed: sealed.clone(),
            issued_at_ms: now_ms,
            expires_at_ms,
            last_sent_ms: now_ms,
            attempts: 1,
        });
        rec.instructions_sent += 1;
        self.dirty.insert(device.clone());
        Metrics::inc(&self.metrics.decisions);
        Metrics::inc(&self.metrics.instructions_sent);
        tracing::debug!(%device, seq, ops = instr.ops.len(), "instruction");
        self.step.publish.push(Publish {
            topic: topics::instr(device),
            payload: sealed,
        });
        Some(seq)
    }

    // ----------------------------------------------------------- commands

    fn enroll(
        &mut self,
        now_ms: u64,
        device: DeviceId,
        public_key: [u8; 32],
        tier: String,
        tenant: Option<String>,
    ) -> Result<DeviceRow, CommandError> {
        if !self.engine.agreements().tiers.contains_key(&tier) {
            return Err(CommandError::UnknownTier(tier));
        }
        if let Some(rec) = self.records.get_mut(&device) {
            if rec.public_key != public_key {
                return Err(CommandError::KeyConflict(device.to_string()));
            }
            // Same key: a tier change.
            rec.tier = tier.clone();
            rec.tenant = tenant.clone();
        } else {
            self.records.insert(
                device.clone(),
                DeviceRecord::new(
                    device.clone(),
                    public_key,
                    tier.clone(),
                    tenant.clone(),
                    now_ms,
                ),
            );
            Metrics::inc(&self.metrics.enrolments);
        }
        self.dirty.insert(device.clone());
        self.publish_key(&device, Some(public_key));
        self.feed(
            now_ms,
            Event::Enrolled {
                device: device.clone(),
                tier,
                tenant,
            },
        );
        tracing::info!(%device, key_id = %hex_key_id(&public_key), "device enrolled");
        self.row(&device)
            .ok_or(CommandError::UnknownDevice(device.to_string()))
    }

    fn row(&self, device: &DeviceId) -> Option<DeviceRow> {
        let rec = self.records.get(device)?;
        let summary = self
            .engine
            .devices()
            .into_iter()
            .find(|d| &d.device == device);
        Some(self.row_from(rec, summary.as_ref()))
    }

    fn row_from(&self, rec: &DeviceRecord, s: Option<&policy::DeviceSummary>) -> DeviceRow {
        DeviceRow {
            device: rec.device.to_string(),
            tier: rec.tier.clone(),
            tenant: rec.tenant.clone(),
            reputation: s.map_or(0.0, |s| s.reputation),
            compute_units: s.map_or(0, |s| s.compute_units),
            data_units: s.map_or(0, |s| s.data_units),
            active_shards: s.map_or(0, |s| s.active_shards),
            last_report_ms: rec.last_report_ms,
            presence: presence_str(self.presence.get(&rec.device)),
            drained: s.is_some_and(|s| s.drained),
            pending_instructions: rec.pending.len(),
        }
    }

    /// Handles one operator command.
    pub fn on_command(&mut self, now_ms: u64, cmd: Command) -> Reply {
        match cmd {
            Command::Enroll {
                device,
                public_key,
                tier,
                tenant,
            } => match self.enroll(now_ms, device, public_key, tier, tenant) {
                Ok(row) => Reply::Enrolled(row),
                Err(e) => Reply::Error(e),
            },
            Command::Unenroll { device } => {
                if self.records.remove(&device).is_none() {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                }
                self.presence.remove(&device);
                self.dirty.remove(&device);
                self.publish_key(&device, None);
                self.feed(
                    now_ms,
                    Event::Unenrolled {
                        device: device.clone(),
                    },
                );
                self.engine.evict_device(&device);
                self.step.batch.delete_devices.push(device);
                Reply::Ok
            }
            Command::CreateToken {
                tier,
                tenant,
                ttl_ms,
                uses,
                secret,
            } => {
                if !self.engine.agreements().tiers.contains_key(&tier) {
                    return Reply::Error(CommandError::UnknownTier(tier));
                }
                if uses == 0 {
                    return Reply::Error(CommandError::Invalid("uses must be at least 1".into()));
                }
                let token = hex::encode(secret);
                let rec = TokenRecord {
                    tier: tier.clone(),
                    tenant,
                    created_ms: now_ms,
                    expires_at_ms: now_ms.saturating_add(ttl_ms),
                    uses_left: uses,
                };
                let hash = token_hash(&token);
                self.tokens.insert(hash.clone(), rec.clone());
                self.step.batch.tokens.push((hash, Some(rec.clone())));
                Reply::Token(TokenCreated {
                    token,
                    tier,
                    expires_at_ms: rec.expires_at_ms,
                    uses,
                })
            }
            Command::ListDevices => {
                let summaries: BTreeMap<DeviceId, policy::DeviceSummary> = self
                    .engine
                    .devices()
                    .into_iter()
                    .map(|s| (s.device.clone(), s))
                    .collect();
                let mut rows: Vec<DeviceRow> = self
                    .records
                    .values()
                    .map(|r| self.row_from(r, summaries.get(&r.device)))
                    .collect();
                rows.sort_by(|a, b| a.device.cmp(&b.device));
                Reply::Devices(rows)
            }
            Command::Device { device } => {
                let Some(rec) = self.records.get(&device) else {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                };
                Reply::Device(Box::new(DeviceDetail {
                    device: device.to_string(),
                    public_key: hex::encode(rec.public_key),
                    key_id: hex_key_id(&rec.public_key),
                    tier: rec.tier.clone(),
                    enrolled_at_ms: rec.enrolled_at_ms,
                    presence: presence_str(self.presence.get(&device)),
                    last_report_seq: rec.last_report_seq,
                    last_report_ms: rec.last_report_ms,
                    next_instruction_seq: rec.next_instruction_seq,
                    applied_instruction_seq: rec.applied_seq,
                    pending_instructions: rec.pending.iter().map(|p| p.seq).collect(),
                    instructions_sent: rec.instructions_sent,
                    instructions_applied: rec.instructions_applied,
                    instructions_rejected: rec.instructions_rejected,
                    policy: self.engine.device(&device),
                }))
            }
            Command::Tiers => {
                let usage = self.engine.units_by_tier();
                Reply::Tiers(
                    self.engine
                        .agreements()
                        .tiers
                        .values()
                        .map(|t| TierRow {
                            tier: t.clone(),
                            usage: usage.get(&t.name).cloned().unwrap_or_default(),
                        })
                        .collect(),
                )
            }
            Command::Operator { device, op, shard } => {
                if !self.records.contains_key(&device) {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                }
                let need_shard = || {
                    shard
                        .clone()
                        .ok_or_else(|| CommandError::Invalid("this operation needs a shard".into()))
                };
                let event = match op {
                    OperatorOp::Drain => Event::Drain { device },
                    OperatorOp::Resume => Event::Resume { device },
                    OperatorOp::Pin
                    | OperatorOp::Unpin
                    | OperatorOp::Revoke
                    | OperatorOp::Unrevoke => {
                        let shard = match need_shard() {
                            Ok(s) => s,
                            Err(e) => return Reply::Error(e),
                        };
                        if self.engine.catalog().shard(&shard).is_none() {
                            return Reply::Error(CommandError::Invalid(format!(
                                "unknown shard {shard:?}"
                            )));
                        }
                        match op {
                            OperatorOp::Pin => Event::Pin { device, shard },
                            OperatorOp::Unpin => Event::Unpin { device, shard },
                            OperatorOp::Revoke => Event::Revoke { device, shard },
                            _ => Event::Unrevoke { device, shard },
                        }
                    }
                };
                self.feed(now_ms, event);
                Reply::Ok
            }
            Command::Rotate { new_key, key_file } => self.rotate(now_ms, new_key, key_file),
        }
    }

    fn rotate(&mut self, now_ms: u64, new_key: KeyPair, key_file: String) -> Reply {
        if new_key.id() == self.key.id() {
            return Reply::Error(CommandError::Invalid(
                "the new key is the key in use".into(),
            ));
        }
        let epoch = self.meta.key_epoch + 1;
        let rotation = KeyRotation {
            new_set: KeySet::of(epoch, &[&new_key]),
            issued_at_ms: now_ms,
        };
        let sealed = sign::seal(Domain::Rotation, &rotation, &[&self.key, &new_key]);
        self.meta = Meta {
            key_epoch: epoch,
            rotation: sealed,
            key_file: Some(key_file),
        };
        self.key = new_key;
        self.step.batch.meta = Some(self.meta.clone());
        let devices: Vec<DeviceId> = self.records.keys().cloned().collect();
        for device in &devices {
            self.send_rotation(device);
            // Pending instructions are re-signed with the new key (same
            // payload, so a device that already applied one sees a duplicate).
            let key = self.key.clone();
            if let Some(rec) = self.records.get_mut(device) {
                for p in rec.pending.iter_mut() {
                    if let Ok(env) = sign::parse_envelope(&p.sealed, usize::MAX) {
                        if let Ok(instr) = codec::decode::<Instruction>(&env.payload) {
                            p.sealed = sign::seal(Domain::Instruction, &instr, &[&key]);
                        }
                    }
                }
            }
            self.resend_pending(now_ms, device, 0, true);
        }
        tracing::info!(epoch, key_id = %self.key.id(), devices = devices.len(), "signing key rotated");
        Reply::Rotated {
            epoch,
            key_id: self.key.id().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Agreements, Catalog, PolicyConfig};
    use shardline_shared::msg::*;

    fn engine() -> Engine {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
        let catalog = Catalog::load(&dir.join("catalog.toml")).unwrap();
        let agreements = Agreements::load(&dir.join("tiers.toml"), &catalog).unwrap();
        Engine::new(catalog, agreements, PolicyConfig::default())
    }

    fn core_with(records: Vec<DeviceRecord>) -> Core {
        Core::new(
            engine(),
            KeyPair::from_seed(&[1; 32]),
            Loaded {
                records,
                ..Loaded::default()
            },
            CoreConfig {
                max_payload: 65536,
                resend_after_ms: 1000,
                checkpoint_ms: 60_000,
                engine_flush_ms: 5_000,
                shared_store: false,
            },
            Arc::new(Metrics::default()),
            1_000_000,
        )
    }

    fn dev_key() -> KeyPair {
        KeyPair::from_seed(&[2; 32])
    }

    fn report(device: &DeviceId, seq: u64) -> QosReport {
        QosReport {
            device: device.clone(),
            seq,
            window_start_ms: 990_000,
            window_ms: 10_000,
            classes: vec![ClassStats {
                class: TrafficClass::Sensitive,
                bytes: 1_000_000,
                packets: 1000,
                rate_bps: 800_000,
                rtt_p50_us: None,
                rtt_p95_us: None,
                jitter_us: None,
                loss_permille: 0,
                active_flows: 2,
                need: QosNeed {
                    latency_sensitive: true,
                    bandwidth_heavy: false,
                    needs_encryption: true,
                },
            }],
            resources: DeviceResources {
                cpu_cores: 4,
                cpu_load_permille: 50,
                mem_total_kib: 4 << 20,
                mem_available_kib: 3 << 20,
                aes_hw: true,
                arch: "x86_64".into(),
            },
            shards: vec![],
            applied_instruction_seq: 0,
            rejections: RejectionCounters::default(),
        }
    }

    fn enrolled() -> (Core, DeviceId) {
        let d = DeviceId::new("d1").unwrap();
        let mut core = core_with(vec![]);
        let r = core.on_command(
            1_000_000,
            Command::Enroll {
                device: d.clone(),
                public_key: dev_key().public_key(),
                tier: "standard".into(),
                tenant: None,
            },
        );
        assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
        core.take_step();
        (core, d)
    }

    fn instr_seq(p: &Publish) -> u64 {
        let env = sign::parse_envelope(&p.payload, 1 << 20).unwrap();
        codec::decode::<Instruction>(&env.payload).unwrap().seq
    }

    #[test]
    fn an_instruction_leaves_only_with_its_reserved_sequence_in_the_same_batch() {
        let (mut core, d) = enrolled();
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        let step = core.take_step();
        assert_eq!(step.publish.len(), 1, "one instruction");
        let seq = instr_seq(&step.publish[0]);
        let rec = step
            .batch
            .put_devices
            .iter()
            .find(|r| r.device == d)
            .expect("the record is in the batch that precedes the publish");
        assert!(rec.seq_reserved_until >= seq);
        assert!(rec.next_instruction_seq > seq);
        assert_eq!(rec.pending.len(), 1);
        assert!(!rec.engine_state.is_empty(), "engine state persisted");
        // The persisted engine state restores.
        let restored = core_with(vec![rec.clone()]);
        assert!(restored.engine().device_state(&d).is_some());
        assert!(restored.record(&d).unwrap().next_instruction_seq > rec.seq_reserved_until);
    }

    #[test]
    fn lazy_engine_state_is_written_a_few_records_per_step_and_each_within_the_flush_period() {
        let mut core = core_with(vec![]);
        let key = dev_key();
        let devices: Vec<DeviceId> = (0..200)
            .map(|i| DeviceId::new(format!("d{i}")).unwrap())
            .collect();
        for d in &devices {
            core.on_command(
                1_000_000,
                Command::Enroll {
                    device: d.clone(),
                    public_key: key.public_key(),
                    tier: "standard".into(),
                    tenant: None,
                },
            );
        }
        // First reports: instructions, written at once with their records.
        for d in &devices {
            let bytes = sign::seal(Domain::Report, &report(d, 1), &[&key]);
            core.on_message(1_000_000, &topics::report(d), &bytes);
        }
        core.pace_lazy_writes(1_000_000);
        assert_eq!(core.take_step().batch.put_devices.len(), 200);
        // Second reports change only engine state (forecasts): lazy.
        for d in &devices {
            let bytes = sign::seal(Domain::Report, &report(d, 2), &[&key]);
            core.on_message(1_000_010, &topics::report(d), &bytes);
        }
        let mut written = std::collections::BTreeSet::new();
        let mut largest = 0;
        let mut now = 1_000_010;
        while now <= 1_000_010 + 5_000 {
            core.pace_lazy_writes(now);
            let puts = core.take_step().batch.put_devices;
            largest = largest.max(puts.len());
            written.extend(puts.into_iter().map(|r| r.device));
            now += 50;
        }
        assert_eq!(
            written.len(),
            200,
            "every lazy record is written within the period"
        );
        assert!(
            largest <= 10,
            "no step carries more than a few lazy records, largest {largest}"
        );
    }

    #[test]
    fn every_write_carries_the_next_version_and_a_reload_drops_uncommitted_changes() {
        let (mut core, d) = enrolled();
        assert_eq!(
            core.version_of(&d),
            Some(1),
            "the enrolment wrote version 1"
        );
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        let step = core.take_step();
        let rec = step
            .batch
            .put_devices
            .iter()
            .find(|r| r.device == d)
            .unwrap();
        assert_eq!(rec.version, 2);
        // Another instance committed version 2 first (say, it handled the
        // same report): the copy here is replaced, and the instruction this
        // instance decided is gone from its memory too.
        let mut theirs = rec.clone();
        theirs.pending.clear();
        theirs.next_instruction_seq = 40;
        core.install_records(1_000_200, vec![theirs]);
        let mine = core.record(&d).unwrap();
        assert_eq!((mine.version, mine.next_instruction_seq), (2, 40));
        assert!(mine.pending.is_empty());
        assert!(core.engine().device_state(&d).is_some());
        assert!(
            core.take_step().batch.is_empty(),
            "nothing stale is written"
        );
        // A report floor write moves the version as well.
        let bytes = sign::seal(Domain::Report, &report(&d, 2), &[&dev_key()]);
        core.on_message(1_000_300, &topics::report(&d), &bytes);
        let step = core.take_step();
        let v = step
            .batch
            .put_devices
            .iter()
            .map(|r| r.version)
            .chain(step.batch.report_seqs.iter().map(|w| w.version))
            .max();
        assert_eq!(v, Some(3));
        // Unenrolled elsewhere: forgotten here, its key withdrawn.
        core.forget_devices(std::slice::from_ref(&d));
        assert!(core.record(&d).is_none());
        assert!(core.key_directory().read().unwrap().get(&d).is_none());
    }

    #[test]
    fn only_the_leader_resends_on_status_and_ticks() {
        let (mut core, d) = enrolled();
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        assert_eq!(core.take_step().publish.len(), 1);
        let online = codec::encode(&DeviceStatus {
            device: d.clone(),
            presence: Presence::Online,
            applied_instruction_seq: 0,
            agent_version: "t".into(),
            at_ms: 1_000_200,
        });
        core.set_leader(false);
        core.on_message(1_000_200, &topics::status(&d), &online);
        core.on_tick(1_100_000);
        core.on_connected(1_100_001);
        assert!(
            core.take_step().publish.is_empty(),
            "a follower leaves re-sends to the leader"
        );
        core.set_leader(true);
        core.on_message(1_100_100, &topics::status(&d), &online);
        assert_eq!(core.take_step().publish.len(), 1, "the leader re-sends");
    }

    #[test]
    fn a_rejected_instruction_is_dropped_and_a_reconnect_resends_the_rest() {
        let (mut core, d) = enrolled();
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        let first = instr_seq(&core.take_step().publish[0]);
        // An operator drain makes a second instruction while the first is pending.
        core.on_command(
            1_000_200,
            Command::Operator {
                device: d.clone(),
                op: OperatorOp::Drain,
                shard: None,
            },
        );
        let step = core.take_step();
        let second = step.publish.iter().map(instr_seq).max().unwrap_or(first);
        // The device rejects the first: it is dropped, the second stays.
        let ack = InstructionAck {
            device: d.clone(),
            instruction_seq: first,
            outcome: AckOutcome::Rejected(RejectReason::Expired),
            at_ms: 1_000_300,
        };
        core.on_message(
            1_000_300,
            &topics::ack(&d),
            &sign::seal(Domain::Ack, &ack, &[&dev_key()]),
        );
        core.take_step();
        let pending: Vec<u64> = core
            .record(&d)
            .unwrap()
            .pending
            .iter()
            .map(|p| p.seq)
            .collect();
        assert!(!pending.contains(&first));
        if second > first {
            assert!(pending.contains(&second), "{pending:?}");
        }
        // The device reconnects having applied nothing: everything pending is re-sent.
        let status = DeviceStatus {
            device: d.clone(),
            presence: Presence::Online,
            applied_instruction_seq: 0,
            agent_version: "t".into(),
            at_ms: 1_000_400,
        };
        core.on_message(1_000_400, &topics::status(&d), &codec::encode(&status));
        let resent: Vec<u64> = core.take_step().publish.iter().map(instr_seq).collect();
        let mut all = core
            .record(&d)
            .unwrap()
            .pending
            .iter()
            .map(|p| p.seq)
            .collect::<Vec<_>>();
        all.sort_unstable();
        let mut resent_sorted = resent.clone();
        resent_sorted.sort_unstable();
        assert_eq!(resent_sorted, all);
        // A signed report saying it applied them clears them.
        let mut r = report(&d, 2);
        r.applied_instruction_seq = all.iter().copied().max().unwrap_or(0);
        core.on_message(
            1_000_500,
            &topics::report(&d),
            &sign::seal(Domain::Report, &r, &[&dev_key()]),
        );
        assert!(core
            .record(&d)
            .unwrap()
            .pending
            .iter()
            .all(|p| p.seq > r.applied_instruction_seq));
    }

    #[test]
    fn unsigned_or_forged_messages_never_clear_pending_instructions() {
        let (mut core, d) = enrolled();
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        let seq = instr_seq(&core.take_step().publish[0]);
        let forged = InstructionAck {
            device: d.clone(),
            instruction_seq: seq,
            outcome: AckOutcome::Applied,
            at_ms: 1_000_200,
        };
        let other = KeyPair::from_seed(&[9; 32]);
        core.on_message(
            1_000_200,
            &topics::ack(&d),
            &sign::seal(Domain::Ack, &forged, &[&other]),
        );
        // A status claiming it applied everything only triggers re-sending.
        let status = DeviceStatus {
            device: d.clone(),
            presence: Presence::Online,
            applied_instruction_seq: seq,
            agent_version: "t".into(),
            at_ms: 1_000_300,
        };
        core.on_message(1_000_300, &topics::status(&d), &codec::encode(&status));
        assert!(core
            .record(&d)
            .unwrap()
            .pending
            .iter()
            .any(|p| p.seq == seq));
        assert_eq!(core.record(&d).unwrap().applied_seq, 0);
        assert_eq!(core.metrics.dropped_count(Kind::Ack, Drop::BadSignature), 1);
    }

    #[test]
    fn expired_pending_instructions_are_dropped_on_tick() {
        let (mut core, d) = enrolled();
        let bytes = sign::seal(Domain::Report, &report(&d, 1), &[&dev_key()]);
        core.on_message(1_000_100, &topics::report(&d), &bytes);
        core.take_step();
        let exp = core.record(&d).unwrap().pending[0].expires_at_ms;
        core.on_tick(exp + 1);
        assert!(core
            .record(&d)
            .unwrap()
            .pending
            .iter()
            .all(|p| p.expires_at_ms > exp + 1));
        assert!(core.metrics.instructions_expired.load(Ordering::Relaxed) >= 1);
    }
}
