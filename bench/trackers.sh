#!/usr/bin/env bash
# Acceptance benchmark of the three trackers (fingerprint, qcow2-bitmap, nbd-filter).
#
# Part 1, incremental sync. One random-data volume (4 GiB by default) is made three
# times: a raw file for `fingerprint`, the backing file of an `nbd-filter` export, and
# a qcow2 image for `qcow2-bitmap`. A coordinator, one storage node and one agent with
# the three sources run as real processes on 127.0.0.1 with mTLS; each source is
# synced in full (reported as context), an rsync daemon on 127.0.0.1 and a restic
# repository are seeded with the same original data. Then, in each round, 1% of the
# 64 KiB blocks are rewritten at scattered places (seeded PRNG) with the same
# pseudo-random bytes in all three copies, with qemu-io: on the raw file directly, on
# the nbd-filter through its NBD socket, on the qcow2 image with -f qcow2 (so QEMU's
# persistent dirty bitmaps record the writes); the copies are checked to be identical
# (cmp, qemu-img compare). Timed, in the same run and on the same rewritten data:
#   bulwark sync b-fp / b-nbd / b-qcow --wait --json   (wall time around the CLI)
#   rsync --inplace --no-whole-file FILE rsync://127.0.0.1:PORT/bench/FILE, to the
#       rsync daemon, followed by a sync of the daemon's copy
#   restic backup FILE (incremental: the parent snapshot has the previous data)
# For each: time, bytes read on the host (what the tool read; the agent's figure is
# blocks_read x 64 KiB) and the disk reads of the process (/proc/PID/io read_bytes),
# and bytes sent (Bulwark: bytes_sent; rsync: Total bytes sent; restic: data_added).
# With several rounds (BENCH_ROUNDS) every figure is the median over the rounds.
#
# Part 2, the host's write path: qemu-img bench (20000 strided 4 KiB writes at depth
# 16, and 1 GiB of 1 MiB writes at depth 16) through the nbd-filter's socket and
# through nbdkit's file plugin serving another random-data raw file of the volume's
# size in the same directory; BENCH_WRITE_ROUNDS runs each, alternating, the median
# counts. Eleven by default: on the 2-core development VM either server has runs 2-3x
# its usual time (waiting, not CPU: the server's CPU time is the same in those runs),
# and one such run in three made the median of three a coin toss (seven still
# left it close to one: stop 19-20 runs). With a warm cache
# both files' written range (the first GiB) is read once before the first run, so
# that both servers start with it in the page cache: before, nbdkit's file (rsync's
# copy, written through the cache) started cached and nbd.raw (read by the agent
# with O_DIRECT) did not.
#
# Targets (speed-ups compare wall times; the Bulwark time is the CLI's wall time):
#   nbd-filter, qcow2-bitmap incremental  >= 20x faster than rsync, >= 40x than restic
#   fingerprint incremental               >= 2x faster than rsync
#   nbd-filter qemu-img bench time        <= nbdkit's, on both benches
# Sanity (also required): in every round every tracker sends exactly the rewritten
# blocks, and the bitmap trackers' syncs are incremental (not consistency checks).
# Exit status: 0 when every target passes, 1 when one fails (or could not be measured,
# e.g. restic missing), 2 on an error.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp       where the work directory is made (needs ~10 x the volume
#                            size free with 3 rounds; use a disk, not tmpfs)
#   BENCH_VOLUME_MIB=4096    volume size in MiB
#   BENCH_SEED=1             seed of the volume data, rewritten positions and bytes
#                            (round R uses seed BENCH_SEED + R - 1)
#   BENCH_ROUNDS=3           rewrite + timed incrementals rounds (medians reported)
#   BENCH_WRITE_ROUNDS=11    qemu-img bench runs of each kind on each server
#   BENCH_BIN_DIR=DIR        use the binaries in DIR instead of building them
#   BENCH_DROP_CACHES=1      drop the page cache (sync; echo 3 > drop_caches; root
#                            only) before each timed step. Default: warm cache, i.e.
#                            the files a timed step reads are read once just before
#                            it (cat > /dev/null; for rsync both the source and the
#                            daemon's copy). The agent takes what the page cache
#                            already holds (non-blocking reads) and reads the rest
#                            with O_DIRECT, so it never fills the cache itself.
#   BENCH_KEEP=1             keep the work directory (configs, logs, volumes, repos)
#   BENCH_PERF=DIR           record a system-wide CPU profile (perf record -a -g) of the
#                            first round's incremental of each tracker into DIR/*.perf
#   CARGO_TARGET_DIR         honoured as by cargo
#
# Needs: python3, qemu-img, qemu-io (QEMU >= 7 for `write -s`), qemu-nbd, qemu-storage-daemon (qemu-utils),
# rsync, restic, nbdkit with its file plugin; without rsync, restic or nbdkit that
# comparison is SKIPPED (and the result is not PASS). Other load on the machine skews
# everything: the load average and I/O pressure are printed with the results.
#
# Usage: bench/trackers.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/bench/trackers_helper.py"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
VOLUME_MIB="${BENCH_VOLUME_MIB:-4096}"
SEED="${BENCH_SEED:-1}"
ROUNDS="${BENCH_ROUNDS:-3}"
WRITE_ROUNDS="${BENCH_WRITE_ROUNDS:-11}"
BLOCK=65536
NODE=bench-node
AGENT=bench-host
SRC_FP=b-fp
SRC_NBD=b-nbd
SRC_QCOW=b-qcow
export LC_ALL=C

