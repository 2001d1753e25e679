//! The device's own signing key: a 32-byte Ed25519 seed stored as hex in a
//! file of mode 0600, generated from the OS RNG on first start. The operator
//! enrols the device with its public key (`check-config --print-pubkey`).

use super::persist;
use shardline_shared::sign::KeyPair;
use shardline_support::secret_file::{self, SecretFileError};
use std::path::{Path, PathBuf};

/// Why the device key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceKeyError {
    #[error("device key {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device key {path}: not 64 hex digits of an Ed25519 seed")]
    Malformed { path: PathBuf },
    #[error(
        "device key {path}: mode {mode:o} lets others read the secret; expected 0600 or stricter"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("device key {path}: the OS random generator failed: {reason}")]
    Random { path: PathBuf, reason: String },
}

/// Loads the key at `path`; creates it first when it does not exist.
/// Returns the key and whether it was just created.
pub fn load_or_create(path: &Path) -> Result<(KeyPair, bool), DeviceKeyError> {
    let io = |source| DeviceKeyError::Io {
        path: path.to_owned(),
        source,
    };
    match secret_file::read_text(path, MAX_KEY_FILE) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(&text)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| DeviceKeyError::Malformed {
                    path: path.to_owned(),
                })?;
            Ok((KeyPair::from_seed(&seed), false))
        }
        Err(SecretFileError::TooOpen { mode, .. }) => Err(DeviceKeyError::TooOpen {
            path: path.to_owned(),
            mode,
        }),
        Err(SecretFileError::NotRegular { .. } | SecretFileError::TooLarge { .. }) => {
            Err(DeviceKeyError::Malformed {
                path: path.to_owned(),
            })
        }
        Err(SecretFileError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| DeviceKeyError::Random {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            if let Some(dir) = path.parent() {
                persist::ensure_private_dir(dir).map_err(io)?;
            }
            persist::write_atomic(path, format!("{}\n", hex::encode(seed)).as_bytes(), 0o600)
                .map_err(io)?;
            Ok((KeyPair::from_seed(&seed), true))
        }
        Err(SecretFileError::Io { source, .. }) => Err(io(source)),
    }
}

/// A key file is 64 hex digits and a newline; anything much larger is not one.
const MAX_KEY_FILE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/device.key");
        let (k1, created) = load_or_create(&p).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
    }

    #[test]
    fn world_readable_or_garbage_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("device.key");
        load_or_create(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&p),
            Err(DeviceKeyError::TooOpen { .. })
        ));
        std::fs::write(&p, "nothex").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&p),
            Err(DeviceKeyError::Malformed { .. })
        ));
    }
}
