#!/usr/bin/env bash
# Runs the ClientHello fuzz target for a bounded time (default 60 s) from the checked-in seeds.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain for
# this build only. A crash leaves its input in fuzz/artifacts/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
RUSTC_BOOTSTRAP=1 cargo fuzz run client_hello "$corpus" seeds/client_hello -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 25