die() {
    echo "trackers: $*" >&2
    exit 2
}
note() { echo "   $*"; }
now_ns() { date +%s%N; }
mb_per_s() { awk -v b="$1" -v ms="$2" 'BEGIN { if (ms <= 0) print "inf"; else printf "%.1f", b / 1e6 / (ms / 1000) }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "inf"; else printf "%.1f", a / b }'; }
load_line() {
    local io=""
    [[ -r /proc/pressure/io ]] && io=", I/O pressure (some) avg60 $(awk '/^some/ { split($3, a, "="); print a[2] }' /proc/pressure/io)%"
    echo "load average $(cut -d' ' -f1-3 /proc/loadavg)$io"
}

[[ "$VOLUME_MIB" =~ ^[0-9]+$ && "$VOLUME_MIB" -ge 16 ]] || die "BENCH_VOLUME_MIB must be a whole number >= 16 (got $VOLUME_MIB)"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a whole number (got $SEED)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a whole number >= 1 (got $ROUNDS)"
[[ "$WRITE_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_WRITE_ROUNDS must be a whole number >= 1 (got $WRITE_ROUNDS)"
command -v python3 >/dev/null || die "python3 is needed (for $HELPER)"
command -v cargo >/dev/null || [[ -n "${BENCH_BIN_DIR:-}" ]] || die "cargo is needed (or set BENCH_BIN_DIR)"
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    command -v "$t" >/dev/null || die "$t is needed (apt-get install qemu-utils)"
done
qemu-io -c 'help write' 2>/dev/null | grep -q -- '-s source_file' ||
    die "qemu-io has no 'write -s FILE' (QEMU >= 7.0 is needed to write the same random bytes everywhere)"
[[ "$BENCH_DIR" != *[[:space:]]* ]] || die "BENCH_DIR must not contain white space (qemu-io commands and NBD URIs are built from it)"
LOAD_START="$(load_line)"

# ---------------------------------------------------------------- binaries
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_binaries

# ---------------------------------------------------------------- work directory
mkdir -p "$BENCH_DIR"
WORK="$(mktemp -d "$BENCH_DIR/bulwark-trackers.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES"
PIDS=()
stop_pid() { # PID [NAME]: SIGTERM, wait up to 10 s, then SIGKILL; forget the PID
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "trackers: ${2:-process} $pid did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do
        [[ "$p" = "$pid" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    # Newest first: nbdkit, rsync daemon, agent, node, coordinator.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    if [[ $rc -ne 0 && $rc -ne 1 ]]; then
        for log in "$WORK"/*.log; do
            [[ -f "$log" ]] || continue
            echo "---- last lines of $log" >&2
            tail -n 20 "$log" >&2 || true
        done
    fi
    if [[ "${BENCH_KEEP:-0}" = 1 ]]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

fs_line() {
    if command -v findmnt >/dev/null; then
        findmnt -n -o SOURCE,FSTYPE,TARGET -T "$1" | awk '{ printf "%s (%s, mounted on %s)", $1, $2, $3 }'
    else
        df -PT "$1" | awk 'NR == 2 { printf "%s (%s, mounted on %s)", $1, $2, $7 }'
    fi
}
FS_WORK="$(fs_line "$WORK")"
echo "== work directory $WORK"
note "file system: $FS_WORK"
case "$FS_WORK" in
*tmpfs*|*ramfs*) note "WARNING: $WORK is in memory; disk reads mean little here" ;;
esac
VOLUME_BYTES=$((VOLUME_MIB * 1024 * 1024))
# fp.raw, nbd.raw, vm.qcow2, the rsync copy (later nbdkit's file), the restic repo
# (+ ~0.3 x per round: restic re-stores every ~1 MiB chunk that holds a rewrite),
# three replicas on the node (+ 1% reverse deltas each per round): ~8.5 x + 0.4 x/round.
avail_kib="$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')"
need_kib=$((VOLUME_BYTES / 1024 * (85 + 4 * ROUNDS) / 10))
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
    [[ $(id -u) -eq 0 ]] || die "BENCH_DROP_CACHES=1 needs root (it writes /proc/sys/vm/drop_caches)"
    CACHE_MODE="dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each timed step"
else
    CACHE_MODE="warm (the files each timed step reads are read once just before it)"
fi
echo "== page cache: $CACHE_MODE"
# prepare_cache FILE...: the cache state before a timed step.
prepare_cache() {
    sync
    if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        local f
        for f in "$@"; do
            cat "$f" >/dev/null
        done
    fi
}

# ---------------------------------------------------------------- peers available?
RSYNC_NOTE=""
command -v rsync >/dev/null || RSYNC_NOTE="SKIPPED: rsync is not installed (apt-get install rsync)"
RESTIC_NOTE=""
command -v restic >/dev/null || RESTIC_NOTE="SKIPPED: restic is not installed (apt-get install restic)"
NBDKIT_NOTE=""
NBDKIT="$(command -v nbdkit || true)"
[[ -n "$NBDKIT" || ! -x /usr/sbin/nbdkit ]] || NBDKIT=/usr/sbin/nbdkit
if [[ -z "$NBDKIT" ]]; then
    NBDKIT_NOTE="SKIPPED: nbdkit is not installed (apt-get install nbdkit)"
elif ! "$NBDKIT" file --version >/dev/null 2>&1; then
    NBDKIT_NOTE="SKIPPED: nbdkit has no file plugin ($NBDKIT file --version failed)"
fi
[[ -z "$RSYNC_NOTE" ]] || echo "== rsync: $RSYNC_NOTE"
[[ -z "$RESTIC_NOTE" ]] || echo "== restic: $RESTIC_NOTE"
[[ -z "$NBDKIT_NOTE" ]] || echo "== nbdkit: $NBDKIT_NOTE"

# ---------------------------------------------------------------- the volumes
FP="$WORK/fp.raw"
NBDRAW="$WORK/nbd.raw"
QCOW="$WORK/vm.qcow2"
NBD_SOCK="$WORK/nbd/nbd.sock"  # the agent makes nbd/ mode 0700
NBD_URI="nbd+unix:///?socket=$NBD_SOCK"
BLOCKS=$((VOLUME_BYTES / BLOCK))
REWRITES=$((BLOCKS / 100))
((REWRITES > 0)) || REWRITES=1

# random_file FILE BYTES SEED: incompressible pseudo-random bytes (AES-CTR keystream).
random_file() {
    if command -v openssl >/dev/null; then
        { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:bulwark-bench-$3" </dev/zero 2>/dev/null || true; } |
            head -c "$2" >"$1"
    else
        dd if=/dev/urandom of="$1" bs=1M count=$(($2 / 1048576)) iflag=fullblock status=none
    fi
    [[ $(stat -c %s "$1") -eq $2 ]] || die "could not write $2 random bytes to $1"
}

echo "== volume: $VOLUME_MIB MiB of random data ($BLOCKS blocks of 64 KiB), seed $SEED"
t0=$(now_ns)
random_file "$FP" "$VOLUME_BYTES" "$SEED"
note "fp.raw written in $(secs $((($(now_ns) - t0) / 1000000))) s"
cp "$FP" "$NBDRAW"
qemu-img convert -f raw -O qcow2 "$FP" "$QCOW"
note "copies: nbd.raw (nbd-filter backing file), vm.qcow2 ($(du -m "$QCOW" | cut -f1) MiB on disk)"
sync

# ---------------------------------------------------------------- PKI and configs
PKI="$WORK/pki"
"$BIN/bulwark" pki init --dir "$PKI" --trust-domain bench.bulwark >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role coordinator --name coordinator --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role node --name "$NODE" --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role admin --name bench-admin --days 2 >/dev/null

read -r CPORT NPORT RPORT < <(python3 "$HELPER" free-ports 3)
CAPACITY_GIB=$((VOLUME_MIB * 4 / 1024 + 20))
tls() {
    printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' "$PKI/ca.crt" "$PKI/$1.crt" "$PKI/$1.key"
}
{
    echo "listen = \"127.0.0.1:$CPORT\""
    echo "data_dir = \"$WORK/coordinator\""
    tls coordinator
} >"$WORK/coordinator.toml"
mkdir -p "$WORK/node/disk1"
{
    echo "name = \"$NODE\""
    echo "listen = \"127.0.0.1:$NPORT\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "data_dir = \"$WORK/node/meta\""
    echo "heartbeat_interval = \"1s\""
    echo "[[pool.disks]]"
    echo "path = \"$WORK/node/disk1\""
    echo "capacity = \"${CAPACITY_GIB}GiB\""
    tls "$NODE"
} >"$WORK/node.toml"
source_toml() { # NAME PATH TRACKER [EXTRA LINE]
    echo "[[sources]]"
    echo "name = \"$1\""
    echo "kind = \"volume\""
    echo "path = \"$2\""
    echo "tracker = \"$3\""
    [[ -z "${4:-}" ]] || echo "$4"
    echo "block_size = \"64KiB\""
    echo "sync_interval = \"24h\""
}
{
    echo "name = \"$AGENT\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent\""
    source_toml "$SRC_FP" "$FP" fingerprint
    source_toml "$SRC_NBD" "$NBDRAW" nbd-filter "nbd_socket = \"$NBD_SOCK\""
    source_toml "$SRC_QCOW" "$QCOW" qcow2-bitmap
    tls "$AGENT"
} >"$WORK/agent.toml"

export BULWARK_COORDINATOR="https://127.0.0.1:$CPORT"
export BULWARK_CA="$PKI/ca.crt" BULWARK_CERT="$PKI/bench-admin.crt" BULWARK_KEY="$PKI/bench-admin.key"

# ---------------------------------------------------------------- the fleet
start() { # NAME BINARY CONFIG
    "$BIN/$2" --config "$3" >"$WORK/$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    eval "PID_${1//-/_}=$pid"
}
alive() { # NAME PID
    kill -0 "$2" 2>/dev/null || die "$1 exited early; see the end of its log below"
}
wait_until() { # WHAT PID-NAME PID COMMAND...
    local what=$1 name=$2 pid=$3 start
    shift 3
    start=$(now_ns)
    until "$@"; do
        alive "$name" "$pid"
        (($(now_ns) - start < 60 * 1000000000)) || die "timed out after 60 s waiting for $what"
        sleep 0.2
    done
    note "$what after $(secs $((($(now_ns) - start) / 1000000))) s"
}
cli_json() { # FILE ARGS... : run the CLI, its JSON into FILE; false on failure
    local f=$1
    shift
    "$BIN/bulwark" "$@" --json >"$f" 2>"$f.err"
}

echo "== starting coordinator (127.0.0.1:$CPORT), node $NODE (127.0.0.1:$NPORT), agent $AGENT"
start coordinator bulwark-coordinator "$WORK/coordinator.toml"
wait_until "coordinator answers" coordinator "$PID_coordinator" cli_json "$WORK/nodes.json" nodes
start node bulwark-node "$WORK/node.toml"
wait_until "node is up" node "$PID_node" \
    eval 'cli_json "$WORK/nodes.json" nodes && python3 "$HELPER" node-up "$WORK/nodes.json" "$NODE"'
start agent bulwark-agent "$WORK/agent.toml"
wait_until "agent is connected" agent "$PID_agent" \
    eval 'cli_json "$WORK/agents.json" agents && python3 "$HELPER" agent-connected "$WORK/agents.json" "$AGENT"'
wait_until "$SRC_FP, $SRC_NBD, $SRC_QCOW are placed" agent "$PID_agent" \
    eval 'cli_json "$WORK/sources.json" sources && python3 "$HELPER" all-placed "$WORK/sources.json" "$SRC_FP" "$SRC_NBD" "$SRC_QCOW"'
wait_until "the nbd-filter export is listening" agent "$PID_agent" test -S "$NBD_SOCK"

# ---------------------------------------------------------------- measuring
field() { python3 "$HELPER" get "$1" "$2"; }
TICKS=$(getconf CLK_TCK)
cpu_ms() { sed 's/.*) //' "/proc/$1/stat" | awk -v t="$TICKS" '{ printf "%d", ($12 + $13) * 1000 / t }'; }
io_read() { python3 "$HELPER" io-read-bytes "$1"; }
# Per-round results: $RES/LABEL.METRIC, one value a line.
rec() { echo "$3" >>"$RES/$1.$2"; }
med() { python3 "$HELPER" median $(cat "$RES/$1.$2"); }
each() { tr '\n' ' ' <"$RES/$1.$2" | sed 's/ $//'; }
each_s() { awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 / 1000 }' "$RES/$1.$2"; }
# medians LABEL METRIC...: sets LABEL_METRIC to the median over the rounds
medians() {
    local label=$1 m
    shift
    for m in "$@"; do
        printf -v "${label}_$m" %s "$(med "$label" "$m")"
    done
}

# timed_sync LABEL SOURCE JSONFILE: `bulwark sync SOURCE --wait --json` into JSONFILE;
# records LABEL's WALL_MS MS KIND SENT BLOCKS READ IO ACPU NCPU and sets LABEL_* to
# this run's values.
# An incremental is acknowledged before the node settles it into the replica (see
# storage-node/src/store.rs); the node logs this line when it has. Each timed
# incremental waits for it after the timing, so that no settle runs during the next
# timed step; the node's CPU figure of an incremental includes its settle.
settled_count() { grep -c "point settled into the replica" "$WORK/node.log" || true; }
SYNC_METRICS=(WALL_MS MS KIND SENT BLOCKS READ IO ACPU NCPU)
timed_sync() {
    local label=$1 src=$2 f=$3 t0 t1 io0 io1 ac0 nc0 m settled0
    settled0=$(settled_count)
    io0=$(io_read "$PID_agent")
    ac0=$(cpu_ms "$PID_agent")
    nc0=$(cpu_ms "$PID_node")
    local perf_pid=""
    if [[ -n "${BENCH_PERF:-}" && $label = INC_* && ! -e "$BENCH_PERF/$label.perf" ]]; then
        mkdir -p "$BENCH_PERF"
        perf record -q -a -g -F 4000 -o "$BENCH_PERF/$label.perf" 2>"$WORK/perf.err" &
        perf_pid=$!
        sleep 0.5
    fi
    t0=$(now_ns)
    if ! "$BIN/bulwark" sync "$src" --wait --json >"$f" 2>"$f.err"; then
        cat "$f.err" >&2
        die "bulwark sync $src failed"
    fi
    t1=$(now_ns)
    if [[ -n "$perf_pid" ]]; then
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
    fi
    if [[ $label = INC_* ]]; then
        # Outside the timing; the node's CPU figure below includes the settle.
        wait_until "node settled $src" node "$PID_node" eval '(($(settled_count) > settled0))'
        note "settle of $src took $(grep "point settled into the replica" "$WORK/node.log" |
            grep -F "source=\"$src\"" | tail -n 1 | sed -n 's/.*elapsed_ms=\([0-9]*\).*/\1/p') ms (node log)"
    fi
    io1=$(io_read "$PID_agent")
    printf -v "${label}_WALL_MS" %s $(((t1 - t0) / 1000000))
    printf -v "${label}_ACPU" %s $(($(cpu_ms "$PID_agent") - ac0))
    printf -v "${label}_NCPU" %s $(($(cpu_ms "$PID_node") - nc0))
    printf -v "${label}_IO" %s $((io1 - io0))
    printf -v "${label}_MS" %s "$(field "$f" duration_ms)"
    printf -v "${label}_KIND" %s "$(field "$f" kind)"
    printf -v "${label}_SENT" %s "$(field "$f" bytes_sent)"
    printf -v "${label}_BLOCKS" %s "$(field "$f" blocks_sent)"
    printf -v "${label}_READ" %s $(($(field "$f" blocks_read) * BLOCK))
    for m in "${SYNC_METRICS[@]}"; do
        local v="${label}_$m"
        rec "$label" "$m" "${!v}"
    done
    local w="${label}_WALL_MS" k="${label}_KIND" b="${label}_BLOCKS" s="${label}_SENT" r="${label}_READ" d="${label}_MS"
    note "$(secs "${!w}") s (agent $(secs "${!d}") s), ${!k}, ${!b} blocks, $(mib "${!s}") sent, $(mib "${!r}") read"
}

# run_io OUT LABEL CMD...: runs CMD (stdout and stderr into OUT) in a subshell and sets
# LABEL_MS (wall time of CMD), LABEL_RCHAR and LABEL_IO (read_bytes) of CMD and its
# children (the I/O of reaped children counts towards the subshell); records them.
run_io() {
    local out=$1 label=$2 res
    shift 2
    res="$(
        t0=$(now_ns)
        "$@" >"$out" 2>&1 || exit $?
        t1=$(now_ns)
        awk -v ms=$(((t1 - t0) / 1000000)) '
            /^rchar:/ { r = $2 } /^read_bytes:/ { b = $2 } END { print ms, r, b }' "/proc/$BASHPID/io"
    )" || {
        tail -n 20 "$out" >&2
        die "$* failed (output above, all of it in $out)"
    }
    read -r "${label}_MS" "${label}_RCHAR" "${label}_IO" <<<"$res"
    local m v
    for m in MS RCHAR IO; do
        v="${label}_$m"
        rec "$label" "$m" "${!v}"
    done
}

# ---------------------------------------------------------------- full syncs (context)
for t in FP NBD QCOW; do
    case $t in FP) src=$SRC_FP file=$FP ;; NBD) src=$SRC_NBD file=$NBDRAW ;; QCOW) src=$SRC_QCOW file=$QCOW ;; esac
    prepare_cache "$file"
    echo "== full sync: bulwark sync $src --wait --json"
    timed_sync "FULL_$t" "$src" "$WORK/full-$src.json"
