//! The allocator's plain records: what it knows about each device, its
//! bootstrap tokens and service metadata, and the [`Batch`] of writes that
//! must reach the store together. The `Store` implementations (redb,
//! PostgreSQL) live in the service crate; these types are what they persist.
//!
//! Every device write is conditional on its version (see
//! [`DeviceRecord::version`]): two allocator instances may both pick
//! instruction number *n* for a device, but only one can commit it, and
//! nothing is published before its commit.

pub use crate::policy::Tombstone;
use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use std::collections::BTreeMap;

/// One shard's per-device configuration: clear `key = value`s (sent in the
/// activation) and secret ones (sealed to the device at the service edge;
/// never logged, never shown: [`Debug`] prints their names only).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceShardConfig {
    pub clear: BTreeMap<String, String>,
    pub secret: BTreeMap<String, String>,
}

impl std::fmt::Debug for DeviceShardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceShardConfig")
            .field("clear", &self.clear)
            .field("secret_keys", &self.secret.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DeviceShardConfig {
    /// The secret lines as the shard reads them, to be sealed.
    pub fn secret_lines(&self) -> Vec<u8> {
        let mut out = String::new();
        for (k, v) in &self.secret {
            out.push_str(k);
            out.push_str(" = ");
            out.push_str(v);
            out.push('\n');
        }
        out.into_bytes()
    }
}

/// How far ahead of use instruction sequence numbers are reserved (persisted).
pub const SEQ_BLOCK: u64 = 64;

/// An instruction signed and sent but not yet known to be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInstruction {
    pub seq: u64,
    /// The sealed envelope exactly as published (re-sent byte for byte).
    pub sealed: Vec<u8>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub last_sent_ms: u64,
    pub attempts: u32,
}

/// Everything about one device, written atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device: DeviceId,
    /// The device's Ed25519 public key (reports and acks are signed with it).
    pub public_key: [u8; 32],
    pub tier: String,
    pub tenant: Option<String>,
    pub enrolled_at_ms: u64,
    /// Highest report sequence accepted; lower or equal ones are dropped.
    pub last_report_seq: u64,
    pub last_report_ms: Option<u64>,
    /// The next instruction sequence number to use.
    pub next_instruction_seq: u64,
    /// Highest sequence number reserved on disk. `next_instruction_seq` never
    /// passes it without a commit raising it first; after a restart numbering
    /// resumes above it, so a number used before a crash is never used again.
    pub seq_reserved_until: u64,
    /// Highest instruction sequence the device (signed) said it applied.
    pub applied_seq: u64,
    pub pending: Vec<PendingInstruction>,
    /// Key-rotation epoch the device was last sent.
    pub rotation_epoch_sent: u64,
    pub instructions_sent: u64,
    pub instructions_applied: u64,
    pub instructions_rejected: u64,
    /// `postcard` of the policy engine's per-device state (profile, leases,
    /// reputation, forecasts), or empty before the engine first saw the device.
    pub engine_state: Vec<u8>,
    /// Shard id ⇒ this device's own configuration of it (set by the
    /// operator). Last field, so a record written before it existed decodes
    /// with an empty map (the stores append the empty map's byte).
    pub shard_config: BTreeMap<String, DeviceShardConfig>,
    /// Write version: how many times this record was committed since it was
    /// created. Kept by the store beside the body (not encoded in it); a
    /// batch carries the version the record will have after the commit.
    #[serde(skip)]
    pub version: u64,
}

impl DeviceRecord {
    pub fn new(
        device: DeviceId,
        public_key: [u8; 32],
        tier: String,
        tenant: Option<String>,
        now_ms: u64,
    ) -> Self {
        Self {
            device,
            public_key,
            tier,
            tenant,
            enrolled_at_ms: now_ms,
            last_report_seq: 0,
            last_report_ms: None,
            next_instruction_seq: 1,
            seq_reserved_until: 0,
            applied_seq: 0,
            pending: Vec::new(),
            rotation_epoch_sent: 0,
            instructions_sent: 0,
            instructions_applied: 0,
            instructions_rejected: 0,
            engine_state: Vec::new(),
            shard_config: BTreeMap::new(),
            version: 0,
        }
    }

