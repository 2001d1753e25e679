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
cleanup_only=0
[ "${1:-}" = --cleanup ] && cleanup_only=1
[ "$(id -u)" -eq 0 ] || skip "needs root (packages, network namespaces)"
for tool in dpkg apt-get ip python3 setpriv unshare; do
    command -v "$tool" >/dev/null || skip "$tool is not installed"
done
for p in shardline-agent shardline-allocator; do
    if [ "$cleanup_only" -eq 0 ] && dpkg -s "$p" >/dev/null 2>&1; then
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
if [ -z "$debs" ] && [ "$cleanup_only" -eq 0 ]; then
    debs="$CARGO_TARGET_DIR/debs-acceptance"
    DEB_OUT="$debs" "$repo/packaging/build-debs.sh" --debug amd64 arm64 >/dev/null
fi
agent_deb="$debs/shardline-agent_${version}_amd64.deb"
alloc_deb="$debs/shardline-allocator_${version}_amd64.deb"
arm_deb="$debs/shardline-agent_${version}_arm64.deb"
if [ "$cleanup_only" -eq 0 ]; then
    for d in "$agent_deb" "$alloc_deb"; do
        [ -f "$d" ] || { echo "$me: $d was not built"; exit 1; }
    done
    [ "$with_arm64" -eq 0 ] || [ -f "$arm_deb" ] || { echo "$me: $arm_deb was not built"; exit 1; }
fi

work=$(mktemp -d /tmp/shardline-acceptance.XXXXXX)
chmod 755 "$work"
pids=()
binfmt_registered=0
binfmt_mounted=0

cleanup() {
    set +e
    if [ "${KEEP:-0}" = 1 ]; then
        echo "$me: KEEP=1: everything left running in $work (netns sl-*); run '$0 --cleanup' to remove it"
        return
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    for ns in sl-cloud sl-dev-a sl-dev-b sl-dev-c; do ip netns del "$ns" 2>/dev/null; done
    ip link del sl-br0 2>/dev/null
    if [ "$binfmt_registered" -eq 1 ]; then echo -1 >/proc/sys/fs/binfmt_misc/qemu-aarch64; fi
    if [ "$binfmt_mounted" -eq 1 ]; then umount /proc/sys/fs/binfmt_misc; fi
    apt-get purge -y -qq shardline-agent shardline-allocator >/dev/null 2>&1
    rm -rf "$work"
    # The mount point of the devices' private runtime directories (empty).
    rmdir /run/shardline 2>/dev/null
}
if [ "$cleanup_only" -eq 1 ]; then
    # What a KEEP=1 run left behind.
    pkill -f '^/usr/bin/shardline-allocator run' || true
    pkill -f 'shardline-agent run --config' || true
    rm -rf "$work"
    work=$(ls -d /tmp/shardline-acceptance.* 2>/dev/null | head -n1); work=${work:-/nonexistent}
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && binfmt_registered=1
    mountpoint -q /proc/sys/fs/binfmt_misc && binfmt_mounted=1
    KEEP=0 cleanup
    exit 0
