#!/usr/bin/env bash
# packaging/build-debs.sh: build the Debian packages shardline-agent and
# shardline-allocator with dpkg-deb (no debhelper, no cargo-deb).
#
#   packaging/build-debs.sh [--debug] [--no-build] [amd64|arm64|armhf]...
#
# Default: release binaries for amd64. --debug packages the debug build (the
# CI uses it: same layout, already compiled by the test step). --no-build
# packages what cross/build.sh left in $DIST. The .debs are written to
# $DEB_OUT (default $CARGO_TARGET_DIR/debs) and their paths printed.
#
# The shards are built for all three architectures whatever is packaged:
# the allocator's catalog names one digest per architecture (a fleet mixes
# x86-64, arm64 and armhf routers), and a device is offered only the shards
# built for its own. A missing architecture is a warning with --no-build.
#
# shardline-agent:     /usr/bin/shardline-agent, the shards in
#                      /usr/lib/shardline/shards/<id>@<version>.so,
#                      /etc/shardline/agent.toml (conffile), the unit, the
#                      system user `shardline` (postinst), /var/lib/shardline.
# shardline-allocator: /usr/bin/shardline-allocator, /usr/bin/shardctl,
#                      /etc/shardline/{allocator,catalog,agreements}.toml
#                      (conffiles; the catalog carries the digests of this
#                      build's shards for x86_64, aarch64 and arm), the unit,
#                      the system user `shardline-allocator` (postinst),
#                      /var/lib/shardline-allocator.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
here="$repo/packaging"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
DIST="${DIST:-$CARGO_TARGET_DIR/dist}"
DEB_OUT="${DEB_OUT:-$CARGO_TARGET_DIR/debs}"
export DIST

profile=release
build=1
arches=()
for arg in "$@"; do
    case "$arg" in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        amd64 | arm64 | armhf) arches+=("$arg") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "packaging/build-debs.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
[ ${#arches[@]} -gt 0 ] || arches=(amd64)

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
mkdir -p "$DEB_OUT"

rust_target() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        armhf) echo armv7-unknown-linux-gnueabihf ;;
    esac
}

# The architecture name an agent reports (Rust's std::env::consts::ARCH),
# which keys the catalog's digests.
agent_arch() {
    case "$1" in
        amd64) echo x86_64 ;;
        arm64) echo aarch64 ;;
        armhf) echo arm ;;
    esac
}

objdump_for() {
    case "$1" in
        amd64) echo objdump ;;
        arm64) echo aarch64-linux-gnu-objdump ;;
        armhf) echo arm-linux-gnueabihf-objdump ;;
    esac
}

# Depends: from the ELF files' NEEDED entries and the newest glibc symbol
# version they use; anything but glibc and libgcc_s is an error (the
# workspace is pure Rust plus ring, so nothing else may appear).
elf_depends() {
    local arch=$1; shift
    local od glibc lib need_gcc=0
    od=$(objdump_for "$arch")
    for lib in $("$od" -p "$@" | awk '/NEEDED/ {print $2}' | sort -u); do
        case "$lib" in
            libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux*) ;;
            libgcc_s.so.1) need_gcc=1 ;;
            *) echo "packaging/build-debs.sh: unexpected shared library $lib in $*" >&2; return 1 ;;
        esac
    done
    glibc=$("$od" -T "$@" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    local dep="libc6 (>= ${glibc:-2.31})"
    [ "$need_gcc" -eq 1 ] && dep="$dep, libgcc-s1"
    echo "$dep"
}

