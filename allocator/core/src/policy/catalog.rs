//! The shard catalog and the service agreements (tiers) as data, parsed from
//! TOML (the service reads the files). Every error names the file, the line and the field, because an
//! operator edits these files by hand and a bad one must be fixable from the
//! message alone.
//!
//! The catalog also carries the *rules* that turn a QoS need into required
//! capabilities, so that allocation policy is data, not code.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::ShardRef;
use shardline_shared::msg::{QosNeed, ShardKind};
use shardline_support::toml_diag;
use std::collections::{BTreeMap, BTreeSet};
use toml::Spanned;

/// Why a catalog or agreements file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{path}:{line}: field `{field}`: {message}")]
    Invalid {
        path: String,
        /// 1-based line of the offending value (0 when the parser gave no position).
        line: usize,
        field: String,
        message: String,
    },
}

/// A device feature a shard can be preferred under (reported in `DeviceResources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceFeature {
    AesHw,
}

/// One QoS need flag of [`QosNeed`], as rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeedFlag {
    LatencySensitive,
    BandwidthHeavy,
    NeedsEncryption,
}

impl NeedFlag {
    pub fn matches(self, need: &QosNeed) -> bool {
        match self {
            NeedFlag::LatencySensitive => need.latency_sensitive,
            NeedFlag::BandwidthHeavy => need.bandwidth_heavy,
            NeedFlag::NeedsEncryption => need.needs_encryption,
        }
    }
}

/// Resource cost of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceCost {
    /// CPU per mille of one core.
    pub cpu_permille: u32,
    pub memory_kib: u64,
    pub bandwidth_kbps: u64,
}

/// What one resource unit is: a shard costs as many units as its dominant
/// resource needs (rounded up, at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSize {
    pub cpu_permille: u32,
    pub memory_kib: u64,
    pub bandwidth_kbps: u64,
}

impl Default for UnitSize {
    fn default() -> Self {
        Self {
            cpu_permille: 100,
            memory_kib: 16 * 1024,
            bandwidth_kbps: 20_000,
        }
    }
}

impl UnitSize {
    pub fn units_of(&self, cost: &ResourceCost) -> u32 {
        let div = |a: u64, b: u64| if b == 0 { 0 } else { a.div_ceil(b) };
        let cpu = div(cost.cpu_permille.into(), self.cpu_permille.into());
        let mem = div(cost.memory_kib, self.memory_kib);
        let bw = div(cost.bandwidth_kbps, self.bandwidth_kbps);
        cpu.max(mem).max(bw).clamp(1, u64::from(u32::MAX)) as u32
    }
}

/// The builds of one shard library: one SHA-256 per architecture the
/// agents report (`DeviceResources::arch`, i.e. Rust's
/// `std::env::consts::ARCH`: `x86_64`, `aarch64`, `arm`), or one digest for
/// every architecture (the plain `sha256 = "…"` form).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Builds {
    /// The digest for every architecture (plain string form).
    pub any: Option<[u8; 32]>,
    /// Architecture ⇒ digest (table form).
    pub per_arch: BTreeMap<String, [u8; 32]>,
}

impl Builds {
    /// One digest for every architecture.
    pub fn universal(sha256: [u8; 32]) -> Self {
        Self {
            any: Some(sha256),
            per_arch: BTreeMap::new(),
        }
    }

    /// The digest of the library built for `arch` (`None` = the device has
    /// not reported its architecture yet; only a universal digest fits then).
    pub fn for_arch(&self, arch: Option<&str>) -> Option<[u8; 32]> {
        arch.and_then(|a| self.per_arch.get(a).copied())
            .or(self.any)
    }

    /// Entries whose digest is all zero: placeholders for a library not
    /// built yet (`check-config` warns). The planner does not skip them:
    /// the device refuses a library whose digest does not match, and the
    /// example catalog's placeholders must still plan in simulations.
    pub fn not_built(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.any == Some([0; 32]) {
            out.push("*".to_owned());
        }
        for (arch, d) in &self.per_arch {
            if *d == [0; 32] {
                out.push(arch.clone());
            }
        }
        out
    }
}

