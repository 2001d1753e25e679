//! The PostgreSQL store's connections: one session each, reopened when it
//! breaks, with its prepared statements; and running the synchronous client
//! off any tokio runtime.

use super::{is_broken, pg_err};
use crate::service::store::StoreError;
use postgres::{Client, GenericClient, NoTls, Statement};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a connection leaves at worst an open
    // transaction, which the next use of the connection rolls back.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` where the synchronous client may block: inline, or on a scoped
/// thread when the caller is inside a tokio runtime (whose threads must not
/// start another runtime's `block_on`).
pub(super) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// One open session with its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) statements: HashMap<&'static str, Statement>,
}

/// Prepares `sql` once per session.
pub(super) fn prepared(
    client: &mut impl GenericClient,
    statements: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
) -> Result<Statement, postgres::Error> {
    if let Some(s) = statements.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare(sql)?;
    statements.insert(sql, s.clone());
    Ok(s)
}

impl Conn {
    pub(super) fn stmt(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        prepared(&mut self.client, &mut self.statements, sql)
    }
}

/// One of the store's connections, reopened when it breaks.
pub(super) struct Link {
    /// Which connection (for logs): `commit`, `read` or `lead`.
    pub(super) role: &'static str,
    pub(super) config: postgres::Config,
    pub(super) conn: Option<Conn>,
}

impl Link {
    pub(super) fn open(role: &'static str, config: &postgres::Config) -> Result<Link, StoreError> {
        let mut link = Link {
            role,
            config: config.clone(),
            conn: None,
        };
        link.conn()?;
        Ok(link)
    }

    /// The open session, connecting first if there is none (or it closed).
    pub(super) fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let mut client = self
                    .config
                    .connect(NoTls)
                    .map_err(|e| pg_err(format!("connecting ({})", self.role), e))?;
                // Server-side keepalives for this session: a peer that
                // vanished (and, on the lead connection, its advisory
                // lock) is dropped in seconds rather than the OS default
                // of hours. Settable by any user; ignored over a Unix socket.
                if let Err(e) = client.batch_execute(
                    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 2; \
                     SET tcp_keepalives_count = 3",
                ) {
                    tracing::debug!(role = self.role, error = %e, "server keepalives not set");
                }
                tracing::debug!(role = self.role, "PostgreSQL connection opened");
                Conn {
                    client,
                    statements: HashMap::new(),
                }
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Runs the idempotent `f`, reopening a broken connection and trying
    /// once more.
    pub(super) fn retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let first = {
            let conn = self.conn()?;
            match f(conn) {
                Err(StoreError::Pg { what, source }) if is_broken(&source, &conn.client) => {
                    StoreError::Pg { what, source }
                }
                other => return other,
            }
        };
        tracing::warn!(role = self.role, op = what, error = %first, "PostgreSQL connection lost; reconnecting");
        self.conn = None;
        f(self.conn()?)
    }
}
