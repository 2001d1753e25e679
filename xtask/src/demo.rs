//! `cargo xtask demo`: the whole system on one machine.
//!
//! Builds the agent, the allocator and the shard libraries; installs the
//! shards with their real SHA-256 in a catalog; starts the allocator (its
//! embedded broker and store on free loopback ports); enrols the device and
//! starts the agent. As root the agent watches a veth into a network
//! namespace this command creates, with real traffic it generates between
//! the two sides; otherwise (or with `--no-netns`) it replays a capture this
//! command writes. The traffic is a TLS session to a bank (⇒ `vpn`), then
//! game traffic (⇒ `qos`), then quiet (⇒ both released). The allocator's
//! view of the device is polled with `shardctl` and every change is shown
//! as it happens. Exit 0 only when every expected activation and release
//! was seen; everything started is stopped and removed at the end, also on
//! Ctrl-C (see `kit::interrupt`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xtask::kit::interrupt::{self, Interrupt};
use xtask::kit::netns::Netns;
use xtask::kit::pcap::{self, Phase};
use xtask::kit::proc::{Proc, TempDir};
use xtask::kit::stack::{self, Bins, Capture, DeviceView, LoopConfig, Stack};
use xtask::kit::traffic;

const USAGE: &str = "usage: cargo xtask demo [--no-netns] [--keep]\n  \
    --no-netns  replay a capture file instead of live traffic in a network namespace (the path taken when not root)\n  \
    --keep      keep the temporary directory (logs, configuration) for a look afterwards";

/// The scenario: lead-in, bank, game, quiet.
pub fn phases() -> Vec<Phase> {
    vec![
        Phase::Quiet(Duration::from_secs(2)),
        Phase::Banking(Duration::from_secs(12)),
        Phase::Gaming(Duration::from_secs(12)),
        // Long enough for both releases; the run ends as soon as they are seen.
        Phase::Quiet(Duration::from_secs(40)),
    ]
}

fn phase_text(p: &Phase, live: bool) -> String {
    let how = if live { "sending" } else { "replaying" };
    match p {
        Phase::Quiet(_) => "traffic: quiet (no IP traffic)".into(),
        Phase::Banking(d) => format!(
            "traffic: {how} a TLS session to {} (ClientHello + encrypted records) for {}s",
            pcap::BANK_SNI,
            d.as_secs()
        ),
        Phase::Gaming(d) => format!(
            "traffic: {how} game traffic, UDP port {} at 50 packets/s each way, for {}s",
            pcap::GAME_PORT,
            d.as_secs()
        ),
    }
}

/// What the demo must see, in the order it is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Activated,
    Running,
    Released,
}

pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    let mut no_netns = false;
    let mut keep = false;
    for a in args {
        match a.as_str() {
            "--no-netns" => no_netns = true,
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    interrupt::reexec_ignoring_sigint();
    let mut intr = Interrupt::watch();
    let live = !no_netns && xtask_is_root();
    if !live && !no_netns {
        println!(
            "demo: not root, so no network namespace: the agent replays a capture file instead"
        );
    }

    // 1. Build (debug) into the target dir xtask itself was built in.
    let exe = std::env::current_exe().map_err(|e| format!("locating xtask: {e}"))?;
    let profile = exe.parent().ok_or("xtask has no directory")?.to_owned();
    let target = profile.parent().ok_or("no target directory")?.to_owned();
    println!("demo: building the agent, the allocator and the shards (cargo build)");
    stack::build(root, &target, false)?;
    if intr.fired() {
        return Err("interrupted".into());
    }
    let bins = Bins::in_profile(&profile)?;

    // 2. Everything lives in one temporary directory.
    let mut tmp = TempDir::new("shardline-demo")?;
    tmp.keep = keep;
    let dir = tmp.path.clone();
    let phases = phases();
    let mut netns = None;
    let mut server = None;
    let capture = if live {
        let ns = Netns::create("demo")?;
        println!(
            "demo: network namespace {} with veth {} ({}) <-> {} ({})",
            ns.name, ns.host_if, ns.host_addr, ns.ns_if, ns.peer_addr
        );
        let mut cmd = ns.command(&exe);
        cmd.args(["demo-traffic", "serve"]);
        server = Some(Proc::spawn(
            "traffic server",
            cmd,
            &dir.join("traffic-server.log"),
        )?);
        traffic::wait_for_server(ns.peer_addr, Duration::from_secs(10))?;
        let c = Capture::Interfaces(vec![ns.host_if.clone()]);
        netns = Some(ns);
        c
    } else {
        let file = dir.join("demo.pcap");
        let frames = pcap::scenario(&phases, 1_700_000_000_000_000_000);
        std::fs::write(&file, pcap::write_pcap(&frames))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        println!("demo: wrote {} ({} frames)", file.display(), frames.len());
        Capture::Pcap(file)
    };

    let result = run_loop(
        root,
        &bins,
        &dir,
        capture,
        &phases,
        netns.as_ref(),
        &mut intr,
    );
    // Cleanup in order: traffic server, (the stack is dropped inside run_loop),
    // namespace, temporary directory.
    if let Some(mut s) = server.take() {
        s.stop(Duration::from_secs(2));
    }
    let ns_name = netns.as_ref().map(|n| n.name.clone());
    drop(netns);
    if let Some(n) = ns_name {
        println!("demo: removed network namespace {n}");
    }
    if keep {
        println!("demo: kept {}", dir.display());
    } else {
        println!("demo: removed {}", dir.display());
    }
    drop(tmp);
    result
}

fn xtask_is_root() -> bool {
    crate::sh::is_root()
}

fn run_loop(
    root: &Path,
    bins: &Bins,
    dir: &Path,
    capture: Capture,
    phases: &[Phase],
    netns: Option<&Netns>,
    intr: &mut Interrupt,
) -> Result<(), String> {
    let cfg = LoopConfig::demo(capture);
    println!(
        "demo: installing shards, writing the catalog with their SHA-256, starting the allocator"
    );
    let mut stack = Stack::prepare(root, bins, dir, cfg)?;
    println!(
        "demo: allocator up: embedded broker mqtt://127.0.0.1:{}, admin API {}",
        stack.mqtt_port, stack.api
    );
    println!(
        "demo: enrolled {} (tier {}) with device key {}…",
        stack.cfg.device,
        stack.cfg.tier,
        &stack.device_key[..16.min(stack.device_key.len())]
    );
    stack.start_agent()?;
    let t0 = Instant::now();
    let live_stop = Arc::new(AtomicBool::new(false));
    let live =
        netns.map(|ns| traffic::run_phases(ns.peer_addr, phases.to_vec(), live_stop.clone()));
    println!(
        "demo: agent started ({}), QoS window {} ms",
        match &stack.cfg.capture {
            Capture::Pcap(p) => format!(
                "replaying {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            ),
            Capture::Interfaces(i) => format!("watching {}", i.join(",")),
        },
        stack.cfg.window_ms
    );
    let result = watch(&mut stack, phases, netns.is_some(), t0, intr);
    live_stop.store(true, Ordering::Relaxed);
    if let Some(h) = live {
        if let Ok(Err(e)) = h.join() {
            println!("demo: traffic generator: {e}");
        }
    }
    if result.is_ok() || matches!(&result, Err(e) if e.starts_with("missing")) {
        println!("\n$ shardctl devices");
        match stack.shardctl(&["devices"]) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("shardctl devices: {e}"),
        }
        // What the allocator decided, and why, in its own words.
        let device = stack.cfg.device.clone();
        println!("\n$ shardctl history {device} --kind decision --limit 12");
        match stack.shardctl(&["history", &device, "--kind", "decision", "--limit", "12"]) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("shardctl history: {e}"),
        }
    }
    if result.as_ref().is_err_and(|e| e != "interrupted") {
        if let Some(a) = &stack.agent {
            println!("---- agent log (tail) ----\n{}", a.log_tail(15));
        }
        println!(
            "---- allocator log (tail) ----\n{}",
            stack.allocator.log_tail(15)
        );
    }
    stack.stop();
    println!("demo: stopped the agent and the allocator");
    result
}

fn stamp(t0: Instant) -> String {
    format!("[t+{:>4.1}s]", t0.elapsed().as_secs_f64())
}

