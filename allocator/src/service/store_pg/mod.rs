//! [`PgStore`]: the [`Store`] shared by several allocator instances, in
//! PostgreSQL (DESIGN.md "Scale": N instances behind a clustered broker
//! share one store; any instance can serve any device).
//!
//! Schema (created or migrated at connect, under a transaction-scoped
//! advisory lock so instances starting together do not race):
//! - `shardline_schema_version(version)`: one row, the schema this build
//!   migrated to; a newer schema than the build knows is refused.
//! - `devices(id, version, last_report_seq, body)`: `body` is the record in
//!   the embedded store's encoding, `version` the write version every
//!   conditional write checks, `last_report_seq` the report floor that
//!   floor-only writes move without rewriting the body.
//! - `tokens(hash, body)`, `meta(key, body)`.
//! - `operator_tokens(id, body)`, `audit(id, at_ms, actor, target, body)`:
//!   access and audit (see `access`).
//!
//! `u64` versions and sequence numbers are stored bit for bit in `bigint`
//! (values above `i64::MAX` read back unchanged; SQL never orders them).
//!
//! Three connections, each behind its own mutex, so a slow group commit
//! (the store thread) does not hold up reads (the core thread), and the
//! leadership lock lives on a session of its own whose end (process exit,
//! crash, lost network) releases it. A broken connection is reopened and
//! the call tried once more, except after a connection lost during COMMIT:
//! then whether it committed is unknown, the error is returned, and the
//! service's retry sees either success or a [`StoreError::Conflict`] naming
//! its own earlier write (safe: nothing is published before a commit is
//! known, and numbers reserved by a commit are never reused).
//!
//! The `postgres` client is synchronous and drives a private tokio runtime,
//! which must not run inside another runtime's context; calls made from one
//! (the service opens its store in an async fn) run on a scoped helper
//! thread instead. No TLS to the database yet: use a local socket, a
//! loopback/VPN link or a TLS-terminating proxy.

use super::access::OperatorToken;
use super::audit::{AuditEntry, AuditLimits, AuditQuery, StoredEntry};
use super::store::{
    dec, enc, Batch, DeviceRecord, HistoryEntry, HistoryQuery, Meta, Store, StoreError,
    TokenRecord, Tombstone,
};
use super::store::{AssignmentHistoryRow, ServerBeat, ShortfallRecord, StoredAssignment};
use postgres::error::SqlState;
use postgres::{Client, Statement};
use shardline_shared::ids::DeviceId;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

mod access;
mod assign;
mod conn;
mod history;
mod sql;

use conn::{lock, off_runtime, prepared, Conn, Link};
use sql::*;

/// `u64` ⇒ `bigint`, bit for bit (reversed by [`from_sql`]).
fn to_sql(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn from_sql(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

fn pg_err(what: impl Into<String>, source: postgres::Error) -> StoreError {
    StoreError::Pg {
        what: what.into(),
        source: Box::new(source),
    }
}

/// Whether `e` means the connection is gone (reopen it), rather than a
/// statement that failed on a working one.
fn is_broken(e: &postgres::Error, client: &Client) -> bool {
    e.is_closed()
        || client.is_closed()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        )
        || (e.as_db_error().is_none()
            && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()))
}

/// A transaction the server rolled back that can simply run again.
fn is_retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// The lead connection and whether its session holds the lead lock.
struct Lead {
    link: Link,
    held: bool,
}

/// The PostgreSQL [`Store`]: see the module documentation.
pub struct PgStore {
    commit: Mutex<Link>,
    read: Mutex<Link>,
    lead: Mutex<Lead>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a session blocks on the client's runtime: not on a tokio
        // thread. Closing the lead session releases the lead at once.
        let links = [
            self.commit
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .conn
                .take(),
            self.read
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .conn
                .take(),
            self.lead
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .link
                .conn
                .take(),
        ];
        off_runtime(move || drop(links));
    }
}

/// Owned, SQL-typed arguments of one conditional statement.
#[derive(Default)]
struct Rows {
    ids: Vec<String>,
    prev: Vec<i64>,
    version: Vec<i64>,
    seq: Vec<i64>,
    body: Vec<Vec<u8>>,
}

impl Rows {
    fn push(&mut self, id: &DeviceId, version: u64, seq: u64, body: Option<Vec<u8>>) {
        self.ids.push(id.as_str().to_owned());
        self.prev.push(to_sql(version.saturating_sub(1)));
        self.version.push(to_sql(version));
        self.seq.push(to_sql(seq));
        if let Some(b) = body {
            self.body.push(b);
        }
    }
}