done

# ---------------------------------------------------------------- peers: seed with the original
RSYNC_DIR="$WORK/rsyncd"
RSYNC_COPY="$RSYNC_DIR/fp.raw"
RSYNC_URL="rsync://127.0.0.1:$RPORT/bench/fp.raw"
rsync_cmd() { rsync --inplace --no-whole-file --stats "$FP" "$RSYNC_URL" && sync "$RSYNC_COPY"; }
if [[ -z "$RSYNC_NOTE" ]]; then
    mkdir -p "$RSYNC_DIR"
    cat >"$WORK/rsyncd.conf" <<EOF
use chroot = false
log file = $WORK/rsyncd-transfers.log
[bench]
    path = $RSYNC_DIR
    read only = false
    uid = root
    gid = root
EOF
    echo "== rsync daemon on 127.0.0.1:$RPORT, module bench = $RSYNC_DIR ($(rsync --version | head -n 1))"
    rsync --daemon --no-detach --address=127.0.0.1 --port="$RPORT" --config="$WORK/rsyncd.conf" >"$WORK/rsyncd.log" 2>&1 &
    PID_rsyncd=$!
    PIDS+=("$PID_rsyncd")
    wait_until "rsync daemon answers" rsyncd "$PID_rsyncd" eval 'rsync --contimeout=2 "rsync://127.0.0.1:$RPORT/" >/dev/null 2>&1'
    echo "== seeding: rsync --inplace --no-whole-file of the original to the daemon (not a target)"
    prepare_cache "$FP"
    run_io "$WORK/rsync-seed.txt" RSYNC_SEED rsync_cmd
    note "$(secs "$RSYNC_SEED_MS") s"
