#!/usr/bin/env bash
# Sync throughput with OpenTelemetry export off and on, same volume, same run
# (tests/examples/otel_overhead.rs): full syncs and incremental syncs after 1%
# scattered rewrites, alternating fleets, medians printed. Target: under 3% apart.
#
# Usage: bash bench/otel-overhead.sh [--mib N] [--rounds N]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release --bins
export BULWARK_E2E_SKIP_BUILD=1
cargo run --release -p bulwark-tests --example otel_overhead -- "$@"
