//! The admin API's bearer token file: read it (refusing one that group or
//! others can read), or create it with a fresh random token, mode 0600.

use super::config::Config;
use super::run::StartError;
use std::path::PathBuf;

/// Reads (or creates with mode 0600) the admin API bearer token.
pub fn read_or_create(path: &std::path::Path) -> Result<String, StartError> {
    let terr = |source| StartError::Token {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(t) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(terr)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(terr(std::io::Error::other(format!(
                    "mode {:04o} lets group or others read the token; chmod 600 it",
                    mode & 0o777
                ))));
            }
            let t = t.trim().to_owned();
            if t.is_empty() {
                return Err(terr(std::io::Error::other("the token file is empty")));
            }
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut seed = [0u8; 24];
            getrandom::getrandom(&mut seed)
                .map_err(|e| terr(std::io::Error::other(e.to_string())))?;
            let token = hex::encode(seed);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(terr)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(terr)?;
            writeln!(f, "{token}").map_err(terr)?;
            tracing::info!(path = %path.display(), "created the admin API token");
            Ok(token)
        }
        Err(e) => Err(terr(e)),
    }
}

/// The token file used when the config names none: beside the store.
pub fn default_token_file(config: &Config) -> PathBuf {
    config.api.token_file.clone().unwrap_or_else(|| {
        config
            .store
            .path
            .parent()
            .map_or_else(|| PathBuf::from("api-token"), |d| d.join("api-token"))
    })
}
