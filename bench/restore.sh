#!/usr/bin/env bash
# Acceptance benchmark: restore throughput of the newest point and of a 10-points-old
# point of a 2 GiB volume, beside `restic restore` and `borg extract` of the same data
# and the machine's durable-write rate, all measured in the same run.
#
# A coordinator, one storage node and one agent run as real processes on 127.0.0.1
# with mTLS. The agent protects a random-data volume (tracker fingerprint, 64 KiB
# blocks): one full sync (point A), then 10 rounds of "rewrite 2% of the blocks at
# seeded random places, sync" (the last sync makes point B; A is 10 points older).
# restic and borg each back up the volume at state A and at state B (two snapshots /
# archives in one repository). Then, each with the page cache dropped before
# (sync; echo 3 > /proc/sys/vm/drop_caches) and each restored file fsync'd before the
# clock stops, timed:
#   bulwark restore SRC --point B|A --to FILE --wait --json   (agent writes; it fsyncs
#                                                            before it reports)
#   bulwark export  SRC --point B|A --to FILE --json          (the CLI reads from the
#                                                            node and writes; fsyncs)
#   restic restore SNAPSHOT --target DIR, then fsync
#   cd DIR && borg extract REPO::ARCHIVE, then fsync
# Every restored file is checked against the SHA-256 of the volume at that state.
# The durable-write rate: dd if=VOLUME of=FILE bs=4M conv=fsync with the volume in the
# page cache (only the write is timed), once before and once after the restores; the
# mean is the reference. For context only: the same dd with oflag=direct, and a cold
# copy (cache dropped; cp + fsync, reading and writing the same disk, as a restore
# does). On a VM these can differ from the reference several-fold (page-cache page
# allocation costs), so read the percentages with them in view.
#
# Targets:
#   bulwark restore, newest point        >= 80% of the durable-write rate
#   bulwark restore, 10-points-old point >= 60% of the durable-write rate
#   both                                  faster than restic restore of the same state
# Exit status: 0 when every target is met, 1 when one is missed (or a restore failed or
# restored wrong data), 2 on an error of the benchmark itself.
#
# Environment (all optional):
#   BENCH_DIR=/var/tmp         where the work directory is made (needs ~7 x the volume
#                              size free; use a disk, not tmpfs)
#   BENCH_VOLUME_MIB=2048      volume size in MiB
#   BENCH_SEED=1               seed of the volume data and of the rewrites
#   BENCH_BIN_DIR=DIR          use the binaries in DIR instead of building them
#   BENCH_BORG_ENCRYPTION=repokey-blake2   borg init --encryption (none, repokey, ...)
#   BENCH_KEEP=1               keep the work directory
#   CARGO_TARGET_DIR           honoured as by cargo
#
# Needs root (drop_caches), python3, restic, borg (installed with apt-get, or pip, when
# missing).
#
# Usage: bench/restore.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/bench/restore_helper.py"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
VOLUME_MIB="${BENCH_VOLUME_MIB:-2048}"
SEED="${BENCH_SEED:-1}"
BORG_ENC="${BENCH_BORG_ENCRYPTION:-repokey-blake2}"
BLOCK=65536
ROUNDS=10
SOURCE=bench-volume
NODE=bench-node
AGENT=bench-host
export LC_ALL=C
T_START=$(date +%s)

