#!/usr/bin/env bash
# Acceptance benchmark: full and incremental sync throughput of a 1 GiB volume over
# mTLS on 127.0.0.1, beside the machine's durable-write rate measured in the same run
# (dd ... conv=fsync, median of three runs) and peers on the same data: rsync
# --inplace --no-whole-file --ignore-times, each run followed by an fsync, and a
# bare TLS 1.3 copy over 127.0.0.1 (OpenSSL through Python's ssl; no hashing, no
# RPC, one process each end), into a file with an fsync and into /dev/null, best of
# three each: the cost of moving bytes through TLS on loopback on this machine, which
# a sync pays on top of reading, hashing, verifying and writing them.
#
# Targets:
#   full sync        >= 80% of the durable-write rate
#   node peak RSS    <  256 MiB (whatever the volume size)
#   agent peak RSS   <  64 MiB
#
# It builds the release binaries (cargo build --release --bins; reused when up to
# date), makes a fresh fleet CA, starts a coordinator, one storage node and one agent
# as real processes, syncs a random-data volume in full, rewrites 1% of its 64 KiB
# blocks at scattered places, syncs again, and prints a summary table with PASS/FAIL.
# Exit status: 0 when every target passes, 1 when one fails, 2 on an error.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp       where the work directory is made (needs ~4 x the volume
#                            size free; use a disk, not tmpfs)
#   BENCH_VOLUME_MIB=1024    volume size in MiB
#   BENCH_SEED=1             seed of the rewritten block positions
#   BENCH_BIN_DIR=DIR        use the binaries in DIR instead of building them
#   BENCH_DROP_CACHES=1      drop the page cache before each timed run (root only), so
#                            the volume is read from disk rather than from memory
#   BENCH_KEEP=1             keep the work directory (configs, logs, volume, replica)
#   BENCH_PERF=FILE          record a CPU profile of node and agent during the full
#                            sync with `perf record -g` into FILE (needs perf)
#   CARGO_TARGET_DIR         honoured as by cargo
#
# Usage: bench/sync-throughput.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/bench/sync_throughput.py"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
VOLUME_MIB="${BENCH_VOLUME_MIB:-1024}"
SEED="${BENCH_SEED:-1}"
BLOCK=65536
SOURCE=bench-volume
NODE=bench-node
AGENT=bench-host
export LC_ALL=C

die() {
    echo "sync-throughput: $*" >&2
    exit 2
}
now_ns() { date +%s%N; }
# mb_per_s BYTES MILLISECONDS -> MB/s (10^6 bytes per second, as dd prints)
mb_per_s() { awk -v b="$1" -v ms="$2" 'BEGIN { if (ms <= 0) print "inf"; else printf "%.1f", b / 1e6 / (ms / 1000) }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }

command -v python3 >/dev/null || die "python3 is needed (for $HELPER)"
command -v cargo >/dev/null || [[ -n "${BENCH_BIN_DIR:-}" ]] || die "cargo is needed (or set BENCH_BIN_DIR)"

# ---------------------------------------------------------------- binaries
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_binaries

# ---------------------------------------------------------------- work directory
mkdir -p "$BENCH_DIR"
WORK="$(mktemp -d "$BENCH_DIR/bulwark-bench.XXXXXX")"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "sync-throughput: process $pid did not stop within 10 s of SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
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
    # device, type and mount point of the file system holding $1
    if command -v findmnt >/dev/null; then
        findmnt -n -o SOURCE,FSTYPE,TARGET -T "$1" | awk '{ printf "%s (%s, mounted on %s)", $1, $2, $3 }'
    else
        df -PT "$1" | awk 'NR == 2 { printf "%s (%s, mounted on %s)", $1, $2, $7 }'
    fi
}
FS_WORK="$(fs_line "$WORK")"
echo "== work directory $WORK"
echo "   file system: $FS_WORK"
echo "   binaries:    $BIN on $(fs_line "$BIN")"
case "$FS_WORK" in
*tmpfs*|*ramfs*) echo "   WARNING: $WORK is in memory; the durable-write rate means little here" ;;
esac
VOLUME_BYTES=$((VOLUME_MIB * 1024 * 1024))
avail_kib="$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')"
need_kib=$((VOLUME_BYTES / 1024 * 4))
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

