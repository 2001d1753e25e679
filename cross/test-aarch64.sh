#!/usr/bin/env bash
# cross/test-aarch64.sh: run the agent's and the shards' tests for
# aarch64-unknown-linux-gnu under qemu-user, then load cross-built shards
# with the cross-built agent under qemu (its `host --describe` loader probe).
#
#   cross/test-aarch64.sh
#
# How it runs: `cargo test --target aarch64-unknown-linux-gnu` uses the
# runner from .cargo/config.toml (qemu-aarch64-static -L /usr/aarch64-linux-gnu),
# so each test binary runs emulated. binfmt_misc is not used (it is a global
# kernel setting, often unavailable in CI containers), which means a test
# binary cannot execve() another aarch64 binary: the kernel answers ENOEXEC.
# Tests that spawn a child process (the agent re-executing itself as a shard
# host, integration tests that start the daemon) are therefore skipped here,
# (each printed with the reason); they run natively on x86-64 in the normal
# test step. Everything in-process runs, including dlopen of shards.
#
# Needs: cross/setup.sh (cross gcc, qemu-user-static, the rust target).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export DIST="${DIST:-$CARGO_TARGET_DIR/dist}"
target=aarch64-unknown-linux-gnu
qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)

for tool in qemu-aarch64-static aarch64-linux-gnu-gcc; do
    if ! command -v "$tool" >/dev/null; then
        echo "cross/test-aarch64.sh: SKIP: $tool is not installed (run cross/setup.sh as root)"
        exit 0
    fi
done

# The agent's integration tests (agent/tests/*.rs) all start a child
# process that is an aarch64 binary: the daemon or the monitor
# (CARGO_BIN_EXE_shardline-agent), or the shard supervisor re-executing the
# agent as a shard host. Without binfmt_misc that execve fails with ENOEXEC,
# so they are not run here; they run natively in the x86-64 test step.
# Everything else runs: the agent's unit tests and every shard crate's tests.
for t in agent/tests/*.rs; do
    echo "cross/test-aarch64.sh: SKIP agent integration test $(basename "$t" .rs) under qemu:" \
        "it execs an aarch64 child (agent daemon/monitor/shard host); no binfmt_misc => ENOEXEC"
done

shard_pkgs=()
for toml in shards/*/Cargo.toml; do
    shard_pkgs+=(-p "$(sed -n '/^\[package\]/,/^\[/s/^name *= *"\(.*\)"/\1/p' "$toml" | head -n1)")
done

t0=$(date +%s)
echo "== cross/test-aarch64.sh: cargo test --target $target (under ${qemu[*]})"
# The environment tells tests they run emulated (e.g. to open pnet with
# promiscuous: false, which qemu-user's setsockopt cannot translate).
export SHARDLINE_UNDER_QEMU=1
cargo test --target "$target" -p shardline-agent --lib --bins
cargo test --target "$target" "${shard_pkgs[@]}"
t1=$(date +%s)
echo "== cross/test-aarch64.sh: tests under qemu took $((t1 - t0)) s"

# Cross-built shards, loaded by the cross-built agent, under qemu. The agent's
# `host --describe FILE --shard-dir DIR` mode runs the real loader in its own
# process: the file is opened once (no symlinks), must be root-owned and not
# writable by others, is hashed, dlopen()ed through that descriptor, and its
# exported descriptor (ABI version, id, version) is read. It is what
# `shardline-agent shards list` runs per file in a child process; `shards
# list` itself cannot run under qemu here (the child is an aarch64 exec,
# ENOEXEC without binfmt_misc), so the probe is called directly.
"$repo/cross/build.sh" "$target"
dist="$DIST/$target/debug"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
if [ "$(id -u)" -ne 0 ]; then
    echo "cross/test-aarch64.sh: SKIP loading the cross-built shards: the loader accepts only root-owned files, and this is not root"
    exit 0
fi
failed=0 n=0
for so in "$dist"/shards/*.so; do
    [ -f "$so" ] || continue
    id=$(basename "$so" .so)
    id=${id%@*}
    want=$(sha256sum "$so" | cut -d' ' -f1)
    out=$("${qemu[@]}" "$dist/bin/shardline-agent" host --describe "$so" --shard-dir "$dist/shards" 2>&1) || true
    if grep -q "\"sha256\":\"$want\"" <<<"$out" && grep -q "\"id\":\"$id\"" <<<"$out" &&
        grep -q "\"version\":\"$version\"" <<<"$out" && grep -q '"error":null' <<<"$out"; then
        echo "cross/test-aarch64.sh: ok: aarch64 agent under qemu loaded $(basename "$so"): $out"
        n=$((n + 1))
    else
        echo "cross/test-aarch64.sh: FAIL: aarch64 agent under qemu could not load $(basename "$so"): $out"
        failed=1
    fi
done
if [ "$n" -eq 0 ]; then
    echo "cross/test-aarch64.sh: FAIL: no cross-built shard in $dist/shards"
    failed=1
fi
[ "$failed" -eq 0 ] || exit 1
echo "cross/test-aarch64.sh: all aarch64 checks passed ($n shards loaded under qemu)"
