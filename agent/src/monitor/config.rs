//! Monitor configuration (TOML) and classification rules (TOML data, shipped
//! defaults embedded from `agent/rules/default.toml`).
//!
//! Every error names the file, the line and the field, so an operator can fix
//! a typo without reading source code.

use serde::Deserialize;
use shardline_shared::msg::TrafficClass;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// The shipped default rules, embedded so the agent works without any file.
pub const DEFAULT_RULES: &str = include_str!("../../rules/default.toml");
const DEFAULT_RULES_NAME: &str = "<embedded agent/rules/default.toml>";

/// A configuration or rules file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: field `{field}`: {message}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
}

/// Settings of the sans-IO pipeline.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Length of a QoS window.
    pub window: Duration,
    /// Hard bound on the flow table; beyond it the oldest idle flow is evicted.
    pub max_flows: u32,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    pub other_idle: Duration,
    /// Entries of the DNS name cache (address → name).
    pub dns_cache: u32,
    /// How many flows a window summary and the totals list.
    pub top_flows: usize,
    /// Extra rules file (operator's), checked before the defaults.
    pub rules_file: Option<PathBuf>,
    /// Compiled rules (defaults plus `rules_file`).
    pub rules: Rules,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            window: Duration::from_secs(1),
            max_flows: 65_536,
            tcp_idle: Duration::from_secs(300),
            udp_idle: Duration::from_secs(60),
            other_idle: Duration::from_secs(30),
            dns_cache: 4096,
            top_flows: 10,
            rules_file: None,
            rules: Rules::defaults(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MonitorFile {
    window_ms: Option<Spanned<u64>>,
    max_flows: Option<Spanned<u32>>,
    tcp_idle_s: Option<u64>,
    udp_idle_s: Option<u64>,
    other_idle_s: Option<u64>,
    dns_cache: Option<Spanned<u32>>,
    top_flows: Option<usize>,
    rules: Option<PathBuf>,
}

impl MonitorConfig {
    /// Load from a TOML file (every key optional):
    /// `window_ms`, `max_flows`, `tcp_idle_s`, `udp_idle_s`, `other_idle_s`,
    /// `dns_cache`, `top_flows`, `rules` (path, relative to the file).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text, &file)?;
        if let Some(r) = &cfg.rules_file {
            let r = if r.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(r)
            } else {
                r.clone()
            };
            cfg.rules = Rules::with_extra(&r)?;
            cfg.rules_file = Some(r);
        }
        Ok(cfg)
    }

    /// Parse configuration text; `file` names it in errors. A `rules` path is
    /// recorded but not loaded (see [`MonitorConfig::from_file`]).
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let f: MonitorFile = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        let mut c = MonitorConfig::default();
        let invalid =
            |span: std::ops::Range<usize>, field: &str, message: &str| ConfigError::Invalid {
                file: file.to_string(),
                line: line_of(text, span.start),
                field: field.to_string(),
                message: message.to_string(),
            };
        if let Some(w) = f.window_ms {
            if !(10..=3_600_000).contains(w.get_ref()) {
                return Err(invalid(
                    w.span(),
                    "window_ms",
                    "must be between 10 and 3600000",
                ));
            }
            c.window = Duration::from_millis(*w.get_ref());
        }
        if let Some(m) = f.max_flows {
            if !(1..=(1 << 24)).contains(m.get_ref()) {
                return Err(invalid(
                    m.span(),
                    "max_flows",
                    "must be between 1 and 16777216",
                ));
            }
            c.max_flows = *m.get_ref();
        }
        if let Some(d) = f.dns_cache {
            if *d.get_ref() > 1 << 20 {
                return Err(invalid(d.span(), "dns_cache", "must be at most 1048576"));
            }
            c.dns_cache = *d.get_ref();
        }
        if let Some(s) = f.tcp_idle_s {
            c.tcp_idle = Duration::from_secs(s.max(1));
        }
        if let Some(s) = f.udp_idle_s {
            c.udp_idle = Duration::from_secs(s.max(1));
        }
        if let Some(s) = f.other_idle_s {
            c.other_idle = Duration::from_secs(s.max(1));
        }
        if let Some(t) = f.top_flows {
            c.top_flows = t.min(10_000);
        }
        c.rules_file = f.rules;
        Ok(c)
    }
}

use shardline_support::toml_diag::line_of;

/// Turn a TOML/serde error into one naming file, line and field.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = shardline_support::toml_diag::parse_error(text, e);
    ConfigError::Invalid {
        file: file.to_string(),
        line: at.line,
        field: at.field,
        message: at.message,
    }
}

