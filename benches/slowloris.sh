#!/usr/bin/env bash
# Slowloris at full scale: N (default 10,000) connections that never finish their ClientHello,
# half of them trickling the first bytes of a record, against the release binary with
# timeouts.client_hello = 5s. Checks that every one is closed by the timeout, that a legitimate
# client is served throughout, and reports sniplex's RSS before, at the peak and after.
# benches/slowloris.sh [N]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
count=${1:-10000}
cd "$here"
ulimit -n "$(ulimit -Hn)"
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || bash tests/deps.sh
export PATH=$PATH:/usr/sbin
cargo build --release --locked --quiet
source "$here/benches/lib.sh"
loadgen=$(loadgen_bin)
bench_tmp slowloris
bash "$here/tests/make-certs.sh" "$tmp" bench.test
mkdir -p "$tmp/t"
{
    nginx_head "$tmp/nginx.pid" "$tmp/nginx.log" 1024
    echo "http { access_log off;"
    temp_paths "$tmp/t"
    echo "  server { listen unix:$tmp/be.sock ssl; ssl_certificate $tmp/cert.pem; ssl_certificate_key $tmp/key.pem; location / { return 200 \"ok\\n\"; } } }"
} > "$tmp/nginx.conf"
nginx -p "$tmp" -c "$tmp/nginx.conf" & pids+=($!)
port=$(free_port)
printf 'listen = ["127.0.0.1:%s"]\n[limits]\nmax_connections_per_ip = 100000\nmax_handshakes = 100000\n[timeouts]\nclient_hello = "5s"\n[routes]\n"bench.test" = "unix:%s/be.sock"\n' \
    "$port" "$tmp" > "$tmp/sniplex.toml"
target/release/sniplex run -q -c "$tmp/sniplex.toml" & sn=$!; pids+=($sn)
for _ in $(seq 1 100); do [ -S "$tmp/be.sock" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$sn/status"; }
before=$(rss)
( while kill -0 "$sn" 2>/dev/null; do rss; sleep 0.2; done ) > "$tmp/rss.log" 2>/dev/null &
sampler=$!; pids+=($sampler)
out=$("$loadgen" silent --addr "127.0.0.1:$port" --name bench.test --ca "$tmp/ca.pem" --count "$count" --trickle | tail -n1)
kill "$sampler" 2>/dev/null || true
peak=$(sort -n "$tmp/rss.log" | tail -n1); after=$(rss)
echo "slowloris: $out"
echo "slowloris: sniplex RSS before ${before} KiB, peak ${peak} KiB ($(( (peak - before) * 1024 / count )) B per silent connection), after ${after} KiB"
closed=$(echo "$out" | sed -n 's/.*closed \([0-9]*\).*/\1/p'); failed=$(echo "$out" | sed -n 's/.*legit_failed \([0-9]*\).*/\1/p')
[ "$closed" = "$count" ] || { echo "slowloris: FAIL: only $closed of $count closed" >&2; exit 1; }
[ "$failed" = 0 ] || { echo "slowloris: FAIL: the legitimate client failed $failed times" >&2; exit 1; }
echo "slowloris: PASS"
