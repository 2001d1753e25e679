//! The PostgreSQL store's operator tokens (`operator_tokens(id, body)`,
//! the body holding only the secret's hash) and audit log (`audit(id
//! bigserial, at_ms, actor, target, body)`, bounded at each append). These
//! are written by the API, each call its own transaction on the commit
//! connection; reads use the read connection and always see the database,
//! so a revocation by one instance is seen by the next read of any other.

use super::conn::{lock, off_runtime};
use super::{from_sql, pg_err, to_sql, PgStore};
use crate::service::access::OperatorToken;
use crate::service::audit::{AuditEntry, AuditLimits, AuditQuery, StoredEntry};
use crate::service::store::{dec, enc, StoreError};

const SQL_OP_TOKEN_PUT: &str = "INSERT INTO operator_tokens (id, body) VALUES ($1, $2) \
     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body";
const SQL_OP_TOKEN: &str = "SELECT body FROM operator_tokens WHERE id = $1";
const SQL_OP_TOKENS: &str = "SELECT id, body FROM operator_tokens ORDER BY id";
const SQL_AUDIT_INSERT: &str =
    "INSERT INTO audit (at_ms, actor, target, body) VALUES ($1, $2, $3, $4) RETURNING id";
const SQL_AUDIT_PRUNE_OLD: &str = "DELETE FROM audit WHERE at_ms < $1 AND id <> $2";
/// Ids are unique and increasing, so the rows with an id above `new -
/// max_entries` are at most `max_entries`; this costs the rows it deletes,
/// not a scan of the kept ones (a rolled-back insert's gap only keeps fewer).
const SQL_AUDIT_PRUNE_MANY: &str = "DELETE FROM audit WHERE id <= $1";
const SQL_AUDIT_PUT: &str = "UPDATE audit SET body = $2 WHERE id = $1";
const SQL_AUDIT_QUERY: &str = "SELECT id, body FROM audit \
     WHERE ($1::int8 IS NULL OR at_ms < $1) AND ($2::text IS NULL OR actor = $2) \
       AND ($3::text IS NULL OR target = $3) \
     ORDER BY id DESC LIMIT $4";

impl PgStore {
    pub(super) fn put_operator_token_pg(&self, rec: &OperatorToken) -> Result<(), StoreError> {
        let body = enc(rec);
        off_runtime(|| {
            lock(&self.commit).retry("put_operator_token", |conn| {
                let stmt = conn
                    .stmt(SQL_OP_TOKEN_PUT)
                    .map_err(|e| pg_err("preparing put_operator_token", e))?;
                conn.client
                    .execute(&stmt, &[&rec.id, &body])
                    .map_err(|e| pg_err("writing an operator token", e))?;
                Ok(())
            })
        })
    }

    pub(super) fn load_operator_token_pg(
        &self,
        id: &str,
    ) -> Result<Option<OperatorToken>, StoreError> {
        self.read("load_operator_token", |conn| {
            let stmt = conn
                .stmt(SQL_OP_TOKEN)
                .map_err(|e| pg_err("preparing load_operator_token", e))?;
            let row = conn
                .client
                .query_opt(&stmt, &[&id])
                .map_err(|e| pg_err("reading an operator token", e))?;
            row.map(|r| dec(id, &r.get::<_, Vec<u8>>(0))).transpose()
        })
    }

    pub(super) fn load_operator_tokens_pg(&self) -> Result<Vec<OperatorToken>, StoreError> {
        self.read("load_operator_tokens", |conn| {
            let stmt = conn
                .stmt(SQL_OP_TOKENS)
                .map_err(|e| pg_err("preparing load_operator_tokens", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("reading operator tokens", e))?;
            rows.iter()
                .map(|r| dec(&r.get::<_, String>(0), &r.get::<_, Vec<u8>>(1)))
                .collect()
        })
    }

    pub(super) fn append_audit_pg(
        &self,
        entry: &AuditEntry,
        limits: &AuditLimits,
    ) -> Result<u64, StoreError> {
        let body = enc(entry);
        let at = to_sql(entry.at_ms);
        let min_at = to_sql(limits.min_at_ms);
        // Anything above i64::MAX keeps everything.
        let keep = i64::try_from(limits.max_entries).unwrap_or(i64::MAX);
        off_runtime(|| {
            lock(&self.commit).retry("append_audit", |conn| {
                let insert = conn
                    .stmt(SQL_AUDIT_INSERT)
                    .map_err(|e| pg_err("preparing append_audit", e))?;
                let old = conn
                    .stmt(SQL_AUDIT_PRUNE_OLD)
                    .map_err(|e| pg_err("preparing append_audit", e))?;
                let many = conn
                    .stmt(SQL_AUDIT_PRUNE_MANY)
                    .map_err(|e| pg_err("preparing append_audit", e))?;
                let step = |e| pg_err("appending an audit entry", e);
                let mut tx = conn.client.transaction().map_err(step)?;
                let id: i64 = tx
                    .query_one(&insert, &[&at, &entry.actor, &entry.target, &body])
                    .map_err(step)?
                    .get(0);
                tx.execute(&old, &[&min_at, &id]).map_err(step)?;
                tx.execute(&many, &[&id.saturating_sub(keep)])
                    .map_err(step)?;
                tx.commit().map_err(step)?;
                Ok(from_sql(id))
            })
        })
    }

    pub(super) fn put_audit_pg(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        let body = enc(entry);
        let id = to_sql(id);
        off_runtime(|| {
            lock(&self.commit).retry("put_audit", |conn| {
                let stmt = conn
                    .stmt(SQL_AUDIT_PUT)
                    .map_err(|e| pg_err("preparing put_audit", e))?;
                conn.client
                    .execute(&stmt, &[&id, &body])
                    .map_err(|e| pg_err("rewriting an audit entry", e))?;
                Ok(())
            })
        })
    }

    pub(super) fn load_audit_pg(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError> {
        let before = q.before_ms.map(to_sql);
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        self.read("load_audit", |conn| {
            let stmt = conn
                .stmt(SQL_AUDIT_QUERY)
                .map_err(|e| pg_err("preparing load_audit", e))?;
            let rows = conn
                .client
                .query(&stmt, &[&before, &q.actor, &q.target, &limit])
                .map_err(|e| pg_err("reading the audit log", e))?;
            rows.iter()
                .map(|r| {
                    let id = from_sql(r.get(0));
                    let entry = dec(&format!("audit/{id}"), &r.get::<_, Vec<u8>>(1))?;
                    Ok(StoredEntry { id, entry })
                })
                .collect()
        })
    }
}
