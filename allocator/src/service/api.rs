//! The operator HTTP API (JSON, bearer token) and Prometheus `/metrics`.
//!
//! Every request becomes a [`Command`] for the core; the answer comes back
//! after the core committed the batch it was in, so a 200 means "on disk".
//!
//! Routes (all under a bearer token, checked before anything else about the
//! request, except `/v1/health` and `/metrics` when public):
//! `GET /v1/devices` (with `offset`, `limit`, `q`, `tier` or `tenant`: one
//! page `{"total","offset","limit","devices"}`; without: every row),
//! `POST /v1/devices` (enrol), `GET|DELETE /v1/devices/{id}`,
//! `POST /v1/devices/{id}/{pin|unpin|revoke|unrevoke|drain|resume}`,
//! `GET /v1/tiers`, `GET /v1/credits[?tenant=T]` (credit accounts of the
//! market, seed 002), `POST /v1/tokens`, `POST /v1/rotate`, `GET /metrics`,
//! `GET /v1/devices/{id}/config` (secret key *names* only),
//! `PUT /v1/devices/{id}/config/{shard}` (`{"clear": {k: v}, "secret": {k: v},
//! "unset": [k]}`), `POST /v1/vpn/pair` (`{"a", "b", "a_endpoint",
//! "b_endpoint"}`; the pair's pre-shared key is generated here and never
//! returned). Secret values are never echoed: a malformed body with secrets
//! is refused without repeating it.
//! Explicit requests (issue 18): `POST /v1/shard/request` (`{"instance":
//! "device:app:instance", "op": "acquire"|"renew"|"release"|"query",
//! "kind": "compute"|"data", "units", "duration_ms", "priority", "grant",
//! "outcome": "completed"|"unused"|"errored"|"over_limit"}`; answers with
//! the JSON of the `RequestAnswer`, which is also sent signed to the
//! device), `GET /v1/reputation/{instance}` (standing and history) and
//! `POST /v1/reputation/{instance}` (`{"delta": -10}` or `{"set": 70}`,
//! `"reason"` required, `"actor"` optional): an audited adjustment.
//! History (issue 20): `GET /v1/devices/{id}/history[?kind=&since_ms=&before_ms=&limit=]`
//! (see `api_history`).
//! Access and audit (issue 20, `api_access`): `POST|GET
//! /v1/operators/tokens`, `DELETE /v1/operators/tokens/{id}`, `GET
//! /v1/audit?limit=&before_ms=&actor=&target=&format=json|jsonl|csv`. Every
//! route but `/v1/health` and public `/metrics` needs a token (the token
//! file's, admin; or an operator token with a role), checked first, then
//! the route's role; every non-GET request is audited.
//! Dashboard (issue 20, see `api_fleet` and `dashboard`): `GET /v1/fleet`
//! (summary: presence, units per tier and tenant, reputation histogram,
//! failing catalog entries), `GET /v1/events` (server-sent events `report`,
//! `instruction`, …, each a JSON object with `device` where it applies;
//! `?device=ID` filters), and the static page under `/ui/` (`/` redirects
//! there), served without a token since it carries no data.
//! Deployments (issue 20, `api_deploy`): `POST /v1/catalog/reload` (also
//! SIGHUP; answers what changed, or the file/line/field of a bad file and
//! nothing changes), `GET /v1/rollouts`,
//! `POST /v1/rollouts/{shard}/{promote|rollback}`. Remote diagnostics:
//! `POST /v1/devices/{id}/diagnostics` (ask: a signed instruction),
//! `GET /v1/devices/{id}/diagnostics` (the latest signed answer).

// Handlers answer errors with a ready `Response`; that is axum's idiom.
#![allow(clippy::result_large_err)]

