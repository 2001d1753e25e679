//! `allocator.toml`: the service's configuration file, and how command-line
//! flags override it.
//!
//! Every field has a default so an empty file (or none, with `--config` not
//! given and `/etc/shardline/allocator.toml` absent) runs a complete embedded
//! allocator. Unknown fields are errors; every error names the file, the
//! line and the field, so an operator can fix it from the message alone.

use serde::Deserialize;
use shardline_allocator_core::policy::PolicyConfig;
use shardline_support::toml_diag;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/shardline/allocator.toml";

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A command-line flag that overrides the file is invalid.
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("{path}:{line}: field `{field}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        field: String,
        message: String,
    },
}

/// Where the MQTT broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    Tcp { host: String, port: u16 },
    Tls { host: String, port: u16 },
}

impl BrokerUrl {
    /// Parses `mqtt://host:port` or `mqtts://host:port` (the port is
    /// required here: the allocator names its broker explicitly).
    pub fn parse(url: &str) -> Result<Self, String> {
        let u = shardline_support::broker_url::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
        let port = u.port.ok_or_else(|| format!("{url:?} lacks a port"))?;
        let host = u.host;
        Ok(if u.tls {
            BrokerUrl::Tls { host, port }
        } else {
            BrokerUrl::Tcp { host, port }
        })
    }
}

/// `[broker]`: embedded (default) or external.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt(s)://host:port` of an external broker; empty = run the embedded one.
    pub url: String,
    /// More nodes of the same clustered broker, tried in order after `url`
    /// when a connection fails or drops (see [`Config::broker_urls`]).
    /// Alone (no `url`), its first entry is the broker.
    pub urls: Vec<String>,
    /// Which uplink topics this instance reads (issue 19; see [`UplinkMode`]).
    pub uplink: UplinkMode,
    /// Keep this instance's MQTT session (clean session off) across
    /// reconnects: QoS 1 messages for it are queued while it is away, and
    /// a NATS cluster keeps its subscriptions' consumers instead of making
    /// them again on every reconnect. The client id is then fixed (see
    /// `client_id`).
    pub persistent_session: bool,
    /// Embedded broker: plain MQTT listener.
    pub listen: SocketAddr,
    /// Embedded broker: MQTT over TLS listener (needs `tls_cert`, `tls_key`).
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Embedded broker: require device client certificates signed by this CA.
    pub tls_client_ca: Option<PathBuf>,
    /// External `mqtts://` broker: CA to trust, and our client certificate.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT client id; each instance behind a shared subscription needs its
    /// own. Empty (the default): `shardline-allocator-{[instance] id}` when
    /// the session persists, else one per process ([`super::client_id`]).
    pub client_id: String,
    /// Largest MQTT payload accepted (broker) and report decoded (ingest).
    pub max_payload: usize,
    /// Embedded broker connection limit.
    pub max_connections: usize,
    /// Embedded broker: every client must log in as one of this file's
    /// entries (mode 0600; see `packaging/INSTALL.md`, "Broker identities").
    /// Without it anonymous clients are let in (a warning at start).
    pub credentials_file: Option<PathBuf>,
}

/// `[broker] uplink`: how an allocator instance reads devices' uplinks
/// (reports, acks, enrolments, requests, diagnostics) from an external
/// broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkMode {
    /// Every instance reads the plain topics through the allocators' MQTT
    /// shared subscription (`$share/allocators/…`: mosquitto, the embedded
    /// broker), and also its assigned groups' routed filters; several
    /// instances split the fleet.
    #[default]
    Shared,
    /// A broker without shared subscriptions (NATS 2.9, RabbitMQ 3.10):
    /// only the instance holding the store's lead reads the plain topics;
    /// the others read only the group-routed topics of the groups assigned
    /// to them. The session persists.
    Routed,
    /// The plain topics, no `$share/`: ONE instance on a broker without
    /// shared subscriptions.
    Plain,
}

