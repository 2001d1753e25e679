#!/usr/bin/env bash
# packaging/test-debs.sh: install and purge the Shardline packages in a clean
# root and check that they leave the expected files and nothing else.
#
#   packaging/test-debs.sh [amd64|arm64|armhf]...   (default: all three)
#
# Builds the packages with `packaging/build-debs.sh --debug` (the layout does
# not depend on the profile, and the CI has the debug builds already), unless
# DEB_DIR names a directory that holds them.
#
# The root is an empty directory with a dpkg database and the base-passwd
# user tables; dpkg runs with --root and --force-script-chrootless, so the
# maintainer scripts run on the host with DPKG_ROOT set (they write only
# below it). Dependencies (libc6, passwd) are not installed in the root
# (--force-depends); the binaries are run from the root afterwards instead.
# Steps per architecture:
#   1. install shardline-agent: exactly the expected files, owners and modes;
#      the user `shardline` (system, nologin); the state directory 0700;
#      the binary runs (under qemu-user for arm64 and armhf) and lists the
#      shards.
#   2. install shardline-allocator next to it: the same checks.
#   3. purge shardline-agent: its files, state and enablement are gone, the
#      allocator's are untouched.
#   4. purge shardline-allocator: the root equals the one before step 1
#      except for the two system users, which stay by design.
# Needs root (file ownership) and dpkg; prints SKIP and exits 0 otherwise.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging/test-debs.sh: SKIP: needs root (packages install root-owned files and chown to the new users)"
    exit 0
fi
for tool in dpkg dpkg-deb useradd; do
    command -v "$tool" >/dev/null || { echo "packaging/test-debs.sh: SKIP: $tool is not installed"; exit 0; }
done

arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64 armhf)
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)

failures=0
fail() { echo "  FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "  ok: $*"; }

# A listing of everything in the root except dpkg's database and the user
# tables (compared separately): path, type, mode, owner, group.
snapshot() {
    (cd "$1" && find . \( -path ./var/lib/dpkg -o -path ./var/log \) -prune -o -print0 |
        sort -z | xargs -0 stat -c '%n %F %a %u %g' |
        grep -Ev '^\./etc/(passwd|group|shadow|gshadow)-? ')
}

make_root() {
    local r=$1 arch=$2
    mkdir -p "$r/etc" "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates" "$r/var/log"
    : >"$r/var/lib/dpkg/status"
    : >"$r/var/lib/dpkg/available"
    if [ -r /usr/share/base-passwd/passwd.master ]; then
        cp /usr/share/base-passwd/passwd.master "$r/etc/passwd"
        cp /usr/share/base-passwd/group.master "$r/etc/group"
    else
        echo 'root:x:0:0:root:/root:/bin/bash' >"$r/etc/passwd"
        echo 'root:x:0:' >"$r/etc/group"
    fi
    awk -F: '{ print $1 ":*:19000:0:99999:7:::" }' "$r/etc/passwd" >"$r/etc/shadow"
    awk -F: '{ print $1 ":*::" }' "$r/etc/group" >"$r/etc/gshadow"
    chmod 0640 "$r/etc/shadow" "$r/etc/gshadow"
    local native
    native=$(dpkg --print-architecture)
    if [ "$arch" != "$native" ]; then
        dpkg --root="$r" --add-architecture "$arch"
    fi
}

dpkg_root() {
    local r=$1; shift
    dpkg --root="$r" --force-script-chrootless --force-depends --no-triggers "$@" \
        >"$r.dpkg.log" 2>&1 || { cat "$r.dpkg.log"; return 1; }
}

# expect ROOT PATH TYPE MODE USER GROUP (user/group as names in ROOT)
expect() {
    local r=$1 p=$2 type=$3 mode=$4 user=$5 group=$6 uid gid got
    uid=$(awk -F: -v u="$user" '$1 == u { print $3 }' "$r/etc/passwd")
    gid=$(awk -F: -v g="$group" '$1 == g { print $3 }' "$r/etc/group")
    if [ ! -e "$r$p" ]; then fail "$p is missing"; return; fi
    got=$(stat -c '%F %a %u %g' "$r$p")
    if [ "$got" = "$type $mode $uid $gid" ]; then
        ok "$p ($type $mode $user:$group)"
    else
        fail "$p is '$got', expected '$type $mode $uid $gid' ($user:$group)"
    fi
}

check_user() {
    local r=$1 user=$2 home=$3 line uid shell
    line=$(grep "^$user:" "$r/etc/passwd" || true)
    if [ -z "$line" ]; then fail "user $user was not created"; return; fi
    uid=$(echo "$line" | cut -d: -f3)
    shell=$(echo "$line" | cut -d: -f7)
    if [ "$uid" -lt 1000 ] && [ "$shell" = /usr/sbin/nologin ] && [ "$(echo "$line" | cut -d: -f6)" = "$home" ]; then
        ok "user $user (system uid $uid, nologin, home $home)"
    else
        fail "user $user: $line (expected a system uid, /usr/sbin/nologin, home $home)"
    fi
    grep -q "^$user:" "$r/etc/group" && ok "group $user" || fail "group $user was not created"
}

# The paths a package added, compared with the expected list.
check_new_paths() {
    local before=$1 after=$2 expected=$3 what=$4 got
    got=$(comm -13 <(cut -d' ' -f1 "$before" | sort) <(cut -d' ' -f1 "$after" | sort))
    if [ "$got" = "$(sort <<<"$expected")" ]; then
        ok "$what added exactly the expected $(wc -l <<<"$got") paths"
    else
        fail "$what added paths that differ from the expected ones:"
        diff <(sort <<<"$expected") <(echo "$got") | sed 's/^/      /' || true
    fi
}

run_in_root() {
    local r=$1 arch=$2; shift 2
    case "$arch" in
        amd64) "$r$1" "${@:2}" ;;
        arm64) qemu-aarch64-static -L /usr/aarch64-linux-gnu "$r$1" "${@:2}" ;;
        armhf) qemu-arm-static -L /usr/arm-linux-gnueabihf "$r$1" "${@:2}" ;;
    esac
}