use super::access::Actor;
use super::api_access::{self, noted};
use super::core::{Command, CommandError, OperatorOp, Reply};
use super::inbound::Inbound;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use shardline_allocator_core::policy::ScoreChange;
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::ids::{DeviceId, InstanceRef};
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{GrantOutcome, RequestOp};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What every handler needs.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub tx: mpsc::Sender<Inbound>,
    pub metrics: Arc<Metrics>,
    pub metrics_public: bool,
    /// The only directory `POST /v1/rotate` takes a new key file from (the
    /// signing key's own), so the API cannot be used to probe other files.
    pub key_dir: std::path::PathBuf,
    /// Read directly by routes that must not go through the core (history).
    pub store: Arc<dyn super::store::Store>,
    /// Who may call what: the token file's token and operator tokens.
    pub access: Arc<super::access::Access>,
    /// Where every non-GET request is recorded (`api_access::gate`).
    pub audit: super::audit::AuditLog,
    /// The dashboard's live event stream (`GET /v1/events`).
    pub live: super::api_fleet::LiveHub,
    /// The `[policy]` files a catalog reload reads (`api_deploy`).
    pub policy: Arc<super::config::PolicySection>,
    /// The assignment driver's shared state (issue 19, `api_assign`).
    pub assign: Arc<super::assign_driver::AssignShared>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/health", get(health))
        .route(
            "/v1/devices",
            get(super::api_fleet::list_devices).post(enroll),
        )
        .route("/v1/devices/{id}", get(device).delete(unenroll))
        .route("/v1/devices/{id}/{op}", post(operator))
        .route("/v1/devices/{id}/config", get(device_config))
        .route("/v1/devices/{id}/config/{shard}", put(set_device_config))
        .route("/v1/vpn/pair", post(vpn_pair))
        .route("/v1/tiers", get(tiers))
        .route("/v1/credits", get(credits))
        .route("/v1/catalog", get(catalog))
        .route("/v1/catalog/{shard}/retry", post(catalog_retry))
        .route("/v1/tokens", post(create_token))
        .route("/v1/rotate", post(rotate))
        .route("/v1/shard/request", post(shard_request))
        .route(
            "/v1/reputation/{instance}",
            get(instance_reputation).post(adjust_reputation),
        )
        .merge(super::api_history::routes())
        .merge(super::api_assign::routes())
        .route(
            "/v1/operators/tokens",
            get(api_access::list_operator_tokens).post(api_access::create_operator_token),
        )
        .route(
            "/v1/operators/tokens/{id}",
            axum::routing::delete(api_access::revoke_operator_token),
        )
        .route("/v1/audit", get(api_access::audit_log))
        .route("/v1/fleet", get(super::api_fleet::fleet))
        .route("/v1/events", get(super::api_fleet::events))
        .merge(super::dashboard::routes())
        .merge(super::api_deploy::routes())
        .fallback(not_found)
        // Last, so it runs first: nothing about a request (its route, its
        // body, its ids) is looked at before its token is; then its role,
        // then it is audited.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api_access::gate,
        ))
        .with_state(state)
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Runs an operator command and answers with its JSON reply or its error.
pub(super) async fn answer(state: &ApiState, headers: &HeaderMap, cmd: Command) -> Response {
    match ask(state, headers, cmd).await {
        Ok(r) => reply_json(r),
        Err(e) => e,
    }
}

async fn ask(state: &ApiState, _headers: &HeaderMap, cmd: Command) -> Result<Reply, Response> {
    // Authentication and the role were checked by `api_access::gate`.
    let (tx, rx) = oneshot::channel();
    state
        .tx
        .send(Inbound::Command(Box::new(cmd), tx))
        .await
        .map_err(|_| error(StatusCode::SERVICE_UNAVAILABLE, "the core is stopping"))?;
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Reply::Error(e))) => Err(command_error(e)),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the core is stopping",
        )),
        Err(_) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            "the core did not answer in 30 s",
        )),
    }
}