/// One shard of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub shard: ShardRef,
    pub capability: String,
    pub kind: ShardKind,
    /// The library's SHA-256 per architecture.
    pub builds: Builds,
    pub cost: ResourceCost,
    /// Resource units (see [`UnitSize`]), precomputed at load.
    pub units: u32,
    /// Shard ids to try, in order, when this one does not fit or is not allowed.
    pub alternatives: Vec<String>,
    /// Shard ids that must run with this one.
    pub depends_on: Vec<String>,
    pub priority: u8,
    /// When set and the device lacks the feature, the alternatives go first.
    pub prefer_when: Option<DeviceFeature>,
    /// Configuration shared by every device (`key = value` lines, UTF-8 in
    /// the file); never holds a key of `secret_config`.
    pub config: Vec<u8>,
    /// Keys each device must have set (per-device configuration) before
    /// the shard is activated there.
    pub device_config: Vec<String>,
    /// Keys that only ever travel sealed to the device (never in `config`,
    /// never in clear on the broker); each is required per device.
    pub secret_config: Vec<String>,
}

impl ShardSpec {
    /// Every key the device must have set: `device_config` then `secret_config`.
    pub fn required_keys(&self) -> impl Iterator<Item = (&str, bool)> {
        self.device_config
            .iter()
            .map(|k| (k.as_str(), false))
            .chain(self.secret_config.iter().map(|k| (k.as_str(), true)))
    }
}

/// A capability: the member shards that together provide it (alternatives are
/// reached through their member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilitySpec {
    pub name: String,
    pub members: Vec<String>,
    /// Conflict priority: the highest member priority.
    pub priority: u8,
}

/// Need flag ⇒ capabilities, when the class rate is at least `min_rate_bps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub need: NeedFlag,
    pub capabilities: Vec<String>,
    pub min_rate_bps: u64,
}

/// The shard catalog plus the need rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub units: UnitSize,
    pub shards: BTreeMap<String, ShardSpec>,
    pub capabilities: BTreeMap<String, CapabilitySpec>,
    pub rules: Vec<Rule>,
}

/// One service agreement (tier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// Devices of one tenant share a borrowing pool.
    pub tenant: Option<String>,
    pub capabilities: BTreeSet<String>,
    pub compute_units: u32,
    pub data_units: u32,
    /// Activations carry at most this priority.
    pub max_priority: u8,
    /// No lease is longer than this.
    pub lease_cap_ms: u64,
    pub borrowing: bool,
}

impl Tier {
    pub fn budget(&self, kind: ShardKind) -> u32 {
        match kind {
            ShardKind::Compute => self.compute_units,
            ShardKind::Data => self.data_units,
        }
    }
}

/// The set of tiers, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreements {
    pub tiers: BTreeMap<String, Tier>,
}

// ---------------------------------------------------------------- raw files

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    units: Option<UnitSize>,
    #[serde(default)]
    shard: Vec<Spanned<RawShard>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    id: Spanned<String>,
    version: Spanned<String>,
    /// A hex string (every architecture) or a table `arch = "hex"`.
    sha256: Spanned<toml::Value>,
    capability: Spanned<String>,
    kind: ShardKind2,
    cpu_permille: u32,
    memory_kib: u64,
    #[serde(default)]
    bandwidth_kbps: u64,
    priority: u8,
    #[serde(default)]
    alternatives: Vec<Spanned<String>>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
    #[serde(default)]
    prefer_when: Option<DeviceFeature>,
    #[serde(default)]
    config: Option<Spanned<String>>,
    #[serde(default)]
    device_config: Vec<Spanned<String>>,
    #[serde(default)]
    secret_config: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum ShardKind2 {
    Compute,
    Data,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    need: NeedFlag,
    capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    min_rate_bps: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgreements {
    #[serde(default)]
    tier: Vec<Spanned<RawTier>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: Spanned<String>,
    #[serde(default)]
    tenant: Option<String>,
    capabilities: Vec<Spanned<String>>,
    compute_units: u32,
    data_units: u32,
    max_priority: u8,
    lease_cap_s: Spanned<u64>,
    #[serde(default)]
    borrowing: bool,
}

/// The text being parsed, so errors can name its file, line and field.
struct Source<'a> {
    path: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn err(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> CatalogError {
        self.invalid(toml_diag::at_span(self.text, span, field, message))
    }

    fn parse_err(&self, e: toml::de::Error) -> CatalogError {
        self.invalid(toml_diag::parse_error(self.text, &e))
    }

    fn invalid(&self, at: toml_diag::Located) -> CatalogError {
        CatalogError::Invalid {
            path: self.path.to_owned(),
            line: at.line,
            field: at.field,
            message: at.message,
        }
    }
}

fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(s).ok()?;
    bytes.try_into().ok()
}