fi

RESTIC_REPO="$WORK/restic-repo"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$WORK/restic-cache"
if [[ -z "$RESTIC_NOTE" ]]; then
    echo "== seeding: restic init and backup of the original (not a target; $(restic version | cut -d' ' -f1-2))"
    restic init --repo "$RESTIC_REPO" >"$WORK/restic-init.log" 2>&1 || die "restic init failed; see $WORK/restic-init.log"
    prepare_cache "$FP"
    run_io "$WORK/restic-seed.json" RESTIC_SEED restic backup --repo "$RESTIC_REPO" --json "$FP"
    RESTIC_SEED_ADDED=$(python3 "$HELPER" restic-summary "$WORK/restic-seed.json" data_added)
    note "$(secs "$RESTIC_SEED_MS") s, $(mib "$RESTIC_SEED_ADDED") added"
fi

# ---------------------------------------------------------------- rounds
# qemu_io_all CMDFILE LOG ARGS...: qemu-io ARGS with every command of CMDFILE, 200 a run.
qemu_io_all() {
    local cmds=$1 log=$2 args=() line n=0
    shift 2
    while IFS= read -r line; do
        args+=(-c "$line")
        n=$((n + 1))
        if ((n == 200)); then
            qemu-io "$@" "${args[@]}" >>"$log" 2>&1 || die "qemu-io $* failed; see $log"
            args=()
            n=0
        fi
    done <"$cmds"
    if ((n > 0)); then
        qemu-io "$@" "${args[@]}" >>"$log" 2>&1 || die "qemu-io $* failed; see $log"
    fi
}
rewrite_round() { # R
    local r=$1 data="$WORK/rewrite-$1" cmds="$WORK/qemu-io-cmds-$1.txt" log="$WORK/qemu-io-$1.log" t0
    echo "== round $r of $ROUNDS: rewriting $REWRITES scattered 64 KiB blocks (1%) with qemu-io, the same bytes in all three (seed $((SEED + r - 1)))"
    python3 "$HELPER" rewrite-data "$data" "$BLOCKS" "$REWRITES" $((SEED + r - 1)) >"$WORK/rewritten-blocks-$r.txt"
    python3 "$HELPER" qemu-io-cmds "$data" "$WORK/rewritten-blocks-$r.txt" >"$cmds"
    : >"$log"
    t0=$(now_ns)
    qemu_io_all "$cmds" "$log" -f raw "$FP"
    note "fp.raw directly: $(secs $((($(now_ns) - t0) / 1000000))) s"
    t0=$(now_ns)
    qemu_io_all "$cmds" "$log" -f raw "$NBD_URI"
    note "nbd.raw through $NBD_URI: $(secs $((($(now_ns) - t0) / 1000000))) s"
    t0=$(now_ns)
    qemu_io_all "$cmds" "$log" -f qcow2 "$QCOW"
    note "vm.qcow2 with -f qcow2: $(secs $((($(now_ns) - t0) / 1000000))) s"
    ! grep -qi -E 'error|fail' "$log" || die "qemu-io reported an error; see $log"
    sync
    cmp "$FP" "$NBDRAW" || die "fp.raw and nbd.raw differ after the rewrite"
    qemu-img compare -q -f raw -F qcow2 "$FP" "$QCOW" || die "qemu-img compare: fp.raw and vm.qcow2 differ after the rewrite"
    note "checked: fp.raw = nbd.raw (cmp), fp.raw = vm.qcow2 (qemu-img compare)"
    rm -rf "$data"
}
stat_of() { awk -F': ' -v k="$2" '$1 == k { gsub(/[ ,]|bytes/, "", $2); print $2 }' "$1"; }
INSANE=""
for ((R = 1; R <= ROUNDS; R++)); do
    rewrite_round "$R"
    for t in FP NBD QCOW; do
        case $t in FP) src=$SRC_FP file=$FP ;; NBD) src=$SRC_NBD file=$NBDRAW ;; QCOW) src=$SRC_QCOW file=$QCOW ;; esac
        prepare_cache "$file"
        echo "== round $R: incremental: bulwark sync $src --wait --json"
        timed_sync "INC_$t" "$src" "$WORK/inc-$src-r$R.json"
        b="INC_${t}_BLOCKS" k="INC_${t}_KIND"
        [[ "${!b}" = "$REWRITES" ]] || INSANE+=" round $R: $src sent ${!b} blocks, not $REWRITES;"
        [[ $t = FP || "${!k}" = incremental ]] || INSANE+=" round $R: $src was a ${!k}, not an incremental;"
    done
    if [[ -z "$RSYNC_NOTE" ]]; then
        prepare_cache "$FP" "$RSYNC_COPY"
        echo "== round $R: rsync --inplace --no-whole-file $FP $RSYNC_URL; sync $RSYNC_COPY"
        run_io "$WORK/rsync-r$R.txt" RSYNC rsync_cmd
        rec RSYNC SENT "$(stat_of "$WORK/rsync-r$R.txt" "Total bytes sent")"
        rec RSYNC LITERAL "$(stat_of "$WORK/rsync-r$R.txt" "Literal data")"
        note "$(secs "$RSYNC_MS") s, $(mib "$(stat_of "$WORK/rsync-r$R.txt" "Total bytes sent")") sent"
        cmp "$FP" "$RSYNC_COPY" || die "the rsync copy differs from fp.raw"
    fi
    if [[ -z "$RESTIC_NOTE" ]]; then
        prepare_cache "$FP"
        echo "== round $R: restic backup --repo $RESTIC_REPO --json $FP"
        run_io "$WORK/restic-r$R.json" RESTIC restic backup --repo "$RESTIC_REPO" --json "$FP"
        rec RESTIC SENT "$(python3 "$HELPER" restic-summary "$WORK/restic-r$R.json" data_added)"
        changed=$(python3 "$HELPER" restic-summary "$WORK/restic-r$R.json" files_changed)
        [[ "$changed" = 1 ]] || die "restic did not see fp.raw as changed (files_changed=$changed): not an incremental"
        note "$(secs "$RESTIC_MS") s, $(mib "$(tail -n 1 "$RES/RESTIC.SENT")") added"
    fi
