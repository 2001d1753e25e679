#!/bin/sh
# systemd/check.sh: offline checks of the Shardline unit files.
#
#   1. `systemd-analyze verify` against a temporary root that holds the
#      distribution's units, our units and an executable at every ExecStart=
#      path (verify refuses a unit whose binary is missing; the real binaries
#      are used when SHARDLINE_BIN_DIR points at them, stand-ins otherwise).
#      Any warning printed by verify counts as a failure (verify exits 0 on
#      many parse errors, e.g. an unknown Type=).
#   2. `systemd-analyze security --offline=yes` on each unit; the overall
#      exposure is parsed and must not exceed the unit's threshold
#      (agent 2.6, allocator 2.0). The agent's was 2.1 with CAP_NET_RAW
#      alone; +0.5 for giving each shard host a uid of its own
#      (CAP_SETUID/SETGID/SETPCAP/KILL) and capping its bandwidth
#      (CAP_NET_ADMIN), issue 15: the unit file says why each is needed.
#
# Usage: systemd/check.sh            (exit 0 = all checks pass)
# Needs: systemd-analyze (Debian: apt-get install systemd), works as any user,
#        no running systemd needed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
units="shardline-agent.service:2.6 shardline-allocator.service:2.0"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd/check.sh: FAIL: systemd-analyze not found (apt-get install systemd)" >&2
    exit 1
fi
echo "systemd/check.sh: $(systemd-analyze --version | head -n1)"

root=$(mktemp -d "${TMPDIR:-/tmp}/shardline-units.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM

# --- 1. verify -------------------------------------------------------------
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system"
ln -s usr/lib "$root/lib"
ln -s usr/bin "$root/bin"
# Targets, slices and sockets our units order against (network-online.target,
# multi-user.target, sysinit.target ...).
for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -d "$d" ]; then cp -a "$d" "$root/usr/lib/systemd/"; break; fi
done
fail=0
for entry in $units; do
    unit=${entry%%:*}
    cp "$here/$unit" "$root/etc/systemd/system/$unit"
    # Every absolute command in Exec*= lines must exist inside the root.
    for bin in $(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "$here/$unit"); do
        mkdir -p "$root$(dirname "$bin")"
        if [ -n "${SHARDLINE_BIN_DIR:-}" ] && [ -x "$SHARDLINE_BIN_DIR/$(basename "$bin")" ]; then
            cp "$SHARDLINE_BIN_DIR/$(basename "$bin")" "$root$bin"
        else
            printf '#!/bin/sh\nexit 0\n' >"$root$bin"
            chmod 755 "$root$bin"
        fi
    done
done
for entry in $units; do
    unit=${entry%%:*}
    out=$(systemd-analyze verify --man=no --generators=no --root="$root" "$unit" 2>&1) && rc=0 || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "verify $unit: FAIL (exit $rc)"
        printf '%s\n' "$out" | sed 's/^/    /'
        fail=1
    else
        echo "verify $unit: ok"
    fi
done

# --- 2. security exposure --------------------------------------------------
for entry in $units; do
    unit=${entry%%:*}
    max=${entry#*:}
    out=$(systemd-analyze security --offline=yes --no-pager "$here/$unit" 2>&1) || true
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*/\1/p' | tail -n1)
    if [ -z "$score" ]; then
        echo "security $unit: FAIL (no overall exposure in the output)"
        printf '%s\n' "$out" | sed 's/^/    /'
        fail=1
        continue
    fi
    if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s + 0 <= m + 0) }'; then
        echo "security $unit: exposure $score (max $max) ok"
    else
        echo "security $unit: exposure $score (max $max) FAIL; the findings:"
        printf '%s\n' "$out" | grep '✗' | sed 's/^/    /'
        fail=1
    fi
done

if [ "$fail" -ne 0 ]; then
    echo "systemd/check.sh: FAILED"
    exit 1
fi
echo "systemd/check.sh: all checks passed"
