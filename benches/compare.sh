#!/usr/bin/env bash
# Side-by-side benchmark: sniplex vs HAProxy (mode tcp + req.ssl_sni, splicing forced) vs nginx
# (stream + ssl_preread), each with one worker, against one nginx TLS backend, plus "direct"
# (client straight to the backend). Rounds are interleaved; a round is refused (and retried)
# when the machine was busy before it. Prints one table with the spread across rounds.
#
# benches/compare.sh [--rounds N] [--bulk-mib N] [--conn-secs S] [--idle N] [--latency N]
#                    [--workers N] [--only LIST] [--targets LIST] [--baseline BIN] [--smoke]
# --only: comma-separated subset of the figures: conns,raw,bulk,term,latency,idle (default: all).
#   raw: proxy-bound connections/s (loadgen raw: a canned ClientHello routed to a plain-HTTP
#   backend that answers 400 and closes), where client and backend cost little, so the proxy's
#   own cost per connection, and its scaling over threads, set the rate.
# --targets: comma-separated subset of direct,sniplex,sniplex2,haproxy,nginx (default: all).
# --baseline BIN: also measure another sniplex binary (say, one built from an earlier commit) as
#   target "baseline", with --threads 1 and the same config, interleaved like the others: how a
#   change is measured against what came before it, in the same run.
# --smoke: seconds-long run that only checks the script still works (CI).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

rounds=3 bulk_mib=1024 conn_secs=5 idle=5000 latency=300 workers=4 smoke=0 baseline=""
only="conns,raw,bulk,term,latency,idle" targets="direct,sniplex,haproxy,nginx,sniplex2"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --bulk-mib) bulk_mib=$2; shift 2 ;;
        --conn-secs) conn_secs=$2; shift 2 ;;
        --idle) idle=$2; shift 2 ;;
        --latency) latency=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --targets) targets=$2; shift 2 ;;
        --baseline) baseline=$(realpath "$2"); targets="$targets,baseline"; shift 2 ;;
        --smoke) smoke=1; rounds=1 bulk_mib=16 conn_secs=1 idle=50 latency=20; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

# --- peers from the distribution ---
need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v socat >/dev/null || need+=(socat)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
ulimit -n "$(ulimit -Hn)"

cd "$here"
cargo build --release --locked --quiet
source "$here/benches/lib.sh"
loadgen=$(loadgen_bin)
sniplex_bin=$here/target/release/sniplex

bench_tmp bench

# --- certificates ---
bash "$here/tests/make-certs.sh" "$tmp" bench.test term.test
mkdir -p "$tmp/www"
# Sparse: reading it costs no disk I/O, so the figures are about the proxies.
truncate -s "${bulk_mib}M" "$tmp/www/big"
# Into the page cache before any round: the first reader would otherwise pay for it.
cat "$tmp/www/big" > /dev/null
echo "small page" > "$tmp/www/small"

# --- the backend: nginx TLS on a Unix socket and a loopback port, plain HTTP on a Unix socket ---
be_port=$(free_port); plain_port=$(free_port)
cat > "$tmp/backend.conf" <<EOF
$(nginx_head "$tmp/backend.pid" "$tmp/backend-error.log")
http {
    access_log off;
$(temp_paths "$tmp/be")
    keepalive_timeout 600s;
    sendfile on;
    ssl_session_tickets off;
    ssl_session_cache off;
    # TLS 1.3 as clients meet it today (nginx before 1.23.4 offers only up to 1.2 by default).
    ssl_protocols TLSv1.2 TLSv1.3;
    server {
        listen unix:$tmp/be.sock ssl;
        listen 127.0.0.1:$be_port ssl;
        server_name bench.test term.test;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        root $tmp/www;
    }
    server {
        listen unix:$tmp/plain.sock;
        listen 127.0.0.1:$plain_port;
        server_name term.test;
        root $tmp/www;
    }
}
EOF
mkdir -p "$tmp/be"
nginx -p "$tmp" -c "$tmp/backend.conf" &
pids+=($!)

