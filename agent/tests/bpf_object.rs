//! The committed BPF object (`agent/bpf/flow_count.bpf.o`, embedded in the
//! agent) is what its source builds to: the test rebuilds it with
//! `xtask::bpf::build` into a temporary directory and compares the bytes
//! (the build is reproducible: fixed clang major version, no paths of the
//! machine in the object). A stale object fails with the command that
//! refreshes it. Needs clang-14 (`cargo xtask test` installs it as root);
//! otherwise it prints why it skips.

use std::path::Path;

#[test]
fn the_committed_bpf_object_is_built_from_its_source() {
    if !xtask::bpf::clang_available() {
        println!(
            "SKIP the_committed_bpf_object_is_built_from_its_source: {} is not installed (apt-get install clang-14)",
            xtask::bpf::CLANG
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("temp dir");
    let fresh = dir.path().join("flow_count.bpf.o");
    xtask::bpf::build(&root, &fresh).expect("build the BPF object");
    let built = std::fs::read(&fresh).expect("read the rebuilt object");
    let committed =
        std::fs::read(root.join(xtask::bpf::OBJECT)).expect("read the committed object");
    assert!(
        built == committed,
        "{} is stale ({} bytes committed, {} rebuilt from {}): run `cargo xtask bpf` and commit the object",
        xtask::bpf::OBJECT,
        committed.len(),
        built.len(),
        xtask::bpf::SOURCE
    );
}
