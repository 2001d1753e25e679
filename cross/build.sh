#!/usr/bin/env bash
# cross/build.sh: build the Shardline binaries and shard libraries for ARM
# (and x86-64), strip them, and lay them out ready for packaging.
#
#   cross/build.sh [--release] [TARGETS...]
#
# TARGETS (default: the three ARM targets):
#   aarch64-unknown-linux-gnu       agent, allocator, shardctl, all shards
#   armv7-unknown-linux-gnueabihf   agent, allocator, shardctl, all shards
#   aarch64-unknown-linux-musl      the agent only, static (see cross/README.md:
#                                   a static binary cannot dlopen shards)
#   x86_64-unknown-linux-gnu        native, same set as the gnu ARM targets
#
# With --release the agent is built with the size-optimised `device` profile
# (Cargo.toml: on a small box its idle memory is mostly code), the
# allocator, shardctl and the shards with `release`.
#
# Output: $DIST/<target>/<profile>/{bin/<binaries>, shards/<id>@<version>.so}
# stripped, with DIST defaulting to $CARGO_TARGET_DIR/dist (or target/dist).
# The unstripped originals stay in cargo's target directory. Each target's
# wall-clock build time is printed.
#
# Prerequisites: cross/setup.sh (as root) installs them.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
DIST="${DIST:-$CARGO_TARGET_DIR/dist}"

profile=debug
cargo_profile=()
targets=()
for arg in "$@"; do
    case "$arg" in
        --release) profile=release; cargo_profile=(--release) ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "cross/build.sh: unknown option $arg" >&2; exit 2 ;;
        *) targets+=("$arg") ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)
fi

# The shard plugins: every shards/<dir>/Cargo.toml that builds a cdylib,
# printed as "<package> <lib name>". A library shard_vpn_tunnel builds
# libshard_vpn_tunnel.so and is installed as vpn-tunnel@<version>.so (the
# file name the agent looks up).
shard_crates() {
    local toml pkg lib
    for toml in "$repo"/shards/*/Cargo.toml; do
        [ -e "$toml" ] || continue
        grep -q 'cdylib' "$toml" || continue
        pkg=$(sed -n '/^\[package\]/,/^\[/s/^name *= *"\(.*\)"/\1/p' "$toml" | head -n1)
        lib=$(sed -n '/^\[lib\]/,/^\[/s/^name *= *"\(.*\)"/\1/p' "$toml" | head -n1)
        [ -n "$lib" ] || lib=${pkg//-/_}
        if [ -n "$pkg" ]; then echo "$pkg $lib"; fi
    done
}

# The version every crate shares (workspace.package.version).
workspace_version() {
    sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1
}

strip_tool() {
    case "$1" in
        aarch64-*) echo aarch64-linux-gnu-strip ;;
        armv7-*) echo arm-linux-gnueabihf-strip ;;
        *) echo strip ;;
    esac
}

build_target() {
    local target=$1 packages=() bins=() shards=()
    case "$target" in
        aarch64-unknown-linux-musl)
            # ring and other C code: Debian has no aarch64 musl cross gcc, so the
            # glibc cross gcc compiles it; .cargo/config.toml links the result
            # statically with Rust's self-contained musl crt and libc.
            export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
            export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
            packages=(-p shardline-agent)
            bins=(shardline-agent)
            ;;
        aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf | x86_64-unknown-linux-gnu)
            packages=(-p shardline-agent -p shardline-allocator)
            bins=(shardline-agent shardline-allocator shardctl)
            mapfile -t shards < <(shard_crates)
            local s
            for s in "${shards[@]}"; do packages+=(-p "${s%% *}"); done
            ;;
        *) echo "cross/build.sh: unsupported target $target" >&2; return 2 ;;
    esac

    local t0 t1 out
    t0=$(date +%s)
    echo "== cross/build.sh: $target ($profile): cargo build ${packages[*]}"
    # The host target is built without --target so that it shares
    # $CARGO_TARGET_DIR/<profile> with `cargo test` (the CI has it already).
    local target_args=(--target "$target") dir="$CARGO_TARGET_DIR/$target/$profile"
    if [ "$target" = "$(rustc -vV | sed -n 's/^host: //p')" ]; then
        target_args=()
        dir="$CARGO_TARGET_DIR/$profile"
    fi
    # Whether this target/profile's dependencies were built before in this
    # target dir (recorded with the time: a first build compiles all of them).
    # tokio stands for them: a runtime dependency of every binary, never a
    # build-time one (the host's deps/ also holds cross builds' proc macros).
    local kind=first
    if compgen -G "$dir/deps/libtokio-*.rlib" >/dev/null; then kind=incremental; fi
    cargo build "${cargo_profile[@]}" "${target_args[@]}" "${packages[@]}"
    # The shipped agent: size over speed.
    local agent_dir=$dir
    if [ "$profile" = release ]; then
        cargo build --profile device "${target_args[@]}" -p shardline-agent --bin shardline-agent
        agent_dir=${dir%/release}/device
    fi
    t1=$(date +%s)

    out="$DIST/$target/$profile"
    rm -rf "$out"
    mkdir -p "$out/bin"
    local b strip
    strip=$(strip_tool "$target")
    for b in "${bins[@]}"; do
        local from=$dir
        [ "$b" = shardline-agent ] && from=$agent_dir
        install -m 0755 "$from/$b" "$out/bin/$b"
        "$strip" "$out/bin/$b"
    done
    if [ ${#shards[@]} -gt 0 ]; then
        local version id
        version=$(workspace_version)
        mkdir -p "$out/shards"
        local lib
        for s in "${shards[@]}"; do
            lib=${s#* }
            id=${lib#shard_}
            id=${id//_/-}
            install -m 0644 "$dir/lib$lib.so" "$out/shards/$id@$version.so"
            "$strip" "$out/shards/$id@$version.so"
        done
    fi
    echo "== cross/build.sh: $target ($profile) built in $((t1 - t0)) s -> $out"
    BUILD_TIMES+=("$target $profile $((t1 - t0)) s")
    # For cross/sizes.sh (BENCHMARKS.md): the last build time per target/profile.
    echo "$target $profile $((t1 - t0)) $(date -u +%Y-%m-%dT%H:%MZ) $kind" >"$out/build-time"
}

BUILD_TIMES=()
for target in "${targets[@]}"; do
    build_target "$target"
done
echo "== cross/build.sh: build times (wall clock):"
printf '   %s\n' "${BUILD_TIMES[@]}"
