//! The embedded store's tables for access and audit: operator tokens
//! (`operator_tokens`: id → record, which holds only the secret's hash) and
//! the audit log (`audit`: id → entry, ids increasing). Each call is its own
//! write transaction (fsync on commit), separate from the core's batches:
//! these are written by the API, not by the core.

use super::{db_err, dec, enc, RedbStore, StoreError};
use crate::service::access::OperatorToken;
use crate::service::audit::{AuditEntry, AuditLimits, AuditQuery, StoredEntry};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

const OPERATOR_TOKENS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("operator_tokens");
const AUDIT: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("audit");

fn audit_key(id: u64) -> String {
    format!("audit/{id}")
}

impl RedbStore {
    pub(super) fn put_operator_token_redb(&self, rec: &OperatorToken) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(OPERATOR_TOKENS).map_err(db_err)?;
            t.insert(rec.id.as_str(), enc(rec).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub(super) fn load_operator_token_redb(
        &self,
        id: &str,
    ) -> Result<Option<OperatorToken>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(OPERATOR_TOKENS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        t.get(id)
            .map_err(db_err)?
            .map(|v| dec(id, v.value()))
            .transpose()
    }

    pub(super) fn load_operator_tokens_redb(&self) -> Result<Vec<OperatorToken>, StoreError> {
        let rows = self.load_table(OPERATOR_TOKENS)?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    pub(super) fn append_audit_redb(
        &self,
        entry: &AuditEntry,
        limits: &AuditLimits,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut t = txn.open_table(AUDIT).map_err(db_err)?;
            let id = t
                .last()
                .map_err(db_err)?
                .map_or(1, |(k, _)| k.value().saturating_add(1));
            t.insert(id, enc(entry).as_slice()).map_err(db_err)?;
            // The bounds, oldest first: too many, or too old.
            while t.len().map_err(db_err)? > limits.max_entries {
                t.pop_first().map_err(db_err)?;
            }
            loop {
                let old = match t.first().map_err(db_err)? {
                    Some((k, v)) if k.value() != id => {
                        dec::<AuditEntry>(&audit_key(k.value()), v.value())?.at_ms
                            < limits.min_at_ms
                    }
                    _ => false,
                };
                if !old {
                    break;
                }
                t.pop_first().map_err(db_err)?;
            }
            id
        };
        txn.commit().map_err(db_err)?;
        Ok(id)
    }

    pub(super) fn put_audit_redb(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(AUDIT).map_err(db_err)?;
            // Only an entry still kept: the bounds may have dropped it.
            if t.get(id).map_err(db_err)?.is_some() {
                t.insert(id, enc(entry).as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    pub(super) fn load_audit_redb(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(AUDIT) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)?.rev() {
            if out.len() >= q.limit {
                break;
            }
            let (k, v) = row.map_err(db_err)?;
            let id = k.value();
            let entry: AuditEntry = dec(&audit_key(id), v.value())?;
            if q.before_ms.is_some_and(|b| entry.at_ms >= b)
                || q.actor.as_ref().is_some_and(|a| *a != entry.actor)
                || q.target.as_ref().is_some_and(|t| *t != entry.target)
            {
                continue;
            }
            out.push(StoredEntry { id, entry });
        }
        Ok(out)
    }
}
