#!/usr/bin/env bash
# Runs every cargo-fuzz target of the wire protocol for N seconds each
# (default 60), after installing cargo-fuzz if it is missing and writing the
# seed corpus. Exits non-zero on the first target that finds a crash; the
# reproducer is left in fuzz/artifacts/<target>/.
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept the
# -Z sanitizer flags cargo-fuzz passes. If the AddressSanitizer build fails
# (no sanitizer runtime for this target), it falls back to --sanitizer none.
#
#   fuzz/run.sh [seconds]
set -euo pipefail

secs="${1:-60}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz missing, installing it (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
targets=(envelope_decode_verify wire_decode signed_instruction_accept)

# Valid signed messages and near misses, so mutations reach the deep paths.
cargo run --quiet --example seed_corpus

sanitizer=()
if ! cargo fuzz build "${targets[0]}" >/dev/null 2>&1; then
    echo "run.sh: AddressSanitizer build failed; fuzzing with --sanitizer none"
    sanitizer=(--sanitizer none)
fi

for t in "${targets[@]}"; do
    echo "run.sh: fuzzing $t for ${secs}s"
    set +e
    cargo fuzz run "${sanitizer[@]}" "$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
        | grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs|stat::number_of_executed_units|==[0-9]+==|.*panicked|SUMMARY|Test unit written)'
    # grep only hides libFuzzer's progress lines; the verdict is cargo fuzz's status.
    status="${PIPESTATUS[0]}"
    set -e
    if [ "$status" -ne 0 ]; then
        echo "run.sh: $t FOUND A CRASH (exit $status); reproducer in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "run.sh: all targets ran ${secs}s each without findings"
