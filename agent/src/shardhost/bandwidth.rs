//! Declared bandwidth (`ShardVariant::bandwidth_kbps`), enforced by the
//! kernel: an nftables rule per shard host in the `output` hook that polices
//! every packet sent by a socket owned by the host's dedicated uid (`meta
//! skuid`) with a byte-rate token bucket (`limit rate over … drop`).
//!
//! Why this mechanism (issue 15): a host runs as its own unprivileged uid
//! when the agent is root or holds `CAP_SETUID` + `CAP_SETGID` (the
//! packaged systemd unit; see `sandbox`), without capabilities and under a
//! seccomp filter, so a hostile shard can neither change its uid, nor touch
//! nftables (`CAP_NET_ADMIN`), nor open packet/raw sockets around the rule.
//! The alternatives were weaker: `SO_MAX_PACING_RATE` is set by the socket's
//! owner (the shard can reset it), a token bucket in the host's loop is
//! bypassed by any shard that writes to its socket itself; `tc` with
//! `net_cls` needs a cgroup v1 controller routers often lack, and cgroup BPF
//! needs a BPF loader (the sandbox forbids `bpf(2)` to the host, the agent
//! would need one of its own).
//!
//! What it covers, and what not (also in `SECURITY.md`, "Limits"): packets
//! leaving *sockets* of the host (UDP/TCP the shard sends, on any interface,
//! loopback included) over the declared rate are dropped (the sender sees
//! `EPERM`); a burst of up to [`burst_bytes`] passes first. Not covered:
//! what the host writes into a TUN descriptor (that enters the stack as
//! received traffic, not as output of the host's socket), what it receives,
//! and hosts run without a dedicated uid (agent neither root nor holding
//! `CAP_SETUID` + `CAP_SETGID`: no cap, logged).
//!
//! Who may install the rules ([`can_manage_rules`]): the agent runs `nft`,
//! so the *child* needs `CAP_NET_ADMIN`: root, or a non-root agent holding
//! it as an ambient capability (the packaged unit's `AmbientCapabilities=`),
//! which `nft` — a binary without file capabilities — inherits (only that
//! one: the others are lowered in the child before it executes `nft`).
//! The cap is per host: the sum of the declared rates of its shards (shards
//! declaring 0 add nothing and share their siblings' budget).
//!
//! The whole table is rendered from the set of capped hosts (sans-IO,
//! [`render`]) and replaced in one `nft -f -` transaction, so no stale rule
//! survives a host, and a dead agent's table is deleted at the next start.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// Why the rate rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

/// Whether `nft` run by this process can change nftables: root, or
/// `CAP_NET_ADMIN` in the ambient set (see the module docs).
pub fn can_manage_rules() -> bool {
    nix::unistd::geteuid().is_root() || super::sys::ambient_has(super::sys::CAP_NET_ADMIN)
}

/// Name of this agent process's table (`inet`).
pub fn table_name(pid: u32, instance: u64) -> String {
    format!("shardline_bw_{pid}_{instance}")
}

/// The burst let through before policing starts: 100 ms at the rate, at
/// least 64 KiB (one GSO-sized datagram must be able to pass at all).
pub fn burst_bytes(kbps: u64) -> u64 {
    (kbps.saturating_mul(1000) / 8 / 10).max(64 * 1024)
}

/// The nft script that makes `table` hold exactly these caps
/// (`uid → kbit/s`). Deleting and re-creating the table in one script is one
/// transaction: no moment without rules, no stale rule left over.
pub fn render(table: &str, caps: &BTreeMap<u32, u64>) -> String {
    let mut s = format!("table inet {table} {{}}\ndelete table inet {table}\n");
    if caps.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n"
    ));
    for (uid, kbps) in caps {
        let bytes_per_s = kbps.saturating_mul(1000) / 8;
        s.push_str(&format!(
            "    meta skuid {uid} limit rate over {bytes_per_s} bytes/second burst {} bytes counter drop\n",
            burst_bytes(*kbps)
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// The kernel side: one table per supervisor, replaced whenever the set of
/// capped hosts changes.
#[derive(Debug)]
pub struct Enforcer {
    table: String,
    caps: BTreeMap<u32, u64>,
    /// Whether the table may exist (so `Drop` knows to delete it).
    installed: bool,
}

impl Enforcer {
    pub fn new(instance: u64) -> Self {
        remove_stale_tables();
        Self {
            table: table_name(std::process::id(), instance),
            caps: BTreeMap::new(),
            installed: false,
        }
    }

    /// Caps packets sent by `uid` at `kbps` (replacing an earlier cap).
    pub fn set(&mut self, uid: u32, kbps: u64) -> Result<(), BandwidthError> {
        self.caps.insert(uid, kbps);
        self.apply()
    }

    /// Removes `uid`'s cap (no-op when it had none).
    pub fn clear(&mut self, uid: u32) {
        if self.caps.remove(&uid).is_some() {
            if let Err(e) = self.apply() {
                tracing::warn!(uid, error = %e, "could not remove a bandwidth cap");
            }
        }
    }

    fn apply(&mut self) -> Result<(), BandwidthError> {
        self.installed = true;
        run_nft(&render(&self.table, &self.caps))
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        if self.installed {
            self.caps.clear();
            let _ = self.apply();
        }
    }
}

/// `nft` with only `CAP_NET_ADMIN` of the agent's ambient capabilities.
fn nft() -> Command {
    let mut cmd = Command::new("nft");
    super::sys::keep_only_ambient(&mut cmd, super::sys::CAP_NET_ADMIN);
    cmd
}

fn run_nft(script: &str) -> Result<(), BandwidthError> {
    let mut child = nft()
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BandwidthError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(BandwidthError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(BandwidthError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BandwidthError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Deletes tables of agent processes that are gone (a crashed agent).
fn remove_stale_tables() {
    let Ok(out) = nft()
        .args(["list", "tables", "inet"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.trim().strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = stale_pid(name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_nft(&format!("delete table inet {name}\n"));
        }
    }
}

fn stale_pid(table: &str) -> Option<u32> {
    table
        .strip_prefix("shardline_bw_")?
        .split('_')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_table_with_one_rule_per_capped_host() {
        let mut caps = BTreeMap::new();
        assert_eq!(
            render("t", &caps),
            "table inet t {}\ndelete table inet t\n",
            "no caps: the table is removed"
        );
        caps.insert(1_397_227_521, 2_000);
        let s = render("t", &caps);
        assert!(s.starts_with("table inet t {}\ndelete table inet t\n"));
        assert!(
            s.contains("meta skuid 1397227521 limit rate over 250000 bytes/second burst 65536 bytes counter drop"),
            "{s}"
        );
        assert_eq!(burst_bytes(100_000), 1_250_000);
        assert_eq!(stale_pid("shardline_bw_42_3"), Some(42));
        assert_eq!(stale_pid("filter"), None);
    }
}
