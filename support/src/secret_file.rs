//! Secrets on disk (signing keys, API and enrolment tokens, MQTT passwords):
//! read only from a regular file that group and others cannot read, with a
//! size cap, so that a loose mode is refused before the secret is used and a
//! path such as `/dev/zero` or a FIFO fails at once instead of hanging.

use std::io::Read as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a secret file was refused. Callers map it into their own error enum
/// (which names the kind of secret).
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read it (`mode` is the permission bits).
    #[error(
        "{path}: mode {mode:04o} lets group or others read the secret; run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}: larger than {max} bytes")]
    TooLarge { path: PathBuf, max: usize },
}

/// Reads the secret at `path` (at most `max` bytes) after checking that it
/// is a regular file of mode 0600 or stricter. The checks are made on the
/// opened file, so the file checked is the file read.
pub fn read(path: &Path, max: usize) -> Result<Vec<u8>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix_free_flags::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(SecretFileError::NotRegular {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len().min(max as u64) as usize);
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > max {
        return Err(SecretFileError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text with surrounding whitespace removed.
pub fn read_text(path: &Path, max: usize) -> Result<String, SecretFileError> {
    let bytes = read(path, max)?;
    String::from_utf8(bytes)
        .map(|s| s.trim().to_owned())
        .map_err(|_| SecretFileError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        })
}

/// Creates `path` (which must not exist) with mode 0600 holding `contents`,
/// synced to disk.
pub fn create(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    use std::io::Write as _;
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

/// `O_NONBLOCK` without a libc dependency (the value is the same on every
/// Linux architecture Shardline targets: x86-64, aarch64, armv7).
mod nix_free_flags {
    pub const O_NONBLOCK: i32 = 0o4000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        create(&p, b"secret\n").unwrap();
        assert_eq!(read_text(&p, 64).unwrap(), "secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(create(&p, b"again").is_err(), "never overwrites");
    }

    #[test]
    fn loose_modes_devices_fifos_and_large_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        create(&p, b"secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read(&p, 64),
            Err(SecretFileError::TooOpen { mode: 0o640, .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read(&p, 3),
            Err(SecretFileError::TooLarge { max: 3, .. })
        ));
        assert!(matches!(
            read(Path::new("/dev/zero"), 64),
            Err(SecretFileError::NotRegular { .. })
        ));
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert!(matches!(
                read(&fifo, 64),
                Err(SecretFileError::NotRegular { .. })
            ));
        } else {
            println!("SKIP fifo case: mkfifo is not available");
        }
        assert!(matches!(
            read(&dir.path().join("missing"), 64),
            Err(SecretFileError::Io { .. })
        ));
    }
}
