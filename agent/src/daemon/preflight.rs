//! What a configuration names must exist on this device: the capture
//! interfaces, the shard directory and a capture file to replay. The config
//! parser only checks that the file is well-formed; these checks look at the
//! machine, so `check-config` and `run` do them (before `run` starts capture,
//! shard hosts or anything else) and a typo in an interface name is an
//! invalid configuration (exit 78) instead of a daemon that runs blind.
//!
//! Errors carry the file, line and field where the value comes from the
//! file, and say so when the value is a default.

use super::config::Config;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the kernel lists the network interfaces of this network namespace
/// (`ip netns exec` mounts the namespace's own view here).
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Where a value of the configuration came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    /// `None` when the field was left out and a default applies.
    pub line: Option<usize>,
    pub field: &'static str,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: field `{}`", self.path.display(), self.field),
            None => write!(
                f,
                "{}: field `{}` (not set; the default applies)",
                self.path.display(),
                self.field
            ),
        }
    }
}

/// A configured resource that is missing or unusable on this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentError {
    #[error("{at}: no network interface {name:?} on this device ({sys}/{name} does not exist)")]
    NoSuchInterface {
        at: Origin,
        name: String,
        sys: PathBuf,
    },
    #[error("{at}: shard directory {dir}: {problem}")]
    ShardDir {
        at: Origin,
        dir: PathBuf,
        problem: String,
    },
    #[error("{at}: capture file {file}: {problem}")]
    CaptureFile {
        at: Origin,
        file: PathBuf,
        problem: String,
    },
}

/// Lines of the fields checked here, read again from the file with spans
/// (the validated [`Config`] keeps values only). Unknown fields are ignored:
/// the strict parse already refused them.
#[derive(Deserialize, Default)]
struct Spans {
    #[serde(default)]
    monitor: MonitorSpans,
    #[serde(default)]
    shards: ShardSpans,
}