done
for t in FP NBD QCOW; do
    medians "INC_$t" WALL_MS MS SENT BLOCKS READ IO ACPU NCPU
    printf -v "INC_${t}_KIND" %s "$(sort -u "$RES/INC_$t.KIND" | paste -sd/)"
done
[[ -n "$RSYNC_NOTE" ]] || medians RSYNC MS RCHAR IO SENT LITERAL
[[ -n "$RESTIC_NOTE" ]] || medians RESTIC MS RCHAR IO SENT

# ---------------------------------------------------------------- memory (before part 2)
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
alive node "$PID_node"
alive agent "$PID_agent"
NODE_HWM=$(hwm_kib "$PID_node")
AGENT_HWM=$(hwm_kib "$PID_agent")
COORD_HWM=$(hwm_kib "$PID_coordinator")

# ---------------------------------------------------------------- write path: qemu-img bench
# The restic repository is no longer needed: give its space back.
rm -rf "$RESTIC_REPO" "$RESTIC_CACHE_DIR"
KIT_RAW="$WORK/nbdkit.raw"
KIT_SOCK="$WORK/nbdkit.sock"
KIT_URI="nbd+unix:///?socket=$KIT_SOCK"
BENCH_STRIDED=(-c 20000 -d 16 -s 4k -S 8k)
BENCH_LARGE=(-c 1024 -d 16 -s 1M)
if [[ -z "$NBDKIT_NOTE" ]]; then
    # Another random-data raw file of the volume's size, next to nbd.raw: the rsync
    # copy when there is one (it is no longer needed), else a fresh one.
    if [[ -f "$RSYNC_COPY" ]]; then
        mv "$RSYNC_COPY" "$KIT_RAW"
    else
        random_file "$KIT_RAW" "$VOLUME_BYTES" "$((SEED + 1000))"
    fi
    echo "== nbdkit file plugin serving $KIT_RAW on $KIT_SOCK ($("$NBDKIT" --version))"
    "$NBDKIT" -f -U "$KIT_SOCK" file file="$KIT_RAW" >"$WORK/nbdkit.log" 2>&1 &
    PID_nbdkit=$!
    PIDS+=("$PID_nbdkit")
    wait_until "nbdkit is listening" nbdkit "$PID_nbdkit" test -S "$KIT_SOCK"