// ---------------------------------------------------------------- rules

/// QoS need of one class (static parts; bandwidth-heavy depends on the rate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassNeed {
    pub latency_sensitive: bool,
    pub needs_encryption: bool,
    /// Window rate (bits/s) at or above which the class is bandwidth-heavy.
    pub heavy_bps: u64,
}

/// Bounds on a flow's behaviour; every bound given must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct BehaviourRule {
    pub class: TrafficClass,
    /// Only flows currently in one of these classes are re-classified.
    pub from: Vec<TrafficClass>,
    /// IP protocol number, `None` for any.
    pub proto: Option<u8>,
    pub min_packets: u64,
    pub min_bytes: u64,
    pub min_pps: f64,
    pub max_pps: f64,
    pub min_avg_size: f64,
    pub max_avg_size: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    pub max_rate_bps: f64,
    /// Packets of the busier direction ÷ packets of the other: a call sends
    /// a frame each way per packet time (≈ 1), a game's client ticks
    /// faster than its server answers.
    pub max_pps_ratio: f64,
    /// Mean packet size of the direction with the larger packets ÷ that of
    /// the other: audio frames are alike both ways, game inputs are small
    /// and state updates large.
    pub max_size_ratio: f64,
    /// Pauses of a second or more in the flow (see `flow::PAUSE_NS`): a
    /// player fetching segments pauses, a download does not.
    pub min_pauses: u32,
    pub max_pauses: u32,
}

/// A name rule, for one protocol or any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NameRule {
    pattern: NamePattern,
    class: TrafficClass,
    proto: Option<u8>,
}

/// How a name rule matches (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    /// The name ends with this on a label boundary.
    Suffix(String),
    /// The name contains this anywhere ("bank" in online.lloydsbank.co.uk).
    Contains(String),
}

impl NamePattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Suffix(suffix) => {
                name.len() >= suffix.len()
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && (name.len() == suffix.len()
                        || name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
            }
            NamePattern::Contains(word) => name
                .as_bytes()
                .windows(word.len())
                .any(|w| w.eq_ignore_ascii_case(word.as_bytes())),
        }
    }
}

