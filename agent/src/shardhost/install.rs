//! Installs built shard libraries into a shard directory under the names the
//! agent loads (`{id}@{version}.so`), root-owned (when run as root) and mode
//! 0644, written to a temporary name and renamed into place.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Catalog version of the first shards.
pub const CATALOG_VERSION: &str = "0.1.0";

/// `(shard id, cargo library name)` of the first catalog.
pub const CATALOG: &[(&str, &str)] = &[
    ("vpn-tunnel", "shard_vpn_tunnel"),
    ("crypto-chacha20poly1305", "shard_crypto_chacha20poly1305"),
    ("crypto-aes256gcm", "shard_crypto_aes256gcm"),
    ("auth-psk", "shard_auth_psk"),
    ("qos-shaper", "shard_qos_shaper"),
    ("qos-dscp", "shard_qos_dscp"),
];

/// Test fixtures (installed only on request).
pub const FIXTURES: &[(&str, &str)] = &[
    ("fixture-misbehave", "shard_fixture_misbehave"),
    ("fixture-qos-misbehave", "shard_fixture_qos_misbehave"),
    ("fixture-abi-v2", "shard_fixture_abi_v2"),
];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Copies `{profile_dir}/lib{name}.so` for each entry of `set` that exists
/// into `dest` as `{id}@{CATALOG_VERSION}.so`; returns the installed paths.
pub fn install(
    profile_dir: &Path,
    dest: &Path,
    set: &[(&str, &str)],
) -> Result<Vec<PathBuf>, InstallError> {
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut done = Vec::new();
    for (id, lib) in set {
        let src = profile_dir.join(format!("lib{lib}.so"));
        if !src.exists() {
            tracing::warn!(path = %src.display(), "not built; skipped");
            continue;
        }
        let target = dest.join(format!("{id}@{CATALOG_VERSION}.so"));
        let tmp = dest.join(format!(".{id}.tmp-{}", std::process::id()));
        std::fs::copy(&src, &tmp).map_err(io(&tmp))?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&tmp, Some(0), Some(0)).map_err(io(&tmp))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        done.push(target);
    }
    Ok(done)
}
