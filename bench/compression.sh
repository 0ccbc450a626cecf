#!/usr/bin/env bash
# Acceptance benchmark of issue 27: what compression saves on real data.
#
# The volume is real data, not random bytes: an ext4 image made with
# `mkfs.ext4 -d` from a copy of real trees of this machine's /usr (about 2 GB of
# binaries, libraries, docs and headers in a 3 GiB image), then ten "days" of churn
# made from real files on the loop-mounted image: trees copied in (from /usr/lib),
# trees deleted, files rewritten (in place and whole), logs appended (lines of real
# changelogs and licences). The churn is seeded, and the eleven states are made once
# (bench/compression_data.py keeps the base image and each day's changed 4 KiB
# blocks), so every system replays the same bytes: each day's blocks are written
# into the protected volume in place, as a real volume sees them.
#
# Systems, in one run (bench/compression_helper.py):
#   [1] Bulwark, compression off
#   [2] Bulwark, node compression `[pool] compression` (the default zstd:1; BENCH_NODE_LEVEL)
#   [3] Bulwark, node compression and `compress = "zstd"` on the wire
#   restic (its default compression) and borg (`--compression zstd,3`), backing up
#   the image file each day.
# When the node binary does not take `[pool] compression` yet, [2] is skipped (the
# report says so) and [3] runs with wire compression alone.
#
# Printed per day: changed bytes, the points' stored bytes, sync time, bytes on
# the wire, restic's and borg's repository size and backup time; in total: the
# points' and the whole source's stored bytes (replica + points) beside restic's and
# borg's repositories, and the restore time of the oldest point (page cache dropped
# first). Every Bulwark point is restored and checked against the SHA-256 of its
# state, and restic's and borg's oldest snapshot too.
#
# Targets:
#   stored bytes of the ten points with compression <= 50% of without
#   syncs (days 1-10) with compression at most 10% slower than without
#   restores of every point byte-identical
# Exit status: 0 when every target is met, 1 when one is missed or could not be
# measured (a node without `[pool] compression`), 2 on an error of
# the benchmark itself.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp          where the work directory is made (needs ~20 GB free)
#   BENCH_DATA=DIR              where the volume states are kept between runs
#                               (default BENCH_DIR/bulwark-compression-data; made
#                               when missing, which takes a few minutes)
#   BENCH_SEED=1                seed of the churn
#   BENCH_IMAGE_MIB=3072        size of the ext4 image
#   BENCH_BIN_DIR=DIR           use the binaries in DIR instead of building them
#   CARGO_TARGET_DIR            honoured as by cargo
#
# Needs root (loop mount, drop_caches), mkfs.ext4, python3, restic, borg (installed
# with apt-get when missing).
#
# Usage: bench/compression.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
DATA="${BENCH_DATA:-$BENCH_DIR/bulwark-compression-data}"
SEED="${BENCH_SEED:-1}"
IMAGE_MIB="${BENCH_IMAGE_MIB:-3072}"
export LC_ALL=C
T_START=$(date +%s)

die() {
    echo "compression-bench: $*" >&2
    exit 2
}
[[ $(id -u) -eq 0 ]] || die "needs root (loop mount of the image, drop_caches)"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a whole number"
[[ "$IMAGE_MIB" =~ ^[0-9]+$ && "$IMAGE_MIB" -ge 2048 ]] || die "BENCH_IMAGE_MIB must be a whole number >= 2048"
for tool in python3 mkfs.ext4 mount restic; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
if ! command -v borg >/dev/null; then
    echo "== borg is not installed: apt-get install -y borgbackup"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q borgbackup >/var/tmp/bulwark-bench-borg-apt.log 2>&1 ||
        { apt-get update -q >>/var/tmp/bulwark-bench-borg-apt.log 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q borgbackup >>/var/tmp/bulwark-bench-borg-apt.log 2>&1; } ||
        die "cannot install borg (see /var/tmp/bulwark-bench-borg-apt.log)"
fi

# ---------------------------------------------------------------- binaries
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_binaries

# ---------------------------------------------------------------- the states
STAMP="seed $SEED, $IMAGE_MIB MiB"
if [[ ! -f "$DATA/states.json" || "$(cat "$DATA/stamp" 2>/dev/null)" != "$STAMP" ]]; then
    echo "== making the volume states in $DATA ($STAMP)"
    rm -rf "$DATA"
    mkdir -p "$DATA"
    python3 "$ROOT/bench/compression_data.py" make "$DATA" "$SEED" "$IMAGE_MIB" || die "could not make the volume states"
    echo "$STAMP" >"$DATA/stamp"
else
    echo "== volume states from $DATA ($STAMP)"
fi

# ---------------------------------------------------------------- the runs
mkdir -p "$BENCH_DIR"
WORK="$(mktemp -d "$BENCH_DIR/bulwark-compression.XXXXXX")"
finish() {
    rm -rf "$WORK"
    echo "(benchmark took $(($(date +%s) - T_START)) s)"
}
trap finish EXIT
echo "== Bulwark (release binaries, mTLS on 127.0.0.1), restic $(restic version | cut -d' ' -f2), $(borg --version)"
python3 "$ROOT/bench/compression_helper.py" run "$BIN" "$DATA" "$WORK" "$WORK/result.json" ||
    die "a run failed (see above)"
cp "$WORK/result.json" "$BENCH_DIR/bulwark-compression-result.json"
echo
echo "Bulwark compression — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r)"
echo "(figures also in $BENCH_DIR/bulwark-compression-result.json)"
python3 "$ROOT/bench/compression_helper.py" report "$WORK/result.json"
