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
bash "$here/tests/make-certs.sh" "$tmp" demo.localhost "*.lab.localhost" pp.localhost pp1.localhost blog.localhost

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
    log_format pp '\$proxy_protocol_addr \$ssl_server_name \$server_name \$request';
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
    # TLS with the PROXY protocol (v1 and v2 are both accepted on such a listener).
    server {
        listen unix:$tmp/pp.sock ssl proxy_protocol;
        server_name pp.localhost pp1.localhost;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        access_log $tmp/nginx-pp.log pp;
        location / { return 200 "proxied for \$proxy_protocol_addr\n"; }
    }
    # Plain HTTP: sniplex terminates TLS in front of it.
    server {
        listen unix:$tmp/plain.sock;
        server_name blog.localhost;
        location / { return 200 "plain http backend, host \$host\n"; }
    }
}
NGINX
nginx -p "$tmp" -c "$tmp/nginx.conf" > "$tmp/nginx.log" 2>&1 &
pids+=($!)

# --- sniplex on the shipped example, with the demo paths moved into our temp dir ---
sed -e "s|/tmp/sniplex-demo|$tmp|g" -e 's|^listen = .*|listen = ["127.0.0.1:0"]|' \
    "$here/conf/sniplex.toml" > "$tmp/sniplex.toml"
cat >> "$tmp/sniplex.toml" <<TOML

[routes."pp.localhost"]
backend = "unix:$tmp/pp.sock"
proxy_protocol = "v2"

[routes."pp1.localhost"]
backend = "unix:$tmp/pp.sock"
proxy_protocol = "v1"

[routes."blog.localhost"]
backend = "unix:$tmp/plain.sock"
terminate = { cert = "$tmp/cert.pem", key = "$tmp/key.pem", alpn = ["http/1.1"] }
TOML
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

# 6. PROXY protocol v2 and v1 into nginx: its access log shows the real client address and
#    the server that nginx selected by the SNI it received.
for name in pp.localhost pp1.localhost; do
    body=$(curl -sS --max-time 10 --resolve "$name:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
        "https://$name:$port/via-proxy-protocol") || fail "curl $name failed"
    [ "$body" = "proxied for 127.0.0.1" ] || fail "$name: unexpected body: $body"
    grep -q "^127.0.0.1 $name pp.localhost GET /via-proxy-protocol" "$tmp/nginx-pp.log" \
        || fail "$name: nginx log lacks the client address and SNI: $(cat "$tmp/nginx-pp.log")"
done
ok "PROXY v2 and v1: nginx logged $(tail -n1 "$tmp/nginx-pp.log")"

# 7. A terminated route (plain-HTTP nginx behind) and a passthrough route on the same sniplex.
body=$(curl -sS --max-time 10 --resolve "blog.localhost:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
    "https://blog.localhost:$port/") || fail "curl to the terminated route failed"
[ "$body" = "plain http backend, host blog.localhost" ] || fail "terminated: unexpected body: $body"
curl -sS --max-time 10 --resolve "demo.localhost:$port:127.0.0.1" --cacert "$tmp/ca.pem" \
    "https://demo.localhost:$port/" > /dev/null || fail "passthrough after terminated failed"
ok "curl: terminated route -> plain nginx, passthrough route -> TLS nginx"

# 8. SIGTERM: exit 0.
kill -TERM "$sniplex_pid"
wait "$sniplex_pid" || fail "sniplex exited with $? after SIGTERM"
ok "SIGTERM exit 0"

echo "interop: $passed passed, 0 failed"
