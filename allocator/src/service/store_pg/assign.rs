//! The PostgreSQL store's assignment tables (issue 19, migration 5):
//! `assign_servers(id, body)` (each instance's latest heartbeat),
//! `assignments(grp, version, body)` (each group's last object; a write
//! with a lower version than the stored one changes nothing, so versions
//! never go back even with two instances briefly believing they lead) and
//! `assign_history(id, grp, version, body)` (new versions and withdrawals,
//! bounded per group at each write); migration 6: `assign_shortfalls(region,
//! body)` (the current capacity shortfall per region).

use super::conn::{lock, off_runtime};
use super::{pg_err, to_sql, PgStore};
use crate::service::store::{
    dec, enc, AssignmentHistoryRow, ServerBeat, ShortfallRecord, StoreError, StoredAssignment,
};
use shardline_shared::assign::GroupId;

const SQL_BEAT_PUT: &str = "INSERT INTO assign_servers (id, body) VALUES ($1, $2) \
     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body";
const SQL_BEATS: &str = "SELECT id, body FROM assign_servers ORDER BY id";
const SQL_ASSIGN_PUT: &str = "INSERT INTO assignments (grp, version, body) VALUES ($1, $2, $3) \
     ON CONFLICT (grp) DO UPDATE SET version = EXCLUDED.version, body = EXCLUDED.body \
     WHERE assignments.version <= EXCLUDED.version";
const SQL_ASSIGNS: &str = "SELECT grp, body FROM assignments ORDER BY grp";
const SQL_HIST_INSERT: &str = "INSERT INTO assign_history (grp, version, body) VALUES ($1, $2, $3)";
const SQL_HIST_PRUNE: &str = "DELETE FROM assign_history WHERE grp = $1 AND id NOT IN \
     (SELECT id FROM assign_history WHERE grp = $1 ORDER BY id DESC LIMIT $2)";
const SQL_ASSIGN_WITHDRAW: &str = "DELETE FROM assignments WHERE grp = $1 AND version = $2";
const SQL_SHORT_CLEAR: &str = "DELETE FROM assign_shortfalls";
const SQL_SHORT_PUT: &str = "INSERT INTO assign_shortfalls (region, body) VALUES ($1, $2)";
const SQL_SHORTS: &str = "SELECT region, body FROM assign_shortfalls ORDER BY region";
const SQL_HIST: &str = "SELECT body FROM assign_history WHERE grp = $1 ORDER BY id DESC LIMIT $2";

impl PgStore {
    pub(super) fn put_server_beat_pg(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        let body = enc(beat);
        let id = beat.report.id.as_str();
        off_runtime(|| {
            lock(&self.commit).retry("put_server_beat", |conn| {
                let stmt = conn
                    .stmt(SQL_BEAT_PUT)
                    .map_err(|e| pg_err("preparing put_server_beat", e))?;
                conn.client
                    .execute(&stmt, &[&id, &body])
                    .map_err(|e| pg_err("writing a server heartbeat", e))?;
                Ok(())
            })
        })
    }

