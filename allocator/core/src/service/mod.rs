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

pub mod conflate;
pub mod counters;
pub mod preverify;

mod coherence;
mod commands;
mod device_config;
mod diagnostics;
mod dispatch;
mod enroll;
pub mod fleet;
mod ingest;
mod lazy;
pub mod live;
mod requests;
mod rollouts;
mod tick;
mod verify;

pub use coherence::SharedState;
pub use commands::{
    CatalogRow, Command, CommandError, DeviceDetail, DeviceRow, OperatorOp, Reply, TierRow,
    TokenCreated,
};
pub use device_config::{
    ConfigChange, DeviceConfigShown, SealRng, ShardConfigShown, VpnPair, MAX_CONFIG_KEYS,
    MAX_CONFIG_VALUE, MAX_SECRET_BYTES,
};
pub use diagnostics::{DiagnosticsView, StoredDiagnostics};
pub use rollouts::{ReloadAnswer, RolloutsView};
pub use verify::{
    finish_device_message, finish_signed, prepare_device_message, prepare_signed,
    prepare_signed_with, verify_batch, verify_signed, KeyDirectory, Prepared, Refused, ToVerify,
    Verified, VerifiedMsg, VerifierOutput,
};

use self::counters::{Drop, Kind, Metrics};
use self::enroll::token_hash;
use self::lazy::LazyQueue;
use crate::history::{HistoryEntry, HistoryEvent, InstructionStatus, QosAccumulator};
use crate::policy::{self, Action, ComplianceKind, DeviceView, Engine, Event};
use crate::records::{Batch, DeviceRecord, Meta, PendingInstruction, ReportSeq, TokenRecord};
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
    /// What was accepted or sent, for the live event stream (after commit).
    pub live: Vec<live::LiveNote>,
}

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub meta: Meta,
    pub records: Vec<DeviceRecord>,
    pub tokens: Vec<(String, TokenRecord)>,
    /// What is kept of unenrolled devices (see [`policy::Tombstone`]).
    pub tombstones: Vec<policy::Tombstone>,
    /// The engine's persisted catalog health (`postcard`), if any.
    pub catalog_health: Option<Vec<u8>>,
    /// The engine's persisted staged rollouts (`postcard`), if any.
    pub rollouts: Option<Vec<u8>>,
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
    /// Reports are summarised into the history per window this long (0:
    /// no QoS history).
    pub qos_history_window_ms: u64,
}

/// The core state. See the module docs for its invariants.
#[derive(Debug)]
pub struct Core {
    engine: Engine,
    key: KeyPair,
    meta: Meta,
    records: HashMap<DeviceId, DeviceRecord>,
    /// When each device last sent a report it signed, and that report's
    /// window: presence comes from these (an unsigned status never sets it).
    signed_seen: HashMap<DeviceId, (u64, u64)>,
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
    /// Enrolled public key ⇒ its device (kept by [`Core::publish_key`]).
    key_owners: HashMap<[u8; 32], DeviceId>,
    /// Unenrolled devices, by id: re-enrolment restores from them.
    tombstones: HashMap<DeviceId, policy::Tombstone>,
    step: Step,
    last_checkpoint_ms: u64,
    last_tick_ms: u64,
    /// The fleet-wide gauges and when they were counted (see `tick.rs`).
    fleet_gauges: Option<(u64, tick::FleetGauges)>,
    accepted_at_last_tick: u64,
    /// Whether this instance does the fleet-wide periodic work (engine
    /// ticks, re-sends, checkpoints). Always true with an embedded store;
    /// with a shared store exactly one live instance leads.
    leader: bool,
    /// Randomness for sealing secrets to devices (from the runner).
    seal_rng: Option<SealRng>,
    /// Answers sent while an operator command runs (its reply).
    answers_seen: Option<Vec<shardline_shared::request::RequestAnswer>>,
    /// Each device's open QoS history window.
    qos_windows: HashMap<DeviceId, QosAccumulator>,
    /// The latest diagnostics answer per device (issue 20).
    diagnostics: HashMap<DeviceId, StoredDiagnostics>,
    /// Instruction numbers of diagnostics asks not answered yet, per device.
    diag_asked: HashMap<DeviceId, Vec<u64>>,
}

