//! `shardctl assignment [GROUP] [--history]` (issue 19): the answer of
//! `GET /v1/assignments` (one line per group, then the instances and the
//! capacity shortfalls) or of `GET /v1/assignments/{group}/history` (one
//! line per published version or withdrawal, newest first), as text.

use super::shardctl_history::utc_text;
use serde_json::Value;

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn list(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn group_line(g: &Value) -> String {
    let reasons = list(g, "reasons");
    format!(
        "{:<32} v{:<4} {:<16} {:<12} expires {}{}  [{}]  {}{}\n",
        text(g, "group"),
        u(g, "version"),
        text(g, "server"),
        text(g, "region"),
        utc_text(u(g, "expires_at_ms")),
        if g.get("expired").and_then(Value::as_bool) == Some(true) {
            " (EXPIRED)"
        } else {
            ""
        },
        list(g, "endpoints"),
        text(g, "last_change"),
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({reasons})")
        },
    )
}

/// The text of an answer; `group` narrows the groups listed.
pub fn assignment_text(answer: &Value, group: Option<&str>, history: bool) -> String {
    let mut out = String::new();
    if history {
        let rows = answer.get("versions").and_then(Value::as_array);
        let Some(rows) = rows.filter(|r| !r.is_empty()) else {
            return format!("{}: no published version\n", group.unwrap_or("-"));
        };
        for r in rows {
            let reasons = list(r, "reasons");
            out.push_str(&format!(
                "{}  v{:<4} {:<16} {:<12} {}{}  [{}]\n",
                utc_text(u(r, "at_ms")),
                u(r, "version"),
                text(r, "server"),
                text(r, "region"),
                text(r, "change"),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({reasons})")
                },
                list(r, "endpoints"),
            ));
        }
        return out;
    }
    let groups: Vec<&Value> = answer
        .get("groups")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|g| group.is_none_or(|w| text(g, "group") == w))
                .collect()
        })
        .unwrap_or_default();
    if groups.is_empty() {
        match group {
            Some(g) => out.push_str(&format!("{g}: not assigned\n")),
            None => out.push_str("no group assigned\n"),
        }
    }
    for g in groups {
        out.push_str(&group_line(g));
    }
    if group.is_some() {
        return out;
    }
    if let Some(servers) = answer.get("servers").and_then(Value::as_array) {
        out.push_str("servers:\n");
        for s in servers {
            out.push_str(&format!(
                "  {:<16} {:<12} {} load {:.1}/{:.0} reports/s, p99 {:.1} ms, errors {:.1} %, {} group(s), heartbeat {} ms ago{}{}\n",
                text(s, "server"),
                text(s, "region"),
                if s.get("alive").and_then(Value::as_bool) == Some(true) {
                    "alive"
                } else {
                    "LOST "
                },
                f(s, "load"),
                f(s, "capacity"),
                f(s, "p99_latency_ms"),
                f(s, "error_rate") * 100.0,
                u(s, "groups"),
                u(s, "heartbeat_age_ms"),
                if s.get("lead").and_then(Value::as_bool) == Some(true) {
                    " (lead)"
                } else {
                    ""
                },
                if s.get("groups_differ").and_then(Value::as_bool) == Some(true) {
                    " GROUPS DIFFER FROM THE LEAD'S: gets no group"
                } else {
                    ""
                },
            ));
        }
    }
    if let Some(short) = answer.get("shortfalls").and_then(Value::as_array) {
        for s in short.iter().filter(|s| f(s, "shortfall") > 0.0) {
            out.push_str(&format!(
                "NEED CAPACITY in {}: {:.1} reports/s short since {} ({})\n",
                text(s, "region"),
                f(s, "shortfall"),
                utc_text(u(s, "since_ms")),
                list(s, "groups"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn groups_servers_and_shortfalls_read_as_lines() {
        let answer = json!({
            "groups": [{
                "group": "acme.eu-west.vpn", "version": 3, "server": "alloc-b",
                "region": "eu-west", "endpoints": ["mqtt://b:1883"],
                "issued_at_ms": 0, "expires_at_ms": 60_000, "expired": false,
                "last_change": "moved from alloc-a", "reasons": ["ServerLost(ServerId(\"alloc-a\"))"],
            }],
            "servers": [{"server": "alloc-b", "region": "eu-west", "alive": true,
                "load": 12.0, "capacity": 100.0, "p99_latency_ms": 2.0, "error_rate": 0.0,
                "groups": 1, "heartbeat_age_ms": 400, "lead": true},
                {"server": "alloc-c", "region": "eu-west", "alive": true,
                "load": 0.0, "capacity": 100.0, "p99_latency_ms": 2.0, "error_rate": 0.0,
                "groups": 0, "heartbeat_age_ms": 300, "lead": false, "groups_differ": true}],
            "shortfalls": [{"region": "us-east", "shortfall": 40.0, "groups": ["acme.us-east.vpn"],
                            "since_ms": 2000, "at_ms": 5000},
                           {"region": "eu-west", "shortfall": 0.0, "groups": []}],
        });
        let t = assignment_text(&answer, None, false);
        assert!(t.contains("acme.eu-west.vpn"), "{t}");
        assert!(t.contains("v3") && t.contains("moved from alloc-a"), "{t}");
        assert!(t.contains("alloc-b") && t.contains("(lead)"), "{t}");
        let c = t.lines().find(|l| l.contains("alloc-c")).unwrap();
        assert!(c.contains("GROUPS DIFFER FROM THE LEAD'S"), "{t}");
        assert!(!t
            .lines()
            .find(|l| l.contains("alloc-b  "))
            .unwrap()
            .contains("DIFFER"));
        assert!(
            t.contains(
                "NEED CAPACITY in us-east: 40.0 reports/s short since 1970-01-01 00:00:02.000Z"
            ),
            "{t}"
        );
        assert!(!t.contains("in eu-west"), "{t}");
        let t = assignment_text(&answer, Some("other.eu.x"), false);
        assert_eq!(t, "other.eu.x: not assigned\n");
        let h = json!({"versions": [{"version": 2, "server": "alloc-b", "region": "eu-west",
            "endpoints": ["mqtt://b:1883"], "change": "moved from alloc-a", "reasons": [], "at_ms": 1000}]});
        let t = assignment_text(&h, Some("acme.eu-west.vpn"), true);
        assert!(t.starts_with("1970-01-01 00:00:01.000Z  v2"), "{t}");
    }
}
