#!/usr/bin/env bash
# Soak test: benches/soak.sh [MINUTES] (default 5). Mixed load against the release binary;
# exits non-zero on any unexpected failure or on fd/RSS growth past the stated bounds. The last
# line prints the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-5}
if [ "${minutes%s}" != "$minutes" ]; then
    exec cargo bench --locked --bench soak -- --seconds "${minutes%s}"
fi
exec cargo bench --locked --bench soak -- --minutes "$minutes"
