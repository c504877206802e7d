# Helpers shared by the benchmark scripts (sourced, not run): a scratch directory whose
# processes are stopped on exit, free loopback ports, the loadgen binary, and the parts of an
# nginx config every bench backend repeats.

# Creates $tmp (world-readable, for nginx's workers) and stops everything in $pids on exit.
bench_tmp() {
    tmp=$(mktemp -d "/tmp/sniplex-$1.XXXXXX")
    chmod 755 "$tmp"
    pids=()
    trap bench_cleanup EXIT
}
bench_cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until something accepts on 127.0.0.1:$1.
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# The bench load generator (benches/loadgen.rs), built if needed.
loadgen_bin() {
    local bin
    bin=$(cargo bench --locked --bench loadgen --no-run 2>&1 | sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -n1)
    [ -x "$bin" ] || { echo "cannot find the loadgen binary" >&2; exit 1; }
    echo "$bin"
}

# An nginx config's main context and events block: one worker, in the foreground, root's
# workers when run as root. nginx_head PIDFILE ERRORLOG [WORKER_CONNECTIONS]
nginx_head() {
    [ "$(id -u)" = 0 ] && echo "user root;"
    cat <<HEAD
worker_processes 1;
worker_rlimit_nofile 40000;
daemon off;
pid $1;
error_log $2 warn;
events { worker_connections ${3:-20000}; }
HEAD
}

# An http block's temp paths, all under $1.
temp_paths() { for d in body proxy fastcgi uwsgi scgi; do echo "    ${d}_temp_path $1/$d;" | sed 's/body_temp/client_body_temp/'; done; }
