//! The embedded store's report floors and write versions: held in memory,
//! made durable by appending each commit's changes to a log table, and
//! folded into the one-row-per-device table now and then.
//!
//! Every accepted report moves its device's floor, so a commit carries the
//! floors of a few hundred devices spread over the whole fleet. Written
//! straight into a per-device B-tree, each commit looked every one of them
//! up (the version check) and, redb being copy-on-write, copied and wrote
//! most of that table's leaf pages: the largest part of the store thread
//! under load. Now the check reads the copy in memory, a commit appends one
//! value at the log's right edge, and a fold rewrites each changed device
//! once per fold instead of once per commit. Both tables are written in the
//! commit's own transaction, so a crash leaves exactly what was committed.

use super::{db_err, dec, enc, StoreError};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use std::collections::{HashMap, HashSet};

/// A device's report floor and write version, one row per device as of the
/// last fold. Stores written before the log have every floor here.
pub(super) const FLOORS: TableDefinition<'_, &str, (u64, u64)> =
    TableDefinition::new("device_floor");
/// Floor changes since the last fold, one row per commit in commit order;
/// a later row wins over an earlier one and over [`FLOORS`].
pub(super) const FLOOR_LOG: TableDefinition<'_, u64, &[u8]> =
    TableDefinition::new("device_floor_log");

/// The log is folded once it holds this many device writes or twice the
/// fleet, whichever is more: reopening replays at most that many, and each
/// changed device's row is rewritten about once per two reports of the
/// whole fleet instead of once per commit.
pub(super) const FOLD_MIN: usize = 16_384;

/// One committed transaction's floor changes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LogRecord {
    /// (device, report floor, write version).
    puts: Vec<(String, u64, u64)>,
    deletes: Vec<String>,
}

/// The floors as committed, and how far the log has grown.
#[derive(Debug)]
pub(super) struct Floors {
    current: HashMap<String, (u64, u64)>,
    /// Devices whose [`FLOORS`] row is behind `current` (or should be gone).
    unfolded: HashSet<String>,
    next_log_key: u64,
    /// Device writes in the log.
    logged: usize,
    fold_min: usize,
}

/// One commit's floor writes, checked against the committed floors and
/// against each other in order; applied to [`Floors`] only once the
/// transaction has committed.
#[derive(Debug, Default)]
pub(super) struct Staged {
    /// `None` deletes the device's floor.
    changes: HashMap<String, Option<(u64, u64)>>,
    pub(super) conflicts: Vec<DeviceId>,
}

impl Staged {
    /// Stages a conditional write: it applies only if the device's version
    /// (as staged so far, else as committed; absent = 0) is one less than
    /// `new_version`. Otherwise the device is recorded as a conflict.
    pub(super) fn write(
        &mut self,
        floors: &Floors,
        device: &DeviceId,
        (seq, new_version): (u64, u64),
    ) {
        let stored = match self.changes.get(device.as_str()) {
            Some(staged) => staged.map_or(0, |(_, v)| v),
            None => floors.get(device.as_str()).map_or(0, |(_, v)| v),
        };
        if stored.checked_add(1) != Some(new_version) {
            if !self.conflicts.contains(device) {
                self.conflicts.push(device.clone());
            }
            return;
        }
        self.changes
            .insert(device.as_str().to_owned(), Some((seq, new_version)));
    }

    pub(super) fn delete(&mut self, device: &DeviceId) {
        self.changes.insert(device.as_str().to_owned(), None);
    }
}

