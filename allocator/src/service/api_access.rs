//! The admin API's gate and its access and audit routes.
//!
//! [`gate`] is the outermost middleware: it authenticates the bearer token
//! before anything else about the request is looked at (401), then checks
//! the route's role (403, naming the role needed), puts the [`Actor`] into
//! the request's extensions, and audits every non-GET request: a `pending`
//! entry is committed before the handler runs and rewritten with the outcome
//! (status, and the refusal's message) before the answer leaves, so a new
//! route is audited without code of its own. A handler adds the target or
//! detail it knows (never a secret) with [`noted`].
//!
//! Routes: `POST /v1/operators/tokens` (`{"name","role","ttl_s"?}` ⇒ the
//! token, shown once), `GET /v1/operators/tokens` (no secrets), `DELETE
//! /v1/operators/tokens/{id}` (revoke), `GET /v1/audit?limit=&before_ms=&
//! actor=&target=&format=json|jsonl|csv` (newest first).

// Handlers answer errors with a ready `Response`; that is axum's idiom.
#![allow(clippy::result_large_err)]

use super::access::{self, Actor, AuthError, Role};
use super::api::ApiState;
use super::audit::{self, AuditEntry, AuditQuery, Format, Outcome};
use super::inbound::now_ms;
use axum::extract::{MatchedPath, Path, Query, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, RequestExt};
use serde::Deserialize;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// What a handler knows about its action beyond the route (in the
/// response's extensions, read by [`gate`]).
#[derive(Debug, Clone, Default)]
pub struct AuditNote {
    /// Replaces the target taken from the path (e.g. the enrolled device).
    pub target: Option<String>,
    /// Never a secret value.
    pub detail: String,
}

/// `response` with an audit note.
pub fn noted(mut response: Response, target: Option<String>, detail: String) -> Response {
    response
        .extensions_mut()
        .insert(AuditNote { target, detail });
    response
}

/// The `Authorization: Bearer` value, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Authenticates `headers` (blocking store reads run off the runtime).
pub async fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Actor, AuthError> {
    let presented = bearer(headers).map(str::to_owned);
    let access = state.access.clone();
    tokio::task::spawn_blocking(move || access.authenticate(presented.as_deref(), now_ms()))
        .await
        .unwrap_or(Err(AuthError::Missing))
}

/// See the module documentation.
pub async fn gate(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    // The dashboard's static files carry no data; everything they show
    // comes from routes behind a token.
    let open = path == "/v1/health"
        || (path == "/metrics" && state.metrics_public)
        || super::dashboard::is_public(path);
    if open {
        return next.run(request).await;
    }
    let actor = match authenticate(&state, request.headers()).await {
        Ok(a) => a,
        Err(AuthError::Store(e)) => {
            tracing::error!(error = %e, "operator tokens cannot be read");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the token store cannot be read",
            );
        }
        Err(e) => return error(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    // Only now is the request itself looked at.
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |m| m.as_str().to_owned(),
    );
    let params: Vec<(String, String)> = match request.extract_parts::<RawPathParams>().await {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        Err(_) => Vec::new(),
    };
    let need = access::required_role(&method, &route);
    let audited = method != Method::GET && method != Method::HEAD;
    let (action, target) = action_of(&method, &route, &params);
    if actor.role < need {
        let message = format!(
            "this needs the {need} role; {} has the {} role",
            actor.name, actor.role
        );
        if audited {
            let mut entry = AuditEntry::new(&actor, &action, &target, now_ms());
            entry.outcome = Outcome::Refused;
            entry.status = StatusCode::FORBIDDEN.as_u16();
            entry.message.clone_from(&message);
            let log = state.audit.clone();
            let stored = tokio::task::spawn_blocking(move || log.record(&entry)).await;
            if !matches!(stored, Ok(Ok(_))) {
                tracing::error!(actor = %actor.name, %action, "a refusal could not be audited");
            }
        }
        return error(StatusCode::FORBIDDEN, message);
    }
    request.extensions_mut().insert(actor.clone());
    if !audited {
        return next.run(request).await;
    }
    let mut entry = AuditEntry::new(&actor, &action, &target, now_ms());
    let begun = {
        let (log, entry) = (state.audit.clone(), entry.clone());
        tokio::task::spawn_blocking(move || log.begin(&entry)).await
    };
    let id = match begun {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => {
            tracing::error!(error = %e, %action, "the audit log cannot be written; action refused");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot be written; nothing was done",
            );
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot be written; nothing was done",
            )
        }
    };
    let response = next.run(request).await;
    let status = response.status();
    if let Some(note) = response.extensions().get::<AuditNote>() {
        if let Some(t) = &note.target {
            entry.target.clone_from(t);
        }
        entry.detail.clone_from(&note.detail);
    }
    entry.status = status.as_u16();
    // The refusal's message is in the body; a success's body is never
    // read (it may carry a token shown once).
    let response = if status.is_success() {
        entry.outcome = Outcome::Ok;
        response
    } else {
        entry.outcome = Outcome::Refused;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        entry.message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_default()
            .chars()
            .take(500)
            .collect();
        Response::from_parts(parts, axum::body::Body::from(bytes))
    };
    let log = state.audit.clone();
    match tokio::task::spawn_blocking(move || log.finish(id, &entry)).await {
        Ok(Ok(())) => {}
        // The pending entry stays: the action is on record, its outcome not.
        Ok(Err(e)) => tracing::error!(error = %e, id, "an audit outcome could not be written"),
        Err(e) => tracing::error!(error = %e, id, "an audit outcome could not be written"),
    }
    response
}