/// One batch turned into statement arguments (done before taking the
/// commit connection: encoding needs no lock).
struct Plan {
    create: Rows,
    put: Rows,
    floor: Rows,
    delete: Vec<String>,
    token_put: (Vec<String>, Vec<Vec<u8>>),
    token_delete: Vec<String>,
    meta: Option<Vec<u8>>,
    tomb_put: (Vec<String>, Vec<Vec<u8>>),
    tomb_delete: Vec<String>,
    health: Option<Vec<u8>>,
    history: history::HistoryRows,
    rollouts: Option<Vec<u8>>,
    diagnostics: (Vec<String>, Vec<Vec<u8>>),
    diagnostics_deleted: Vec<String>,
    /// Writes refused without asking the database (version 0 is never a
    /// valid written version).
    invalid: Vec<DeviceId>,
}

impl Plan {
    fn of(batch: &Batch) -> Plan {
        let mut plan = Plan {
            create: Rows::default(),
            put: Rows::default(),
            floor: Rows::default(),
            delete: batch
                .delete_devices
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect(),
            token_put: (Vec::new(), Vec::new()),
            token_delete: Vec::new(),
            meta: batch.meta.as_ref().map(enc),
            tomb_put: (Vec::new(), Vec::new()),
            tomb_delete: Vec::new(),
            health: batch.catalog_health.clone(),
            history: history::HistoryRows::of(&batch.history),
            rollouts: batch.rollouts.clone(),
            diagnostics: batch
                .diagnostics
                .iter()
                .filter(|(_, b)| !b.is_empty())
                .map(|(d, b)| (d.as_str().to_owned(), b.clone()))
                .unzip(),
            diagnostics_deleted: batch
                .diagnostics
                .iter()
                .filter(|(_, b)| b.is_empty())
                .map(|(d, _)| d.as_str().to_owned())
                .collect(),
            invalid: Vec::new(),
        };
        let mut tombs: HashMap<&str, Option<&Tombstone>> = HashMap::new();
        for (id, t) in &batch.tombstones {
            tombs.insert(id.as_str(), t.as_ref());
        }
        for (id, t) in tombs {
            match t {
                Some(t) => {
                    plan.tomb_put.0.push(id.to_owned());
                    plan.tomb_put.1.push(enc(t));
                }
                None => plan.tomb_delete.push(id.to_owned()),
            }
        }
        for rec in &batch.put_devices {
            match rec.version {
                0 => plan.invalid.push(rec.device.clone()),
                1 => plan
                    .create
                    .push(&rec.device, 1, rec.last_report_seq, Some(enc(rec))),
                v => plan
                    .put
                    .push(&rec.device, v, rec.last_report_seq, Some(enc(rec))),
            }
        }
        for w in &batch.report_seqs {
            if w.version == 0 {
                plan.invalid.push(w.device.clone());
            } else {
                // A floor write to an absent device (version 1) finds no
                // row and conflicts: the device was deleted meanwhile.
                plan.floor.push(&w.device, w.version, w.seq, None);
            }
        }
        // Only the last write of a token in a batch counts (and one upsert
        // statement may not touch a row twice).
        let mut last: HashMap<&str, Option<&TokenRecord>> = HashMap::new();
        for (hash, rec) in &batch.tokens {
            last.insert(hash.as_str(), rec.as_ref());
        }
        for (hash, rec) in last {
            match rec {
                Some(rec) => {
                    plan.token_put.0.push(hash.to_owned());
                    plan.token_put.1.push(enc(rec));
                }
                None => plan.token_delete.push(hash.to_owned()),
            }
        }
        plan
    }
}

/// Where a commit attempt failed.
enum Failed {
    /// Before COMMIT was sent: the server rolled the transaction back.
    Before(postgres::Error),
    /// While COMMIT was in flight: the outcome is unknown if the connection
    /// broke.
    AtCommit(postgres::Error),
}

/// Runs one conditional statement and records the devices it did not write.
fn conditional(
    tx: &mut postgres::Transaction<'_>,
    statements: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
    ids: &[String],
    conflicts: &mut Vec<DeviceId>,
) -> Result<(), postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let stmt = prepared(tx, statements, sql)?;
    let written: HashSet<String> = tx
        .query(&stmt, params)?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    for id in ids.iter().filter(|id| !written.contains(id.as_str())) {
        // Ids came from `DeviceId`s, so they parse back.
        if let Ok(d) = DeviceId::new(id) {
            if !conflicts.contains(&d) {
                conflicts.push(d);
            }
        }
    }
    Ok(())
}

