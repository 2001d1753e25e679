//! The audit log of operator actions: who (actor, role, token id), when,
//! what (action, target, detail — never a secret), and the outcome, kept in
//! the store (bounded by `[audit] retention_days` and `max_entries`) and
//! written to the journal under the tracing target `audit`.
//!
//! [`AuditLog::begin`] stores an entry as `pending` before the action runs
//! and [`AuditLog::finish`] rewrites it with the outcome afterwards, so an
//! action that may have taken effect always has an entry on disk, and one
//! acknowledged to the operator has its outcome there too (the answer is
//! sent after `finish`). The HTTP API does this for every non-GET route in
//! its middleware (`api_access`); anything else that acts for an operator
//! (a signal-driven reload, a CLI) calls [`AuditLog::record`].

use super::access::Actor;
use super::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `[audit]` in the allocator's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Entries older than this many days are dropped.
    pub retention_days: u32,
    /// At most this many entries are kept (the oldest go first).
    pub max_entries: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 365,
            max_entries: 100_000,
        }
    }
}

/// The bounds applied at every append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLimits {
    /// Entries with `at_ms` before this are dropped.
    pub min_at_ms: u64,
    pub max_entries: u64,
}

impl AuditConfig {
    pub fn limits(&self, now_ms: u64) -> AuditLimits {
        AuditLimits {
            min_at_ms: now_ms.saturating_sub(u64::from(self.retention_days) * 86_400_000),
            max_entries: self.max_entries.max(1),
        }
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Stored before the action ran; still so if the process died during it.
    Pending,
    Ok,
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub actor: String,
    pub role: String,
    pub token_id: String,
    /// `pin`, `enrol`, `operator token create`, … or `METHOD /route`.
    pub action: String,
    /// Device, shard, instance or token the action is about (may be empty).
    pub target: String,
    /// What else the operator asked for, without secret values.
    pub detail: String,
    pub outcome: Outcome,
    /// HTTP status (0 when not an HTTP action).
    pub status: u16,
    /// The refusal's message.
    pub message: String,
}

impl AuditEntry {
    /// A complete entry for an action the service took for an operator
    /// outside the HTTP API (e.g. `actor` = `sighup` for a signal-driven
    /// reload): role `admin` (whoever can signal the process can do anything
    /// an admin can), no token.
    pub fn system(
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
        outcome: Outcome,
        message: &str,
        now_ms: u64,
    ) -> Self {
        Self {
            at_ms: now_ms,
            actor: actor.into(),
            role: "admin".into(),
            token_id: "-".into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
            outcome,
            status: 0,
            message: message.into(),
        }
    }

    /// A pending entry for `actor` doing `action` on `target` now.
    pub fn new(actor: &Actor, action: &str, target: &str, now_ms: u64) -> Self {
        Self {
            at_ms: now_ms,
            actor: actor.name.clone(),
            role: actor.role.as_str().into(),
            token_id: actor.token_id.clone(),
            action: action.into(),
            target: target.into(),
            detail: String::new(),
            outcome: Outcome::Pending,
            status: 0,
            message: String::new(),
        }
    }
}

/// A stored entry with its id (ids grow with time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEntry {
    pub id: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Which entries `GET /v1/audit` returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub limit: usize,
    /// Only entries with `at_ms` before this.
    pub before_ms: Option<u64>,
    pub actor: Option<String>,
    pub target: Option<String>,
}

/// Largest page `GET /v1/audit` returns.
pub const MAX_PAGE: usize = 10_000;

