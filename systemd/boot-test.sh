#!/usr/bin/env bash
# systemd/boot-test.sh: boot a real systemd (Debian 12 in systemd-nspawn),
# install the amd64 packages there with dpkg (maintainer scripts chrooted
# as on a real machine), start both hardened units and check that they run
# under their sandbox: READY=1 reaches systemd (Type=notify), watchdog pings
# keep them alive past WatchdogSec, no restarts, the agent holds exactly
# its unit's capabilities (CAP_NET_RAW, CAP_NET_ADMIN, CAP_SETUID,
# CAP_SETGID, CAP_SETPCAP), seccomp and no_new_privs are on, the state directories belong
# to the service users, and `systemd-analyze security` agrees on the live
# units. Then purge both packages inside the container.
#
#   systemd/boot-test.sh
#
# Needs root, systemd-nspawn (systemd-container) and debootstrap; the
# container root is made once with debootstrap (network; ~2 min) and kept in
# $SHARDLINE_NSPAWN_ROOT (default ~/.cache/shardline/nspawn-bookworm). Skips
# with the reason printed when a prerequisite is missing. Not part of the
# CI (it downloads a Debian base system); run it after changing a unit.
# Packages: packaging/build-debs.sh --debug amd64, or DEB_DIR.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
root="${SHARDLINE_NSPAWN_ROOT:-$HOME/.cache/shardline/nspawn-bookworm}"
hold=${BOOT_TEST_HOLD_S:-40}

skip() { echo "systemd/boot-test.sh: SKIP: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "needs root (systemd-nspawn)"
command -v systemd-nspawn >/dev/null || skip "systemd-nspawn is not installed (apt-get install systemd-container)"

if [ ! -x "$root/lib/systemd/systemd" ]; then
    command -v debootstrap >/dev/null || skip "debootstrap is not installed (apt-get install debootstrap)"
    echo "systemd/boot-test.sh: debootstrap bookworm into $root"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,procps \
        bookworm "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 ||
        { tail -20 "$root.debootstrap.log"; exit 1; }
fi

# The packages' dependencies beyond minbase (a root made by an older
# version of this script may lack them).
if [ ! -x "$root/bin/kill" ]; then
    chroot "$root" apt-get install -y -qq --no-install-recommends procps >/dev/null
fi

debs="${DEB_DIR:-}"
if [ -z "$debs" ]; then
    debs="$CARGO_TARGET_DIR/debs-boot-test"
    DEB_OUT="$debs" "$repo/packaging/build-debs.sh" --debug amd64 >/dev/null
fi
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)

t="$root/shardline-selftest"
rm -rf "$t"
mkdir -p "$t"
cp "$debs/shardline-agent_${version}_amd64.deb" "$debs/shardline-allocator_${version}_amd64.deb" "$t/"

# --- what runs inside, as a oneshot unit after boot ----------------------------
cat >"$t/selftest.sh" <<'INNER'
#!/bin/bash
# Runs inside the container; writes PASS/FAIL lines to /shardline-selftest/result.
set -u
cd /shardline-selftest
res=/shardline-selftest/result
: >"$res"
pass() { echo "PASS $*" >>"$res"; }
fail() { echo "FAIL $*" >>"$res"; }
trap 'systemctl --no-block poweroff' EXIT
hold=$(cat hold)

if dpkg -i ./shardline-allocator_*.deb ./shardline-agent_*.deb >dpkg-install.log 2>&1; then
    pass "dpkg -i both packages (chrooted maintainer scripts)"
else
    fail "dpkg -i: $(tail -5 dpkg-install.log | tr '\n' ' ')"; exit 0
fi
getent passwd shardline >/dev/null && getent passwd shardline-allocator >/dev/null &&
    pass "system users exist" || fail "system users missing"

# Allocator: signing key as the service user, API on loopback.
runuser -u shardline-allocator -- shardline-allocator keygen --out /var/lib/shardline-allocator/signing.key >keygen.log 2>&1 ||
    fail "keygen: $(cat keygen.log)"
pub=$(tr -d ' \n' </var/lib/shardline-allocator/signing.key.pub 2>/dev/null || true)