fn command_error(e: CommandError) -> Response {
    let status = match e {
        CommandError::UnknownDevice(_) => StatusCode::NOT_FOUND,
        CommandError::KeyConflict(_) | CommandError::KeyInUse(_) | CommandError::Concurrent(_) => {
            StatusCode::CONFLICT
        }
        CommandError::UnknownTier(_) | CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

fn device_id(id: &str) -> Result<DeviceId, Response> {
    DeviceId::new(id).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

fn reply_json(r: Reply) -> Response {
    match r {
        Reply::Ok => Json(serde_json::json!({ "ok": true })).into_response(),
        Reply::Enrolled(row) => Json(row).into_response(),
        Reply::Token(t) => Json(t).into_response(),
        Reply::Devices(rows) => Json(rows).into_response(),
        Reply::Device(d) => Json(d).into_response(),
        Reply::Credits(rows) => Json(rows).into_response(),
        Reply::Tiers(t) => Json(t).into_response(),
        Reply::Rotated { epoch, key_id } => {
            Json(serde_json::json!({ "epoch": epoch, "key_id": key_id })).into_response()
        }
        Reply::Catalog(rows) => Json(rows).into_response(),
        Reply::DeviceConfig(c) => Json(c).into_response(),
        // The answer as sent to the device, and in words for operators.
        Reply::Answer(a) => {
            let mut v = serde_json::to_value(&*a).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("explanation".into(), a.answer.to_string().into());
            }
            Json(v).into_response()
        }
        Reply::Instance(v) => Json(v).into_response(),
        Reply::Error(e) => command_error(e),
        Reply::Fleet(f) => Json(f).into_response(),
        Reply::DevicePage(p) => Json(p).into_response(),
        Reply::Reloaded(r) => Json(r).into_response(),
        Reply::Rollouts(r) => Json(r).into_response(),
        Reply::DiagnosticsAsked { seq } => {
            Json(serde_json::json!({ "asked": true, "instruction_seq": seq })).into_response()
        }
        Reply::Diagnostics(d) => Json(d).into_response(),
    }
}

async fn device_config(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let device = match device_id(&id) {
        Ok(d) => d,
        Err(e) => return e,
    };
    answer(&state, &headers, Command::DeviceConfig { device }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    #[serde(default)]
    clear: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    secret: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    unset: Vec<String>,
}

/// The body of a request that may carry secrets: a parse error names only
/// where it failed, never the text (serde quotes offending values).
fn secret_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Response> {
    body.map(|Json(b)| b).map_err(|e| {
        let status = e.status();
        let hint = match &e {
            axum::extract::rejection::JsonRejection::JsonDataError(_) => {
                "a body of the expected shape (see the API docs)"
            }
            axum::extract::rejection::JsonRejection::MissingJsonContentType(_) => {
                "Content-Type: application/json"
            }
            _ => "a JSON body",
        };
        error(status, format!("the request needs {hint}"))
    })
}

async fn set_device_config(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((id, shard)): Path<(String, String)>,
    body: Result<Json<ConfigBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let device = match device_id(&id) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let body = match secret_body(body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    // Key names only: secret values never reach the audit log.
    let detail = format!(
        "shard={shard} clear={:?} secret={:?} unset={:?}",
        body.clear.keys().collect::<Vec<_>>(),
        body.secret.keys().collect::<Vec<_>>(),
        body.unset
    );
    let change = super::core::ConfigChange {
        clear: body.clear,
        secret: body.secret,
        unset: body.unset,
    };
    let r = answer(
        &state,
        &headers,
        Command::SetDeviceConfig {
            device,
            shard,
            change,
        },
    )
    .await;
    noted(r, None, detail)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairBody {
    a: String,
    b: String,
    a_endpoint: std::net::SocketAddr,
    b_endpoint: std::net::SocketAddr,
}

async fn vpn_pair(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<PairBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let (a, b) = match (device_id(&body.a), device_id(&body.b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    // One fresh key per pair, from the OS; it leaves this process only
    // sealed to each of the two devices.
    let mut psk = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut psk) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let (target, detail) = (
        a.to_string(),
        format!(
            "with={b} a_endpoint={} b_endpoint={}",
            body.a_endpoint, body.b_endpoint
        ),
    );
    let pair = super::core::VpnPair {
        a,
        b,
        a_endpoint: body.a_endpoint,
        b_endpoint: body.b_endpoint,
        psk,
    };
    noted(
        answer(&state, &headers, Command::VpnPair(pair)).await,
        Some(target),
        detail,
    )
}

async fn metrics(State(state): State<ApiState>) -> Response {
    // Without a token only when public: `api_access::gate` decided.
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(&state.metrics)
            + &state.live.render_metrics()
            + &state.assign.render_metrics(),
    )
        .into_response()
}

async fn health() -> Response {
    Json(serde_json::json!({ "ok": true })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    device: String,
    public_key: String,
    tier: String,
    #[serde(default)]
    tenant: Option<String>,
}

async fn enroll(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<EnrollBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let device = match device_id(&body.device) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let public_key = match super::keys::parse_public(&body.public_key) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let detail = format!("tier={} tenant={:?}", body.tier, body.tenant);
    let target = device.to_string();
    let cmd = Command::Enroll {
        device,
        public_key,
        tier: body.tier,
        tenant: body.tenant,
    };
    noted(answer(&state, &headers, cmd).await, Some(target), detail)
}

async fn device(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let device = match device_id(&id) {
        Ok(d) => d,
        Err(e) => return e,
    };
    answer(&state, &headers, Command::Device { device }).await
}

async fn unenroll(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let device = match device_id(&id) {
        Ok(d) => d,
        Err(e) => return e,
    };
    answer(&state, &headers, Command::Unenroll { device }).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    #[serde(default)]
    shard: Option<String>,
}

async fn operator(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((id, op)): Path<(String, String)>,
    caller: Option<Extension<Actor>>,
    body: Option<Json<OperatorBody>>,
) -> Response {
    let device = match device_id(&id) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let op = match op.as_str() {
        "pin" => OperatorOp::Pin,
        "unpin" => OperatorOp::Unpin,
        "revoke" => OperatorOp::Revoke,
        "unrevoke" => OperatorOp::Unrevoke,
        "drain" => OperatorOp::Drain,
        "resume" => OperatorOp::Resume,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown operation {other:?}"),
            )
        }
    };
    let shard = body.and_then(|Json(b)| b.shard);
    let detail = shard
        .as_deref()
        .map_or_else(String::new, |s| format!("shard={s}"));
    let actor = caller.map_or_else(|| "the operator".to_owned(), |Extension(a)| a.name);
    let cmd = Command::Operator {
        device,
        op,
        shard,
        actor,
    };
    noted(answer(&state, &headers, cmd).await, None, detail)
}

async fn tiers(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    answer(&state, &headers, Command::Tiers).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsQuery {
    #[serde(default)]
    tenant: Option<String>,
}

/// The market's credit accounts, of one tenant's pool with `?tenant=`.
async fn credits(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<CreditsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let tenant = match query {
        Ok(axum::extract::Query(q)) => q.tenant,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    answer(&state, &headers, Command::Credits { tenant }).await
}

/// The catalog's shards with their failing marks (per architecture) and
/// start failures: operator faults, shown to the operator.
async fn catalog(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    answer(&state, &headers, Command::Catalog).await
}

async fn catalog_retry(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(shard): Path<String>,
) -> Response {
    answer(&state, &headers, Command::RetryCatalogEntry { shard }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    tier: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    uses: Option<u32>,
}

async fn create_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<TokenBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let mut secret = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut secret) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let detail = format!(
        "tier={} tenant={:?} ttl_s={:?} uses={:?}",
        body.tier, body.tenant, body.ttl_s, body.uses
    );
    let cmd = Command::CreateToken {
        tier: body.tier,
        tenant: body.tenant,
        ttl_ms: body.ttl_s.unwrap_or(24 * 3600).saturating_mul(1000),
        uses: body.uses.unwrap_or(1),
        secret,
    };
    noted(answer(&state, &headers, cmd).await, None, detail)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Secret key file of the new key, on the allocator's machine.
    key_file: String,
}

async fn rotate(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<RotateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let refused = || {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "key_file must be a secret key file (mode 0600) in {}; \
                 `shardline-allocator rotate` checks it locally and says why",
                state.key_dir.display()
            ),
        )
    };
    // The answer never says whether, or why, another file could not be
    // read: only files beside the signing key are looked at.
    let path = std::path::Path::new(&body.key_file);
    let in_key_dir = path.is_absolute()
        && path.parent() == Some(state.key_dir.as_path())
        && path.file_name().is_some();
    if !in_key_dir {
        return refused();
    }
    let new_key = match super::keys::read_secret(path) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "rotation refused: the new key file is unusable");
            return refused();
        }
    };
    let detail = format!("key_file={}", body.key_file);
    let cmd = Command::Rotate {
        new_key,
        key_file: body.key_file,
    };
    noted(answer(&state, &headers, cmd).await, None, detail)
}

