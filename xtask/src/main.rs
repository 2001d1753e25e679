//! Project automation, so the README's commands are one line each and work on
//! a fresh Debian or Ubuntu machine with Rust:
//!
//! - `cargo xtask demo`  — run the whole system on one machine, embedded defaults.
//! - `cargo xtask test`  — every test: installs what the tests need when root
//!   (mosquitto, postgresql, iproute2, cross linkers, qemu-user), runs the workspace tests,
//!   the ARM cross builds and the `shared` tests under qemu, and the systemd
//!   unit checks; says what it skips and why.
//! - `cargo xtask bench` — the benchmarks, writing rows into BENCHMARKS.md.
//!
//! Plain `std` only: this crate must build in seconds before anything else.
#![forbid(unsafe_code)]

mod bench_e2e;
mod demo;
mod sh;

use sh::{is_root, run, Step};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const CROSS_TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

/// Debian packages the tests need, with the command that shows each is there.
const SYSTEM_PACKAGES: &[(&str, &str)] = &[
    ("mosquitto", "/usr/sbin/mosquitto"),
    ("iproute2", "/usr/sbin/ip"),
    ("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"),
    (
        "gcc-arm-linux-gnueabihf",
        "/usr/bin/arm-linux-gnueabihf-gcc",
    ),
    ("libc6-dev-arm64-cross", "/usr/aarch64-linux-gnu/lib/crt1.o"),
    (
        "libc6-dev-armhf-cross",
        "/usr/arm-linux-gnueabihf/lib/crt1.o",
    ),
    ("qemu-user-static", "/usr/bin/qemu-aarch64-static"),
    ("systemd", "/usr/bin/systemd-analyze"),
    // The agent caps a shard host's declared bandwidth with an nftables rule.
    ("nftables", "/usr/sbin/nft"),
    // The dashboard's browser test and bench: headless chromium through
    // chromedriver (see xtask::kit::webdriver).
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
    // The packaged acceptance test (packaging/acceptance.sh).
    ("python3", "/usr/bin/python3"),
    ("util-linux", "/usr/bin/setpriv"),
    // The peer the live-capture bench measures the agent against.
    ("tcpdump", "/usr/bin/tcpdump"),
    // Three-node clustered brokers (xtask::kit::cluster): the cluster_broker
    // tests and the broker_cluster bench. Debian starts their services on
    // install; the kit never uses them.
    ("nats-server", "/usr/sbin/nats-server"),
    ("rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server"),
    // The peer the classification bench (agent/benches/classes.rs) scores
    // the agent against: nDPI's reader.
    ("libndpi-bin", "/usr/bin/ndpiReader"),
    // Rebuilds the agent's BPF object to check the committed one is current
    // (agent/tests/bpf_object.rs; `cargo xtask bpf`).
    ("clang-14", "/usr/bin/clang-14"),
];

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         demo    run the whole system on one machine (embedded broker and store)\n  \
         test    install test prerequisites (as root) and run every test\n  \
         bench   run the benchmarks and write BENCHMARKS.md rows\n          \
                 (`bench e2e [--runs N] [--no-netns]`: first packet to shard active)\n  \
         setup   only install the test prerequisites (as root)\n  \
         bpf     rebuild the agent's BPF object (agent/bpf/flow_count.bpf.o) with clang-14"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&root, &args[1..]),
        // Internal: the demo's traffic server, run inside its network namespace.
        Some("demo-traffic") => demo::traffic_cmd(&args[1..]),
        Some("test") => test(&root, &args[1..]),
        Some("bench") => bench(&root, &args[1..]),
        Some("setup") => setup(&root).map(|_| ()),
        Some("bpf") => xtask::bpf::rebuild(&root).map(|p| println!("wrote {}", p.display())),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// What the test run could not do and why, printed at the end.
#[derive(Default)]
struct Skips(Vec<String>);

impl Skips {
    fn add(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("xtask: SKIP {what}");
        self.0.push(what);
    }
}

