#!/usr/bin/env bash
# systemd-analyze verify on the shipped units. verify also checks that ExecStart's binary
# exists, so the units are checked as copies whose /usr/local/bin/sniplex points at the
# freshly built binary; nothing else is changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(readlink -f "${1:-$here/target/debug/sniplex}")
command -v systemd-analyze >/dev/null || { echo "systemd: systemd-analyze not installed (apt-get install systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in sniplex.socket sniplex.service; do
    sed "s|/usr/local/bin/sniplex|$bin|g" "$here/systemd/$unit" > "$tmp/$unit"
done
passed=0
for unit in sniplex.socket sniplex.service; do
    # verify prints problems on stderr and may still exit 0 for some of them: fail on any output
    # that concerns our units.
    out=$(cd "$tmp" && systemd-analyze verify "$tmp/$unit" 2>&1) || { echo "$out" >&2; echo "systemd: $unit: verify failed" >&2; exit 1; }
    if echo "$out" | grep -q "sniplex"; then
        echo "$out" >&2
        echo "systemd: $unit: verify reported problems" >&2
        exit 1
    fi
    echo "systemd: ok: $unit"
    passed=$((passed + 1))
done
echo "systemd: $passed passed, 0 failed"
