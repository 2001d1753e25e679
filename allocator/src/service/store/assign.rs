//! The embedded store's assignment tables (issue 19): each instance's
//! latest heartbeat (`assign_servers`: server id → [`ServerBeat`]), each
//! group's last published object (`assignments`: group → [`StoredAssignment`])
//! and the history of versions (`assign_history`: (group, version, at_ms) →
//! [`AssignmentHistoryRow`], bounded per group). Each call is its own write
//! transaction (fsync on commit): the driver writes these, not the core.

use super::{db_err, dec, enc, RedbStore, StoreError};
use super::{AssignmentHistoryRow, ServerBeat, StoredAssignment};
use redb::{ReadableTable, TableDefinition, TableError};
use shardline_shared::assign::GroupId;

const SERVERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("assign_servers");
const ASSIGNMENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("assignments");
const HISTORY: TableDefinition<'_, (&str, u64, u64), &[u8]> =
    TableDefinition::new("assign_history");

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
            let stored: Option<StoredAssignment> = t
                .get(group)
                .map_err(db_err)?
                .map(|v| dec(group, v.value()))
                .transpose()?;
            if stored.is_some_and(|s| s.assignment.version > a.assignment.version) {
                // Versions never go back: a newer one is already stored.
                return Ok(false);
            }
            t.insert(group, enc(a).as_slice()).map_err(db_err)?;
            if a.is_new_version() {
                let mut h = txn.open_table(HISTORY).map_err(db_err)?;
                h.insert(
                    (group, a.assignment.version, a.at_ms),
                    enc(&a.history_row()).as_slice(),
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
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
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