check_unit() {
    local unit=$1 bin=$2 caps=$3 pid status
    if systemctl start "$unit" 2>start.err; then
        pass "$unit: systemctl start returned (READY=1 received)"
    else
        fail "$unit: start failed: $(cat start.err)"
        journalctl -b -u "$unit" --no-pager -n 30 >>"$res" 2>&1
        return
    fi
    sleep "$hold"
    local state
    state=$(systemctl show -p ActiveState -p SubState -p NRestarts -p Result "$unit" | sort | tr '\n' ' ')
    if [ "$state" = "ActiveState=active NRestarts=0 Result=success SubState=running " ]; then
        pass "$unit: still active after ${hold}s, no restart, watchdog fed ($state)"
    else
        fail "$unit: after ${hold}s: $state"
        journalctl -b -u "$unit" --no-pager -n 30 >>"$res" 2>&1
    fi
    pid=$(systemctl show -p MainPID --value "$unit")
    if [ "$pid" -gt 0 ] 2>/dev/null; then
        status=$(cat "/proc/$pid/status")
        local eff nnp sec user
        eff=$(awk '/^CapEff/ {print $2}' <<<"$status")
        nnp=$(awk '/^NoNewPrivs/ {print $2}' <<<"$status")
        sec=$(awk '/^Seccomp:/ {print $2}' <<<"$status")
        user=$(getent passwd "$(awk '/^Uid:/ {print $3}' <<<"$status")" | cut -d: -f1)
        [ "$eff" = "$caps" ] && pass "$unit: effective capabilities $eff" || fail "$unit: effective capabilities $eff, expected $caps"
        [ "$nnp" = 1 ] && pass "$unit: no_new_privs" || fail "$unit: NoNewPrivs=$nnp"
        [ "$sec" = 2 ] && pass "$unit: seccomp filter active" || fail "$unit: Seccomp=$sec"
        [ "$user" = "$bin" ] && pass "$unit: runs as $user" || fail "$unit: runs as $user, expected $bin"
    fi
    local score
    score=$(systemd-analyze security "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    echo "INFO $unit: live exposure $score" >>"$res"
    journalctl -b -u "$unit" --no-pager -o cat | grep -iE 'denied|not permitted|seccomp|panicked' | head -5 | sed "s/^/INFO $unit journal: /" >>"$res" || true
}

check_unit shardline-allocator.service shardline-allocator 0000000000000000

# Agent: pinned allocator key, the embedded broker on loopback, capture on lo.
sed -i -e 's/^id = "CHANGE-ME"/id = "boot-test-1"/' \
    -e "s/^keys = \[\]/keys = [\"$pub\"]/" \
    -e 's#^url = .*#url = "mqtt://127.0.0.1:1883"#' \
    -e 's/^interfaces = .*/interfaces = ["lo"]/' /etc/shardline/agent.toml
if runuser -u shardline -- shardline-agent check-config --config /etc/shardline/agent.toml >check.log 2>&1; then
    pass "shardline-agent check-config as the service user"
else
    fail "check-config: $(cat check.log)"
fi
devpub=$(runuser -u shardline -- shardline-agent check-config --print-pubkey 2>/dev/null || true)
[ -n "$devpub" ] && echo "INFO device public key $devpub" >>"$res"
# NET_RAW 13, NET_ADMIN 12, SETPCAP 8, SETUID 7, SETGID 6 (issue 15: shard
# hosts take a dedicated uid, nft caps their bandwidth).
check_unit shardline-agent.service shardline 00000000000031e0
if systemctl reload shardline-agent.service 2>reload.err && sleep 2 &&
    [ "$(systemctl show -p ActiveState -p NRestarts shardline-agent.service | sort | tr '\n' ' ')" = "ActiveState=active NRestarts=0 " ] &&
    journalctl -b -u shardline-agent --no-pager -o cat | grep -q 'configuration reloaded'; then
    pass "shardline-agent.service: systemctl reload (SIGHUP) re-read the configuration, still active"
else
    fail "shardline-agent.service: reload: $(cat reload.err) $(systemctl show -p ActiveState -p NRestarts shardline-agent.service | tr '\n' ' ')"
fi

# A shard host under the agent's sandbox: enrol the device, pin a shard, and
# wait for the agent to start a host process (a re-execution of itself that
# sets rlimits and niceness, then loads the shard) that stays up.
token=/var/lib/shardline-allocator/api-token
ctl() { shardctl --token-file "$token" "$@"; }
if ctl enroll --tier standard boot-test-1 "$devpub" >enroll.log 2>&1 && ctl pin boot-test-1 qos-dscp >>enroll.log 2>&1; then
    pass "shardctl enroll + pin qos-dscp"
else
    fail "shardctl: $(tr '\n' ' ' <enroll.log)"
fi
# The host may live only briefly (a shard refusing its configuration is
# stopped), so the agent's journal is the witness: a host was spawned, and
# nothing was refused by the sandbox (EPERM from the syscall filter or a
# missing capability, SIGSYS).
spawned=""
for _ in $(seq 1 60); do
    spawned=$(journalctl -b -u shardline-agent --no-pager -o cat | grep 'shard host spawned' | head -n1 || true)
    [ -n "$spawned" ] && break
    sleep 1
done
sleep 3
if [ -n "$spawned" ]; then
    pass "the agent spawned a shard host under its sandbox: $(sed 's/\x1b\[[0-9;]*m//g' <<<"$spawned")"
else
    fail "no shard host was spawned within 60 s"
fi
refused=$(journalctl -b -u shardline-agent --no-pager -o cat | grep -iE 'not permitted|permission denied|bad system call|SIGSYS|seccomp' || true)
if [ -z "$refused" ]; then
    pass "no sandbox refusal in the agent's journal"
else
    fail "sandbox refusals: $(head -3 <<<"$refused" | tr '\n' ' ')"
fi
ctl device boot-test-1 2>&1 | head -20 | sed 's/^/INFO shardctl device: /' >>"$res"
journalctl -b -u shardline-agent --no-pager -o cat | grep -iE 'host|shard|instruction' | tail -15 | sed 's/\x1b\[[0-9;]*m//g; s/^/INFO agent: /' >>"$res"
stat -c '%U:%G %a' /var/lib/shardline /var/lib/shardline-allocator | tr '\n' ' ' | sed 's/^/INFO state dirs: /' >>"$res"; echo >>"$res"

systemctl stop shardline-agent.service shardline-allocator.service
if dpkg --purge shardline-agent shardline-allocator >dpkg-purge.log 2>&1 &&
    [ ! -e /var/lib/shardline ] && [ ! -e /var/lib/shardline-allocator ] && [ ! -e /usr/bin/shardline-agent ]; then
    pass "dpkg --purge both: binaries and state gone"
else
    fail "purge: $(tail -5 dpkg-purge.log | tr '\n' ' ')"
fi
echo DONE >>"$res"
INNER
chmod 755 "$t/selftest.sh"
echo "$hold" >"$t/hold"
cat >"$root/etc/systemd/system/shardline-selftest.service" <<'UNIT'
[Unit]
Description=Shardline boot test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/shardline-selftest/selftest.sh
StandardOutput=journal+console
UNIT
ln -sf /etc/systemd/system/shardline-selftest.service "$root/etc/systemd/system/multi-user.target.wants/shardline-selftest.service"
# A leftover from an interrupted run must not shadow the new packages.
chroot "$root" dpkg --purge shardline-agent shardline-allocator >/dev/null 2>&1 || true

echo "systemd/boot-test.sh: booting $root (private network, ${hold}s hold per unit)"
timeout $((4 * hold + 120)) systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network -b \
    >"$t.console.log" 2>&1 </dev/null || true
rm -f "$root/etc/systemd/system/multi-user.target.wants/shardline-selftest.service"

if [ ! -s "$t/result" ]; then
    echo "systemd/boot-test.sh: FAIL: no result (console log: $t.console.log)"
    tail -20 "$t.console.log"
    exit 1
fi
cat "$t/result"
if grep -q '^FAIL' "$t/result" || ! grep -q '^DONE' "$t/result"; then
    echo "systemd/boot-test.sh: FAILED"
    exit 1
fi
echo "systemd/boot-test.sh: all checks passed"
