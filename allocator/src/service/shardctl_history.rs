//! `shardctl history`: a device's history (from
//! `GET /v1/devices/{id}/history`) as one line per entry, newest first,
//! each with its reason.

use serde_json::Value;

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

/// Milliseconds since the epoch as `2026-12-07 04:39:28.349Z` (UTC; the
/// civil-from-days conversion of Howard Hinnant's date algorithms).
pub fn utc_text(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The entries as lines: time (UTC), kind, what, why.
pub fn history_text(answer: &Value) -> String {
    let Some(entries) = answer.get("entries").and_then(Value::as_array) else {
        return "no history\n".into();
    };
    if entries.is_empty() {
        return "no history (nothing recorded yet, or pruned)\n".into();
    }
    let mut out = String::new();
    for e in entries {
        let at = e.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
        let line = match text(e, "kind") {
            "qos" => {
                let opt = |k: &str| num(e, k).map_or("-".to_owned(), |x| format!("{x:.1} ms"));
                format!(
                    "qos          {:<12} {:.2} Mbit/s, rtt p50 {}, p95 {}, jitter {}, loss {:.1} %, {} report(s)",
                    text(e, "class"),
                    num(e, "mbit").unwrap_or(0.0),
                    opt("latency_ms"),
                    opt("rtt_p95_ms"),
                    opt("jitter_ms"),
                    num(e, "loss_pct").unwrap_or(0.0),
                    e.get("reports").and_then(Value::as_u64).unwrap_or(0),
                )
            }
            "instruction" => {
                let ops: Vec<&str> = e
                    .get("ops")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut l = format!(
                    "instruction  #{} {}",
                    e.get("seq").and_then(Value::as_u64).unwrap_or(0),
                    text(e, "status")
                );
                if !ops.is_empty() {
                    l.push_str(": ");
                    l.push_str(&ops.join("; "));
                }
                if let Some(r) = e.get("reason").and_then(Value::as_str) {
                    l.push_str(&format!(" ({r})"));
                }
                l
            }
            "reputation" => format!(
                "reputation   {:.1} → {:.1}: {}",
                num(e, "from").unwrap_or(0.0),
                num(e, "to").unwrap_or(0.0),
                text(e, "reason")
            ),
            "decision" => format!(
                "decision     {} {}: {}",
                text(e, "decision"),
                text(e, "capability"),
                text(e, "reason")
            ),
            other => other.to_owned(),
        };
        out.push_str(&format!("{}  {line}\n", utc_text(at)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(utc_text(1_796_618_368_349), "2026-12-07 04:39:28.349Z");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00.000Z");
    }

    #[test]
    fn each_kind_reads_as_one_line_with_its_reason() {
        let v = serde_json::json!({"entries": [
            {"at_ms": 5, "kind": "decision", "decision": "refuse", "capability": "vpn",
             "reason": "capacity: cpu 93 % > 85 %"},
            {"at_ms": 4, "kind": "reputation", "from": 50.0, "to": 24.0, "reason": "bad signature"},
            {"at_ms": 3, "kind": "instruction", "seq": 9, "status": "failed",
             "ops": [], "reason": "digest mismatch"},
            {"at_ms": 2, "kind": "qos", "class": "gaming", "mbit": 1.5, "latency_ms": 12.0,
             "rtt_p95_ms": null, "jitter_ms": 2.0, "loss_pct": 0.3, "reports": 6},
        ]});
        let t = history_text(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[0].contains("refuse vpn: capacity: cpu 93 % > 85 %"),
            "{t}"
        );
        assert!(lines[1].contains("50.0 → 24.0: bad signature"), "{t}");
        assert!(lines[2].contains("#9 failed (digest mismatch)"), "{t}");
        assert!(
            lines[3].contains("gaming")
                && lines[3].contains("1.50 Mbit/s")
                && lines[3].contains("p95 -"),
            "{t}"
        );
    }
}
