//! What the device has and uses ([`DeviceResources`]), read from `/proc`
//! directly: cheap enough to run every window on a small router.

use shardline_shared::msg::DeviceResources;

/// Samples device resources; keeps the previous CPU counters so the load is
/// the average since the last sample.
#[derive(Debug, Default)]
pub struct ResourceSampler {
    last_cpu: Option<(u64, u64)>,
}

impl ResourceSampler {
    pub fn sample(&mut self) -> DeviceResources {
        let (total_kib, avail_kib) = meminfo().unwrap_or((0, 0));
        let load = match (cpu_times(), self.last_cpu) {
            (Some((busy, total)), Some((pbusy, ptotal))) if total > ptotal => {
                self.last_cpu = Some((busy, total));
                ((busy.saturating_sub(pbusy)) * 1000 / (total - ptotal)) as u16
            }
            (now, _) => {
                self.last_cpu = now;
                0
            }
        };
        DeviceResources {
            cpu_cores: std::thread::available_parallelism()
                .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
                .unwrap_or(1),
            cpu_load_permille: load.min(1000),
            mem_total_kib: total_kib,
            mem_available_kib: avail_kib,
            aes_hw: aes_hw(),
            arch: std::env::consts::ARCH.to_owned(),
        }
    }
}

fn meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// (busy, total) jiffies over all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[cfg(target_arch = "x86_64")]
fn aes_hw() -> bool {
    std::arch::is_x86_feature_detected!("aes")
}

#[cfg(target_arch = "aarch64")]
fn aes_hw() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn aes_hw() -> bool {
    false
}

/// This process's resident set size in KiB (`VmRSS`).
pub fn own_rss_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let mut s = ResourceSampler::default();
        let r = s.sample();
        assert!(r.cpu_cores >= 1);
        assert!(r.mem_total_kib > 0 && r.mem_available_kib <= r.mem_total_kib);
        assert_eq!(r.arch, std::env::consts::ARCH);
        let r2 = s.sample();
        assert!(r2.cpu_load_permille <= 1000);
        assert!(own_rss_kib().unwrap() > 0);
    }
}
