//! A tiny `key = value` configuration format for shard config bytes.
//!
//! The agent hands each shard opaque bytes; the first-catalog shards use this
//! line format (`#` comments, blank lines ignored, values optionally quoted)
//! so the SDK stays dependency-free and every shard parses config the same way.

use crate::ShardError;
use std::collections::BTreeMap;
use std::str::FromStr;

/// Parsed `key = value` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValues {
    entries: BTreeMap<String, String>,
}

impl KeyValues {
    /// Parses config bytes; errors name the line.
    pub fn parse(bytes: &[u8]) -> Result<Self, ShardError> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| ShardError::invalid("config is not UTF-8"))?;
        let mut entries = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(ShardError::invalid(format!(
                    "config line {}: expected key = value",
                    n + 1
                )));
            };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            entries.insert(k.trim().to_owned(), v.to_owned());
        }
        Ok(Self { entries })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// A required value, parsed.
    pub fn require<T: FromStr>(&self, key: &str) -> Result<T, ShardError> {
        let raw = self
            .get(key)
            .ok_or_else(|| ShardError::invalid(format!("config: missing key {key:?}")))?;
        raw.parse()
            .map_err(|_| ShardError::invalid(format!("config: key {key:?}: cannot parse {raw:?}")))
    }

    /// An optional value, parsed, with a default.
    pub fn get_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, ShardError> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.require(key),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Takes ownership of a descriptor the host opened for this shard before
    /// sandboxing it (see [`PASSED_TUN_FD`]); `None` when the key is absent.
    ///
    /// Shards run sandboxed (no capabilities, no device nodes): a privileged
    /// resource such as a TUN device is opened by the host and passed in as a
    /// descriptor number under a `…_fd` key. Call this at most once per key:
    /// the returned descriptor is the shard's and is closed when dropped.
    pub fn take_fd(&self, key: &str) -> Result<Option<std::os::fd::OwnedFd>, ShardError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let fd: i32 = raw.parse().ok().filter(|&fd| fd > 2).ok_or_else(|| {
            ShardError::invalid(format!("config: {key} = {raw:?} is no descriptor"))
        })?;
        // SAFETY: the host passes, under this key, a descriptor it opened for this shard
        // alone and never closes or uses itself; ownership moves to the shard here.
        Ok(Some(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }
}

/// Config key under which the host passes the TUN device a shard declared
/// with `tun = NAME` (already attached, non-blocking, `IFF_TUN | IFF_NO_PI`).
pub const PASSED_TUN_FD: &str = "tun_fd";

/// Decodes lower-case or upper-case hex (for keys in config).
pub fn decode_hex(s: &str) -> Result<Vec<u8>, ShardError> {
    if s.len() % 2 != 0 {
        return Err(ShardError::invalid("hex string has odd length"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| ShardError::invalid("bad hex digit"))
        })
        .collect()
}
