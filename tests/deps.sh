#!/usr/bin/env bash
# Installs the Debian packages the test suite drives (real nginx, curl, openssl, ...), if any
# is missing. Needs root (or sudo) only when something has to be installed.
set -euo pipefail
# aioquic (PyPI): the HTTP/3 clients and servers of the QUIC tests and bench (tests/quic/h3.py).
AIOQUIC_VERSION=1.7.2
if ! python3 -c 'import aioquic, sys; sys.exit(aioquic.__version__ != "'$AIOQUIC_VERSION'")' 2>/dev/null; then
    echo "deps: installing aioquic==$AIOQUIC_VERSION from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check "aioquic==$AIOQUIC_VERSION" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "aioquic==$AIOQUIC_VERSION"
fi
# command -> Debian package
declare -A pkgs=(
    [nginx]=nginx [curl]=curl [openssl]=openssl [promtool]=prometheus
    [systemd-socket-activate]=systemd [systemd-analyze]=systemd [haproxy]=haproxy [socat]=socat
    [ss]=iproute2 [pebble]=pebble
    # The jemalloc allocator (cargo feature, on by default) is built from C with make.
    [cc]=gcc [make]=make
)
missing=()
for cmd in "${!pkgs[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${pkgs[$cmd]}")
done
# nginx's stream module (the nginx-stream peer in benches/compare.sh) is a separate package.
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
