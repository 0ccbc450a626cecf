#!/usr/bin/env bash
# Log shipping: 1,000 small appends across 10 files, then one ship (5 rounds), and
# ships every 100 appends (10 rounds); bytes appended, sent and read on the host, the
# ship's time in the agent and through `bulwark sync --wait`, beside `rsync -a
# --append` of the same directory (tests/examples/logship.rs).
#
# Usage: bash bench/logship.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release --bins
export BULWARK_E2E_SKIP_BUILD=1
cargo run --release -p bulwark-tests --example logship -- "$@"
