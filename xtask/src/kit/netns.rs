//! A network namespace joined to the root namespace by a veth pair, for
//! real traffic the agent can watch on the root side. Created with `ip`
//! (iproute2), deleted on drop; needs root.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// A namespace `name` holding `ns_if` (`peer_addr`), joined to `host_if`
/// (`host_addr`) in the root namespace.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_addr: Ipv4Addr,
    pub peer_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates `sl-<tag>-<pid>` and a veth pair on a /30 chosen from the pid
    /// (so concurrent runs do not share a subnet).
    pub fn create(tag: &str) -> Result<Netns, String> {
        let pid = std::process::id();
        let (a, b) = ((pid >> 6 & 0xff) as u8, ((pid & 0x3f) << 2) as u8);
        let ns = Netns {
            name: format!("sl-{tag}-{pid}"),
            host_if: format!("sl{pid}h"),
            ns_if: format!("sl{pid}n"),
            host_addr: Ipv4Addr::new(10, 213, a, b + 1),
            peer_addr: Ipv4Addr::new(10, 213, a, b + 2),
        };
        ip(&["netns", "add", &ns.name])?;
        // From here on the guard deletes what exists.
        let (h, n) = (ns.host_if.as_str(), ns.ns_if.as_str());
        ip(&["link", "add", h, "type", "veth", "peer", "name", n])?;
        ip(&["link", "set", n, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{}/30", ns.host_addr), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.peer_addr),
            "dev",
            n,
        ])?;
        ip(&["-n", &ns.name, "link", "set", n, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it; the explicit
        // link delete covers a half-made pair left in the root namespace.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
