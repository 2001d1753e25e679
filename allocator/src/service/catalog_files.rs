//! Reading the catalog and tier files from disk; parsing and validating them
//! is the core crate's (`policy::catalog`), so every error still names file,
//! line and field.
//!
//! The shipped `allocator/catalog/{catalog,tiers}.toml` are built in: when
//! the configured file is the *default* path (`/etc/shardline/catalog.toml`,
//! `/etc/shardline/agreements.toml`) and does not exist, the built-in copy is
//! used and the start says so. A path the operator configured explicitly
//! must exist: falling back silently from a mistyped path would run a fleet
//! on a catalog nobody chose.

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

/// The shipped catalog, used when the default catalog file is absent.
pub const BUILTIN_CATALOG: &str = include_str!("../../catalog/catalog.toml");
/// The shipped tiers, used when the default agreements file is absent.
pub const BUILTIN_TIERS: &str = include_str!("../../catalog/tiers.toml");

/// Where the catalog or the tiers came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(std::path::PathBuf),
    /// The built-in copy; the default path it stands in for was absent.
    BuiltIn {
        absent: std::path::PathBuf,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::BuiltIn { absent } => write!(f, "built-in ({} absent)", absent.display()),
        }
    }
}

/// The catalog and tiers with where each came from.
#[derive(Debug)]
pub struct PolicyFiles {
    pub catalog: Catalog,
    pub agreements: Agreements,
    pub catalog_source: Source,
    pub agreements_source: Source,
}

fn text_of(
    path: &Path,
    default: &Path,
    builtin: &str,
) -> Result<(String, Source), CatalogFileError> {
    if path == default && !path.exists() {
        return Ok((
            builtin.to_owned(),
            Source::BuiltIn {
                absent: path.to_owned(),
            },
        ));
    }
    Ok((read(path)?, Source::File(path.to_owned())))
}

/// Loads the catalog and tiers `policy` names, the built-in ones standing
/// in for absent default files (see the module docs).
pub fn load_policy_files(
    policy: &super::config::PolicySection,
) -> Result<PolicyFiles, CatalogFileError> {
    let defaults = super::config::PolicySection::default();
    let (text, catalog_source) = text_of(&policy.catalog, &defaults.catalog, BUILTIN_CATALOG)?;
    let catalog = Catalog::from_toml_str(&text, &catalog_source.to_string())?;
    let (text, agreements_source) =
        text_of(&policy.agreements, &defaults.agreements, BUILTIN_TIERS)?;
    let agreements = Agreements::from_toml_str(&text, &agreements_source.to_string(), &catalog)?;
    Ok(PolicyFiles {
        catalog,
        agreements,
        catalog_source,
        agreements_source,
    })
}

/// Catalog placeholders an operator should know about: (shard, arch) pairs
/// whose digest is all zero (a library not built; devices refuse it).
pub fn not_built(catalog: &Catalog) -> Vec<(String, String)> {
    catalog
        .shards
        .iter()
        .flat_map(|(id, s)| s.builds.not_built().into_iter().map(|a| (id.clone(), a)))
        .collect()
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
    fn the_built_in_files_stand_in_only_for_an_absent_default_path() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("catalog.toml");
        let (text, source) = text_of(&default, &default, BUILTIN_CATALOG).unwrap();
        assert_eq!(text, BUILTIN_CATALOG);
        assert!(matches!(source, Source::BuiltIn { .. }));
        assert!(source.to_string().starts_with("built-in ("), "{source}");
        // An explicitly configured path must exist.
        let other = dir.path().join("mine.toml");
        assert!(matches!(
            text_of(&other, &default, BUILTIN_CATALOG),
            Err(CatalogFileError::Read { .. })
        ));
        // A default path that exists is read.
        std::fs::write(&default, "[units]\n").unwrap();
        let (text, source) = text_of(&default, &default, BUILTIN_CATALOG).unwrap();
        assert_eq!(
            (text.as_str(), source),
            ("[units]\n", Source::File(default))
        );
        // The built-in pair loads, and its placeholders are listed.
        let catalog = Catalog::from_toml_str(BUILTIN_CATALOG, "built-in").unwrap();
        Agreements::from_toml_str(BUILTIN_TIERS, "built-in", &catalog).unwrap();
        assert!(not_built(&catalog)
            .iter()
            .any(|(s, a)| s == "auth-psk" && a == "arm"));
    }

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
