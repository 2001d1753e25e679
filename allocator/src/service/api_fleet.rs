//! The fleet routes of the operator API, for the dashboard: the summary
//! (`GET /v1/fleet`), the paged and filtered device list (`GET /v1/devices`
//! with `offset`, `limit`, `q`, `tier`, `tenant`; without any of them the
//! route keeps its old answer, the whole list as an array), and the live
//! event stream (`GET /v1/events`, server-sent events).
//!
//! The stream is a [`LiveHub`]: a bounded `tokio::sync::broadcast` the
//! runner feeds after each committed step (and other parts of the service
//! may feed: audit, rollouts, diagnostics). A slow client loses events
//! rather than slowing anything down: the broadcast never waits for a
//! receiver, and what a client missed is counted
//! (`shardline_live_events_dropped_total`).

// Handlers answer errors with a ready `Response`; that is axum's idiom.
#![allow(clippy::result_large_err)]

use super::api::{answer, error, ApiState};
use super::core::fleet::DeviceQuery;
use super::core::live::LiveNote;
use super::core::Command;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Events the broadcast holds for its slowest receiver before that one
/// starts losing the oldest.
pub const LIVE_CAPACITY: usize = 1024;
/// Events queued for one client's socket before its forwarder waits (and
/// the broadcast, not the service, drops for it).
const CLIENT_QUEUE: usize = 64;
/// Concurrent event-stream clients (each holds a task and a queue).
pub const MAX_CLIENTS: usize = 64;

/// One event: its SSE name and its JSON text.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub name: &'static str,
    /// The device it concerns, if any (for the `device` filter).
    pub device: Option<String>,
    pub data: Arc<str>,
}

/// The live event stream's fan-out, with its drop and client counters.
#[derive(Debug, Clone)]
pub struct LiveHub {
    tx: broadcast::Sender<LiveEvent>,
    dropped: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    clients: Arc<AtomicU64>,
}

impl Default for LiveHub {
    fn default() -> Self {
        Self::new(LIVE_CAPACITY)
    }
}

impl LiveHub {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            dropped: Arc::default(),
            sent: Arc::default(),
            clients: Arc::default(),
        }
    }

    /// Sends one event to every connected client; never waits. Nothing is
    /// serialized while nobody listens.
    pub fn publish(&self, name: &'static str, device: Option<&str>, data: &serde_json::Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let event = LiveEvent {
            name,
            device: device.map(str::to_owned),
            data: data.to_string().into(),
        };
        if self.tx.send(event).is_ok() {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The notes of one committed step.
    pub fn publish_notes(&self, notes: &[LiveNote]) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        for note in notes {
            let device = note.device().map(|d| d.to_string());
            let data = serde_json::to_value(note).unwrap_or_default();
            self.publish(note.event(), device.as_deref(), &data);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }

    /// Events clients lost because they read too slowly.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The Prometheus text of the stream's counters.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP shardline_live_events_sent_total Events put on the dashboard's live stream.\n\
             # TYPE shardline_live_events_sent_total counter\n\
             shardline_live_events_sent_total {}\n\
             # HELP shardline_live_events_dropped_total Live events slow clients lost.\n\
             # TYPE shardline_live_events_dropped_total counter\n\
             shardline_live_events_dropped_total {}\n\
             # HELP shardline_live_clients Clients connected to the live stream.\n\
             # TYPE shardline_live_clients gauge\n\
             shardline_live_clients {}\n",
            self.sent.load(Ordering::Relaxed),
            self.dropped(),
            self.clients.load(Ordering::Relaxed),
        )
    }
}

/// The query of `GET /v1/devices`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    offset: Option<usize>,
    limit: Option<usize>,
    q: Option<String>,
    tier: Option<String>,
    tenant: Option<String>,
}

impl DevicesQuery {
    fn is_empty(&self) -> bool {
        self.offset.is_none()
            && self.limit.is_none()
            && self.q.is_none()
            && self.tier.is_none()
            && self.tenant.is_none()
    }
}

/// Empty strings are "no filter" (a search box left empty).
fn filter(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// `GET /v1/devices[?offset=&limit=&q=&tier=&tenant=]`.
pub async fn list_devices(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if query.is_empty() {
        return answer(&state, &headers, Command::ListDevices).await;
    }
    if query.limit == Some(0) {
        return error(StatusCode::BAD_REQUEST, "limit must be at least 1");
    }
    let q = DeviceQuery {
        offset: query.offset.unwrap_or(0),
        limit: query.limit,
        q: filter(query.q),
        tier: filter(query.tier),
        tenant: filter(query.tenant),
    };
    answer(&state, &headers, Command::DevicePage(q)).await
}

/// `GET /v1/fleet`.
pub async fn fleet(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    answer(&state, &headers, Command::Fleet).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events about this device (and those about no device).
    device: Option<String>,
}

/// `GET /v1/events[?device=ID]`: server-sent events until the client goes.
pub async fn events(
    State(state): State<ApiState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let device = match query {
        Ok(Query(q)) => filter(q.device),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let hub = state.live.clone();
    if hub.clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS as u64 {
        hub.clients.fetch_sub(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_CLIENTS} live clients are connected already"),
        );
    }
    let mut rx = hub.subscribe();
    let (tx, out) = mpsc::channel::<Event>(CLIENT_QUEUE);
    tokio::spawn(async move {
        // `hello` first, so a client knows the stream is open.
        let _ = tx.send(Event::default().event("hello").data("{}")).await;
        loop {
            let next = tokio::select! {
                r = rx.recv() => r,
                () = tx.closed() => break,
            };
            match next {
                Ok(ev) => {
                    if device.is_some() && ev.device.is_some() && ev.device != device {
                        continue;
                    }
                    let sse = Event::default().event(ev.name).data(&*ev.data);
                    if tx.send(sse).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    hub.dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(lost = n, "a live client reads too slowly; it lost events");
                    // Tell the client, so it can refetch what it shows.
                    let data = serde_json::json!({ "lost": n }).to_string();
                    let _ = tx.try_send(Event::default().event("lagged").data(data));
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        hub.clients.fetch_sub(1, Ordering::Relaxed);
    });
    Sse::new(EventStream(out))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A client's queue as the `Stream` axum's SSE body reads.
struct EventStream(mpsc::Receiver<Event>);

impl futures_core::Stream for EventStream {
    type Item = Result<Event, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_receiver_loses_events_and_they_are_counted() {
        let hub = LiveHub::new(4);
        let mut rx = hub.subscribe();
        for i in 0..10 {
            hub.publish("report", Some("d"), &serde_json::json!({ "i": i }));
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected a lag, got {other:?}"),
        }
        // The newest four are still there, oldest first.
        let ev = rx.recv().await.expect("an event");
        assert_eq!(&*ev.data, r#"{"i":6}"#);
    }

    #[test]
    fn nothing_is_serialized_without_a_listener() {
        let hub = LiveHub::new(4);
        hub.publish("report", None, &serde_json::json!({}));
        assert!(hub
            .render_metrics()
            .contains("shardline_live_events_sent_total 0"));
    }
}