/// The audited action's name and target, from the route.
fn action_of(method: &Method, route: &str, params: &[(String, String)]) -> (String, String) {
    let param = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let named = match (method.as_str(), route) {
        ("POST", "/v1/devices") => Some(("enrol".to_owned(), String::new())),
        ("DELETE", "/v1/devices/{id}") => Some(("unenrol".into(), param("id"))),
        ("POST", "/v1/devices/{id}/{op}") => Some((param("op"), param("id"))),
        ("PUT", "/v1/devices/{id}/config/{shard}") => Some(("device config".into(), param("id"))),
        ("POST", "/v1/vpn/pair") => Some(("vpn pair".into(), String::new())),
        ("POST", "/v1/tokens") => Some(("enrolment token create".into(), String::new())),
        ("POST", "/v1/operators/tokens") => Some(("operator token create".into(), String::new())),
        ("DELETE", "/v1/operators/tokens/{id}") => {
            Some(("operator token revoke".into(), param("id")))
        }
        ("POST", "/v1/rotate") => Some(("rotate".into(), String::new())),
        ("POST", "/v1/catalog/{shard}/retry") => Some(("catalog retry".into(), param("shard"))),
        ("POST", "/v1/reputation/{instance}") => {
            Some(("reputation adjust".into(), param("instance")))
        }
        ("POST", "/v1/shard/request") => Some(("shard request".into(), String::new())),
        ("POST", "/v1/devices/{id}/diagnostics") => Some(("diagnostics ask".into(), param("id"))),
        ("POST", "/v1/catalog/reload") => Some(("catalog reload".into(), String::new())),
        ("POST", "/v1/rollouts/{shard}/{op}") => {
            Some((format!("rollout {}", param("op")), param("shard")))
        }
        _ => None,
    };
    if let Some(n) = named {
        return n;
    }
    // Any other route: its literal segments and its `{op}`, e.g.
    // `fleet reload` for a later `POST /v1/fleet/reload`; the target is
    // the other parameters.
    let mut words: Vec<String> = route
        .trim_start_matches("/v1")
        .split('/')
        .filter(|s| !s.is_empty() && !s.starts_with('{'))
        .map(str::to_owned)
        .collect();
    if route.contains("{op}") {
        words.push(param("op"));
    }
    if words.is_empty() {
        words.push(route.to_owned());
    }
    if *method != Method::POST {
        words.insert(0, method.as_str().to_ascii_lowercase());
    }
    let target = params
        .iter()
        .filter(|(k, _)| k != "op")
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join("/");
    (words.join(" "), target)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    name: String,
    role: String,
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// `POST /v1/operators/tokens`.
pub(super) async fn create_operator_token(
    State(state): State<ApiState>,
    Extension(actor): Extension<Actor>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let detail = format!(
        "name={} role={} ttl_s={}",
        body.name.chars().take(64).collect::<String>(),
        body.role.chars().take(16).collect::<String>(),
        body.ttl_s.map_or_else(|| "none".into(), |t| t.to_string())
    );
    let Some(role) = Role::parse(&body.role) else {
        return noted(
            error(
                StatusCode::BAD_REQUEST,
                "role must be viewer, operator or admin",
            ),
            None,
            detail,
        );
    };
    if body.ttl_s.is_some_and(|t| t == 0 || t > access::MAX_TTL_S) {
        return noted(
            error(
                StatusCode::BAD_REQUEST,
                format!("ttl_s must be 1 to {}", access::MAX_TTL_S),
            ),
            None,
            detail,
        );
    }
    let made = match access::new_token(
        &body.name,
        role,
        body.ttl_s.map(|t| t * 1000),
        &actor.name,
        now_ms(),
    ) {
        Ok(m) => m,
        Err(e) => return noted(error(StatusCode::BAD_REQUEST, e.to_string()), None, detail),
    };
    let (access, rec) = (state.access.clone(), made.record.clone());
    match tokio::task::spawn_blocking(move || access.create(&rec)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let r = &made.record;
    noted(
        Json(serde_json::json!({
            "id": r.id, "name": r.name, "role": r.role,
            "token": made.token, "expires_at_ms": r.expires_at_ms,
        }))
        .into_response(),
        Some(r.id.clone()),
        detail,
    )
}

/// `GET /v1/operators/tokens`.
pub(super) async fn list_operator_tokens(State(state): State<ApiState>) -> Response {
    let store = state.access.store().clone();
    match tokio::task::spawn_blocking(move || store.load_operator_tokens()).await {
        Ok(Ok(tokens)) => {
            let rows: Vec<_> = tokens.iter().map(|t| t.public_json()).collect();
            Json(serde_json::json!({ "tokens": rows })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `DELETE /v1/operators/tokens/{id}`: takes effect at once here, within
/// [`access::SHARED_CACHE_MS`] on instances sharing the store.
pub(super) async fn revoke_operator_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Response {
    if !access::valid_id(&id) {
        return error(StatusCode::BAD_REQUEST, "a token id is 16 hex digits");
    }
    let access = state.access.clone();
    let revoked = tokio::task::spawn_blocking(move || access.revoke(&id, now_ms())).await;
    match revoked {
        Ok(Ok(Some(rec))) => Json(rec.public_json()).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no such operator token"),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    before_ms: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

/// `GET /v1/audit`.
pub(super) async fn audit_log(
    State(state): State<ApiState>,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let p = match query {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let format = match p.format.as_deref().map(Format::parse) {
        None => Format::Json,
        Some(Some(f)) => f,
        Some(None) => return error(StatusCode::BAD_REQUEST, "format must be json, jsonl or csv"),
    };
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > audit::MAX_PAGE {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {}", audit::MAX_PAGE),
        );
    }
    let q = AuditQuery {
        limit,
        before_ms: p.before_ms,
        actor: p.actor.filter(|a| !a.is_empty()),
        target: p.target.filter(|t| !t.is_empty()),
    };
    let log = state.audit.clone();
    match tokio::task::spawn_blocking(move || log.query(&q)).await {
        Ok(Ok(entries)) => (
            [(axum::http::header::CONTENT_TYPE, format.content_type())],
            audit::render(&entries, format),
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::store::{RedbStore, Store};
    use std::sync::Arc;

    /// A route of its own (as any later route would be): audited by the
    /// gate alone, its `pending` entry on disk before the handler runs, its
    /// outcome after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_route_is_audited_pending_before_it_runs_and_with_its_outcome_after() {
        let dir = std::env::temp_dir().join(format!("sl-gate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("s.redb")).unwrap());
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let state = ApiState {
            tx,
            metrics: Arc::default(),
            metrics_public: false,
            key_dir: dir.clone(),
            access: Arc::new(access::Access::new("admin-secret".into(), store.clone())),
            audit: audit::AuditLog::new(store.clone(), audit::AuditConfig::default()),
            store: store.clone(),
            live: crate::service::api_fleet::LiveHub::default(),
            policy: Arc::default(),
            assign: Arc::default(),
        };
        async fn probe(
            State(state): State<ApiState>,
            Extension(actor): Extension<Actor>,
        ) -> Response {
            let log = state.audit.clone();
            let seen = tokio::task::spawn_blocking(move || {
                log.query(&AuditQuery {
                    limit: 10,
                    ..AuditQuery::default()
                })
            })
            .await
            .unwrap()
            .unwrap();
            let pending = seen.len() == 1
                && seen[0].entry.outcome == Outcome::Pending
                && seen[0].entry.action == "probes fire"
                && seen[0].entry.target == "p1";
            noted(
                error(
                    StatusCode::CONFLICT,
                    format!("pending seen: {pending}; actor {}", actor.name),
                ),
                None,
                "extra=1".into(),
            )
        }
        let app = axum::Router::new()
            .route("/v1/probes/{id}/{op}", axum::routing::post(probe))
            .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let ask = |token: Option<&'static str>| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                crate::service::http::request(&url, "POST", "/v1/probes/p1/fire", token, None)
                    .unwrap()
            })
        };
        let r = ask(None).await.unwrap();
        assert_eq!(r.status, 401);
        let r = ask(Some("admin-secret")).await.unwrap();
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(
            r.body.contains("pending seen: true; actor token-file"),
            "{}",
            r.body
        );
        let stored = store
            .load_audit(&AuditQuery {
                limit: 10,
                ..AuditQuery::default()
            })
            .unwrap();
        assert_eq!(stored.len(), 1, "the 401 is not stored: {stored:?}");
        let e = &stored[0].entry;
        assert_eq!(
            (e.outcome, e.status, e.detail.as_str(), e.role.as_str()),
            (Outcome::Refused, 409, "extra=1", "admin")
        );
        assert!(e.message.starts_with("pending seen: true"), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn actions_are_named_after_their_route() {
        assert_eq!(
            action_of(
                &Method::POST,
                "/v1/devices/{id}/{op}",
                &p(&[("id", "d1"), ("op", "pin")])
            ),
            ("pin".into(), "d1".into())
        );
        assert_eq!(
            action_of(
                &Method::POST,
                "/v1/rollouts/{shard}/{op}",
                &p(&[("shard", "vpn"), ("op", "promote")])
            ),
            ("rollout promote".into(), "vpn".into())
        );
        assert_eq!(
            action_of(&Method::POST, "/v1/catalog/reload", &[]),
            ("catalog reload".into(), String::new())
        );
        assert_eq!(
            action_of(&Method::DELETE, "/v1/things/{id}", &p(&[("id", "x")])),
            ("delete things".into(), "x".into())
        );
    }
}