drop_caches() {
    if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
        sync
        if [[ $(id -u) -eq 0 ]]; then
            echo 3 >/proc/sys/vm/drop_caches
        else
            echo "   (BENCH_DROP_CACHES=1 needs root; page cache left as is)"
        fi
    fi
}

# ---------------------------------------------------------------- the volume
VOLUME="$WORK/volume.img"
BLOCKS=$((VOLUME_BYTES / BLOCK))
REWRITES=$((BLOCKS / 100))
((REWRITES > 0)) || REWRITES=1
echo "== volume: $VOLUME_MIB MiB of random data at $VOLUME ($BLOCKS blocks of 64 KiB)"
dd if=/dev/urandom of="$VOLUME" bs=1M count="$VOLUME_MIB" iflag=fullblock status=none
sync

# ---------------------------------------------------------------- durable-write rate
# The same random bytes as the volume (a virtual disk may store zeros for free), the
# same size. Three runs, the median counts: on virtual disks one run can be several
# times faster or slower than the next (fresh page-cache pages cost far more than
# recycled ones). One more run with oflag=direct, the path the node takes, for context.
echo "== durable-write rate: dd if=volume bs=1M conv=fsync ($VOLUME_MIB MiB), 3 runs"
DD_BYTES=$VOLUME_BYTES
dd_secs_of() { tail -n 1 <<<"$1" | awk -F', ' '{ split($(NF-1), a, " "); print a[1] }'; }
dd_runs=()
for _ in 1 2 3; do
    dd_out="$(dd if="$VOLUME" of="$WORK/dd-test" bs=1M conv=fsync 2>&1)"
    rm -f "$WORK/dd-test"
    echo "   ${dd_out##*$'\n'}"
    ms="$(awk -v s="$(dd_secs_of "$dd_out")" 'BEGIN { printf "%d", s * 1000 }')"
    ((ms > 0)) || die "cannot read dd's time from: $dd_out"
    dd_runs+=("$ms")
done
DD_MS="$(printf '%s\n' "${dd_runs[@]}" | sort -n | sed -n 2p)"
DD_RANGE="$(printf '%s\n' "${dd_runs[@]}" | sort -n | awk -v b="$DD_BYTES" '
    NR == 1 { hi = b / 1e6 / ($1 / 1000) } { lo = b / 1e6 / ($1 / 1000) } END { printf "%.0f-%.0f", lo, hi }')"
DD_MBS="$(mb_per_s "$DD_BYTES" "$DD_MS")"
dd_out="$(dd if="$VOLUME" of="$WORK/dd-test" bs=1M oflag=direct conv=fsync 2>&1)"
rm -f "$WORK/dd-test"
echo "   direct: ${dd_out##*$'\n'}"
DD_DIRECT_MBS="$(mb_per_s "$DD_BYTES" "$(awk -v s="$(dd_secs_of "$dd_out")" 'BEGIN { printf "%d", s * 1000 }')")"

# ---------------------------------------------------------------- PKI and configs
PKI="$WORK/pki"
"$BIN/bulwark" pki init --dir "$PKI" --trust-domain bench.bulwark >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role coordinator --name coordinator --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role node --name "$NODE" --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role admin --name bench-admin --days 2 >/dev/null

