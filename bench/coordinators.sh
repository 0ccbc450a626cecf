#!/usr/bin/env bash
# The coordinator's state backends side by side (issue 25):
# - placement (tests/examples/placement_bench.rs): 100 nodes, agents' Hellos placed
#   by the registry over sled and over a real 1-member etcd started here, per-source
#   p50/p90/p99/max from none and at 10,000 sources, heartbeats, the placement mutex;
# - failover (tests/examples/failover_bench.rs): three bulwark-coordinator processes
#   on a 3-member etcd, 10 kill -9 of the leader, time until another holds the
#   leadership key, against 2x leader_lease; beside it a sled coordinator's restart.
# Prints figures only. Root is not needed; etcd comes from Debian's etcd-server.
#
# Usage: bash bench/coordinators.sh [placement_bench options, e.g. --late 10 --etcd3 1]
# Environment: BENCH_LEASES="2 5" (leases in seconds; default 2), BENCH_KILLS (10),
# BENCH_PROFILE (dev, the workspace's optimised default; or release).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "coordinators.sh: $*" >&2; exit 1; }
if ! command -v etcd >/dev/null; then
    die "no etcd binary: install Debian's etcd-server (apt-get install etcd-server etcd-client)"
fi
PROFILE="${BENCH_PROFILE:-dev}"
echo "== cargo build --profile $PROFILE (coordinator, CLI, the two examples); etcd $(etcd --version | head -1)"
cargo build --profile "$PROFILE" -p bulwark-coordinator -p bulwark-cli --bins
cargo build --profile "$PROFILE" -p bulwark-tests --example placement_bench --example failover_bench
DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$([[ "$PROFILE" = dev ]] && echo debug || echo "$PROFILE")"
export BULWARK_E2E_SKIP_BUILD=1
echo "== placement ($(date -u +%FT%TZ), $(nproc) CPUs)"
"$DIR/examples/placement_bench" "$@"
for lease in ${BENCH_LEASES:-2}; do
    echo "== failover, leader_lease = ${lease}s"
    "$DIR/examples/failover_bench" --lease "$lease" --kills "${BENCH_KILLS:-10}"
done
