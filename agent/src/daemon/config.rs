//! The agent's configuration file (`/etc/shardline/agent.toml`).
//!
//! Parsing is strict (unknown keys are errors, so a typo never silently falls
//! back to a default) and every error names the file, the line and the field,
//! because the person reading it is an operator on a router console.
//! Validation that needs more than one field runs after deserialization on
//! `toml::Spanned` values, so those errors carry a line as well.

use super::requests::{AppRule, RequestPolicy};
use serde::Deserialize;
use shardline_shared::{AppName, DeviceId};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the agent looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/shardline/agent.toml";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for reloads and messages).
    pub path: PathBuf,
    pub device: DeviceId,
    /// Hex-encoded 32-byte Ed25519 seed, mode 0600; generated on first start.
    pub device_key_file: PathBuf,
    /// Pinned allocator public keys (epoch 0 of the instruction key set).
    pub allocator_keys: Vec<[u8; 32]>,
    /// File holding a bootstrap token (mode 0600): a device not enrolled yet
    /// enrols itself with it (see `daemon::enroll`).
    pub enroll_token_file: Option<PathBuf>,
    pub broker: BrokerConfig,
    pub monitor: MonitorConfig,
    pub shard_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Most reports and acks kept on disk while the broker is unreachable.
    pub outbox_cap: usize,
    pub limits: AgentLimits,
    /// The local request socket (`[requests]`) and who may use it (`[[apps]]`).
    pub requests: RequestsConfig,
    /// `[lending]`: the owner's consent to lend the device's units (how
    /// many, which UTC hours), sent in every report (seed 002). `None`:
    /// the allocator lends whatever it finds spare.
    pub lending: Option<shardline_shared::msg::LendConsent>,
    /// `[assignment]`: the device's group and its bootstrap endpoints
    /// (issue 19; see `daemon::assignment`). `None`: no assignment, the
    /// agent uses `[broker] url` and the plain topics only.
    pub assignment: Option<AssignmentConfig>,
}

/// `[assignment]`: which group's signed assignment the device follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentConfig {
    /// `tenant.region.capability`.
    pub group: shardline_shared::assign::GroupId,
    /// Where the device connects without a valid assignment: `[broker] url`
    /// first, then `[assignment] bootstrap` (duplicates removed).
    pub bootstrap: Vec<String>,
    /// `home_probe_s`: after a failover, the first probe of the list's first
    /// endpoint waits this long (doubling while it stays down, up to 5 min;
    /// see `daemon::assignment`, "Return home").
    pub home_probe_ms: u64,
}

/// Where the socket for explicit shard requests of local applications
/// listens, its bounds, and the applications it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestsConfig {
    /// Unix socket path (default [`DEFAULT_REQUEST_SOCKET`]).
    pub socket: PathBuf,
    /// Rate limit, answer timeout and pending bound.
    pub policy: RequestPolicy,
    /// Most connections open at once.
    pub max_connections: usize,
    /// `[[apps]]`: no entry ⇒ every request is refused.
    pub apps: Vec<AppRule>,
}

/// The request socket when `[requests] socket` is not given (the unit's
/// `RuntimeDirectory=shardline` makes its directory).
pub const DEFAULT_REQUEST_SOCKET: &str = "/run/shardline/agent.sock";

/// How to reach the MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Stable client id: the broker keeps the persistent session under it.
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keep_alive_s: u16,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// MQTT username (the broker identity of this device). Defaults to the
    /// device id when `password_file` is set, which is what the shipped
    /// mosquitto ACL (`pattern … dev/%u/…`) expects.
    pub username: Option<String>,
    /// File holding the MQTT password (mode 0600 or stricter, one line);
    /// read when the link starts, never kept in this struct.
    pub password_file: Option<PathBuf>,
}

/// What traffic to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub interfaces: Vec<String>,
    /// A capture file replayed instead of live interfaces (demos without root).
    pub pcap: Option<PathBuf>,
    /// Length of one QoS window, which is also the report period.
    pub window_ms: u32,
    /// The monitor's own tuning file (flow table size, idle timeouts,
    /// classification rules), as used by `shardline-agent monitor`.
    pub tuning_file: Option<PathBuf>,
    /// How live interfaces are captured (`capture = "auto" | "kernel" |
    /// "ring"`; `auto`: flows counted in the kernel where BPF is permitted).
    pub capture: crate::monitor::source::CaptureMode,
}

