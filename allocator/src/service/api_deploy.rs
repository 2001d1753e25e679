//! Deployment routes of the operator API (issue 20): reloading the catalog
//! and the tiers without a restart, and the staged rollouts it starts.
//!
//! `POST /v1/catalog/reload` (admin) reads the `[policy]` files again; a
//! file that does not parse or validate is refused with its file, line and
//! field and nothing changes (the running catalog stays); otherwise the
//! core checks the reload against the fleet and answers what changed.
//! SIGHUP does the same (`reload_from_files`). `GET /v1/rollouts` (viewer),
//! `POST /v1/rollouts/{shard}/{promote|rollback}` (operator). Remote
//! diagnostics (issue 20): `POST /v1/devices/{id}/diagnostics` asks the
//! device (operator), `GET /v1/devices/{id}/diagnostics` shows its latest
//! signed answer (viewer).

// Handlers answer errors with a ready `Response`; that is axum's idiom.
#![allow(clippy::result_large_err)]

use super::api::{answer, error, ApiState};
use super::catalog_files::{load_policy_files, CatalogFileError};
use super::config::PolicySection;
use super::core::Command;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use shardline_shared::ids::DeviceId;

/// The reload command for the `[policy]` files as they are on disk now,
/// or why they cannot be used (file, line, field).
pub fn reload_from_files(policy: &PolicySection) -> Result<Command, CatalogFileError> {
    let files = load_policy_files(policy)?;
    Ok(Command::ReloadCatalog {
        catalog: Box::new(files.catalog),
        agreements: Box::new(files.agreements),
        catalog_source: files.catalog_source.to_string(),
        tiers_source: files.agreements_source.to_string(),
    })
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/catalog/reload", post(reload))
        .route("/v1/rollouts", get(rollouts))
        .route("/v1/rollouts/{shard}/{op}", post(decide))
        .route(
            "/v1/devices/{id}/diagnostics",
            get(diagnostics).post(ask_diagnostics),
        )
}

fn device_id(id: &str) -> Result<DeviceId, Response> {
    DeviceId::new(id).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn diagnostics(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match device_id(&id) {
        Ok(device) => answer(&state, &headers, Command::Diagnostics { device }).await,
        Err(e) => e,
    }
}

async fn ask_diagnostics(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match device_id(&id) {
        Ok(device) => answer(&state, &headers, Command::AskDiagnostics { device }).await,
        Err(e) => e,
    }
}

async fn reload(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let policy = state.policy.clone();
    // Reading and parsing files is blocking work: off the async threads.
    let cmd = tokio::task::spawn_blocking(move || reload_from_files(&policy)).await;
    match cmd {
        Ok(Ok(cmd)) => answer(&state, &headers, cmd).await,
        Ok(Err(e)) => {
            state
                .metrics
                .catalog_reloads_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "catalog reload refused: the running catalog stays");
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the reload task failed"),
    }
}

async fn rollouts(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    answer(&state, &headers, Command::Rollouts).await
}

async fn decide(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((shard, op)): Path<(String, String)>,
    caller: Option<axum::Extension<super::access::Actor>>,
) -> Response {
    let promote = match op.as_str() {
        "promote" => true,
        "rollback" => false,
        _ => return error(StatusCode::NOT_FOUND, "no such route"),
    };
    // The authenticated operator (`api_access::gate` put them there).
    let actor = caller.map_or_else(|| "the operator".to_owned(), |axum::Extension(a)| a.name);
    answer(
        &state,
        &headers,
        Command::RolloutDecision {
            shard,
            promote,
            actor,
        },
    )
    .await
}