/// Compiled classification rules: O(1) port lookups, name suffixes, behaviour bounds.
#[derive(Clone)]
pub struct Rules {
    /// Class index + 1 per TCP / UDP port; 0 = no rule.
    tcp_ports: Box<[u8]>,
    udp_ports: Box<[u8]>,
    /// Operator's first.
    names: Vec<NameRule>,
    behaviours: Vec<BehaviourRule>,
    needs: [ClassNeed; 9],
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("names", &self.names.len())
            .field("behaviours", &self.behaviours.len())
            .field("needs", &self.needs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    need: std::collections::BTreeMap<String, Spanned<NeedFile>>,
    #[serde(default)]
    port: Vec<PortFile>,
    #[serde(default)]
    name: Vec<NameFile>,
    #[serde(default)]
    behaviour: Vec<BehaviourFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NeedFile {
    #[serde(default)]
    latency_sensitive: bool,
    #[serde(default)]
    needs_encryption: bool,
    heavy_bps: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortFile {
    class: Spanned<String>,
    proto: Spanned<String>,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    ranges: Vec<Spanned<(u16, u16)>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameFile {
    class: Spanned<String>,
    proto: Option<Spanned<String>>,
    #[serde(default)]
    suffixes: Vec<String>,
    #[serde(default)]
    contains: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourFile {
    class: Spanned<String>,
    from: Spanned<Vec<String>>,
    proto: Option<Spanned<String>>,
    min_packets: Option<u64>,
    min_bytes: Option<u64>,
    min_pps: Option<f64>,
    max_pps: Option<f64>,
    min_avg_size: Option<f64>,
    max_avg_size: Option<f64>,
    min_ratio: Option<f64>,
    max_ratio: Option<f64>,
    max_rate_bps: Option<f64>,
    max_pps_ratio: Option<f64>,
    max_size_ratio: Option<f64>,
    min_pauses: Option<u32>,
    max_pauses: Option<u32>,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: std::ops::Range<usize>, field: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: line_of(self.text, span.start),
            field: field.to_string(),
            message,
        }
    }

    fn class(&self, s: &Spanned<String>, field: &str) -> Result<TrafficClass, ConfigError> {
        TrafficClass::from_name(s.get_ref()).ok_or_else(|| {
            let names: Vec<_> = TrafficClass::ALL.iter().map(|c| c.as_str()).collect();
            self.err(
                s.span(),
                field,
                format!(
                    "unknown class `{}` (one of {})",
                    s.get_ref(),
                    names.join(", ")
                ),
            )
        })
    }

    fn proto(&self, s: &Spanned<String>) -> Result<Option<u8>, ConfigError> {
        match s.get_ref().as_str() {
            "tcp" => Ok(Some(6)),
            "udp" => Ok(Some(17)),
            "any" => Ok(None),
            other => Err(self.err(
                s.span(),
                "proto",
                format!("unknown protocol `{other}` (tcp, udp or any)"),
            )),
        }
    }
}

impl Rules {
    /// The shipped defaults only.
    pub fn defaults() -> Self {
        // The embedded file is checked by a unit test, so this cannot fail in a
        // released binary; fall back to empty rules rather than panic anyway.
        Self::compile(&[(DEFAULT_RULES, DEFAULT_RULES_NAME)]).unwrap_or_else(|_| Self::empty())
    }

    /// The defaults extended by an operator's rules file.
    pub fn with_extra(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::compile(&[(DEFAULT_RULES, DEFAULT_RULES_NAME), (&text, &file)])
    }

    fn empty() -> Self {
        let mut needs = [ClassNeed {
            heavy_bps: 10_000_000,
            ..ClassNeed::default()
        }; 9];
        needs[TrafficClass::Sensitive as usize].needs_encryption = true;
        Rules {
            tcp_ports: vec![0; 65536].into_boxed_slice(),
            udp_ports: vec![0; 65536].into_boxed_slice(),
            names: Vec::new(),
            behaviours: Vec::new(),
            needs,
        }
    }

    /// Compile rule texts in order; later texts take precedence.
    pub fn compile(texts: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let mut r = Self::empty();
        for (text, file) in texts {
            let parsed: RulesFile = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
            let cx = Ctx { file, text };
            for (name, need) in &parsed.need {
                let class = TrafficClass::from_name(name).ok_or_else(|| {
                    cx.err(need.span(), "need", format!("unknown class `{name}`"))
                })?;
                let n = need.get_ref();
                r.needs[class as usize] = ClassNeed {
                    latency_sensitive: n.latency_sensitive,
                    needs_encryption: n.needs_encryption,
                    heavy_bps: n.heavy_bps.unwrap_or(10_000_000),
                };
            }
            for p in &parsed.port {
                let class = cx.class(&p.class, "port.class")?;
                let proto = cx.proto(&p.proto)?;
                let v = class as u8 + 1;
                let mut set = |port: u16| {
                    if proto != Some(17) {
                        r.tcp_ports[usize::from(port)] = v;
                    }
                    if proto != Some(6) {
                        r.udp_ports[usize::from(port)] = v;
                    }
                };
                for &port in &p.ports {
                    set(port);
                }
                for range in &p.ranges {
                    let (a, b) = *range.get_ref();
                    if a > b {
                        return Err(cx.err(
                            range.span(),
                            "port.ranges",
                            format!("range [{a}, {b}] is reversed"),
                        ));
                    }
                    for port in a..=b {
                        set(port);
                    }
                }
            }
            // Later files' names and behaviours go first.
            let mut names = Vec::new();
            for n in &parsed.name {
                let class = cx.class(&n.class, "name.class")?;
                let proto = match &n.proto {
                    Some(p) => cx.proto(p)?,
                    None => None,
                };
                for s in &n.suffixes {
                    names.push(NameRule {
                        pattern: NamePattern::Suffix(s.trim_matches('.').to_ascii_lowercase()),
                        class,
                        proto,
                    });
                }
                for w in &n.contains {
                    if w.get_ref().is_empty() {
                        return Err(cx.err(
                            w.span(),
                            "name.contains",
                            "an empty word would match every name".into(),
                        ));
                    }
                    names.push(NameRule {
                        pattern: NamePattern::Contains(w.get_ref().to_ascii_lowercase()),
                        class,
                        proto,
                    });
                }
            }
            names.append(&mut r.names);
            r.names = names;
            let mut bs = Vec::new();
            for b in &parsed.behaviour {
                let class = cx.class(&b.class, "behaviour.class")?;
                let mut from = Vec::new();
                for f in b.from.get_ref() {
                    from.push(TrafficClass::from_name(f).ok_or_else(|| {
                        cx.err(
                            b.from.span(),
                            "behaviour.from",
                            format!("unknown class `{f}`"),
                        )
                    })?);
                }
                let proto = match &b.proto {
                    Some(p) => cx.proto(p)?,
                    None => None,
                };
                bs.push(BehaviourRule {
                    class,
                    from,
                    proto,
                    min_packets: b.min_packets.unwrap_or(0),
                    min_bytes: b.min_bytes.unwrap_or(0),
                    min_pps: b.min_pps.unwrap_or(0.0),
                    max_pps: b.max_pps.unwrap_or(f64::INFINITY),
                    min_avg_size: b.min_avg_size.unwrap_or(0.0),
                    max_avg_size: b.max_avg_size.unwrap_or(f64::INFINITY),
                    min_ratio: b.min_ratio.unwrap_or(0.0),
                    max_ratio: b.max_ratio.unwrap_or(f64::INFINITY),
                    max_rate_bps: b.max_rate_bps.unwrap_or(f64::INFINITY),
                    max_pps_ratio: b.max_pps_ratio.unwrap_or(f64::INFINITY),
                    max_size_ratio: b.max_size_ratio.unwrap_or(f64::INFINITY),
                    min_pauses: b.min_pauses.unwrap_or(0),
                    max_pauses: b.max_pauses.unwrap_or(u32::MAX),
                });
            }
            bs.append(&mut r.behaviours);
            r.behaviours = bs;
        }
        Ok(r)
    }

    /// Class of a port rule for this protocol and port, if any.
    #[inline]
    pub fn port_class(&self, proto: u8, port: u16) -> Option<TrafficClass> {
        let v = match proto {
            6 => self.tcp_ports[usize::from(port)],
            17 => self.udp_ports[usize::from(port)],
            _ => 0,
        };
        if v == 0 {
            None
        } else {
            TrafficClass::ALL.get(usize::from(v - 1)).copied()
        }
    }

    /// Class of the first name rule for IP protocol `proto` that matches
    /// `name` (a suffix on a label boundary, or a word anywhere).
    pub fn name_class(&self, name: &str, proto: u8) -> Option<TrafficClass> {
        let name = name.trim_end_matches('.');
        self.names.iter().find_map(|rule| {
            let hit = rule.proto.is_none_or(|p| p == proto) && rule.pattern.matches(name);
            hit.then_some(rule.class)
        })
    }

    pub fn behaviours(&self) -> &[BehaviourRule] {
        &self.behaviours
    }

    pub fn need(&self, class: TrafficClass) -> ClassNeed {
        self.needs[class as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_defaults_compile() {
        let r = Rules::compile(&[(DEFAULT_RULES, "default.toml")]).expect("defaults compile");
        assert_eq!(r.port_class(17, 53), Some(TrafficClass::Dns));
        assert_eq!(r.port_class(6, 22), Some(TrafficClass::Interactive));
        assert_eq!(r.port_class(17, 27015), Some(TrafficClass::Gaming));
        assert_eq!(r.port_class(6, 53_999), None);
        assert_eq!(
            r.name_class("online.BANK.example", 6),
            Some(TrafficClass::Sensitive)
        );
        assert_eq!(
            r.name_class("online.lloydsbank.co.uk", 6),
            Some(TrafficClass::Sensitive),
            "a word anywhere in the name"
        );
        assert_eq!(r.name_class("www.example.org", 6), None);
        // Calls' names hold for their media (UDP) only: a chat app's file
        // downloads over HTTPS come from the same domains.
        assert_eq!(r.name_class("mmg.whatsapp.net", 6), None);
        assert_eq!(
            r.name_class("g.whatsapp.net", 17),
            Some(TrafficClass::Calls)
        );
        assert!(r.need(TrafficClass::Calls).latency_sensitive);
    }

    #[test]
    fn operator_rules_override_and_errors_name_line_and_field() {
        let extra = "[[port]]\nclass = \"gaming\"\nproto = \"tcp\"\nports = [22]\n";
        let r = Rules::compile(&[(DEFAULT_RULES, "d"), (extra, "x.toml")]).expect("compiles");
        assert_eq!(r.port_class(6, 22), Some(TrafficClass::Gaming));
        let e = Rules::compile(&[("[[name]]\nclass = \"web\"\ncontains = [\"\"]\n", "n.toml")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("n.toml:3: field `name.contains`"), "{e}");
        let bad = "[[port]]\nclass = \"gamin\"\nproto = \"tcp\"\n";
        let e = Rules::compile(&[(bad, "bad.toml")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.toml:2: field `port.class`"), "{e}");
        let e = MonitorConfig::from_toml("window_ms = 1000\nmax_flows = \"x\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.toml:2: field `max_flows`"), "{e}");
        let e = MonitorConfig::from_toml("window_ms = 5\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.toml:1: field `window_ms`"), "{e}");
        let e = MonitorConfig::from_toml("\nwindow = 5\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.toml:2: field `window`"), "{e}");
    }
}
