//! `GET /v1/assignments` and `GET /v1/assignments/{group}/history` (issue
//! 19, viewer): each group's current assignment (version, server, region,
//! endpoints, issue and expiry, last change and why), the instances'
//! heartbeats (load, capacity, latency, errors, age, alive, whether its
//! `[[assignment.groups]]` differ from the live lead's) and the capacity
//! shortfalls per region (amount, groups, since when: written by the lead
//! into the store); a group's published versions and withdrawals, newest
//! first.
//! Read from the store on a blocking thread (the lead writes it), so any
//! instance answers the same.

use super::api::{error, ApiState};
use super::inbound::now_ms;
use super::store::{AssignmentHistoryRow, StoredAssignment};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shardline_allocator_core::assign::AssignmentChange;
use shardline_shared::assign::GroupId;

/// History rows a read returns.
const HISTORY_LIMIT: usize = 100;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/assignments", get(assignments))
        .route("/v1/assignments/{group}/history", get(history))
}

fn change_json(c: &AssignmentChange) -> Value {
    match c {
        AssignmentChange::New => json!("new"),
        AssignmentChange::Moved { from } => json!(format!("moved from {from}")),
        AssignmentChange::EndpointsChanged => json!("endpoints changed"),
        AssignmentChange::Renewed => json!("renewed"),
        AssignmentChange::Withdrawn => json!("withdrawn"),
    }
}

fn reasons_json(r: &[shardline_allocator_core::assign::RerunReason]) -> Value {
    json!(r.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>())
}

fn assignment_json(s: &StoredAssignment, now: u64) -> Value {
    let a = &s.assignment;
    json!({
        "group": a.group.as_str(),
        "version": a.version,
        "server": a.server.as_str(),
        "region": a.region.as_str(),
        "endpoints": a.endpoints,
        "issued_at_ms": a.issued_at_ms,
        "expires_at_ms": a.expires_at_ms,
        "expired": now >= a.expires_at_ms,
        "last_change": change_json(&s.change),
        "reasons": reasons_json(&s.reasons),
        "written_at_ms": s.at_ms,
    })
}

fn history_json(h: &AssignmentHistoryRow) -> Value {
    let a = &h.assignment;
    json!({
        "version": a.version,
        "server": a.server.as_str(),
        "region": a.region.as_str(),
        "endpoints": a.endpoints,
        "issued_at_ms": a.issued_at_ms,
        "expires_at_ms": a.expires_at_ms,
        "change": change_json(&h.change),
        "reasons": reasons_json(&h.reasons),
        "at_ms": h.at_ms,
    })
}

async fn assignments(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, super::store::StoreError>((
            store.load_assignments()?,
            store.load_server_beats()?,
            store.load_shortfalls()?,
        ))
    })
    .await;
    let (stored, beats, short) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let now = now_ms();
    let timeout = state.assign.heartbeat_timeout_ms();
    let groups: Vec<Value> = stored.iter().map(|s| assignment_json(s, now)).collect();
    // The live lead's group digest, which the others must match.
    let lead_digest = beats
        .iter()
        .filter(|b| b.lead && now.saturating_sub(b.at_ms) < timeout)
        .max_by_key(|b| b.at_ms)
        .and_then(|b| b.groups_digest.as_deref());
    let servers: Vec<Value> = beats
        .iter()
        .map(|b| {
            let r = &b.report;
            let age = now.saturating_sub(b.at_ms);
            json!({
                "server": r.id.as_str(),
                "region": r.region.as_str(),
                "capacity": r.capacity,
                "load": r.load,
                "p99_latency_ms": r.p99_latency_ms,
                "error_rate": r.error_rate,
                "endpoints": r.endpoints,
                "heartbeat_at_ms": b.at_ms,
                "heartbeat_age_ms": age,
                "alive": age < timeout,
                "lead": b.lead,
                "groups": stored.iter().filter(|s| s.assignment.server == r.id).count(),
                "groups_digest": b.groups_digest,
                "groups_differ": matches!(
                    (lead_digest, b.groups_digest.as_deref()),
                    (Some(l), Some(d)) if l != d
                ),
            })
        })
        .collect();
    let shortfalls: Vec<Value> = short
        .iter()
        .map(|s| {
            json!({
                "region": s.region,
                "shortfall": s.shortfall,
                "groups": s.groups.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
                "since_ms": s.since_ms,
                "at_ms": s.at_ms,
            })
        })
        .collect();
    Json(json!({ "groups": groups, "servers": servers, "shortfalls": shortfalls })).into_response()
}

async fn history(State(state): State<ApiState>, Path(group): Path<String>) -> Response {
    let group = match GroupId::new(group) {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let store = state.store.clone();
    let read =
        tokio::task::spawn_blocking(move || store.load_assignment_history(&group, HISTORY_LIMIT))
            .await;
    match read {
        Ok(Ok(rows)) => {
            let rows: Vec<Value> = rows.iter().map(history_json).collect();
            Json(json!({ "versions": rows })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