fi
# qbench LABEL URI ARGS...: one qemu-img bench run, its seconds recorded as LABEL.S
qbench() {
    local label=$1 uri=$2 out="$WORK/qemu-img-bench-$1.out" s
    shift 2
    sync
    [[ "${BENCH_DROP_CACHES:-0}" != 1 ]] || echo 3 >/proc/sys/vm/drop_caches
    qemu-img bench -f raw -w -t none "$@" "$uri" >"$out" 2>&1 || {
        cat "$out" >&2
        die "qemu-img bench $* $uri failed"
    }
    s=$(python3 "$HELPER" bench-secs "$out")
    rec "$label" S "$s"
    note "$label: $s s"
}
bench_pair() { # NAME ARGS...: WRITE_ROUNDS rounds, nbd-filter and nbdkit alternating
    local name=$1 r
    shift
    for ((r = 1; r <= WRITE_ROUNDS; r++)); do
        if ((r % 2 == 1)); then
            qbench "filter-$name" "$NBD_URI" "$@"
            [[ -n "$NBDKIT_NOTE" ]] || qbench "nbdkit-$name" "$KIT_URI" "$@"
        else
            [[ -n "$NBDKIT_NOTE" ]] || qbench "nbdkit-$name" "$KIT_URI" "$@"
            qbench "filter-$name" "$NBD_URI" "$@"
        fi
    done
}
if [[ "${BENCH_DROP_CACHES:-0}" != 1 ]]; then
    for f in "$NBDRAW" "$KIT_RAW"; do
        if [[ -f "$f" ]]; then
            head -c $((1 << 30)) "$f" >/dev/null
        fi
    done