# catalog_with_digests CATALOG: the catalog with each [[shard]]'s `sha256`
# line replaced by an inline table of the digests of
# $DIST/<target>/$profile/shards/<id>@<version>.so for every architecture
# built, keyed by the name the agent reports (x86_64, aarch64, arm). A
# shard built for no architecture keeps its placeholder, with a warning.
catalog_with_digests() {
    local catalog=$1 sums="" deb_arch target f
    for deb_arch in amd64 arm64 armhf; do
        target=$(rust_target "$deb_arch")
        for f in "$DIST/$target/$profile/shards"/*.so; do
            [ -f "$f" ] || continue
            sums+="$(basename "$f" .so) $(agent_arch "$deb_arch") $(sha256sum "$f" | cut -d' ' -f1)"$'\n'
        done
    done
    SUMS="$sums" awk '
        BEGIN {
            n = split(ENVIRON["SUMS"], lines, "\n")
            for (i = 1; i <= n; i++) {
                split(lines[i], f, " ")
                if (f[1] == "") continue
                sep = (f[1] in d) ? ", " : ""
                d[f[1]] = d[f[1]] sep f[2] " = \"" f[3] "\""
            }
        }
        /^\[\[shard\]\]/ { id = ""; ver = "" }
        /^id *= *"/ { id = $0; sub(/^id *= *"/, "", id); sub(/".*/, "", id) }
        /^version *= *"/ { ver = $0; sub(/^version *= *"/, "", ver); sub(/".*/, "", ver) }
        /^sha256 *= */ {
            key = id "@" ver
            if (key in d) { print "sha256 = { " d[key] " }"; next }
            print "packaging/build-debs.sh: warning: no shard file for " key ", its catalog digest stays a placeholder" > "/dev/stderr"
        }
        { print }' "$catalog"
}

