#!/usr/bin/env bash
# Where the memory of idle connections goes: runs sniplex under valgrind's massif, opens N idle
# TLS connections through it (to an nginx TLS backend on a Unix socket), takes a detailed heap
# snapshot while they are open, and prints the heap per connection by allocation site.
# Exact and independent of machine load, unlike RSS; much slower than a real run. Built with
# the system allocator (massif sees malloc, not jemalloc), into target/heap.
#
# benches/idle-heap.sh [N]        (default 2000)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-2000}

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
ulimit -n "$(ulimit -Hn)"

cd "$here"
cargo build --release --locked --quiet --no-default-features --target-dir target/heap
source "$here/benches/lib.sh"
loadgen=$(loadgen_bin)
bench_tmp heap

bash "$here/tests/make-certs.sh" "$tmp" bench.test >/dev/null
mkdir -p "$tmp/be"
cat > "$tmp/backend.conf" <<EOF
$(nginx_head "$tmp/backend.pid" "$tmp/backend-error.log")
http {
    access_log off;
$(temp_paths "$tmp/be")
    keepalive_timeout 600s;
    server {
        listen unix:$tmp/be.sock ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        root $tmp;
    }
}
EOF
nginx -p "$tmp" -c "$tmp/backend.conf" &
pids+=($!)
port=$(free_port)
cat > "$tmp/sniplex.toml" <<EOF
listen = ["127.0.0.1:$port"]
[limits]
max_connections = 100000
max_connections_per_ip = 100000
max_handshakes = 100000
[routes]
"bench.test" = "unix:$tmp/be.sock"
EOF
valgrind --tool=massif --vgdb=yes --vgdb-prefix="$tmp/vgdb" --massif-out-file="$tmp/massif.out" \
    "$here/target/heap/release/sniplex" run -q --threads 1 -c "$tmp/sniplex.toml" 2> "$tmp/valgrind.log" &
vg=$!; pids+=($vg)
for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
mkfifo "$tmp/fifo"
"$loadgen" idle --addr "127.0.0.1:$port" --name bench.test --ca "$tmp/ca.pem" --count "$n" < "$tmp/fifo" > "$tmp/idle.out" &
pids+=($!)
exec 7>"$tmp/fifo"
for _ in $(seq 1 3000); do grep -q ready "$tmp/idle.out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$tmp/idle.out" || { echo "idle-heap: connections never ready" >&2; exit 1; }
vgdb --vgdb-prefix="$tmp/vgdb" --pid="$vg" detailed_snapshot "$tmp/snap.txt" > /dev/null
exec 7>&-

# The snapshot's allocation tree, per open connection, down to sites worth >= 16 bytes each.
python3 - "$tmp/snap.txt" "$n" <<'EOF'
import re, sys
path, n = sys.argv[1], int(sys.argv[2])
noise = re.compile(r"alloc_impl|allocate \(|alloc \(library|__rdl_alloc|alloc \(unix|aligned_malloc|UnknownInlined")
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("mem_heap_B=") or line.startswith("mem_heap_extra_B="):
        key, val = line.split("=")
        print(f"{key}: {int(val) / n:.0f} bytes per connection")
    m = re.match(r"^( *)n\d+: (\d+) (.*)", line)
    if m and int(m.group(2)) / n >= 16 and len(m.group(1)) <= 14 and not noise.search(m.group(3)):
        site = re.sub(r"0x[0-9A-F]+: ", "", m.group(3))[:150]
        print(f"{m.group(1)}{int(m.group(2)) / n:.0f} B/conn  {site}")
EOF