test_arch() {
    local arch=$1 debs=$2 r base s1 s2 s3 s4 agent_deb alloc_deb
    agent_deb="$debs/shardline-agent_${version}_${arch}.deb"
    alloc_deb="$debs/shardline-allocator_${version}_${arch}.deb"
    echo "== packaging/test-debs.sh: $arch"
    for d in "$agent_deb" "$alloc_deb"; do
        [ -f "$d" ] || { fail "$d was not built"; return; }
    done
    if [ "$arch" = arm64 ] && ! command -v qemu-aarch64-static >/dev/null; then
        echo "  SKIP: running the arm64 binaries: qemu-aarch64-static is not installed"
    fi
    if [ "$arch" = armhf ] && ! command -v qemu-arm-static >/dev/null; then
        echo "  SKIP: running the armhf binaries: qemu-arm-static is not installed"
    fi
    base=$(mktemp -d "${TMPDIR:-/tmp}/shardline-debroot.XXXXXX")
    # Like a real root file system, traversable by every user: shard hosts
    # drop to their own uid before they load a library (SECURITY.md).
    chmod 755 "$base"
    r="$base/root"
    mkdir "$r"
    make_root "$r" "$arch"
    snapshot "$r" >"$base/s0"
    cp "$r/etc/passwd" "$base/passwd0"
    cp "$r/etc/group" "$base/group0"

    # 1. agent
    dpkg_root "$r" -i "$agent_deb" || { fail "dpkg -i $agent_deb"; return; }
    ok "dpkg -i shardline-agent"
    snapshot "$r" >"$base/s1"
    local shards expected_agent p
    shards=$(dpkg-deb -c "$agent_deb" | awk '{print $6}' | grep -E '^\./usr/lib/shardline/shards/.+\.so$' || true)
    if [ -z "$shards" ]; then
        fail "the agent package holds no shards"
    fi
    expected_agent="./usr/bin/shardline-agent
./usr/lib/shardline
./usr/lib/shardline/shards
$shards
./etc/shardline
./etc/shardline/agent.toml
./usr/lib/systemd
./usr/lib/systemd/system
./usr/lib/systemd/system/shardline-agent.service
./usr/share/doc/shardline-agent
./usr/share/doc/shardline-agent/INSTALL.md
./usr/share/doc/shardline-agent/REQUESTS.md
./usr/share/doc/shardline-agent/copyright
./usr
./usr/bin
./usr/lib
./usr/share
./usr/share/doc
./var/lib/shardline"
    check_new_paths "$base/s0" "$base/s1" "$(grep -v '^$' <<<"$expected_agent")" "shardline-agent"
    check_user "$r" shardline /var/lib/shardline
    expect "$r" /usr/bin/shardline-agent "regular file" 755 root root
    for p in $shards; do
        expect "$r" "${p#.}" "regular file" 644 root root
    done
    expect "$r" /etc/shardline/agent.toml "regular file" 640 root shardline
    expect "$r" /usr/lib/systemd/system/shardline-agent.service "regular file" 644 root root
    expect "$r" /var/lib/shardline directory 700 shardline shardline
    if out=$(run_in_root "$r" "$arch" /usr/bin/shardline-agent --version 2>&1); then
        ok "installed agent runs: $out"
    else
        fail "installed agent does not run: $out"
    fi
    # amd64: the operator's command. ARM under qemu: `shards list` probes
    # each file in a child process, an ARM exec that fails without
    # binfmt_misc, so the probe itself (`host --describe`) is run per file.
    if [ "$arch" != amd64 ]; then
        out=""
        for p in $shards; do
            out+="$(basename "$p") $(basename "$p" .so | sed 's/@.*//') describe "
            out+="$(run_in_root "$r" "$arch" /usr/bin/shardline-agent host --describe "$r${p#.}" --shard-dir "$r/usr/lib/shardline/shards" 2>&1 |
                grep -q '"error":null' && echo ok || echo failed)"$'\n'
        done
    fi
    if [ "$arch" != amd64 ] || out=$(run_in_root "$r" "$arch" /usr/bin/shardline-agent shards list "$r/usr/lib/shardline/shards" 2>&1); then
        local n=0 id
        for p in $shards; do
            id=$(basename "$p" .so)
            id=${id%@*}
            grep -qE -- "^$(basename "$p")[[:space:]]+$id[[:space:]].*[[:space:]]ok\$" <<<"$out" && n=$((n + 1))
        done
        if [ "$n" -eq "$(wc -w <<<"$shards")" ]; then
            ok "installed agent lists all $n installed shards"
        else
            fail "agent lists $n of $(wc -w <<<"$shards") shards: $out"
        fi
    else
        fail "shardline-agent shards list failed: $out"
    fi

    # 2. allocator next to it
    dpkg_root "$r" -i "$alloc_deb" || { fail "dpkg -i $alloc_deb"; return; }
    ok "dpkg -i shardline-allocator"
    snapshot "$r" >"$base/s2"
    check_new_paths "$base/s1" "$base/s2" "./usr/bin/shardline-allocator
./usr/bin/shardctl
./etc/shardline/allocator.toml
./etc/shardline/catalog.toml
./etc/shardline/agreements.toml
./usr/lib/systemd/system/shardline-allocator.service
./usr/share/doc/shardline-allocator
./usr/share/doc/shardline-allocator/INSTALL.md
./usr/share/doc/shardline-allocator/copyright
./usr/share/doc/shardline-allocator/mosquitto
./usr/share/doc/shardline-allocator/mosquitto/listener.conf.example
./usr/share/doc/shardline-allocator/mosquitto/shardline.acl
./usr/share/doc/shardline-allocator/mosquitto/shardline.conf
./var/lib/shardline-allocator" "shardline-allocator"
    check_user "$r" shardline-allocator /var/lib/shardline-allocator
    expect "$r" /usr/bin/shardline-allocator "regular file" 755 root root
    expect "$r" /usr/bin/shardctl "regular file" 755 root root
    expect "$r" /etc/shardline/allocator.toml "regular file" 640 root shardline-allocator
    expect "$r" /etc/shardline/catalog.toml "regular file" 644 root root
    expect "$r" /etc/shardline/agreements.toml "regular file" 644 root root
    # The catalog names, for each shard, the digest of this agent package's
    # file under this architecture's name (and those of the other two).
    local so want agent_arch
    case "$arch" in amd64) agent_arch=x86_64 ;; arm64) agent_arch=aarch64 ;; armhf) agent_arch=arm ;; esac
    for so in $shards; do
        want=$(sha256sum "$r${so#.}" | cut -d' ' -f1)
        if grep -qE "^sha256 = \{.*\b$agent_arch = \"$want\"" "$r/etc/shardline/catalog.toml"; then
            ok "catalog carries the $agent_arch digest of $(basename "$so")"
        else
            fail "catalog lacks the $agent_arch digest $want of $(basename "$so")"
        fi
    done
    if grep -E '^sha256 = ' "$r/etc/shardline/catalog.toml" | grep -vqE 'x86_64 = .*aarch64 = .*arm = '; then
        fail "a catalog entry lacks a digest for one of x86_64, aarch64, arm"
    else
        ok "every catalog entry has digests for x86_64, aarch64 and arm"
    fi
    expect "$r" /usr/lib/systemd/system/shardline-allocator.service "regular file" 644 root root
    expect "$r" /var/lib/shardline-allocator directory 700 shardline-allocator shardline-allocator
    for b in shardline-allocator shardctl; do
        if out=$(run_in_root "$r" "$arch" "/usr/bin/$b" --version 2>&1); then
            ok "installed $b runs: $out"
        else
            fail "installed $b does not run: $out"
        fi
    done

    # 3. purge the agent: an operator had enabled it and it had run.
    mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
    ln -s /usr/lib/systemd/system/shardline-agent.service "$r/etc/systemd/system/multi-user.target.wants/shardline-agent.service"
    echo 00 >"$r/var/lib/shardline/device.key"
    dpkg_root "$r" --purge shardline-agent || { fail "dpkg --purge shardline-agent"; return; }
    ok "dpkg --purge shardline-agent"
    rmdir "$r/etc/systemd/system/multi-user.target.wants" "$r/etc/systemd/system" "$r/etc/systemd" 2>/dev/null || true
    snapshot "$r" >"$base/s3"
    # Exactly the allocator's paths remain on top of the clean root.
    check_new_paths "$base/s0" "$base/s3" "$(comm -13 <(cut -d' ' -f1 "$base/s1" | sort) <(cut -d' ' -f1 "$base/s2" | sort))