/// Architecture names as agents report them (`std::env::consts::ARCH`);
/// a typo here would silently leave a device without a build.
const KNOWN_ARCHES: &[&str] = &[
    "x86_64",
    "x86",
    "aarch64",
    "arm",
    "riscv64",
    "mips",
    "mips64",
    "powerpc64",
    "s390x",
    "loongarch64",
];

fn parse_builds(src: &Source<'_>, v: &Spanned<toml::Value>) -> Result<Builds, CatalogError> {
    let bad = |what: &str| {
        src.err(
            v.span(),
            "sha256",
            format!("{what}: must be 64 hexadecimal characters"),
        )
    };
    match v.get_ref() {
        toml::Value::String(s) => parse_sha256(s)
            .map(Builds::universal)
            .ok_or_else(|| bad("the digest")),
        toml::Value::Table(t) => {
            let mut per_arch = BTreeMap::new();
            for (arch, d) in t {
                if !KNOWN_ARCHES.contains(&arch.as_str()) {
                    return Err(src.err(
                        v.span(),
                        &format!("sha256.{arch}"),
                        format!(
                            "unknown architecture {arch:?} (agents report one of {})",
                            KNOWN_ARCHES.join(", ")
                        ),
                    ));
                }
                let digest = d.as_str().and_then(parse_sha256).ok_or_else(|| {
                    src.err(
                        v.span(),
                        &format!("sha256.{arch}"),
                        "must be 64 hexadecimal characters",
                    )
                })?;
                per_arch.insert(arch.clone(), digest);
            }
            if per_arch.is_empty() {
                return Err(src.err(v.span(), "sha256", "names no architecture"));
            }
            Ok(Builds {
                any: None,
                per_arch,
            })
        }
        _ => Err(bad("a string or a table `arch = \"hex\"`")),
    }
}

/// A configuration key name: what the shards' `KeyValues` parser accepts
/// and what can be named on a command line.
pub fn valid_config_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 64
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `key = value` lines of a configuration text: (byte offset of the line, key).
pub fn config_keys(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            if let Some((k, _)) = t.split_once('=') {
                out.push((offset, k.trim()));
            }
        }
        offset += line.len();
    }
    out
}

fn parse_key_list(
    src: &Source<'_>,
    field: &str,
    keys: &[Spanned<String>],
) -> Result<Vec<String>, CatalogError> {
    let mut out: Vec<String> = Vec::new();
    for k in keys {
        if !valid_config_key(k.get_ref()) {
            return Err(src.err(
                k.span(),
                field,
                format!(
                    "{:?} is not a configuration key (lowercase letters, digits, `_`, `-`)",
                    k.get_ref()
                ),
            ));
        }
        if !out.contains(k.get_ref()) {
            out.push(k.get_ref().clone());
        }
    }
    Ok(out)
}

