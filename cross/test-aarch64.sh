#!/usr/bin/env bash
# cross/test-aarch64.sh: run the agent's and the shards' tests for
# aarch64-unknown-linux-gnu under qemu-user, then load cross-built shards
# with the cross-built agent under qemu.
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
# by name, each with its reason printed; they run natively on x86-64 in the
# normal test step. Everything in-process runs, including dlopen of shards.
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

# Tests that cannot run under qemu-user without binfmt_misc, and why.
# name filter (cargo test --skip matches substrings) | reason
SKIPS=(
)

shard_pkgs=()
for toml in shards/*/Cargo.toml; do
    shard_pkgs+=(-p "$(sed -n '/^\[package\]/,/^\[/s/^name *= *"\(.*\)"/\1/p' "$toml" | head -n1)")
done

skip_args=()
for entry in "${SKIPS[@]}"; do
    name=${entry%%|*}
    echo "cross/test-aarch64.sh: SKIP test $name under qemu: ${entry#*|}"
    skip_args+=(--skip "$name")
done

t0=$(date +%s)
echo "== cross/test-aarch64.sh: cargo test --target $target (under ${qemu[*]})"
# The environment tells tests they run emulated (e.g. to open pnet with
# promiscuous: false, which qemu-user's setsockopt cannot translate).
SHARDLINE_UNDER_QEMU=1 cargo test --target "$target" \
    -p shardline-agent "${shard_pkgs[@]}" \
    -- "${skip_args[@]}"
t1=$(date +%s)
echo "== cross/test-aarch64.sh: tests under qemu took $((t1 - t0)) s"

# Cross-built shards, loaded by the cross-built agent, under qemu.
"$repo/cross/build.sh" "$target"
dist="$DIST/$target/debug"
echo "== cross/test-aarch64.sh: ${qemu[*]} shardline-agent shards list $dist/shards"
if ! out=$("${qemu[@]}" "$dist/bin/shardline-agent" shards list "$dist/shards" 2>&1); then
    echo "$out"
    echo "cross/test-aarch64.sh: FAIL: the aarch64 agent could not list the aarch64 shards"
    exit 1
fi
echo "$out"
missing=0
for so in "$dist"/shards/*.so; do
    id=$(basename "$so" .so)
    id=${id%@*}
    # The loader's verdict is the last column: "ok" once the file passed the
    # ownership, digest and descriptor (ABI, id, version) checks.
    if ! grep -qE -- "^$(basename "$so")[[:space:]]+$id[[:space:]].*[[:space:]]ok\$" <<<"$out"; then
        echo "cross/test-aarch64.sh: FAIL: shard $id was not loaded and accepted"
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1
echo "cross/test-aarch64.sh: all aarch64 checks passed"