die() {
    echo "restore-bench: $*" >&2
    exit 2
}
note() { echo "   $*"; }
now_ns() { date +%s%N; }
mb_per_s() { awk -v b="$1" -v ms="$2" 'BEGIN { if (ms <= 0) print "inf"; else printf "%.1f", b / 1e6 / (ms / 1000) }'; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

[[ "$VOLUME_MIB" =~ ^[0-9]+$ && "$VOLUME_MIB" -ge 64 ]] || die "BENCH_VOLUME_MIB must be a whole number >= 64"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a whole number"
[[ $(id -u) -eq 0 ]] || die "needs root (it drops the page cache before each timed step)"
command -v python3 >/dev/null || die "python3 is needed (for $HELPER)"
command -v cargo >/dev/null || [[ -n "${BENCH_BIN_DIR:-}" ]] || die "cargo is needed (or set BENCH_BIN_DIR)"
command -v restic >/dev/null || die "restic is needed (apt-get install restic)"
if ! command -v borg >/dev/null; then
    echo "== borg is not installed: apt-get install -y borgbackup"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q borgbackup >/var/tmp/bulwark-bench-borg-apt.log 2>&1 ||
        { apt-get update -q >>/var/tmp/bulwark-bench-borg-apt.log 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q borgbackup >>/var/tmp/bulwark-bench-borg-apt.log 2>&1; } ||
        pip install -q borgbackup >>/var/tmp/bulwark-bench-borg-apt.log 2>&1 ||
        die "cannot install borg (see /var/tmp/bulwark-bench-borg-apt.log)"
    command -v borg >/dev/null || die "borg is still not on PATH after installing it"
fi

# ---------------------------------------------------------------- binaries
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_binaries

# ---------------------------------------------------------------- work directory
mkdir -p "$BENCH_DIR"
WORK="$(mktemp -d "$BENCH_DIR/bulwark-restore.XXXXXX")"
PIDS=()
stop_pid() { # PID: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "restore-bench: process $pid did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
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
    echo "(benchmark took $(($(date +%s) - T_START)) s)"
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
*tmpfs*|*ramfs*) note "WARNING: $WORK is in memory; the durable-write rate means little here" ;;
esac
VOLUME_BYTES=$((VOLUME_MIB * 1024 * 1024))
# volume, node replica (+ ~20% deltas), restic repo, borg repo, one restored copy,
# the dd file: ~6.5 x.
avail_kib="$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')"
need_kib=$((VOLUME_BYTES / 1024 * 7))
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1024)) MiB free, needs about $((need_kib / 1024)) MiB"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# ---------------------------------------------------------------- the volume
VOLUME="$WORK/volume.img"
BLOCKS=$((VOLUME_BYTES / BLOCK))
REWRITES=$((BLOCKS / 50))
((REWRITES > 0)) || REWRITES=1
echo "== volume: $VOLUME_MIB MiB of random data ($BLOCKS blocks of 64 KiB), seed $SEED"
t0=$(now_ns)
{ openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:bulwark-restore-$SEED" </dev/zero 2>/dev/null || true; } |
    head -c "$VOLUME_BYTES" >"$VOLUME"
[[ $(stat -c %s "$VOLUME") -eq $VOLUME_BYTES ]] || die "could not write $VOLUME_BYTES random bytes to $VOLUME"
sync
note "written in $(secs $((($(now_ns) - t0) / 1000000))) s"

# ---------------------------------------------------------------- PKI and configs
PKI="$WORK/pki"
"$BIN/bulwark" pki init --dir "$PKI" --trust-domain bench.bulwark >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role coordinator --name coordinator --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role node --name "$NODE" --ip 127.0.0.1 --dns localhost --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role agent --name "$AGENT" --days 2 >/dev/null
"$BIN/bulwark" pki issue --dir "$PKI" --role admin --name bench-admin --days 2 >/dev/null

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
wait_until "$SOURCE is placed" agent "$PID_agent" \
    eval 'cli_json "$WORK/sources.json" sources && python3 "$HELPER" source-node "$WORK/sources.json" "$SOURCE" >/dev/null'

field() { python3 "$HELPER" get "$1" "$2"; }
cpu_ms() { python3 "$HELPER" cpu-ms "$1"; }
sync_now() { # FILE : bulwark sync --wait --json into FILE
    "$BIN/bulwark" sync "$SOURCE" --wait --json >"$1" 2>"$1.err" || {
        cat "$1.err" >&2
        die "bulwark sync $SOURCE failed"
    }
}

# ---------------------------------------------------------------- peers' repositories
RESTIC_REPO="$WORK/restic-repo"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$WORK/restic-cache"
BORG_REPO_DIR="$WORK/borg-repo"
export BORG_PASSPHRASE=bench BORG_BASE_DIR="$WORK/borg-base"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
restic init --repo "$RESTIC_REPO" >"$WORK/restic-init.log" 2>&1 || die "restic init failed; see $WORK/restic-init.log"
borg init --encryption="$BORG_ENC" "$BORG_REPO_DIR" >"$WORK/borg-init.log" 2>&1 || die "borg init failed; see $WORK/borg-init.log"
peer_backups() { # STATE: a restic snapshot and a borg archive of the volume as it is now
    local state=$1 t0
    t0=$(now_ns)
    (cd "$WORK" && restic backup --repo "$RESTIC_REPO" --json volume.img) >"$WORK/restic-$state.json" 2>"$WORK/restic-$state.err" ||
        die "restic backup failed: $(tail -n 3 "$WORK/restic-$state.err")"
    printf -v "RESTIC_SNAP_$state" %s "$(python3 "$HELPER" restic-summary "$WORK/restic-$state.json" snapshot_id)"
    note "restic backup ($state): $(secs $((($(now_ns) - t0) / 1000000))) s"
    t0=$(now_ns)
    (cd "$WORK" && borg create "$BORG_REPO_DIR::state-$state" volume.img) >"$WORK/borg-$state.log" 2>&1 ||
        die "borg create failed: $(tail -n 3 "$WORK/borg-$state.log")"
    note "borg create ($state): $(secs $((($(now_ns) - t0) / 1000000))) s"
}

# ---------------------------------------------------------------- point A: full sync
echo "== full sync (point A), then restic backup and borg create of the same state"
t0=$(now_ns)
sync_now "$WORK/sync-0.json"
POINT_OLD=$(field "$WORK/sync-0.json" point)
note "point $POINT_OLD ($(field "$WORK/sync-0.json" kind)) in $(secs $((($(now_ns) - t0) / 1000000))) s"
SHA_OLD=$(sha256sum "$VOLUME" | cut -d' ' -f1)
peer_backups OLD

# ---------------------------------------------------------------- 10 rounds
echo "== $ROUNDS rounds: rewrite $REWRITES random 64 KiB blocks (2%), sync"
for ((r = 1; r <= ROUNDS; r++)); do
    python3 "$HELPER" rewrite "$VOLUME" "$BLOCK" "$REWRITES" $((SEED * 1000 + r))
    t0=$(now_ns)
    sync_now "$WORK/sync-$r.json"
    note "round $r: point $(field "$WORK/sync-$r.json" point), $(field "$WORK/sync-$r.json" blocks_sent) blocks sent, $(secs $((($(now_ns) - t0) / 1000000))) s"
done
POINT_NEW=$(field "$WORK/sync-$ROUNDS.json" point)
SHA_NEW=$(sha256sum "$VOLUME" | cut -d' ' -f1)
[[ "$SHA_NEW" != "$SHA_OLD" ]] || die "the volume did not change"
cli_json "$WORK/points.json" points "$SOURCE" || die "bulwark points failed: $(cat "$WORK/points.json.err")"
mapfile -t POINT_IDS < <(python3 "$HELPER" point-ids "$WORK/points.json")
note "points on the node: ${POINT_IDS[*]}"
printf '%s\n' "${POINT_IDS[@]}" | grep -qx "$POINT_OLD" || die "point $POINT_OLD is gone from the node"
printf '%s\n' "${POINT_IDS[@]}" | grep -qx "$POINT_NEW" || die "point $POINT_NEW is not listed"
AGE=0
for p in "${POINT_IDS[@]}"; do ((p > POINT_OLD && p <= POINT_NEW)) && AGE=$((AGE + 1)); done
note "point $POINT_OLD is $AGE points older than point $POINT_NEW"
peer_backups NEW

# ---------------------------------------------------------------- durable-write rate
# The volume is in the page cache before each run (cat > /dev/null), so only the
# write is timed; random bytes, as a virtual disk may store zeros for free.
DD_RUNS=()
dd_run() {
    local out ms
    cat "$VOLUME" >/dev/null
    sync
    out="$(dd if="$VOLUME" of="$WORK/dd-test" bs=4M conv=fsync 2>&1)"
    rm -f "$WORK/dd-test"
    sync
    note "dd: ${out##*$'\n'}"
    ms="$(tail -n 1 <<<"$out" | awk -F', ' '{ split($(NF-1), a, " "); printf "%d", a[1] * 1000 }')"
    ((ms > 0)) || die "cannot read dd's time from: $out"
    DD_RUNS+=("$ms")
}
echo "== durable-write rate, run 1: dd if=volume (cached) of=FILE bs=4M conv=fsync"
dd_run
echo "== cold copy (context): drop caches; cp volume FILE; fsync"
drop_caches
python3 "$HELPER" timed /dev/null "$WORK/cp.err" "$WORK/cold-copy" cp "$VOLUME" "$WORK/cold-copy" >"$WORK/cp.time" ||
    die "cp failed: $(cat "$WORK/cp.err")"
read -r COLD_MS _ <"$WORK/cp.time"
rm -f "$WORK/cold-copy"
COLD_MBS=$(mb_per_s "$VOLUME_BYTES" "$COLD_MS")
note "$(secs "$COLD_MS") s, $COLD_MBS MB/s"

# ---------------------------------------------------------------- timed restores
OUT="$WORK/out"
mkdir -p "$OUT"
ROWS=()        # "method|point|ms|cpu tool/node/agent/coord|check"
declare -A MS_OF CHECK_OF
# measure KEY METHOD POINTLABEL SHA SYNCPATH RESULTPATH-OR-DIR CMD...
measure() {
    local key=$1 method=$2 plabel=$3 sha=$4 syncpath=$5 result=$6
    shift 6
    local nc0 ac0 cc0 wall cpu rss fs rc=0 got check file nc ac cc
    rm -rf "$OUT"/*
    drop_caches
    nc0=$(cpu_ms "$PID_node")
    ac0=$(cpu_ms "$PID_agent")
    cc0=$(cpu_ms "$PID_coordinator")
    echo "== $method, point $plabel"
    python3 "$HELPER" timed "$WORK/$key.out" "$WORK/$key.err" "$syncpath" "$@" >"$WORK/$key.time" || rc=$?
    read -r wall cpu rss fs <"$WORK/$key.time" || die "no timing for $method (see $WORK/$key.err)"
    nc=$(($(cpu_ms "$PID_node") - nc0))
    ac=$(($(cpu_ms "$PID_agent") - ac0))
    cc=$(($(cpu_ms "$PID_coordinator") - cc0))
    if [[ "$rc" != 0 ]]; then
        check="FAILED (exit $rc): $(grep -v '^ *$' "$WORK/$key.err" | tail -n 1)"
        echo "   $check"
        sed 's/^/   | /' "$WORK/$key.err" | tail -n 20
        MS_OF[$key]=0
    else
        if [[ -d "$result" ]]; then file=$(python3 "$HELPER" one-file "$result"); else file=$result; fi
        got=$(sha256sum "$file" | cut -d' ' -f1)
        if [[ "$got" = "$sha" ]]; then check=ok; else check="WRONG DATA (sha256 $got)"; fi
        note "$(secs "$wall") s (fsync after the tool: $(secs "$fs") s), $(mb_per_s "$VOLUME_BYTES" "$wall") MB/s; CPU s: tool $(secs "$cpu"), node $(secs "$nc"), agent $(secs "$ac"), coordinator $(secs "$cc"); tool max RSS $(mib "$rss") MiB; sha256 $check"
        [[ ! -s "$WORK/$key.out" ]] || [[ "$method" != bulwark* ]] || sed 's/^/   | /' "$WORK/$key.out"
        MS_OF[$key]=$wall
    fi
    CHECK_OF[$key]=$check
    ROWS+=("$key|$method|$plabel|${MS_OF[$key]}|$(secs "$cpu")/$(secs "$nc")/$(secs "$ac")|$check")
    rm -rf "$OUT"/*
}

NEWL="$POINT_NEW (newest)"
OLDL="$POINT_OLD ($AGE older)"
measure b_new "bulwark restore" "$NEWL" "$SHA_NEW" "$OUT/r.img" "$OUT/r.img" \
    "$BIN/bulwark" restore "$SOURCE" --point "$POINT_NEW" --to "$OUT/r.img" --wait --json
measure b_old "bulwark restore" "$OLDL" "$SHA_OLD" "$OUT/r.img" "$OUT/r.img" \
    "$BIN/bulwark" restore "$SOURCE" --point "$POINT_OLD" --to "$OUT/r.img" --wait --json
measure e_new "bulwark export" "$NEWL" "$SHA_NEW" "$OUT/e.img" "$OUT/e.img" \
    "$BIN/bulwark" export "$SOURCE" --point "$POINT_NEW" --to "$OUT/e.img" --json
measure e_old "bulwark export" "$OLDL" "$SHA_OLD" "$OUT/e.img" "$OUT/e.img" \
    "$BIN/bulwark" export "$SOURCE" --point "$POINT_OLD" --to "$OUT/e.img" --json
measure r_new "restic restore" "newest snapshot" "$SHA_NEW" "$OUT" "$OUT" \
    restic --repo "$RESTIC_REPO" restore "$RESTIC_SNAP_NEW" --target "$OUT"
measure r_old "restic restore" "older snapshot" "$SHA_OLD" "$OUT" "$OUT" \
    restic --repo "$RESTIC_REPO" restore "$RESTIC_SNAP_OLD" --target "$OUT"
measure g_new "borg extract" "newest archive" "$SHA_NEW" "$OUT" "$OUT" \
    sh -c 'cd "$1" && exec borg extract "$2"' sh "$OUT" "$BORG_REPO_DIR::state-NEW"
measure g_old "borg extract" "older archive" "$SHA_OLD" "$OUT" "$OUT" \
    sh -c 'cd "$1" && exec borg extract "$2"' sh "$OUT" "$BORG_REPO_DIR::state-OLD"

echo "== durable-write rate, run 2"
dd_run
echo "== the same with oflag=direct (context; not used for the ratios)"
cat "$VOLUME" >/dev/null
sync
dd_out="$(dd if="$VOLUME" of="$WORK/dd-test" bs=4M oflag=direct conv=fsync 2>&1)"
rm -f "$WORK/dd-test"
note "dd: ${dd_out##*$'\n'}"
DIRECT_MBS="$(tail -n 1 <<<"$dd_out" | awk -F', ' '{ split($(NF-1), a, " "); print a[1] }')"
DIRECT_MBS="$(mb_per_s "$VOLUME_BYTES" "$(awk -v s="$DIRECT_MBS" 'BEGIN { printf "%d", s * 1000 }')")"

# ---------------------------------------------------------------- memory
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
alive node "$PID_node"
alive agent "$PID_agent"
NODE_HWM=$(hwm_kib "$PID_node")
AGENT_HWM=$(hwm_kib "$PID_agent")
COORD_HWM=$(hwm_kib "$PID_coordinator")

# ---------------------------------------------------------------- summary
DD_LIST=""
for ms in "${DD_RUNS[@]}"; do
    DD_LIST+="${DD_LIST:+, }$(mb_per_s "$VOLUME_BYTES" "$ms")"
done
DD_MBS=$(for ms in "${DD_RUNS[@]}"; do mb_per_s "$VOLUME_BYTES" "$ms"; echo; done |
    awk 'NF { s += $1; n++ } END { printf "%.1f", s / n }')
mbs_of() { if [[ "${MS_OF[$1]}" = 0 ]]; then echo 0; else mb_per_s "$VOLUME_BYTES" "${MS_OF[$1]}"; fi; }

echo
echo "Bulwark restore throughput — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r)"
echo "volume $VOLUME_MIB MiB random data, 64 KiB blocks, fingerprint tracker; $ROUNDS syncs after the full one, each"
echo "rewriting $REWRITES blocks (2%); mTLS on 127.0.0.1; work dir on $FS_WORK"
echo "page cache dropped before each run; every restored file fsync'd inside the time and checked (sha256)"
echo "restic $(restic version | cut -d' ' -f2), $(borg --version) (--encryption=$BORG_ENC)"
echo "durable-write rate (dd bs=4M conv=fsync from cache): $DD_LIST MB/s, mean $DD_MBS MB/s"
echo "context, not used for the ratios: dd oflag=direct $DIRECT_MBS MB/s; cold cp + fsync (same disk) $COLD_MBS MB/s"
echo
fmt="%-16s %-16s %8s %8s %7s %9s  %-22s %s\n"
# shellcheck disable=SC2059
printf "$fmt" "method" "point" "seconds" "MB/s" "% dd" "x restic" "CPU s tool/node/agent" "check"
# shellcheck disable=SC2059
printf "$fmt" "----------------" "----------------" "-------" "-------" "------" "--------" "----------------------" "-----"
for row in "${ROWS[@]}"; do
    IFS='|' read -r key method plabel ms cpu check <<<"$row"
    if [[ "$ms" = 0 ]]; then
        # shellcheck disable=SC2059
        printf "$fmt" "$method" "$plabel" "-" "-" "-" "-" "$cpu" "$check"
        continue
    fi
    mbs=$(mb_per_s "$VOLUME_BYTES" "$ms")
    pct=$(awk -v a="$mbs" -v b="$DD_MBS" 'BEGIN { printf "%.0f%%", 100 * a / b }')
    rkey="r_${key#*_}"
    if [[ "${MS_OF[$rkey]}" = 0 ]]; then xr="-"; else xr=$(awk -v a="$mbs" -v b="$(mbs_of "$rkey")" 'BEGIN { printf "%.2f", a / b }'); fi
    # shellcheck disable=SC2059
    printf "$fmt" "$method" "$plabel" "$(secs "$ms")" "$mbs" "$pct" "$xr" "$cpu" "$check"
done
echo
echo "peak RSS (VmHWM): node $(mib "$NODE_HWM") MiB, agent $(mib "$AGENT_HWM") MiB, coordinator $(mib "$COORD_HWM") MiB"
echo

MISSED=0
target() { # TEXT CONDITION
    local v
    if awk "BEGIN { exit !($2) }"; then v=met; else v=MISSED; MISSED=1; fi
    printf "  %-66s %s\n" "$1" "$v"
}
B_NEW=$(mbs_of b_new)
B_OLD=$(mbs_of b_old)
R_NEW=$(mbs_of r_new)
R_OLD=$(mbs_of r_old)
echo "targets:"
target "restore newest ($B_NEW MB/s) >= 80% of durable write ($DD_MBS MB/s)" "$B_NEW >= 0.8 * $DD_MBS"
target "restore 10-points-old ($B_OLD MB/s) >= 60% of durable write" "$B_OLD >= 0.6 * $DD_MBS"
target "restore newest faster than restic ($B_NEW vs $R_NEW MB/s)" "$B_NEW > $R_NEW && $R_NEW > 0"
target "restore 10-points-old faster than restic ($B_OLD vs $R_OLD MB/s)" "$B_OLD > $R_OLD && $R_OLD > 0"
for key in "${!CHECK_OF[@]}"; do
    [[ "${CHECK_OF[$key]}" = ok ]] || MISSED=1
done
echo
if ((MISSED)); then
    echo "RESULT: MISSED"
    exit 1
fi
echo "RESULT: MET"