impl Catalog {
    /// Parses and validates a catalog; `path` is only used in error messages.
    pub fn from_toml_str(text: &str, path: &str) -> Result<Self, CatalogError> {
        let src = Source { path, text };
        let raw: RawCatalog = toml::from_str(text).map_err(|e| src.parse_err(e))?;
        let units = raw.units.unwrap_or_default();
        if units.cpu_permille == 0 && units.memory_kib == 0 && units.bandwidth_kbps == 0 {
            return Err(src.err(0..0, "units", "at least one unit size must be non-zero"));
        }
        let mut shards = BTreeMap::new();
        let mut spans = BTreeMap::new();
        for s in &raw.shard {
            let r = s.get_ref();
            let shard = ShardRef::new(r.id.get_ref().clone(), r.version.get_ref().clone())
                .map_err(|e| src.err(r.id.span(), "id", e.to_string()))?;
            let builds = parse_builds(&src, &r.sha256)?;
            let device_config = parse_key_list(&src, "device_config", &r.device_config)?;
            let secret_config = parse_key_list(&src, "secret_config", &r.secret_config)?;
            if let Some(k) = secret_config.iter().find(|k| device_config.contains(k)) {
                return Err(src.err(
                    s.span(),
                    "secret_config",
                    format!("{k:?} is in both device_config and secret_config"),
                ));
            }
            // A secret in the fleet-wide configuration would travel in clear
            // in every instruction: refuse it here, pointing at its line.
            let config_text = r.config.as_ref().map_or("", |c| c.get_ref().as_str());
            let config_span = r.config.as_ref().map_or(s.span(), |c| c.span());
            for (offset, key) in config_keys(config_text) {
                if secret_config.iter().any(|k| k == key) {
                    // The value starts after its opening quote(s).
                    let span = config_span.clone();
                    let quote = text
                        .get(span.clone())
                        .map_or(0, |t| t.len() - t.trim_start_matches(['\'', '"']).len());
                    let skip_newline = text
                        .get(span.start + quote..)
                        .is_some_and(|t| t.starts_with('\n'));
                    let at = span.start + quote + usize::from(skip_newline) + offset;
                    return Err(src.err(
                        at..at,
                        "config",
                        format!(
                            "key {key:?} is secret (secret_config): it is never sent in clear; \
                             set it per device: shardctl config set DEVICE {} --secret {key}=…",
                            r.id.get_ref()
                        ),
                    ));
                }
            }
            if r.capability.get_ref().is_empty() {
                return Err(src.err(r.capability.span(), "capability", "must not be empty"));
            }
            // The limits an activation carries come from these costs; the
            // device refuses limits outside `LIMIT_RANGES`, so a catalog
            // with such a cost could never run anywhere (and each refusal
            // would be re-planned): refuse it here, where the operator reads.
            let ranges = &shardline_shared::accept::LIMIT_RANGES;
            if r.cpu_permille > ranges.max_cpu_quota_permille {
                return Err(src.err(
                    s.span(),
                    "cpu_permille",
                    format!(
                        "{} is more than devices accept (at most {})",
                        r.cpu_permille, ranges.max_cpu_quota_permille
                    ),
                ));
            }
            let memory_bytes = r.memory_kib.saturating_mul(1024);
            if memory_bytes != 0
                && !(ranges.min_memory_bytes..=ranges.max_memory_bytes).contains(&memory_bytes)
            {
                return Err(src.err(
                    s.span(),
                    "memory_kib",
                    format!(
                        "{} KiB is outside what devices accept ({} KiB to {} KiB, or 0 for no cap)",
                        r.memory_kib,
                        ranges.min_memory_bytes / 1024,
                        ranges.max_memory_bytes / 1024
                    ),
                ));
            }
            let cost = ResourceCost {
                cpu_permille: r.cpu_permille,
                memory_kib: r.memory_kib,
                bandwidth_kbps: r.bandwidth_kbps,
            };
            let spec = ShardSpec {
                shard,
                capability: r.capability.get_ref().clone(),
                kind: match r.kind {
                    ShardKind2::Compute => ShardKind::Compute,
                    ShardKind2::Data => ShardKind::Data,
                },
                builds,
                units: units.units_of(&cost),
                cost,
                alternatives: r.alternatives.iter().map(|a| a.get_ref().clone()).collect(),
                depends_on: r.depends_on.iter().map(|a| a.get_ref().clone()).collect(),
                priority: r.priority,
                prefer_when: r.prefer_when,
                config: config_text.as_bytes().to_vec(),
                device_config,
                secret_config,
            };
            let id = r.id.get_ref().clone();
            if shards.insert(id.clone(), spec).is_some() {
                return Err(src.err(r.id.span(), "id", format!("shard {id:?} is defined twice")));
            }
            spans.insert(id, s);
        }
        // References: alternatives and dependencies must exist; alternatives
        // stay within their capability (one host process per capability).
        let mut is_alternative = BTreeSet::new();
        for (id, s) in &spans {
            let r = s.get_ref();
            for a in &r.alternatives {
                let Some(alt) = shards.get(a.get_ref()) else {
                    return Err(src.err(
                        a.span(),
                        "alternatives",
                        format!("unknown shard {:?}", a.get_ref()),
                    ));
                };
                if alt.capability != *r.capability.get_ref() {
                    return Err(src.err(
                        a.span(),
                        "alternatives",
                        format!(
                            "{:?} belongs to capability {:?}, not {:?}",
                            a.get_ref(),
                            alt.capability,
                            r.capability.get_ref()
                        ),
                    ));
                }
                if a.get_ref() == id {
                    return Err(src.err(
                        a.span(),
                        "alternatives",
                        "a shard cannot be its own alternative",
                    ));
                }
                is_alternative.insert(a.get_ref().clone());
            }
            for d in &r.depends_on {
                if !shards.contains_key(d.get_ref()) || d.get_ref() == id {
                    return Err(src.err(
                        d.span(),
                        "depends_on",
                        format!("unknown shard {:?}", d.get_ref()),
                    ));
                }
            }
        }
        let mut capabilities: BTreeMap<String, CapabilitySpec> = BTreeMap::new();
        for (id, spec) in &shards {
            if is_alternative.contains(id) {
                continue;
            }
            let cap = capabilities
                .entry(spec.capability.clone())
                .or_insert_with(|| CapabilitySpec {
                    name: spec.capability.clone(),
                    members: Vec::new(),
                    priority: 0,
                });
            cap.members.push(id.clone());
            cap.priority = cap.priority.max(spec.priority);
        }
        for (id, spec) in &shards {
            if is_alternative.contains(id) && !capabilities.contains_key(&spec.capability) {
                let s = &spans[id];
                return Err(src.err(
                    s.span(),
                    "capability",
                    format!("capability {:?} has only alternatives", spec.capability),
                ));
            }
        }
        let mut rules = Vec::new();
        for r in &raw.rule {
            let rr = r.get_ref();
            for c in &rr.capabilities {
                if !capabilities.contains_key(c.get_ref()) {
                    return Err(src.err(
                        c.span(),
                        "capabilities",
                        format!("unknown capability {:?}", c.get_ref()),
                    ));
                }
            }
            rules.push(Rule {
                need: rr.need,
                capabilities: rr
                    .capabilities
                    .iter()
                    .map(|c| c.get_ref().clone())
                    .collect(),
                min_rate_bps: rr.min_rate_bps,
            });
        }
        Ok(Self {
            units,
            shards,
            capabilities,
            rules,
        })
    }