/// The audit log: the store plus its bounds, cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    config: AuditConfig,
    /// Completed entries, for live views (`subscribe`); nobody listening is fine.
    live: tokio::sync::broadcast::Sender<AuditEntry>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    pub fn new(store: Arc<dyn Store>, config: AuditConfig) -> Self {
        Self {
            store,
            config,
            live: tokio::sync::broadcast::channel(256).0,
        }
    }

    /// Every entry completed from now on (after it is on disk); a slow
    /// receiver misses entries (`RecvError::Lagged`), the store has them.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AuditEntry> {
        self.live.subscribe()
    }

    /// Stores `entry` (normally `pending`) before its action runs. Blocking.
    pub fn begin(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        self.store
            .append_audit(entry, &self.config.limits(entry.at_ms))
    }

    /// Rewrites entry `id` with its outcome, and writes it to the journal.
    /// Blocking.
    pub fn finish(&self, id: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        journal(entry);
        self.store.put_audit(id, entry)?;
        let _ = self.live.send(entry.clone());
        Ok(())
    }

    /// Stores and journals an entry that is already complete (a refusal, or
    /// an action taken outside the HTTP API). Blocking.
    pub fn record(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        journal(entry);
        let id = self.begin(entry)?;
        let _ = self.live.send(entry.clone());
        Ok(id)
    }

    pub fn query(&self, q: &AuditQuery) -> Result<Vec<StoredEntry>, StoreError> {
        self.store.load_audit(q)
    }
}

/// The journal's copy of an entry, with structured fields.
fn journal(e: &AuditEntry) {
    tracing::info!(
        target: "audit",
        actor = %e.actor,
        role = %e.role,
        token_id = %e.token_id,
        action = %e.action,
        target_id = %e.target,
        detail = %e.detail,
        outcome = e.outcome.as_str(),
        status = e.status,
        message = %e.message,
        "operator action"
    );
}

/// The export formats of `GET /v1/audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Jsonl => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str =
    "id,at_ms,actor,role,token_id,action,target,detail,outcome,status,message";

/// Renders entries in `format`.
pub fn render(entries: &[StoredEntry], format: Format) -> String {
    match format {
        Format::Json => serde_json::json!({ "entries": entries }).to_string(),
        Format::Jsonl => {
            let mut out = String::new();
            for e in entries {
                out.push_str(&serde_json::to_string(e).unwrap_or_default());
                out.push('\n');
            }
            out
        }
        Format::Csv => {
            let mut out = String::from(CSV_HEADER);
            out.push_str("\r\n");
            for s in entries {
                let e = &s.entry;
                let fields = [
                    s.id.to_string(),
                    e.at_ms.to_string(),
                    csv_field(&e.actor),
                    csv_field(&e.role),
                    csv_field(&e.token_id),
                    csv_field(&e.action),
                    csv_field(&e.target),
                    csv_field(&e.detail),
                    e.outcome.as_str().to_owned(),
                    e.status.to_string(),
                    csv_field(&e.message),
                ];
                out.push_str(&fields.join(","));
                out.push_str("\r\n");
            }
            out
        }
    }
}

/// RFC 4180 quoting; a leading `= + - @` is prefixed with `'` so that a
/// spreadsheet opening the export does not run it as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completed_entries_reach_live_subscribers_after_the_store() {
        let dir = std::env::temp_dir().join(format!("sl-audit-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn Store> =
            Arc::new(super::super::store::RedbStore::open(&dir.join("s.redb")).unwrap());
        let log = AuditLog::new(store, AuditConfig::default());
        let mut rx = log.subscribe();
        let e = AuditEntry::system("sighup", "catalog reload", "", "", Outcome::Ok, "", 5);
        let id = log.record(&e).unwrap();
        assert_eq!(rx.try_recv().unwrap(), e);
        let stored = log
            .query(&AuditQuery {
                limit: 5,
                ..AuditQuery::default()
            })
            .unwrap();
        assert_eq!(stored, vec![StoredEntry { id, entry: e }]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn csv_quotes_what_needs_it_and_defuses_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("line\nbreak"), "\"line\nbreak\"");
    }

    #[test]
    fn limits_follow_the_configuration() {
        let c = AuditConfig {
            retention_days: 2,
            max_entries: 0,
        };
        let l = c.limits(3 * 86_400_000);
        assert_eq!(l.min_at_ms, 86_400_000);
        assert_eq!(l.max_entries, 1, "at least the newest entry is kept");
    }
}