# --- the proxies, one worker each ---
sn_port=$(free_port); sn_threads2_port=$(free_port); ha_port=$(free_port); ng_port=$(free_port); ngt_port=$(free_port)
cat > "$tmp/sniplex.toml" <<EOF
listen = ["127.0.0.1:$sn_port"]
[limits]
max_connections = 100000
max_connections_per_ip = 100000
max_handshakes = 100000
[routes]
"bench.test" = "unix:$tmp/be.sock"
"raw.test" = "unix:$tmp/plain.sock"
[routes."term.test"]
backend = "unix:$tmp/plain.sock"
terminate = { cert = "$tmp/cert.pem", key = "$tmp/key.pem" }
EOF
sed "s/127.0.0.1:$sn_port/127.0.0.1:$sn_threads2_port/" "$tmp/sniplex.toml" > "$tmp/sniplex2.toml"
bl_port=$(free_port); baseline_pid=""
if [ -n "$baseline" ]; then
    sed "s/127.0.0.1:$sn_port/127.0.0.1:$bl_port/" "$tmp/sniplex.toml" > "$tmp/baseline.toml"
    "$baseline" run -q --threads 1 -c "$tmp/baseline.toml" &
    baseline_pid=$!; pids+=($!)
fi
"$sniplex_bin" run -q --threads 1 -c "$tmp/sniplex.toml" &
sniplex_pid=$!; pids+=($!)
"$sniplex_bin" run -q --threads 2 -c "$tmp/sniplex2.toml" &
sniplex2_pid=$!; pids+=($!)

cat > "$tmp/haproxy.cfg" <<EOF
global
    nbthread 1
    # Fits the fd hard limit (2 per connection).
    maxconn 7000
    log stderr local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    # splice-auto does not engage on loopback: force it both ways.
    option splice-request
    option splice-response
frontend tls
    bind 127.0.0.1:$ha_port
    maxconn 7000
    tcp-request inspect-delay 10s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend be if { req.ssl_sni -i bench.test }
    use_backend plain if { req.ssl_sni -i raw.test }
backend be
    server s1 unix@$tmp/be.sock
backend plain
    server s1 unix@$tmp/plain.sock
EOF
haproxy -db -f "$tmp/haproxy.cfg" &
haproxy_pid=$!; pids+=($!)

# The floor for bulk: the plainest possible relay (read/write, a 128 KiB buffer, no TLS
# parsing), forking one process per connection. Not a peer: it routes nothing.
so_port=$(free_port)
socat -b 131072 "TCP-LISTEN:$so_port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$tmp/be.sock" &
socat_pid=$!; pids+=($!)
# The other floor: blocking splice(2) through a 1 MiB pipe, one thread per direction, no event
# loop (benches/floor.py): what the kernel charges any relay for this transfer.
fl_port=$(free_port)
python3 "$here/benches/floor.py" "$fl_port" "$tmp/be.sock" &
floor_pid=$!; pids+=($!)

cat > "$tmp/stream.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
$(nginx_head "$tmp/stream.pid" "$tmp/stream-error.log")
stream {
    map \$ssl_preread_server_name \$be {
        bench.test unix:$tmp/be.sock;
        raw.test unix:$tmp/plain.sock;
    }
    server {
        listen 127.0.0.1:$ng_port;
        ssl_preread on;
        proxy_pass \$be;
    }
    # The terminating peer for the terminated-route figures.
    server {
        listen 127.0.0.1:$ngt_port ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_session_tickets off;
        ssl_protocols TLSv1.2 TLSv1.3;
        proxy_pass unix:$tmp/plain.sock;
    }
}
EOF
mkdir -p "$tmp/stream"
nginx -p "$tmp/stream" -c "$tmp/stream.conf" &
pids+=($!)

for p in $be_port $plain_port $sn_port $sn_threads2_port ${baseline:+$bl_port} $ha_port $ng_port $ngt_port $so_port $fl_port; do wait_port "$p"; done
# nginx's worker is the process doing the work (the master only supervises).
worker_of() { pgrep -P "$(cat "$1")" | head -n1; }
ng_pid=$(worker_of "$tmp/stream/stream.pid" 2>/dev/null || true)
[ -n "$ng_pid" ] || ng_pid=$(pgrep -P "$(cat "$tmp/stream.pid")" | head -n1)

# --- measurement helpers ---
# utime + stime, plus those of reaped children (socat's per-connection processes).
ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_busy_pct() {  # machine-wide busy % over 0.5 s
    read -r _ a b c d e f g _ < /proc/stat; t1=$((a+b+c+d+e+f+g)); i1=$d
    sleep 0.5
    read -r _ a b c d e f g _ < /proc/stat; t2=$((a+b+c+d+e+f+g)); i2=$d
    echo $(( 100 * ((t2-t1) - (i2-i1)) / (t2-t1 + 1) ))
}
quiet_machine() {
    for _ in 1 2 3 4 5 6; do
        busy=$(cpu_busy_pct)
        [ "$busy" -le 25 ] && return 0
        echo "  (machine ${busy}% busy before the round: waiting)" >&2
        sleep 2
    done
    return 1
}

