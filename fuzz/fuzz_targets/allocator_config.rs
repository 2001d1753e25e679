//! Fuzz target: the allocator's service configuration
//! (`shardline_allocator::service::config::Config::from_toml_str`) on
//! arbitrary text. A bad file must be refused with an error naming file,
//! line and field (`check-config`, start and reload), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_allocator::service::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_toml_str(text, "allocator.toml");
});