# ---------------------------------------------------------------- bare TLS copy
echo "== TLS 1.3 copy of the volume over 127.0.0.1 (Python ssl) into a file + fsync, and into /dev/null, 3 runs"
tls_file=()
tls_null=()
for _ in 1 2 3; do
    drop_caches
    ms=$(python3 "$HELPER" tls-copy "$VOLUME" "$WORK/tls-copy" "$PKI/$NODE.crt" "$PKI/$NODE.key") ||
        die "the TLS copy into a file failed"
    rm -f "$WORK/tls-copy"
    tls_file+=("$ms")
    drop_caches
    ms=$(python3 "$HELPER" tls-copy "$VOLUME" /dev/null "$PKI/$NODE.crt" "$PKI/$NODE.key") ||
        die "the TLS copy into /dev/null failed"
    tls_null+=("$ms")
    echo "   file + fsync $(secs "${tls_file[-1]}") s, /dev/null $(secs "$ms") s"
done
TLS_FILE_MBS="$(mb_per_s "$VOLUME_BYTES" "$(printf '%s\n' "${tls_file[@]}" | sort -n | head -n 1)")"
TLS_NULL_MBS="$(mb_per_s "$VOLUME_BYTES" "$(printf '%s\n' "${tls_null[@]}" | sort -n | head -n 1)")"

