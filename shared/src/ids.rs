//! Validated identifiers.
//!
//! A device id ends up in MQTT topic names and file names, so it is restricted
//! to a safe alphabet at construction *and* at deserialization: a message can
//! never carry an id that would escape its topic (`+`, `#`, `/`) or a path.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must be 1 to {max} characters, got {len}")]
    Length {
        what: &'static str,
        max: usize,
        len: usize,
    },
    #[error("{what} {value:?} may only contain ASCII letters, digits, '.', '_' and '-' and must not start with '.'")]
    Alphabet { what: &'static str, value: String },
}

fn check_token(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() || value.len() > max {
        return Err(IdError::Length {
            what,
            max,
            len: value.len(),
        });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !value.chars().all(ok_char) || value.starts_with('.') {
        return Err(IdError::Alphabet {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Checks a capability name (e.g. `vpn`) from the wire: the agent names a
/// host process and its cgroup after it, so it gets the device-id alphabet
/// and length (1–64 of `[A-Za-z0-9._-]`, not starting with '.').
pub fn check_capability(value: &str) -> Result<(), IdError> {
    check_token("capability", value, DeviceId::MAX_LEN)
}

/// A device's identity: 1–64 characters of `[A-Za-z0-9._-]`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_token("device id", &value, Self::MAX_LEN)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// Identifies a signing key: the first 8 bytes of SHA-256 over its public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of_public_key(public: &[u8; 32]) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(public);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", hex::encode(self.0))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A shard by id and version, written `id@version`. Both parts use the same
/// safe alphabet as device ids (at most 64 characters each), because they name
/// files in the agent's shard directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ShardRef {
    id: String,
    version: String,
}

impl ShardRef {
    pub const MAX_LEN: usize = 64;

    pub fn new(id: impl Into<String>, version: impl Into<String>) -> Result<Self, IdError> {
        let (id, version) = (id.into(), version.into());
        check_token("shard id", &id, Self::MAX_LEN)?;
        check_token("shard version", &version, Self::MAX_LEN)?;
        Ok(Self { id, version })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn version(&self) -> &str {
        &self.version
    }
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.version)
    }
}

impl std::str::FromStr for ShardRef {
    type Err = IdError;
    /// Parses `id@version`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('@') {
            Some((id, version)) => Self::new(id, version),
            None => Err(IdError::Alphabet {
                what: "shard reference (id@version)",
                value: s.to_owned(),
            }),
        }
    }
}

impl<'de> Deserialize<'de> for ShardRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            id: String,
            version: String,
        }
        let raw = Raw::deserialize(d)?;
        Self::new(raw.id, raw.version).map_err(serde::de::Error::custom)
    }
}

/// The name of a local application or of one of its instances, as the
/// agent's configuration declares it and an explicit request carries it:
/// 1–32 characters of `[A-Za-z0-9._-]`, not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AppName(String);

impl AppName {
    pub const MAX_LEN: usize = 32;

    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_token("application name", &value, Self::MAX_LEN)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AppName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// One application instance anywhere in the fleet: the unit the allocator
/// keeps an explicit-request reputation for. Written
/// `device:app:instance` (':' is outside every part's alphabet, so the
/// form parses back without ambiguity and fits in a URL path segment).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceRef {
    pub device: DeviceId,
    pub app: AppName,
    pub instance: AppName,
}

impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.device, self.app, self.instance)
    }
}

impl std::str::FromStr for InstanceRef {
    type Err = IdError;
    /// Parses `device:app:instance`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(device), Some(app), Some(instance)) => Ok(Self {
                device: DeviceId::new(device)?,
                app: AppName::new(app)?,
                instance: AppName::new(instance)?,
            }),
            _ => Err(IdError::Alphabet {
                what: "application instance (device:app:instance)",
                value: s.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_that_could_escape_a_topic_or_path_are_refused() {
        for bad in ["", "a/b", "+", "#", "..", ".hidden", "a b", &"x".repeat(65)] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DeviceId::new("router-01.site_a").is_ok());
    }

    #[test]
    fn shard_ref_parses_id_at_version() {
        let r: ShardRef = "crypto-chacha@1.0.0".parse().unwrap();
        assert_eq!((r.id(), r.version()), ("crypto-chacha", "1.0.0"));
        assert!("nover".parse::<ShardRef>().is_err());
        assert!("../x@1".parse::<ShardRef>().is_err());
    }

    #[test]
    fn instance_refs_parse_back_and_refuse_strangers() {
        let r: InstanceRef = "gw-a:cam:worker-1".parse().unwrap();
        assert_eq!(r.to_string(), "gw-a:cam:worker-1");
        assert_eq!(r.app.as_str(), "cam");
        for bad in ["gw-a:cam", "gw-a:cam:a:b", "gw-a::x", "a/b:c:d", ":c:d"] {
            assert!(bad.parse::<InstanceRef>().is_err(), "{bad:?} accepted");
        }
        assert!(AppName::new("x".repeat(33)).is_err());
    }

    #[test]
    fn deserializing_an_invalid_device_id_fails() {
        let bytes = postcard::to_stdvec(&"a/b".to_string()).unwrap();
        assert!(postcard::from_bytes::<DeviceId>(&bytes).is_err());
    }
}