./etc/shardline
./usr
./usr/bin
./usr/lib
./usr/lib/systemd
./usr/lib/systemd/system
./usr/share
./usr/share/doc" "after purging the agent, what is left"
    if [ -e "$r/etc/systemd/system/multi-user.target.wants/shardline-agent.service" ] || [ -L "$r/etc/systemd/system/multi-user.target.wants/shardline-agent.service" ]; then
        fail "the enablement symlink survived the purge"
    fi

    # 4. purge the allocator: back to the clean root.
    dpkg_root "$r" --purge shardline-allocator || { fail "dpkg --purge shardline-allocator"; return; }
    ok "dpkg --purge shardline-allocator"
    snapshot "$r" >"$base/s4"
    if diff "$base/s0" "$base/s4" >"$base/diff"; then
        ok "after purging both, the root is as before (files, modes, owners)"
    else
        fail "after purging both, the root differs from the clean one:"
        sed 's/^/      /' "$base/diff"
    fi
    local added
    added=$({ diff "$base/passwd0" "$r/etc/passwd" || true; } | grep '^>' | cut -d: -f1 | tr -d '> ' | sort | tr '\n' ' ')
    if [ "$added" = "shardline shardline-allocator " ]; then
        ok "the system users stay after purge (by design): $added"
    else
        fail "user table changes after purge: '$added'"
    fi
    if grep -q . "$r/var/lib/dpkg/status"; then
        fail "dpkg still lists packages after purge: $(grep '^Package' "$r/var/lib/dpkg/status" | tr '\n' ' ')"
    fi
    rm -rf "$base" "$r.dpkg.log"
}

debs="${DEB_DIR:-}"
if [ -z "$debs" ]; then
    debs="$CARGO_TARGET_DIR/debs-test"
    DEB_OUT="$debs" "$repo/packaging/build-debs.sh" --debug "${arches[@]}"
fi
for arch in "${arches[@]}"; do
    test_arch "$arch" "$debs"
done
if [ "$failures" -ne 0 ]; then
    echo "packaging/test-debs.sh: $failures check(s) FAILED"
    exit 1
fi
echo "packaging/test-debs.sh: all checks passed (${arches[*]})"
