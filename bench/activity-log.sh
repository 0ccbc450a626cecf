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
# Part 1 (BENCH_PARTS has "write"), the write path. Three servers serve the SAME
# random-data raw file of BENCH_WRITE_MIB (w.raw) at the same time: agent
# bench-writes-on's nbd-filter source `w-on` (activity_log = true), agent
# bench-writes-off's source `w-off` (activity_log = false; each agent has its own
# config, certificate and state_dir, so each one's CPU figure is its own), and nbdkit's
# file plugin (`nbdkit -f -U SOCK file file=PATH`). One file because on this VM the
# 1 MiB bench was ~30% slower on one of two identical files whichever served it with
# the log (the slowdown followed the file when the setting was swapped): three files
# measure where the files lie on the disk. Only one server writes at a time and the
# content does not matter, so sharing the file is harmless. Both sources are synced in
# full first (steady state: the tracker has a point to be incremental from; the second
# full sync only reads). Then qemu-img bench -f raw -w -t none runs through each of the
# three sockets:
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
# random-data raw file of BENCH_VOLUME_MIB, synced in full. Then BENCH_ROUNDS rounds,
# each of two crashes, the first measured with a cold page cache and the second with a
# warm one (one crash, warm, when not root); a crash is: write BENCH_HOT_PERCENT% of the
# 4 MiB regions (seeded choice; one write of 64 KiB to 1 MiB per chosen region, a byte
# pattern, with qemu-io through the export), kill -9 the agent, start it again, check
# that `bulwark sources --json` shows b-al `recovering` with `recheck_bytes`, and time
# the recovering sync (`bulwark sync b-al --wait --json`). After the rounds: restore
# the newest point (the last recovering sync's) with `bulwark restore b-al --to FILE
# --wait --json` and cmp it with the backing file; then time a full consistency check
# of the same volume (`bulwark check b-al --wait --json`), cold and then warm, which
# must find nothing left to send. For the recovering syncs and the checks: wall time
# around the CLI, the agent's duration_ms, bytes read (blocks_read x 64 KiB, as the
# agent reports it, and read_bytes of the agent's /proc/PID/io: disk reads, 0 for what
# the page cache served), blocks sent.
#   cold: sync; echo 3 > /proc/sys/vm/drop_caches (root only), then the CLI binary is
#         read back (it is not the volume): the volume is not in RAM, as on a real
#         multi-TB host, where a full check is hours of reads.
#   warm: the whole backing file is read just before: with 4 GiB in RAM a full check is
#         CPU-bound (~0.5 s here) and the recovery's fixed costs (CLI, mTLS, gRPC, ~0.05
#         s) dominate, so the warm ratio is printed as context only.
#
# Targets:
#   qemu-img bench, both benches: activity log on <= off x 1.03    (medians)
#   qemu-img bench, both benches: activity log on <= nbdkit file   (medians)
#   recovery after kill -9 reads <= 5% of the volume  (blocks_read x 64 KiB, worst
#       recovering sync, cold or warm)
#   recovery after kill -9 >= 20x faster than a full consistency check of the same
#       volume, both with a COLD page cache (CLI wall times; the cold recoveries'
#       median); SKIPPED when not root (the cache cannot be dropped)
# Also required (sanity): after each kill -9 the source is `recovering` with
# recheck_bytes > 0; each recovering sync sends exactly the blocks written in that round
# and leaves the source `ok`; the restore of the newest point equals the backing file
# (cmp); the full checks after the recoveries send no block.
# Exit status: 0 when everything passes, 1 when something fails (or was skipped, e.g.
# nbdkit missing or not root), 2 on an error of the benchmark itself.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp       where the work directory is made (a disk, not tmpfs; needs
#                            about 3 x BENCH_VOLUME_MIB + 4 x BENCH_WRITE_MIB free)
#   BENCH_PARTS=write,recovery   which parts to run
#   BENCH_VOLUME_MIB=4096    size of part 2's volume, MiB (>= 64)
#   BENCH_WRITE_MIB=1024     size of part 1's file, MiB (>= 1024: the 1 MiB bench
#                            writes the first GiB)
#   BENCH_WRITE_ROUNDS=11    qemu-img bench rounds (each runs all three servers)
#   BENCH_ROUNDS=3           rounds of part 2, each a cold and a warm crash (write +
#                            kill -9 + recovering sync)
#   BENCH_HOT_PERCENT=1      % of part 2's 4 MiB regions written before each kill -9
#   BENCH_SEED=1             seed of the data and of the chosen regions (crash N of
#                            part 2, counted from 1, uses BENCH_SEED + N - 1)
#   BENCH_BIN_DIR=DIR        use the binaries in DIR (e.g. target/release) instead of
#                            building them with cargo build --release
#   BENCH_DROP_CACHES=1      part 1 and the full syncs: drop the page cache (root only)
#                            before each full sync and each qemu-img bench run. Default:
#                            warm, i.e. a full sync's file is read once just before it,
#                            and the first GiB of part 1's file once before the first
#                            run. (Part 2 measures both, cold when root, whatever this is.)
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
AGENT_WON="bench-writes-on"
AGENT_WOFF="bench-writes-off"
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
# Part 2's cold measurements drop the page cache: root only.
COLD_NOTE=""
if ((PART_REC)) && [[ $(id -u) -ne 0 ]]; then
    COLD_NOTE="SKIPPED: not root, so the page cache cannot be dropped (/proc/sys/vm/drop_caches)"
