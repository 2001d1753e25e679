//! The TOML file of `shardline-agent shards run CAPABILITY --config FILE`:
//! the shards of one capability with their library hashes, configuration and
//! limits, as the daemon would receive them in a signed instruction.
//!
//! ```toml
//! shard_dir = "/var/lib/shardline/shards"
//! [[shard]]
//! ref = "crypto-chacha20poly1305@0.1.0"
//! sha256 = "…64 hex digits…"
//! limits = { memory_max_bytes = 67108864, cpu_quota_permille = 500, nice = 5 }
//! bandwidth_kbps = 2000              # optional: kernel-enforced cap (see `bandwidth`)
//! config = { key = "value" }          # handed to the shard as `key = value` lines
//! [[shard.alternative]]               # same fields; used after the primary is quarantined
//! ref = "crypto-aes256gcm@0.1.0"
//! sha256 = "…"
//! ```
#![forbid(unsafe_code)]

use super::supervisor::ShardSpec;
use serde::Deserialize;
use shardline_shared::msg::{Activation, ResourceLimits, ShardKind};
use shardline_shared::ShardRef;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: shard {index} field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        index: usize,
        field: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    shard_dir: PathBuf,
    #[serde(default)]
    heartbeat_ms: Option<u64>,
    #[serde(default, rename = "shard")]
    shards: Vec<ShardDoc>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardDoc {
    #[serde(rename = "ref")]
    shard: String,
    sha256: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    limits: Option<LimitsDoc>,
    /// Declared bandwidth, kbit/s (0 or absent: none).
    #[serde(default)]
    bandwidth_kbps: u64,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default, rename = "alternative")]
    alternatives: Vec<ShardDoc>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    #[serde(default = "d_cpu")]
    cpu_quota_permille: u32,
    #[serde(default = "d_weight")]
    cpu_weight: u16,
    #[serde(default = "d_mem")]
    memory_max_bytes: u64,
    #[serde(default)]
    nice: i8,
}

fn d_cpu() -> u32 {
    500
}
fn d_weight() -> u16 {
    100
}
fn d_mem() -> u64 {
    64 << 20
}

/// Default limits of a shard whose file gives none.
pub const DEFAULT_LIMITS: ResourceLimits = ResourceLimits {
    cpu_quota_permille: 500,
    cpu_weight: 100,
    memory_max_bytes: 64 << 20,
    nice: 0,
};

/// A parsed run file.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub shard_dir: PathBuf,
    pub heartbeat_ms: Option<u64>,
    pub shards: Vec<ShardSpec>,
}

/// Renders a config table as the `key = value` lines shards parse.
pub fn config_bytes(table: &BTreeMap<String, toml::Value>) -> Vec<u8> {
    let mut out = String::new();
    for (k, v) in table {
        let v = match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push_str(&format!("{k} = {v}\n"));
    }
    out.into_bytes()
}

fn spec(
    path: &Path,
    capability: &str,
    index: usize,
    d: &ShardDoc,
    nested: bool,
) -> Result<ShardSpec, RunConfigError> {
    let field = |field: &'static str, reason: String| RunConfigError::Field {
        path: path.to_owned(),
        index,
        field,
        reason,
    };
    let shard: ShardRef = d
        .shard
        .parse()
        .map_err(|e: shardline_shared::IdError| field("ref", e.to_string()))?;
    let sha = hex::decode(d.sha256.trim()).map_err(|e| field("sha256", e.to_string()))?;
    let sha256: [u8; 32] = sha
        .try_into()
        .map_err(|_| field("sha256", "must be 32 bytes (64 hex digits)".into()))?;
    let kind = match d.kind.as_deref() {
        None | Some("compute") => ShardKind::Compute,
        Some("data") => ShardKind::Data,
        Some(other) => return Err(field("kind", format!("{other:?} is not compute or data"))),
    };
    let limits = d
        .limits
        .map(|l| ResourceLimits {
            cpu_quota_permille: l.cpu_quota_permille,
            cpu_weight: l.cpu_weight,
            memory_max_bytes: l.memory_max_bytes,
            nice: l.nice,
        })
        .unwrap_or(DEFAULT_LIMITS);
    if nested && !d.alternatives.is_empty() {
        return Err(field(
            "alternative",
            "alternatives cannot have alternatives".into(),
        ));
    }
    let alternatives = d
        .alternatives
        .iter()
        .map(|a| spec(path, capability, index, a, true))
        .collect::<Result<_, _>>()?;
    Ok(ShardSpec {
        activation: Activation {
            shard,
            capability: capability.to_owned(),
            kind,
            sha256,
            config: config_bytes(&d.config),
            limits,
            priority: d.priority.unwrap_or(100),
            lease_expires_at_ms: u64::MAX,
        },
        path: d.path.clone(),
        sealed_config: Vec::new(),
        bandwidth_kbps: d.bandwidth_kbps,
        alternatives,
    })
}

impl RunConfig {
    pub fn parse(path: &Path, text: &str, capability: &str) -> Result<Self, RunConfigError> {
        let doc: FileDoc = toml::from_str(text).map_err(|source| RunConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let shards = doc
            .shards
            .iter()
            .enumerate()
            .map(|(i, d)| spec(path, capability, i, d, false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            shard_dir: doc.shard_dir,
            heartbeat_ms: doc.heartbeat_ms,
            shards,
        })
    }

    pub fn load(path: &Path, capability: &str) -> Result<Self, RunConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| RunConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, capability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shards_alternatives_and_names_bad_fields() {
        let sha = "ab".repeat(32);
        let text = format!(
            "shard_dir = \"/tmp/s\"\n[[shard]]\nref = \"crypto-aes256gcm@0.1.0\"\nsha256 = \"{sha}\"\nconfig = {{ rate = 5, name = \"x\" }}\n[[shard.alternative]]\nref = \"crypto-chacha20poly1305@0.1.0\"\nsha256 = \"{sha}\"\n"
        );
        let c = RunConfig::parse(Path::new("f.toml"), &text, "vpn").unwrap();
        assert_eq!(c.shards.len(), 1);
        assert_eq!(c.shards[0].alternatives.len(), 1);
        assert_eq!(c.shards[0].activation.config, b"name = x\nrate = 5\n");
        let bad = text.replace(&sha, "abc");
        let err = RunConfig::parse(Path::new("f.toml"), &bad, "vpn")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.toml") && err.contains("sha256"), "{err}");
        let err = RunConfig::parse(Path::new("f.toml"), "shard_dir = 3", "vpn")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