read -r CPORT NPORT < <(python3 "$HELPER" free-ports 2)
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
{
    echo "name = \"$AGENT\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent\""
    echo "[[sources]]"
    echo "name = \"$SOURCE\""
    echo "kind = \"volume\""
    echo "path = \"$VOLUME\""
    echo "tracker = \"fingerprint\""
    echo "block_size = \"64KiB\""
    echo "sync_interval = \"24h\""
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
    echo "   $what after $(secs $((($(now_ns) - start) / 1000000))) s"
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
wait_until "$SOURCE is placed" agent "$PID_agent" \
    eval 'cli_json "$WORK/sources.json" sources && python3 "$HELPER" source-node "$WORK/sources.json" "$SOURCE" >/dev/null'

sync_json() { # FILE : run `bulwark sync --wait --json`, print wall time in ms
    local f=$1 t0 t1
    t0=$(now_ns)
    if ! "$BIN/bulwark" sync "$SOURCE" --wait --json >"$f" 2>"$f.err"; then
        cat "$f.err" >&2
        die "bulwark sync $SOURCE failed"
    fi
    t1=$(now_ns)
    echo $(((t1 - t0) / 1000000))
}
field() { python3 "$HELPER" get "$1" "$2"; }

# CPU time (user + system) of a process so far, in ms.
TICKS=$(getconf CLK_TCK)
cpu_ms() { sed 's/.*) //' "/proc/$1/stat" | awk -v t="$TICKS" '{ printf "%d", ($12 + $13) * 1000 / t }'; }

# ---------------------------------------------------------------- full sync
drop_caches
echo "== full sync: bulwark sync $SOURCE --wait --json"
NODE_CPU0=$(cpu_ms "$PID_node")
AGENT_CPU0=$(cpu_ms "$PID_agent")
PERF_PID=""
if [[ -n "${BENCH_PERF:-}" ]]; then
    perf record -q -g -F 4000 -p "$PID_node,$PID_agent" -o "$BENCH_PERF" 2>"$WORK/perf.err" &
    PERF_PID=$!
    sleep 0.5
fi
FULL_WALL_MS=$(sync_json "$WORK/full.json")
if [[ -n "$PERF_PID" ]]; then
    kill -INT "$PERF_PID"
    wait "$PERF_PID" || true
    echo "   CPU profile of the full sync in $BENCH_PERF (perf report -i $BENCH_PERF)"
fi
NODE_CPU_FULL=$(($(cpu_ms "$PID_node") - NODE_CPU0))
AGENT_CPU_FULL=$(($(cpu_ms "$PID_agent") - AGENT_CPU0))
sed 's/^/   /' "$WORK/full.json"
FULL_MS=$(field "$WORK/full.json" duration_ms)
FULL_BYTES=$(field "$WORK/full.json" bytes_sent)
FULL_MBS=$(mb_per_s "$VOLUME_BYTES" "$FULL_MS")
FULL_PCT=$(awk -v a="$FULL_MBS" -v b="$DD_MBS" 'BEGIN { printf "%.0f", 100 * a / b }')
sync

# ---------------------------------------------------------------- rsync, full copy
RSYNC=""
RSYNC_NOTE=""
if command -v rsync >/dev/null; then
    RSYNC=rsync
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "== rsync is not installed; apt-get install -y rsync"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >"$WORK/apt.log" 2>&1 ||
        { apt-get update -q >>"$WORK/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >>"$WORK/apt.log" 2>&1; }; then
        RSYNC=rsync
    else
        RSYNC_NOTE="skipped: apt-get install rsync failed (see $WORK/apt.log)"
    fi
else
    RSYNC_NOTE="skipped: rsync is not installed and this is not root with apt-get"
fi
COPY="$WORK/rsync-copy.img"
rsync_run() { # LABEL STATSFILE : rsync the volume in place, then fsync the copy; prints ms
    local t0 t1
    t0=$(now_ns)
    # --ignore-times: compare every block, as a fingerprint sync does, even when the
    # size and modification time happen to match (same second).
    rsync --inplace --no-whole-file --ignore-times --stats "$VOLUME" "$COPY" >"$2"
    sync "$COPY"
    t1=$(now_ns)
    echo $(((t1 - t0) / 1000000))
}
literal() { awk -F': ' '/^Literal data/ { gsub(/[ ,]|bytes/, "", $2); print $2 }' "$1"; }
if [[ -n "$RSYNC" ]]; then
    drop_caches
    echo "== rsync --inplace --no-whole-file --ignore-times (full copy, then fsync)"
    RSYNC_FULL_MS=$(rsync_run full "$WORK/rsync-full.txt")
    RSYNC_FULL_MBS=$(mb_per_s "$VOLUME_BYTES" "$RSYNC_FULL_MS")
    echo "   $(secs "$RSYNC_FULL_MS") s"
    sync
fi

# ---------------------------------------------------------------- scattered rewrites
echo "== rewriting $REWRITES scattered 64 KiB blocks (1%) with dd conv=notrunc"
python3 "$HELPER" pick-blocks "$BLOCKS" "$REWRITES" "$SEED" >"$WORK/rewritten-blocks.txt"
while read -r b; do
    dd if=/dev/urandom of="$VOLUME" bs=64K count=1 seek="$b" conv=notrunc status=none
done <"$WORK/rewritten-blocks.txt"
sync

# ---------------------------------------------------------------- incremental sync
drop_caches
echo "== incremental sync: bulwark sync $SOURCE --wait --json"
INC_WALL_MS=$(sync_json "$WORK/incremental.json")
sed 's/^/   /' "$WORK/incremental.json"
INC_MS=$(field "$WORK/incremental.json" duration_ms)
INC_BYTES=$(field "$WORK/incremental.json" bytes_sent)
INC_BLOCKS=$(field "$WORK/incremental.json" blocks_sent)
INC_SCAN_MBS=$(mb_per_s "$VOLUME_BYTES" "$INC_MS")

if [[ -n "$RSYNC" ]]; then
    drop_caches
    echo "== rsync --inplace --no-whole-file --ignore-times (after the rewrite, then fsync)"
    RSYNC_INC_MS=$(rsync_run incremental "$WORK/rsync-inc.txt")
    RSYNC_INC_LITERAL=$(literal "$WORK/rsync-inc.txt")
    echo "   $(secs "$RSYNC_INC_MS") s, literal data $RSYNC_INC_LITERAL bytes"
fi

# ---------------------------------------------------------------- memory
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
alive node "$PID_node"
alive agent "$PID_agent"
NODE_HWM=$(hwm_kib "$PID_node")
AGENT_HWM=$(hwm_kib "$PID_agent")
COORD_HWM=$(hwm_kib "$PID_coordinator")

# ---------------------------------------------------------------- summary
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
V_FULL=$(verdict "$FULL_MBS >= 0.8 * $DD_MBS")
V_NODE=$(verdict "$NODE_HWM < 256 * 1024")
V_AGENT=$(verdict "$AGENT_HWM < 64 * 1024")

echo
echo "Bulwark sync throughput — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r)"
echo "volume $VOLUME_MIB MiB random data, 64 KiB blocks, mTLS on 127.0.0.1; work dir on $FS_WORK"
echo
fmt="%-44s %-40s %s\n"
# shellcheck disable=SC2059
{
    printf "$fmt" "measure" "result" "target"
    printf "$fmt" "--------------------------------------------" "----------------------------------------" "--------------------"
    printf "$fmt" "durable write (dd bs=1M conv=fsync)" "$DD_MBS MB/s (median of 3: $DD_RANGE)" ""
    printf "$fmt" "  the same with oflag=direct" "$DD_DIRECT_MBS MB/s" ""
    printf "$fmt" "bare TLS 1.3 copy, file + fsync" "$TLS_FILE_MBS MB/s (best of 3, $(pct "$TLS_FILE_MBS" "$DD_MBS") of dd)" ""
    printf "$fmt" "bare TLS 1.3 copy, into /dev/null" "$TLS_NULL_MBS MB/s (best of 3, $(pct "$TLS_NULL_MBS" "$DD_MBS") of dd)" ""
    printf "$fmt" "full sync" "$FULL_MBS MB/s ($(secs "$FULL_MS") s, ${FULL_PCT}% of dd)" ">= 80% of dd: $V_FULL"
    printf "$fmt" "  vs the bare TLS copy into a file" "$(pct "$FULL_MBS" "$TLS_FILE_MBS")" ""
    printf "$fmt" "  vs the slowest dd run" "$(awk -v a="$FULL_MBS" -v b="$DD_RANGE" 'BEGIN { split(b, r, "-"); printf "%.0f%%", 100 * a / r[1] }')" ""
    printf "$fmt" "  bytes sent / CLI wall time" "$FULL_BYTES B / $(secs "$FULL_WALL_MS") s" ""
    printf "$fmt" "  CPU time: node / agent ($(nproc) CPUs)" "$(secs "$NODE_CPU_FULL") s / $(secs "$AGENT_CPU_FULL") s" ""
    printf "$fmt" "incremental sync ($REWRITES blocks rewritten)" "$(secs "$INC_MS") s, $INC_BLOCKS blocks, $INC_BYTES B sent" ""
    printf "$fmt" "  scan rate (volume / duration)" "$INC_SCAN_MBS MB/s (CLI wall $(secs "$INC_WALL_MS") s)" ""
    if [[ -n "$RSYNC" ]]; then
        printf "$fmt" "rsync --inplace --no-whole-file, full" "$(secs "$RSYNC_FULL_MS") s ($RSYNC_FULL_MBS MB/s, + fsync)" ""
        printf "$fmt" "rsync --inplace --no-whole-file, incr." "$(secs "$RSYNC_INC_MS") s ($RSYNC_INC_LITERAL B literal, + fsync)" ""
    else
        printf "$fmt" "rsync" "$RSYNC_NOTE" ""
    fi
    printf "$fmt" "node peak RSS (VmHWM)" "$(mib "$NODE_HWM") MiB" "< 256 MiB: $V_NODE"
    printf "$fmt" "agent peak RSS (VmHWM)" "$(mib "$AGENT_HWM") MiB" "< 64 MiB: $V_AGENT"
    printf "$fmt" "coordinator peak RSS (VmHWM)" "$(mib "$COORD_HWM") MiB" ""
}
echo
if [[ "$V_FULL $V_NODE $V_AGENT" == *FAIL* ]]; then
    echo "RESULT: FAIL"
    exit 1
fi
echo "RESULT: PASS"