# build_pkg NAME ARCH STAGING EXTRA_DEPENDS SUMMARY LONG_DESCRIPTION
build_pkg() {
    local name=$1 arch=$2 staging=$3 extra=$4 summary=$5 long=$6
    local depends deb size
    mkdir -p "$staging/DEBIAN" "$staging/usr/share/doc/$name"
    install -m 0644 "$here/INSTALL.md" "$staging/usr/share/doc/$name/INSTALL.md"
    install -m 0644 "$here/debian/copyright" "$staging/usr/share/doc/$name/copyright"
    local script
    for script in postinst prerm postrm; do
        if [ -e "$here/debian/$name.$script" ]; then
            install -m 0755 "$here/debian/$name.$script" "$staging/DEBIAN/$script"
        fi
    done
    (cd "$staging" && find etc -type f 2>/dev/null | sed 's|^|/|' | sort) >"$staging/DEBIAN/conffiles"
    [ -s "$staging/DEBIAN/conffiles" ] || rm -f "$staging/DEBIAN/conffiles"
    mapfile -t elves < <(find "$staging/usr" -type f \( -perm -0100 -o -name '*.so' \) | sort)
    depends=$(elf_depends "$arch" "${elves[@]}")
    size=$(du -sk --exclude=DEBIAN "$staging" | cut -f1)
    cat >"$staging/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: Shardline team <shardline@example.invalid>
Installed-Size: $size
Depends: $depends, $extra
Section: net
Priority: optional
Homepage: https://example.invalid/shardline
Description: $summary
$long
CONTROL
    (cd "$staging" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$staging/DEBIAN/md5sums"
    deb="$DEB_OUT/${name}_${version}_${arch}.deb"
    # xz for release packages; the --debug ones exist for tests, where gzip
    # at level 1 saves most of the time xz takes on unoptimised binaries.
    local z=(-Zxz)
    [ "$profile" = debug ] && z=(-Zgzip -z1)
    dpkg-deb --root-owner-group "${z[@]}" --build "$staging" "$deb" >/dev/null
    echo "$deb"
}

if [ "$build" -eq 1 ]; then
    flag=()
    [ "$profile" = release ] && flag=(--release)
    "$repo/cross/build.sh" "${flag[@]}" $(for a in amd64 arm64 armhf; do rust_target "$a"; done) >&2
fi
for a in amd64 arm64 armhf; do
    compgen -G "$DIST/$(rust_target "$a")/$profile/shards/*.so" >/dev/null ||
        echo "packaging/build-debs.sh: warning: no $a shards in $DIST: the catalog has no $(agent_arch "$a") digests" >&2
done

for arch in "${arches[@]}"; do
    target=$(rust_target "$arch")
    src="$DIST/$target/$profile"
    for b in shardline-agent shardline-allocator shardctl; do
        [ -x "$src/bin/$b" ] || { echo "packaging/build-debs.sh: $src/bin/$b is missing (run cross/build.sh)" >&2; exit 1; }
    done
    work=$(mktemp -d "${TMPDIR:-/tmp}/shardline-debs.XXXXXX")
    trap 'rm -rf "$work"' EXIT

    # --- shardline-agent ---------------------------------------------------
    s="$work/agent"
    install -D -m 0755 "$src/bin/shardline-agent" "$s/usr/bin/shardline-agent"
    install -d -m 0755 "$s/usr/lib/shardline/shards"
    if compgen -G "$src/shards/*.so" >/dev/null; then
        install -m 0644 "$src"/shards/*.so "$s/usr/lib/shardline/shards/"
    else
        echo "packaging/build-debs.sh: warning: no shards in $src/shards" >&2
    fi
    install -D -m 0644 "$here/config/agent.toml" "$s/etc/shardline/agent.toml"
    # The local request socket's protocol, which applications are written against.
    install -D -m 0644 "$repo/agent/REQUESTS.md" "$s/usr/share/doc/shardline-agent/REQUESTS.md"
    install -D -m 0644 "$repo/systemd/shardline-agent.service" "$s/usr/lib/systemd/system/shardline-agent.service"
    # passwd: useradd in postinst; procps: /bin/kill for ExecReload;
    # nftables: the kernel-side cap on a shard host's declared bandwidth.
    build_pkg shardline-agent "$arch" "$s" "passwd, procps, nftables" \
        "Shardline device agent (QoS telemetry, capability shards)" \
" The Shardline agent runs on a router or gateway: it watches traffic at
 packet level, reports the quality of service it needs to the fleet's
 allocator over MQTT, and runs the capability shards (VPN tunnel, crypto,
 authentication, QoS shaping and marking) the allocator tells it to run,
 each in a sandboxed host process with resource limits.
 .
 This package holds the agent, the shard catalog, a default configuration
 and a hardened systemd unit."

    # --- shardline-allocator -----------------------------------------------
    s="$work/allocator"
    install -D -m 0755 "$src/bin/shardline-allocator" "$s/usr/bin/shardline-allocator"
    install -D -m 0755 "$src/bin/shardctl" "$s/usr/bin/shardctl"
    install -D -m 0644 "$here/config/allocator.toml" "$s/etc/shardline/allocator.toml"
    # The shard catalog with the SHA-256 of the shards in the agent packages
    # of every architecture: a device refuses a shard whose digest differs
    # from the one in the signed instruction.
    catalog_with_digests "$repo/allocator/catalog/catalog.toml" >"$s/etc/shardline/catalog.toml"
    install -m 0644 "$repo/allocator/catalog/tiers.toml" "$s/etc/shardline/agreements.toml"
    install -D -m 0644 "$repo/systemd/shardline-allocator.service" "$s/usr/lib/systemd/system/shardline-allocator.service"
    # The fleet broker's settings (size cap, logins, ACL), for operators
    # running mosquitto instead of the embedded broker: SECURITY.md.
    for f in shardline.conf shardline.acl listener.conf.example; do
        install -D -m 0644 "$here/mosquitto/$f" "$s/usr/share/doc/shardline-allocator/mosquitto/$f"
    done
    # procps: /bin/kill for ExecReload (catalog reload).
    build_pkg shardline-allocator "$arch" "$s" "passwd, procps" \
        "Shardline allocator (fleet policy, signed instructions)" \
" The Shardline allocator runs in the cloud for an operator's fleet: it
 receives QoS reports, decides per device which capability shards run with
 which resource limits, and pushes signed instructions back. One process
 holds an embedded MQTT broker and store; shardctl is its operator CLI.
 .
 This package holds the allocator, shardctl, a default configuration and a
 hardened systemd unit."
    rm -rf "$work"
    trap - EXIT
done
