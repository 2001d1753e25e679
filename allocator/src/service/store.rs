//! The allocator's durable state behind a [`Store`] trait, with the embedded
//! implementation [`RedbStore`] (one redb file, fsync on every commit).
//!
//! Everything the service knows about a device is one [`DeviceRecord`]; a
//! [`Batch`] of records, tokens and metadata is written in one transaction,
//! so a device's state is always updated atomically and a crash leaves either
//! the old or the new record, never a mix. The service commits a batch
//! *before* it publishes the instructions the batch reserved sequence numbers
//! for, which is what makes "no sequence number is ever reused" hold across
//! `kill -9`.
//!
//! A PostgreSQL-compatible implementation (for several allocator instances)
//! implements the same trait: the record is an opaque versioned blob keyed by
//! device id, so it maps onto one table with a `SELECT … FOR UPDATE` per device.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use std::path::Path;

/// How far ahead of use instruction sequence numbers are reserved (persisted).
pub const SEQ_BLOCK: u64 = 64;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    #[error("store record for {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

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
    pub report_seqs: Vec<(DeviceId, u64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put_devices.is_empty()
            && self.delete_devices.is_empty()
            && self.tokens.is_empty()
            && self.meta.is_none()
            && self.report_seqs.is_empty()
    }
}

/// The allocator's persistence. Implementations commit a [`Batch`] atomically.
pub trait Store: Send + 'static {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError>;
    fn load_meta(&self) -> Result<Meta, StoreError>;
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.commit_all(std::slice::from_ref(batch))
    }
    /// Several batches, applied in order, in one transaction (group commit).
    fn commit_all(&self, batches: &[Batch]) -> Result<(), StoreError>;
}

const DEVICES: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("devices");
const TOKENS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("tokens");
const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");
const REPORT_SEQ: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("report_seq");

/// Record encoding version, first byte of every stored value.
const RECORD_VERSION: u8 = 1;

fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Store types are plain serde structs: postcard cannot fail on them.
    out.extend(postcard::to_stdvec(value).unwrap_or_default());
    out
}

fn dec<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.to_owned(),
        message,
    };
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown record version {v}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// The embedded store: one redb file. redb locks the file, so two allocators
/// can never open the same store.
pub struct RedbStore {
    db: redb::Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(redb::Error::Io(e)))?;
        }
        let db = redb::Database::create(path).map_err(|e| open_err(e.into()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        for table in [DEVICES, TOKENS, META] {
            txn.open_table(table).map_err(|e| open_err(e.into()))?;
        }
        txn.open_table(REPORT_SEQ).map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(Self { db })
    }

    fn load_table<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'_, &str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        use redb::ReadableTable;
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value().to_owned();
            let value = dec(&key, v.value())?;
            out.push((key, value));
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut records: Vec<DeviceRecord> = self
            .load_table::<DeviceRecord>(DEVICES)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let txn = self.db.begin_read().map_err(db_err)?;
        let seqs = txn.open_table(REPORT_SEQ).map_err(db_err)?;
        for rec in &mut records {
            if let Some(seq) = seqs.get(rec.device.as_str()).map_err(db_err)? {
                rec.last_report_seq = rec.last_report_seq.max(seq.value());
            }
        }
        Ok(records)
    }

    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        self.load_table(TOKENS)
    }

    fn load_meta(&self) -> Result<Meta, StoreError> {
        Ok(self
            .load_table::<Meta>(META)?
            .into_iter()
            .find(|(k, _)| k == "meta")
            .map(|(_, m)| m)
            .unwrap_or_default())
    }

    fn commit_all(&self, batches: &[Batch]) -> Result<(), StoreError> {
        if batches.iter().all(Batch::is_empty) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        for batch in batches {
            let mut devices = txn.open_table(DEVICES).map_err(db_err)?;
            for rec in &batch.put_devices {
                devices
                    .insert(rec.device.as_str(), enc(rec).as_slice())
                    .map_err(db_err)?;
            }
            let mut seqs = txn.open_table(REPORT_SEQ).map_err(db_err)?;
            for (id, seq) in &batch.report_seqs {
                seqs.insert(id.as_str(), *seq).map_err(db_err)?;
            }
            for rec in &batch.put_devices {
                seqs.insert(rec.device.as_str(), rec.last_report_seq)
                    .map_err(db_err)?;
            }
            for id in &batch.delete_devices {
                devices.remove(id.as_str()).map_err(db_err)?;
                seqs.remove(id.as_str()).map_err(db_err)?;
            }
            let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
            for (hash, rec) in &batch.tokens {
                match rec {
                    Some(rec) => {
                        tokens
                            .insert(hash.as_str(), enc(rec).as_slice())
                            .map_err(db_err)?;
                    }
                    None => {
                        tokens.remove(hash.as_str()).map_err(db_err)?;
                    }
                }
            }
            if let Some(meta) = &batch.meta {
                let mut t = txn.open_table(META).map_err(db_err)?;
                t.insert("meta", enc(meta).as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
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

    #[test]
    fn a_batch_commits_and_reloads_atomically() {
        let dir = std::env::temp_dir().join(format!("sl-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut a = rec("a");
            a.take_seq();
            let batch = Batch {
                put_devices: vec![a.clone(), rec("b")],
                tokens: vec![(
                    "h".into(),
                    Some(TokenRecord {
                        tier: "basic".into(),
                        tenant: None,
                        created_ms: 1,
                        expires_at_ms: 2,
                        uses_left: 1,
                    }),
                )],
                meta: Some(Meta {
                    key_epoch: 3,
                    ..Meta::default()
                }),
                ..Batch::default()
            };
            store.commit(&batch).unwrap();
            store
                .commit(&Batch {
                    delete_devices: vec![DeviceId::new("b").unwrap()],
                    ..Batch::default()
                })
                .unwrap();
        }
        {
            // A report sequence floor written alone lands in the loaded record.
            let store = RedbStore::open(&path).unwrap();
            store
                .commit(&Batch {
                    report_seqs: vec![(DeviceId::new("a").unwrap(), 77)],
                    ..Batch::default()
                })
                .unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let devices = store.load_devices().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].last_report_seq, 77);
        assert_eq!(devices[0].seq_reserved_until, SEQ_BLOCK);
        assert_eq!(store.load_tokens().unwrap().len(), 1);
        assert_eq!(store.load_meta().unwrap().key_epoch, 3);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
