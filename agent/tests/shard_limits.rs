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

#[test]
fn a_host_cgroup_has_a_pids_limit_and_kill_all_ends_every_process_in_it() {
    use shardline_agent::shardhost::limits::PIDS_MAX;
    let backend = CgroupBackend::detect();
    let has_pids = match &backend {
        CgroupBackend::V1 { pids, .. } => pids.is_some(),
        CgroupBackend::V2 { .. } => true,
        CgroupBackend::None => false,
    };
    if !has_pids {
        println!("SKIP: no writable cgroup with a pids controller here ({backend:?})");
        return;
    }
    let limits = ResourceLimits {
        cpu_quota_permille: 0,
        cpu_weight: 100,
        memory_max_bytes: 64 << 20,
        nice: 0,
    };
    let name = format!("shardline-killall-test-{}", std::process::id());
    let cg = backend
        .create(&name, &limits)
        .expect("create")
        .expect("a cgroup");
    // A process that forks two grandchildren after it is in the cgroup and then
    // waits: a stand-in for a host whose shard forked children that would outlive it.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 0.3; sleep 60 & sleep 60 & wait"])
        .spawn()
        .expect("spawn sh");
    cg.attach(child.id()).expect("attach");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while cg.pids().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pids = cg.pids();
    assert!(pids.len() >= 3, "expected sh and two sleeps, got {pids:?}");
    let pids_max = cg
        .paths()
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok());
    match &backend {
        CgroupBackend::V2 { parent }
            if !std::fs::read_to_string(parent.join("cgroup.subtree_control"))
                .unwrap_or_default()
                .contains("pids") =>
        {
            println!("pids controller not delegated on this v2 tree; pids.max not checked");
        }
        _ => assert_eq!(
            pids_max.as_deref().map(str::trim),
            Some(PIDS_MAX.to_string().as_str())
        ),
    }
    let killed = cg.kill_all();
    assert!(
        killed >= 3 || backend.enforcement() == Enforcement::CgroupV2,
        "killed {killed}"
    );
    let _ = child.wait();
    for pid in &pids {
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "pid {pid} survived kill_all");
    }
    let dirs: Vec<_> = cg.paths().to_vec();
    cg.remove();
    for d in dirs {
        assert!(!d.exists(), "{} not removed", d.display());
    }
}