fi
echo "== qemu-img bench -f raw -w -t none ${BENCH_STRIDED[*]} (20000 strided 4 KiB writes, depth 16), $WRITE_ROUNDS rounds"
bench_pair strided "${BENCH_STRIDED[@]}"
echo "== qemu-img bench -f raw -w -t none ${BENCH_LARGE[*]} (1 GiB of 1 MiB writes, depth 16), $WRITE_ROUNDS rounds"
bench_pair large "${BENCH_LARGE[@]}"
F_STRIDED=$(med filter-strided S)
F_LARGE=$(med filter-large S)
if [[ -z "$NBDKIT_NOTE" ]]; then
    K_STRIDED=$(med nbdkit-strided S)
    K_LARGE=$(med nbdkit-large S)
    stop_pid "$PID_nbdkit" nbdkit
fi
alive agent "$PID_agent"
AGENT_HWM_END=$(hwm_kib "$PID_agent")
LOAD_END="$(load_line)"

# ---------------------------------------------------------------- summary
verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
if [[ -z "$RSYNC_NOTE" ]]; then
    X_FP_RSYNC=$(ratio "$RSYNC_MS" "$INC_FP_WALL_MS")
    X_NBD_RSYNC=$(ratio "$RSYNC_MS" "$INC_NBD_WALL_MS")
    X_QCOW_RSYNC=$(ratio "$RSYNC_MS" "$INC_QCOW_WALL_MS")
    V_FP_RSYNC=$(verdict "$RSYNC_MS >= 2 * $INC_FP_WALL_MS")
    V_NBD_RSYNC=$(verdict "$RSYNC_MS >= 20 * $INC_NBD_WALL_MS")
    V_QCOW_RSYNC=$(verdict "$RSYNC_MS >= 20 * $INC_QCOW_WALL_MS")
else
    X_FP_RSYNC=-; X_NBD_RSYNC=-; X_QCOW_RSYNC=-
    V_FP_RSYNC=SKIPPED; V_NBD_RSYNC=SKIPPED; V_QCOW_RSYNC=SKIPPED
fi
if [[ -z "$RESTIC_NOTE" ]]; then
    X_FP_RESTIC=$(ratio "$RESTIC_MS" "$INC_FP_WALL_MS")
    X_NBD_RESTIC=$(ratio "$RESTIC_MS" "$INC_NBD_WALL_MS")
    X_QCOW_RESTIC=$(ratio "$RESTIC_MS" "$INC_QCOW_WALL_MS")
    V_NBD_RESTIC=$(verdict "$RESTIC_MS >= 40 * $INC_NBD_WALL_MS")
    V_QCOW_RESTIC=$(verdict "$RESTIC_MS >= 40 * $INC_QCOW_WALL_MS")
else
    X_FP_RESTIC=-; X_NBD_RESTIC=-; X_QCOW_RESTIC=-
    V_NBD_RESTIC=SKIPPED; V_QCOW_RESTIC=SKIPPED
fi
if [[ -z "$NBDKIT_NOTE" ]]; then
    V_STRIDED=$(verdict "$F_STRIDED <= $K_STRIDED")
    V_LARGE=$(verdict "$F_LARGE <= $K_LARGE")
else
    V_STRIDED=SKIPPED; V_LARGE=SKIPPED
fi
if [[ -z "$INSANE" ]]; then V_SANE=PASS; else V_SANE=FAIL; fi
name_of() { case $1 in FP) echo fingerprint ;; NBD) echo nbd-filter ;; QCOW) echo qcow2-bitmap ;; esac; }

echo
echo "Bulwark trackers — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r), $(awk '/^MemTotal:/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
echo "volume $VOLUME_MIB MiB random data, 64 KiB blocks; $ROUNDS round(s) of $REWRITES blocks (1%) rewritten at scattered places (seed $SEED)"
echo "mTLS on 127.0.0.1; work dir on $FS_WORK"
echo "page cache: $CACHE_MODE"
echo "machine: at start $LOAD_START; at end $LOAD_END"
echo
echo "full sync (context)              time   CLI wall  rate"
for t in FP NBD QCOW; do
    ms_v="FULL_${t}_MS" w_v="FULL_${t}_WALL_MS" k_v="FULL_${t}_KIND"
    printf "  %-26s %7s s %7s s  %s MB/s (%s)\n" "$(name_of $t)" "$(secs "${!ms_v}")" "$(secs "${!w_v}")" \
        "$(mb_per_s "$VOLUME_BYTES" "${!ms_v}")" "${!k_v}"