fi
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
# The unit's AmbientCapabilities= (every such line) as setpriv's list
# ("+net_raw,+net_admin,..."), so the agent below gets exactly the unit's.
unit_caps() {
    sed -n 's/^AmbientCapabilities=//p' "/usr/lib/systemd/system/$1.service" \
        | tr -s ' \t' '\n\n' | sed -n 's/^CAP_\(..*\)$/+\1/p' | tr 'A-Z' 'a-z' | paste -sd, -
}

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
D_CAPS=$(unit_caps shardline-agent)
[ -n "$D_CAPS" ] || { echo "$me: no AmbientCapabilities= in the installed shardline-agent.service"; exit 1; }
start_device() {
    local ns=$1 id=$2 shard_dir=$3; shift 3
    local d="$work/$id" token
    mkdir -p "$d"
    cp -a /etc/shardline "$d/etc"
    rm -f "$d/etc/allocator.toml" "$d/etc/catalog.toml" "$d/etc/agreements.toml"
    install -d -m 0700 -o "$D_USER" -g "$D_USER" "$d/state"
    # The unit's RuntimeDirectory=shardline (the local request socket).
    install -d -m 0755 -o "$D_USER" -g "$D_USER" "$d/run"
    token=$(shardctl token create --tier "$TIER" --tenant acme | grep -oE '[0-9a-f]{64}' | head -n1)
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
# A local application that may ask for shards (agent/REQUESTS.md); root acts for it here.
s += '\n[[apps]]\nname = "acceptance"\nuids = [0]\n'
open(path, "w").write(s)
PY
    # The unit: User=, and AmbientCapabilities= as ambient, inheritable and
    # bounding set (read from the installed unit, see unit_caps).
    # shellcheck disable=SC2016
    ip netns exec "$ns" unshare --mount --propagation private sh -c '
        mkdir -p /run/shardline &&
        mount --bind "$1/etc" /etc/shardline && mount --bind "$1/state" /var/lib/shardline &&
        mount --bind "$1/run" /run/shardline || exit 1
        shift; user=$1; caps=$2; shift 2
        exec env "$@" setpriv --reuid "$user" --regid "$user" --init-groups \
            --inh-caps "$caps" --ambient-caps "$caps" --bounding-set "-all,$caps" "$AGENT_BIN" run --config /etc/shardline/agent.toml
    ' sh "$d" "$D_USER" "$D_CAPS" "$@" >"$work/$id.log" 2>&1 &
    pids+=($!)
}
export AGENT_BIN=/usr/bin/shardline-agent
# The two tunnel ends run vpn and qos at once: premium's data budget (6
# units) holds both (vpn 2 + qos 2); standard's 3 holds one of them.
TIER=premium start_device sl-dev-a gw-a /usr/lib/shardline/shards SHARDLINE_LOG=info
TIER=premium start_device sl-dev-b gw-b /usr/lib/shardline/shards SHARDLINE_LOG=info
devices=(gw-a gw-b)
if [ "$with_arm64" -eq 1 ]; then
    AGENT_BIN="$armroot/usr/bin/shardline-agent"
    TIER=standard start_device sl-dev-c gw-c "$armroot/usr/lib/shardline/shards" QEMU_LD_PREFIX=/usr/aarch64-linux-gnu SHARDLINE_UNDER_QEMU=1
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

# --- 5. capabilities from the shipped catalog, carrying traffic ------------------
cat >"$work/traffic.py" <<'PY'
"""The acceptance test's traffic: UDP senders and receivers, and a sniffer."""
import select, socket, struct, sys, time

def recv(port, want, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    s.bind(("127.0.0.1", port))
    got, tos = 0, set()
    end = time.time() + timeout
    print("ready", flush=True)
    while got < want and time.time() < end:
        if not select.select([s], [], [], 0.2)[0]:
            continue
        data, anc, _, _ = s.recvmsg(65535, 64)
        got += 1
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind == socket.IP_TOS:
                tos.add(value[0] >> 2)
    print(f"received {got} dscp {sorted(tos)}", flush=True)

def send(port, count, marker):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        s.sendto(f"{marker}-{i:04d}".encode() + b"." * 100, ("127.0.0.1", port))
        time.sleep(0.02)

def sniff(iface, seconds, marker, port):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.2)
    tunnel, clear = 0, 0
    end = time.time() + seconds
    while time.time() < end:
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if marker.encode() in frame:
            clear += 1
        if len(frame) > 37 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
            if port in (sport, dport):
                tunnel += 1
    print(f"tunnel {tunnel} clear {clear}", flush=True)

