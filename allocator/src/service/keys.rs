//! Signing keys on disk: generation from the OS RNG, secret key files that are
//! refused when group or others can read them, and lowercase-hex public keys.
//!
//! A secret key file holds the 32-byte Ed25519 seed as 64 hex characters (and
//! an optional trailing newline). It is created with mode 0600 and never
//! overwritten: an existing file is an error, so a typo cannot destroy the
//! fleet's signing key.

use shardline_shared::sign::KeyPair;
use shardline_support::secret_file::{self, SecretFileError};
use std::path::{Path, PathBuf};

/// Why a key could not be made, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:04o} lets group or others read the secret key; run `chmod 600 {path}`", path = .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a secret key file (expected 64 hex characters)", path = .path.display())]
    Format { path: PathBuf },
    #[error("public key {0:?} is not 64 lowercase hex characters")]
    PublicHex(String),
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// A fresh key from the OS RNG.
pub fn generate() -> Result<KeyPair, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(KeyPair::from_seed(&seed))
}

/// Writes `key`'s seed to a new file with mode 0600; fails if the file exists.
pub fn write_secret(path: &Path, key: &KeyPair) -> Result<(), KeyError> {
    let text = format!("{}\n", hex::encode(key.seed()));
    secret_file::create(path, text.as_bytes()).map_err(|e| key_error(path, e))
}

/// Reads a secret key file, refusing one that group or others may read.
pub fn read_secret(path: &Path) -> Result<KeyPair, KeyError> {
    let text = secret_file::read_text(path, MAX_KEY_FILE).map_err(|e| key_error(path, e))?;
    let seed = parse_hex32(&text).ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
    })?;
    Ok(KeyPair::from_seed(&seed))
}

/// A key file is 64 hex digits and a newline; anything much larger is not one.
const MAX_KEY_FILE: usize = 4096;

fn key_error(path: &Path, e: SecretFileError) -> KeyError {
    match e {
        SecretFileError::TooOpen { mode, .. } => KeyError::Permissions {
            path: path.to_owned(),
            mode,
        },
        SecretFileError::Io { source, .. } => KeyError::Io {
            path: path.to_owned(),
            source,
        },
        SecretFileError::NotRegular { .. } | SecretFileError::TooLarge { .. } => KeyError::Format {
            path: path.to_owned(),
        },
    }
}

/// Parses a public key written as 64 lowercase hex characters.
pub fn parse_public(text: &str) -> Result<[u8; 32], KeyError> {
    parse_hex32(text.trim()).ok_or_else(|| KeyError::PublicHex(text.to_owned()))
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Reads a public key file (hex, as `keygen` prints it) or takes the argument as hex.
pub fn public_from_arg(arg: &str) -> Result<[u8; 32], KeyError> {
    let path = Path::new(arg);
    if arg.len() != 64 && path.exists() {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        return parse_public(&text);
    }
    parse_public(arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sl-keys-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_written_key_reads_back_and_is_mode_0600() {
        let dir = temp_dir("rt");
        let path = dir.join("k");
        let key = generate().unwrap();
        write_secret(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret(&path).unwrap().public_key(), key.public_key());
        // Never overwritten.
        assert!(write_secret(&path, &generate().unwrap()).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let dir = temp_dir("perm");
        let path = dir.join("k");
        write_secret(&path, &generate().unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_secret(&path),
            Err(KeyError::Permissions { mode: 0o640, .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn public_keys_must_be_lowercase_hex_of_32_bytes() {
        let key = KeyPair::from_seed(&[3; 32]);
        let hex = hex::encode(key.public_key());
        assert_eq!(parse_public(&hex).unwrap(), key.public_key());
        assert!(parse_public(&hex.to_uppercase()).is_err());
        assert!(parse_public(&hex[..62]).is_err());
        assert!(parse_public("zz").is_err());
    }
}