declare -A R  # R[figure,target] = "v1 v2 ..." (one value per round)
add() { R[$1,$2]="${R[$1,$2]:-} $3"; }
wants() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
addr_of() { case $1 in direct) echo $be_port ;; sniplex) echo $sn_port ;; sniplex2) echo $sn_threads2_port ;; baseline) echo $bl_port ;; haproxy) echo $ha_port ;; nginx) echo $ng_port ;; socat) echo $so_port ;; floor) echo $fl_port ;; nginx-term) echo $ngt_port ;; sniplex-term) echo $sn_port ;; esac; }
pid_of() { case $1 in sniplex) echo $sniplex_pid ;; sniplex2) echo $sniplex2_pid ;; baseline) echo $baseline_pid ;; haproxy) echo $haproxy_pid ;; socat) echo $socat_pid ;; floor) echo $floor_pid ;; nginx|nginx-term) echo $ng_pid ;; sniplex-term) echo $sniplex_pid ;; *) echo "" ;; esac; }
name_of() { case $1 in *-term) echo term.test ;; *) echo bench.test ;; esac; }

measure_conns() {  # target
    local t=$1 port pid c0 out rate n cpu
    port=$(addr_of "$t"); pid=$(pid_of "$t")
    [ -n "$pid" ] && c0=$(ticks "$pid")
    out=$("$loadgen" conns --addr "127.0.0.1:$port" --name "$(name_of "$t")" --ca "$tmp/ca.pem" --secs "$conn_secs" --workers "$workers")
    rate=$(echo "$out" | sed -n 's/.*rate=\([0-9.]*\).*/\1/p'); n=$(echo "$out" | sed -n 's/.*conns=\([0-9]*\).*/\1/p')
    add conns_per_s "$t" "$rate"
    if [ -n "$pid" ]; then
        cpu=$(awk -v d=$(( $(ticks "$pid") - c0 )) -v hz="$hz" -v n="$n" 'BEGIN { printf "%.1f", d / hz * 1000 / (n / 1000) }')
        add cpu_ms_per_1k_conns "$t" "$cpu"
    fi
}
measure_raw() {  # target
    local t=$1 port pid c0 out rate n cpu
    port=$(addr_of "$t"); pid=$(pid_of "$t")
    [ "$t" = direct ] && port=$plain_port
    [ -n "$pid" ] && c0=$(ticks "$pid")
    out=$("$loadgen" raw --addr "127.0.0.1:$port" --name raw.test --ca "$tmp/ca.pem" --secs "$conn_secs" --workers "$workers")
    rate=$(echo "$out" | sed -n 's/.*rate=\([0-9.]*\).*/\1/p'); n=$(echo "$out" | sed -n 's/.*conns=\([0-9]*\).*/\1/p')
    add raw_conns_per_s "$t" "$rate"
    if [ -n "$pid" ]; then
        cpu=$(awk -v d=$(( $(ticks "$pid") - c0 )) -v hz="$hz" -v n="$n" 'BEGIN { printf "%.1f", d / hz * 1000 / (n / 1000) }')
        add cpu_ms_per_1k_raw "$t" "$cpu"
    fi
}
measure_bulk() {  # target
    local t=$1 port pid c0 speed cpu
    port=$(addr_of "$t"); pid=$(pid_of "$t")
    [ -n "$pid" ] && c0=$(ticks "$pid")
    speed=$(curl -sS -o /dev/null -w '%{speed_download}' --resolve "$(name_of "$t"):$port:127.0.0.1" \
        --cacert "$tmp/ca.pem" "https://$(name_of "$t"):$port/big")
    add bulk_mib_per_s "$t" "$(awk -v s="$speed" 'BEGIN { printf "%.0f", s / 1048576 }')"
    if [ "$t" = socat ]; then
        # Its per-connection process counts only once it has exited and been reaped.
        for _ in $(seq 1 200); do pgrep -P "$pid" >/dev/null || break; sleep 0.05; done
    fi
    if [ -n "$pid" ]; then
        cpu=$(awk -v d=$(( $(ticks "$pid") - c0 )) -v hz="$hz" -v mib="$bulk_mib" 'BEGIN { printf "%.3f", d / hz / (mib / 1024) }')
        add cpu_s_per_gib "$t" "$cpu"
    fi
}
measure_latency() {  # target (paired with direct)
    local t=$1 out
    out=$("$loadgen" latency --addr "127.0.0.1:$(addr_of "$t")" --base "127.0.0.1:$be_port" --name bench.test \
        --ca "$tmp/ca.pem" --samples "$latency")
    add added_p50_us "$t" "$(echo "$out" | sed -n 's/^p50_us=\([-0-9.]*\) .*/\1/p')"
    add added_p99_us "$t" "$(echo "$out" | sed -n 's/.*p99_us=\([-0-9.]*\) .*/\1/p')"
}
# A fresh instance of a proxy on a new port, so its RSS growth is not hidden by memory an earlier
# figure already made it allocate. Prints "measured_pid kill_pid port".
fresh() {
    local t=$1 port pid
    port=$(free_port)
    case $t in
        sniplex)
            sed "s/127.0.0.1:$sn_port/127.0.0.1:$port/" "$tmp/sniplex.toml" > "$tmp/fresh.toml"
            "$sniplex_bin" run -q --threads 1 -c "$tmp/fresh.toml" > /dev/null 2>&1 &
            echo "$! $! $port" ;;
        haproxy)
            sed "s/127.0.0.1:$ha_port/127.0.0.1:$port/" "$tmp/haproxy.cfg" > "$tmp/fresh.cfg"
            haproxy -db -f "$tmp/fresh.cfg" > /dev/null 2>&1 &
            echo "$! $! $port" ;;
        nginx)
            mkdir -p "$tmp/fresh"
            sed -e "s/127.0.0.1:$ng_port;/127.0.0.1:$port;/" -e "s/127.0.0.1:$ngt_port ssl/127.0.0.1:$(free_port) ssl/" \
                -e "s|pid $tmp/stream.pid|pid $tmp/fresh.pid|" "$tmp/stream.conf" > "$tmp/fresh.conf"
            nginx -p "$tmp/fresh" -c "$tmp/fresh.conf" > /dev/null 2>&1 &
            pid=$!
            wait_port "$port"
            echo "$(pgrep -P "$pid" | head -n1) $pid $port" ;;
    esac
}

