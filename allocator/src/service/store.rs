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

use super::access::OperatorToken;
pub use super::assign_records::{
    AssignmentHistoryRow, ServerBeat, ShortfallRecord, StoredAssignment,
};
use super::audit::{AuditEntry, AuditLimits, AuditQuery, StoredEntry};
use serde::Serialize;
pub use shardline_allocator_core::history::{HistoryEntry, HistoryQuery};
pub use shardline_allocator_core::records::{
    Batch, DeviceRecord, Meta, PendingInstruction, ReportSeq, TokenRecord, Tombstone, SEQ_BLOCK,
};
use shardline_shared::ids::DeviceId;
use std::collections::BTreeMap;
use std::path::Path;

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

pub(super) fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
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
/// - Tombstones (`Batch::tombstones`) are written unconditionally, the last
///   write of an id in a commit wins, `None` deletes; they survive the
///   deletion of the device record. The catalog health is one blob, the
///   last one committed is the one loaded.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
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
    /// What is kept of unenrolled devices, by id order.
    fn load_tombstones(&self) -> Result<Vec<Tombstone>, StoreError>;
    /// The engine's catalog health blob, if one was ever committed.
    fn load_catalog_health(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// The engine's staged rollouts blob, if one was ever committed.
    fn load_rollouts(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// The latest diagnostics answer blob of every device that has one.
    fn load_diagnostics(&self) -> Result<Vec<(DeviceId, Vec<u8>)>, StoreError>;
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
    /// One device's history matching `query`, newest first.
    fn load_history(
        &self,
        device: &DeviceId,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>, StoreError>;
    /// Deletes history older than `before_ms` and, per device, beyond the
    /// newest `max_per_device` entries; returns how many were deleted.
    fn prune_history(&self, before_ms: u64, max_per_device: usize) -> Result<u64, StoreError>;
    // Access and audit (issue 20): written by the API, outside the core's
    // batches; each call is durable when it returns.
    /// Writes an operator token (insert or overwrite by id).
    fn put_operator_token(&self, rec: &OperatorToken) -> Result<(), StoreError>;
    fn load_operator_token(&self, id: &str) -> Result<Option<OperatorToken>, StoreError>;
    /// Every operator token, revoked ones included, by id order.
    fn load_operator_tokens(&self) -> Result<Vec<OperatorToken>, StoreError>;
    /// Appends an audit entry under a new id (greater than every earlier
    /// one), then drops the oldest entries beyond `limits`, never the new one.
    fn append_audit(&self, entry: &AuditEntry, limits: &AuditLimits) -> Result<u64, StoreError>;
    /// Rewrites audit entry `id` if it is still kept.
    fn put_audit(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Entries matching `q`, newest (highest id) first, at most `q.limit`.
    fn load_audit(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError>;
    // Regional assignment (issue 19): written by the assignment driver, each
    // call durable when it returns.
    /// Writes an instance's heartbeat (overwrites its previous one).
    fn put_server_beat(&self, beat: &ServerBeat) -> Result<(), StoreError>;
    /// Every instance's latest heartbeat, by id order.
    fn load_server_beats(&self) -> Result<Vec<ServerBeat>, StoreError>;
    /// Writes a group's assignment unless a higher version is stored
    /// (then nothing is written and the answer is `false`); a new version
    /// (not a renewal) is appended to the group's history, of which the
    /// newest `max_history` are kept.
    fn put_assignment(&self, a: &StoredAssignment, max_history: usize) -> Result<bool, StoreError>;
    /// Every group's last assignment, by group order.
    fn load_assignments(&self) -> Result<Vec<StoredAssignment>, StoreError>;
    /// A group's published versions, newest first, at most `limit`.
    fn load_assignment_history(
        &self,
        group: &shardline_shared::assign::GroupId,
        limit: usize,
    ) -> Result<Vec<AssignmentHistoryRow>, StoreError>;
    /// Withdraws `row.assignment.group`'s object in one commit: its current
    /// assignment is removed if the stored version is `row`'s, and `row`
    /// (change `Withdrawn`) is appended to its history (bounded as in
    /// `put_assignment`). `false`: nothing stored for the group, or another
    /// version (nothing changed).
    fn withdraw_assignment(
        &self,
        row: &AssignmentHistoryRow,
        max_history: usize,
    ) -> Result<bool, StoreError>;
    /// Replaces the current capacity shortfalls (one per region; empty:
    /// none).
    fn put_shortfalls(&self, s: &[ShortfallRecord]) -> Result<(), StoreError>;
    /// The current capacity shortfalls, by region order.
    fn load_shortfalls(&self) -> Result<Vec<ShortfallRecord>, StoreError>;
}

mod access;
mod assign;
mod floors;
use floors::FLOORS;

const DEVICES: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("devices");
const TOKENS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("tokens");
const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");
/// The former separate tables, read only to move them into [`FLOORS`].
const LEGACY_REPORT_SEQ: redb::TableDefinition<'_, &str, u64> =
    redb::TableDefinition::new("report_seq");
const LEGACY_VERSIONS: redb::TableDefinition<'_, &str, u64> =
    redb::TableDefinition::new("device_version");
const TOMBSTONES: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("tombstones");
/// Key of the catalog health blob in `META` (stored raw: the engine encodes it).
const HEALTH_KEY: &str = "catalog_health";
/// Key of the staged rollouts blob in `META` (stored raw, like the health).
const ROLLOUTS_KEY: &str = "rollouts";
/// Prefix of a device's latest diagnostics answer in `META` (one per device).
const DIAG_PREFIX: &str = "diag/";

/// Record encoding version, first byte of every stored value.
const RECORD_VERSION: u8 = 1;

pub(crate) fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    // Store types are plain serde structs: postcard cannot fail on them.
    // Encoded straight after the version byte (one buffer, no copy).
    postcard::to_extend(value, vec![RECORD_VERSION]).unwrap_or_else(|_| vec![RECORD_VERSION])
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
        Some((&RECORD_VERSION, body)) => postcard::from_bytes(body).or_else(|e| {
            // A device record written before `shard_config` (its last
            // field) existed ends one field early: an empty map is one
            // zero byte in postcard, so append it and decode again.
            let mut padded = body.to_vec();
            padded.push(0);
            postcard::from_bytes(&padded).map_err(|_| corrupt(e.to_string()))
        }),
        Some((v, _)) => Err(corrupt(format!("unknown record version {v}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// The embedded store: one redb file. redb locks the file, so two allocators
/// can never open the same store.
pub struct RedbStore {
    db: redb::Database,
    /// Every device's report floor and write version as committed; a
    /// commit holds it from its first check until it is applied, and
    /// readers take it before their read transaction, so they see both at
    /// one commit.
    floors: std::sync::Mutex<floors::Floors>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_folding_at(path, floors::FOLD_MIN)
    }

    /// [`RedbStore::open`] with the floor log folded once it holds
    /// `fold_min` writes (or twice the fleet).
    fn open_folding_at(path: &Path, fold_min: usize) -> Result<Self, StoreError> {
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(redb::Error::Io(e)))?;
        }
        let db = redb::Database::create(path).map_err(|e| open_err(e.into()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        for table in [DEVICES, TOKENS, META, TOMBSTONES] {
            txn.open_table(table).map_err(|e| open_err(e.into()))?;
        }
        txn.open_table(FLOORS).map_err(|e| open_err(e.into()))?;
        txn.open_table(floors::FLOOR_LOG)
            .map_err(|e| open_err(e.into()))?;
        let moved = Self::move_legacy_floors(&txn).map_err(|e| match e {
            StoreError::Db(source) => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        if moved > 0 {
            tracing::info!(
                path = %path.display(),
                devices = moved,
                "moved the report floors and write versions into one record per device"
            );
        }
        let floors = {
            let txn = db.begin_read().map_err(|e| open_err(e.into()))?;
            floors::Floors::load(&txn, fold_min)?
        };
        Ok(Self {
            db,
            floors: std::sync::Mutex::new(floors),
        })
    }

    /// The floors; a panic elsewhere while holding them left nothing half
    /// applied (they change only after a commit, in one call).
    fn floors(&self) -> std::sync::MutexGuard<'_, floors::Floors> {
        self.floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves rows of the former `report_seq` and `device_version` tables
    /// into [`FLOORS`] (in the opening transaction, so an interrupted move
    /// leaves the old tables whole) and deletes those tables. A device
    /// already in [`FLOORS`] keeps the higher of each value.
    fn move_legacy_floors(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
        use redb::{ReadableTable, TableHandle};
        let names: Vec<String> = txn
            .list_tables()
            .map_err(db_err)?
            .map(|t| t.name().to_owned())
            .collect();
        let has = |d: &redb::TableDefinition<'_, &str, u64>| names.iter().any(|n| n == d.name());
        if !has(&LEGACY_REPORT_SEQ) && !has(&LEGACY_VERSIONS) {
            return Ok(0);
        }
        let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (table, at) in [(LEGACY_REPORT_SEQ, 0), (LEGACY_VERSIONS, 1)] {
            if !has(&table) {
                continue;
            }
            let t = txn.open_table(table).map_err(db_err)?;
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let e = rows.entry(k.value().to_owned()).or_default();
                if at == 0 {
                    e.0 = v.value();
                } else {
                    e.1 = v.value();
                }
            }
        }
        let mut floors = txn.open_table(FLOORS).map_err(db_err)?;
        for (device, (seq, version)) in &rows {
            let (seq0, version0) = floors
                .get(device.as_str())
                .map_err(db_err)?
                .map_or((0, 0), |v| v.value());
            floors
                .insert(
                    device.as_str(),
                    ((*seq).max(seq0), (*version).max(version0)),
                )
                .map_err(db_err)?;
        }
        drop(floors);
        txn.delete_table(LEGACY_REPORT_SEQ).map_err(db_err)?;
        txn.delete_table(LEGACY_VERSIONS).map_err(db_err)?;
        Ok(rows.len())
    }

    /// Every row of a string-keyed table, decoded; a table made lazily by
    /// its first write (operator tokens, assignments) reads as empty until
    /// then.
    pub(crate) fn load_table<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'_, &str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        use redb::ReadableTable;
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
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

/// Fills in the committed version and report floor of loaded records.
fn complete(floors: &floors::Floors, records: &mut [DeviceRecord]) {
    for rec in records {
        let (seq, version) = floors.get(rec.device.as_str()).unwrap_or((0, 0));
        rec.last_report_seq = rec.last_report_seq.max(seq);
        rec.version = version;
    }
}

impl Store for RedbStore {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let floors = self.floors();
        let mut records: Vec<DeviceRecord> = self
            .load_table::<DeviceRecord>(DEVICES)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        complete(&floors, &mut records);
        Ok(records)
    }

    fn load_device_records(&self, devices: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let floors = self.floors();
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(DEVICES).map_err(db_err)?;
        let mut out = Vec::with_capacity(devices.len());
        for id in devices {
            if let Some(v) = t.get(id.as_str()).map_err(db_err)? {
                out.push(dec::<DeviceRecord>(id.as_str(), v.value())?);
            }
        }
        complete(&floors, &mut out);
        Ok(out)
    }

    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, StoreError> {
        use redb::ReadableTable;
        let floors = self.floors();
        let txn = self.db.begin_read().map_err(db_err)?;
        let recs = txn.open_table(DEVICES).map_err(db_err)?;
        let version_of =
            |id: &str| -> Result<u64, StoreError> { Ok(floors.get(id).map_or(0, |(_, v)| v)) };
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
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        match t.get("meta").map_err(db_err)? {
            Some(v) => dec("meta", v.value()),
            None => Ok(Meta::default()),
        }
    }

    fn load_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        Ok(self
            .load_table::<Tombstone>(TOMBSTONES)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    fn load_catalog_health(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        Ok(t.get(HEALTH_KEY)
            .map_err(db_err)?
            .map(|v| v.value().to_vec()))
    }

    fn load_rollouts(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        Ok(t.get(ROLLOUTS_KEY)
            .map_err(db_err)?
            .map(|v| v.value().to_vec()))
    }

    fn load_diagnostics(&self) -> Result<Vec<(DeviceId, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range(DIAG_PREFIX..).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let Some(id) = k.value().strip_prefix(DIAG_PREFIX) else {
                break; // past the prefix: keys are ordered
            };
            if let Ok(device) = DeviceId::new(id) {
                out.push((device, v.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn commit_all(&self, batches: &[Batch]) -> Result<(), StoreError> {
        if batches.iter().all(Batch::is_empty) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut floors = self.floors();
        let mut staged = floors::Staged::default();
        for batch in batches {
            let mut devices = txn.open_table(DEVICES).map_err(db_err)?;
            for rec in &batch.put_devices {
                staged.write(&floors, &rec.device, (rec.last_report_seq, rec.version));
                devices
                    .insert(rec.device.as_str(), enc(rec).as_slice())
                    .map_err(db_err)?;
            }
            for w in &batch.report_seqs {
                staged.write(&floors, &w.device, (w.seq, w.version));
            }
            for id in &batch.delete_devices {
                devices.remove(id.as_str()).map_err(db_err)?;
                staged.delete(id);
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
            if let Some(h) = &batch.catalog_health {
                let mut t = txn.open_table(META).map_err(db_err)?;
                t.insert(HEALTH_KEY, h.as_slice()).map_err(db_err)?;
            }
            super::store_history::append(&txn, &batch.history)?;
            if let Some(r) = &batch.rollouts {
                let mut t = txn.open_table(META).map_err(db_err)?;
                t.insert(ROLLOUTS_KEY, r.as_slice()).map_err(db_err)?;
            }
            if !batch.diagnostics.is_empty() {
                let mut t = txn.open_table(META).map_err(db_err)?;
                for (device, d) in &batch.diagnostics {
                    let key = format!("{DIAG_PREFIX}{device}");
                    if d.is_empty() {
                        t.remove(key.as_str()).map_err(db_err)?;
                    } else {
                        t.insert(key.as_str(), d.as_slice()).map_err(db_err)?;
                    }
                }
            }
            let mut tombs = txn.open_table(TOMBSTONES).map_err(db_err)?;
            for (id, t) in &batch.tombstones {
                match t {
                    Some(t) => {
                        tombs
                            .insert(id.as_str(), enc(t).as_slice())
                            .map_err(db_err)?;
                    }
                    None => {
                        tombs.remove(id.as_str()).map_err(db_err)?;
                    }
                }
            }
        }
        if !staged.conflicts.is_empty() {
            txn.abort().map_err(db_err)?;
            return Err(StoreError::Conflict {
                devices: staged.conflicts,
            });
        }
        let folded = floors.write(&txn, &staged)?;
        if let Err(e) = txn.commit() {
            // Whether any of it reached the file is unknown: read the
            // floors back rather than guess.
            if let Ok(read) = self.db.begin_read() {
                if let Ok(reloaded) = floors::Floors::load(&read, floors.fold_min()) {
                    *floors = reloaded;
                }
            }
            return Err(db_err(e));
        }
        floors.committed(staged, folded);
        Ok(())
    }

    fn load_history(
        &self,
        device: &DeviceId,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        super::store_history::load(&self.db, device, query)
    }

    fn prune_history(&self, before_ms: u64, max_per_device: usize) -> Result<u64, StoreError> {
        super::store_history::prune(&self.db, before_ms, max_per_device)
    }

    fn put_operator_token(&self, rec: &OperatorToken) -> Result<(), StoreError> {
        self.put_operator_token_redb(rec)
    }
    fn load_operator_token(&self, id: &str) -> Result<Option<OperatorToken>, StoreError> {
        self.load_operator_token_redb(id)
    }
    fn load_operator_tokens(&self) -> Result<Vec<OperatorToken>, StoreError> {
        self.load_operator_tokens_redb()
    }
    fn append_audit(&self, entry: &AuditEntry, limits: &AuditLimits) -> Result<u64, StoreError> {
        self.append_audit_redb(entry, limits)
    }
    fn put_audit(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        self.put_audit_redb(id, entry)
    }
    fn load_audit(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError> {
        self.load_audit_redb(q)
    }
    fn put_server_beat(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        self.put_server_beat_redb(beat)
    }
    fn load_server_beats(&self) -> Result<Vec<ServerBeat>, StoreError> {
        self.load_server_beats_redb()
    }
    fn put_assignment(&self, a: &StoredAssignment, max_history: usize) -> Result<bool, StoreError> {
        self.put_assignment_redb(a, max_history)
    }
    fn load_assignments(&self) -> Result<Vec<StoredAssignment>, StoreError> {
        self.load_assignments_redb()
    }
    fn load_assignment_history(
        &self,
        group: &shardline_shared::assign::GroupId,
        limit: usize,
    ) -> Result<Vec<AssignmentHistoryRow>, StoreError> {
        self.load_assignment_history_redb(group, limit)
    }
    fn withdraw_assignment(
        &self,
        row: &AssignmentHistoryRow,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        self.withdraw_assignment_redb(row, max_history)
    }
    fn put_shortfalls(&self, s: &[ShortfallRecord]) -> Result<(), StoreError> {
        self.put_shortfalls_redb(s)
    }
    fn load_shortfalls(&self) -> Result<Vec<ShortfallRecord>, StoreError> {
        self.load_shortfalls_redb()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_written_before_device_configuration_existed_still_decodes() {
        // The record layout before `shard_config` was added (issue 15).
        #[derive(Serialize)]
        struct Before {
            device: DeviceId,
            public_key: [u8; 32],
            tier: String,
            tenant: Option<String>,
            enrolled_at_ms: u64,
            last_report_seq: u64,
            last_report_ms: Option<u64>,
            next_instruction_seq: u64,
            seq_reserved_until: u64,
            applied_seq: u64,
            pending: Vec<PendingInstruction>,
            rotation_epoch_sent: u64,
            instructions_sent: u64,
            instructions_applied: u64,
            instructions_rejected: u64,
            engine_state: Vec<u8>,
        }
        let id = DeviceId::new("old").unwrap();
        let bytes = enc(&Before {
            device: id.clone(),
            public_key: [3; 32],
            tier: "basic".into(),
            tenant: Some("t".into()),
            enrolled_at_ms: 9,
            last_report_seq: 4,
            last_report_ms: Some(8),
            next_instruction_seq: 2,
            seq_reserved_until: 64,
            applied_seq: 1,
            pending: vec![],
            rotation_epoch_sent: 0,
            instructions_sent: 1,
            instructions_applied: 1,
            instructions_rejected: 0,
            engine_state: vec![1, 2, 3],
        });
        let rec: DeviceRecord = dec("old", &bytes).unwrap();
        assert_eq!(rec.device, id);
        assert_eq!(rec.engine_state, [1, 2, 3]);
        assert!(rec.shard_config.is_empty());
        // And a current record round-trips.
        let mut now = rec.clone();
        now.shard_config.insert("x".into(), Default::default());
        assert_eq!(dec::<DeviceRecord>("new", &enc(&now)).unwrap(), now);
    }
}
