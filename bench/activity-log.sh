#!/usr/bin/env bash
# Acceptance benchmark of the nbd-filter's activity log (issue 26).
#
# With the activity log, the agent records a 4 MiB region "hot" in a small ring file
# in state_dir (fdatasync'd) before the first write to it is acknowledged, and
# checkpoints the dirty bitmap every bitmap_checkpoint, at each sync's freeze and at a
# clean stop. After kill -9 of the agent, the next sync of the source is a bounded
# re-check (blocks dirty in the last checkpoint + the blocks of the regions the log
# names) instead of a consistency check that reads the whole volume. This measures
# what that costs on the host's write path and what it saves after a crash.
#
# Part 1 (BENCH_PARTS has "write"), the write path. One agent serves two nbd-filter
# sources at the same time, `w-on` (activity_log = true) and `w-off` (activity_log =
# false), each over its own random-data raw file of BENCH_WRITE_MIB; nbdkit's file
# plugin (`nbdkit -f -U SOCK file file=PATH`) serves a third such file in the same
# directory. Both sources are synced in full first (steady state: the tracker has a
# point to be incremental from). Then qemu-img bench -f raw -w -t none runs through
# each of the three sockets:
#   20000 strided 4 KiB writes at depth 16   (-c 20000 -d 16 -s 4k -S 8k)
#   1 GiB of 1 MiB writes at depth 16         (-c 1024 -d 16 -s 1M)
# BENCH_WRITE_ROUNDS rounds of each, the three servers alternating within a round and
# the order rotated every round (on off kit, off kit on, kit on off, ...), `sync`
# before every run. Served at once and alternated run by run because on this VM
# separate fleets run one after the other gave a bogus 20% difference for identical
# code, while two exports served at the same time and alternated gave equal figures.
# The first round of the 4 KiB series pays for making its regions hot (one fdatasync
# each): it is printed on its own ("first") beside the median; the target takes the
# median. (Regions may go cold again when the bitmap is checkpointed, every 60 s by
# default: later rounds can pay for some again; that is part of the figure.)
#
# Part 2 (BENCH_PARTS has "recovery"), the crash. Another agent serves `b-al`
# (activity log on, defaults: 4 MiB regions, 1024 extents, 60 s checkpoints) over a
# random-data raw file of BENCH_VOLUME_MIB, synced in full. Then BENCH_ROUNDS rounds
# of: write BENCH_HOT_PERCENT% of its 4 MiB regions (seeded choice; one write of 64 KiB
# to 1 MiB per chosen region, a byte pattern, with qemu-io through the export), kill -9
# the agent, start it again, check that `bulwark sources --json` shows b-al
# `recovering` with `recheck_bytes`, and time the recovering sync (`bulwark sync b-al
# --wait --json`). After the rounds: restore the newest point (the last recovering
# sync's) with `bulwark restore b-al --to FILE --wait --json` and cmp it with the
# backing file; then time a full consistency check of the same volume (`bulwark check
# b-al --wait --json`), which must find nothing left to send. For the recovering syncs
# and the check: wall time around the CLI, the agent's duration_ms, bytes read
# (blocks_read x 64 KiB, as the agent reports it, and read_bytes of the agent's
# /proc/PID/io: disk reads, 0 for what the page cache served), blocks sent.
#
# Targets:
#   qemu-img bench, both benches: activity log on <= off x 1.03    (medians)
#   qemu-img bench, both benches: activity log on <= nbdkit file   (medians)
#   recovery after kill -9 reads <= 5% of the volume  (blocks_read x 64 KiB, worst round)
#   recovery after kill -9 >= 20x faster than a full consistency check of the same
#       volume (CLI wall times; the recovery's median over the rounds)
# Also required (sanity): after each kill -9 the source is `recovering` with
# recheck_bytes > 0; each recovering sync sends exactly the blocks written in that round
# and leaves the source `ok`; the restore of the newest point equals the backing file
# (cmp); the full check after the recoveries sends no block.
# Exit status: 0 when everything passes, 1 when something fails (or was skipped, e.g.
# nbdkit missing), 2 on an error of the benchmark itself.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp       where the work directory is made (a disk, not tmpfs; needs
#                            about 3 x BENCH_VOLUME_MIB + 5 x BENCH_WRITE_MIB free)
#   BENCH_PARTS=write,recovery   which parts to run
#   BENCH_VOLUME_MIB=4096    size of part 2's volume, MiB (>= 64)
#   BENCH_WRITE_MIB=1024     size of each of part 1's three files, MiB (>= 1024: the
#                            1 MiB bench writes the first GiB)
#   BENCH_WRITE_ROUNDS=11    qemu-img bench rounds (each runs all three servers)
#   BENCH_ROUNDS=3           write + kill -9 + recovering sync rounds of part 2
#   BENCH_HOT_PERCENT=1      % of part 2's 4 MiB regions written before each kill -9
#   BENCH_SEED=1             seed of the data and of the chosen regions (round R of
#                            part 2 uses BENCH_SEED + R - 1)
#   BENCH_BIN_DIR=DIR        use the binaries in DIR (e.g. target/release) instead of
#                            building them with cargo build --release
#   BENCH_DROP_CACHES=1      drop the page cache (root only) before each timed step and
#                            each qemu-img bench run. Default: warm cache, i.e. the file
#                            a timed sync or check reads is read once just before it,
#                            and the first GiB of each of part 1's files once before the
#                            first run
#   BENCH_KEEP=1             keep the work directory (configs, logs, volumes)
#   CARGO_TARGET_DIR         honoured as by cargo
#
# Needs: python3, qemu-img, qemu-io (qemu-utils), nbdkit with its file plugin (without
# it the nbdkit comparison is SKIPPED and the result is not PASS), openssl (else
# /dev/urandom). Other load on the machine skews everything: the load average and I/O
# pressure are printed with the results.
#
# Usage: BENCH_BIN_DIR=target/release bash bench/activity-log.sh
# PID_* and the LABEL_* figures are set through printf -v; the commands that
# wait_until evaluates are single-quoted on purpose.
# shellcheck disable=SC2154,SC2016
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/bench/trackers_helper.py"
AHELPER="$ROOT/bench/activity_log_helper.py"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
PARTS="${BENCH_PARTS:-write,recovery}"
VOLUME_MIB="${BENCH_VOLUME_MIB:-4096}"
WRITE_MIB="${BENCH_WRITE_MIB:-1024}"
WRITE_ROUNDS="${BENCH_WRITE_ROUNDS:-11}"
ROUNDS="${BENCH_ROUNDS:-3}"
HOT_PERCENT="${BENCH_HOT_PERCENT:-1}"
SEED="${BENCH_SEED:-1}"
BLOCK=65536
REGION=$((4 * 1024 * 1024)) # activity_region's default; b-al uses the default
NODE="bench-node"
AGENT_W="bench-writes"
AGENT_AL="bench-host"
SRC_ON="w-on"
SRC_OFF="w-off"
SRC_AL="b-al"
export LC_ALL=C