fi
LOAD_START="$(load_line)"

# ---------------------------------------------------------------- binaries
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_binaries

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
# Part 1: one file + two replicas (+ deltas); part 2: the volume, its replica (+ small
# deltas) and one restored copy; 1 GiB to spare.
need_kib=$((1024 * 1024))
((PART_WRITE == 0)) || need_kib=$((need_kib + WRITE_BYTES * 4 / 1024))
((PART_REC == 0)) || need_kib=$((need_kib + VOLUME_BYTES * 31 / 10240))
avail_kib="$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')"
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

if [[ "${BENCH_DROP_CACHES:-0}" = 1 ]]; then
    CACHE_MODE="part 1 and full syncs: dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each timed step"
else
    CACHE_MODE="part 1 and full syncs: warm (the file a full sync reads is read once just before it)"
fi
if ((PART_REC)); then
    if [[ -z "$COLD_NOTE" ]]; then
        CACHE_MODE+="; part 2: cold and warm"
    else
        CACHE_MODE+="; part 2: warm only (not root)"
    fi
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

# cold_cache: part 2's cold state: nothing of the volume in RAM. The CLI binary is
# read back (it is not the volume; the agent, node and coordinator run, so their text
# stays mapped).
cold_cache() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cat "$BIN/bulwark" >/dev/null
}
# warm_cache FILE: part 2's warm state: all of FILE in RAM.
warm_cache() {
    sync
    cat "$1" >/dev/null
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
# Part 1's three servers all serve this one file (see the header).
W_RAW="$WORK/w.raw"
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
    echo "== part 1 file: $WRITE_MIB MiB of random data (seed $SEED): w.raw, served by w-on, w-off and nbdkit"
    random_file "$W_RAW" "$WRITE_BYTES" "$SEED"
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
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT_WON" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT_WOFF" --days 2 >/dev/null
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
# Two agents on the same file: within one agent two sources on one path may be
# refused; across agents nothing knows.
{
    echo "name = \"$AGENT_WON\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent-w-on\""
    source_toml "$SRC_ON" "$W_RAW" "$ON_SOCK" true
    tls "$AGENT_WON"
} >"$WORK/agent-w-on.toml"
{
    echo "name = \"$AGENT_WOFF\""
    echo "coordinator = \"https://127.0.0.1:$CPORT\""
    echo "state_dir = \"$WORK/agent-w-off\""
    source_toml "$SRC_OFF" "$W_RAW" "$OFF_SOCK" false
    tls "$AGENT_WOFF"
} >"$WORK/agent-w-off.toml"
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
    echo "== starting agent $AGENT_WON ($SRC_ON: activity_log = true) and agent $AGENT_WOFF ($SRC_OFF: activity_log = false), both on $W_RAW"
    start agent-w-on bulwark-agent "$WORK/agent-w-on.toml"
    start agent-w-off bulwark-agent "$WORK/agent-w-off.toml"
    wait_until "$AGENT_WON is connected" agent-w-on "$PID_agent_w_on" agent_connected "$AGENT_WON"
    wait_until "$AGENT_WOFF is connected" agent-w-off "$PID_agent_w_off" agent_connected "$AGENT_WOFF"
    wait_until "$SRC_ON, $SRC_OFF are placed" agent-w-on "$PID_agent_w_on" placed "$SRC_ON" "$SRC_OFF"
    wait_until "$SRC_ON's export is listening" agent-w-on "$PID_agent_w_on" listening "$ON_SOCK"
    wait_until "$SRC_OFF's export is listening" agent-w-off "$PID_agent_w_off" listening "$OFF_SOCK"
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
    # The same file: the second full sync only reads it.
    echo "== full sync: bulwark sync $SRC_ON --wait --json (context)"
    prepare_cache "$W_RAW"
    timed_cli FULL_w_on "$PID_agent_w_on" "$WORK/full-$SRC_ON.json" sync "$SRC_ON"
    echo "== full sync: bulwark sync $SRC_OFF --wait --json (context)"
    prepare_cache "$W_RAW"
    timed_cli FULL_w_off "$PID_agent_w_off" "$WORK/full-$SRC_OFF.json" sync "$SRC_OFF"
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
        echo "== nbdkit file plugin serving $W_RAW on $KIT_SOCK ($("$NBDKIT" --version))"
        "$NBDKIT" -f -U "$KIT_SOCK" file file="$W_RAW" >>"$WORK/nbdkit.log" 2>&1 &
        PID_nbdkit=$!
        PIDS+=("$PID_nbdkit")
        wait_until "nbdkit is listening" nbdkit "$PID_nbdkit" listening "$KIT_SOCK"
        SERVERS+=(kit)
    fi
fi
server_uri() { case $1 in on) echo "$ON_URI" ;; off) echo "$OFF_URI" ;; kit) echo "$KIT_URI" ;; esac; }
server_pid() { case $1 in on) echo "$PID_agent_w_on" ;; off) echo "$PID_agent_w_off" ;; kit) echo "$PID_nbdkit" ;; esac; }
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
        # The benches write the first GiB: it starts cached.
        head -c $((1 << 30)) "$W_RAW" >/dev/null
    fi
    echo "== qemu-img bench -f raw -w -t none ${BENCH_STRIDED[*]} (20000 strided 4 KiB writes, depth 16), $WRITE_ROUNDS rounds, servers ${SERVERS[*]} rotating"
    bench_series strided "${BENCH_STRIDED[@]}"
    echo "== qemu-img bench -f raw -w -t none ${BENCH_LARGE[*]} (1 GiB of 1 MiB writes, depth 16), $WRITE_ROUNDS rounds, servers ${SERVERS[*]} rotating"
    bench_series large "${BENCH_LARGE[@]}"
    alive "agent $AGENT_WON" "$PID_agent_w_on"
    alive "agent $AGENT_WOFF" "$PID_agent_w_off"
    WON_STATE_FILES="$(cd "$WORK/agent-w-on" && find . -type f ! -name agent.lock -printf '%P %s bytes; ' | sed 's/; $//')"
    WOFF_STATE_FILES="$(cd "$WORK/agent-w-off" && find . -type f ! -name agent.lock -printf '%P %s bytes; ' | sed 's/; $//')"
    # Part 2 runs alone.
    [[ -n "$NBDKIT_NOTE" ]] || stop_pid "$PID_nbdkit" nbdkit
    stop_pid "$PID_agent_w_off" "agent $AGENT_WOFF"
    stop_pid "$PID_agent_w_on" "agent $AGENT_WON"
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
    # crash N MODE: crash number N (seed SEED + N - 1): writes, kill -9, restart, and
    # the recovering sync timed with a MODE (cold|warm) page cache, recorded as
    # REC_COLD or REC_WARM; REC_LAST_POINT is its point.
    crash() {
        local n=$1 mode=$2 label cmds nwrites wblocks line args=() t0 start_ns bl kd
        label="REC_${mode^^}"
        cmds="$WORK/region-writes-$n.txt"
        python3 "$AHELPER" region-writes "$VOLUME_BYTES" "$REGION" "$HOT_PERCENT" $((SEED + n - 1)) >"$cmds"
        nwrites=$(wc -l <"$cmds")
        wblocks=$(python3 "$AHELPER" write-blocks "$cmds")
        echo "== part 2, crash $n of $CRASHES ($mode): $nwrites writes (64 KiB-1 MiB, $wblocks blocks) into $nwrites of $REGIONS 4 MiB regions, with qemu-io through $AL_URI"
        while IFS= read -r line; do
            args+=(-c "$line")
        done <"$cmds"
        qemu-io -f raw "${args[@]}" "$AL_URI" >"$WORK/qemu-io-$n.log" 2>&1 || die "qemu-io failed; see $WORK/qemu-io-$n.log"
        ! grep -qi -E 'error|fail' "$WORK/qemu-io-$n.log" || die "qemu-io reported an error; see $WORK/qemu-io-$n.log"
        echo "== crash $n: kill -9 of agent $AGENT_AL (pid $PID_agent_al), then start it again"
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
            INSANE+=" crash $n: after kill -9 the source was '${ST_STATE:-?}', not recovering;"
        fi
        [[ "$ST_RECHECK" =~ ^[0-9]+$ && "$ST_RECHECK" -gt 0 ]] ||
            INSANE+=" crash $n: recheck_bytes was '${ST_RECHECK:-absent}', not a number > 0;"
        if [[ $mode = cold ]]; then cold_cache; else warm_cache "$AL_RAW"; fi
        echo "== crash $n: recovering sync, $mode page cache: bulwark sync $SRC_AL --wait --json"
        timed_cli "$label" "$PID_agent_al" "$WORK/recover-$n.json" sync "$SRC_AL"
        bl="${label}_BLOCKS" kd="${label}_KIND"
        [[ "${!bl}" = "$wblocks" ]] || INSANE+=" crash $n: the recovering sync sent ${!bl} blocks, not the $wblocks written;"
        [[ "${!kd}" != full ]] || INSANE+=" crash $n: the recovering sync was a full sync;"
        # The registry may learn the cleared flag a moment after the result: 10 s.
        start_ns=$(now_ns)
        until source_state && [[ "$ST_STATE" = ok ]]; do
            (($(now_ns) - start_ns < 10 * 1000000000)) || break
            sleep 0.2
        done
        [[ "$ST_STATE" = ok ]] || INSANE+=" crash $n: 10 s after the recovering sync the source was '$ST_STATE', not ok;"
        rec "$label" WBLOCKS "$wblocks"
        rec REC READ "$(tail -n 1 "$RES/$label.READ")"
        local p="${label}_POINT"
        REC_LAST_POINT=${!p}
    }
    MODES=(warm)
    [[ -n "$COLD_NOTE" ]] || MODES=(cold warm)
    CRASHES=$((ROUNDS * ${#MODES[@]}))
    N=0
    for ((R = 1; R <= ROUNDS; R++)); do
        for mode in "${MODES[@]}"; do
            N=$((N + 1))
            crash "$N" "$mode"
        done
    done

    echo "== restore of the newest point (the last recovering sync's, $REC_LAST_POINT): bulwark restore $SRC_AL --to FILE --wait --json"
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
    [[ "$RESTORE_POINT" = "$REC_LAST_POINT" ]] || INSANE+=" the restore took point $RESTORE_POINT, not the last recovering sync's $REC_LAST_POINT;"
    rm -f "$RESTORED"

    for mode in "${MODES[@]}"; do
        if [[ $mode = cold ]]; then cold_cache; else warm_cache "$AL_RAW"; fi
        label="CHECK_${mode^^}"
        echo "== full consistency check of the same volume, $mode page cache: bulwark check $SRC_AL --wait --json"
        timed_cli "$label" "$PID_agent_al" "$WORK/check-$mode.json" check "$SRC_AL"
        bl="${label}_BLOCKS"
        [[ "${!bl}" = 0 ]] || INSANE+=" the $mode full check after the recoveries sent ${!bl} blocks (the recovery missed them);"
    done
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
tfmt="  %-96s %s\n"
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
    echo "  (on, off and nbdkit serve the same file, $WRITE_MIB MiB; on and off are two agents, each CPU figure its own)"
    echo "  files in the state_dir at the end: $AGENT_WON: ${WON_STATE_FILES:-none}; $AGENT_WOFF: ${WOFF_STATE_FILES:-none}"
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
    REC_READ_MAX=$(maxof REC READ)
    echo
    echo "recovery after kill -9: $SRC_AL, $VOLUME_MIB MiB random data, 64 KiB blocks, $ROUNDS round(s) of"
    echo "$(if [[ -z "$COLD_NOTE" ]]; then echo "two crashes (cold, warm)"; else echo "one crash (warm)"; fi)," \
        "each $HOT_PERCENT% of its $REGIONS 4 MiB regions written (one 64 KiB-1 MiB write each) before kill -9 (seed $SEED)"
    echo "  full sync (context): $(secs "$FULL_AL_WALL_MS") s, $(mib "$FULL_AL_READ") read"
    echo "  state after each restart: $(each STATE VALUE); recheck_bytes: $(each STATE RECHECK)"
    [[ -n "$COLD_NOTE" ]] || echo "  cold: sync; echo 3 > /proc/sys/vm/drop_caches just before (the CLI binary read back);"
    echo "  warm: the whole backing file read just before"
    rfmt="  %-31s %8s %8s %-12s %8s %12s %12s %8s %8s\n"
    # shellcheck disable=SC2059
    {
        printf "$rfmt" "" "time" "agent" "kind" "blocks" "read" "disk reads" "blocks" "% of"
        printf "$rfmt" "" "s" "s" "" "scanned" "(blocks_read)" "(/proc io)" "sent" "volume"
        for mode in "${MODES[@]}"; do
            l="REC_${mode^^}"
            printf "$rfmt" "recovering sync, $mode (median)" "$(secs "$(med "$l" WALL_MS)")" "$(secs "$(med "$l" MS)")" \
                "$(sort -u "$RES/$l.KIND" | paste -sd/)" "$(med "$l" SCANNED)" "$(mib "$(med "$l" READ)")" \
                "$(mib "$(med "$l" IO)")" "$(med "$l" BLOCKS)" "$(pct "$(med "$l" READ)" "$VOLUME_BYTES")"
        done
        for mode in "${MODES[@]}"; do
            l="CHECK_${mode^^}"
            printf "$rfmt" "full consistency check, $mode" "$(secs "$(med "$l" WALL_MS)")" "$(secs "$(med "$l" MS)")" \
                "$(sort -u "$RES/$l.KIND" | paste -sd/)" "$(med "$l" SCANNED)" "$(mib "$(med "$l" READ)")" "$(mib "$(med "$l" IO)")" \
                "$(med "$l" BLOCKS)" "$(pct "$(med "$l" READ)" "$VOLUME_BYTES")"
        done
    }
    for mode in "${MODES[@]}"; do
        l="REC_${mode^^}"
        echo "  recovering syncs, $mode, in order: time $(each_s "$l" WALL_MS) s (agent $(each_s "$l" MS) s);" \
            "read $(awk '{ printf "%s%.1f", (NR > 1 ? " " : ""), $1 / 1048576 }' "$RES/$l.READ") MiB" \
            "(disk $(awk '{ printf "%s%.1f", (NR > 1 ? " " : ""), $1 / 1048576 }' "$RES/$l.IO") MiB);" \
            "blocks sent $(each "$l" BLOCKS) (written $(each "$l" WBLOCKS)); CPU agent $(each_s "$l" ACPU) s, node $(each_s "$l" NCPU) s"
    done
    for mode in "${MODES[@]}"; do
        l="CHECK_${mode^^}"
        echo "  full check, $mode: CPU agent $(each_s "$l" ACPU) s, node $(each_s "$l" NCPU) s"
    done
    echo "  restore of the newest point ($RESTORE_POINT) in $(secs "$RESTORE_MS") s, compared with the backing file: $V_RESTORE"
    echo "  files in the recovering agent's state_dir at the end: ${AL_STATE_FILES:-none}"
    echo "  read = blocks_read x 64 KiB as the agent reports it; disk reads = read_bytes of the agent's"
    echo "  /proc/PID/io over the command (0 for what the page cache served)."
    REC_WARM_MED=$(med REC_WARM WALL_MS)
    CHECK_WARM_MS=$(med CHECK_WARM WALL_MS)
    WARM_RATIO="$(secs "$CHECK_WARM_MS") / $(secs "$REC_WARM_MED") s = $(ratio "$CHECK_WARM_MS" "$REC_WARM_MED")x"
    echo "  warm page cache (context, not a target): full check / recovering sync = $WARM_RATIO"
    if [[ -z "$COLD_NOTE" ]]; then
        REC_COLD_MED=$(med REC_COLD WALL_MS)
        CHECK_COLD_MS=$(med CHECK_COLD WALL_MS)
        echo "  cold page cache (the target): full check / recovering sync =" \
            "$(secs "$CHECK_COLD_MS") / $(secs "$REC_COLD_MED") s = $(ratio "$CHECK_COLD_MS" "$REC_COLD_MED")x"
    fi
    target "recovery after kill -9 reads <= 5% of the volume (worst crash $(mib "$REC_READ_MAX"), $(pct "$REC_READ_MAX" "$VOLUME_BYTES")%)" \
        "$(verdict "$REC_READ_MAX <= 0.05 * $VOLUME_BYTES")"
    if [[ -z "$COLD_NOTE" ]]; then
        target "recovery >= 20x faster than a full check, cold cache ($(secs "$CHECK_COLD_MS") / $(secs "$REC_COLD_MED") s = $(ratio "$CHECK_COLD_MS" "$REC_COLD_MED")x; warm $(ratio "$CHECK_WARM_MS" "$REC_WARM_MED")x)" \
            "$(verdict "$CHECK_COLD_MS >= 20 * $REC_COLD_MED")"
    else
        target "recovery >= 20x faster than a full check, cold cache: ${COLD_NOTE#SKIPPED: } (warm $WARM_RATIO)" SKIPPED
    fi
    target "restore of the newest point after the recoveries = the backing file (cmp)" "$V_RESTORE"
    if [[ -z "$INSANE" ]]; then V_SANE=PASS; else V_SANE=FAIL; fi
    target "sanity: recovering after kill -9 with recheck_bytes; exact blocks sent; source ok; checks sent 0" "$V_SANE"
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
