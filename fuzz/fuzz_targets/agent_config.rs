//! Fuzz target: the agent's configuration loaders on arbitrary text — the
//! daemon's `agent.toml` (`daemon::config::Config::parse`), the monitor's
//! tuning file (`monitor::MonitorConfig::from_toml`) and classification
//! rules (`monitor::Rules::compile`, operator rules after the defaults).
//! An operator's typo must give an error naming file, line and field, never
//! a panic (a panic in `check-config` or at a SIGHUP reload would take the
//! agent down instead of refusing the file).
//!
//! Input layout: one selector byte, then the UTF-8 text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_agent::daemon::config::{Config, ConfigError};
use shardline_agent::monitor::{MonitorConfig, Rules};
use std::path::Path;

/// Relative paths in the text resolve under a directory that does not exist,
/// so the loader's file reads fail fast instead of touching the machine.
const CONFIG_PATH: &str = "/nonexistent-shardline-fuzz/agent.toml";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    match selector % 3 {
        0 => {
            // The daemon config reads the key set and tuning files it names.
            // Device and pseudo files (/dev/zero, /proc/kmsg) would only test
            // the machine, and an operator's root-owned file is trusted to
            // name a real file; keep the run on the parser.
            if ["/dev", "/proc", "/sys", "/run"]
                .iter()
                .any(|p| text.contains(p))
            {
                return;
            }
            match Config::parse(Path::new(CONFIG_PATH), text) {
                Ok(cfg) => {
                    assert!(
                        !cfg.allocator_keys.is_empty(),
                        "a config without pinned keys"
                    );
                    assert!((10..=3_600_000).contains(&cfg.monitor.window_ms));
                    assert!(cfg.outbox_cap >= 1);
                }
                Err(ConfigError::Invalid { line, .. }) => {
                    assert!(
                        line >= 1 && line <= text.lines().count().max(1) + 1,
                        "line {line}"
                    );
                }
                Err(ConfigError::Read { .. }) => {}
            }
        }
        1 => {
            let _ = MonitorConfig::from_toml(text, "monitor.toml");
        }
        _ => {
            let _ = Rules::compile(&[(text, "rules.toml")]);
        }
    }
});