/// Limits the agent applies to itself at start (its shard hosts get theirs
/// from the signed instructions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentLimits {
    /// `RLIMIT_AS` in MiB.
    pub memory_max_mib: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub nofile: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device: RawDevice,
    allocator: RawAllocator,
    broker: RawBroker,
    #[serde(default)]
    monitor: RawMonitor,
    #[serde(default)]
    shards: RawShards,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    requests: RawRequests,
    #[serde(default)]
    apps: Vec<RawApp>,
    lending: Option<RawLending>,
    assignment: Option<RawAssignment>,
}

/// `[assignment]`: the device's group and extra bootstrap endpoints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssignment {
    group: shardline_shared::assign::GroupId,
    #[serde(default)]
    bootstrap: Vec<Spanned<String>>,
    home_probe_s: Option<Spanned<u64>>,
}

/// `[lending]`: at most so many units per kind; only from one UTC hour to
/// another (equal or absent: all day).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLending {
    max_compute_units: u16,
    max_data_units: u16,
    from_hour_utc: Option<Spanned<u8>>,
    to_hour_utc: Option<Spanned<u8>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRequests {
    socket: Option<Spanned<PathBuf>>,
    max_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    answer_timeout_ms: Option<Spanned<u64>>,
    max_connections: Option<Spanned<usize>>,
    max_pending_per_instance: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<AppName>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: DeviceId,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllocator {
    #[serde(default)]
    keys: Vec<HexKey>,
    key_set_file: Option<Spanned<PathBuf>>,
    enroll_token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: BrokerUrl,
    client_id: Option<Spanned<String>>,
    ca_file: Option<PathBuf>,
    cert_file: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
    #[serde(default = "default_keep_alive")]
    keep_alive_s: Spanned<u16>,
    #[serde(default = "default_reconnect_min")]
    reconnect_min_ms: Spanned<u64>,
    #[serde(default = "default_reconnect_max")]
    reconnect_max_ms: Spanned<u64>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
}

fn default_keep_alive() -> Spanned<u16> {
    Spanned::new(0..0, 30)
}
fn default_reconnect_min() -> Spanned<u64> {
    Spanned::new(0..0, 500)
}
fn default_reconnect_max() -> Spanned<u64> {
    Spanned::new(0..0, 30_000)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    pcap: Option<Spanned<PathBuf>>,
    window_ms: Option<Spanned<u32>>,
    tuning_file: Option<Spanned<PathBuf>>,
    capture: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShards {
    dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
    outbox_cap: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_max_mib: Option<Spanned<u64>>,
    nofile: Option<Spanned<u64>>,
}

/// A lowercase or uppercase hex Ed25519 public key (64 digits).
struct HexKey([u8; 32]);

impl<'de> Deserialize<'de> for HexKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_hex_key(&s)
            .map(HexKey)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a 64-digit hex public key.
pub fn parse_hex_key(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("not a hex public key: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a public key is 32 bytes (64 hex digits), got {}", b.len()))
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` (`support::broker_url`,
/// the allocator's parser too).
struct BrokerUrl {
    /// As written (the first bootstrap endpoint of an assignment).
    raw: String,
    tls: bool,
    host: String,
    port: u16,
}

impl<'de> Deserialize<'de> for BrokerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_broker_url(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_broker_url(s: &str) -> Result<BrokerUrl, String> {
    let u = shardline_support::broker_url::BrokerUrl::parse(s).map_err(|e| e.to_string())?;
    Ok(BrokerUrl {
        raw: s.to_owned(),
        tls: u.tls,
        port: u.port_or_default(),
        host: u.host,
    })
}

use shardline_support::toml_diag::{field_at, line_of, missing_field};

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (used for messages and for
    /// resolving relative paths of key set files).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |span: Range<usize>, field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, span.start),
            field: field.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_owned();
            let span = e.span().unwrap_or(0..0);
            let field = missing_field(&message)
                .map(|m| match field_at(text, span.start) {
                    Some(t) if !t.contains('.') => format!("{t}.{m}"),
                    _ => m,
                })
                .or_else(|| field_at(text, span.start))
                .unwrap_or_else(|| "(document)".to_owned());
            invalid(span, &field, message)
        })?;

        let mut allocator_keys: Vec<[u8; 32]> = raw.allocator.keys.iter().map(|k| k.0).collect();
        if let Some(file) = &raw.allocator.key_set_file {
            let file_path = resolve(path, file.get_ref());
            let listed = load_key_set_file(&file_path)
                .map_err(|m| invalid(file.span(), "allocator.key_set_file", m))?;
            allocator_keys.extend(listed);
        }
        if let Some(f) = &raw.allocator.enroll_token_file {
            if f.get_ref().as_os_str().is_empty() {
                return Err(invalid(
                    f.span(),
                    "allocator.enroll_token_file",
                    "must name a file (leave the field out when not enrolling with a token)".into(),
                ));
            }
        }
        let enroll_token_file = raw
            .allocator
            .enroll_token_file
            .as_ref()
            .map(|f| resolve(path, f.get_ref()));
        allocator_keys.sort();
        allocator_keys.dedup();
        if allocator_keys.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: text
                    .lines()
                    .position(|l| l.trim() == "[allocator]")
                    .map_or(1, |i| i + 1),
                field: "allocator.keys".into(),
                message: "at least one pinned allocator public key is required \
                          (allocator.keys or allocator.key_set_file)"
                    .into(),
            });
        }

        let assignment = match raw.assignment {
            Some(a) => {
                let mut bootstrap = vec![raw.broker.url.raw.clone()];
                for u in a.bootstrap {
                    // Both parsers: the assignment's strict form (what the
                    // allocator may name) and the link's.
                    shardline_shared::assign::check_endpoint(u.get_ref())
                        .map_err(|e| e.to_string())
                        .and_then(|()| parse_broker_url(u.get_ref()).map(|_| ()))
                        .map_err(|m| invalid(u.span(), "assignment.bootstrap", m))?;
                    if !bootstrap.contains(u.get_ref()) {
                        bootstrap.push(u.into_inner());
                    }
                }
                let home_probe_ms = match a.home_probe_s {
                    None => super::assignment::HOME_PROBE_FIRST_MS,
                    Some(s) if *s.get_ref() == 0 || *s.get_ref() > 300 => {
                        return Err(invalid(
                            s.span(),
                            "assignment.home_probe_s",
                            "must be 1 to 300 seconds".into(),
                        ))
                    }
                    Some(s) => s.into_inner() * 1000,
                };
                Some(AssignmentConfig {
                    group: a.group,
                    bootstrap,
                    home_probe_ms,
                })
            }
            None => None,
        };

        let b = raw.broker;
        if b.cert_file.is_some() != b.key_file.is_some() {
            let span = b
                .cert_file
                .as_ref()
                .map(|s| s.span())
                .or_else(|| b.key_file.as_ref().map(|s| s.span()))
                .unwrap_or(0..0);
            return Err(invalid(
                span,
                "broker.cert_file",
                "a client certificate needs both cert_file and key_file".into(),
            ));
        }
        if !b.url.tls && b.cert_file.is_some() {
            let span = b.cert_file.as_ref().map_or(0..0, |s| s.span());
            return Err(invalid(
                span,
                "broker.cert_file",
                "a client certificate needs an mqtts:// broker url".into(),
            ));
        }
        if *b.keep_alive_s.get_ref() < 5 {
            return Err(invalid(
                b.keep_alive_s.span(),
                "broker.keep_alive_s",
                "must be at least 5 seconds".into(),
            ));
        }
        let (rmin, rmax) = (*b.reconnect_min_ms.get_ref(), *b.reconnect_max_ms.get_ref());
        if rmin == 0 || rmin > rmax {
            return Err(invalid(
                b.reconnect_min_ms.span(),
                "broker.reconnect_min_ms",
                format!("must be at least 1 and not above reconnect_max_ms ({rmax})"),
            ));
        }
        if let Some(u) = &b.username {
            let v = u.get_ref();
            if v.is_empty() || v.len() > 128 || v.contains(['+', '#', '/']) {
                return Err(invalid(
                    u.span(),
                    "broker.username",
                    "must be 1 to 128 characters without '+', '#' or '/' \
                     (it stands for the device in broker ACL patterns)"
                        .into(),
                ));
            }
        }
        let password_file = match &b.password_file {
            Some(f) => {
                let p = resolve(path, f.get_ref());
                // Checked here too (and again when read at link start), so
                // `check-config` names the line of a world-readable file.
                super::link::check_password_file_mode(&p)
                    .map_err(|e| invalid(f.span(), "broker.password_file", e.to_string()))?;
                Some(p)
            }
            None => None,
        };
        let username = match (&b.username, &password_file) {
            (Some(u), _) => Some(u.get_ref().clone()),
            (None, Some(_)) => Some(raw.device.id.to_string()),
            (None, None) => None,
        };
        let client_id = match &b.client_id {
            Some(id) => {
                let v = id.get_ref();
                if v.is_empty() || v.len() > 128 {
                    return Err(invalid(
                        id.span(),
                        "broker.client_id",
                        "must be 1 to 128 characters".into(),
                    ));
                }
                v.clone()
            }
            None => format!("shardline-agent-{}", raw.device.id),
        };

        let m = raw.monitor;
        if m.pcap.is_some() && !m.interfaces.is_empty() {
            let span = m.pcap.as_ref().map_or(0..0, |p| p.span());
            return Err(invalid(
                span,
                "monitor.pcap",
                "give either interfaces or a pcap file to replay, not both".into(),
            ));
        }
        for iface in &m.interfaces {
            let v = iface.get_ref();
            if v.is_empty() || v.len() > 15 || v.contains(['/', ' ']) {
                return Err(invalid(
                    iface.span(),
                    "monitor.interfaces",
                    format!("{v:?} is not an interface name"),
                ));
            }
        }
        let window_ms = match &m.window_ms {
            Some(w) if !(10..=3_600_000).contains(w.get_ref()) => {
                return Err(invalid(
                    w.span(),
                    "monitor.window_ms",
                    "must be between 10 ms and one hour".into(),
                ))
            }
            Some(w) => *w.get_ref(),
            None => 5_000,
        };

        let capture = match &m.capture {
            Some(c) => c
                .get_ref()
                .parse()
                .map_err(|e: String| invalid(c.span(), "monitor.capture", e))?,
            None => crate::monitor::source::CaptureMode::Auto,
        };
        let tuning_file = match &m.tuning_file {
            Some(f) => {
                let p = resolve(path, f.get_ref());
                crate::monitor::MonitorConfig::from_file(&p)
                    .map_err(|e| invalid(f.span(), "monitor.tuning_file", e.to_string()))?;
                Some(p)
            }
            None => None,
        };

        let outbox_cap = match &raw.state.outbox_cap {
            Some(c) if *c.get_ref() == 0 => {
                return Err(invalid(
                    c.span(),
                    "state.outbox_cap",
                    "must be at least 1".into(),
                ))
            }
            Some(c) => *c.get_ref(),
            None => 10_000,
        };

        let l = raw.limits;
        if let Some(mem) = &l.memory_max_mib {
            if *mem.get_ref() < 16 {
                return Err(invalid(
                    mem.span(),
                    "limits.memory_max_mib",
                    "below 16 MiB the agent cannot run".into(),
                ));
            }
        }

        let requests = requests_config(path, raw.requests, raw.apps, &invalid)?;

        let lending = match raw.lending {
            Some(l) => {
                for (field, hour) in [
                    ("lending.from_hour_utc", &l.from_hour_utc),
                    ("lending.to_hour_utc", &l.to_hour_utc),
                ] {
                    if let Some(h) = hour.as_ref().filter(|h| *h.get_ref() > 23) {
                        return Err(invalid(h.span(), field, "must be 0-23".into()));
                    }
                }
                let hour = |h: Option<Spanned<u8>>| h.map_or(0, Spanned::into_inner);
                Some(shardline_shared::msg::LendConsent {
                    max_compute_units: l.max_compute_units,
                    max_data_units: l.max_data_units,
                    from_hour_utc: hour(l.from_hour_utc),
                    to_hour_utc: hour(l.to_hour_utc),
                })
            }
            None => None,
        };

        // Resolved before the defaults below derive from it: a relative
        // state dir is relative to the file, for the key and shards too.
        let state_dir = resolve(
            path,
            &raw.state
                .dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/shardline")),
        );
        Ok(Config {
            path: path.to_owned(),
            device_key_file: raw
                .device
                .key_file
                .map(|p| resolve(path, &p))
                .unwrap_or_else(|| state_dir.join("device.key")),
            device: raw.device.id,
            allocator_keys,
            enroll_token_file,
            broker: BrokerConfig {
                tls: b.url.tls,
                host: b.url.host,
                port: b.url.port,
                client_id,
                ca_file: b.ca_file.map(|p| resolve(path, &p)),
                cert_file: b.cert_file.map(|p| resolve(path, p.get_ref())),
                key_file: b.key_file.map(|p| resolve(path, p.get_ref())),
                keep_alive_s: *b.keep_alive_s.get_ref(),
                reconnect_min_ms: rmin,
                reconnect_max_ms: rmax,
                username,
                password_file,
            },
            monitor: MonitorConfig {
                interfaces: m.interfaces.into_iter().map(|i| i.into_inner()).collect(),
                pcap: m.pcap.map(|p| resolve(path, p.get_ref())),
                window_ms,
                tuning_file,
                capture,
            },
            shard_dir: raw
                .shards
                .dir
                .map(|p| resolve(path, &p))
                .unwrap_or_else(|| state_dir.join("shards")),
            state_dir,
            outbox_cap,
            limits: AgentLimits {
                memory_max_mib: l.memory_max_mib.map(|v| v.into_inner()),
                nofile: l.nofile.map(|v| v.into_inner()),
            },
            requests,
            lending,
            assignment,
        })
    }
}

/// Validates `[requests]` and `[[apps]]`.
fn requests_config(
    path: &Path,
    r: RawRequests,
    apps: Vec<RawApp>,
    invalid: &dyn Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<RequestsConfig, ConfigError> {
    let defaults = RequestPolicy::default();
    fn at_least<T: Copy + PartialOrd + std::fmt::Display>(
        v: &Option<Spanned<T>>,
        min: T,
        max: T,
        default: T,
        field: &str,
        invalid: &dyn Fn(Range<usize>, &str, String) -> ConfigError,
    ) -> Result<T, ConfigError> {
        match v {
            Some(s) if *s.get_ref() < min || *s.get_ref() > max => Err(invalid(
                s.span(),
                field,
                format!("must be between {min} and {max}"),
            )),
            Some(s) => Ok(*s.get_ref()),
            None => Ok(default),
        }
    }
    let max_per_second = at_least(
        &r.max_per_second,
        1,
        100_000,
        defaults.max_per_second,
        "requests.max_per_second",
        invalid,
    )?;
    let burst = at_least(
        &r.burst,
        1,
        100_000,
        defaults.burst,
        "requests.burst",
        invalid,
    )?;
    let answer_timeout_ms = at_least(
        &r.answer_timeout_ms,
        100,
        600_000,
        defaults.answer_timeout_ms,
        "requests.answer_timeout_ms",
        invalid,
    )?;
    let max_connections = at_least(
        &r.max_connections,
        1,
        4096,
        64,
        "requests.max_connections",
        invalid,
    )?;
    let max_pending_per_instance = at_least(
        &r.max_pending_per_instance,
        1,
        1024,
        defaults.max_pending_per_instance,
        "requests.max_pending_per_instance",
        invalid,
    )?;
    let socket = match &r.socket {
        Some(s) if s.get_ref().as_os_str().is_empty() => {
            return Err(invalid(
                s.span(),
                "requests.socket",
                "must name a socket path".into(),
            ))
        }
        Some(s) => resolve(path, s.get_ref()),
        None => PathBuf::from(DEFAULT_REQUEST_SOCKET),
    };
    let mut rules: Vec<AppRule> = Vec::with_capacity(apps.len());
    for app in apps {
        let name = app.name.get_ref().clone();
        if rules.iter().any(|r| r.name == name) {
            return Err(invalid(
                app.name.span(),
                "apps.name",
                format!("application \"{name}\" is declared twice"),
            ));
        }
        if app.uids.is_empty() && app.gids.is_empty() {
            return Err(invalid(
                app.name.span(),
                "apps.uids",
                format!(
                    "application \"{name}\" needs at least one of uids or gids \
                     (the users allowed to act as it)"
                ),
            ));
        }
        rules.push(AppRule {
            name,
            uids: app.uids,
            gids: app.gids,
        });
    }
    Ok(RequestsConfig {
        socket,
        policy: RequestPolicy {
            max_per_second,
            burst,
            answer_timeout_ms,
            max_pending_per_instance,
        },
        max_connections,
        apps: rules,
    })
}

/// Relative paths in the file are relative to the file's directory, so a demo
/// config can sit next to its keys.
fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(p)
    }
}

/// A key set file: one hex public key per line; `#` starts a comment.
fn load_key_set_file(path: &Path) -> Result<Vec<[u8; 32]>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key set file {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        keys.push(parse_hex_key(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/shardline/agent.toml"), text)
    }

    fn minimal() -> String {
        format!(
            "[device]\nid = \"r1\"\n\n[allocator]\nkeys = [\"{KEY}\"]\n\n[broker]\nurl = \"mqtt://127.0.0.1:1884\"\n"
        )
    }

    /// One row per `[lending]` case: (case, section, consent or error field).
    #[test]
    fn lending_consent_table() {
        let consent = |c, d, from, to| shardline_shared::msg::LendConsent {
            max_compute_units: c,
            max_data_units: d,
            from_hour_utc: from,
            to_hour_utc: to,
        };
        type Row<'a> = (
            &'a str,
            &'a str,
            Result<Option<shardline_shared::msg::LendConsent>, &'a str>,
        );
        let rows: [Row<'_>; 5] = [
            ("absent: no consent policy", "", Ok(None)),
            (
                "units only: all day",
                "[lending]\nmax_compute_units = 1\nmax_data_units = 2\n",
                Ok(Some(consent(1, 2, 0, 0))),
            ),
            (
                "night hours",
                "[lending]\nmax_compute_units = 0\nmax_data_units = 3\nfrom_hour_utc = 22\nto_hour_utc = 6\n",
                Ok(Some(consent(0, 3, 22, 6))),
            ),
            (
                "an hour past 23",
                "[lending]\nmax_compute_units = 0\nmax_data_units = 3\nto_hour_utc = 24\n",
                Err("lending.to_hour_utc"),
            ),
            (
                "an unknown key",
                "[lending]\nmax_compute_units = 0\nmax_data_units = 3\nmax = 1\n",
                Err(""),
            ),
        ];
        for (case, section, want) in rows {
            let got = parse(&format!("{}\n{section}", minimal()));
            match (got, want) {
                (Ok(c), Ok(w)) => assert_eq!(c.lending, w, "{case}"),
                (Err(e), Err(field)) => {
                    assert!(e.to_string().contains(field), "{case}: {e}")
                }
                (got, want) => panic!("{case}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.device.as_str(), "r1");
        assert_eq!(c.broker.port, 1884);
        assert!(!c.broker.tls);
        assert_eq!(c.broker.client_id, "shardline-agent-r1");
        assert_eq!(c.monitor.window_ms, 5000);
        assert_eq!(c.outbox_cap, 10_000);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/shardline"));
        assert_eq!(
            c.device_key_file,
            PathBuf::from("/var/lib/shardline/device.key")
        );
        assert_eq!(c.allocator_keys.len(), 1);
    }

    fn expect_invalid(text: &str, want_line: usize, want_field: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid {
                line,
                field,
                message,
                path,
            }) => {
                assert_eq!(path, PathBuf::from("/etc/shardline/agent.toml"));
                assert_eq!(
                    (line, field.as_str()),
                    (want_line, want_field),
                    "message: {message}"
                );
                message
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_line_and_field() {
        let bad_device = minimal().replace("id = \"r1\"", "id = \"a/b\"");
        expect_invalid(&bad_device, 2, "device.id");

        let bad_key = minimal().replace(KEY, "abcd");
        let msg = expect_invalid(&bad_key, 5, "allocator.keys");
        assert!(msg.contains("32 bytes"), "{msg}");

        let bad_url = minimal().replace("mqtt://127.0.0.1:1884", "http://x");
        expect_invalid(&bad_url, 8, "broker.url");

        let typo = format!("{}window = 5\n", minimal());
        expect_invalid(&typo, 9, "broker.window");

        let window = format!("{}\n[monitor]\nwindow_ms = 1\n", minimal());
        expect_invalid(&window, 11, "monitor.window_ms");

        let missing = minimal().replace("url = \"mqtt://127.0.0.1:1884\"\n", "");
        let msg = expect_invalid(&missing, 7, "broker.url");
        assert!(msg.contains("missing"), "{msg}");
    }

    #[test]
    fn assignment_group_and_bootstrap() {
        assert_eq!(parse(&minimal()).unwrap().assignment, None);
        let c = parse(&format!(
            "{}\n[assignment]\ngroup = \"acme.eu-west.vpn\"\n\
             bootstrap = [\"mqtt://b2:1883\", \"mqtt://127.0.0.1:1884\"]\n",
            minimal()
        ))
        .unwrap();
        let a = c.assignment.unwrap();
        assert_eq!(a.group.as_str(), "acme.eu-west.vpn");
        assert_eq!(
            a.bootstrap,
            vec!["mqtt://127.0.0.1:1884", "mqtt://b2:1883"],
            "broker url first, no duplicate"
        );
        let only = parse(&format!("{}\n[assignment]\ngroup = \"a.b.c\"\n", minimal())).unwrap();
        assert_eq!(
            only.assignment.unwrap().bootstrap,
            vec!["mqtt://127.0.0.1:1884"]
        );
        let bad_group = format!("{}\n[assignment]\ngroup = \"acme.eu\"\n", minimal());
        let msg = expect_invalid(&bad_group, 11, "assignment.group");
        assert!(msg.contains("tenant.region.capability"), "{msg}");
        let bad_url = format!(
            "{}\n[assignment]\ngroup = \"a.b.c\"\nbootstrap = [\"http://x\"]\n",
            minimal()
        );
        expect_invalid(&bad_url, 12, "assignment.bootstrap");
        let typo = format!("{}\n[assignment]\ngroup = \"a.b.c\"\nttl = 3\n", minimal());
        expect_invalid(&typo, 12, "assignment.ttl");
        let missing = format!("{}\n[assignment]\nbootstrap = []\n", minimal());
        expect_invalid(&missing, 10, "assignment.group");
        assert_eq!(
            parse(&format!("{}\n[assignment]\ngroup = \"a.b.c\"\n", minimal()))
                .unwrap()
                .assignment
                .unwrap()
                .home_probe_ms,
            30_000,
            "probe the first endpoint 30 s after a failover by default"
        );
        let quick = format!(
            "{}\n[assignment]\ngroup = \"a.b.c\"\nhome_probe_s = 2\n",
            minimal()
        );
        assert_eq!(
            parse(&quick).unwrap().assignment.unwrap().home_probe_ms,
            2_000
        );
        let zero = format!(
            "{}\n[assignment]\ngroup = \"a.b.c\"\nhome_probe_s = 0\n",
            minimal()
        );
        let msg = expect_invalid(&zero, 12, "assignment.home_probe_s");
        assert!(msg.contains("1 to 300"), "{msg}");
    }

    #[test]
    fn display_names_file_line_and_field() {
        let err = parse(&minimal().replace("r1", "a b")).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with("/etc/shardline/agent.toml:2: field `device.id`:"),
            "{shown}"
        );
    }

    #[test]
    fn broker_urls() {
        let u = parse_broker_url("mqtts://broker.example:9000").unwrap();
        assert!(u.tls && u.host == "broker.example" && u.port == 9000);
        let u = parse_broker_url("mqtts://b").unwrap();
        assert_eq!(u.port, 8883);
        let u = parse_broker_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1999));
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u@h",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_certificate_needs_tls_and_both_files() {
        let half = minimal().replace(
            "url = \"mqtt://127.0.0.1:1884\"",
            "url = \"mqtts://h\"\ncert_file = \"c.pem\"",
        );
        expect_invalid(&half, 9, "broker.cert_file");
        let plain = minimal().replace(
            "url = \"mqtt://127.0.0.1:1884\"",
            "url = \"mqtt://h\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"",
        );
        expect_invalid(&plain, 9, "broker.cert_file");
        let ok = minimal().replace(
            "url = \"mqtt://127.0.0.1:1884\"",
            "url = \"mqtts://h\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"",
        );
        let c = parse(&ok).unwrap();
        assert_eq!(
            c.broker.cert_file,
            Some(PathBuf::from("/etc/shardline/c.pem"))
        );
    }

    #[test]
    fn broker_login_username_defaults_to_the_device_and_the_password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let c = parse(&minimal()).unwrap();
        assert_eq!((c.broker.username, c.broker.password_file), (None, None));

        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("mqtt-password");
        std::fs::write(&pw, "s3cret-s3cret-s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = minimal() + "password_file = \"mqtt-password\"\n";
        let c = Config::parse(&dir.path().join("agent.toml"), &with).unwrap();
        assert_eq!(c.broker.username.as_deref(), Some("r1"), "the device id");
        assert_eq!(c.broker.password_file, Some(pw.clone()));
        assert_eq!(
            super::super::link::read_password(&pw).unwrap(),
            "s3cret-s3cret-s3cret"
        );
        let named = with.clone() + "username = \"gw-17\"\n";
        let c = Config::parse(&dir.path().join("agent.toml"), &named).unwrap();
        assert_eq!(c.broker.username.as_deref(), Some("gw-17"));

        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Config::parse(&dir.path().join("agent.toml"), &with).unwrap_err();
        match err {
            ConfigError::Invalid {
                line,
                field,
                message,
                ..
            } => {
                assert_eq!((line, field.as_str()), (9, "broker.password_file"));
                assert!(message.contains("mode 640"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let missing = minimal() + "password_file = \"nope\"\n";
        expect_invalid(&missing, 9, "broker.password_file");
        let wild = minimal() + "username = \"gw/+\"\n";
        expect_invalid(&wild, 9, "broker.username");
    }

    #[test]
    fn no_pinned_key_is_an_error() {
        let none = minimal().replace(&format!("keys = [\"{KEY}\"]"), "keys = []");
        expect_invalid(&none, 4, "allocator.keys");
    }

    #[test]
    fn key_set_file_keys_are_added() {
        let dir = tempfile::tempdir().unwrap();
        let other = "11".repeat(32);
        std::fs::write(dir.path().join("keys"), format!("# allocator\n{other}\n")).unwrap();
        let text = minimal().replace(
            &format!("keys = [\"{KEY}\"]"),
            &format!("keys = [\"{KEY}\"]\nkey_set_file = \"keys\""),
        );
        let c = Config::parse(&dir.path().join("agent.toml"), &text).unwrap();
        assert_eq!(c.allocator_keys.len(), 2);
        std::fs::write(dir.path().join("keys"), "zz\n").unwrap();
        let err = Config::parse(&dir.path().join("agent.toml"), &text).unwrap_err();
        assert!(err.to_string().contains("allocator.key_set_file"), "{err}");
    }

    #[test]
    fn enroll_token_file_is_optional_and_resolved() {
        assert_eq!(parse(&minimal()).unwrap().enroll_token_file, None);
        let with = minimal().replace(
            &format!("keys = [\"{KEY}\"]"),
            &format!("keys = [\"{KEY}\"]\nenroll_token_file = \"enroll-token\""),
        );
        assert_eq!(
            parse(&with).unwrap().enroll_token_file,
            Some(PathBuf::from("/etc/shardline/enroll-token"))
        );
        let empty = with.replace("\"enroll-token\"", "\"\"");
        expect_invalid(&empty, 6, "allocator.enroll_token_file");
        let inline = with.replace(
            "enroll_token_file = \"enroll-token\"",
            "enroll_token = \"abc\"",
        );
        expect_invalid(&inline, 6, "allocator.enroll_token");
    }

    #[test]
    fn defaults_under_a_relative_state_dir_are_relative_to_the_file() {
        let c = parse(&format!("{}\n[state]\ndir = \"state\"\n", minimal())).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/shardline/state"));
        assert_eq!(c.shard_dir, PathBuf::from("/etc/shardline/state/shards"));
        assert_eq!(
            c.device_key_file,
            PathBuf::from("/etc/shardline/state/device.key")
        );
    }

    #[test]
    fn requests_and_apps_get_defaults_and_errors_name_their_line() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.requests.socket, PathBuf::from(DEFAULT_REQUEST_SOCKET));
        assert_eq!(c.requests.policy, RequestPolicy::default());
        assert!(c.requests.apps.is_empty());
        let with = format!(
            "{}\n[requests]\nsocket = \"run/agent.sock\"\nmax_per_second = 5\nburst = 7\n\
             answer_timeout_ms = 2000\n\n[[apps]]\nname = \"cam\"\nuids = [1000, 1001]\n\n\
             [[apps]]\nname = \"nas\"\ngids = [2000]\n",
            minimal()
        );
        let c = parse(&with).unwrap();
        assert_eq!(
            c.requests.socket,
            PathBuf::from("/etc/shardline/run/agent.sock")
        );
        assert_eq!(
            (c.requests.policy.max_per_second, c.requests.policy.burst),
            (5, 7)
        );
        assert_eq!(c.requests.policy.answer_timeout_ms, 2000);
        assert_eq!(c.requests.apps.len(), 2);
        assert_eq!(c.requests.apps[0].uids, vec![1000, 1001]);
        assert_eq!(c.requests.apps[1].gids, vec![2000]);

        let zero = with.replace("max_per_second = 5", "max_per_second = 0");
        expect_invalid(&zero, 12, "requests.max_per_second");
        let bad_name = with.replace("name = \"cam\"", "name = \"c/m\"");
        let msg = expect_invalid(&bad_name, 17, "apps.name");
        assert!(msg.contains("application name"), "{msg}");
        let twice = with.replace("name = \"nas\"", "name = \"cam\"");
        expect_invalid(&twice, 21, "apps.name");
        let nobody = with.replace("gids = [2000]\n", "");
        expect_invalid(&nobody, 21, "apps.uids");
        let typo = with.replace("uids = [1000, 1001]", "users = [1000]");
        expect_invalid(&typo, 18, "apps.users");
    }

    #[test]
    fn pcap_and_interfaces_are_exclusive() {
        let both = format!(
            "{}\n[monitor]\ninterfaces = [\"eth0\"]\npcap = \"x.pcap\"\n",
            minimal()
        );
        expect_invalid(&both, 12, "monitor.pcap");
    }
}
