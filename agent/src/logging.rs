//! Log output of the agent's commands: `tracing` to stderr (the journal
//! under systemd), filtered by `target=level` directives from an
//! environment variable.
//!
//! The filter is `tracing_subscriber`'s `Targets`, not `EnvFilter`:
//! `EnvFilter`'s span and field matching pulls a regular-expression engine
//! into the binary, and on a small box the idle agent's resident memory is
//! mostly its own code (issue 16 §4). Targets reads the same
//! `info,shardline_agent::monitor=debug` directives.
//!
//! Beside stderr, the newest lines are kept in a bounded in-memory ring
//! (`recent`) for remote diagnostics (issue 20).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Install the global subscriber (once; later calls do nothing). `var`
/// holds the directives; `default` applies when it is unset. A directive
/// that does not parse is reported on stderr and the default used, so a
/// typo never silences the agent.
pub fn init(var: &str, default: &str, with_target: bool) {
    let _ = started();
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
        .with(RingLayer)
        .with(filter)
        .try_init();
}

// ------------------------------------------------------------ recent lines

/// The agent's most recent log lines, kept in memory for remote
/// diagnostics (issue 20): a bounded ring filled by a `tracing` layer
/// beside the stderr one (the same filter applies), never written anywhere.
/// Field values whose name suggests a secret are replaced, so a careless
/// log call cannot ship one off the device.
mod ring {
    use std::collections::VecDeque;
    use std::fmt::Write as _;
    use std::sync::{Mutex, OnceLock, PoisonError};
    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, Layer};

    /// Lines kept (the diagnostics answer carries at most 200).
    pub const LINES: usize = 200;
    /// Warnings and errors kept apart (they would scroll out of the lines).
    pub const ERRORS: usize = 16;
    /// A line is cut here when it is formatted (bounds the ring's memory).
    pub const LINE_BYTES: usize = 1024;

    #[derive(Default)]
    pub struct Ring {
        pub lines: VecDeque<String>,
        pub errors: VecDeque<String>,
    }

    pub fn ring() -> &'static Mutex<Ring> {
        static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
        RING.get_or_init(|| Mutex::new(Ring::default()))
    }

    /// Field names whose values are never kept.
    fn secret_name(name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        [
            "secret", "psk", "password", "passwd", "token", "seed", "private",
        ]
        .iter()
        .any(|s| n.contains(s))
    }

    struct Fields<'a>(&'a mut String);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else if secret_name(field.name()) {
                let _ = write!(self.0, " {}=<redacted>", field.name());
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value}");
            } else if secret_name(field.name()) {
                let _ = write!(self.0, " {}=<redacted>", field.name());
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
    }

    /// The layer that fills the ring.
    #[derive(Debug)]
    pub struct RingLayer;

    impl<S: Subscriber> Layer<S> for RingLayer {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let meta = event.metadata();
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let mut line = format!("{at} {} {}:", meta.level(), meta.target());
            event.record(&mut Fields(&mut line));
            if line.len() > LINE_BYTES {
                let mut cut = LINE_BYTES;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            let mut r = ring().lock().unwrap_or_else(PoisonError::into_inner);
            if *meta.level() <= Level::WARN {
                if r.errors.len() == ERRORS {
                    r.errors.pop_front();
                }
                r.errors.push_back(line.clone());
            }
            if r.lines.len() == LINES {
                r.lines.pop_front();
            }
            r.lines.push_back(line);
        }
    }
}

pub use ring::RingLayer;

fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Seconds since logging was set up (the agent's start).
pub fn uptime_s() -> u64 {
    started().elapsed().as_secs()
}

/// The newest log lines (oldest first) and the newest warnings and errors.
pub fn recent() -> (Vec<String>, Vec<String>) {
    let r = ring::ring()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    (
        r.lines.iter().cloned().collect(),
        r.errors.iter().cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_and_never_a_secret() {
        let sub = tracing_subscriber::registry().with(RingLayer);
        tracing::subscriber::with_default(sub, || {
            for i in 0..250 {
                tracing::info!(n = i, "line");
            }
            tracing::warn!(psk = "hunter2", peer = "10.0.0.2:51820", "handshake failed");
        });
        let (lines, errors) = recent();
        assert!(lines.len() <= ring::LINES);
        let last = lines.last().unwrap();
        assert!(last.contains("handshake failed"), "{last}");
        assert!(
            last.contains("psk=<redacted>") && !last.contains("hunter2"),
            "{last}"
        );
        assert!(last.contains("peer=\"10.0.0.2:51820\""), "{last}");
        assert!(lines.iter().any(|l| l.contains("n=249")));
        assert!(!lines.iter().any(|l| l.contains(" n=0 ")));
        assert!(errors.last().unwrap().contains("WARN"));
    }
}
