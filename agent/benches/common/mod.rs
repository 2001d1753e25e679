//! What every agent bench writes beside its figures: the machine, the
//! commit measured, the load when it started, and its own section of
//! BENCHMARKS.md (replaced in place, the other sections kept).
// Each bench includes this module and uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// CPU model, core count and architecture.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores, {}", std::env::consts::ARCH)
}

/// The commit measured, marked when the tree differs from it: a figure
/// taken with a local change is not the project's.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{head}+changes (not the project's figure)")
    } else {
        head
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Put `section` (which starts with its `## title` line) into
/// BENCHMARKS.md in place of the section of that title, or at the end.
pub fn replace_section(title: &str, section: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let mut section = section.trim_end().to_string();
    section.push_str("\n\n");
    let new = match old.find(title) {
        Some(start) => {
            let rest = &old[start + 1..];
            let end = rest.find("\n## ").map_or(old.len(), |e| start + 1 + e + 1);
            format!("{}{}{}", &old[..start], section, &old[end..])
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(&path, new).expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}

/// Build the agent binary alone with cargo profile `profile`; its path.
pub fn build_agent(profile: &str) -> std::path::PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args([
            "build",
            "--profile",
            profile,
            "-p",
            "shardline-agent",
            "--bin",
            "shardline-agent",
        ])
        .current_dir(manifest)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --profile {profile} failed");
    // The bench binary sits in <target>/release/deps/.
    let exe = std::env::current_exe().expect("bench path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target directory above release/deps");
    target.join(profile).join("shardline-agent")
}
