#!/usr/bin/env bash
# HTTP/3 bulk download through sniplex's QUIC routing against the same download direct, with
# sniplex's CPU seconds per GiB and the datagrams per second it forwarded. Rounds interleave
# direct and proxied runs so both see the same machine.
#
#   benches/quic.sh [--rounds N] [--mib M] [--smoke]
#
# Client and server are aioquic (Python): they, not sniplex, limit the throughput; the figures
# that are about sniplex are its CPU per GiB (from /proc/PID/stat) and the ratio to direct. As a
# CPU baseline, socat relays the same download (one peer, a read and a write per datagram, no
# parsing, no flow table): the least a user-space UDP relay can do.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 mib=256
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --mib) mib=$2; shift 2 ;;
        --smoke) rounds=1 mib=4; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
bash tests/deps.sh
cargo build --release --quiet
bin=target/release/sniplex
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
bash tests/make-certs.sh "$work" bulk.test >/dev/null

python3 tests/quic/h3.py server --cert "$work/cert.pem" --key "$work/key.pem" --name bulk >"$work/server.out" &
pids+=($!)
until grep -q READY "$work/server.out" 2>/dev/null; do
    kill -0 "${pids[0]}" || { echo "h3 server failed" >&2; exit 1; }
    sleep 0.1
done
backend_port=$(awk '/READY/ {print $2}' "$work/server.out")
quic_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/sniplex.toml" <<CONF
listen = ["127.0.0.1:0"]
[metrics]
listen = "127.0.0.1:$metrics_port"
[quic]
listen = ["127.0.0.1:$quic_port"]
[routes."bulk.test"]
backend = "127.0.0.1:1"
quic = "127.0.0.1:$backend_port"
CONF
RUST_LOG=sniplex=warn "$bin" run -c "$work/sniplex.toml" --threads 1 2>"$work/sniplex.log" &
spid=$!
pids+=($spid)
until curl -sf "http://127.0.0.1:$metrics_port/metrics" >/dev/null; do
    kill -0 "$spid" || { cat "$work/sniplex.log" >&2; exit 1; }
    sleep 0.1
done

cpu() { awk '{print $14 + $15}' "/proc/${1:-$spid}/stat"; }
datagrams() {
    curl -s "http://127.0.0.1:$metrics_port/metrics" |
        awk '/^sniplex_quic_datagrams_total/ {s += $2} END {print s + 0}'
}
bytes=$((mib * 1024 * 1024))
fetch() {
    python3 tests/quic/h3.py client --connect "$1" --name bulk.test --ca "$work/ca.pem" \
        --path "/bytes/$bytes" --timeout 600
}
hz=$(getconf CLK_TCK)
results="$work/results"
for r in $(seq 1 "$rounds"); do
    d=$(fetch "127.0.0.1:$backend_port")
    c0=$(cpu) g0=$(datagrams)
    p=$(fetch "127.0.0.1:$quic_port")
    c1=$(cpu) g1=$(datagrams)
    socat_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    socat -T 5 -b 65536 "UDP4-LISTEN:$socat_port,bind=127.0.0.1" "UDP4:127.0.0.1:$backend_port" &
    socat_pid=$!
    until ss -uln | grep -q ":$socat_port "; do sleep 0.05; done
    s=$(fetch "127.0.0.1:$socat_port")
    sc=$(cpu "$socat_pid")
    kill "$socat_pid" 2>/dev/null || true
    wait "$socat_pid" 2>/dev/null || true
    echo "$r|$d|$p|$((c1 - c0))|$((g1 - g0))|$s|$sc" >>"$results"
done

python3 - "$results" "$mib" "$hz" <<'PY'
import json, os, statistics, sys
path, mib, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = []
for line in open(path):
    r, d, p, ticks, dg, so, so_ticks = line.strip().split("|")
    d, p, so = json.loads(d), json.loads(p), json.loads(so)
    assert d["ok"] and p["ok"] and so["ok"], (d, p, so)
    rows.append((d["seconds"], p["seconds"], int(ticks) / hz, int(dg), so["seconds"], int(so_ticks) / hz))
med = lambda xs: statistics.median(xs)
direct = med([mib / r[0] for r in rows])
proxied = med([mib / r[1] for r in rows])
cpu_gib = med([r[2] / (mib / 1024) for r in rows])
dps = med([r[3] / r[1] for r in rows])
spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}"
print(f"machine: {os.cpu_count()} cores, kernel {os.uname().release}; {len(rows)} round(s) of {mib} MiB over HTTP/3 (aioquic client and server)")
socat = med([mib / r[4] for r in rows])
socat_gib = med([r[5] / (mib / 1024) for r in rows])
print(f"{'figure':<34}{'direct':>10}{'via sniplex':>13}{'via socat':>11}{'sniplex/direct':>16}{'sniplex/socat':>15}")
print(f"{'throughput MiB/s (median)':<34}{direct:>10.1f}{proxied:>13.1f}{socat:>11.1f}{proxied / direct:>16.2f}{proxied / socat:>15.2f}")
print(f"{'  spread across rounds':<34}{spread([mib / r[0] for r in rows]):>10}{spread([mib / r[1] for r in rows]):>13}{spread([mib / r[4] for r in rows]):>11}")
print(f"{'relay CPU s per GiB':<34}{'-':>10}{cpu_gib:>13.3f}{socat_gib:>11.3f}{'':>16}{cpu_gib / socat_gib if socat_gib else float('nan'):>15.2f}")
print(f"{'datagrams/s through sniplex':<34}{'-':>10}{dps:>13.0f}")
PY
