#!/usr/bin/env bash
# packaging/acceptance.sh: a new operator's fleet, built from the packages
# exactly as packaging/INSTALL.md says, and checked end to end.
#
#   packaging/acceptance.sh
#
# What it does, as the operator would (no test-kit overrides: the shipped
# catalog, tiers and configuration files, edited only where INSTALL.md says):
#   1. `apt-get install ./shardline-allocator_*.deb ./shardline-agent_*.deb`
#      (amd64) on this host, and the arm64 agent package unpacked for a third
#      device that runs under qemu-user (binfmt_misc, registered for the test
#      and removed afterwards).
#   2. A "cloud" network namespace and three device namespaces on one
#      bridge. This host has no systemd as PID 1, so each service is started
#      with its unit's ExecStart=, User= and capabilities; each agent gets
#      its own /etc/shardline and /var/lib/shardline through a private mount
#      namespace, as on its own router.
#   3. The allocator: signing key as the service user, the broker listening
#      on the cloud address, check-config, start.
#   4. Every device enrols itself with a bootstrap token (`shardctl token
#      create --tier standard --tenant acme`), pinning the allocator's key.
#   5. Per-device shard configuration (`shardctl vpn pair`, `shardctl
#      config set`), then vpn and qos pinned on the devices: the capabilities
#      run from the shipped catalog with the digests for each device's
#      architecture, the vpn tunnel carries UDP between the two amd64
#      devices (nothing of the payload in clear on the wire), the qos shaper
#      forwards and marks traffic on every device, and no device lost
#      reputation.
#   6. Everything is stopped and both packages are purged.
#
# Needs root, dpkg/apt, iproute2, python3 and, for the arm64 device,
# qemu-aarch64-static and the aarch64 cross libc (cross/setup.sh). Each
# missing prerequisite is a SKIP with its reason; an existing Shardline
# installation on this host is a SKIP too (the test never touches it).
# Packages: packaging/build-debs.sh --debug amd64 arm64, or DEB_DIR.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
me="packaging/acceptance.sh"