die() {
    echo "activity-log: $*" >&2
    exit 2
}
note() { echo "   $*"; }
now_ns() { date +%s%N; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "inf"; else printf "%.1f", a / b }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "-"; else printf "%.2f", 100 * a / b }'; }
pct_diff() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "-"; else printf "%+.1f", 100 * (a / b - 1) }'; }
verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
load_line() {
    local io=""
    [[ -r /proc/pressure/io ]] && io=", I/O pressure (some) avg60 $(awk '/^some/ { split($3, a, "="); print a[2] }' /proc/pressure/io)%"
    echo "load average $(cut -d' ' -f1-3 /proc/loadavg)$io"
}

PART_WRITE=0
PART_REC=0
IFS=', ' read -r -a parts_list <<<"$PARTS"
for p in "${parts_list[@]}"; do
    case $p in
    write) PART_WRITE=1 ;;
    recovery) PART_REC=1 ;;
    "") ;;
    *) die "BENCH_PARTS: unknown part '$p' (known: write, recovery)" ;;
    esac
done
((PART_WRITE + PART_REC > 0)) || die "BENCH_PARTS names no part (write, recovery)"
[[ "$VOLUME_MIB" =~ ^[0-9]+$ && "$VOLUME_MIB" -ge 64 ]] || die "BENCH_VOLUME_MIB must be a whole number >= 64 (got $VOLUME_MIB)"
[[ "$WRITE_MIB" =~ ^[0-9]+$ && "$WRITE_MIB" -ge 1024 ]] || die "BENCH_WRITE_MIB must be a whole number >= 1024 (got $WRITE_MIB)"
[[ "$WRITE_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_WRITE_ROUNDS must be a whole number >= 1 (got $WRITE_ROUNDS)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a whole number >= 1 (got $ROUNDS)"
[[ "$HOT_PERCENT" =~ ^[1-9][0-9]*$ && "$HOT_PERCENT" -le 100 ]] || die "BENCH_HOT_PERCENT must be a whole number from 1 to 100 (got $HOT_PERCENT)"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a whole number (got $SEED)"
[[ "$BENCH_DIR" != *[[:space:]]* ]] || die "BENCH_DIR must not contain white space (NBD URIs are built from it)"
command -v python3 >/dev/null || die "python3 is needed (for $HELPER)"
command -v cargo >/dev/null || [[ -n "${BENCH_BIN_DIR:-}" ]] || die "cargo is needed (or set BENCH_BIN_DIR)"
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null || die "$t is needed (apt-get install qemu-utils)"
done
if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
    [[ $(id -u) -eq 0 ]] || die "BENCH_DROP_CACHES=1 needs root (it writes /proc/sys/vm/drop_caches)"
fi
LOAD_START="$(load_line)"

# ---------------------------------------------------------------- binaries
if [[ -n "${BENCH_BIN_DIR:-}" ]]; then
    BIN="$BENCH_BIN_DIR"
    [[ "$BIN" = /* ]] || BIN="$PWD/$BIN"
    echo "== using binaries in $BIN"
else
    echo "== cargo build --release --bins (in $ROOT)"
    (cd "$ROOT" && cargo build --release --workspace --bins)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    [[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
fi
for b in bulwark bulwark-coordinator bulwark-node bulwark-agent; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing"
done

# ---------------------------------------------------------------- work directory
mkdir -p "$BENCH_DIR"
WORK="$(mktemp -d "$BENCH_DIR/bulwark-activity-log.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES"
PIDS=()
forget_pid() {
    local p keep=()
    for p in "${PIDS[@]}"; do
        [[ "$p" = "$1" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}
stop_pid() { # PID [NAME]: SIGTERM, wait up to 10 s, then SIGKILL; forget the PID
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "activity-log: ${2:-process} $pid did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    # Newest first: nbdkit, agents, node, coordinator.
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
*tmpfs* | *ramfs*) note "WARNING: $WORK is in memory; fdatasync and disk reads mean little here" ;;
esac
VOLUME_BYTES=$((VOLUME_MIB * 1024 * 1024))
WRITE_BYTES=$((WRITE_MIB * 1024 * 1024))
# Part 1: three files + two replicas; part 2: the volume, its replica (+ small deltas)
# and one restored copy; 1 GiB to spare.
need_kib=$((1024 * 1024))
((PART_WRITE == 0)) || need_kib=$((need_kib + WRITE_BYTES * 5 / 1024))
((PART_REC == 0)) || need_kib=$((need_kib + VOLUME_BYTES * 31 / 10240))
avail_kib="$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')"
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
    CACHE_MODE="dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each timed step"
else
    CACHE_MODE="warm (the file a timed sync or check reads is read once just before it)"
fi
echo "== page cache: $CACHE_MODE"
prepare_cache() { # FILE...: the cache state before a timed step
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

# ---------------------------------------------------------------- nbdkit available?
NBDKIT_NOTE=""
if ((PART_WRITE)); then
    NBDKIT="$(command -v nbdkit || true)"
    [[ -n "$NBDKIT" || ! -x /usr/sbin/nbdkit ]] || NBDKIT=/usr/sbin/nbdkit
    if [[ -z "$NBDKIT" ]]; then
        NBDKIT_NOTE="SKIPPED: nbdkit is not installed (apt-get install nbdkit)"
    elif ! "$NBDKIT" file --version >/dev/null 2>&1; then
        NBDKIT_NOTE="SKIPPED: nbdkit has no file plugin ($NBDKIT file --version failed)"
    fi
    [[ -z "$NBDKIT_NOTE" ]] || echo "== nbdkit: $NBDKIT_NOTE"
fi

# ---------------------------------------------------------------- the volumes
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
ON_RAW="$WORK/w-on.raw"
OFF_RAW="$WORK/w-off.raw"
KIT_RAW="$WORK/nbdkit.raw"
AL_RAW="$WORK/b-al.raw"
# The agent makes each socket's directory (mode 0700).
ON_SOCK="$WORK/nbd-on/w-on.sock"
OFF_SOCK="$WORK/nbd-off/w-off.sock"
AL_SOCK="$WORK/nbd-al/b-al.sock"
KIT_SOCK="$WORK/nbdkit.sock"
ON_URI="nbd+unix:///?socket=$ON_SOCK"
OFF_URI="nbd+unix:///?socket=$OFF_SOCK"
AL_URI="nbd+unix:///?socket=$AL_SOCK"
KIT_URI="nbd+unix:///?socket=$KIT_SOCK"
if ((PART_WRITE)); then
    echo "== part 1 files: three copies of $WRITE_MIB MiB of random data (seed $SEED): w-on.raw, w-off.raw, nbdkit.raw"
    random_file "$ON_RAW" "$WRITE_BYTES" "$SEED"
    cp "$ON_RAW" "$OFF_RAW"
    cp "$ON_RAW" "$KIT_RAW"
fi
if ((PART_REC)); then
    echo "== part 2 volume: $VOLUME_MIB MiB of random data (seed $((SEED + 1000))): b-al.raw"
    t0=$(now_ns)
    random_file "$AL_RAW" "$VOLUME_BYTES" "$((SEED + 1000))"
    note "written in $(secs $((($(now_ns) - t0) / 1000000))) s"
fi
sync

# ---------------------------------------------------------------- PKI and configs
PKI="$WORK/pki"
"$BIN/bulwark" pki init --dir "$PKI" --trust-domain bench.bulwark >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role coordinator --name coordinator --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role node --name "$NODE" --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT_W" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT_AL" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role admin --name bench-admin --days 2 >/dev/null

read -r CPORT NPORT < <(python3 "$HELPER" free-ports 2)
CAPACITY_GIB=$(((VOLUME_MIB + 2 * WRITE_MIB) * 3 / 1024 + 20))
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
source_toml() { # NAME PATH SOCKET ACTIVITY_LOG(true|false)
    echo "[[sources]]"
    echo "name = \"$1\""
    echo "kind = \"volume\""
    echo "path = \"$2\""
    echo "tracker = \"nbd-filter\""
    echo "nbd_socket = \"$3\""
    echo "activity_log = $4"
    echo "block_size = \"64KiB\""
    echo "sync_interval = \"24h\""
}
{
    echo "name = \"$AGENT_W\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent-w\""
    source_toml "$SRC_ON" "$ON_RAW" "$ON_SOCK" true
    source_toml "$SRC_OFF" "$OFF_RAW" "$OFF_SOCK" false
    tls "$AGENT_W"
} >"$WORK/agent-w.toml"
{
    echo "name = \"$AGENT_AL\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent-al\""
    source_toml "$SRC_AL" "$AL_RAW" "$AL_SOCK" true
    tls "$AGENT_AL"
} >"$WORK/agent-al.toml"

export BULWARK_COORDINATOR="https://127.0.0.1:$CPORT"
export BULWARK_CA="$PKI/ca.crt" BULWARK_CERT="$PKI/bench-admin.crt" BULWARK_KEY="$PKI/bench-admin.key"

# ---------------------------------------------------------------- the fleet
start() { # NAME BINARY CONFIG: sets PID_NAME (- as _); the log is appended to
    "$BIN/$2" --config "$3" >>"$WORK/$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    printf -v "PID_${1//-/_}" %s "$pid"
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
agent_connected() { # NAME
    cli_json "$WORK/agents.json" agents && python3 "$HELPER" agent-connected "$WORK/agents.json" "$1"
}
placed() { # NAME...
    cli_json "$WORK/sources.json" sources && python3 "$HELPER" all-placed "$WORK/sources.json" "$@"
}
listening() { python3 "$AHELPER" socket-listening "$1"; }

echo "== starting coordinator (127.0.0.1:$CPORT), node $NODE (127.0.0.1:$NPORT)"
start coordinator bulwark-coordinator "$WORK/coordinator.toml"
wait_until "coordinator answers" coordinator "$PID_coordinator" cli_json "$WORK/nodes.json" nodes
start node bulwark-node "$WORK/node.toml"
wait_until "node is up" node "$PID_node" \
    eval 'cli_json "$WORK/nodes.json" nodes && python3 "$HELPER" node-up "$WORK/nodes.json" "$NODE"'
if ((PART_WRITE)); then
    echo "== starting agent $AGENT_W ($SRC_ON: activity_log = true, $SRC_OFF: activity_log = false)"
    start agent-w bulwark-agent "$WORK/agent-w.toml"
    wait_until "$AGENT_W is connected" agent-w "$PID_agent_w" agent_connected "$AGENT_W"
    wait_until "$SRC_ON, $SRC_OFF are placed" agent-w "$PID_agent_w" placed "$SRC_ON" "$SRC_OFF"
    wait_until "both exports are listening" agent-w "$PID_agent_w" eval 'listening "$ON_SOCK" && listening "$OFF_SOCK"'
fi
if ((PART_REC)); then
    echo "== starting agent $AGENT_AL ($SRC_AL: activity_log = true)"
    start agent-al bulwark-agent "$WORK/agent-al.toml"
    wait_until "$AGENT_AL is connected" agent-al "$PID_agent_al" agent_connected "$AGENT_AL"
    wait_until "$SRC_AL is placed" agent-al "$PID_agent_al" placed "$SRC_AL"
    wait_until "the export is listening" agent-al "$PID_agent_al" listening "$AL_SOCK"
fi

# ---------------------------------------------------------------- measuring
field() { python3 "$HELPER" get "$1" "$2"; }
sfield() { python3 "$AHELPER" source-field "$WORK/sources.json" "$1" "$2"; }
TICKS=$(getconf CLK_TCK)
cpu_ms() { sed 's/.*) //' "/proc/$1/stat" | awk -v t="$TICKS" '{ printf "%d", ($12 + $13) * 1000 / t }'; }
io_read() { python3 "$HELPER" io-read-bytes "$1"; }
# Per-run results: $RES/LABEL.METRIC, one value a line, in the order of the runs.
rec() { echo "$3" >>"$RES/$1.$2"; }
# shellcheck disable=SC2046
med() { python3 "$HELPER" median $(cat "$RES/$1.$2"); }
first() { head -n 1 "$RES/$1.$2"; }
maxof() { sort -n "$RES/$1.$2" | tail -n 1; }
each() { tr '\n' ' ' <"$RES/$1.$2" | sed 's/ $//'; }
each_s() { awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 / 1000 }' "$RES/$1.$2"; }

# The node logs this when a later sync's blocks are in the replica; each timed sync
# that sent blocks waits for it (outside the timing) so that no settle runs during
# the next timed step.
settled_count() { grep -c "point settled into the replica" "$WORK/node.log" || true; }

# timed_cli LABEL AGENT-PID JSONFILE ARGS...: `bulwark ARGS --wait --json` into
# JSONFILE, timed; records LABEL's WALL_MS MS KIND SENT BLOCKS SCANNED READ IO ACPU
# NCPU POINT and sets LABEL_* to this run's values.
CLI_METRICS=(WALL_MS MS KIND SENT BLOCKS SCANNED READ IO ACPU NCPU POINT)
timed_cli() {
    local label=$1 apid=$2 f=$3 t0 t1 io0 io1 ac0 nc0 m settled0
    shift 3
    # shellcheck disable=SC2034 # read by the eval below
    settled0=$(settled_count)
    io0=$(io_read "$apid")
    ac0=$(cpu_ms "$apid")
    nc0=$(cpu_ms "$PID_node")
    t0=$(now_ns)
    if ! "$BIN/bulwark" "$@" --wait --json >"$f" 2>"$f.err"; then
        cat "$f.err" >&2
        die "bulwark $* --wait --json failed"
    fi
    t1=$(now_ns)
    io1=$(io_read "$apid")
    printf -v "${label}_WALL_MS" %s $(((t1 - t0) / 1000000))
    printf -v "${label}_ACPU" %s $(($(cpu_ms "$apid") - ac0))
    printf -v "${label}_NCPU" %s $(($(cpu_ms "$PID_node") - nc0))
    printf -v "${label}_IO" %s $((io1 - io0))
    printf -v "${label}_MS" %s "$(field "$f" duration_ms)"
    printf -v "${label}_KIND" %s "$(field "$f" kind)"
    printf -v "${label}_SENT" %s "$(field "$f" bytes_sent)"
    printf -v "${label}_BLOCKS" %s "$(field "$f" blocks_sent)"
    printf -v "${label}_SCANNED" %s "$(field "$f" blocks_scanned)"
    printf -v "${label}_READ" %s $(($(field "$f" blocks_read) * BLOCK))
    printf -v "${label}_POINT" %s "$(field "$f" point)"
    for m in "${CLI_METRICS[@]}"; do
        local v="${label}_$m"
        rec "$label" "$m" "${!v}"
    done
    local w="${label}_WALL_MS" k="${label}_KIND" b="${label}_BLOCKS" s="${label}_SENT" r="${label}_READ"
    local d="${label}_MS" n="${label}_SCANNED" i="${label}_IO"
    note "$(secs "${!w}") s (agent $(secs "${!d}") s), ${!k}, ${!n} blocks scanned, $(mib "${!r}") read" \
        "($(mib "${!i}") from disk), ${!b} blocks sent ($(mib "${!s}"))"
    # A first (full) sync writes the replica directly; a later one that sent blocks
    # is settled after its acknowledgement.
    if [[ "${!k}" != full && "${!b}" != 0 ]]; then
        wait_until "node settled $label" node "$PID_node" eval '(($(settled_count) > settled0))'
    fi
}

# ---------------------------------------------------------------- full syncs (context)
if ((PART_WRITE)); then
    for s in "$SRC_ON" "$SRC_OFF"; do
        echo "== full sync: bulwark sync $s --wait --json (context)"
        prepare_cache "$WORK/$s.raw"
        timed_cli "FULL_${s//-/_}" "$PID_agent_w" "$WORK/full-$s.json" sync "$s"
    done
fi
if ((PART_REC)); then
    echo "== full sync: bulwark sync $SRC_AL --wait --json (context)"
    prepare_cache "$AL_RAW"
    timed_cli FULL_AL "$PID_agent_al" "$WORK/full-$SRC_AL.json" sync "$SRC_AL"
fi

# ---------------------------------------------------------------- part 1: write path
BENCH_STRIDED=(-c 20000 -d 16 -s 4k -S 8k)
BENCH_LARGE=(-c 1024 -d 16 -s 1M)
SERVERS=()
if ((PART_WRITE)); then
    SERVERS=(on off)
    if [[ -z "$NBDKIT_NOTE" ]]; then
        echo "== nbdkit file plugin serving $KIT_RAW on $KIT_SOCK ($("$NBDKIT" --version))"
        "$NBDKIT" -f -U "$KIT_SOCK" file file="$KIT_RAW" >>"$WORK/nbdkit.log" 2>&1 &
        PID_nbdkit=$!
        PIDS+=("$PID_nbdkit")
        wait_until "nbdkit is listening" nbdkit "$PID_nbdkit" listening "$KIT_SOCK"
        SERVERS+=(kit)
    fi
fi
server_uri() { case $1 in on) echo "$ON_URI" ;; off) echo "$OFF_URI" ;; kit) echo "$KIT_URI" ;; esac; }
server_pid() { case $1 in on | off) echo "$PID_agent_w" ;; kit) echo "$PID_nbdkit" ;; esac; }
server_name() { case $1 in on) echo "activity log on" ;; off) echo "activity log off" ;; kit) echo "nbdkit file" ;; esac; }
# qbench LABEL R SERVER ARGS...: one qemu-img bench run through SERVER's socket; records
# LABEL.S (seconds, as qemu-img bench reports them) and LABEL.CPU (the server's CPU ms).
qbench() {
    local label=$1 r=$2 server=$3 out="$WORK/qemu-img-bench-$1-r$2.out" s c0 c1 pid
    shift 3
    pid=$(server_pid "$server")
    alive "$server server" "$pid"
    sync
    [[ "${BENCH_DROP_CACHES:-0}" != 1 ]] || echo 3 >/proc/sys/vm/drop_caches
    c0=$(cpu_ms "$pid")
    qemu-img bench -f raw -w -t none "$@" "$(server_uri "$server")" >"$out" 2>&1 || {
        cat "$out" >&2
        die "qemu-img bench $* $(server_uri "$server") failed"
    }
    c1=$(cpu_ms "$pid")
    s=$(python3 "$HELPER" bench-secs "$out")
    rec "$label" S "$s"
    rec "$label" CPU $((c1 - c0))
    printf -v QB_LINE '%s %s: %s s (CPU %s ms)' "$QB_LINE" "$server" "$s" $((c1 - c0))
}
# bench_series NAME ARGS...: WRITE_ROUNDS rounds; each runs every server once, the
# order rotated by one every round.
bench_series() {
    local name=$1 r i n=${#SERVERS[@]}
    shift
    for ((r = 1; r <= WRITE_ROUNDS; r++)); do
        QB_LINE=""
        for ((i = 0; i < n; i++)); do
            local server=${SERVERS[(r - 1 + i) % n]}
            qbench "$server-$name" "$r" "$server" "$@"
        done
        note "round $r:$QB_LINE"
    done
}
if ((PART_WRITE)); then
    if [[ "${BENCH_DROP_CACHES:-0}" != 1 ]]; then
        # The benches write the first GiB: all three files start with it cached.
        for f in "$ON_RAW" "$OFF_RAW" "$KIT_RAW"; do
            head -c $((1 << 30)) "$f" >/dev/null
        done
    fi
    echo "== qemu-img bench -f raw -w -t none ${BENCH_STRIDED[*]} (20000 strided 4 KiB writes, depth 16), $WRITE_ROUNDS rounds, servers ${SERVERS[*]} rotating"
    bench_series strided "${BENCH_STRIDED[@]}"
    echo "== qemu-img bench -f raw -w -t none ${BENCH_LARGE[*]} (1 GiB of 1 MiB writes, depth 16), $WRITE_ROUNDS rounds, servers ${SERVERS[*]} rotating"
    bench_series large "${BENCH_LARGE[@]}"
    alive "agent $AGENT_W" "$PID_agent_w"
    W_STATE_FILES="$(cd "$WORK/agent-w" && find . -type f ! -name agent.lock -printf '%P %s bytes; ' | sed 's/; $//')"
    # Part 2 runs alone.
    [[ -n "$NBDKIT_NOTE" ]] || stop_pid "$PID_nbdkit" nbdkit
    stop_pid "$PID_agent_w" "agent $AGENT_W"
fi

# ---------------------------------------------------------------- part 2: kill -9 and recovery
INSANE=""
if ((PART_REC)); then
    REGIONS=$((VOLUME_BYTES / REGION))
    kill9_agent_al() {
        kill -KILL "$PID_agent_al"
        wait "$PID_agent_al" 2>/dev/null || true
        forget_pid "$PID_agent_al"
    }
    source_state() { # sets ST_STATE ST_RECHECK from a fresh `bulwark sources --json`
        ST_STATE="" ST_RECHECK=""
        cli_json "$WORK/sources.json" sources || return 0
        ST_STATE=$(sfield "$SRC_AL" state)
        ST_RECHECK=$(sfield "$SRC_AL" recheck_bytes)
    }
    restarted() { # the new agent's Hello has told the registry what the crash left
        source_state
        [[ "$ST_STATE" = recovering || "$ST_STATE" = inconsistent || "$ST_STATE" = error ]]
    }
    for ((R = 1; R <= ROUNDS; R++)); do
        cmds="$WORK/region-writes-$R.txt"
        python3 "$AHELPER" region-writes "$VOLUME_BYTES" "$REGION" "$HOT_PERCENT" $((SEED + R - 1)) >"$cmds"
        nwrites=$(wc -l <"$cmds")
        wblocks=$(python3 "$AHELPER" write-blocks "$cmds")
        echo "== part 2, round $R of $ROUNDS: $nwrites writes (64 KiB-1 MiB, $wblocks blocks) into $nwrites of $REGIONS 4 MiB regions, with qemu-io through $AL_URI"
        args=()
        while IFS= read -r line; do
            args+=(-c "$line")
        done <"$cmds"
        qemu-io -f raw "${args[@]}" "$AL_URI" >"$WORK/qemu-io-$R.log" 2>&1 || die "qemu-io failed; see $WORK/qemu-io-$R.log"
        ! grep -qi -E 'error|fail' "$WORK/qemu-io-$R.log" || die "qemu-io reported an error; see $WORK/qemu-io-$R.log"
        echo "== round $R: kill -9 of agent $AGENT_AL (pid $PID_agent_al), then start it again"
        kill9_agent_al
        t0=$(now_ns)
        start agent-al bulwark-agent "$WORK/agent-al.toml"
        # `recovering` comes with the new agent's Hello; a stale socket is there until
        # the new agent replaces it, so the export is tried, not just looked for.
        start_ns=$t0
        until restarted; do
            alive "agent $AGENT_AL" "$PID_agent_al"
            (($(now_ns) - start_ns < 30 * 1000000000)) || break
            sleep 0.2
        done
        REC_UP_MS=$((($(now_ns) - t0) / 1000000))
        wait_until "the export is listening again" agent-al "$PID_agent_al" listening "$AL_SOCK"
        wait_until "$AGENT_AL is connected" agent-al "$PID_agent_al" agent_connected "$AGENT_AL"
        rec STATE VALUE "${ST_STATE:-?}"
        rec STATE RECHECK "${ST_RECHECK:--}"
        if [[ "$ST_STATE" = recovering ]]; then
            note "sources --json: $SRC_AL recovering, recheck_bytes ${ST_RECHECK:-(absent)} after $(secs "$REC_UP_MS") s"
        else
            note "sources --json: $SRC_AL is '${ST_STATE:-?}', not recovering ($(secs "$REC_UP_MS") s after the start)"
            INSANE+=" round $R: after kill -9 the source was '${ST_STATE:-?}', not recovering;"
        fi
        [[ "$ST_RECHECK" =~ ^[0-9]+$ && "$ST_RECHECK" -gt 0 ]] ||
            INSANE+=" round $R: recheck_bytes was '${ST_RECHECK:-absent}', not a number > 0;"
        prepare_cache "$AL_RAW"
        echo "== round $R: recovering sync: bulwark sync $SRC_AL --wait --json"
        timed_cli REC "$PID_agent_al" "$WORK/recover-r$R.json" sync "$SRC_AL"
        [[ "$REC_BLOCKS" = "$wblocks" ]] || INSANE+=" round $R: the recovering sync sent $REC_BLOCKS blocks, not the $wblocks written;"
        [[ "$REC_KIND" != full ]] || INSANE+=" round $R: the recovering sync was a full sync;"
        # The registry may learn the cleared flag a moment after the result: 10 s.
        start_ns=$(now_ns)
        until source_state && [[ "$ST_STATE" = ok ]]; do
            (($(now_ns) - start_ns < 10 * 1000000000)) || break
            sleep 0.2
        done
        [[ "$ST_STATE" = ok ]] || INSANE+=" round $R: 10 s after the recovering sync the source was '$ST_STATE', not ok;"
        rec REC WBLOCKS "$wblocks"
    done

    echo "== restore of the newest point (the last recovering sync's, $REC_POINT): bulwark restore $SRC_AL --to FILE --wait --json"
    RESTORED="$WORK/restored.raw"
    t0=$(now_ns)
    cli_json "$WORK/restore.json" restore "$SRC_AL" --to "$RESTORED" --wait ||
        { cat "$WORK/restore.json.err" >&2; die "bulwark restore $SRC_AL failed"; }
    RESTORE_MS=$((($(now_ns) - t0) / 1000000))
    RESTORE_POINT=$(field "$WORK/restore.json" point)
    sync
    if cmp "$AL_RAW" "$RESTORED"; then
        V_RESTORE=PASS
        note "restored point $RESTORE_POINT in $(secs "$RESTORE_MS") s; cmp: equal to the backing file"
    else
        V_RESTORE=FAIL
        note "restored point $RESTORE_POINT in $(secs "$RESTORE_MS") s; cmp: DIFFERS from the backing file"
    fi
    [[ "$RESTORE_POINT" = "$REC_POINT" ]] || INSANE+=" the restore took point $RESTORE_POINT, not the last recovering sync's $REC_POINT;"
    rm -f "$RESTORED"

    prepare_cache "$AL_RAW"
    echo "== full consistency check of the same volume: bulwark check $SRC_AL --wait --json"
    timed_cli CHECK "$PID_agent_al" "$WORK/check.json" check "$SRC_AL"
    [[ "$CHECK_BLOCKS" = 0 ]] || INSANE+=" the full check after the recoveries sent $CHECK_BLOCKS blocks (the recovery missed them);"
    alive "agent $AGENT_AL" "$PID_agent_al"
    AL_STATE_FILES="$(cd "$WORK/agent-al" && find . -type f ! -name agent.lock -printf '%P %s bytes; ' | sed 's/; $//')"
fi
LOAD_END="$(load_line)"

# ---------------------------------------------------------------- summary
echo
echo "Bulwark nbd-filter activity log — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r), $(awk '/^MemTotal:/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
echo "mTLS on 127.0.0.1; work dir on $FS_WORK; page cache: $CACHE_MODE"
echo "machine: at start $LOAD_START; at end $LOAD_END"
VERDICTS=""
tfmt="  %-86s %s\n"
TARGETS=()
target() { # TEXT VERDICT
    # shellcheck disable=SC2059
    TARGETS+=("$(printf "$tfmt" "$1" "$2")")
    VERDICTS+=" $2"
}

if ((PART_WRITE)); then
    echo
    echo "full syncs (context): $SRC_ON $(secs "$FULL_w_on_WALL_MS") s, $SRC_OFF $(secs "$FULL_w_off_WALL_MS") s ($WRITE_MIB MiB each)"
    echo "write path: qemu-img bench -f raw -w -t none through each socket, seconds as qemu-img bench"
    echo "reports them; median of $WRITE_ROUNDS, first round (regions cold), all runs in order; server CPU ms median"
    wfmt="    %-18s median %-7s first %-7s CPU %-6s runs: %s\n"
    for bench in strided large; do
        case $bench in
        strided) echo "  20000 x 4 KiB, stride 8 KiB, depth 16 (${BENCH_STRIDED[*]})" ;;
        large) echo "  1024 x 1 MiB, depth 16 (${BENCH_LARGE[*]})" ;;
        esac
        for server in "${SERVERS[@]}"; do
            # shellcheck disable=SC2059
            printf "$wfmt" "$(server_name "$server")" "$(med "$server-$bench" S)" "$(first "$server-$bench" S)" \
                "$(med "$server-$bench" CPU)" "$(each "$server-$bench" S)"
        done
        [[ -z "$NBDKIT_NOTE" ]] || printf "    %-18s %s\n" "nbdkit file" "$NBDKIT_NOTE"
    done
    echo "  (on and off are served by the same agent; its CPU figure is the whole agent's during the run)"
    echo "  files in the writes agent's state_dir at the end: ${W_STATE_FILES:-none}"
    for bench in strided large; do
        on=$(med "on-$bench" S)
        off=$(med "off-$bench" S)
        case $bench in strided) what="strided 4 KiB" ;; large) what="1 MiB" ;; esac
        target "qemu-img bench $what: activity log on <= off x 1.03 ($on vs $off s, $(pct_diff "$on" "$off")%)" \
            "$(verdict "$on <= $off * 1.03")"
        if [[ -z "$NBDKIT_NOTE" ]]; then
            kit=$(med "kit-$bench" S)
            target "qemu-img bench $what: activity log on <= nbdkit ($on vs $kit s, $(pct_diff "$on" "$kit")%)" \
                "$(verdict "$on <= $kit")"
        else
            target "qemu-img bench $what: activity log on <= nbdkit" SKIPPED
        fi
    done
fi

if ((PART_REC)); then
    REC_WALL_MED=$(med REC WALL_MS)
    REC_READ_MAX=$(maxof REC READ)
    echo
    echo "recovery after kill -9: $SRC_AL, $VOLUME_MIB MiB random data, 64 KiB blocks, $ROUNDS round(s) of"
    echo "$HOT_PERCENT% of its $REGIONS 4 MiB regions written (one 64 KiB-1 MiB write each) before the kill (seed $SEED)"
    echo "  full sync (context): $(secs "$FULL_AL_WALL_MS") s, $(mib "$FULL_AL_READ") read"
    echo "  state after each restart: $(each STATE VALUE); recheck_bytes: $(each STATE RECHECK)"
    rfmt="  %-26s %8s %8s %-12s %8s %12s %12s %8s %8s\n"
    # shellcheck disable=SC2059
    {
        printf "$rfmt" "" "time" "agent" "kind" "blocks" "read" "disk reads" "blocks" "% of"
        printf "$rfmt" "" "s" "s" "" "scanned" "(blocks_read)" "(/proc io)" "sent" "volume"
        printf "$rfmt" "recovering sync (median)" "$(secs "$REC_WALL_MED")" "$(secs "$(med REC MS)")" \
            "$(sort -u "$RES/REC.KIND" | paste -sd/)" "$(med REC SCANNED)" "$(mib "$(med REC READ)")" \
            "$(mib "$(med REC IO)")" "$(med REC BLOCKS)" "$(pct "$(med REC READ)" "$VOLUME_BYTES")"
        printf "$rfmt" "full consistency check" "$(secs "$CHECK_WALL_MS")" "$(secs "$CHECK_MS")" "$CHECK_KIND" \
            "$CHECK_SCANNED" "$(mib "$CHECK_READ")" "$(mib "$CHECK_IO")" "$CHECK_BLOCKS" "$(pct "$CHECK_READ" "$VOLUME_BYTES")"
    }
    echo "  recovering syncs per round: time $(each_s REC WALL_MS) s (agent $(each_s REC MS) s);" \
        "read $(awk '{ printf "%s%.1f", (NR > 1 ? " " : ""), $1 / 1048576 }' "$RES/REC.READ") MiB;" \
        "blocks sent $(each REC BLOCKS) (written $(each REC WBLOCKS)); CPU agent $(each_s REC ACPU) s, node $(each_s REC NCPU) s"
    echo "  full check: CPU agent $(secs "$CHECK_ACPU") s, node $(secs "$CHECK_NCPU") s"
    echo "  restore of the newest point ($RESTORE_POINT) in $(secs "$RESTORE_MS") s, compared with the backing file: $V_RESTORE"
    echo "  files in the recovering agent's state_dir at the end: ${AL_STATE_FILES:-none}"
    echo "  read = blocks_read x 64 KiB as the agent reports it; disk reads = read_bytes of the agent's"
    echo "  /proc/PID/io over the command (0 for what the page cache served)."
    target "recovery after kill -9 reads <= 5% of the volume (worst round $(mib "$REC_READ_MAX"), $(pct "$REC_READ_MAX" "$VOLUME_BYTES")%)" \
        "$(verdict "$REC_READ_MAX <= 0.05 * $VOLUME_BYTES")"
    target "recovery >= 20x faster than a full check ($(secs "$CHECK_WALL_MS") / $(secs "$REC_WALL_MED") s = $(ratio "$CHECK_WALL_MS" "$REC_WALL_MED")x)" \
        "$(verdict "$CHECK_WALL_MS >= 20 * $REC_WALL_MED")"
    target "restore of the newest point after the recoveries = the backing file (cmp)" "$V_RESTORE"
    if [[ -z "$INSANE" ]]; then V_SANE=PASS; else V_SANE=FAIL; fi
    target "sanity: recovering after kill -9 with recheck_bytes; exact blocks sent; source ok; check sent 0" "$V_SANE"
fi

echo
echo "targets"
printf "%s\n" "${TARGETS[@]}"
[[ -z "$INSANE" ]] || echo "  sanity failures:$INSANE"
echo
if [[ "$VERDICTS" == *FAIL* ]]; then
    echo "RESULT: FAIL"
    exit 1
elif [[ "$VERDICTS" == *SKIPPED* ]]; then
    echo "RESULT: INCOMPLETE (a comparison was skipped)"
    exit 1
fi
echo "RESULT: PASS"
