#!/usr/bin/env bash
# cross/sizes.sh: write the "Builds" section of BENCHMARKS.md: stripped size
# of every binary and shard per target, and the last measured build time,
# from the release builds cross/build.sh left in $DIST.
#
#   cross/build.sh --release aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf \
#       aarch64-unknown-linux-musl x86_64-unknown-linux-gnu
#   cross/sizes.sh
#
# Only the text between the section's markers is replaced; other sections
# of BENCHMARKS.md are left alone. Targets without a release build are
# listed as "not built".
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
DIST="${DIST:-$CARGO_TARGET_DIR/dist}"
bench="$repo/BENCHMARKS.md"
begin='<!-- builds:begin (written by cross/sizes.sh) -->'
end='<!-- builds:end -->'
targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)

machine="$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(rustc --version | cut -d' ' -f1-2)"
section=$(mktemp)
trap 'rm -f "$section"' EXIT
{
    echo "$begin"
    echo
    echo "Machine: $machine. Stripped sizes (\`cross/build.sh --release TARGET\`, then"
    echo "the target's binutils \`strip\`) are exact and deterministic for a given toolchain."
    echo "Build times are the wall clock of the last \`cross/build.sh\` run per target and"
    echo "profile, one run each (not a median: a cold release build takes many minutes),"
    echo "on a 2-core machine shared with other builds (load average about 10), so they"
    echo "are upper bounds. \"first\" = nothing of that target/profile was compiled before"
    echo "(host build scripts and proc macros may still be shared between targets);"
    echo "\"incremental\" = dependencies were already built. Written $(date -u +%Y-%m-%d) by \`cross/sizes.sh\`."
    echo
    echo "| target | binary | stripped size (bytes) | stripped size |"
    echo "|---|---|---:|---:|"
    for t in "${targets[@]}"; do
        d="$DIST/$t/release"
        if [ ! -d "$d" ]; then
            echo "| $t | (not built) | | |"
            continue
        fi
        for f in "$d"/bin/* "$d"/shards/*.so; do
            [ -f "$f" ] || continue
            b=$(stat -c %s "$f")
            echo "| $t | $(basename "$f") | $b | $(awk -v b="$b" 'BEGIN { printf (b >= 1048576 ? "%.1f MiB" : "%.0f KiB"), (b >= 1048576 ? b/1048576 : b/1024) }') |"
        done
    done
    echo
    echo "| target | profile | build time (s) | build | measured |"
    echo "|---|---|---:|---|---|"
    for f in "$DIST"/*/*/build-time; do
        [ -f "$f" ] || continue
        read -r t p s when kind <"$f"
        echo "| $t | $p | $s | ${kind:-?} | $when |"
    done
    echo
    echo "$end"
} >"$section"

if grep -qF "$begin" "$bench"; then
    awk -v b="$begin" -v e="$end" -v f="$section" '
        $0 == b { while ((getline l < f) > 0) print l; skip = 1; next }
        $0 == e { skip = 0; next }
        !skip { print }' "$bench" >"$bench.tmp"
    mv "$bench.tmp" "$bench"
else
    {
        echo
        echo "## Builds (cross/, stripped sizes and build times)"
        echo
        cat "$section"
    } >>"$bench"
fi
echo "cross/sizes.sh: wrote the Builds section of $bench"
