//! Host limits on the real kernel: the cgroup backend this machine offers
//! (v2 delegated, v1 hybrid, or none) creates a host cgroup with the limits
//! written, takes a process, and is removed afterwards; rlimits and niceness
//! apply to a real child process.

use shardline_agent::shardhost::limits::CgroupBackend;
use shardline_shared::msg::{Enforcement, ResourceLimits};

#[test]
fn the_detected_cgroup_backend_writes_limits_attaches_and_cleans_up() {
    let backend = CgroupBackend::detect();
    println!("cgroup backend: {backend:?}");
    if backend == CgroupBackend::None {
        assert_eq!(backend.enforcement(), Enforcement::RlimitsOnly);
        println!("SKIP: no writable cgroup here (not root, or no delegated cgroup)");
        return;
    }
    let limits = ResourceLimits {
        cpu_quota_permille: 250,
        cpu_weight: 50,
        memory_max_bytes: 32 << 20,
        nice: 5,
    };
    let name = format!("shardline-limits-test-{}", std::process::id());
    let cg = backend
        .create(&name, &limits)
        .expect("create")
        .expect("a cgroup");
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    cg.attach(child.id()).expect("attach");
    let read = |file: &str| -> String {
        cg.paths()
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .unwrap_or_default()
    };
    match backend.enforcement() {
        Enforcement::CgroupV2 => {
            assert_eq!(read("memory.max").trim(), (32u64 << 20).to_string());
            assert_eq!(read("cpu.max").trim(), "25000 100000");
        }
        Enforcement::CgroupV1 => {
            assert_eq!(
                read("memory.limit_in_bytes").trim(),
                (32u64 << 20).to_string()
            );
            assert_eq!(read("cpu.cfs_quota_us").trim(), "25000");
        }
        Enforcement::RlimitsOnly => unreachable!("backend is not None"),
    }
    assert!(
        read("cgroup.procs")
            .lines()
            .any(|l| l.trim() == child.id().to_string()),
        "process not in the cgroup"
    );
    assert!(!cg.oom_killed());
    child.kill().expect("kill");
    child.wait().expect("wait");
    let paths = cg.paths().to_vec();
    cg.remove();
    for p in paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn stale_host_cgroups_of_a_dead_agent_are_removed() {
    let backend = CgroupBackend::detect();
    if backend == CgroupBackend::None {
        println!("SKIP: no writable cgroup here (not root, or no delegated cgroup)");
        return;
    }
    let limits = ResourceLimits {
        cpu_quota_permille: 100,
        cpu_weight: 100,
        memory_max_bytes: 16 << 20,
        nice: 0,
    };
    // pid 999999999 is above any pid_max: that agent is certainly gone.
    let stale = backend
        .create("shardline-test-999999999-1", &limits)
        .expect("create")
        .expect("a cgroup");
    let paths = stale.paths().to_vec();
    assert!(paths.iter().all(|p| p.exists()));
    backend.remove_stale();
    for p in &paths {
        assert!(!p.exists(), "{} not removed", p.display());
    }
}
