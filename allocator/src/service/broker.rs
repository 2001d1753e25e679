//! The embedded MQTT broker: rumqttd on its own thread (its `start` blocks and
//! it has no graceful shutdown, so it lives as long as the process), built
//! without its rustls feature (which would pull aws-lc-rs). MQTT over TLS is
//! terminated in front of it by [`tls_front`]: a tokio-rustls (ring) listener
//! that forwards each verified connection to the plain listener.
//!
//! Hostile neighbours (issue 14, SECURITY.md "Broker neighbours"):
//! - every packet is capped at [`MAX_PACKET`] (1 MiB), the cap the agent's
//!   client is built around (`agent::daemon::link::BROKER_MAX_PACKET`): a
//!   larger publish costs its publisher the connection and never reaches a
//!   subscriber, so it can neither wedge a device nor the allocator;
//! - with a credentials file ([`Credentials`], [`start_embedded_with`]) every
//!   client must log in: a device as its device id with the password issued
//!   to it, under the client id `shardline-agent-<id>` only (so nobody else
//!   can take over its persistent session), an allocator under its own
//!   name. rumqttd 0.20 has no hook for topic authorization, so a logged-in
//!   device can still publish on another device's topics; deployments that
//!   need topic ACLs run mosquitto with `packaging/mosquitto/`.

use super::config::BrokerConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest MQTT packet (remaining length) the embedded broker accepts. The
/// allocator's own client accepts `max(4 × max_payload, 1 MiB) + 1 KiB`
/// and the agent's 1 MiB + 4 KiB, so whatever the broker forwards, both
/// can read.
pub const MAX_PACKET: usize = 1 << 20;

/// Client ids of devices: `shardline-agent-<device id>` (the agent default).
pub const DEVICE_CLIENT_PREFIX: &str = "shardline-agent-";

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
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// Why the broker credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("broker credentials file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "broker credentials file {path}: mode {mode:o} lets others read the passwords; \
         expected 0600 or stricter"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("broker credentials file {path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Who may connect to the embedded broker. File format, one entry a line
/// (`#` comments): `device <device id> <password>` or
/// `allocator <name> <password>`; mode 0600. Passwords are long random
/// secrets issued per device (not memorised), so they are compared in
/// constant time, not hashed.
#[derive(Clone, Default)]
pub struct Credentials {
    devices: HashMap<String, String>,
    allocators: HashMap<String, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passwords.
        f.debug_struct("Credentials")
            .field("devices", &self.devices.len())
            .field("allocators", &self.allocators.len())
            .finish()
    }
}

impl Credentials {
    /// Reads and checks a credentials file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| CredentialsError::Io {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(path, &text)
    }

    /// Parses the text of a credentials file (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, CredentialsError> {
        let mut c = Credentials::default();
        for (i, line) in text.lines().enumerate() {
            let invalid = |message: String| CredentialsError::Invalid {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, password] = fields[..] else {
                return Err(invalid(
                    "expected `device <id> <password>` or `allocator <name> <password>`".into(),
                ));
            };
            if password.len() < 16 {
                return Err(invalid(format!(
                    "the password of {name} is shorter than 16 characters"
                )));
            }
            let map = match role {
                "device" => {
                    shardline_shared::DeviceId::new(name)
                        .map_err(|e| invalid(format!("{name:?} is not a device id: {e}")))?;
                    &mut c.devices
                }
                "allocator" => &mut c.allocators,
                other => {
                    return Err(invalid(format!(
                        "unknown role {other:?} (device or allocator)"
                    )))
                }
            };
            if map.insert(name.to_owned(), password.to_owned()).is_some() {
                return Err(invalid(format!("{role} {name} is listed twice")));
            }
        }
        Ok(c)
    }

    /// Adds an allocator login (e.g. a random one the service makes for its
    /// own in-process client at start, so the operator need not write it in
    /// the file). Refused when the name is taken.
    /// The device logins (their topics are restricted by `broker_acl`).
    pub fn device_logins(&self) -> std::collections::HashSet<String> {
        self.devices.keys().cloned().collect()
    }

    pub fn add_allocator(&mut self, name: &str, password: &str) -> bool {
        if self.devices.contains_key(name) || self.allocators.contains_key(name) {
            return false;
        }
        self.allocators.insert(name.to_owned(), password.to_owned());
        true
    }

    /// Whether a CONNECT with these client id, username and password is let
    /// in. A device must use its own client id; nobody else may use a
    /// device's client id.
    pub fn admit(&self, client_id: &str, username: &str, password: &str) -> bool {
        if let Some(expected) = self.devices.get(username) {
            return client_id.strip_prefix(DEVICE_CLIENT_PREFIX) == Some(username)
                && ct_eq(expected, password);
        }
        if let Some(expected) = self.allocators.get(username) {
            return !client_id.starts_with(DEVICE_CLIENT_PREFIX) && ct_eq(expected, password);
        }
        false
    }
}