fn hex_key_id(public: &[u8; 32]) -> String {
    KeyId::of_public_key(public).to_string()
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
            tombstones,
            catalog_health,
            rollouts,
        } = loaded;
        if let Some(bytes) = rollouts {
            match postcard::from_bytes::<policy::Rollouts>(&bytes) {
                Ok(r) => engine.restore_rollouts(r),
                // Without them the fleet runs the catalog's entries.
                Err(e) => {
                    tracing::warn!(error = %e, "stored rollouts unreadable; every device gets the catalog's entries")
                }
            }
        }
        if let Some(bytes) = catalog_health {
            match postcard::from_bytes::<policy::CatalogHealth>(&bytes) {
                Ok(h) => engine.restore_catalog_health(h),
                // Marks are advice to the planner: losing them re-learns them.
                Err(e) => {
                    tracing::warn!(error = %e, "stored catalog health unreadable; starting without failing marks")
                }
            }
        }
        let mut map = HashMap::with_capacity(records.len());
        let mut fresh = Vec::new();
        for mut rec in records {
            rec.resume_after_restart();
            match policy::decode_device_state(&rec.engine_state) {
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
            signed_seen: HashMap::new(),
            tokens: tokens.into_iter().collect(),
            cfg,
            metrics,
            dirty: BTreeSet::new(),
            lazy: LazyQueue::default(),
            lazy_credit: 0.0,
            seq_dirty: BTreeSet::new(),
            last_lazy_ms: now_ms,
            keydir: KeyDirectory::default(),
            key_owners: HashMap::new(),
            tombstones: tombstones
                .into_iter()
                .map(|t| (t.device.clone(), t))
                .collect(),
            step: Step::default(),
            last_checkpoint_ms: now_ms,
            last_tick_ms: now_ms,
            fleet_gauges: None,
            accepted_at_last_tick: 0,
            leader: true,
            seal_rng: None,
            answers_seen: None,
            qos_windows: HashMap::new(),
            diagnostics: HashMap::new(),
            diag_asked: HashMap::new(),
        };
        for rec in core.records.values() {
            core.engine
                .restore_device_config(rec.device.clone(), rec.config_view());
        }
        let keys: Vec<(DeviceId, [u8; 32])> = core
            .records
            .values()
            .map(|r| (r.device.clone(), r.public_key))
            .collect();
        for (device, key) in keys {
            core.publish_key(&device, Some(key));
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
        // reputation decay) is written lazily, within `engine_flush_ms`;
        // the decisions made meanwhile go to the history now.
        let engine_dirty = self.engine.take_dirty();
        // Both sides of a payment or a transfer of units now, whatever
        // else is lazy.
        for device in self.engine.take_durable_now() {
            self.dirty.insert(device);
        }
        // Taken out and put back rather than cloned: it is every device
        // changed since the last step.
        let dirty = std::mem::take(&mut self.dirty);
        self.take_decisions(engine_dirty.iter().chain(dirty.iter()));
        self.dirty = dirty;
        for device in engine_dirty {
            if !self.dirty.contains(&device) {
                self.lazy.insert(device, self.last_lazy_ms);
            }
        }
        let mut step = std::mem::take(&mut self.step);
        if self.engine.take_health_dirty() {
            step.batch.catalog_health =
                Some(postcard::to_stdvec(self.engine.catalog_health()).unwrap_or_default());
        }
        if self.engine.take_rollouts_dirty() {
            step.batch.rollouts =
                Some(postcard::to_stdvec(self.engine.rollouts()).unwrap_or_default());
        }
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
                    // Into the record's previous buffer: about the same
                    // size each time, so it is not grown byte by byte again.
                    let mut buf = std::mem::take(&mut rec.engine_state);
                    buf.clear();
                    rec.engine_state = postcard::to_extend(state, buf).unwrap_or_default();
                }
                rec.version += 1;
                step.batch.put_devices.push(rec.clone());
            }
        }
        step
    }

    // ------------------------------------------------------------ history

    /// Appends to a device's history in the step being built.
    pub(super) fn history(&mut self, device: &DeviceId, at_ms: u64, event: HistoryEvent) {
        self.step.batch.history.push(HistoryEntry {
            device: device.clone(),
            at_ms,
            event,
        });
    }

    pub(super) fn instruction_history(
        &mut self,
        device: &DeviceId,
        at_ms: u64,
        seq: u64,
        status: InstructionStatus,
        reason: Option<String>,
    ) {
        let event = HistoryEvent::Instruction {
            seq,
            ops: Vec::new(),
            status,
            reason,
        };
        self.history(device, at_ms, event);
    }

    /// Moves the engine's fresh decisions on these devices to the history.
    fn take_decisions<'a>(&mut self, devices: impl Iterator<Item = &'a DeviceId>) {
        for device in devices {
            for d in self.engine.take_fresh_decisions(device) {
                let event = HistoryEvent::Decision {
                    decision: d.kind.as_str().to_owned(),
                    capability: d.subject,
                    reason: d.explanation,
                };
                self.step.batch.history.push(HistoryEntry {
                    device: device.clone(),
                    at_ms: d.at_ms,
                    event,
                });
            }
        }
    }

    /// Adds an accepted report to the device's QoS window; a window the
    /// report closes goes to the history.
    pub(super) fn qos_history(&mut self, now_ms: u64, report: &QosReport) {
        let window_ms = self.cfg.qos_history_window_ms;
        if window_ms == 0 {
            return;
        }
        // Looked up before inserting: cloning the id for `entry` on every
        // report would allocate for a device that is nearly always there.
        if !self.qos_windows.contains_key(&report.device) {
            self.qos_windows
                .insert(report.device.clone(), QosAccumulator::default());
        }
        let Some(acc) = self.qos_windows.get_mut(&report.device) else {
            return;
        };
        let closed = acc.add(window_ms, now_ms, &report.classes);
        for w in closed {
            let at_ms = w.window_start_ms;
            self.history(&report.device, at_ms, HistoryEvent::Qos(w));
        }
    }

    // ------------------------------------------------------------ inbound

    /// The enrolled public keys, shared read-only with verifier threads.
    pub fn key_directory(&self) -> KeyDirectory {
        self.keydir.clone()
    }

    /// Makes `key` the device's verifying key (`None`: it has none), for
    /// the verifier threads and for [`Core::key_owner`].
    pub(super) fn publish_key(&mut self, device: &DeviceId, key: Option<[u8; 32]>) {
        // The directory holds the key published before (only this writes
        // it): that key's owner entry goes with it.
        let replaced = self.keydir.write().ok().and_then(|mut dir| match key {
            Some(k) => dir.insert(device.clone(), sign::CheckKey::new(k)),
            None => dir.remove(device),
        });
        if let Some(old) = replaced
            .map(|c| *c.public())
            .filter(|old| Some(*old) != key)
        {
            if self.key_owners.get(&old) == Some(device) {
                self.key_owners.remove(&old);
            }
        }
        if let Some(k) = key {
            self.key_owners.insert(k, device.clone());
        }
    }

    /// The enrolled device holding `key`, if any: one lookup where every
    /// enrolment used to scan the fleet (30,000 enrolments took about a
    /// second of the core thread). Checked against the record, so an
    /// entry left behind by a path that dropped a record unseen is no
    /// owner.
    pub(super) fn key_owner(&self, key: &[u8; 32]) -> Option<&DeviceId> {
        self.key_owners
            .get(key)
            .filter(|d| self.records.get(*d).is_some_and(|r| &r.public_key == key))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_config;
#[cfg(test)]
mod tests_fleet;
#[cfg(test)]
mod tests_history;
#[cfg(test)]
mod tests_lending;
