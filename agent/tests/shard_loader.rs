//! Safe loading checks on real files: symlinks, files outside the shard
//! directory, group/other-writable files, wrong hashes, a library without the
//! entry symbol; and `shardline-agent shards list` reporting each.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::loader::{self, LoadError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn copy_lib(dir: &Path, id: &str, to: &str) -> std::path::PathBuf {
    let dst = dir.join(to);
    std::fs::copy(lib_path(dir, id), &dst).expect("copy");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    dst
}

#[test]
fn every_file_check_refuses_with_a_clear_error_and_a_good_library_loads() {
    let dir = shard_dir();
    let d = dir.path();
    let good = lib_path(d, "crypto-chacha20poly1305");
    let sha = sha256_file(&good);

    let v = loader::open_verified(d, &good, Some(&sha), uid()).expect("good library verifies");
    let loaded = loader::load(v).expect("good library loads");
    assert_eq!(loaded.info().id, "crypto-chacha20poly1305");
    assert_eq!(loaded.info().service, "aead");
    assert_eq!(loaded.info().abi_version, 1);

    let link = d.join("link.so");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    assert!(matches!(
        loader::open_verified(d, &link, Some(&sha), uid()),
        Err(LoadError::Symlink { .. })
    ));

    let other = tempfile::tempdir().expect("tempdir");
    let outside = other.path().join("x.so");
    std::fs::copy(&good, &outside).expect("copy");
    assert!(matches!(
        loader::open_verified(d, &outside, Some(&sha), uid()),
        Err(LoadError::OutsideShardDir { .. })
    ));
    let dotdot = d
        .join("..")
        .join(other.path().file_name().expect("name"))
        .join("x.so");
    assert!(matches!(
        loader::open_verified(d, &dotdot, Some(&sha), uid()),
        Err(LoadError::OutsideShardDir { .. })
    ));

    let writable = copy_lib(d, "crypto-chacha20poly1305", "writable.so");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    let err = loader::open_verified(d, &writable, Some(&sha), uid()).unwrap_err();
    assert!(matches!(err, LoadError::WritableByOthers { .. }), "{err}");

    let mut wrong = sha;
    wrong[31] ^= 1;
    let err = loader::open_verified(d, &good, Some(&wrong), uid()).unwrap_err();
    assert!(
        matches!(err, LoadError::HashMismatch { .. }) && err.to_string().contains("SHA-256"),
        "{err}"
    );

    if is_root() {
        let foreign = copy_lib(d, "crypto-chacha20poly1305", "foreign.so");
        std::os::unix::fs::chown(&foreign, Some(12345), None).expect("chown");
        let err = loader::open_verified(d, &foreign, None, 0).unwrap_err();
        assert!(
            matches!(err, LoadError::BadOwner { uid: 12345, .. }),
            "{err}"
        );
    } else {
        println!("SKIP owner check: needs root to chown");
    }
}

#[test]
fn a_library_without_the_entry_symbol_is_refused() {
    let dir = shard_dir();
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/usr/lib/aarch64-linux-gnu/libm.so.6",
        "/lib/arm-linux-gnueabihf/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    let Some(libm) = libm else {
        println!("SKIP: no libm.so.6 found to use as a library without the entry symbol");
        return;
    };
    let dst = dir.path().join("libm.so");
    std::fs::copy(libm, &dst).expect("copy");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let v = loader::open_verified(dir.path(), &dst, None, uid()).expect("file checks pass");
    let err = loader::load(v).unwrap_err();
    assert!(matches!(err, LoadError::MissingSymbol { .. }), "{err}");
    assert!(
        err.to_string().contains("shardline_shard_entry_v1"),
        "{err}"
    );
}

#[test]
fn shards_list_shows_ids_hashes_abi_and_why_a_file_fails() {
    let dir = shard_dir();
    let d = dir.path();
    let writable = copy_lib(d, "qos-dscp", "writable@0.1.0.so");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = std::process::Command::new(AGENT)
        .args(["shards", "list"])
        .arg(d)
        .output()
        .expect("run list");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let line = |file: &str| {
        text.lines()
            .find(|l| l.starts_with(file))
            .unwrap_or_else(|| panic!("{file} not listed"))
            .to_owned()
    };
    let tunnel = line("vpn-tunnel@0.1.0.so");
    assert!(
        tunnel.contains(&hex::encode(sha256_file(&lib_path(d, "vpn-tunnel"))))
            && tunnel.ends_with("ok"),
        "{tunnel}"
    );
    assert!(line("fixture-abi-v2@0.1.0.so").contains("ABI version 2"));
    assert!(line("writable@0.1.0.so").contains("writable by group or others"));
}