/// Why the embedded broker may not listen on port 0.
pub const ZERO_PORT: &str =
    "port 0 would bind a random port that neither devices nor this service's own client are told; give a fixed port";

impl BrokerConfig {
    /// The embedded broker's listener that asks for port 0, if any.
    pub fn zero_port(&self) -> Option<SocketAddr> {
        std::iter::once(self.listen)
            .chain(self.tls_listen)
            .find(|a| a.port() == 0)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            urls: Vec::new(),
            uplink: UplinkMode::Shared,
            persistent_session: false,
            listen: ([127, 0, 0, 1], 1883).into(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            client_id: String::new(),
            max_payload: 64 * 1024,
            max_connections: 20_000,
            credentials_file: None,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The embedded store's file (ignored when `url` is set).
    pub path: PathBuf,
    /// `postgres://user[:password]@host[:port]/db` (or `postgresql://`): a
    /// PostgreSQL store shared by several allocator instances. When set it
    /// is used and `path` is ignored.
    pub url: Option<String>,
    /// Every device's engine state is also checkpointed this often (state that
    /// changes only with time, e.g. reputation decay, is otherwise written lazily).
    pub checkpoint_s: u64,
    /// Engine state that changed without any action (forecast accumulation,
    /// reputation decay) is written at most this long after the change; a
    /// crash loses at most this much of it. Report sequence floors, leases,
    /// instructions, reputation changes, payments and transfers of units
    /// are written before anything is sent.
    pub engine_flush_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "/var/lib/shardline-allocator/allocator.redb".into(),
            url: None,
            checkpoint_s: 300,
            engine_flush_ms: 5_000,
        }
    }
}

/// `[signer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignerConfig {
    pub key_file: PathBuf,
}

impl Default for SignerConfig {
    fn default() -> Self {
        Self {
            key_file: "/var/lib/shardline-allocator/signing.key".into(),
        }
    }
}

/// `[api]`: the operator HTTP API and /metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token (mode 0600). Empty: no API.
    pub token_file: Option<PathBuf>,
    /// /metrics needs no token (it carries no device secrets).
    pub metrics_public: bool,
    /// PEM certificate chain: with `tls_key`, the API speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8440).into(),
            token_file: None,
            metrics_public: true,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[policy]`: the engine's data files and tunables.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    pub catalog: PathBuf,
    pub agreements: PathBuf,
    /// How often the engine's `Tick` runs (leases, loans, rebalancing).
    pub tick_ms: u64,
    pub engine: PolicyConfig,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            catalog: "/etc/shardline/catalog.toml".into(),
            agreements: "/etc/shardline/agreements.toml".into(),
            tick_ms: 1000,
            engine: PolicyConfig::default(),
        }
    }
}

/// `[dispatch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Re-send an instruction not known to be applied after this long.
    pub resend_after_ms: u64,
    /// Largest batch of inbound messages handled (and committed) together.
    pub max_batch: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            resend_after_ms: 15_000,
            max_batch: 2048,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    pub store: StoreConfig,
    pub signer: SignerConfig,
    pub api: ApiConfig,
    pub policy: PolicySection,
    pub dispatch: DispatchConfig,
    pub history: HistoryConfig,
    /// `[audit]`: the audit log's bounds (issue 20).
    pub audit: super::audit::AuditConfig,
    /// `[instance]` and `[assignment]` (issue 19, `assign_config`).
    pub instance: super::assign_config::InstanceConfig,
    pub assignment: super::assign_config::AssignmentSection,
    /// The file this was read from (`None`: defaults, no file); SIGHUP
    /// reads it again for the assignment's groups.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[history]`: what is kept of each device's past (QoS windows,
/// instructions, reputation changes, decisions) for the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Entries older than this are pruned.
    pub retention_days: u64,
    /// At most this many entries per device; the oldest go first. The
    /// store holds at most about devices × this × 150 bytes of history.
    pub max_entries_per_device: usize,
    /// Reports are summarised per traffic class over windows this long
    /// (0 keeps no QoS history).
    pub qos_window_s: u64,
    /// How often the history is pruned.
    pub prune_every_s: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let limits = shardline_allocator_core::history::HistoryLimits::default();
        Self {
            retention_days: limits.retention_ms / 86_400_000,
            max_entries_per_device: limits.max_per_device,
            qos_window_s: limits.qos_window_ms / 1000,
            prune_every_s: 600,
        }
    }
}

