//! The embedded store's assignment tables (issue 19): each instance's
//! latest heartbeat (`assign_servers`: server id → [`ServerBeat`]), each
//! group's last published object (`assignments`: group → [`StoredAssignment`])
//! and the history of versions (`assign_history`: (group, version, at_ms) →
//! [`AssignmentHistoryRow`], bounded per group; withdrawals too) and the
//! current capacity shortfalls (`assign_shortfalls`: region →
//! [`ShortfallRecord`]). Each call is its own write transaction (fsync on
//! commit): the driver writes these, not the core.

use super::{db_err, dec, enc, RedbStore, StoreError};
use super::{AssignmentHistoryRow, ServerBeat, ShortfallRecord, StoredAssignment};
use redb::{ReadableTable, TableDefinition, TableError};
use shardline_shared::assign::GroupId;

const SERVERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("assign_servers");
const ASSIGNMENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("assignments");
const HISTORY: TableDefinition<'_, (&str, u64, u64), &[u8]> =
    TableDefinition::new("assign_history");
const SHORTFALLS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("assign_shortfalls");

/// The object stored for `group`, if any (read inside a write transaction).
fn stored_assignment(
    t: &redb::Table<'_, &str, &[u8]>,
    group: &str,
) -> Result<Option<StoredAssignment>, StoreError> {
    t.get(group)
        .map_err(db_err)?
        .map(|v| dec(group, v.value()))
        .transpose()
}

/// Appends a history row and drops the group's oldest beyond `max_history`.
fn append_history(
    txn: &redb::WriteTransaction,
    group: &str,
    row: &AssignmentHistoryRow,
    max_history: usize,
) -> Result<(), StoreError> {
    let mut h = txn.open_table(HISTORY).map_err(db_err)?;
    h.insert(
        (group, row.assignment.version, row.at_ms),
        enc(row).as_slice(),
    )
    .map_err(db_err)?;
    // The bound: the oldest of this group's versions go first.
    let keys: Vec<(u64, u64)> = h
        .range((group, 0, 0)..=(group, u64::MAX, u64::MAX))
        .map_err(db_err)?
        .map(|r| r.map(|(k, _)| (k.value().1, k.value().2)))
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    let excess = keys.len().saturating_sub(max_history.max(1));
    for (v, at) in keys.into_iter().take(excess) {
        h.remove((group, v, at)).map_err(db_err)?;
    }
    Ok(())
}

impl RedbStore {
    pub(super) fn put_server_beat_redb(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(SERVERS).map_err(db_err)?;
            t.insert(beat.report.id.as_str(), enc(beat).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub(super) fn load_server_beats_redb(&self) -> Result<Vec<ServerBeat>, StoreError> {
        let rows = self.load_table(SERVERS)?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    pub(super) fn put_assignment_redb(
        &self,
        a: &StoredAssignment,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        let group = a.assignment.group.as_str();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(ASSIGNMENTS).map_err(db_err)?;
            let stored = stored_assignment(&t, group)?;
            if stored.is_some_and(|s| s.assignment.version > a.assignment.version) {
                // Versions never go back: a newer one is already stored.
                return Ok(false);
            }
            t.insert(group, enc(a).as_slice()).map_err(db_err)?;
        }
        if a.is_new_version() {
            append_history(&txn, group, &a.history_row(), max_history)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    pub(super) fn withdraw_assignment_redb(
        &self,
        row: &AssignmentHistoryRow,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        let group = row.assignment.group.as_str();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(ASSIGNMENTS).map_err(db_err)?;
            let stored = stored_assignment(&t, group)?;
            if stored.is_none_or(|s| s.assignment.version != row.assignment.version) {
                return Ok(false);
            }
            t.remove(group).map_err(db_err)?;
        }
        append_history(&txn, group, row, max_history)?;
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    pub(super) fn put_shortfalls_redb(&self, s: &[ShortfallRecord]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(SHORTFALLS).map_err(db_err)?;
            let old: Vec<String> = t
                .iter()
                .map_err(db_err)?
                .map(|r| r.map(|(k, _)| k.value().to_owned()))
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            for k in old {
                t.remove(k.as_str()).map_err(db_err)?;
            }
            for r in s {
                t.insert(r.region.as_str(), enc(r).as_slice())
                    .map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    pub(super) fn load_shortfalls_redb(&self) -> Result<Vec<ShortfallRecord>, StoreError> {
        let rows = self.load_table(SHORTFALLS)?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    pub(super) fn load_assignments_redb(&self) -> Result<Vec<StoredAssignment>, StoreError> {
        let rows = self.load_table(ASSIGNMENTS)?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    pub(super) fn load_assignment_history_redb(
        &self,
        group: &GroupId,
        limit: usize,
    ) -> Result<Vec<AssignmentHistoryRow>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let h = match txn.open_table(HISTORY) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let g = group.as_str();
        let mut out = Vec::new();
        for row in h
            .range((g, 0, 0)..=(g, u64::MAX, u64::MAX))
            .map_err(db_err)?
            .rev()
            .take(limit)
        {
            let (_, v) = row.map_err(db_err)?;
            out.push(dec(g, v.value())?);
        }
        Ok(out)
    }
}
