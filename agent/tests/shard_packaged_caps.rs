//! Issue 15, "a real operator's fleet works out of the box": the agent run
//! the way the packaged systemd unit runs it — a non-root user holding only
//! the unit's `AmbientCapabilities=` (read from `systemd/shardline-agent.service`,
//! so the test stays true to the unit) with the same bounding set and
//! `no_new_privs` — gives every shard host its own uid and caps the host's
//! declared bandwidth with nftables, and the host ends with no capability
//! at all.
//!
//! The test re-executes this test binary under `setpriv` (as `nobody`) to
//! run [`as_the_packaged_agent`], which drives a real supervisor and shard
//! host: the supervisor runs in the test process, so the test process must
//! be the one with the unit's identity and capabilities.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::sandbox::SANDBOX_UID_BASE;
use std::path::Path;
use std::process::Command;

/// Where the parent hands the shard directory to the re-executed child.
const CHILD_SHARD_DIR: &str = "SHARDLINE_TEST_PACKAGED_SHARD_DIR";
/// A copy of the agent binary where other users can reach it: a host runs
/// as its own uid and re-executes the agent, and cargo's target directory
/// may sit below a private one (the CI's is under /root, mode 0700), as a
/// packaged /usr/bin never does.
const CHILD_AGENT_EXE: &str = "SHARDLINE_TEST_PACKAGED_AGENT_EXE";
/// The unprivileged user the child runs as (`nobody`; the unit's
/// `shardline` user need not exist here).
const UNPRIVILEGED: u32 = 65_534;
const CAP_KBPS: u64 = 4_000;

/// The unit's ambient capabilities as `setpriv` names them (`net_raw`, ...).
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/shardline-agent.service");
    let text = std::fs::read_to_string(&unit).expect("read the agent's unit");
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    assert!(
        !caps.is_empty(),
        "no AmbientCapabilities= in {}",
        unit.display()
    );
    caps
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok()
}

#[test]
fn the_packaged_units_capabilities_give_hosts_their_own_uid_and_a_bandwidth_cap() {
    if !is_root() {
        println!("SKIP: starting a process as another user with chosen capabilities (setpriv) needs root");
        return;
    }
    if !have("setpriv", "--version") {
        println!("SKIP: setpriv (util-linux) is not installed");
        return;
    }
    if !have("nft", "--version") {
        println!("SKIP: nft (nftables) is not installed");
        return;
    }
    let dir = shard_dir();
    // The temporary directory is 0700 root; the child (nobody) reads it.
    // The shard files stay root-owned 0644, as the package installs them.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod shard dir");
    let exe_dir = tempfile::TempDir::new().expect("agent copy dir");
    std::fs::set_permissions(
        exe_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod agent copy dir");
    let agent_copy = exe_dir.path().join("shardline-agent");
    std::fs::copy(AGENT, &agent_copy).expect("copy the agent binary");
    std::fs::set_permissions(
        &agent_copy,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod agent copy");
    let caps = unit_capabilities();
    let list = caps.iter().map(|c| format!(",+{c}")).collect::<String>();
    let me = std::env::current_exe().expect("test binary");
    let out = Command::new("setpriv")
        .arg(format!("--reuid={UNPRIVILEGED}"))
        .arg(format!("--regid={UNPRIVILEGED}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps=-all{list}"))
        .arg(format!("--ambient-caps=-all{list}"))
        .arg(format!("--bounding-set=-all{list}"))
        .arg("--no-new-privs")
        .arg("--")
        .arg(&me)
        .args([
            "--exact",
            "as_the_packaged_agent",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SHARD_DIR, dir.path())
        .env(CHILD_AGENT_EXE, &agent_copy)
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("child (uid {UNPRIVILEGED}, capabilities {caps:?}):\n{stdout}\n{stderr}");
    assert!(out.status.success(), "the packaged-agent run failed");
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}

/// One `Name:\tvalue` line of `/proc/<pid>/status`.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in status:\n{status}"))
}

fn own_tables() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .expect("nft list tables");
    assert!(out.status.success(), "nft list tables: {out:?}");
    let prefix = format!("shardline_bw_{}_", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|t| t.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The child half: runs only under the parent's `setpriv`.
#[test]
#[ignore = "run by the_packaged_units_capabilities_give_hosts_their_own_uid_and_a_bandwidth_cap under setpriv"]
fn as_the_packaged_agent() {
    let Some(dir) = std::env::var_os(CHILD_SHARD_DIR) else {
        println!("SKIP: only meaningful when started by the packaged-capabilities test");
        return;
    };
    let dir = Path::new(&dir);
    assert!(!is_root(), "the child must not be root");
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    assert_ne!(
        status_field(&own, "CapAmb"),
        "0000000000000000",
        "the child must hold the unit's ambient capabilities"
    );
    let mut cfg = supervisor_config(dir);
    if let Some(exe) = std::env::var_os(CHILD_AGENT_EXE) {
        cfg.agent_exe = std::path::PathBuf::from(exe);
    }
    // cgroups are not what this test is about (nobody owns no subtree here).
    cfg.use_cgroups = false;
    let mut checked = false;
    let (capped, offered) = flood_through_shaper_in(cfg, dir, CAP_KBPS, 20_000_000, 4, |pid| {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("host status");
        let uids: Vec<u32> = status_field(&st, "Uid")
            .split_whitespace()
            .map(|v| v.parse().expect("uid"))
            .collect();
        let uid = uids[0];
        assert!(
            uid >= SANDBOX_UID_BASE && uids.iter().all(|&u| u == uid),
            "the host must run as its dedicated uid (real, effective, saved, fs): {uids:?}"
        );
        let gids: Vec<u32> = status_field(&st, "Gid")
            .split_whitespace()
            .map(|v| v.parse().expect("gid"))
            .collect();
        assert!(gids.iter().all(|&g| g == uid), "gids: {gids:?}");
        let groups = status_field(&st, "Groups");
        assert!(
            groups.is_empty() || groups == uid.to_string(),
            "no supplementary group but its own: {groups:?}"
        );
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(&st, set),
                "0000000000000000",
                "{set} of the host must be empty"
            );
        }
        assert_eq!(status_field(&st, "NoNewPrivs"), "1");
        assert_eq!(status_field(&st, "Seccomp"), "2", "seccomp filter mode");
        let tables = own_tables();
        assert_eq!(tables.len(), 1, "one bandwidth table: {tables:?}");
        let out = Command::new("nft")
            .args(["list", "table", "inet", &tables[0]])
            .output()
            .expect("nft list table");
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(
            rules.contains(&format!("meta skuid {uid} ")),
            "no rule for the host's uid {uid}:\n{rules}"
        );
        println!(
            "host {pid}: uid {uid}, no capabilities, rule in {}",
            tables[0]
        );
        checked = true;
    });
    assert!(checked, "the running host was never inspected");
    assert!(
        own_tables().is_empty(),
        "the bandwidth table must be gone once the host is"
    );
    let cap = CAP_KBPS * 1000;
    println!(
        "capped at {CAP_KBPS} kbit/s: offered {offered} bit/s, forwarded {capped} bit/s ({:.1} % of the cap)",
        capped as f64 * 100.0 / cap as f64
    );
    assert!(
        offered > 3 * cap,
        "the flood must exceed the cap: {offered}"
    );
    assert!(
        capped <= cap * 110 / 100 && capped >= cap * 80 / 100,
        "capped throughput {capped} bit/s is not near {cap} bit/s"
    );
}