impl Config {
    /// Reads `path`; when `required` is false a missing file yields the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: shown,
                    source,
                })
            }
        };
        let mut config = Self::from_toml_str(&text, &shown)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    pub fn from_toml_str(text: &str, path: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(text, path, e))?;
        check_broker_urls(&config.broker)
            .map_err(|message| invalid_in_section(text, path, "broker", "urls", message))?;
        if config.broker.url.is_empty() {
            if let Some(first) = config.broker.urls.first() {
                config.broker.url = first.clone();
            }
        }
        if !config.broker.url.is_empty() {
            BrokerUrl::parse(&config.broker.url)
                .map_err(|message| invalid_at_key(text, path, "url", message))?;
        }
        if config.broker.url.is_empty() {
            if let Some(addr) = config.broker.zero_port() {
                return Err(invalid_in_section(
                    text,
                    path,
                    "broker",
                    if addr == config.broker.listen {
                        "listen"
                    } else {
                        "tls_listen"
                    },
                    ZERO_PORT.into(),
                ));
            }
        }
        if config.broker.credentials_file.is_some() && !config.broker.url.is_empty() {
            return Err(invalid_at_key(
                text,
                path,
                "credentials_file",
                "applies to the embedded broker only; an external broker has its own logins".into(),
            ));
        }
        if config.broker.tls_listen.is_some()
            && (config.broker.tls_cert.is_none() || config.broker.tls_key.is_none())
        {
            return Err(invalid_at_key(
                text,
                path,
                "tls_listen",
                "needs tls_cert and tls_key".into(),
            ));
        }
        if let Some(url) = &config.store.url {
            check_store_url(url)
                .map_err(|message| invalid_in_section(text, path, "store", "url", message))?;
        }
        if let Err((field, message)) = config.policy.engine.check() {
            let (section, field) = if let Some(f) = field.strip_prefix("requests.") {
                ("policy.engine.requests", f)
            } else if matches!(field, "canary_permille" | "failure_threshold_pct") {
                ("policy.engine.rollout", field)
            } else if matches!(field, "initial" | "half_life_ms") {
                ("policy.engine.reputation", field)
            } else {
                ("policy.engine", field)
            };
            return Err(invalid_in_section(text, path, section, field, message));
        }
        let h = &config.history;
        let history_error = match () {
            _ if h.retention_days == 0 => Some(("retention_days", "must be at least 1")),
            _ if h.max_entries_per_device == 0 => {
                Some(("max_entries_per_device", "must be at least 1"))
            }
            _ if h.qos_window_s != 0 && h.qos_window_s < 10 => {
                Some(("qos_window_s", "must be 0 (no QoS history) or at least 10"))
            }
            _ if h.prune_every_s == 0 => Some(("prune_every_s", "must be at least 1")),
            _ => None,
        };
        if let Some((field, message)) = history_error {
            return Err(invalid_in_section(
                text,
                path,
                "history",
                field,
                message.into(),
            ));
        }
        match (&config.api.tls_cert, &config.api.tls_key) {
            (Some(_), None) => {
                return Err(invalid_in_section(
                    text,
                    path,
                    "api",
                    "tls_cert",
                    "needs tls_key as well".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid_in_section(
                    text,
                    path,
                    "api",
                    "tls_key",
                    "needs tls_cert as well".into(),
                ))
            }
            _ => {}
        }
        if config.audit.retention_days == 0 {
            return Err(invalid_in_section(
                text,
                path,
                "audit",
                "retention_days",
                "must be > 0".into(),
            ));
        }
        if config.audit.max_entries == 0 {
            return Err(invalid_in_section(
                text,
                path,
                "audit",
                "max_entries",
                "must be > 0".into(),
            ));
        }
        if config.policy.tick_ms == 0 {
            return Err(invalid_at_key(text, path, "tick_ms", "must be > 0".into()));
        }
        let written = super::client_id::Written::of(text);
        if let Err((field, message)) = super::client_id::check(&config.broker, written) {
            return Err(invalid_in_section(text, path, "broker", field, message));
        }
        if let Err(e) = super::assign_config::check(&config.instance, &config.assignment) {
            return Err(invalid_in_section(
                text, path, e.section, e.field, e.message,
            ));
        }
        if config.dispatch.max_batch == 0 {
            return Err(invalid_at_key(
                text,
                path,
                "max_batch",
                "must be > 0".into(),
            ));
        }
        Ok(config)
    }

    /// Every configured node of the external broker, `url` first, without
    /// repeats (empty: the embedded broker). The MQTT link moves to the next
    /// one when a connection fails or drops.
    pub fn broker_urls(&self) -> Vec<BrokerUrl> {
        let mut seen: Vec<&str> = Vec::new();
        std::iter::once(self.broker.url.as_str())
            .chain(self.broker.urls.iter().map(String::as_str))
            .filter(|u| !u.is_empty())
            .filter(|u| {
                let new = !seen.contains(u);
                seen.push(u);
                new
            })
            .filter_map(|u| BrokerUrl::parse(u).ok())
            .collect()
    }

    /// The MQTT client id to connect with ([`super::client_id::effective`]).
    pub fn mqtt_client_id(&self) -> String {
        super::client_id::effective(&self.broker, &self.instance.id)
    }

    /// The external broker, if one is configured.
    pub fn broker_url(&self) -> Option<BrokerUrl> {
        if self.broker.url.is_empty() {
            None
        } else {
            BrokerUrl::parse(&self.broker.url).ok()
        }
    }
}

