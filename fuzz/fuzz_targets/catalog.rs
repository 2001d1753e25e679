//! Fuzz target: the policy catalog and the service agreements
//! (`Catalog::from_toml_str`, `Agreements::from_toml_str`) on arbitrary
//! text. The operator edits both files and the allocator reloads them while
//! it runs; a mistake must be an error naming file, line and field, never a
//! panic in the service.
//!
//! Input layout: the catalog text, a NUL byte, the agreements text. Without
//! a NUL the agreements are checked against the shipped catalog, so tier
//! mutations reach validation that needs a valid catalog.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_allocator_core::policy::{Agreements, Catalog};
use std::sync::OnceLock;

const SHIPPED_CATALOG: &str = include_str!("../../allocator/catalog/catalog.toml");

fn shipped() -> &'static Catalog {
    static C: OnceLock<Catalog> = OnceLock::new();
    C.get_or_init(|| {
        Catalog::from_toml_str(SHIPPED_CATALOG, "catalog.toml")
            .expect("the shipped catalog is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.split_once('\0') {
        Some((catalog, tiers)) => {
            if let Ok(c) = Catalog::from_toml_str(catalog, "catalog.toml") {
                let _ = Agreements::from_toml_str(tiers, "tiers.toml", &c);
            }
        }
        None => {
            let _ = Catalog::from_toml_str(text, "catalog.toml");
            let _ = Agreements::from_toml_str(text, "tiers.toml", shipped());
        }
    }
});