fn instance_ref(text: &str) -> Result<InstanceRef, Response> {
    text.parse()
        .map_err(|e: shardline_shared::ids::IdError| error(StatusCode::BAD_REQUEST, e.to_string()))
}

/// `POST /v1/shard/request`: the wire request's fields, flat.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardRequestBody {
    instance: String,
    op: String,
    #[serde(default, alias = "type")]
    kind: Option<String>,
    #[serde(default)]
    units: Option<u32>,
    #[serde(default)]
    duration_ms: Option<u32>,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    grant: Option<u64>,
    #[serde(default)]
    outcome: Option<String>,
}

fn request_op(b: &ShardRequestBody) -> Result<RequestOp, String> {
    let need = |v: Option<u32>, what: &str| v.ok_or_else(|| format!("{what} is required"));
    let grant = || b.grant.ok_or_else(|| "grant is required".to_owned());
    Ok(match b.op.as_str() {
        "acquire" => RequestOp::Acquire {
            kind: match b.kind.as_deref() {
                Some("compute") => ShardKind::Compute,
                Some("data") => ShardKind::Data,
                _ => return Err("kind must be compute or data".into()),
            },
            units: need(b.units, "units")?,
            duration_ms: need(b.duration_ms, "duration_ms")?,
            priority: b.priority.unwrap_or(0),
        },
        "renew" => RequestOp::Renew {
            grant: grant()?,
            duration_ms: need(b.duration_ms, "duration_ms")?,
        },
        "release" => RequestOp::Release {
            grant: grant()?,
            outcome: match b.outcome.as_deref() {
                None => GrantOutcome::Completed,
                Some(o) => GrantOutcome::from_name(o).ok_or_else(|| {
                    "outcome must be completed, unused, errored or over_limit".to_owned()
                })?,
            },
        },
        "query" => RequestOp::Query,
        _ => return Err("op must be acquire, renew, release or query".into()),
    })
}

