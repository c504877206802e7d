#!/usr/bin/env bash
# Runs the fuzz targets (the TCP ClientHello reader, then the QUIC Initial reader) for a bounded
# time in all (default 60 s, two thirds to the first) from the checked-in seeds.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain for
# this build only. A crash leaves its input in fuzz/artifacts/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
run() {
    mkdir -p "$corpus/$1"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$1" "$corpus/$1" "seeds/$1" -- \
        -max_total_time="$2" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 25
}
run client_hello $((seconds * 2 / 3))
run quic_initial $((seconds - seconds * 2 / 3))