    pub fn shard(&self, id: &str) -> Option<&ShardSpec> {
        self.shards.get(id)
    }
}

impl Agreements {
    /// Parses and validates the tiers against `catalog` (capabilities must exist).
    pub fn from_toml_str(text: &str, path: &str, catalog: &Catalog) -> Result<Self, CatalogError> {
        let src = Source { path, text };
        let raw: RawAgreements = toml::from_str(text).map_err(|e| src.parse_err(e))?;
        let mut tiers = BTreeMap::new();
        for t in &raw.tier {
            let r = t.get_ref();
            let name = r.name.get_ref().clone();
            if name.is_empty() {
                return Err(src.err(r.name.span(), "name", "must not be empty"));
            }
            let mut caps = BTreeSet::new();
            for c in &r.capabilities {
                if !catalog.capabilities.contains_key(c.get_ref()) {
                    return Err(src.err(
                        c.span(),
                        "capabilities",
                        format!("unknown capability {:?}", c.get_ref()),
                    ));
                }
                caps.insert(c.get_ref().clone());
            }
            if *r.lease_cap_s.get_ref() == 0 {
                return Err(src.err(r.lease_cap_s.span(), "lease_cap_s", "must be at least 1"));
            }
            let tier = Tier {
                name: name.clone(),
                tenant: r.tenant.clone(),
                capabilities: caps,
                compute_units: r.compute_units,
                data_units: r.data_units,
                max_priority: r.max_priority,
                lease_cap_ms: r.lease_cap_s.get_ref().saturating_mul(1000),
                borrowing: r.borrowing,
            };
            if tiers.insert(name.clone(), tier).is_some() {
                return Err(src.err(
                    r.name.span(),
                    "name",
                    format!("tier {name:?} is defined twice"),
                ));
            }
        }
        Ok(Self { tiers })
    }
}