    pub(super) fn load_server_beats_pg(&self) -> Result<Vec<ServerBeat>, StoreError> {
        self.read("load_server_beats", |conn| {
            let stmt = conn
                .stmt(SQL_BEATS)
                .map_err(|e| pg_err("preparing load_server_beats", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("reading server heartbeats", e))?;
            rows.iter()
                .map(|r| dec(&r.get::<_, String>(0), &r.get::<_, Vec<u8>>(1)))
                .collect()
        })
    }

    pub(super) fn put_assignment_pg(
        &self,
        a: &StoredAssignment,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        let body = enc(a);
        let group = a.assignment.group.as_str();
        let version = to_sql(a.assignment.version);
        let row = a.is_new_version().then(|| enc(&a.history_row()));
        let keep = i64::try_from(max_history.max(1)).unwrap_or(i64::MAX);
        off_runtime(|| {
            lock(&self.commit).retry("put_assignment", |conn| {
                let put = conn
                    .stmt(SQL_ASSIGN_PUT)
                    .map_err(|e| pg_err("preparing put_assignment", e))?;
                let insert = conn
                    .stmt(SQL_HIST_INSERT)
                    .map_err(|e| pg_err("preparing put_assignment", e))?;
                let prune = conn
                    .stmt(SQL_HIST_PRUNE)
                    .map_err(|e| pg_err("preparing put_assignment", e))?;
                let step = |e| pg_err("writing an assignment", e);
                let mut tx = conn.client.transaction().map_err(step)?;
                let written = tx.execute(&put, &[&group, &version, &body]).map_err(step)?;
                if written == 0 {
                    tx.rollback().map_err(step)?;
                    return Ok(false);
                }
                if let Some(row) = &row {
                    tx.execute(&insert, &[&group, &version, row])
                        .map_err(step)?;
                    tx.execute(&prune, &[&group, &keep]).map_err(step)?;
                }
                tx.commit().map_err(step)?;
                Ok(true)
            })
        })
    }

    pub(super) fn withdraw_assignment_pg(
        &self,
        row: &AssignmentHistoryRow,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        let body = enc(row);
        let group = row.assignment.group.as_str();
        let version = to_sql(row.assignment.version);
        let keep = i64::try_from(max_history.max(1)).unwrap_or(i64::MAX);
        off_runtime(|| {
            lock(&self.commit).retry("withdraw_assignment", |conn| {
                let del = conn
                    .stmt(SQL_ASSIGN_WITHDRAW)
                    .map_err(|e| pg_err("preparing withdraw_assignment", e))?;
                let insert = conn
                    .stmt(SQL_HIST_INSERT)
                    .map_err(|e| pg_err("preparing withdraw_assignment", e))?;
                let prune = conn
                    .stmt(SQL_HIST_PRUNE)
                    .map_err(|e| pg_err("preparing withdraw_assignment", e))?;
                let step = |e| pg_err("withdrawing an assignment", e);
                let mut tx = conn.client.transaction().map_err(step)?;
                if tx.execute(&del, &[&group, &version]).map_err(step)? == 0 {
                    tx.rollback().map_err(step)?;
                    return Ok(false);
                }
                tx.execute(&insert, &[&group, &version, &body])
                    .map_err(step)?;
                tx.execute(&prune, &[&group, &keep]).map_err(step)?;
                tx.commit().map_err(step)?;
                Ok(true)
            })
        })
    }

    pub(super) fn put_shortfalls_pg(&self, s: &[ShortfallRecord]) -> Result<(), StoreError> {
        let rows: Vec<(&str, Vec<u8>)> = s.iter().map(|r| (r.region.as_str(), enc(r))).collect();
        off_runtime(|| {
            lock(&self.commit).retry("put_shortfalls", |conn| {
                let clear = conn
                    .stmt(SQL_SHORT_CLEAR)
                    .map_err(|e| pg_err("preparing put_shortfalls", e))?;
                let put = conn
                    .stmt(SQL_SHORT_PUT)
                    .map_err(|e| pg_err("preparing put_shortfalls", e))?;
                let step = |e| pg_err("writing the capacity shortfalls", e);
                let mut tx = conn.client.transaction().map_err(step)?;
                tx.execute(&clear, &[]).map_err(step)?;
                for (region, body) in &rows {
                    tx.execute(&put, &[region, body]).map_err(step)?;
                }
                tx.commit().map_err(step)?;
                Ok(())
            })
        })
    }

    pub(super) fn load_shortfalls_pg(&self) -> Result<Vec<ShortfallRecord>, StoreError> {
        self.read("load_shortfalls", |conn| {
            let stmt = conn
                .stmt(SQL_SHORTS)
                .map_err(|e| pg_err("preparing load_shortfalls", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("reading the capacity shortfalls", e))?;
            rows.iter()
                .map(|r| dec(&r.get::<_, String>(0), &r.get::<_, Vec<u8>>(1)))
                .collect()
        })
    }

    pub(super) fn load_assignments_pg(&self) -> Result<Vec<StoredAssignment>, StoreError> {
        self.read("load_assignments", |conn| {
            let stmt = conn
                .stmt(SQL_ASSIGNS)
                .map_err(|e| pg_err("preparing load_assignments", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("reading assignments", e))?;
            rows.iter()
                .map(|r| dec(&r.get::<_, String>(0), &r.get::<_, Vec<u8>>(1)))
                .collect()
        })
    }

    pub(super) fn load_assignment_history_pg(
        &self,
        group: &GroupId,
        limit: usize,
    ) -> Result<Vec<AssignmentHistoryRow>, StoreError> {
        let g = group.as_str();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("load_assignment_history", |conn| {
            let stmt = conn
                .stmt(SQL_HIST)
                .map_err(|e| pg_err("preparing load_assignment_history", e))?;
            let rows = conn
                .client
                .query(&stmt, &[&g, &limit])
                .map_err(|e| pg_err("reading an assignment history", e))?;
            rows.iter()
                .map(|r| dec(g, &r.get::<_, Vec<u8>>(0)))
                .collect()
        })
    }
}
