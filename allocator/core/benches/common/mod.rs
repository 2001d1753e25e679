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