/// Polls the allocator's view of the device and prints every change until
/// all expected events were seen, the scenario is over, or Ctrl-C.
fn watch(
    stack: &mut Stack,
    phases: &[Phase],
    live: bool,
    t0: Instant,
    intr: &mut Interrupt,
) -> Result<(), String> {
    let device = stack.cfg.device.clone();
    let expected: Vec<(&str, Seen)> = ["vpn", "qos"]
        .iter()
        .flat_map(|c| {
            [
                (*c, Seen::Activated),
                (*c, Seen::Running),
                (*c, Seen::Released),
            ]
        })
        .collect();
    let mut seen: BTreeSet<(String, Seen)> = BTreeSet::new();
    let mut prev = DeviceView::default();
    let mut phase_at = Duration::ZERO;
    let mut next_phase = 0;
    let total: Duration = phases.iter().map(Phase::duration).sum();
    loop {
        if intr.fired() {
            println!("\n{} Ctrl-C: stopping", stamp(t0));
            return Err("interrupted".into());
        }
        stack.check_alive()?;
        let elapsed = t0.elapsed();
        while next_phase < phases.len() && elapsed >= phase_at {
            println!("{} {}", stamp(t0), phase_text(&phases[next_phase], live));
            phase_at += phases[next_phase].duration();
            next_phase += 1;
        }
        let view = match stack.device() {
            Ok(v) => v,
            Err(e) => {
                println!("{} shardctl: {e}", stamp(t0));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if view.presence != prev.presence && !view.presence.is_empty() {
            println!("{} allocator sees {device} {}", stamp(t0), view.presence);
        }
        if view.classes != prev.classes {
            if view.classes.is_empty() {
                println!(
                    "{} {device} reports no traffic that needs anything",
                    stamp(t0)
                );
            } else {
                println!(
                    "{} {device} reports traffic needing service: {}",
                    stamp(t0),
                    view.classes.join(", ")
                );
            }
        }
        for (cap, why) in &view.refusals {
            if prev.refusals.get(cap) != Some(why) {
                let hint = if why.starts_with("capacity") {
                    " (the device reports too little free CPU or memory; waiting for it to free up)"
                } else {
                    ""
                };
                println!(
                    "{} allocator does not grant {cap} on {device}: {why}{hint}",
                    stamp(t0)
                );
            }
        }
        report_diff(&prev.leases, &view.leases, |cap, shards, on| {
            if on {
                println!(
                    "{} allocator activated {cap} on {device} ({}), signed instruction sent",
                    stamp(t0),
                    shards.join(", ")
                );
                if let Some(why) = view.why("grant", cap) {
                    println!("{}   why: {why}", stamp(t0));
                }
                seen.insert((cap.to_owned(), Seen::Activated));
            } else {
                println!("{} allocator released {cap} on {device}", stamp(t0));
                if let Some(why) = view.why("release", cap) {
                    println!("{}   why: {why}", stamp(t0));
                }
                if seen.contains(&(cap.to_owned(), Seen::Activated)) {
                    seen.insert((cap.to_owned(), Seen::Released));
                }
            }
        });
        report_diff(&prev.running, &view.running, |cap, shards, on| {
            if on {
                println!(
                    "{} {device} runs {cap}: {} in a shard host (instruction #{} applied)",
                    stamp(t0),
                    shards.join(", "),
                    view.applied_instruction_seq
                );
                seen.insert((cap.to_owned(), Seen::Running));
            } else {
                println!("{} {device} stopped {cap}", stamp(t0));
            }
        });
        prev = view;
        if expected
            .iter()
            .all(|(c, s)| seen.contains(&(c.to_string(), *s)))
        {
            println!(
                "{} demo: every expected activation and release was seen",
                stamp(t0)
            );
            return Ok(());
        }
        if t0.elapsed() > total {
            let missing: Vec<String> = expected
                .iter()
                .filter(|(c, s)| !seen.contains(&(c.to_string(), *s)))
                .map(|(c, s)| format!("{c} {}", format!("{s:?}").to_lowercase()))
                .collect();
            // Say why, in the allocator's words, not only what is missing.
            let reasons = match stack.device() {
                Ok(v) if !v.refusals.is_empty() => v
                    .refusals
                    .iter()
                    .map(|(cap, why)| format!("\n  {cap}: {why}"))
                    .collect::<String>(),
                Ok(_) => "\n  (the allocator refuses nothing: the device has not reported the need, or has not applied the instruction yet)".to_owned(),
                Err(e) => format!("\n  (could not read the device's refusals: {e})"),
            };
            return Err(format!(
                "missing after {}s: {}; the allocator's current refusals for {device}:{reasons}",
                total.as_secs(),
                missing.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Calls `f(capability, shards, appeared)` for every capability that
/// appeared in or disappeared from `new` compared with `old`.
fn report_diff(
    old: &BTreeMap<String, Vec<String>>,
    new: &BTreeMap<String, Vec<String>>,
    mut f: impl FnMut(&str, &[String], bool),
) {
    for (cap, shards) in new {
        if !old.contains_key(cap) {
            f(cap, shards, true);
        }
    }
    for (cap, shards) in old {
        if !new.contains_key(cap) {
            f(cap, shards, false);
        }
    }
}

/// `xtask demo-traffic serve`: the traffic server inside the namespace.
pub fn traffic_cmd(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("serve") => traffic::serve(),
        _ => Err("usage: xtask demo-traffic serve".into()),
    }
}
