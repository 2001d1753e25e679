//! Log output of the agent's commands: `tracing` to stderr (the journal
//! under systemd), filtered by `target=level` directives from an
//! environment variable.
//!
//! The filter is `tracing_subscriber`'s `Targets`, not `EnvFilter`:
//! `EnvFilter`'s span and field matching pulls a regular-expression engine
//! into the binary, and on a small box the idle agent's resident memory is
//! mostly its own code (issue 16 §4). Targets reads the same
//! `info,shardline_agent::monitor=debug` directives.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Install the global subscriber (once; later calls do nothing). `var`
/// holds the directives; `default` applies when it is unset. A directive
/// that does not parse is reported on stderr and the default used, so a
/// typo never silences the agent.
pub fn init(var: &str, default: &str, with_target: bool) {
    let directives = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let filter = directives.parse::<Targets>().unwrap_or_else(|e| {
        eprintln!("{var}={directives:?}: {e}; logging at {default}");
        default.parse().unwrap_or_default()
    });
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(with_target),
        )
        .with(filter)
        .try_init();
}