/// One attempt at a group commit: `Ok(conflicts)` (empty = committed).
fn apply(conn: &mut Conn, plans: &[Plan]) -> Result<Vec<DeviceId>, Failed> {
    let Conn { client, statements } = conn;
    let mut tx = client.transaction().map_err(Failed::Before)?;
    let mut conflicts: Vec<DeviceId> = Vec::new();
    for plan in plans {
        for d in &plan.invalid {
            if !conflicts.contains(d) {
                conflicts.push(d.clone());
            }
        }
        let c = &plan.create;
        conditional(
            &mut tx,
            statements,
            SQL_CREATE,
            &[&c.ids, &c.version, &c.seq, &c.body],
            &c.ids,
            &mut conflicts,
        )
        .map_err(Failed::Before)?;
        let p = &plan.put;
        conditional(
            &mut tx,
            statements,
            SQL_PUT,
            &[&p.ids, &p.prev, &p.version, &p.seq, &p.body],
            &p.ids,
            &mut conflicts,
        )
        .map_err(Failed::Before)?;
        let f = &plan.floor;
        conditional(
            &mut tx,
            statements,
            SQL_FLOOR,
            &[&f.ids, &f.prev, &f.version, &f.seq],
            &f.ids,
            &mut conflicts,
        )
        .map_err(Failed::Before)?;
        let mut exec = |sql: &'static str,
                        params: &[&(dyn postgres::types::ToSql + Sync)]|
         -> Result<(), Failed> {
            let stmt = prepared(&mut tx, statements, sql).map_err(Failed::Before)?;
            tx.execute(&stmt, params).map_err(Failed::Before)?;
            Ok(())
        };
        if !plan.delete.is_empty() {
            exec(SQL_DELETE, &[&plan.delete])?;
        }
        if !plan.token_put.0.is_empty() {
            exec(SQL_TOKEN_PUT, &[&plan.token_put.0, &plan.token_put.1])?;
        }
        if !plan.token_delete.is_empty() {
            exec(SQL_TOKEN_DELETE, &[&plan.token_delete])?;
        }
        if let Some(meta) = &plan.meta {
            exec(SQL_META_PUT, &[meta])?;
        }
        if !plan.tomb_put.0.is_empty() {
            exec(SQL_TOMB_PUT, &[&plan.tomb_put.0, &plan.tomb_put.1])?;
        }
        if !plan.tomb_delete.is_empty() {
            exec(SQL_TOMB_DELETE, &[&plan.tomb_delete])?;
        }
        if let Some(h) = &plan.health {
            exec(SQL_HEALTH_PUT, &[h])?;
        }
        let h = &plan.history;
        if !h.device.is_empty() {
            exec(
                history::SQL_HISTORY_PUT,
                &[&h.device, &h.at_ms, &h.kind, &h.body],
            )?;
        }
        if let Some(r) = &plan.rollouts {
            exec(SQL_ROLLOUTS_PUT, &[r])?;
        }
        if !plan.diagnostics.0.is_empty() {
            exec(SQL_DIAG_PUT, &[&plan.diagnostics.0, &plan.diagnostics.1])?;
        }
        if !plan.diagnostics_deleted.is_empty() {
            exec(SQL_DIAG_DELETE, &[&plan.diagnostics_deleted])?;
        }
    }
    if !conflicts.is_empty() {
        if let Err(e) = tx.rollback() {
            // Nothing was committed either way; the broken session is
            // noticed and reopened by the next call.
            tracing::warn!(error = %e, "PostgreSQL rollback after a conflict failed");
        }
        return Ok(conflicts);
    }
    tx.commit().map_err(Failed::AtCommit)?;
    Ok(conflicts)
}

/// A device row as loaded.
fn record_of(row: &postgres::Row) -> Result<DeviceRecord, StoreError> {
    let id: String = row.get(0);
    let body: Vec<u8> = row.get(3);
    let mut rec: DeviceRecord = dec(&id, &body)?;
    rec.version = from_sql(row.get(1));
    rec.last_report_seq = rec.last_report_seq.max(from_sql(row.get(2)));
    Ok(rec)
}

fn device_id(id: &str) -> Result<DeviceId, StoreError> {
    DeviceId::new(id).map_err(|e| StoreError::Corrupt {
        key: id.to_owned(),
        message: e.to_string(),
    })
}

