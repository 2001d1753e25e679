//! The admin API's bearer token file: read it (refusing one that group or
//! others can read), or create it with a fresh random token, mode 0600.

use super::config::Config;
use shardline_support::secret_file::{self, SecretFileError};
use std::path::PathBuf;

/// Why the API token file could not be read or created.
#[derive(Debug, thiserror::Error)]
#[error("API token file {path}: {source}")]
pub struct ApiTokenError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads (or creates with mode 0600) the admin API bearer token.
pub fn read_or_create(path: &std::path::Path) -> Result<String, ApiTokenError> {
    let terr = |source| ApiTokenError {
        path: path.to_owned(),
        source,
    };
    match secret_file::read_text(path, MAX_TOKEN_FILE) {
        Ok(t) if t.is_empty() => Err(terr(std::io::Error::other("the token file is empty"))),
        Ok(t) => Ok(t),
        Err(SecretFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            let mut seed = [0u8; 24];
            getrandom::getrandom(&mut seed)
                .map_err(|e| terr(std::io::Error::other(e.to_string())))?;
            let token = hex::encode(seed);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(terr)?;
            }
            secret_file::create(path, format!("{token}\n").as_bytes())
                .map_err(|e| terr(std::io::Error::other(e.to_string())))?;
            tracing::info!(path = %path.display(), "created the admin API token");
            Ok(token)
        }
        Err(SecretFileError::Io { source, .. }) => Err(terr(source)),
        Err(e) => Err(terr(std::io::Error::other(e.to_string()))),
    }
}

/// Bearer tokens are short; a token file of more than this is not one.
pub const MAX_TOKEN_FILE: usize = 4096;

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