done
[[ -n "$RSYNC_NOTE" ]] || printf "  %-26s %7s s %9s  (to the daemon, + sync)\n" "rsync, first copy" "$(secs "$RSYNC_SEED_MS")" ""
[[ -n "$RESTIC_NOTE" ]] || printf "  %-26s %7s s %9s  %s added\n" "restic backup, first" "$(secs "$RESTIC_SEED_MS")" "" "$(mib "$RESTIC_SEED_ADDED")"
echo
echo "incremental after $REWRITES rewritten blocks (medians over $ROUNDS round(s); time = wall time around the command)"
ifmt="  %-26s %7s %7s %-12s %7s %13s %13s %13s %7s %7s\n"
# shellcheck disable=SC2059
{
    printf "$ifmt" "" "time" "agent" "kind" "blocks" "read on host" "disk reads" "sent" "vs" "vs"
    printf "$ifmt" "" "s" "s" "" "sent" "(tool's own)" "(/proc io)" "" "rsync" "restic"
    for t in FP NBD QCOW; do
        ms_v="INC_${t}_MS" w_v="INC_${t}_WALL_MS" k_v="INC_${t}_KIND" b_v="INC_${t}_BLOCKS"
        r_v="INC_${t}_READ" io_v="INC_${t}_IO" s_v="INC_${t}_SENT" xr="X_${t}_RSYNC" xs="X_${t}_RESTIC"
        printf "$ifmt" "$(name_of $t)" "$(secs "${!w_v}")" "$(secs "${!ms_v}")" "${!k_v}" "${!b_v}" "$(mib "${!r_v}")" \
            "$(mib "${!io_v}")" "$(mib "${!s_v}")" "${!xr}x" "${!xs}x"
    done
    if [[ -z "$RSYNC_NOTE" ]]; then
        printf "$ifmt" "rsync --inplace --no-whole" "$(secs "$RSYNC_MS")" "" "(+ sync)" "" "$(mib "$RSYNC_RCHAR")" \
            "$(mib "$RSYNC_IO")" "$(mib "$RSYNC_SENT")" "" ""
    else
        printf "  %-26s %s\n" "rsync" "$RSYNC_NOTE"
    fi
    if [[ -z "$RESTIC_NOTE" ]]; then
        printf "$ifmt" "restic backup" "$(secs "$RESTIC_MS")" "" "" "" "$(mib "$RESTIC_RCHAR")" \
            "$(mib "$RESTIC_IO")" "$(mib "$RESTIC_SENT")" "" ""
    else
        printf "  %-26s %s\n" "restic" "$RESTIC_NOTE"
    fi
}
echo "  time per round (s):"
for t in FP NBD QCOW; do
    echo "    $(name_of $t): $(each_s "INC_$t" WALL_MS)   (agent: $(each_s "INC_$t" MS); CPU agent $(each_s "INC_$t" ACPU), node $(each_s "INC_$t" NCPU))"
done
[[ -n "$RSYNC_NOTE" ]] || echo "    rsync: $(each_s RSYNC MS)   (literal data: median $(mib "$RSYNC_LITERAL"))"
[[ -n "$RESTIC_NOTE" ]] || echo "    restic: $(each_s RESTIC MS)"
echo "  read on host: Bulwark = blocks_read x 64 KiB as the agent reports it; rsync, restic = rchar"
echo "  of the client (bytes its read() calls returned, a little socket/repository traffic"
echo "  included). disk reads: read_bytes of /proc/PID/io: the agent's, which includes the"
echo "  qemu-storage-daemon and qemu-img children it reaped; the client's for rsync and restic (0 when"
echo "  served from the page cache). sent: Bulwark bytes_sent, rsync Total bytes sent,"
echo "  restic data_added."
echo
echo "write path: qemu-img bench -f raw -w -t none, seconds, median of $WRITE_ROUNDS (all runs)"
wfmt="  %-40s %-32s %s\n"
# shellcheck disable=SC2059
{
    printf "$wfmt" "20000 x 4 KiB, stride 8 KiB, depth 16" "nbd-filter $F_STRIDED ($(each filter-strided S))" \
        "$([[ -n "$NBDKIT_NOTE" ]] && echo "nbdkit $NBDKIT_NOTE" || echo "nbdkit file $K_STRIDED ($(each nbdkit-strided S))")"
    printf "$wfmt" "1024 x 1 MiB, depth 16" "nbd-filter $F_LARGE ($(each filter-large S))" \
        "$([[ -n "$NBDKIT_NOTE" ]] && echo "nbdkit $NBDKIT_NOTE" || echo "nbdkit file $K_LARGE ($(each nbdkit-large S))")"
}
echo
echo "memory (VmHWM): node $(kib_mib "$NODE_HWM") MiB, agent $(kib_mib "$AGENT_HWM") MiB after the syncs" \
    "($(kib_mib "$AGENT_HWM_END") MiB after the write benches), coordinator $(kib_mib "$COORD_HWM") MiB"
echo
tfmt="  %-78s %s\n"
echo "targets"
# shellcheck disable=SC2059
{
    printf "$tfmt" "nbd-filter incremental >= 20x faster than rsync ($X_NBD_RSYNC x)" "$V_NBD_RSYNC"
    printf "$tfmt" "nbd-filter incremental >= 40x faster than restic ($X_NBD_RESTIC x)" "$V_NBD_RESTIC"
    printf "$tfmt" "qcow2-bitmap incremental >= 20x faster than rsync ($X_QCOW_RSYNC x)" "$V_QCOW_RSYNC"
    printf "$tfmt" "qcow2-bitmap incremental >= 40x faster than restic ($X_QCOW_RESTIC x)" "$V_QCOW_RESTIC"
    printf "$tfmt" "fingerprint incremental >= 2x faster than rsync ($X_FP_RSYNC x)" "$V_FP_RSYNC"
    printf "$tfmt" "qemu-img bench strided 4 KiB: nbd-filter <= nbdkit ($F_STRIDED vs ${K_STRIDED:--} s)" "$V_STRIDED"
    printf "$tfmt" "qemu-img bench 1 MiB: nbd-filter <= nbdkit ($F_LARGE vs ${K_LARGE:--} s)" "$V_LARGE"
    printf "$tfmt" "sanity: every tracker sent exactly the $REWRITES rewritten blocks, incrementally" "$V_SANE"
}
[[ -z "$INSANE" ]] || echo "  sanity failures:$INSANE"
ALL="$V_NBD_RSYNC $V_NBD_RESTIC $V_QCOW_RSYNC $V_QCOW_RESTIC $V_FP_RSYNC $V_STRIDED $V_LARGE $V_SANE"
echo
if [[ "$ALL" == *FAIL* ]]; then
    echo "RESULT: FAIL"
    exit 1
elif [[ "$ALL" == *SKIPPED* ]]; then
    echo "RESULT: INCOMPLETE (a comparison was skipped)"
    exit 1
fi
echo "RESULT: PASS"
