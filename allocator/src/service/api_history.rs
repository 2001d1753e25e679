//! `GET /v1/devices/{id}/history`: a device's history from the store
//! (QoS windows, instructions, reputation changes, decisions), newest
//! first, each entry flattened to JSON with its reason in words.
//!
//! Read straight from the store on a blocking thread, not through the
//! core: history can be large and the core must not wait on a reader.
//! Query: `kind=qos|instruction|reputation|decision`, `since_ms`,
//! `before_ms` (page backwards), `limit` (default 200, at most 5,000).

use super::api::{error, ApiState};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shardline_allocator_core::history::{
    HistoryEntry, HistoryEvent, HistoryKind, HistoryQuery, MAX_HISTORY_READ,
};
use shardline_shared::ids::DeviceId;

/// Entries a read returns when it names no limit.
const DEFAULT_LIMIT: usize = 200;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/v1/devices/{id}/history", get(history))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    kind: Option<String>,
    since_ms: Option<u64>,
    before_ms: Option<u64>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    params: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(p) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let device = match DeviceId::new(&id) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let kind = match p.kind.as_deref().map(|k| (k, HistoryKind::parse(k))) {
        None => None,
        Some((_, Some(k))) => Some(k),
        Some((k, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("kind {k:?}: expected qos, instruction, reputation or decision"),
            )
        }
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_HISTORY_READ {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1..={MAX_HISTORY_READ}"),
        );
    }
    let query = HistoryQuery {
        kind,
        since_ms: p.since_ms.unwrap_or(0),
        before_ms: p.before_ms,
        limit,
    };
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.load_history(&device, &query)).await;
    match read {
        Ok(Ok(entries)) => {
            let entries: Vec<Value> = entries.iter().map(entry_json).collect();
            Json(json!({ "entries": entries })).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading a device's history failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One entry as the API shows it: `at_ms`, `kind`, the kind's fields.
pub fn entry_json(e: &HistoryEntry) -> Value {
    let mut v = match &e.event {
        HistoryEvent::Qos(w) => json!({
            "class": format!("{:?}", w.class).to_lowercase(),
            "window_ms": w.window_ms,
            "mbit": w.mbit,
            "bytes": w.bytes,
            "packets": w.packets,
            "latency_ms": w.rtt_p50_ms,
            "rtt_p95_ms": w.rtt_p95_ms,
            "jitter_ms": w.jitter_ms,
            "loss_pct": w.loss_permille / 10.0,
            "flows": w.max_active_flows,
            "reports": w.reports,
        }),
        HistoryEvent::Instruction {
            seq,
            ops,
            status,
            reason,
        } => json!({
            "seq": seq,
            "ops": ops,
            "status": status.as_str(),
            "reason": reason,
        }),
        HistoryEvent::Reputation { from, to, reason } => json!({
            "from": from,
            "to": to,
            "reason": reason,
        }),
        HistoryEvent::Decision {
            decision,
            capability,
            reason,
        } => json!({
            "decision": decision,
            "capability": capability,
            "reason": reason,
        }),
    };
    if let Some(m) = v.as_object_mut() {
        m.insert("at_ms".into(), e.at_ms.into());
        m.insert("kind".into(), e.event.kind().as_str().into());
    }
    v
}
