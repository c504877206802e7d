#!/usr/bin/env bash
# Interoperability with real software: nginx as a TLS backend on a Unix socket, curl and
# openssl s_client as clients, sniplex (the real binary) on the shipped example config.
# Usage: tests/interop.sh [path/to/sniplex]   (default: target/debug/sniplex, built if missing)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/debug/sniplex}
[ -x "$bin" ] || (cd "$here" && cargo build --quiet)
for tool in nginx curl openssl; do
    command -v "$tool" >/dev/null || { echo "interop: $tool is not installed (apt-get install nginx curl openssl)" >&2; exit 1; }
done

tmp=$(mktemp -d /tmp/sniplex-interop.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "interop: FAIL: $*" >&2; for f in "$tmp"/*.log; do echo "--- $f" >&2; tail -n 30 "$f" >&2; done; exit 1; }
passed=0
ok() { echo "interop: ok: $*"; passed=$((passed + 1)); }

# --- a CA and a certificate for the demo names ---
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=sniplex interop CA" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=demo.localhost" \
    -keyout "$tmp/key.pem" -out "$tmp/req.pem" 2>/dev/null
printf 'subjectAltName=DNS:demo.localhost,DNS:*.lab.localhost\n' > "$tmp/ext.cnf"
openssl x509 -req -in "$tmp/req.pem" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial -days 2 \
    -extfile "$tmp/ext.cnf" -out "$tmp/cert.pem" 2>/dev/null

# --- nginx: TLS on a Unix socket, no host port ---
user_line=""
[ "$(id -u)" = 0 ] && user_line="user root;"
cat > "$tmp/nginx.conf" <<NGINX
$user_line
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log info;
events { worker_connections 256; }
http {
    access_log $tmp/nginx-access.log;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    server {
        listen unix:$tmp/demo.sock ssl;
        server_name demo.localhost;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        location / { return 200 "hello from nginx on a unix socket\n"; }
    }
}
NGINX
nginx -p "$tmp" -c "$tmp/nginx.conf" > "$tmp/nginx.log" 2>&1 &
pids+=($!)

# --- sniplex on the shipped example, with the demo paths moved into our temp dir ---
sed -e "s|/tmp/sniplex-demo|$tmp|g" -e 's|^listen = .*|listen = ["127.0.0.1:0"]|' \
    "$here/conf/sniplex.toml" > "$tmp/sniplex.toml"
"$bin" check -c "$tmp/sniplex.toml" > /dev/null || fail "sniplex check rejected the example config"
"$bin" -c "$tmp/sniplex.toml" > "$tmp/sniplex.log" 2>&1 &
pids+=($!)
sniplex_pid=$!

# Wait (bounded) for both to be up: nginx's socket file and sniplex's "listening" line.
for _ in $(seq 1 200); do
    [ -S "$tmp/demo.sock" ] && grep -q "listening" "$tmp/sniplex.log" && break
    kill -0 "$sniplex_pid" 2>/dev/null || fail "sniplex exited"
    sleep 0.05
done
port=$(sed -n 's/.*listening addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/sniplex.log" | head -n1)
[ -n "$port" ] || fail "sniplex did not report its port"
[ -S "$tmp/demo.sock" ] || fail "nginx did not create its socket"

# 1. curl reaches nginx's Unix socket through sniplex, verifying the certificate end to end.
body=$(curl -sS --max-time 10 --resolve "demo.localhost:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
    "https://demo.localhost:$port/") || fail "curl through sniplex failed"
[ "$body" = "hello from nginx on a unix socket" ] || fail "unexpected body: $body"
ok "curl -> sniplex -> nginx (unix socket): $body"

# 2. HTTP/2 and TLS 1.2 through the same route (sniplex does not care which).
curl -sS --max-time 10 --http2 --tlsv1.2 --tls-max 1.2 --resolve "demo.localhost:$port:127.0.0.1" \
    --cacert "$tmp/ca.pem" "https://demo.localhost:$port/" > /dev/null || fail "curl TLS 1.2 failed"
ok "curl TLS 1.2"

# 3. An unknown name is refused with alert unrecognized_name (112).
if out=$(curl -sS --max-time 10 --resolve "nope.localhost:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
    "https://nope.localhost:$port/" 2>&1); then
    fail "unknown name was served"
fi
echo "$out" | grep -qi "unrecognized name\|unrecognised name\|alert number 112" || fail "unknown name: $out"
ok "unknown name: $(echo "$out" | head -n1)"

# 4. openssl s_client through sniplex verifies the chain.
out=$(echo | openssl s_client -connect "127.0.0.1:$port" -servername demo.localhost -CAfile "$tmp/ca.pem" \
    -verify_return_error 2>&1) || fail "openssl s_client: $out"
echo "$out" | grep -q "Verify return code: 0 (ok)" || fail "openssl verify: $out"
ok "openssl s_client verified the backend's chain"

# 5. Plain HTTP on the TLS port is closed and does not disturb the next client.
printf 'GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n' | curl -s --max-time 5 "telnet://127.0.0.1:$port" > "$tmp/http.out" || true
[ ! -s "$tmp/http.out" ] || fail "plain HTTP got an answer: $(head -c 100 "$tmp/http.out")"
curl -sS --max-time 10 --resolve "demo.localhost:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
    "https://demo.localhost:$port/" > /dev/null || fail "served nothing after plain HTTP"
ok "plain HTTP closed, next TLS client served"

# 6. SIGTERM: exit 0.
kill -TERM "$sniplex_pid"
wait "$sniplex_pid" || fail "sniplex exited with $? after SIGTERM"
ok "SIGTERM exit 0"

echo "interop: $passed passed, 0 failed"