/// Constant-time string comparison (length may leak, content does not).
fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn rumqttd_config(cfg: &BrokerConfig, credentials: Option<Arc<Credentials>>) -> rumqttd::Config {
    if cfg.max_payload > MAX_PACKET {
        tracing::warn!(
            max_payload = cfg.max_payload,
            cap = MAX_PACKET,
            "broker.max_payload is above the embedded broker's packet cap; the cap wins"
        );
    }
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        // A fixed cap, not one derived from the ingest cap: the devices'
        // clients are built around it (see MAX_PACKET), and a payload above
        // the ingest cap but below this one still reaches ingest and is
        // counted there instead of costing the device its connection.
        max_payload_size: MAX_PACKET,
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(creds) = credentials {
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let creds = creds.clone();
            async move {
                let ok = creds.admit(&client_id, &user, &pass);
                if !ok {
                    tracing::warn!(%client_id, username = %user, "broker login refused");
                }
                ok
            }
        });
    }
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
/// Anonymous clients are let in: use [`start_embedded_with`] and a
/// credentials file for a broker other programs can reach.
pub fn start_embedded(cfg: &BrokerConfig) -> Result<(), BrokerError> {
    start_embedded_with(cfg, None)
}

/// Like [`start_embedded`]; with `credentials_file`, every client must log
/// in as one of its entries (see [`Credentials`]).
pub fn start_embedded_with(
    cfg: &BrokerConfig,
    credentials_file: Option<&Path>,
) -> Result<(), BrokerError> {
    let credentials = credentials_file.map(Credentials::load).transpose()?;
    start_embedded_with_credentials(cfg, credentials)
}

/// Like [`start_embedded_with`], with credentials already loaded (and
/// perhaps extended with [`Credentials::add_allocator`]).
pub fn start_embedded_with_credentials(
    cfg: &BrokerConfig,
    credentials: Option<Credentials>,
) -> Result<(), BrokerError> {
    let credentials = credentials.map(Arc::new);
    if let Some(c) = &credentials {
        tracing::info!(
            devices = c.devices.len(),
            allocators = c.allocators.len(),
            "embedded broker: logins required"
        );
    } else {
        tracing::warn!("embedded broker: anonymous clients are let in (no credentials file)");
    }
    // rumqttd reports a failed bind only inside its thread: probe first so
    // the operator gets the error (a small race with another process remains).
    drop(
        std::net::TcpListener::bind(cfg.listen).map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?,
    );
    let config = rumqttd_config(cfg, credentials);
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

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# devices\n\
        device gw-1 0123456789abcdef0123\n\
        device gw-2 fedcba9876543210fedc\n\
        allocator alloc-a aaaaaaaaaaaaaaaaaaaaaaaa\n";

    #[test]
    fn devices_log_in_only_as_themselves_under_their_own_client_id() {
        let c = Credentials::parse(Path::new("creds"), FILE).unwrap();
        assert!(c.admit("shardline-agent-gw-1", "gw-1", "0123456789abcdef0123"));
        assert!(!c.admit("shardline-agent-gw-1", "gw-1", "0123456789abcdef0124"));
        assert!(!c.admit("shardline-agent-gw-2", "gw-1", "0123456789abcdef0123"));
        assert!(!c.admit("anything", "gw-1", "0123456789abcdef0123"));
        assert!(!c.admit("shardline-agent-gw-1", "", ""));
        assert!(c.admit(
            "shardline-allocator-7",
            "alloc-a",
            "aaaaaaaaaaaaaaaaaaaaaaaa"
        ));
        assert!(
            !c.admit(
                "shardline-agent-gw-1",
                "alloc-a",
                "aaaaaaaaaaaaaaaaaaaaaaaa"
            ),
            "an allocator cannot take over a device's session"
        );
        assert!(
            !format!("{c:?}").contains("0123456789"),
            "Debug hides passwords"
        );
        let mut c = c;
        assert!(
            !c.add_allocator("gw-1", "xxxxxxxxxxxxxxxxxxxx"),
            "a device's name"
        );
        assert!(c.add_allocator("self", "yyyyyyyyyyyyyyyyyyyy"));
        assert!(c.admit("shardline-allocator-1", "self", "yyyyyyyyyyyyyyyyyyyy"));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, line) in [
            ("device gw-1\n", 1),
            ("\n# c\ndevice gw-1 short\n", 3),
            ("device gw/1 0123456789abcdef0123\n", 1),
            ("admin x 0123456789abcdef0123\n", 1),
            (
                "device a 0123456789abcdef0123\ndevice a 0123456789abcdef0123\n",
                2,
            ),
        ] {
            match Credentials::parse(Path::new("/etc/creds"), text) {
                Err(CredentialsError::Invalid { line: l, path, .. }) => {
                    assert_eq!((l, path.to_str().unwrap()), (line, "/etc/creds"), "{text}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_readable_credentials_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        // No tempfile dev-dependency here: a private file under the temp dir.
        let p = std::env::temp_dir().join(format!("shardline-creds-{}", std::process::id()));
        std::fs::write(&p, FILE).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Credentials::load(&p),
            Err(CredentialsError::TooOpen { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Credentials::load(&p).is_ok());
        let _ = std::fs::remove_file(&p);
    }
}
