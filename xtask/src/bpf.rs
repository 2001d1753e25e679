//! `cargo xtask bpf`: rebuilds the agent's BPF object
//! (`agent/bpf/flow_count.bpf.o`) from its C source with clang.
//!
//! The object is committed beside its source (the bpf2go convention) and
//! embedded in the agent with `include_bytes!`, so cross builds and
//! operators need no clang. The build is byte-reproducible: a fixed clang
//! major version, the source compiled by its relative name from its own
//! directory and `-fdebug-compilation-dir=.`, so no path of the machine
//! ends up in the object (`agent/tests/bpf_object.rs` rebuilds it and
//! compares).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The compiler the committed object was built with (Debian's `clang-14`).
pub const CLANG: &str = "clang-14";
/// The source and object, relative to the workspace root.
pub const SOURCE: &str = "agent/bpf/flow_count.bpf.c";
pub const OBJECT: &str = "agent/bpf/flow_count.bpf.o";

/// Whether the compiler is installed.
pub fn clang_available() -> bool {
    Command::new(CLANG)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Compiles the source under `root` (the workspace root) into `out`.
pub fn build(root: &Path, out: &Path) -> Result<(), String> {
    let src = root.join(SOURCE);
    let dir = src.parent().ok_or("source has no directory")?;
    let name = src.file_name().ok_or("source has no file name")?;
    let out = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let o = Command::new(CLANG)
        .current_dir(dir)
        .args(["-target", "bpfel", "-O2", "-g", "-fdebug-compilation-dir=."])
        .args(["-Wall", "-Werror", "-c"])
        .arg(name)
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("{CLANG}: {e} (apt-get install clang-14)"))?;
    if !o.status.success() {
        return Err(format!(
            "{CLANG} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Rebuilds the committed object in place; returns its path.
pub fn rebuild(root: &Path) -> Result<PathBuf, String> {
    let out = root.join(OBJECT);
    build(root, &out)?;
    Ok(out)
}
