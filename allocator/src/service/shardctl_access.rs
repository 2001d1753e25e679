//! `shardctl operators …` and `shardctl audit`: operator tokens with roles
//! and the audit log, over the admin API (see `api_access`).

use clap::{Args, Subcommand};

/// `shardctl operators`.
#[derive(Debug, Subcommand)]
pub enum OperatorsCmd {
    /// Create an operator token (printed once; only its hash is stored).
    Create {
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Validity, e.g. 30d, 12h, 90m, 3600s (default: until revoked).
        #[arg(long, value_parser = parse_ttl_s)]
        ttl: Option<u64>,
    },
    /// List operator tokens (never their secrets).
    List,
    /// Revoke a token by id: refused from now on.
    Revoke { id: String },
}

/// `shardctl audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// How many entries (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Only this actor's entries.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only entries about this device (or shard, instance, token id).
    #[arg(long, alias = "target")]
    pub device: Option<String>,
    /// Entries before this time (ms since the epoch).
    #[arg(long)]
    pub before_ms: Option<u64>,
    /// Export instead of a table: csv or jsonl (json with --json).
    #[arg(long, value_parser = ["csv", "jsonl", "json"])]
    pub format: Option<String>,
}

/// `30d`, `12h`, `90m`, `3600s` or plain seconds ⇒ seconds.
pub fn parse_ttl_s(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 30d, 12h, 90m or 3600s"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(format!("{s:?}: must be more than 0 and not absurdly long")),
    }
}

/// Method, path and body of an `operators` command.
pub fn operators_request(
    cmd: &OperatorsCmd,
) -> anyhow::Result<(&'static str, String, Option<serde_json::Value>)> {
    Ok(match cmd {
        OperatorsCmd::Create { name, role, ttl } => (
            "POST",
            "/v1/operators/tokens".to_owned(),
            Some(serde_json::json!({ "name": name, "role": role, "ttl_s": ttl })),
        ),
        OperatorsCmd::List => ("GET", "/v1/operators/tokens".to_owned(), None),
        OperatorsCmd::Revoke { id } => {
            if !super::access::valid_id(id) {
                anyhow::bail!("a token id is 16 hex digits (see `shardctl operators list`)");
            }
            ("DELETE", format!("/v1/operators/tokens/{id}"), None)
        }
    })
}

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `GET /v1/audit` path of an `audit` command.
pub fn audit_path(a: &AuditArgs) -> String {
    let mut path = format!("/v1/audit?limit={}", a.limit);
    if let Some(actor) = &a.actor {
        path.push_str(&format!("&actor={}", q(actor)));
    }
    if let Some(d) = &a.device {
        path.push_str(&format!("&target={}", q(d)));
    }
    if let Some(b) = a.before_ms {
        path.push_str(&format!("&before_ms={b}"));
    }
    if let Some(f) = &a.format {
        path.push_str(&format!("&format={f}"));
    }
    path
}

fn s(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// The token listing as a table.
pub fn operators_text(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<16}  {:<20} {:<8} {:<24} {:<24} {}\n",
        "ID", "NAME", "ROLE", "CREATED (UTC)", "EXPIRES (UTC)", "STATE"
    );
    for t in v
        .get("tokens")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let state = if t.get("revoked").and_then(|r| r.as_bool()) == Some(true) {
            "revoked"
        } else {
            "active"
        };
        out.push_str(&format!(
            "{:<16}  {:<20} {:<8} {:<24} {:<24} {}\n",
            s(t, "id"),
            s(t, "name"),
            s(t, "role"),
            when(t, "created_ms"),
            when(t, "expires_at_ms"),
            state
        ));
    }
    out
}

/// A time field in UTC (`-` when absent, e.g. a token that never expires).
fn when(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .and_then(|t| t.as_u64())
        .map_or_else(|| "-".to_owned(), super::shardctl_history::utc_text)
}

/// Audit entries as a table, newest first.
pub fn audit_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for e in v
        .get("entries")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let outcome = match s(e, "outcome").as_str() {
            "refused" => format!("refused {} {}", s(e, "status"), s(e, "message")),
            o => o.to_owned(),
        };
        out.push_str(&format!(
            "{} {}({}) {} {} {} -> {}\n",
            when(e, "at_ms"),
            s(e, "actor"),
            s(e, "role"),
            s(e, "action"),
            s(e, "target"),
            s(e, "detail"),
            outcome
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl_s("30d"), Ok(30 * 86_400));
        assert_eq!(parse_ttl_s("2h"), Ok(7200));
        assert_eq!(parse_ttl_s("90"), Ok(90));
        assert!(parse_ttl_s("0s").is_err());
        assert!(parse_ttl_s("3w").is_err());
        assert!(parse_ttl_s("d").is_err());
    }

    #[test]
    fn audit_filters_are_encoded() {
        let a = AuditArgs {
            limit: 5,
            actor: Some("a b&c".into()),
            device: Some("dev-1".into()),
            before_ms: None,
            format: Some("csv".into()),
        };
        assert_eq!(
            audit_path(&a),
            "/v1/audit?limit=5&actor=a%20b%26c&target=dev-1&format=csv"
        );
    }
}