    /// Takes the next instruction sequence number, reserving a new block when
    /// the reserved range is used up. The caller must commit the record before
    /// the number leaves the process.
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_instruction_seq;
        if seq > self.seq_reserved_until {
            self.seq_reserved_until = seq + SEQ_BLOCK - 1;
        }
        self.next_instruction_seq = seq + 1;
        seq
    }

    /// What the engine may know of the device's configuration: clear values
    /// and the names of secret keys.
    pub fn config_view(&self) -> crate::policy::DeviceConfigView {
        self.shard_config
            .iter()
            .map(|(shard, c)| {
                (
                    shard.clone(),
                    crate::policy::ShardConfigView {
                        clear: c.clear.clone(),
                        secret_keys: c.secret.keys().cloned().collect(),
                    },
                )
            })
            .collect()
    }

    /// Called on a record loaded from disk: resume numbering above every
    /// number that may have been used before the process stopped.
    pub fn resume_after_restart(&mut self) {
        self.next_instruction_seq = self.next_instruction_seq.max(self.seq_reserved_until + 1);
    }
}

/// A one-time (or few-times) enrolment token, stored by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub tier: String,
    pub tenant: Option<String>,
    pub created_ms: u64,
    pub expires_at_ms: u64,
    pub uses_left: u32,
}

/// Service-wide metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Current key-rotation epoch (0 = the key devices were provisioned with).
    pub key_epoch: u64,
    /// The sealed rotation to this epoch (re-sent to devices that missed it).
    pub rotation: Vec<u8>,
    /// Secret key file in force after a rotation (overrides the config's).
    pub key_file: Option<String>,
}

/// Writes that must happen together.
#[derive(Debug, Default)]
pub struct Batch {
    pub put_devices: Vec<DeviceRecord>,
    pub delete_devices: Vec<DeviceId>,
    /// Token hash (hex) ⇒ record; `None` deletes.
    pub tokens: Vec<(String, Option<TokenRecord>)>,
    pub meta: Option<Meta>,
    /// Report sequence floors written without the whole record (every
    /// accepted report moves one; replay protection must survive a crash).
    pub report_seqs: Vec<ReportSeq>,
    /// What is kept of unenrolled devices (`None` deletes; written
    /// unconditionally, like deletes).
    pub tombstones: Vec<(DeviceId, Option<Tombstone>)>,
    /// `postcard` of the engine's fleet-wide catalog health (failing
    /// entries), when it changed.
    pub catalog_health: Option<Vec<u8>>,
    /// Appended to the devices' history (unconditionally, like tombstones;
    /// the stores prune it by age and count).
    pub history: Vec<crate::history::HistoryEntry>,
    /// `postcard` of the engine's staged rollouts, when they changed.
    pub rollouts: Option<Vec<u8>>,
    /// The latest diagnostics answer of these devices (`postcard` of
    /// `service::StoredDiagnostics`; one per device, replacing the last;
    /// empty deletes it).
    pub diagnostics: Vec<(DeviceId, Vec<u8>)>,
}

/// A report sequence floor write. Like a whole-record write it moves the
/// device's write version (so a stale copy elsewhere cannot accept a replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSeq {
    pub device: DeviceId,
    pub seq: u64,
    /// The version the device will have after this write.
    pub version: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put_devices.is_empty()
            && self.delete_devices.is_empty()
            && self.tokens.is_empty()
            && self.meta.is_none()
            && self.report_seqs.is_empty()
            && self.tombstones.is_empty()
            && self.catalog_health.is_none()
            && self.history.is_empty()
            && self.rollouts.is_none()
            && self.diagnostics.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> DeviceRecord {
        DeviceRecord::new(DeviceId::new(id).unwrap(), [9; 32], "basic".into(), None, 5)
    }

    #[test]
    fn sequence_numbers_resume_above_the_reserved_block() {
        let mut r = rec("a");
        assert_eq!(r.take_seq(), 1);
        assert_eq!(r.seq_reserved_until, SEQ_BLOCK);
        for _ in 0..SEQ_BLOCK {
            r.take_seq();
        }
        assert_eq!(r.next_instruction_seq, SEQ_BLOCK + 2);
        assert_eq!(r.seq_reserved_until, 2 * SEQ_BLOCK);
        // A crash after the reservation was committed but before the record
        // with the later `next` was: numbering resumes above the reservation.
        let mut on_disk = r.clone();
        on_disk.next_instruction_seq = 3;
        on_disk.resume_after_restart();
        assert_eq!(on_disk.next_instruction_seq, 2 * SEQ_BLOCK + 1);
    }
}
