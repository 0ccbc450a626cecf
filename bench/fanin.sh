#!/usr/bin/env bash
# Load test: one storage node, N simulated agents (default 500) each running one full
# sync at the same time over its own mTLS connection (tests/examples/fanin_load.rs).
# Prints syncs committed and refused, latency percentiles and the node's peak memory.
#
# Usage: bash bench/fanin.sh [--agents N] [--kib K] [--block-kib B]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Each simulated agent holds two connections, and the coordinator and node one each
# per agent: more than the usual 1024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bins
export BULWARK_E2E_SKIP_BUILD=1
cargo run --release -p bulwark-tests --example fanin_load -- "$@"