/// Creates or migrates the schema (serialised between instances).
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let step = |what: &'static str| move |e: postgres::Error| pg_err(what, e);
    let mut tx = client
        .transaction()
        .map_err(step("starting the schema check"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .map_err(step("locking the schema"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS shardline_schema_version (\
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
             version integer NOT NULL)",
    )
    .map_err(step("creating shardline_schema_version"))?;
    let current: i32 = tx
        .query_opt("SELECT version FROM shardline_schema_version", &[])
        .map_err(step("reading the schema version"))?
        .map_or(0, |r| r.get(0));
    if current > SCHEMA_VERSION {
        return Err(StoreError::Corrupt {
            key: "shardline_schema_version".into(),
            message: format!(
                "the database has schema version {current}, this allocator knows up to \
                 {SCHEMA_VERSION}: upgrade the allocator"
            ),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        tx.batch_execute(sql)
            .map_err(|e| pg_err(format!("migrating the schema to version {}", i + 1), e))?;
    }
    if current < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO shardline_schema_version (version) VALUES ($1) \
             ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version",
            &[&SCHEMA_VERSION],
        )
        .map_err(step("recording the schema version"))?;
        tracing::info!(
            from = current,
            to = SCHEMA_VERSION,
            "PostgreSQL store schema migrated"
        );
    }
    tx.commit().map_err(step("committing the schema"))?;
    Ok(())
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`,
    /// libpq-style key=value also accepted), creating or migrating the
    /// schema. Fails if the database is unreachable.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| pg_err("parsing the store url", e))?;
        // Defaults that let a lost server be noticed in seconds, unless the
        // url chose otherwise.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(10));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(2));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
        if config.get_application_name().is_none() {
            config.application_name("shardline-allocator");
        }
        off_runtime(move || {
            let mut commit = Link::open("commit", &config)?;
            if let Some(conn) = commit.conn.as_mut() {
                migrate(&mut conn.client)?;
            }
            let read = Link::open("read", &config)?;
            let lead = Link::open("lead", &config)?;
            Ok(PgStore {
                commit: Mutex::new(commit),
                read: Mutex::new(read),
                lead: Mutex::new(Lead {
                    link: lead,
                    held: false,
                }),
            })
        })
    }

    /// A read on the read connection (reconnecting once).
    fn read<T: Send>(
        &self,
        what: &'static str,
        f: impl FnMut(&mut Conn) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_runtime(|| lock(&self.read).retry(what, f))
    }

    fn lead_now(lead: &mut Lead) -> Result<bool, StoreError> {
        if lead.held {
            // The lock lives as long as the session: a round trip proves it.
            match lead
                .link
                .conn
                .as_mut()
                .map(|c| c.client.simple_query("SELECT 1"))
            {
                Some(Ok(_)) => return Ok(true),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "lost the store session holding the lead");
                }
                None => {}
            }
            // Closing the session drops the lock in case it still lives.
            lead.held = false;
            lead.link.conn = None;
        }
        let try_lock = |conn: &mut Conn| -> Result<bool, StoreError> {
            let stmt = conn
                .stmt("SELECT pg_try_advisory_lock($1)")
                .map_err(|e| pg_err("preparing the lead lock", e))?;
            let row = conn
                .client
                .query_one(&stmt, &[&LEAD_LOCK_KEY])
                .map_err(|e| pg_err("taking the lead lock", e))?;
            Ok(row.get(0))
        };
        match lead.link.retry("try_lead", try_lock) {
            Ok(held) => {
                if held {
                    tracing::info!("took the fleet-wide lead");
                }
                lead.held = held;
                Ok(held)
            }
            Err(e) => {
                let unreachable = match &e {
                    StoreError::Pg { source, .. } => {
                        source.as_db_error().is_none()
                            || lead.link.conn.as_ref().is_none_or(|c| c.client.is_closed())
                    }
                    _ => false,
                };
                if unreachable {
                    // An instance that cannot reach the store must not lead.
                    tracing::warn!(error = %e, "store unreachable: not leading");
                    lead.link.conn = None;
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl Store for PgStore {
    fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read("load_devices", |conn| {
            let stmt = conn
                .stmt(SQL_LOAD_ALL)
                .map_err(|e| pg_err("preparing load_devices", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("loading devices", e))?;
            rows.iter().map(record_of).collect()
        })
    }

    fn load_device_records(&self, devices: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        let mut by_id: HashMap<String, DeviceRecord> =
            self.read("load_device_records", |conn| {
                let stmt = conn
                    .stmt(SQL_LOAD_SOME)
                    .map_err(|e| pg_err("preparing load_device_records", e))?;
                let rows = conn
                    .client
                    .query(&stmt, &[&ids])
                    .map_err(|e| pg_err("loading device records", e))?;
                rows.iter()
                    .map(|r| record_of(r).map(|rec| (rec.device.as_str().to_owned(), rec)))
                    .collect()
            })?;
        // In the order asked for, like the embedded store.
        Ok(devices
            .iter()
            .filter_map(|d| by_id.remove(d.as_str()))
            .collect())
    }

    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, StoreError> {
        let ids: Option<Vec<&str>> = devices.map(|d| d.iter().map(DeviceId::as_str).collect());
        if ids.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let rows = self.read("device_versions", |conn| {
            let rows = match &ids {
                Some(ids) => {
                    let stmt = conn
                        .stmt(SQL_VERSIONS_SOME)
                        .map_err(|e| pg_err("preparing device_versions", e))?;
                    conn.client.query(&stmt, &[ids])
                }
                None => {
                    let stmt = conn
                        .stmt(SQL_VERSIONS_ALL)
                        .map_err(|e| pg_err("preparing device_versions", e))?;
                    conn.client.query(&stmt, &[])
                }
            }
            .map_err(|e| pg_err("reading device versions", e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), from_sql(r.get(1))))
                .collect::<Vec<_>>())
        })?;
        match devices {
            Some(devices) => {
                let mut by_id: HashMap<String, u64> = rows.into_iter().collect();
                Ok(devices
                    .iter()
                    .filter_map(|d| by_id.remove(d.as_str()).map(|v| (d.clone(), v)))
                    .collect())
            }
            None => rows
                .into_iter()
                .map(|(id, v)| Ok((device_id(&id)?, v)))
                .collect(),
        }
    }

    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        self.read("load_tokens", |conn| {
            let stmt = conn
                .stmt(SQL_TOKENS)
                .map_err(|e| pg_err("preparing load_tokens", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("loading tokens", e))?;
            rows.iter()
                .map(|r| {
                    let hash: String = r.get(0);
                    let body: Vec<u8> = r.get(1);
                    let rec = dec(&hash, &body)?;
                    Ok((hash, rec))
                })
                .collect()
        })
    }

    fn load_meta(&self) -> Result<Meta, StoreError> {
        self.read("load_meta", |conn| {
            let stmt = conn
                .stmt(SQL_META)
                .map_err(|e| pg_err("preparing load_meta", e))?;
            match conn
                .client
                .query_opt(&stmt, &[])
                .map_err(|e| pg_err("loading meta", e))?
            {
                Some(row) => dec("meta", &row.get::<_, Vec<u8>>(0)),
                None => Ok(Meta::default()),
            }
        })
    }

    fn load_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        self.read("load_tombstones", |conn| {
            let stmt = conn
                .stmt(SQL_TOMBS)
                .map_err(|e| pg_err("preparing load_tombstones", e))?;
            let rows = conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("loading tombstones", e))?;
            rows.iter()
                .map(|r| {
                    let id: String = r.get(0);
                    let body: Vec<u8> = r.get(1);
                    dec(&id, &body)
                })
                .collect()
        })
    }

    fn load_catalog_health(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("load_catalog_health", |conn| {
            let stmt = conn
                .stmt(SQL_HEALTH)
                .map_err(|e| pg_err("preparing load_catalog_health", e))?;
            Ok(conn
                .client
                .query_opt(&stmt, &[])
                .map_err(|e| pg_err("loading catalog health", e))?
                .map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    fn load_rollouts(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("load_rollouts", |conn| {
            let stmt = conn
                .stmt(SQL_ROLLOUTS)
                .map_err(|e| pg_err("preparing load_rollouts", e))?;
            Ok(conn
                .client
                .query_opt(&stmt, &[])
                .map_err(|e| pg_err("loading rollouts", e))?
                .map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    fn load_diagnostics(&self) -> Result<Vec<(DeviceId, Vec<u8>)>, StoreError> {
        self.read("load_diagnostics", |conn| {
            let stmt = conn
                .stmt(SQL_DIAG)
                .map_err(|e| pg_err("preparing load_diagnostics", e))?;
            Ok(conn
                .client
                .query(&stmt, &[])
                .map_err(|e| pg_err("loading diagnostics", e))?
                .into_iter()
                .filter_map(|row| {
                    let id: String = row.get(0);
                    Some((DeviceId::new(id).ok()?, row.get::<_, Vec<u8>>(1)))
                })
                .collect())
        })
    }

    fn commit_all(&self, batches: &[Batch]) -> Result<(), StoreError> {
        if batches.iter().all(Batch::is_empty) {
            return Ok(());
        }
        let plans: Vec<Plan> = batches.iter().map(Plan::of).collect();
        off_runtime(|| {
            let mut link = lock(&self.commit);
            let mut attempt = 0;
            loop {
                attempt += 1;
                let conn = link.conn()?;
                let failed = match apply(conn, &plans) {
                    Ok(conflicts) if conflicts.is_empty() => return Ok(()),
                    Ok(devices) => return Err(StoreError::Conflict { devices }),
                    Err(f) => f,
                };
                let broken = match &failed {
                    Failed::Before(e) | Failed::AtCommit(e) => is_broken(e, &conn.client),
                };
                match failed {
                    Failed::Before(e) if attempt == 1 && (broken || is_retryable(&e)) => {
                        tracing::warn!(error = %e, broken, "PostgreSQL commit rolled back; trying once more");
                        if broken {
                            link.conn = None;
                        }
                    }
                    Failed::Before(e) => {
                        if broken {
                            link.conn = None;
                        }
                        return Err(pg_err("committing", e));
                    }
                    Failed::AtCommit(e) => {
                        if broken {
                            link.conn = None;
                            return Err(pg_err(
                                "committing (connection lost during COMMIT: outcome unknown)",
                                e,
                            ));
                        }
                        if attempt == 1 && is_retryable(&e) {
                            tracing::warn!(error = %e, "PostgreSQL refused the COMMIT; trying once more");
                            continue;
                        }
                        return Err(pg_err("committing", e));
                    }
                }
            }
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn load_history(
        &self,
        device: &DeviceId,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.read("load_history", |conn| history::load(conn, device, query))
    }

    fn prune_history(&self, before_ms: u64, max_per_device: usize) -> Result<u64, StoreError> {
        off_runtime(|| {
            lock(&self.commit).retry("prune_history", |conn| {
                history::prune(conn, before_ms, max_per_device)
            })
        })
    }

    fn try_lead(&self) -> Result<bool, StoreError> {
        off_runtime(|| Self::lead_now(&mut lock(&self.lead)))
    }

    fn put_operator_token(&self, rec: &OperatorToken) -> Result<(), StoreError> {
        self.put_operator_token_pg(rec)
    }
    fn load_operator_token(&self, id: &str) -> Result<Option<OperatorToken>, StoreError> {
        self.load_operator_token_pg(id)
    }
    fn load_operator_tokens(&self) -> Result<Vec<OperatorToken>, StoreError> {
        self.load_operator_tokens_pg()
    }
    fn append_audit(&self, entry: &AuditEntry, limits: &AuditLimits) -> Result<u64, StoreError> {
        self.append_audit_pg(entry, limits)
    }
    fn put_audit(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        self.put_audit_pg(id, entry)
    }
    fn load_audit(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError> {
        self.load_audit_pg(q)
    }
    fn put_server_beat(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        self.put_server_beat_pg(beat)
    }
    fn load_server_beats(&self) -> Result<Vec<ServerBeat>, StoreError> {
        self.load_server_beats_pg()
    }
    fn put_assignment(&self, a: &StoredAssignment, max_history: usize) -> Result<bool, StoreError> {
        self.put_assignment_pg(a, max_history)
    }
    fn load_assignments(&self) -> Result<Vec<StoredAssignment>, StoreError> {
        self.load_assignments_pg()
    }
    fn load_assignment_history(
        &self,
        group: &shardline_shared::assign::GroupId,
        limit: usize,
    ) -> Result<Vec<AssignmentHistoryRow>, StoreError> {
        self.load_assignment_history_pg(group, limit)
    }
    fn withdraw_assignment(
        &self,
        row: &AssignmentHistoryRow,
        max_history: usize,
    ) -> Result<bool, StoreError> {
        self.withdraw_assignment_pg(row, max_history)
    }
    fn put_shortfalls(&self, s: &[ShortfallRecord]) -> Result<(), StoreError> {
        self.put_shortfalls_pg(s)
    }
    fn load_shortfalls(&self) -> Result<Vec<ShortfallRecord>, StoreError> {
        self.load_shortfalls_pg()
    }
}