#[derive(Deserialize, Default)]
struct MonitorSpans {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    pcap: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct ShardSpans {
    dir: Option<Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Checks `cfg` (parsed from `text`) against this machine; every problem is
/// listed, not only the first.
pub fn check(cfg: &Config, text: &str) -> Result<(), Vec<EnvironmentError>> {
    check_with(cfg, text, Path::new(SYS_CLASS_NET))
}

/// [`check`] against another interface listing (tests).
pub fn check_with(cfg: &Config, text: &str, sys: &Path) -> Result<(), Vec<EnvironmentError>> {
    // The text parsed once already (it produced `cfg`); should it not now,
    // messages fall back to "no line" rather than failing the check.
    let spans: Spans = toml::from_str(text).unwrap_or_default();
    let origin = |line: Option<usize>, field| Origin {
        path: cfg.path.clone(),
        line,
        field,
    };
    let mut errors = Vec::new();

    for name in &cfg.monitor.interfaces {
        // Names were validated by the parser (no '/', at most 15 bytes), so
        // this join cannot leave the directory.
        if !sys.join(name).exists() {
            let line = spans
                .monitor
                .interfaces
                .iter()
                .find(|s| s.get_ref() == name)
                .map(|s| line_of(text, s.span().start));
            errors.push(EnvironmentError::NoSuchInterface {
                at: origin(line, "monitor.interfaces"),
                name: name.clone(),
                sys: sys.to_owned(),
            });
        }
    }

    let shard_line = spans
        .shards
        .dir
        .as_ref()
        .map(|s| line_of(text, s.span().start));
    let shard_problem = match std::fs::metadata(&cfg.shard_dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some("is not a directory".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(
            "does not exist (install the shards there, or create it empty when the device \
             runs none yet)"
                .to_owned(),
        ),
        Err(e) => Some(format!("cannot be read: {e}")),
    };
    if let Some(problem) = shard_problem {
        errors.push(EnvironmentError::ShardDir {
            at: origin(shard_line, "shards.dir"),
            dir: cfg.shard_dir.clone(),
            problem,
        });
    }

    if let Some(file) = &cfg.monitor.pcap {
        let line = spans
            .monitor
            .pcap
            .as_ref()
            .map(|s| line_of(text, s.span().start));
        let problem = match std::fs::metadata(file) {
            Ok(m) if m.is_file() => None,
            Ok(_) => Some("is not a regular file".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(problem) = problem {
            errors.push(EnvironmentError::CaptureFile {
                at: origin(line, "monitor.pcap"),
                file: file.clone(),
                problem,
            });
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    struct Fixture {
        dir: tempfile::TempDir,
        sys: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys-class-net");
        std::fs::create_dir_all(sys.join("eth0")).unwrap();
        std::fs::create_dir_all(dir.path().join("shards")).unwrap();
        Fixture { dir, sys }
    }

    fn config(f: &Fixture, extra: &str) -> (Config, String) {
        let text = format!(
            "[device]\nid = \"r1\"\n\n[allocator]\nkeys = [\"{KEY}\"]\n\n\
             [broker]\nurl = \"mqtt://127.0.0.1\"\n{extra}"
        );
        let cfg = Config::parse(&f.dir.path().join("agent.toml"), &text).unwrap();
        (cfg, text)
    }

    #[test]
    fn existing_interfaces_and_shard_dir_pass() {
        let f = fixture();
        let (cfg, text) = config(
            &f,
            "\n[monitor]\ninterfaces = [\"eth0\"]\n\n[shards]\ndir = \"shards\"\n",
        );
        assert_eq!(check_with(&cfg, &text, &f.sys), Ok(()));
    }

    #[test]
    fn a_missing_interface_names_file_line_and_field() {
        let f = fixture();
        let (cfg, text) = config(
            &f,
            "\n[monitor]\ninterfaces = [\"eth0\",\n  \"wan9\"]\n\n[shards]\ndir = \"shards\"\n",
        );
        let errors = check_with(&cfg, &text, &f.sys).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let shown = errors[0].to_string();
        let want = format!(
            "{}:12: field `monitor.interfaces`: no network interface \"wan9\"",
            f.dir.path().join("agent.toml").display()
        );
        assert!(shown.starts_with(&want), "{shown}");
    }

    #[test]
    fn a_missing_or_non_directory_shard_dir_is_refused() {
        let f = fixture();
        let (cfg, text) = config(&f, "\n[shards]\ndir = \"nope\"\n");
        let errors = check_with(&cfg, &text, &f.sys).unwrap_err();
        assert!(
            matches!(&errors[..], [EnvironmentError::ShardDir { at, problem, .. }]
                if at.line == Some(11) && at.field == "shards.dir" && problem.contains("does not exist")),
            "{errors:?}"
        );

        std::fs::write(f.dir.path().join("file"), b"x").unwrap();
        let (cfg, text) = config(&f, "\n[shards]\ndir = \"file\"\n");
        let errors = check_with(&cfg, &text, &f.sys).unwrap_err();
        assert!(
            matches!(&errors[..], [EnvironmentError::ShardDir { problem, .. }]
                if problem == "is not a directory"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_defaulted_shard_dir_says_it_is_the_default() {
        let f = fixture();
        let (cfg, text) = config(&f, "\n[state]\ndir = \"state\"\n");
        let errors = check_with(&cfg, &text, &f.sys).unwrap_err();
        let shown = errors[0].to_string();
        assert!(
            shown.contains("field `shards.dir` (not set; the default applies)"),
            "{shown}"
        );
        assert!(shown.contains("state/shards"), "{shown}");
    }

    #[test]
    fn every_problem_is_listed_and_a_missing_capture_file_too() {
        let f = fixture();
        let (cfg, text) = config(&f, "\n[monitor]\npcap = \"gone.pcap\"\n");
        let errors = check_with(&cfg, &text, &f.sys).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| matches!(e, EnvironmentError::CaptureFile { at, .. } if at.line == Some(11))));
        assert!(errors
            .iter()
            .any(|e| matches!(e, EnvironmentError::ShardDir { .. })));
    }
}