mode = sys.argv[1]
if mode == "recv":
    recv(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
elif mode == "send":
    send(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
elif mode == "sniff":
    sniff(sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
PY

# running ID SHARD: the device's last signed report shows SHARD running.
running() {
    shardctl --json device "$1" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
running = [s["id"] for s in d["policy"]["last_qos"]["running_shards"]]
sys.exit(0 if sys.argv[1] in running else 1)' "$2"
}
wait_running() {
    local id=$1 shard=$2 secs=$3
    for _ in $(seq 1 "$secs"); do running "$id" "$shard" && return 0; sleep 1; done
    return 1
}
reputation() { shardctl --json device "$1" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["policy"]["reputation"], 1))'; }

step "per-device shard configuration (INSTALL.md §5)"
# One tunnel between gw-a and gw-b: the allocator makes the pair's secret
# and seals it to each device; the plaintext side of the tunnel is UDP on
# each device's loopback.
if shardctl vpn pair gw-a gw-b --a-endpoint 10.77.0.11:51820 --b-endpoint 10.77.0.12:51820 >"$work/pair.out" 2>&1; then
    ok "vpn pair gw-a gw-b: $(head -c 200 "$work/pair.out")"
else
    fail "shardctl vpn pair: $(cat "$work/pair.out")"
fi
for id in gw-a gw-b; do
    shardctl config set "$id" vpn-tunnel inner_listen=127.0.0.1:7000 inner_forward=127.0.0.1:7001 >/dev/null ||
        fail "config set $id vpn-tunnel"
done
for id in "${devices[@]}"; do
    shardctl config set "$id" qos-shaper listen=127.0.0.1:7100 forward=127.0.0.1:7101 >/dev/null ||
        fail "config set $id qos-shaper"
done
if shardctl config show gw-a >"$work/config.out" 2>&1 && grep -q psk "$work/config.out"; then
    if grep -qE 'psk *[=:] *"?[0-9a-f]{16,}' "$work/config.out"; then
        fail "shardctl config show prints the psk's value"
    else
        ok "config show names the secret psk without its value"
    fi
else
    fail "config show gw-a: $(cat "$work/config.out")"
fi

step "vpn and qos pinned: they run from the shipped catalog"
for id in gw-a gw-b; do shardctl pin "$id" vpn-tunnel >/dev/null || fail "pin $id vpn-tunnel"; done
for id in "${devices[@]}"; do shardctl pin "$id" qos-shaper >/dev/null || fail "pin $id qos-shaper"; done
for id in gw-a gw-b; do
    for shard in vpn-tunnel auth-psk qos-shaper qos-dscp; do
        if wait_running "$id" "$shard" 90; then ok "$id runs $shard"; else
            fail "$id does not run $shard after 90 s"
            shardctl device "$id" | tail -n 15
        fi
    done
done
qemu_overlimit=0
if [ "$with_arm64" -eq 1 ]; then
    # Under qemu-user everything is slower; the same catalog, aarch64 digests.
    # The emulator's own memory counts in the host's RSS (about 29 MiB for
    # the qos host against 11 MiB natively), above the shipped 24 MiB: the
    # agent kills the host at start. That is emulation, not the product, so
    # it is a skip with its reason, after checking the device got the
    # activation with its own digests and was not charged for the failure.
    for shard in qos-shaper qos-dscp; do
        if wait_running gw-c "$shard" 120; then ok "gw-c (aarch64 under qemu) runs $shard"; continue; fi
        if grep -q 'host over its memory limit; killing.*capability="qos"' <(sed 's/\x1b\[[0-9;]*m//g' "$work/gw-c.log"); then
            qemu_overlimit=1
            echo "  SKIP: gw-c runs $shard: under qemu-user the host's RSS includes the emulator's ($(sed 's/\x1b\[[0-9;]*m//g' "$work/gw-c.log" | grep -o 'rss_kib=[0-9]* limit_kib=[0-9]*' | head -n1)); on aarch64 hardware it is native"
        else
            fail "gw-c does not run $shard after 120 s"
            shardctl device gw-c | tail -n 15
        fi
    done
    if [ "$qemu_overlimit" -eq 1 ]; then
        if sed 's/\x1b\[[0-9;]*m//g' "$work/gw-c.log" | grep -q 'LoadRefused\|SHA-256'; then
            fail "gw-c refused a library: the aarch64 digests did not match"
        else
            ok "gw-c accepted the qos activation with the aarch64 digests (no library refused)"
        fi
    fi
fi

step "the vpn tunnel carries traffic between gw-a and gw-b, encrypted"
ip netns exec sl-dev-b python3 "$work/traffic.py" recv 7001 50 30 >"$work/vpn-recv.out" &
recv_pid=$!
python3 "$work/traffic.py" sniff sl-v1 12 SHARDLINE-CLEAR 51820 >"$work/vpn-sniff.out" &
sniff_pid=$!
sleep 1
ip netns exec sl-dev-a python3 "$work/traffic.py" send 7000 50 SHARDLINE-CLEAR
wait "$recv_pid" "$sniff_pid" || true
got=$(grep -oE 'received [0-9]+' "$work/vpn-recv.out" | grep -oE '[0-9]+' || echo 0)
if [ "${got:-0}" -ge 45 ]; then ok "vpn: $got of 50 datagrams crossed the tunnel"; else
    fail "vpn: $got of 50 datagrams crossed the tunnel"
fi
read -r _ tunnel _ clear < "$work/vpn-sniff.out" || true
if [ "${tunnel:-0}" -ge 45 ] && [ "${clear:-1}" -eq 0 ]; then
    ok "on the wire: $tunnel tunnel packets, none with the payload in clear"
else
    fail "on the wire: ${tunnel:-0} tunnel packets, ${clear:-?} with the payload in clear"
fi

step "the qos shaper forwards and marks traffic on every device"
for i in "${!devices[@]}"; do
    id=${devices[$i]}
    if [ "$id" = gw-c ] && [ "$qemu_overlimit" -eq 1 ]; then
        echo "  SKIP: gw-c qos traffic: its qos host is not running under qemu-user (above)"
        continue
    fi
    ns=(sl-dev-a sl-dev-b sl-dev-c); ns=${ns[$i]}
    ip netns exec "$ns" python3 "$work/traffic.py" recv 7101 40 30 >"$work/qos-$id.out" &
    rp=$!
    sleep 1
    ip netns exec "$ns" python3 "$work/traffic.py" send 7100 40 QOS
    wait "$rp" || true
    line=$(cat "$work/qos-$id.out" | tail -n1)
    got=$(grep -oE 'received [0-9]+' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    if [ "${got:-0}" -ge 36 ] && grep -q 'dscp \[46\]' <<<"$line"; then
        ok "$id: qos-shaper forwarded $got of 40, marked DSCP 46 (EF) by qos-dscp"
    else
        fail "$id: qos: $line"
    fi
done

step "an application on gw-a asks for a shard (agent/REQUESTS.md)"
# Through the packaged agent's socket in gw-a's runtime directory, as root
# (any declared application); premium holds 4 compute units, vpn takes 2.
req=(/usr/bin/shardline-agent request --socket "$work/gw-a/run/agent.sock" --app acceptance --instance a1)
if out=$("${req[@]}" --type compute --units 1 --for 20s 2>&1) && [[ $out == granted* ]]; then
    ok "gw-a: $out"
    grant=$(echo "$out" | grep -oE 'grant [0-9]+' | head -n1 | cut -d' ' -f2)
    if out=$("${req[@]}" --release "$grant" --outcome completed 2>&1) && [[ $out == released* ]]; then
        ok "gw-a: $out"
    else
        fail "gw-a: release: $out"
    fi
else
    fail "gw-a: request: $out"
fi
inst=$(shardctl reputation gw-a:acceptance:a1 2>&1)
if echo "$inst" | grep -q "reputation 5[0-9]"; then ok "gw-a:acceptance:a1 $(echo "$inst" | head -n1)"; else
    fail "gw-a:acceptance:a1 standing: $inst"
fi

step "no device was charged for anything"
for id in "${devices[@]}"; do
    rep=$(reputation "$id")
    if python3 -c "import sys; sys.exit(0 if $rep >= 50 else 1)"; then ok "$id reputation $rep"; else
        fail "$id reputation fell to $rep"
        shardctl device "$id" | grep -i -A5 reputation | head -n 12
    fi
done

# --- 6. purge (the cleanup trap stops everything and purges both packages) -----
if [ "$failures" -ne 0 ]; then
    for f in allocator gw-a gw-b gw-c; do
        [ -f "$work/$f.log" ] && { echo "--- last lines of $f.log"; tail -n 15 "$work/$f.log"; }
    done
    echo "$me: $failures check(s) FAILED"
    exit 1
fi
echo "$me: all checks passed (${devices[*]})"