skip() { echo "$me: SKIP: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "needs root (packages, network namespaces)"
for tool in dpkg apt-get ip python3 setpriv unshare; do
    command -v "$tool" >/dev/null || skip "$tool is not installed"
done
for p in shardline-agent shardline-allocator; do
    if dpkg -s "$p" >/dev/null 2>&1; then
        skip "$p is installed on this host; the test installs and purges its own copy and will not touch an existing one"
    fi
done
with_arm64=1
if ! command -v qemu-aarch64-static >/dev/null || [ ! -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ]; then
    echo "$me: SKIP (arm64 device only): qemu-aarch64-static or the aarch64 libc is missing (cross/setup.sh)"
    with_arm64=0
fi

failures=0
fail() { echo "  FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "  ok: $*"; }
step() { echo "== $me: $*"; }

debs="${DEB_DIR:-}"
if [ -z "$debs" ]; then
    debs="$CARGO_TARGET_DIR/debs-acceptance"
    DEB_OUT="$debs" "$repo/packaging/build-debs.sh" --debug amd64 arm64 >/dev/null
fi
agent_deb="$debs/shardline-agent_${version}_amd64.deb"
alloc_deb="$debs/shardline-allocator_${version}_amd64.deb"
arm_deb="$debs/shardline-agent_${version}_arm64.deb"
for d in "$agent_deb" "$alloc_deb"; do
    [ -f "$d" ] || { echo "$me: $d was not built"; exit 1; }
done
[ "$with_arm64" -eq 0 ] || [ -f "$arm_deb" ] || { echo "$me: $arm_deb was not built"; exit 1; }

work=$(mktemp -d /tmp/shardline-acceptance.XXXXXX)
chmod 755 "$work"
pids=()
binfmt_registered=0
binfmt_mounted=0

cleanup() {
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    for ns in sl-cloud sl-dev-a sl-dev-b sl-dev-c; do ip netns del "$ns" 2>/dev/null; done
    ip link del sl-br0 2>/dev/null
    if [ "$binfmt_registered" -eq 1 ]; then echo -1 >/proc/sys/fs/binfmt_misc/qemu-aarch64; fi
    if [ "$binfmt_mounted" -eq 1 ]; then umount /proc/sys/fs/binfmt_misc; fi
    if [ "${KEEP:-0}" != 1 ]; then
        apt-get purge -y -qq shardline-agent shardline-allocator >/dev/null 2>&1
        rm -rf "$work"
    else
        echo "$me: KEEP=1: left $work and the packages installed"
    fi
}
trap cleanup EXIT

# --- 1. install --------------------------------------------------------------
step "install the packages (apt-get install ./…deb)"
cp "$agent_deb" "$alloc_deb" "$work/"
if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$work/$(basename "$alloc_deb")" "$work/$(basename "$agent_deb")" >"$work/apt.log" 2>&1; then
    ok "shardline-allocator and shardline-agent installed"
else
    cat "$work/apt.log"; echo "$me: apt-get install failed"; exit 1
fi
if [ "$with_arm64" -eq 1 ]; then
    # The arm64 package cannot be installed beside the amd64 one on this
    # host (same package, another architecture): unpacked as dpkg would.
    armroot="$work/arm64"
    dpkg-deb -x "$arm_deb" "$armroot"
    chown -R root:root "$armroot"
    chmod 755 "$armroot"
    ok "shardline-agent (arm64) unpacked in $armroot"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && binfmt_mounted=1
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        if [ -r /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
            cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register && binfmt_registered=1
        fi
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        echo "$me: SKIP (arm64 device only): qemu-aarch64 could not be registered with binfmt_misc"
        with_arm64=0
    fi
fi

# --- 2. networks ---------------------------------------------------------------
step "network: cloud 10.77.0.1, devices 10.77.0.11-13 on one bridge"
ip link add sl-br0 type bridge
ip link set sl-br0 up
n=0
for ns in sl-cloud sl-dev-a sl-dev-b sl-dev-c; do
    ip netns add "$ns"
    ip link add "sl-v$n" type veth peer name eth0 netns "$ns"
    ip link set "sl-v$n" master sl-br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    n=$((n + 1))
done
ip -n sl-cloud addr add 10.77.0.1/24 dev eth0
ip -n sl-dev-a addr add 10.77.0.11/24 dev eth0
ip -n sl-dev-b addr add 10.77.0.12/24 dev eth0
ip -n sl-dev-c addr add 10.77.0.13/24 dev eth0
# Bridged frames are not run through the host's iptables.
sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true

# The unit's ExecStart= and User= (what systemd would run).
unit_exec() { sed -n 's/^ExecStart=//p' "/usr/lib/systemd/system/$1.service"; }
unit_user() { sed -n 's/^User=//p' "/usr/lib/systemd/system/$1.service"; }

# --- 3. the allocator ------------------------------------------------------------
step "allocator: key, configuration, check-config, start (as INSTALL.md §1)"
A_USER=$(unit_user shardline-allocator)
runuser -u "$A_USER" -- shardline-allocator keygen --out /var/lib/shardline-allocator/signing.key >/dev/null
pubkey=$(cat /var/lib/shardline-allocator/signing.key.pub)
# INSTALL.md: "set [broker] listen to a public address".
sed -i 's/^listen = "127.0.0.1:1883"/listen = "10.77.0.1:1883"/' /etc/shardline/allocator.toml
if out=$(ip netns exec sl-cloud runuser -u "$A_USER" -- shardline-allocator check-config 2>&1); then
    ok "check-config: $(echo "$out" | tail -n1)"
else
    fail "check-config: $out"
fi
# shellcheck disable=SC2046
ip netns exec sl-cloud setpriv --reuid "$A_USER" --regid "$A_USER" --init-groups \
    $(unit_exec shardline-allocator) >"$work/allocator.log" 2>&1 &
pids+=($!)
shardctl() { ip netns exec sl-cloud /usr/bin/shardctl --token-file /var/lib/shardline-allocator/api-token "$@"; }
for _ in $(seq 1 100); do
    shardctl devices >/dev/null 2>&1 && break
    sleep 0.2
done
if shardctl devices >/dev/null 2>&1; then ok "allocator up, API answers"; else
    fail "allocator API does not answer"; tail -20 "$work/allocator.log"; exit 1
fi

# --- 4. devices ------------------------------------------------------------------
# start_device NS ID SHARD_DIR [ENV...]: the agent $AGENT_BIN with its own
# /etc/shardline and /var/lib/shardline (copies of what the package
# installed), configured as INSTALL.md §2, enrolling with a token (§3).
D_USER=$(unit_user shardline-agent)
start_device() {
    local ns=$1 id=$2 shard_dir=$3; shift 3
    local d="$work/$id" token
    mkdir -p "$d"
    cp -a /etc/shardline "$d/etc"
    rm -f "$d/etc/allocator.toml" "$d/etc/catalog.toml" "$d/etc/agreements.toml"
    install -d -m 0700 -o "$D_USER" -g "$D_USER" "$d/state"
    token=$(shardctl token create --tier standard --tenant acme | grep -oE '[0-9a-f]{64}' | head -n1)
    [ -n "$token" ] || { fail "$id: no bootstrap token"; return 1; }
    echo "$token" | install -m 0600 -o "$D_USER" /dev/stdin "$d/etc/enroll-token"
    python3 - "$d/etc/agent.toml" "$id" "$pubkey" "$shard_dir" <<'PY'
import re, sys
path, dev, key, shard_dir = sys.argv[1:]
s = open(path).read()
s = re.sub(r'(?m)^id = ".*"', f'id = "{dev}"', s)
s = re.sub(r'(?m)^keys = \[.*\]', f'keys = ["{key}"]', s)
s = re.sub(r'(?m)^url = ".*"', 'url = "mqtt://10.77.0.1:1883"', s)
s = re.sub(r'(?m)^dir = "/usr/lib/shardline/shards"', f'dir = "{shard_dir}"', s)
s = re.sub(r'(?m)^\[allocator\]', '[allocator]\nenroll_token_file = "/etc/shardline/enroll-token"', s, count=1)
open(path, "w").write(s)
PY
    # The unit: User=shardline, AmbientCapabilities=CAP_NET_RAW.
    # shellcheck disable=SC2016
    ip netns exec "$ns" unshare --mount --propagation private sh -c '
        mount --bind "$1/etc" /etc/shardline && mount --bind "$1/state" /var/lib/shardline || exit 1
        shift; user=$1; shift
        exec env "$@" setpriv --reuid "$user" --regid "$user" --init-groups \
            --inh-caps +net_raw --ambient-caps +net_raw --bounding-set -all,+net_raw "$AGENT_BIN" run --config /etc/shardline/agent.toml
    ' sh "$d" "$D_USER" "$@" >"$work/$id.log" 2>&1 &
    pids+=($!)
}
export AGENT_BIN=/usr/bin/shardline-agent
start_device sl-dev-a gw-a /usr/lib/shardline/shards SHARDLINE_LOG=info
start_device sl-dev-b gw-b /usr/lib/shardline/shards SHARDLINE_LOG=info
devices=(gw-a gw-b)
if [ "$with_arm64" -eq 1 ]; then
    AGENT_BIN="$armroot/usr/bin/shardline-agent"
    start_device sl-dev-c gw-c "$armroot/usr/lib/shardline/shards" QEMU_LD_PREFIX=/usr/aarch64-linux-gnu SHARDLINE_UNDER_QEMU=1
    devices+=(gw-c)
fi

step "enrolment by bootstrap token"
enrolled() { shardctl --json device "$1" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d.get("last_report_ms") or d.get("last_report") else 1)'; }
for id in "${devices[@]}"; do
    for _ in $(seq 1 120); do enrolled "$id" && break; sleep 1; done
    if enrolled "$id"; then ok "$id enrolled and reporting"; else
        fail "$id did not enrol and report within 120 s"; tail -20 "$work/$id.log"
    fi
done

echo "$me: $failures failure(s) so far"
[ "$failures" -eq 0 ] || exit 1
