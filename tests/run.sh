#!/usr/bin/env bash
# The whole test suite: unit and end-to-end tests (cargo test), then the scripts that drive
# real external software. Installs missing Debian packages first (tests/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo test --locked
cargo build --locked --quiet
bash tests/interop.sh target/debug/sniplex
bash tests/systemd.sh target/debug/sniplex
bash tests/acme.sh
