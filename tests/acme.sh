#!/usr/bin/env bash
# ACME end to end against a real ACME server: Let's Encrypt's pebble (Debian package), whose
# tls-alpn-01 validations connect to sniplex's own TLS port, with pebble-challtestsrv as the DNS
# server that makes every test name resolve to 127.0.0.1.
#
# Asserts: a certificate is issued for each acme = true name; a client trusting pebble's root
# reaches each backend with it; a name the CA refuses fails cleanly (alert, counted) while the
# others work; a restart reuses stored certificates without a new order, and a corrupted stored
# file is replaced by a new order; a short certificate lifetime (60 s) triggers a renewal while
# connections keep working.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo build --locked --quiet
bin=$PWD/target/debug/sniplex
work=$(mktemp -d)
pids=()
spid=
cleanup() {
    for p in "${pids[@]}" $spid; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "acme.sh: FAIL: $*" >&2; echo "--- sniplex log" >&2; tail -n 40 "$work/sniplex.log" >&2 || true; echo "--- pebble log" >&2; tail -n 30 "$work/pebble.log" >&2 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits (up to 60 s) until the command succeeds.
wait_for() {
    local what=$1; shift
    for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "timed out waiting for $what"
}

tls_port=$(free_port) acme_port=$(free_port) mgmt_port=$(free_port) dns_port=$(free_port)
metrics_port=$(free_port) blog_port=$(free_port) wiki_port=$(free_port)

# The directory's own HTTPS certificate (for "localhost"), from a throwaway CA that sniplex
# is told to trust with [acme] ca_bundle.
bash tests/make-certs.sh "$work" localhost >/dev/null

cat >"$work/pebble.json" <<EOF
{
  "pebble": {
    "listenAddress": "127.0.0.1:$acme_port",
    "managementListenAddress": "127.0.0.1:$mgmt_port",
    "certificate": "$work/cert.pem",
    "privateKey": "$work/key.pem",
    "httpPort": $(free_port),
    "tlsPort": $tls_port,
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false,
    "domainBlocklist": ["refused.test"],
    "certificateValidityPeriod": 60
  }
}
EOF
pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" -dns01 "127.0.0.1:$dns_port" \
    -http01 "" -https01 "" -tlsalpn01 "" -management "127.0.0.1:$(free_port)" \
    >"$work/dns.log" 2>&1 &
pids+=($!)
# No random validation delays, no random nonce rejections, no reused authorizations: every
# order is validated through sniplex.
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 \
    pebble -config "$work/pebble.json" -dnsserver "127.0.0.1:$dns_port" >"$work/pebble.log" 2>&1 &
pids+=($!)
wait_for "pebble" curl -sf --cacert "$work/ca.pem" "https://localhost:$acme_port/dir"

# Two plain-HTTP backends that say who they are.
for name in blog wiki; do
    mkdir -p "$work/$name"
    echo "$name backend" >"$work/$name/index.html"
done
python3 -m http.server --bind 127.0.0.1 --directory "$work/blog" "$blog_port" >/dev/null 2>&1 &
pids+=($!)
python3 -m http.server --bind 127.0.0.1 --directory "$work/wiki" "$wiki_port" >/dev/null 2>&1 &
pids+=($!)

cat >"$work/sniplex.toml" <<EOF
listen = ["127.0.0.1:$tls_port"]
[metrics]
listen = "127.0.0.1:$metrics_port"
[acme]
directory = "https://localhost:$acme_port/dir"
contact = ["mailto:admin@example.org"]
storage = "$work/acme"
ca_bundle = "$work/ca.pem"
[routes."blog.test"]
backend = "127.0.0.1:$blog_port"
terminate = { acme = true }
[routes."wiki.test"]
backend = "127.0.0.1:$wiki_port"
terminate = { acme = true }
[routes."refused.test"]
backend = "127.0.0.1:$blog_port"
terminate = { acme = true }
# Passthrough by default (to a port where nothing listens), terminated with an ACME certificate
# for HTTP/1.1 clients: the CA's acme-tls/1 handshakes must be answered by sniplex, not passed.
[routes."mixed.test"]
backend = "127.0.0.1:1"
[routes."mixed.test".alpn."http/1.1"]
backend = "127.0.0.1:$wiki_port"
terminate = { acme = true }
EOF

start_sniplex() {
    RUST_LOG=sniplex=debug "$bin" run -c "$work/sniplex.toml" >>"$work/sniplex.log" 2>&1 &
    spid=$!
    wait_for "sniplex metrics" curl -sf "http://127.0.0.1:$metrics_port/metrics"
}
stop_sniplex() {
    kill -TERM "$spid"
    wait "$spid" || true
}
metric() {
    curl -s "http://127.0.0.1:$metrics_port/metrics" | awk -v s="$1" '$1 == s {print $2; f=1} END {if (!f) print 0}'
}
metric_is() { [ "$(metric "$1")" = "$2" ]; }
metric_at_least() { [ "$(metric "$1")" -ge "$2" ] 2>/dev/null; }
get() {
    curl -sf --max-time 5 --cacert "$work/root.pem" --resolve "$1:$tls_port:127.0.0.1" "https://$1:$tls_port/"
}
serial() {
    openssl s_client -connect "127.0.0.1:$tls_port" -servername "$1" </dev/null 2>/dev/null |
        openssl x509 -noout -serial
}

start_sniplex
ok='sniplex_acme_orders_total{result="ok"}'
wait_for "three issued certificates" metric_is "$ok" 3
# Pebble's issuing root is made at its start; a client that trusts it trusts what it issued.
curl -sf --cacert "$work/ca.pem" "https://localhost:$mgmt_port/roots/0" >"$work/root.pem" ||
    fail "cannot fetch pebble's root"
[ "$(get blog.test)" = "blog backend" ] || fail "blog.test did not reach its backend"
[ "$(get wiki.test)" = "wiki backend" ] || fail "wiki.test did not reach its backend"
[ "$(get mixed.test)" = "wiki backend" ] || fail "mixed.test (ALPN http/1.1) did not reach its backend"
echo "acme.sh: issued and served: blog.test, wiki.test, mixed.test (a passthrough name)"

# The CA refuses refused.test: its handshakes fail with an alert and are counted; others work.
wait_for "the refused order" metric_at_least 'sniplex_acme_orders_total{result="error"}' 1
if get refused.test >/dev/null 2>&1; then fail "refused.test has no certificate but answered"; fi
metric_at_least 'sniplex_rejected_total{reason="no_certificate"}' 1 || fail "no_certificate not counted"
[ "$(get blog.test)" = "blog backend" ] || fail "blog.test broke while refused.test failed"
grep -q 'answered an ACME tls-alpn-01 validation.*ok=true' "$work/sniplex.log" ||
    fail "no validation handshake was answered by sniplex"
expiry=$(metric 'sniplex_certificate_expiry_seconds{route="blog.test"}')
[ "${expiry%.*}" -gt "$(date +%s)" ] || fail "certificate expiry metric $expiry is not in the future"
for f in account.json blog.test.crt blog.test.key wiki.test.crt wiki.test.key; do
    [ "$(stat -c %a "$work/acme/$f")" = 600 ] || fail "$f is not 0600"
done
[ "$(stat -c %a "$work/acme")" = 700 ] || fail "storage is not 0700"

# Restart: blog's stored certificate is reused (no order); wiki's is damaged on disk and gets a
# new order.
blog_serial=$(serial blog.test) wiki_serial=$(serial wiki.test)
stop_sniplex
head -c 300 "$work/acme/wiki.test.crt" >"$work/half" && mv "$work/half" "$work/acme/wiki.test.crt"
start_sniplex
wait_for "wiki's new certificate" metric_is "$ok" 1
[ "$(get blog.test)" = "blog backend" ] || fail "blog.test after restart"
[ "$(get wiki.test)" = "wiki backend" ] || fail "wiki.test after restart"
[ "$(serial blog.test)" = "$blog_serial" ] || fail "blog.test was re-ordered instead of reused"
[ "$(serial wiki.test)" != "$wiki_serial" ] || fail "wiki.test kept a corrupted certificate"
grep -q 'using the stored ACME certificate name="blog.test"' "$work/sniplex.log" || fail "no reuse logged"
grep -q 'the stored certificate is unusable.*name="wiki.test"' "$work/sniplex.log" ||
    fail "the corrupted file was not reported"
echo "acme.sh: restart reused blog.test, replaced the corrupted wiki.test"

# Renewal: 60 s certificates are renewed when 20 s are left. Connections keep working
# throughout, served first by the old certificate, then by the new one.
served=0
until [ "$(serial blog.test)" != "$blog_serial" ]; do
    [ "$(get blog.test)" = "blog backend" ] || fail "a connection failed while renewing"
    served=$((served + 1))
    [ "$served" -lt 1200 ] || fail "blog.test was not renewed"
    sleep 0.1
done
[ "$(get blog.test)" = "blog backend" ] || fail "blog.test after renewal"
metric_at_least "$ok" 2 || fail "renewal not counted"
echo "acme.sh: renewed blog.test; $served requests served while waiting, none failed"

# Reload with a new acme = true name: ordered without a restart.
printf '[routes."late.test"]\nbackend = "127.0.0.1:%s"\nterminate = { acme = true }\n' "$blog_port" \
    >>"$work/sniplex.toml"
kill -HUP "$spid"
wait_for "late.test after a reload" get late.test
echo "acme.sh: reload ordered late.test"
stop_sniplex
echo "acme.sh: OK"
