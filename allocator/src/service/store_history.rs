//! The embedded store's device history (see
//! [`shardline_allocator_core::history`]): one redb table keyed by
//! `(device, at_ms, n)`, so one device's entries are one ordered range and
//! reading its newest is a reverse range scan. `n` is a counter kept in the
//! same transaction, so entries of equal time never overwrite each other.

use super::store::{db_err, dec, enc, StoreError};
use shardline_allocator_core::history::{
    HistoryEntry, HistoryEvent, HistoryQuery, MAX_HISTORY_READ,
};
use shardline_shared::ids::DeviceId;

pub(super) const HISTORY: redb::TableDefinition<'_, (&str, u64, u64), &[u8]> =
    redb::TableDefinition::new("history");
const HISTORY_NEXT: redb::TableDefinition<'_, &str, u64> =
    redb::TableDefinition::new("history_next");

/// Appends entries inside the caller's write transaction.
pub(super) fn append(
    txn: &redb::WriteTransaction,
    entries: &[HistoryEntry],
) -> Result<(), StoreError> {
    use redb::ReadableTable;
    if entries.is_empty() {
        return Ok(());
    }
    let mut next_t = txn.open_table(HISTORY_NEXT).map_err(db_err)?;
    let mut next = next_t.get("next").map_err(db_err)?.map_or(0, |v| v.value());
    let mut t = txn.open_table(HISTORY).map_err(db_err)?;
    for e in entries {
        t.insert((e.device.as_str(), e.at_ms, next), enc(&e.event).as_slice())
            .map_err(db_err)?;
        next += 1;
    }
    next_t.insert("next", next).map_err(db_err)?;
    Ok(())
}

/// One device's entries matching `query`, newest first.
pub(super) fn load(
    db: &redb::Database,
    device: &DeviceId,
    query: &HistoryQuery,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let t = match txn.open_table(HISTORY) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(db_err(e)),
    };
    let id = device.as_str();
    let end = query
        .before_ms
        .map_or((u64::MAX, u64::MAX), |b| (b.saturating_sub(1), u64::MAX));
    if query.before_ms == Some(0) {
        return Ok(Vec::new());
    }
    let limit = query.limit.min(MAX_HISTORY_READ);
    let mut out = Vec::new();
    let range = t
        .range((id, query.since_ms, 0)..=(id, end.0, end.1))
        .map_err(db_err)?;
    for row in range.rev() {
        if out.len() >= limit {
            break;
        }
        let (k, v) = row.map_err(db_err)?;
        let (_, at_ms, _) = k.value();
        let event: HistoryEvent = dec(id, v.value())?;
        let entry = HistoryEntry {
            device: device.clone(),
            at_ms,
            event,
        };
        if query.matches(&entry) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Deletes entries older than `before_ms` and each device's beyond its
/// newest `max_per_device`; returns how many went.
pub(super) fn prune(
    db: &redb::Database,
    before_ms: u64,
    max_per_device: usize,
) -> Result<u64, StoreError> {
    use redb::ReadableTable;
    let txn = db.begin_write().map_err(db_err)?;
    let removed = {
        let mut t = txn.open_table(HISTORY).map_err(db_err)?;
        // Newest first within each device: count, and mark what is too old
        // or too many.
        let mut doomed: Vec<(String, u64, u64)> = Vec::new();
        let mut current: Option<String> = None;
        let mut kept = 0usize;
        for row in t.iter().map_err(db_err)?.rev() {
            let (k, _) = row.map_err(db_err)?;
            let (device, at_ms, n) = k.value();
            if current.as_deref() != Some(device) {
                current = Some(device.to_owned());
                kept = 0;
            }
            if at_ms < before_ms || kept >= max_per_device {
                doomed.push((device.to_owned(), at_ms, n));
            } else {
                kept += 1;
            }
        }
        for (device, at_ms, n) in &doomed {
            t.remove((device.as_str(), *at_ms, *n)).map_err(db_err)?;
        }
        doomed.len() as u64
    };
    txn.commit().map_err(db_err)?;
    Ok(removed)
}
