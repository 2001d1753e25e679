#!/bin/sh
# cross/setup.sh: install what cross/build.sh, cross/test-aarch64.sh and
# packaging/ need on a fresh Debian/Ubuntu machine: the ARM cross linkers
# and C libraries, binutils for stripping and objdump, qemu-user, and the
# rust targets (dpkg-deb, useradd and sha256sum are in every Debian base). Idempotent and quiet: installs only what is missing, prints one
# line per action. As non-root it installs nothing and lists what is missing
# (exit 1 if anything is).
set -eu

# package:file that proves it is installed
pkgs="gcc-aarch64-linux-gnu:/usr/bin/aarch64-linux-gnu-gcc
gcc-arm-linux-gnueabihf:/usr/bin/arm-linux-gnueabihf-gcc
libc6-dev-arm64-cross:/usr/aarch64-linux-gnu/lib/crt1.o
libc6-dev-armhf-cross:/usr/arm-linux-gnueabihf/lib/crt1.o
binutils-aarch64-linux-gnu:/usr/bin/aarch64-linux-gnu-strip
binutils-arm-linux-gnueabihf:/usr/bin/arm-linux-gnueabihf-strip
qemu-user-static:/usr/bin/qemu-aarch64-static"
targets="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl"

missing=""
for entry in $pkgs; do
    [ -e "${entry#*:}" ] || missing="$missing ${entry%%:*}"
done

rc=0
if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "cross/setup.sh: apt-get install$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "cross/setup.sh: missing (run as root to install):$missing" >&2
        rc=1
    fi
fi

if command -v rustup >/dev/null 2>&1; then
    installed=$(rustup target list --installed)
    for t in $targets; do
        if ! printf '%s\n' "$installed" | grep -qx "$t"; then
            echo "cross/setup.sh: rustup target add $t"
            rustup target add "$t" >/dev/null 2>&1 || { echo "cross/setup.sh: rustup target add $t failed" >&2; rc=1; }
        fi
    done
else
    echo "cross/setup.sh: rustup not found; add the targets $targets by hand" >&2
    rc=1
fi

[ "$rc" -eq 0 ] && echo "cross/setup.sh: everything is installed"
exit "$rc"