async fn shard_request(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<ShardRequestBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let instance = match instance_ref(&body.instance) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let op = match request_op(&body) {
        Ok(op) => op,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    answer(&state, &headers, Command::ShardRequest { instance, op }).await
}

async fn instance_reputation(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(instance): Path<String>,
) -> Response {
    let instance = match instance_ref(&instance) {
        Ok(i) => i,
        Err(e) => return e,
    };
    answer(&state, &headers, Command::InstanceReputation { instance }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    #[serde(default)]
    delta: Option<f64>,
    #[serde(default)]
    set: Option<f64>,
    reason: String,
    #[serde(default)]
    actor: Option<String>,
}

async fn adjust_reputation(
    State(state): State<ApiState>,
    headers: HeaderMap,
    caller: Option<axum::Extension<Actor>>,
    Path(instance): Path<String>,
    body: Result<Json<AdjustBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let instance = match instance_ref(&instance) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let change = match (body.delta, body.set) {
        (Some(d), None) => ScoreChange::Delta(d),
        (None, Some(s)) => ScoreChange::Set(s),
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one of delta or set"),
    };
    // The authenticated actor; the token file's bearer (one token for
    // several people) may name itself (shardctl sends the local user).
    let actor: String = match (caller, body.actor) {
        (Some(axum::Extension(c)), Some(named)) if c.token_id == super::access::FILE_TOKEN_ID => {
            named
        }
        (Some(axum::Extension(c)), _) => c.name,
        (None, named) => named.unwrap_or_else(|| "api".into()),
    }
    .chars()
    .filter(|c| !c.is_control())
    .take(64)
    .collect();
    let reason: String = body
        .reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let detail = format!("change={change:?} reason={reason:?} as={actor}");
    let cmd = Command::AdjustInstanceReputation {
        instance,
        change,
        reason,
        actor,
    };
    noted(answer(&state, &headers, cmd).await, None, detail)
}
