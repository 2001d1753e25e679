//! Reading the catalog and tier files from disk; parsing and validating them
//! is the core crate's (`policy::catalog`), so every error still names file,
//! line and field.

use shardline_allocator_core::policy::{Agreements, Catalog, CatalogError};
use std::path::Path;

/// Why a catalog or tiers file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] CatalogError),
}

fn read(path: &Path) -> Result<String, CatalogFileError> {
    std::fs::read_to_string(path).map_err(|source| CatalogFileError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads and validates the shard catalog at `path`.
pub fn load_catalog(path: &Path) -> Result<Catalog, CatalogFileError> {
    Ok(Catalog::from_toml_str(
        &read(path)?,
        &path.display().to_string(),
    )?)
}

/// Reads and validates the tiers at `path` against `catalog`.
pub fn load_agreements(path: &Path, catalog: &Catalog) -> Result<Agreements, CatalogFileError> {
    Ok(Agreements::from_toml_str(
        &read(path)?,
        &path.display().to_string(),
        catalog,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_is_named() {
        let err = load_catalog(Path::new("/nonexistent/cat.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cat.toml"), "{err}");
        assert!(matches!(err, CatalogFileError::Read { .. }));
    }

    #[test]
    fn the_shipped_files_load_from_disk() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
        let catalog = load_catalog(&dir.join("catalog.toml")).unwrap();
        load_agreements(&dir.join("tiers.toml"), &catalog).unwrap();
    }
}