/// `[broker] urls`: each parses, and all share `url`'s scheme (one TLS
/// configuration serves every node).
fn check_broker_urls(b: &BrokerConfig) -> Result<(), String> {
    // A bad `url` is reported at `url` by the caller.
    let mut tls: Option<bool> = BrokerUrl::parse(&b.url)
        .ok()
        .map(|u| matches!(u, BrokerUrl::Tls { .. }));
    for u in &b.urls {
        let parsed = BrokerUrl::parse(u).map_err(|e| format!("{u:?}: {e}"))?;
        let is_tls = matches!(parsed, BrokerUrl::Tls { .. });
        if tls.is_some_and(|t| t != is_tls) {
            return Err("mixes mqtt:// and mqtts:// nodes; use one scheme for every node".into());
        }
        tls = Some(is_tls);
    }
    Ok(())
}

/// A `[store] url`: `postgres://` or `postgresql://` that the PostgreSQL
/// client accepts. The message never repeats the url (it may hold a password).
fn check_store_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be postgres://user@host:port/db or postgresql://...".into());
    }
    url.parse::<postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a PostgreSQL connection url: {e}"))
}

/// An error at `key` inside `[section]` (a key such as `url` appears in
/// several sections).
fn invalid_in_section(
    text: &str,
    path: &str,
    section: &str,
    key: &str,
    message: String,
) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        line: toml_diag::line_of_key(text, Some(section), key),
        field: key.to_owned(),
        message,
    }
}

/// An error at the first `key = …` line.
fn invalid_at_key(text: &str, path: &str, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        line: toml_diag::line_of_key(text, None, key),
        field: key.to_owned(),
        message,
    }
}

