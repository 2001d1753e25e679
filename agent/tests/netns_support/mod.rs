//! Network namespaces for the live capture tests and the monitor bench:
//! two namespaces joined by a veth pair, removed (with the veth) however
//! the test ends.
#![allow(dead_code)]

use std::process::Command;

/// Run a command; its stderr is the error.
pub fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Namespaces deleted when this is dropped.
#[derive(Debug)]
pub struct Netns(pub Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Namespaces `{prefix}-s` (device `sa`, address `s_ip`/24) and
/// `{prefix}-c` (device `cb`, `c_ip`/24), joined by a veth, links up.
pub fn veth_pair(prefix: &str, s_ip: &str, c_ip: &str) -> Result<(Netns, String, String), String> {
    let s = format!("{prefix}-s");
    let c = format!("{prefix}-c");
    let mut guard = Netns(Vec::new());
    for n in [&s, &c] {
        sh(&["ip", "netns", "add", n])?;
        guard.0.push(n.clone());
    }
    sh(&[
        "ip", "link", "add", "sa", "netns", &s, "type", "veth", "peer", "name", "cb", "netns", &c,
    ])?;
    for (n, dev, ip) in [(&s, "sa", s_ip), (&c, "cb", c_ip)] {
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            dev,
        ])?;
    }
    // IPv4 only: with IPv6 on, the kernel sends its own neighbour and
    // router solicitations and MLD reports on a new link at times of its
    // choosing, and one landing while only one of two captures runs made
    // their counts differ by a packet.
    for n in [&s, &c] {
        for key in ["all", "default"] {
            sh(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ])?;
        }
    }
    for (n, dev) in [(&s, "sa"), (&c, "cb"), (&s, "lo"), (&c, "lo")] {
        sh(&["ip", "-n", n, "link", "set", "dev", dev, "up"])?;
    }
    Ok((guard, s, c))
}

/// Move the calling thread into namespace `ns`.
pub fn enter(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("{ns}: {e}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("{ns}: {e}"))
}