impl Floors {
    /// Reads [`FLOORS`] and replays the log over it.
    pub(super) fn load(txn: &redb::ReadTransaction, fold_min: usize) -> Result<Self, StoreError> {
        let mut current = HashMap::new();
        let table = txn.open_table(FLOORS).map_err(db_err)?;
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            current.insert(k.value().to_owned(), v.value());
        }
        let mut floors = Self {
            current,
            unfolded: HashSet::new(),
            next_log_key: 0,
            logged: 0,
            fold_min,
        };
        let log = txn.open_table(FLOOR_LOG).map_err(db_err)?;
        for row in log.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            let record: LogRecord = dec(&format!("device_floor_log/{key}"), v.value())?;
            floors.logged += record.puts.len() + record.deletes.len();
            for (device, seq, version) in record.puts {
                floors.unfolded.insert(device.clone());
                floors.current.insert(device, (seq, version));
            }
            for device in record.deletes {
                floors.current.remove(&device);
                floors.unfolded.insert(device);
            }
            floors.next_log_key = key + 1;
        }
        Ok(floors)
    }

    pub(super) fn fold_min(&self) -> usize {
        self.fold_min
    }

    /// The committed (report floor, write version) of a device.
    pub(super) fn get(&self, device: &str) -> Option<(u64, u64)> {
        self.current.get(device).copied()
    }

    /// Writes the staged changes into `txn`: one log row, or, once the log
    /// is long enough, every unfolded device into [`FLOORS`] and an empty
    /// log. Returns whether it folded (for [`Floors::committed`]).
    pub(super) fn write(
        &self,
        txn: &redb::WriteTransaction,
        staged: &Staged,
    ) -> Result<bool, StoreError> {
        if staged.changes.is_empty() {
            return Ok(false);
        }
        let threshold = self.fold_min.max(2 * self.current.len());
        if self.logged + staged.changes.len() < threshold {
            let mut record = LogRecord::default();
            for (device, change) in &staged.changes {
                match change {
                    Some((seq, version)) => record.puts.push((device.clone(), *seq, *version)),
                    None => record.deletes.push(device.clone()),
                }
            }
            let mut log = txn.open_table(FLOOR_LOG).map_err(db_err)?;
            log.insert(self.next_log_key, enc(&record).as_slice())
                .map_err(db_err)?;
            return Ok(false);
        }
        // Key order: neighbouring rows share leaf pages.
        let mut devices: Vec<&str> = self
            .unfolded
            .iter()
            .map(String::as_str)
            .chain(staged.changes.keys().map(String::as_str))
            .collect();
        devices.sort_unstable();
        devices.dedup();
        let mut table = txn.open_table(FLOORS).map_err(db_err)?;
        for device in devices {
            let value = match staged.changes.get(device) {
                Some(change) => *change,
                None => self.get(device),
            };
            match value {
                Some(floor) => {
                    table.insert(device, floor).map_err(db_err)?;
                }
                None => {
                    table.remove(device).map_err(db_err)?;
                }
            }
        }
        drop(table);
        // Dropping the table frees its pages at once; it is made again empty.
        txn.delete_table(FLOOR_LOG).map_err(db_err)?;
        txn.open_table(FLOOR_LOG).map_err(db_err)?;
        Ok(true)
    }

    /// Takes in what a committed transaction wrote with [`Floors::write`].
    pub(super) fn committed(&mut self, staged: Staged, folded: bool) {
        if staged.changes.is_empty() {
            return;
        }
        if folded {
            self.unfolded.clear();
            self.logged = 0;
            self.next_log_key = 0;
        } else {
            self.logged += staged.changes.len();
            self.next_log_key += 1;
        }
        for (device, change) in staged.changes {
            match change {
                Some(floor) => {
                    self.current.insert(device.clone(), floor);
                }
                None => {
                    self.current.remove(&device);
                }
            }
            if !folded {
                self.unfolded.insert(device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, DeviceRecord, RedbStore, ReportSeq, Store, StoreError};
    use super::FLOOR_LOG;
    use redb::ReadableTableMetadata;
    use shardline_shared::ids::DeviceId;

    fn log_rows(store: &RedbStore) -> u64 {
        let txn = store.db.begin_read().unwrap();
        txn.open_table(FLOOR_LOG).unwrap().len().unwrap()
    }

    fn report(device: &DeviceId, seq: u64, version: u64) -> Batch {
        Batch {
            report_seqs: vec![ReportSeq {
                device: device.clone(),
                seq,
                version,
            }],
            ..Batch::default()
        }
    }

    fn floor_of(store: &RedbStore, device: &DeviceId) -> (u64, u64) {
        let got = store
            .load_device_records(std::slice::from_ref(device))
            .unwrap();
        (got[0].last_report_seq, got[0].version)
    }

    /// Floors written to the log, folded into the table, and both together
    /// read back the same after a reopen; the version check holds across
    /// all three, and a deleted device starts again from version 0.
    #[test]
    fn floors_read_back_from_the_log_and_after_a_fold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.redb");
        let a = DeviceId::new("floor-a").unwrap();
        let b = DeviceId::new("floor-b").unwrap();
        let mut rec_b = DeviceRecord::new(b.clone(), [2; 32], "basic".into(), None, 5);
        rec_b.version = 1;
        {
            // Folds once the log holds 8 device writes.
            let store = RedbStore::open_folding_at(&path, 8).unwrap();
            let mut rec = DeviceRecord::new(a.clone(), [1; 32], "basic".into(), None, 5);
            rec.version = 1;
            store
                .commit(&Batch {
                    put_devices: vec![rec, rec_b.clone()],
                    ..Batch::default()
                })
                .unwrap();
            for v in 2..=4 {
                store.commit(&report(&a, v * 10, v)).unwrap();
            }
            // 2 + 3 writes: still in the log.
            assert_eq!(log_rows(&store), 4);
            assert_eq!(floor_of(&store, &a), (40, 4));
        }
        let store = RedbStore::open_folding_at(&path, 8).unwrap();
        assert_eq!(floor_of(&store, &a), (40, 4), "replayed from the log");
        assert!(matches!(
            store.commit(&report(&a, 50, 4)),
            Err(StoreError::Conflict { .. })
        ));
        for v in 5..=7 {
            store.commit(&report(&a, v * 10, v)).unwrap();
        }
        // The eighth write folded: the log is empty, the table has it all.
        assert_eq!(log_rows(&store), 0);
        assert_eq!(floor_of(&store, &a), (70, 7));
        store
            .commit(&Batch {
                delete_devices: vec![b.clone()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(log_rows(&store), 1);
        drop(store);
        let store = RedbStore::open_folding_at(&path, 8).unwrap();
        assert_eq!(floor_of(&store, &a), (70, 7), "read from the folded table");
        assert!(store
            .load_device_records(std::slice::from_ref(&b))
            .unwrap()
            .is_empty());
        // The deleted device's floor went with it: version 1 is next again.
        assert!(matches!(
            store.commit(&report(&b, 1, 2)),
            Err(StoreError::Conflict { .. })
        ));
        store
            .commit(&Batch {
                put_devices: vec![rec_b],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(floor_of(&store, &b), (0, 1));
    }

    /// A refused commit changes no floor, in memory or on disk.
    #[test]
    fn a_conflicting_commit_leaves_the_floors_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let a = DeviceId::new("conf-a").unwrap();
        let b = DeviceId::new("conf-b").unwrap();
        let store = RedbStore::open_folding_at(&path, 8).unwrap();
        let mut rec = DeviceRecord::new(a.clone(), [1; 32], "basic".into(), None, 5);
        rec.version = 1;
        store
            .commit(&Batch {
                put_devices: vec![rec],
                ..Batch::default()
            })
            .unwrap();
        // b's write would apply, a's is stale: neither does.
        let mixed = Batch {
            report_seqs: vec![
                ReportSeq {
                    device: b.clone(),
                    seq: 9,
                    version: 1,
                },
                ReportSeq {
                    device: a.clone(),
                    seq: 9,
                    version: 1,
                },
            ],
            ..Batch::default()
        };
        match store.commit(&mixed) {
            Err(StoreError::Conflict { devices }) => assert_eq!(devices, vec![a.clone()]),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(log_rows(&store), 1);
        // b is still at version 0: its first write is version 1.
        store.commit(&report(&b, 9, 1)).unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(floor_of(&store, &a), (0, 1));
    }
}
