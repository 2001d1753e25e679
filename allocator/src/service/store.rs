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
//! Several allocator instances may share one store (PostgreSQL, see
//! `store_pg`). Every device write is therefore conditional: a record carries
//! the write `version` it will have once committed, and a commit applies only
//! if the stored version is exactly one less (absent = 0). Otherwise the
//! whole commit is refused with [`StoreError::Conflict`] naming the devices
//! another instance wrote meanwhile; the service reloads those and drops what
//! it had decided from the stale copy. That is what keeps "a sequence number
//! is never used twice" true with any number of instances: two instances can
//! both pick number *n* for a device, but only one of them can commit it, and
//! nothing is published before its commit.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use std::collections::BTreeMap;
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
    /// Another writer changed these devices since this instance read them;
    /// nothing of the commit was written.
    #[error("store: {} device record(s) changed by another writer, first {}", devices.len(), devices.first().map_or("-", |d| d.as_str()))]
    Conflict { devices: Vec<DeviceId> },
    /// The PostgreSQL store (`store_pg`) failed; `what` says at which step.
    #[error("store (PostgreSQL) {what}: {source}")]
    Pg {
        what: String,
        #[source]
        source: Box<postgres::Error>,
    },
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
    }
}

/// The allocator's persistence. Implementations commit a [`Batch`] atomically.
///
/// Contract (tested against every implementation):
/// - `commit_all` applies the batches in order in one transaction, or
///   nothing. Each device write (`put_devices`, `report_seqs`) applies only if
///   the stored version is the written one minus one (absent = 0); if any
///   does not, nothing is written and the error is [`StoreError::Conflict`]
///   with every such device. Deletes are unconditional.
/// - Loaded records carry their stored `version`, and the report floor is
///   the higher of the record's and the last floor write.
pub trait Store: Send + Sync + 'static {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// These devices' records (absent ones are left out).
    fn load_device_records(&self, devices: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Stored write versions: of `devices`, or of every device when `None`.
    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, StoreError>;
    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError>;
    fn load_meta(&self) -> Result<Meta, StoreError>;
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.commit_all(std::slice::from_ref(batch))
    }
    /// Several batches, applied in order, in one transaction (group commit).
    fn commit_all(&self, batches: &[Batch]) -> Result<(), StoreError>;
    /// Whether other allocator instances may write this store concurrently
    /// (the service then checks its copies before using them).
    fn is_shared(&self) -> bool {
        false
    }
    /// Takes or keeps the lead for fleet-wide periodic work (ticks,
    /// re-sends): exactly one live instance holds it. An embedded store has
    /// one instance, which always leads.
    fn try_lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
}

const DEVICES: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("devices");
const TOKENS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("tokens");
const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");
const REPORT_SEQ: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("report_seq");
const VERSIONS: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("device_version");

/// Record encoding version, first byte of every stored value.
const RECORD_VERSION: u8 = 1;

pub(crate) fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Store types are plain serde structs: postcard cannot fail on them.
    out.extend(postcard::to_stdvec(value).unwrap_or_default());
    out
}

pub(crate) fn dec<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
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
        for table in [REPORT_SEQ, VERSIONS] {
            txn.open_table(table).map_err(|e| open_err(e.into()))?;
        }
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

impl RedbStore {
    /// Fills in the stored version and report floor of loaded records.
    fn complete(
        txn: &redb::ReadTransaction,
        records: &mut [DeviceRecord],
    ) -> Result<(), StoreError> {
        let seqs = txn.open_table(REPORT_SEQ).map_err(db_err)?;
        let versions = txn.open_table(VERSIONS).map_err(db_err)?;
        for rec in records {
            if let Some(seq) = seqs.get(rec.device.as_str()).map_err(db_err)? {
                rec.last_report_seq = rec.last_report_seq.max(seq.value());
            }
            rec.version = versions
                .get(rec.device.as_str())
                .map_err(db_err)?
                .map_or(0, |v| v.value());
        }
        Ok(())
    }
}