measure_idle() {  # target
    local t=$1 pid kill_pid port r0 r1 fifo
    read -r pid kill_pid port < <(fresh "$t")
    wait_port "$port"
    r0=$(rss_kib "$pid")
    fifo=$tmp/idle.fifo; rm -f "$fifo"; mkfifo "$fifo"
    "$loadgen" idle --addr "127.0.0.1:$port" --name bench.test --ca "$tmp/ca.pem" --count "$idle" < "$fifo" > "$tmp/idle.out" &
    local lg=$!
    exec 7>"$fifo"
    for _ in $(seq 1 1200); do grep -q ready "$tmp/idle.out" 2>/dev/null && break; sleep 0.1; done
    grep -q ready "$tmp/idle.out" || { echo "idle connections never ready for $t" >&2; exit 1; }
    r1=$(rss_kib "$pid")
    exec 7>&-
    wait "$lg" || true
    kill "$kill_pid" 2>/dev/null || true
    wait "$kill_pid" 2>/dev/null || true
    rm -f "$tmp/idle.out"
    add kib_per_idle_conn "$t" "$(awk -v a="$r0" -v b="$r1" -v n="$idle" 'BEGIN { printf "%.2f", (b - a) / n }')"
}

echo "machine: $(nproc) cores, $(uname -sr), $(awk '/model name/ {sub(/.*: /, ""); print; exit}' /proc/cpuinfo)"
echo "peers: $(haproxy -v 2>&1 | head -n1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), sniplex $("$sniplex_bin" --version | cut -d' ' -f2)"
echo "workload: rounds=$rounds bulk=${bulk_mib}MiB conn_secs=$conn_secs idle=$idle latency_samples=$latency workers=$workers"

