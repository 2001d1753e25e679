//! The embedded MQTT broker: rumqttd on its own thread (its `start` blocks and
//! it has no graceful shutdown, so it lives as long as the process), built
//! without its rustls feature (which would pull aws-lc-rs). MQTT over TLS is
//! terminated in front of it by [`tls_front`]: a tokio-rustls (ring) listener
//! that forwards each verified connection to the plain listener.

use super::config::BrokerConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the embedded broker did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker did not accept connections on {0} within 10 s")]
    NotReady(SocketAddr),
    #[error("embedded broker thread: {0}")]
    Thread(std::io::Error),
}

fn rumqttd_config(cfg: &BrokerConfig) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        // The broker lets through up to 4× the ingest cap so that oversize
        // reports reach ingest and are counted there, instead of silently
        // costing the device its connection.
        max_payload_size: cfg.max_payload.saturating_mul(4).max(1 << 20),
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_owned(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen: cfg.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        },
    );
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 1000,
            // Segments bound the broker's in-memory log per subscription filter.
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    }
}

/// Starts rumqttd on a thread and waits until its plain listener accepts.
pub fn start_embedded(cfg: &BrokerConfig) -> Result<(), BrokerError> {
    // rumqttd reports a failed bind only inside its thread: probe first so
    // the operator gets the error (a small race with another process remains).
    drop(
        std::net::TcpListener::bind(cfg.listen).map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?,
    );
    let config = rumqttd_config(cfg);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = cfg.listen;
    while Instant::now() < deadline {
        if is_listening(probe) {
            tracing::info!(listen = %cfg.listen, "embedded MQTT broker up");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady(cfg.listen))
}

/// Whether something listens on `addr`'s port. Reads the kernel's socket
/// tables rather than connecting: a probe connection would show up in the
/// broker's log as a failed client. Falls back to connecting without /proc.
fn is_listening(addr: SocketAddr) -> bool {
    const TCP_LISTEN: &str = "0A";
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        readable = true;
        let found = text.lines().skip(1).any(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1).unwrap_or("");
            let state = cols.nth(1).unwrap_or("");
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            state == TCP_LISTEN && port == Some(addr.port())
        });
        if found {
            return true;
        }
    }
    if !readable {
        let target = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        return std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok();
    }
    false
}

/// Accepts MQTT over TLS on `listen` and forwards each connection, once its
/// handshake (and client certificate, when required) succeeded, to `plain`.
pub async fn tls_front(
    listen: SocketAddr,
    plain: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Result<(), BrokerError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
    let plain = if plain.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], plain.port()))
    } else {
        plain
    };
    tracing::info!(%listen, "MQTT over TLS listener up");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                let mut tls = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let mut upstream = match tokio::net::TcpStream::connect(plain).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the plain broker listener");
                        return;
                    }
                };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    Ok(())
}