/// Checks one conditional device write against the versions table (and
/// moves it), recording a conflict instead of failing at once so that the
/// error names every stale device.
fn check_version(
    versions: &mut redb::Table<'_, &str, u64>,
    device: &DeviceId,
    new_version: u64,
    conflicts: &mut Vec<DeviceId>,
) -> Result<(), StoreError> {
    use redb::ReadableTable;
    let stored = versions
        .get(device.as_str())
        .map_err(db_err)?
        .map_or(0, |v| v.value());
    if stored.checked_add(1) != Some(new_version) {
        if !conflicts.contains(device) {
            conflicts.push(device.clone());
        }
        return Ok(());
    }
    versions
        .insert(device.as_str(), new_version)
        .map_err(db_err)?;
    Ok(())
}

impl Store for RedbStore {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut records: Vec<DeviceRecord> = self
            .load_table::<DeviceRecord>(DEVICES)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let txn = self.db.begin_read().map_err(db_err)?;
        Self::complete(&txn, &mut records)?;
        Ok(records)
    }

    fn load_device_records(&self, devices: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(DEVICES).map_err(db_err)?;
        let mut out = Vec::with_capacity(devices.len());
        for id in devices {
            if let Some(v) = t.get(id.as_str()).map_err(db_err)? {
                out.push(dec::<DeviceRecord>(id.as_str(), v.value())?);
            }
        }
        Self::complete(&txn, &mut out)?;
        Ok(out)
    }

    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, StoreError> {
        use redb::ReadableTable;
        let txn = self.db.begin_read().map_err(db_err)?;
        let recs = txn.open_table(DEVICES).map_err(db_err)?;
        let versions = txn.open_table(VERSIONS).map_err(db_err)?;
        let version_of = |id: &str| -> Result<u64, StoreError> {
            Ok(versions.get(id).map_err(db_err)?.map_or(0, |v| v.value()))
        };
        let mut out = Vec::new();
        match devices {
            Some(ids) => {
                for id in ids {
                    if recs.get(id.as_str()).map_err(db_err)?.is_some() {
                        out.push((id.clone(), version_of(id.as_str())?));
                    }
                }
            }
            None => {
                for row in recs.iter().map_err(db_err)? {
                    let (k, _) = row.map_err(db_err)?;
                    let key = k.value();
                    let id = DeviceId::new(key).map_err(|e| StoreError::Corrupt {
                        key: key.to_owned(),
                        message: e.to_string(),
                    })?;
                    out.push((id, version_of(key)?));
                }
            }
        }
        Ok(out)
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
        let mut conflicts = Vec::new();
        for batch in batches {
            let mut devices = txn.open_table(DEVICES).map_err(db_err)?;
            let mut seqs = txn.open_table(REPORT_SEQ).map_err(db_err)?;
            let mut versions = txn.open_table(VERSIONS).map_err(db_err)?;
            for rec in &batch.put_devices {
                check_version(&mut versions, &rec.device, rec.version, &mut conflicts)?;
                devices
                    .insert(rec.device.as_str(), enc(rec).as_slice())
                    .map_err(db_err)?;
                seqs.insert(rec.device.as_str(), rec.last_report_seq)
                    .map_err(db_err)?;
            }
            for w in &batch.report_seqs {
                check_version(&mut versions, &w.device, w.version, &mut conflicts)?;
                seqs.insert(w.device.as_str(), w.seq).map_err(db_err)?;
            }
            for id in &batch.delete_devices {
                devices.remove(id.as_str()).map_err(db_err)?;
                seqs.remove(id.as_str()).map_err(db_err)?;
                versions.remove(id.as_str()).map_err(db_err)?;
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
        if !conflicts.is_empty() {
            txn.abort().map_err(db_err)?;
            return Err(StoreError::Conflict { devices: conflicts });
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }
}

/// The [`Store`] contract as a check any implementation's tests run on a
/// fresh, empty store (the embedded one here, PostgreSQL in its own tests).
pub mod contract {
    use super::*;

    fn rec(id: &str, version: u64) -> DeviceRecord {
        let mut r = DeviceRecord::new(
            DeviceId::new(id).expect("valid id"),
            [9; 32],
            "basic".into(),
            None,
            5,
        );
        r.version = version;
        r
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("valid id")
    }

    /// Panics (it is for tests) with what broke the contract.
    pub fn check(store: &dyn Store) {
        // Create two devices, a token and metadata in one commit.
        let mut a = rec("contract-a", 1);
        a.take_seq();
        let token = TokenRecord {
            tier: "basic".into(),
            tenant: Some("t".into()),
            created_ms: 1,
            expires_at_ms: 2,
            uses_left: 1,
        };
        store
            .commit(&Batch {
                put_devices: vec![a.clone(), rec("contract-b", 1)],
                tokens: vec![("h".into(), Some(token.clone()))],
                meta: Some(Meta {
                    key_epoch: 3,
                    ..Meta::default()
                }),
                ..Batch::default()
            })
            .expect("first commit");
        let mut loaded = store.load_devices().expect("load");
        loaded.sort_by(|x, y| x.device.cmp(&y.device));
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0], a, "a record reloads exactly, version included");
        assert_eq!(
            store.load_tokens().expect("tokens"),
            vec![("h".into(), token)]
        );
        assert_eq!(store.load_meta().expect("meta").key_epoch, 3);

        // A floor write moves the version and the loaded floor.
        store
            .commit(&Batch {
                report_seqs: vec![ReportSeq {
                    device: id("contract-a"),
                    seq: 77,
                    version: 2,
                }],
                ..Batch::default()
            })
            .expect("floor write");
        let got = store
            .load_device_records(&[id("contract-a"), id("contract-missing")])
            .expect("load by id");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].last_report_seq, got[0].version), (77, 2));

        // A writer that read version 1 of `a` is refused, and nothing of its
        // commit lands, not even its write of `b` that was in order.
        let stale_a = rec("contract-a", 2);
        let mut b = rec("contract-b", 2);
        b.tier = "changed".into();
        match store.commit_all(&[
            Batch {
                put_devices: vec![b.clone()],
                ..Batch::default()
            },
            Batch {
                put_devices: vec![stale_a],
                tokens: vec![("h".into(), None)],
                ..Batch::default()
            },
        ]) {
            Err(StoreError::Conflict { devices }) => {
                assert_eq!(devices, vec![id("contract-a")])
            }
            other => panic!("a stale write must conflict, got {other:?}"),
        }
        let versions: BTreeMap<DeviceId, u64> = store
            .device_versions(None)
            .expect("versions")
            .into_iter()
            .collect();
        assert_eq!(versions.get(&id("contract-a")), Some(&2));
        assert_eq!(versions.get(&id("contract-b")), Some(&1));
        assert_eq!(store.load_tokens().expect("tokens").len(), 1);

        // Creating a device that exists is a conflict too (another instance
        // enrolled it first).
        assert!(matches!(
            store.commit(&Batch {
                put_devices: vec![rec("contract-b", 1)],
                ..Batch::default()
            }),
            Err(StoreError::Conflict { .. })
        ));

        // Chained writes of one device in one group commit.
        let mut b3 = b.clone();
        b3.version = 3;
        store
            .commit_all(&[
                Batch {
                    put_devices: vec![b.clone()],
                    ..Batch::default()
                },
                Batch {
                    report_seqs: vec![ReportSeq {
                        device: id("contract-b"),
                        seq: 5,
                        version: 3,
                    }],
                    ..Batch::default()
                },
                Batch {
                    put_devices: vec![{
                        b3.version = 4;
                        b3.clone()
                    }],
                    ..Batch::default()
                },
            ])
            .expect("chained writes");
        assert_eq!(
            store
                .device_versions(Some(&[id("contract-b"), id("contract-none")]))
                .expect("versions"),
            vec![(id("contract-b"), 4)]
        );

        // Delete is unconditional; a later re-creation starts at version 1.
        store
            .commit(&Batch {
                delete_devices: vec![id("contract-b")],
                ..Batch::default()
            })
            .expect("delete");
        assert_eq!(store.load_devices().expect("load").len(), 1);
        store
            .commit(&Batch {
                put_devices: vec![rec("contract-b", 1)],
                ..Batch::default()
            })
            .expect("re-create");
        assert_eq!(store.load_devices().expect("load").len(), 2);
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
    fn the_embedded_store_keeps_the_store_contract_across_reopen() {
        let dir = std::env::temp_dir().join(format!("sl-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.redb");
        contract::check(&RedbStore::open(&path).unwrap());
        // What was committed is what a reopened file holds.
        let store = RedbStore::open(&path).unwrap();
        let versions = store.device_versions(None).unwrap();
        assert_eq!(versions.len(), 2);
        assert_eq!(store.load_meta().unwrap().key_epoch, 3);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