fn parse_error(text: &str, path: &str, e: toml::de::Error) -> ConfigError {
    let at = toml_diag::parse_error(text, &e);
    ConfigError::Invalid {
        path: path.to_owned(),
        line: at.line,
        field: at.field,
        message: at.message,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn broker_urls_list_the_nodes_url_first_and_uplink_defaults_to_shared() {
        let c = Config::from_toml_str(
            "[broker]\nurls = [\"mqtt://a:1\", \"mqtt://b:2\", \"mqtt://a:1\"]\nuplink = \"plain\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.broker.url, "mqtt://a:1", "the first node is the broker");
        assert_eq!(c.broker.uplink, UplinkMode::Plain);
        assert!(!c.broker.persistent_session);
        let hosts: Vec<BrokerUrl> = c.broker_urls();
        assert_eq!(
            hosts,
            vec![
                BrokerUrl::Tcp {
                    host: "a".into(),
                    port: 1
                },
                BrokerUrl::Tcp {
                    host: "b".into(),
                    port: 2
                },
            ]
        );
        let c = Config::from_toml_str("[broker]\nurl = \"mqtt://a:1\"\n", "c.toml").unwrap();
        assert_eq!(c.broker_urls().len(), 1);
        assert_eq!(c.broker.uplink, UplinkMode::Shared);
        assert!(Config::from_toml_str("", "c.toml")
            .unwrap()
            .broker_urls()
            .is_empty());
    }

    #[test]
    fn bad_broker_urls_name_their_line_and_change_nothing() {
        let err = Config::from_toml_str(
            "[broker]\nurl = \"mqtt://a:1\"\nurls = [\"mqtts://b:2\"]\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("c.toml:3: field `urls`"), "{err}");
        assert!(err.contains("mixes"), "{err}");
        let err = Config::from_toml_str("[broker]\nurls = [\"mqtt://b\"]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2: field `urls`"), "{err}");
        let err = Config::from_toml_str("[broker]\nuplink = \"routd\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2"), "{err}");
    }

    use super::*;

    #[test]
    fn an_empty_file_is_a_complete_embedded_configuration() {
        let c = Config::from_toml_str("", "a.toml").unwrap();
        assert!(c.broker_url().is_none());
        assert_eq!(c.broker.listen.port(), 1883);
    }

    #[test]
    fn a_history_bound_of_zero_is_refused_at_its_line() {
        let text = "[history]\nretention_days = 3\nmax_entries_per_device = 0\n";
        let err = Config::from_toml_str(text, "h.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("h.toml:3"), "{err}");
        assert!(err.contains("max_entries_per_device"), "{err}");
        let err = Config::from_toml_str("[history]\nqos_window_s = 5\n", "h.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("h.toml:2") && err.contains("qos_window_s"),
            "{err}"
        );
        let ok = Config::from_toml_str("[history]\nqos_window_s = 0\n", "h.toml").unwrap();
        assert_eq!(ok.history.qos_window_s, 0);
        assert_eq!(ok.history.max_entries_per_device, 4_000);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[broker]\nlisten = \"127.0.0.1:1\"\nmax_payload = \"big\"\n";
        let err = Config::from_toml_str(text, "/etc/a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/a.toml:3: field `max_payload`"),
            "{err}"
        );
        let err = Config::from_toml_str("[api]\nlisten = \"127.0.0.1:2\"\nbogus = 1\n", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.toml:3") && err.contains("`bogus`"), "{err}");
        let err = Config::from_toml_str("[broker]\n\nurl = \"http://x:1\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3: field `url`"), "{err}");
    }

    #[test]
    fn a_store_url_must_be_postgres_and_errors_name_its_line() {
        let ok = "[store]\nurl = \"postgresql://sl@db.example:5432/shardline\"\n";
        let c = Config::from_toml_str(ok, "a.toml").unwrap();
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgresql://sl@db.example:5432/shardline")
        );
        assert!(Config::from_toml_str("", "a.toml")
            .unwrap()
            .store
            .url
            .is_none());
        // The broker's `url` comes first; the error points at the store's.
        let text = "[broker]\nurl = \"mqtt://b:1883\"\n[store]\nurl = \"mysql://u:secret@h/db\"\n";
        let err = Config::from_toml_str(text, "/etc/a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/a.toml:4: field `url`"), "{err}");
        assert!(!err.contains("secret"), "the password is not echoed: {err}");
        let err = Config::from_toml_str("[store]\nurl = \"postgres://h:notaport/db\"\n", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("b.toml:2: field `url`"), "{err}");
    }

    #[test]
    fn api_tls_and_audit_bounds_are_checked_with_their_line() {
        let c = Config::from_toml_str(
            "[api]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n[audit]\nretention_days = 7\nmax_entries = 10\n",
            "a.toml",
        )
        .unwrap();
        assert_eq!(c.api.tls_key.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!((c.audit.retention_days, c.audit.max_entries), (7, 10));
        let err = Config::from_toml_str("[api]\n\ntls_cert = \"/c.pem\"\n", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("b.toml:3: field `tls_cert`"), "{err}");
        let err = Config::from_toml_str("[audit]\nmax_entries = 0\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2: field `max_entries`"), "{err}");
        let err = Config::from_toml_str("[audit]\nkeep = 3\n", "d.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("d.toml:2") && err.contains("`keep`"), "{err}");
    }

    #[test]
    fn instance_and_assignment_errors_name_their_line() {
        let ok = "[broker]\nuplink = \"routed\"\n[instance]\nid = \"alloc-a\"\nregion = \"eu-west\"\n\
                  endpoints = [\"mqtt://10.0.0.1:1883\"]\n[assignment]\nenabled = true\nttl_s = 60\n\
                  [[assignment.groups]]\ntenant = \"acme\"\nregion = \"eu-west\"\ncapability = \"vpn\"\n\
                  expected_reports_per_s = 5.0\n";
        let c = Config::from_toml_str(ok, "a.toml").unwrap();
        assert_eq!(c.broker.uplink, UplinkMode::Routed);
        assert!(c.assignment.enabled);
        assert_eq!(
            c.assignment.group_specs()[0].id.as_str(),
            "acme.eu-west.vpn"
        );
        assert_eq!(c.assignment.engine_config().ttl_ms, 60_000);
        assert_eq!(Config::default().broker.uplink, UplinkMode::Shared);
        let err = Config::from_toml_str("[broker]\nuplink = \"fanout\"\n", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("b.toml:2: field `uplink`"), "{err}");
        let err = Config::from_toml_str(
            "[instance]\nid = \"a\"\n\nendpoints = [\"http://x:1\"]\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("c.toml:4: field `endpoints`"), "{err}");
        let err = Config::from_toml_str(
            "[assignment]\nenabled = true\n[[assignment.groups]]\ntenant = \"a\"\nregion = \"b\"\n\
             capability = \"c\"\nexpected_reports_per_s = -1.0\n",
            "d.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("d.toml:7: field `expected_reports_per_s`"),
            "{err}"
        );
        let err = Config::from_toml_str("[assignment]\nenabled = true\nttl_s = 1\n", "e.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("e.toml:3: field `ttl_s`"), "{err}");
        let err = Config::from_toml_str("[assignment]\nperiod = 3\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.toml:2") && err.contains("`period`"),
            "{err}"
        );
    }

    #[test]
    fn the_packaged_configuration_loads() {
        let text = include_str!("../../../packaging/config/allocator.toml");
        let c = Config::from_toml_str(text, "allocator.toml").unwrap();
        assert!(!c.assignment.enabled);
        assert_eq!(c.broker.uplink, UplinkMode::Shared);
        assert_eq!(c.assignment.ttl_s, 300);
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example:8883"),
            Ok(BrokerUrl::Tls {
                host: "broker.example".into(),
                port: 8883
            })
        );
        assert!(BrokerUrl::parse("mqtt://nohost").is_err());
        assert!(BrokerUrl::parse("tcp://a:1").is_err());
    }
}
