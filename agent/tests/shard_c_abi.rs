//! The C side of the shard ABI: `shards/sdk/include/shardline_shard.h`
//! compiled with the system C compiler must lay out every struct exactly as
//! the Rust SDK does (sizes and field offsets), and a shard written in C
//! against it (`shards/fixtures/c-shard/c_fixture.c`) must be loaded,
//! initialised and polled by the agent's real, sandboxed shard host.
//! Needs `cc`; the loading test needs root (shard files must be root-owned).
//! Each says why when it skips.

mod shard_common;

use shard_common::*;
use shardline_agent::shardhost::{HostEvent, Supervisor};
use shardline_shard_sdk::{
    HostApiV1, ResourceCostV1, ShardDescriptorV1, ShardStatsV1, ShardVtableV1, StrRef,
};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn include_dir() -> PathBuf {
    root().join("shards/sdk/include")
}

fn have_cc() -> bool {
    Command::new("cc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_c_header_matches_the_rust_layout() {
    if !have_cc() {
        eprintln!("SKIP: no C compiler (`cc`) to compile the header with");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("layout.c");
    let checks: &[(&str, &str, usize)] = &[
        ("size", "ShardlineStrRef", size_of::<StrRef>()),
        (
            "size",
            "ShardlineResourceCostV1",
            size_of::<ResourceCostV1>(),
        ),
        ("size", "ShardlineShardStatsV1", size_of::<ShardStatsV1>()),
        ("size", "ShardlineHostApiV1", size_of::<HostApiV1>()),
        ("size", "ShardlineShardVtableV1", size_of::<ShardVtableV1>()),
        (
            "size",
            "ShardlineShardDescriptorV1",
            size_of::<ShardDescriptorV1>(),
        ),
        ("ShardlineStrRef", "len", offset_of!(StrRef, len)),
        (
            "ShardlineResourceCostV1",
            "memory_bytes",
            offset_of!(ResourceCostV1, memory_bytes),
        ),
        (
            "ShardlineShardStatsV1",
            "errors",
            offset_of!(ShardStatsV1, errors),
        ),
        ("ShardlineHostApiV1", "ctx", offset_of!(HostApiV1, ctx)),
        ("ShardlineHostApiV1", "log", offset_of!(HostApiV1, log)),
        (
            "ShardlineHostApiV1",
            "metric",
            offset_of!(HostApiV1, metric),
        ),
        (
            "ShardlineHostApiV1",
            "call_service",
            offset_of!(HostApiV1, call_service),
        ),
        (
            "ShardlineShardVtableV1",
            "poll",
            offset_of!(ShardVtableV1, poll),
        ),
        (
            "ShardlineShardVtableV1",
            "fds",
            offset_of!(ShardVtableV1, fds),
        ),
        (
            "ShardlineShardVtableV1",
            "call",
            offset_of!(ShardVtableV1, call),
        ),
        (
            "ShardlineShardVtableV1",
            "stats",
            offset_of!(ShardVtableV1, stats),
        ),
        (
            "ShardlineShardVtableV1",
            "destroy",
            offset_of!(ShardVtableV1, destroy),
        ),
        (
            "ShardlineShardDescriptorV1",
            "struct_size",
            offset_of!(ShardDescriptorV1, struct_size),
        ),
        (
            "ShardlineShardDescriptorV1",
            "id",
            offset_of!(ShardDescriptorV1, id),
        ),
        (
            "ShardlineShardDescriptorV1",
            "version",
            offset_of!(ShardDescriptorV1, version),
        ),
        (
            "ShardlineShardDescriptorV1",
            "capability",
            offset_of!(ShardDescriptorV1, capability),
        ),
        (
            "ShardlineShardDescriptorV1",
            "service",
            offset_of!(ShardDescriptorV1, service),
        ),
        (
            "ShardlineShardDescriptorV1",
            "kind",
            offset_of!(ShardDescriptorV1, kind),
        ),
        (
            "ShardlineShardDescriptorV1",
            "cost",
            offset_of!(ShardDescriptorV1, cost),
        ),
        (
            "ShardlineShardDescriptorV1",
            "vtable",
            offset_of!(ShardDescriptorV1, vtable),
        ),
    ];
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"shardline_shard.h\"\nint main(void) {\n",
    );
    for (a, b, _) in checks {
        if *a == "size" {
            c += &format!("  printf(\"size {b} %zu\\n\", sizeof({b}));\n");
        } else {
            c += &format!("  printf(\"{a} {b} %zu\\n\", offsetof({a}, {b}));\n");
        }
    }
    c += "  printf(\"limit max_fds %u\\n\", SHARDLINE_MAX_FDS);\n  return 0;\n}\n";
    std::fs::write(&src, c).unwrap();
    let exe = tmp.path().join("layout");
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(include_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "the header does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run layout program");
    let text = String::from_utf8(out.stdout).unwrap();
    for (a, b, rust) in checks {
        let key = format!("{a} {b} ");
        let c_value: usize = text
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in:\n{text}"));
        assert_eq!(
            c_value, *rust,
            "{a} {b}: C says {c_value}, Rust says {rust}"
        );
    }
    // The host asks a shard for at most this many descriptors (loader.rs: `[0i32; 16]`).
    assert!(text.contains("limit max_fds 16\n"), "{text}");
    #[cfg(target_pointer_width = "64")]
    {
        assert_eq!(size_of::<ShardDescriptorV1>(), 104);
        assert_eq!(size_of::<HostApiV1>(), 40);
    }
}

#[test]
fn a_shard_written_in_c_is_loaded_and_run_by_a_real_host() {
    if !have_cc() {
        eprintln!("SKIP: no C compiler (`cc`) to build the C shard with");
        return;
    }
    if !is_root() {
        eprintln!("SKIP: shard libraries must be root-owned to load; run as root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("sl-cshard-")
        .tempdir()
        .unwrap();
    let lib = dir.path().join("c-fixture@0.1.0.so");
    let out = Command::new("cc")
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I",
        ])
        .arg(include_dir())
        .arg(root().join("shards/fixtures/c-shard/c_fixture.c"))
        .arg("-o")
        .arg(&lib)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "the C shard does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let s = spec(dir.path(), "cfixture", "c-fixture", "", LIMITS);
    sup.activate("cfixture", vec![s], Instant::now())
        .expect("activate");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    let mut polls = 0;
    while Instant::now() < deadline && polls < 3 {
        events.extend(sup.poll(Instant::now()));
        polls = sup
            .shard_stats("cfixture")
            .first()
            .map_or(0, |s| s.packets_in);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, HostEvent::Started { .. })),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, HostEvent::Failed { .. })),
        "{events:?}"
    );
    assert!(polls >= 3, "the C shard was polled {polls} times");
    let stopped = sup.deactivate("cfixture");
    assert!(
        stopped
            .iter()
            .any(|e| matches!(e, HostEvent::Stopped { .. })),
        "{stopped:?}"
    );
}
