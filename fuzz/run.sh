#!/usr/bin/env bash
# Runs every cargo-fuzz target (the wire protocol, the agent's packet path,
# the agent's and the allocator's configuration loaders) for N seconds each
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
targets=(envelope_decode_verify wire_decode signed_instruction_accept
         monitor_frames agent_config allocator_config catalog request_open)

# Valid signed messages and near misses, so mutations reach the deep paths.
cargo run --quiet --example seed_corpus

# The shipped configuration files seed the loaders (agent_config takes a
# selector byte first: 0 daemon config, 1 monitor tuning, 2 rules).
seed() { mkdir -p "corpus/$1"; cat > "corpus/$1/$2"; }
seed agent_config agent.toml < <(printf '\x00'; cat ../agent/config/agent.toml)
seed agent_config packaged-agent.toml < <(printf '\x00'; cat ../packaging/config/agent.toml)
seed agent_config monitor.toml < <(printf '\x01'; printf 'window_ms = 1000\nmax_flows = 1024\n')
seed agent_config rules.toml < <(printf '\x02'; cat ../agent/rules/default.toml)
seed allocator_config allocator.toml < ../packaging/config/allocator.toml
seed catalog catalog.toml < ../allocator/catalog/catalog.toml
seed catalog tiers.toml < ../allocator/catalog/tiers.toml
seed catalog both.toml < <(cat ../allocator/catalog/catalog.toml; printf '\0'; cat ../allocator/catalog/tiers.toml)
# monitor_frames records: [link][time step][len u16 LE][frame]: an Ethernet
# IPv4 UDP DNS query for example.com, then a raw-IP TCP SYN to port 443.
seed monitor_frames dns-then-syn < <(printf '%b' \
    '\000\000\107\000\002\000\000\000\000\002\002\000\000\000\000\001\010\000\105\000' \
    '\000\071\000\000\100\000\100\021\040\243\012\000\000\002\010\010\010\010\004\322' \
    '\000\065\000\045\000\000\022\064\001\000\000\001\000\000\000\000\000\000\007\145' \
    '\170\141\155\160\154\145\003\143\157\155\000\000\001\000\001\003\050\050\000\105' \
    '\000\000\050\000\000\100\000\100\006\046\316\012\000\000\002\012\000\000\001\300' \
    '\000\001\273\000\000\000\001\000\000\000\000\120\002\377\377\000\000\000\000')

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
