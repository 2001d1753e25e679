//! The PostgreSQL store's device history: rows `(id, device, at_ms, kind,
//! body)` with `body` in the embedded store's encoding, appended in the
//! batch's transaction, read newest first by `(device, at_ms)`, pruned by
//! age and by count per device.

use super::{dec, enc, pg_err, to_sql, Conn, StoreError};
use shardline_allocator_core::history::{
    HistoryEntry, HistoryEvent, HistoryQuery, MAX_HISTORY_READ,
};
use shardline_shared::ids::DeviceId;

pub(super) const SQL_HISTORY_PUT: &str = "INSERT INTO history (device, at_ms, kind, body) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::bytea[])";
const SQL_HISTORY_LOAD: &str = "SELECT at_ms, body FROM history \
     WHERE device = $1 AND at_ms >= $2 AND at_ms < $3 AND ($4::text IS NULL OR kind = $4) \
     ORDER BY at_ms DESC, id DESC LIMIT $5";
const SQL_HISTORY_PRUNE_AGE: &str = "DELETE FROM history WHERE at_ms < $1";
const SQL_HISTORY_PRUNE_COUNT: &str = "DELETE FROM history WHERE id IN (\
     SELECT id FROM (SELECT id, row_number() OVER \
       (PARTITION BY device ORDER BY at_ms DESC, id DESC) AS n FROM history) r \
     WHERE r.n > $1)";

/// A batch's history as statement arguments.
#[derive(Default)]
pub(super) struct HistoryRows {
    pub device: Vec<String>,
    pub at_ms: Vec<i64>,
    pub kind: Vec<String>,
    pub body: Vec<Vec<u8>>,
}

impl HistoryRows {
    pub(super) fn of(entries: &[HistoryEntry]) -> Self {
        let mut rows = Self::default();
        for e in entries {
            rows.device.push(e.device.as_str().to_owned());
            // Times are ordered in SQL: they stay far below i64::MAX.
            rows.at_ms.push(e.at_ms.min(i64::MAX as u64) as i64);
            rows.kind.push(e.event.kind().as_str().to_owned());
            rows.body.push(enc(&e.event));
        }
        rows
    }
}

pub(super) fn load(
    conn: &mut Conn,
    device: &DeviceId,
    query: &HistoryQuery,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let stmt = conn
        .stmt(SQL_HISTORY_LOAD)
        .map_err(|e| pg_err("preparing load_history", e))?;
    let since = query.since_ms.min(i64::MAX as u64) as i64;
    let before = query.before_ms.unwrap_or(u64::MAX).min(i64::MAX as u64) as i64;
    let kind = query.kind.map(|k| k.as_str().to_owned());
    let limit = query.limit.min(MAX_HISTORY_READ) as i64;
    let rows = conn
        .client
        .query(&stmt, &[&device.as_str(), &since, &before, &kind, &limit])
        .map_err(|e| pg_err("loading history", e))?;
    rows.iter()
        .map(|r| {
            let at_ms: i64 = r.get(0);
            let body: Vec<u8> = r.get(1);
            let event: HistoryEvent = dec(device.as_str(), &body)?;
            Ok(HistoryEntry {
                device: device.clone(),
                at_ms: at_ms.max(0) as u64,
                event,
            })
        })
        .collect()
}

pub(super) fn prune(
    conn: &mut Conn,
    before_ms: u64,
    max_per_device: usize,
) -> Result<u64, StoreError> {
    let by_age = conn
        .stmt(SQL_HISTORY_PRUNE_AGE)
        .map_err(|e| pg_err("preparing prune_history", e))?;
    let by_count = conn
        .stmt(SQL_HISTORY_PRUNE_COUNT)
        .map_err(|e| pg_err("preparing prune_history", e))?;
    let old = conn
        .client
        .execute(&by_age, &[&to_sql(before_ms.min(i64::MAX as u64))])
        .map_err(|e| pg_err("pruning old history", e))?;
    let many = conn
        .client
        .execute(
            &by_count,
            &[&(max_per_device.min(i64::MAX as usize) as i64)],
        )
        .map_err(|e| pg_err("pruning history beyond the per-device bound", e))?;
    Ok(old + many)
}