/// Installs the system packages and rust targets the tests need. Only as
/// root; otherwise reports what is missing.
fn setup(root: &Path) -> Result<Skips, String> {
    let mut skips = Skips::default();
    let mut missing: Vec<&str> = SYSTEM_PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    // The shared-store tests' throwaway server (its binaries sit in a
    // versioned directory, so no fixed probe path).
    if xtask::kit::postgres::bin_dir().is_none() {
        missing.push("postgresql");
    }
    if !missing.is_empty() {
        if is_root() && Path::new("/usr/bin/apt-get").exists() {
            eprintln!("xtask: installing {}", missing.join(" "));
            run(Step::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            run(Step::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(missing.iter().copied())
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        } else {
            skips.add(format!(
                "installing {} (not root or no apt-get): tests needing them skip",
                missing.join(", ")
            ));
        }
    }
    let installed = sh::capture(Step::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    for target in CROSS_TARGETS
        .iter()
        .chain(["aarch64-unknown-linux-musl"].iter())
    {
        if !installed.lines().any(|l| l.trim() == *target) {
            if let Err(e) = run(Step::new("rustup").args(["target", "add", target])) {
                skips.add(format!("rust target {target}: {e}"));
            }
        }
    }
    let _ = root;
    Ok(skips)
}

fn test(root: &Path, args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut skips = setup(root)?;
    if !is_root() {
        skips.add("root-only tests (network namespaces, AF_PACKET capture, cgroups): not root; they print their own skip reasons");
    }

    // 1. Every workspace test on the host.
    run(Step::new("cargo")
        .args(["test", "--workspace", "--locked"])
        .cwd(root))?;

    // 2. ARM: the workspace builds for both targets, and the protocol's tests
    //    run under qemu-user for aarch64.
    if quick {
        skips.add("cross builds and qemu tests (--quick)");
    } else {
        for target in CROSS_TARGETS {
            let linker = match target {
                "aarch64-unknown-linux-gnu" => "/usr/bin/aarch64-linux-gnu-gcc",
                _ => "/usr/bin/arm-linux-gnueabihf-gcc",
            };
            if !Path::new(linker).exists() {
                skips.add(format!(
                    "cross build for {target}: {linker} is not installed"
                ));
                continue;
            }
            run(Step::new("cargo")
                .args(["build", "--workspace", "--locked", "--target", target])
                .cwd(root))?;
        }
        if Path::new("/usr/bin/qemu-aarch64-static").exists() {
            run(Step::new("cargo")
                .args([
                    "test",
                    "--locked",
                    "-p",
                    "shardline-shared",
                    "--target",
                    CROSS_TARGETS[0],
                ])
                .cwd(root))?;
            let aarch64_tests = root.join("cross/test-aarch64.sh");
            if aarch64_tests.exists() {
                run(Step::new("bash").arg(aarch64_tests).cwd(root))?;
            }
        } else {
            skips.add("tests under qemu-user: qemu-aarch64-static is not installed");
        }
    }

    // 3. systemd units: hardening score and verify.
    let units_check = root.join("systemd/check.sh");
    if units_check.exists() {
        if Path::new("/usr/bin/systemd-analyze").exists() {
            run(Step::new("bash").arg(units_check).cwd(root))?;
        } else {
            skips.add("systemd unit checks: systemd-analyze is not installed");
        }
    }

    // 4. Debian packages install and purge cleanly.
    let deb_check = root.join("packaging/test-debs.sh");
    if deb_check.exists() && !quick {
        if is_root() && Path::new("/usr/bin/dpkg-deb").exists() {
            run(Step::new("bash").arg(deb_check).cwd(root))?;
        } else {
            skips.add("package install/purge test: needs root and dpkg-deb");
        }
    }

    // 5. A new operator's fleet from those packages, as INSTALL.md says
    //    (reuses the packages step 4 built).
    let acceptance = root.join("packaging/acceptance.sh");
    if acceptance.exists() && !quick {
        if is_root() && Path::new("/usr/bin/dpkg-deb").exists() {
            let target_dir = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            run(Step::new("bash")
                .arg(acceptance)
                .env("DEB_DIR", target_dir.join("debs-test"))
                .cwd(root))?;
        } else {
            skips.add("packaged acceptance test: needs root and dpkg-deb");
        }
    }

    if skips.0.is_empty() {
        eprintln!("xtask: all test stages ran");
    } else {
        eprintln!("xtask: test stages skipped ({}):", skips.0.len());
        for s in &skips.0 {
            eprintln!("  - {s}");
        }
    }
    Ok(())
}

fn bench(root: &Path, args: &[String]) -> Result<(), String> {
    // Each area's bench appends its rows to BENCHMARKS.md itself:
    // (name on the command line, package, bench target).
    const BENCHES: [(&str, &str, &str); 11] = [
        ("monitor", "shardline-agent", "monitor"),
        ("classes", "shardline-agent", "classes"),
        ("shards", "shardline-agent", "shard_bench"),
        ("daemon", "shardline-agent", "daemon_rss"),
        ("policy", "shardline-allocator-core", "policy"),
        ("fleet", "shardline-allocator-core", "fleet"),
        ("core", "shardline-allocator-core", "service_core"),
        ("store", "shardline-allocator", "store_commit"),
        ("service", "shardline-allocator", "service_e2e"),
        ("requests", "shardline-allocator", "request_e2e"),
        ("dashboard", "shardline-allocator", "dashboard"),
    ];
    // `bench e2e [options]`: only the end-to-end latency bench, with its options.
    if args.first().is_some_and(|a| a == "e2e") {
        return bench_e2e::run(root, &args[1..]);
    }
    // The benches compare with peers (tcpdump, mosquitto) installed here;
    // what cannot be installed is printed as a skip.
    setup(root)?;
    let wanted: Vec<&str> = args.iter().map(String::as_str).collect();
    for (name, package, target) in BENCHES {
        if !wanted.is_empty() && !wanted.contains(&name) {
            continue;
        }
        run(Step::new("cargo")
            .args(["bench", "-p", package, "--bench", target])
            .cwd(root))?;
    }
    if wanted.is_empty() {
        bench_e2e::run(root, &[])?;
    }
    let sizes = root.join("cross/sizes.sh");
    if sizes.exists() && (wanted.is_empty() || wanted.contains(&"sizes")) {
        run(Step::new("bash").arg(sizes).cwd(root))?;
    }
    Ok(())
}
