//! What the core crate's benches share: the machine a row was measured on
//! and a thread's CPU time (the per-core figure on a shared machine, where
//! wall time also counts the time other processes held the core).

/// The CPU model and core count, for a BENCHMARKS.md row.
#[allow(dead_code)] // not every bench including this module writes a machine
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// A number from the environment, or `default` when unset or unparsable.
#[allow(dead_code)] // not every bench including this module reads sizes
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of at least one figure (the upper one of an even count).
#[allow(dead_code)] // not every bench including this module takes medians
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds this thread has spent on a CPU (first field of
/// /proc/thread-self/schedstat), or `None` where that file is missing.
#[allow(dead_code)] // not every bench including this module times a thread
pub fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Replaces what stands between `<!-- {marker}:begin -->` and
/// `<!-- {marker}:end -->` in the workspace's BENCHMARKS.md with `body`, or
/// appends the markers and `body` under `heading` (a `## ` line and any
/// words after it) where they are missing. Other sections stay as they are.
#[allow(dead_code)] // not every bench including this module writes rows
pub fn write_marked(marker: &str, heading: &str, body: &str) {
    // The including crate's manifest dir, then up to the workspace's file.
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(path) = manifest
        .ancestors()
        .map(|d| d.join("BENCHMARKS.md"))
        .find(|p| p.is_file())
    else {
        eprintln!(
            "BENCHMARKS.md not found above {}; not written",
            manifest.display()
        );
        return;
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("cannot read {}; not written", path.display());
        return;
    };
    let (begin, end) = (
        format!("<!-- {marker}:begin -->"),
        format!("<!-- {marker}:end -->"),
    );
    let block = format!("{begin}\n{body}{end}");
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &text[..a], block, &text[b + end.len()..]),
        _ => format!("{}\n\n{heading}\n\n{block}\n", text.trim_end()),
    };
    if let Err(e) = std::fs::write(&path, new) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

/// [`write_marked`] with rows of the usual table (what, result, machine,
/// command, notes).
#[allow(dead_code)] // not every bench including this module writes rows
pub fn write_marked_table(marker: &str, heading: &str, rows: &str) {
    write_marked(
        marker,
        heading,
        &format!("| what | result | machine | command | notes |\n|---|---|---|---|---|\n{rows}"),
    );
}