round=0
while [ "$round" -lt "$rounds" ]; do
    if ! quiet_machine; then
        # A smoke run only checks that the script works; its figures mean nothing anyway.
        [ "$smoke" = 1 ] || { echo "round refused: the machine stayed busy" >&2; exit 1; }
        echo "  (smoke run: going on although the machine is busy)" >&2
    fi
    round=$((round + 1))
    # Rotate the order each round so no proxy always goes first.
    order=$(echo "$targets" | tr ',' '\n' | awk -v r="$round" '{a[NR]=$0} END {for (i=0;i<NR;i++) print a[(i+r)%NR+1]}')
    echo "round $round: $(echo $order | tr '\n' ' ')" >&2
    if wants conns; then for t in $order; do measure_conns "$t"; done; fi
    if wants raw; then for t in $order; do measure_raw "$t"; done; fi
    if wants bulk; then for t in $order socat floor; do [ "$t" = sniplex2 ] || measure_bulk "$t"; done; fi
    if wants term; then for t in sniplex-term nginx-term; do measure_bulk "$t"; done; fi
    if wants latency; then for t in $order; do case $t in direct|sniplex2) ;; *) measure_latency "$t" ;; esac; done; fi
    if wants idle; then for t in $order; do case $t in direct|sniplex2|baseline) ;; *) measure_idle "$t" ;; esac; done; fi
done

# --- the table: median across rounds, spread as min..max, ratios to direct and to the best peer ---
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
spread() { tr ' ' '\n' | awk 'NF' | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {if (NR) printf "%s..%s", lo, hi}'; }
# lower is better for costs and latency, higher for rates
better_low() { case $1 in conns_per_s|raw_conns_per_s|bulk_mib_per_s) return 1 ;; *) return 0 ;; esac; }
printf '\n%-22s %-10s %12s %18s %10s %10s\n' figure target median spread vs_direct vs_best_peer
for fig in conns_per_s cpu_ms_per_1k_conns raw_conns_per_s cpu_ms_per_1k_raw bulk_mib_per_s cpu_s_per_gib added_p50_us added_p99_us kib_per_idle_conn; do
    best=""
    for peer in haproxy nginx; do
        v=$(echo "${R[$fig,$peer]:-}" | median); [ "$v" = "-" ] && continue
        if [ -z "$best" ]; then best=$v
        elif better_low "$fig"; then best=$(awk -v a="$best" -v b="$v" 'BEGIN {print (b < a) ? b : a}')
        else best=$(awk -v a="$best" -v b="$v" 'BEGIN {print (b > a) ? b : a}'); fi
    done
    direct=$(echo "${R[$fig,direct]:-}" | median)
    for t in direct sniplex sniplex2 baseline haproxy nginx socat floor; do
        vals=${R[$fig,$t]:-}; [ -z "$vals" ] && continue
        m=$(echo "$vals" | median); s=$(echo "$vals" | spread)
        rd=$(awk -v m="$m" -v d="$direct" 'BEGIN { if (d == "-" || d == 0) print "-"; else printf "%.2fx", m / d }')
        rb=$(awk -v m="$m" -v b="$best" 'BEGIN { if (b == "" || b == 0) print "-"; else printf "%.2fx", m / b }')
        label=$t; [ "$t" = sniplex2 ] && label="sniplex(2 thr)"; [ "$t" = baseline ] && label="sniplex(baseline)"; [ "$t" = socat ] && label="socat (floor)"; [ "$t" = floor ] && label="splice floor"
        printf '%-22s %-14s %8s %18s %10s %10s\n' "$fig" "$label" "$m" "$s" "$rd" "$rb"
    done
done
printf '\nterminated route (sniplex terminates vs nginx stream ssl terminates, plain-HTTP backend on a Unix socket):\n'
for fig in bulk_mib_per_s cpu_s_per_gib; do
    for t in sniplex-term nginx-term; do
        vals=${R[$fig,$t]:-}; [ -z "$vals" ] && continue
        m=$(echo "$vals" | median); s=$(echo "$vals" | spread)
        n=$(echo "${R[$fig,nginx-term]:-}" | median)
        printf '%-22s %-14s %8s %18s %10s\n' "$fig" "$t" "$m" "$s" "$(awk -v m="$m" -v n="$n" 'BEGIN { if (n == 0) print "-"; else printf "%.2fx", m / n }')"
    done
done
echo
echo "compare: done ($rounds round(s)); reproduce with: benches/compare.sh --rounds $rounds --bulk-mib $bulk_mib --conn-secs $conn_secs --idle $idle --latency $latency --workers $workers --only $only --targets ${targets%,baseline}${baseline:+ --baseline $baseline}"
