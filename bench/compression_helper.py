#!/usr/bin/env python3
"""Drives bench/compression.sh (standard library only; root).

  run BIN DATA WORK OUT.json   replay the ten days of DATA (bench/compression_data.py)
                               through each system and write the figures to OUT.json:
                               Bulwark with compression off, with node compression
                               (`[pool] compression`, the node's default `zstd:1` or BENCH_NODE_LEVEL), and with that and
                               `compress = "zstd"` on the wire; restic and borg.
  report OUT.json              print the table and the targets; exit 1 when one is
                               missed

The Bulwark systems run side by side (every fleet up at once, each day's syncs in an
order rotated day by day), so sync times compare within one moment of the machine.
Each Bulwark run is a fresh fleet (coordinator, node, agent as real processes on
127.0.0.1 with mTLS, release binaries from BIN) protecting DATA/base.img copied to
WORK/volume.img: a full sync (day 0), then per day the day's changed blocks are
written into the volume in place and the agent syncs (fingerprint tracker, 64 KiB
blocks). After day 10 every point is restored and checked against the SHA-256 of its
state; the oldest point's restore is timed with the page cache dropped first. Stored
bytes are the allocated bytes of the node's files: the points' deltas, and the total
(replica, digests, deltas, journal).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True
import compression_data as data  # noqa: E402

SOURCE = "bench-volume"
NODE = "bench-node"
AGENT = "bench-host"
DAYS = 10
# The node's default level (storage-node/src/store/compress.rs); BENCH_NODE_LEVEL to try another.
NODE_LEVEL = os.environ.get("BENCH_NODE_LEVEL", "zstd:1")


def log(msg):
    print(f"   {msg}", flush=True)


def now():
    return time.monotonic()


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def allocated(path):
    """Allocated bytes of a file or of every file under a directory."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    n = 0
    for d, _, names in os.walk(path):
        for name in names:
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                n += os.stat(p).st_blocks * 512
    return n


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Fleet:
    def __init__(self, bin_dir, work, node_compression, wire_compress):
        self.bin = bin_dir
        self.work = work
        self.procs = []
        os.makedirs(work, exist_ok=True)
        pki = os.path.join(work, "pki")
        self.pki = pki
        self.cli_plain("pki", "init", "--dir", pki, "--trust-domain", "bench.bulwark")
        for role, name, extra in (
            ("coordinator", "coordinator", ["--ip", "127.0.0.1", "--dns", "localhost"]),
            ("node", NODE, ["--ip", "127.0.0.1", "--dns", "localhost"]),
            ("agent", AGENT, []),
            ("admin", "bench-admin", []),
        ):
            self.cli_plain("pki", "issue", "--dir", pki, "--role", role, "--name", name, "--days", "2", *extra)
        cport, nport = free_ports(2)

        def tls(name):
            return f'[tls]\nca = "{pki}/ca.crt"\ncert = "{pki}/{name}.crt"\nkey = "{pki}/{name}.key"\n'

        self.write("coordinator.toml", f'listen = "127.0.0.1:{cport}"\ndata_dir = "{work}/coordinator"\n' + tls("coordinator"))
        os.makedirs(f"{work}/node/disk1", exist_ok=True)
        # Always said: the node compresses by default (zstd:1), so "off" must be asked for.
        pool = '[pool]\ncompression = "%s"\n' % (node_compression or "off")
        self.write(
            "node.toml",
            f'name = "{NODE}"\nlisten = "127.0.0.1:{nport}"\ncoordinator = "https://127.0.0.1:{cport}"\n'
            f'data_dir = "{work}/node/meta"\nheartbeat_interval = "1s"\n{pool}'
            f'[[pool.disks]]\npath = "{work}/node/disk1"\ncapacity = "60GiB"\n' + tls(NODE),
        )
        wire = 'compress = "zstd"\n' if wire_compress else ""
        self.volume = os.path.join(work, "volume.img")
        self.write(
            "agent.toml",
            f'name = "{AGENT}"\ncoordinator = "https://127.0.0.1:{cport}"\nstate_dir = "{work}/agent"\n'
            f'[[sources]]\nname = "{SOURCE}"\nkind = "volume"\npath = "{self.volume}"\n'
            f'tracker = "fingerprint"\nblock_size = "64KiB"\nsync_interval = "24h"\n'
            f'points_space = "20GiB"\n{wire}' + tls(AGENT),
        )
        self.env = dict(
            os.environ,
            BULWARK_COORDINATOR=f"https://127.0.0.1:{cport}",
            BULWARK_CA=f"{pki}/ca.crt",
            BULWARK_CERT=f"{pki}/bench-admin.crt",
            BULWARK_KEY=f"{pki}/bench-admin.key",
        )

    def write(self, name, text):
        with open(os.path.join(self.work, name), "w") as f:
            f.write(text)

    def cli_plain(self, *args):
        subprocess.run([f"{self.bin}/bulwark", *args], check=True, stdout=subprocess.DEVNULL)

    def cli_json(self, *args):
        r = subprocess.run(
            [f"{self.bin}/bulwark", *args, "--json"], env=self.env, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"bulwark {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def start(self, name, binary):
        out = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen([f"{self.bin}/{binary}", "--config", os.path.join(self.work, f"{name}.toml")], stdout=out, stderr=out)
        self.procs.append((name, p))
        return p

    def wait(self, what, proc, pred, timeout=60):
        t0 = now()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: the process exited; see {self.work}")
            try:
                if pred():
                    return
            except (RuntimeError, json.JSONDecodeError):
                pass
            if now() - t0 > timeout:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def node_log(self):
        with open(os.path.join(self.work, "node.log"), errors="replace") as f:
            return f.read()

    def up(self):
        c = self.start("coordinator", "bulwark-coordinator")
        self.wait("coordinator", c, lambda: self.cli_json("nodes") is not None)
        n = self.start("node", "bulwark-node")
        self.wait("node up", n, lambda: any(x.get("name") == NODE and x.get("state") == "up" for x in self.cli_json("nodes")))
        a = self.start("agent", "bulwark-agent")
        self.wait("agent", a, lambda: any(x.get("name") == AGENT and x.get("connected") for x in self.cli_json("agents")))
        self.wait("placement", a, lambda: any(s.get("name") == SOURCE and s.get("node") for s in self.cli_json("sources")))

    def stop(self):
        for _, p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def source_dir(self):
        path = os.path.join(self.work, "node", "disk1", "bulwark", SOURCE)
        if not os.path.isdir(path):
            raise RuntimeError(f"no folder {path}")
        return path


def node_supports_compression(bin_dir, work):
    """Whether the node binary takes `[pool] compression` (another part of issue 27)."""
    f = Fleet(bin_dir, work, NODE_LEVEL, False)
    try:
        c = f.start("coordinator", "bulwark-coordinator")
        f.wait("coordinator", c, lambda: f.cli_json("nodes") is not None)
        n = f.start("node", "bulwark-node")
        try:
            f.wait("node up", n, lambda: any(x.get("state") == "up" for x in f.cli_json("nodes")), timeout=30)
            return True, ""
        except RuntimeError:
            text = f.node_log().strip().splitlines()
            return False, text[-1] if text else "the node did not start"
    finally:
        f.stop()
        shutil.rmtree(work, ignore_errors=True)


def settled(src, timeout=120):
    """Waits for the node to settle the newest point (after the acknowledgement, the
    journal goes into the replica and the before-images into the deltas)."""
    t0 = now()
    while os.path.exists(os.path.join(src, "journal")):
        if now() - t0 > timeout:
            raise RuntimeError(f"the node did not settle {src} within {timeout} s")
        time.sleep(0.1)


def bulwark_runs(plan, bin_dir, data_dir, work, states):
    """The Bulwark systems of `plan` ((label, node compression, wire) each), side by
    side: every fleet is up at once and each day's sync runs on every fleet in turn,
    the order rotated day by day, so that the machine's drift (page cache, writeback,
    other load; +-10% and more on this VM) falls on every system alike instead of on
    whichever ran last."""
    fleets = []
    for i, (label, node_c, wire) in enumerate(plan):
        log(f"== {label}: node compression {node_c or 'off'}, wire compression {'zstd' if wire else 'off'}")
        f = Fleet(bin_dir, os.path.join(work, f"bulwark-{i}"), node_c, wire)
        subprocess.run(["cp", "--sparse=always", os.path.join(data_dir, "base.img"), f.volume], check=True)
        fleets.append(f)
    days = [[] for _ in plan]
    srcs = [None for _ in plan]
    try:
        for f in fleets:
            f.up()
        for day in range(0, DAYS + 1):
            for f in fleets:
                if day > 0:
                    data.apply_patch(f.volume, os.path.join(data_dir, f"day-{day}.patch"))
            order = [(day + k) % len(plan) for k in range(len(plan))]
            for i in order:
                f = fleets[i]
                t0 = now()
                r = f.cli_json("sync", SOURCE, "--wait")
                secs = now() - t0
                srcs[i] = srcs[i] or f.source_dir()
                settled(srcs[i])
                deltas = allocated(os.path.join(srcs[i], "deltas")) if os.path.isdir(os.path.join(srcs[i], "deltas")) else 0
                row = {
                    "day": day,
                    "point": r["point"],
                    "sync_s": secs,
                    "bytes_sent": r["bytes_sent"],
                    "wire_bytes": r.get("wire_bytes", r["bytes_sent"]),
                    "points_bytes": deltas,
                    "total_bytes": allocated(srcs[i]),
                }
                days[i].append(row)
                log(
                    f"[{plan[i][0]}] day {day}: point {row['point']}, {row['bytes_sent'] / 1e6:.1f} MB changed, "
                    f"{row['wire_bytes'] / 1e6:.1f} MB on the wire, sync {secs:.2f} s; "
                    f"points {deltas / 1e6:.1f} MB, total {row['total_bytes'] / 1e6:.1f} MB"
                )
        runs = []
        for i, (label, node_c, wire) in enumerate(plan):
            restores = restore_all(fleets[i], days[i], work, states, label)
            runs.append({"label": label, "node_compression": node_c, "wire": wire, "days": days[i], "restores": restores})
        return runs
    finally:
        for f in fleets:
            f.stop()
        shutil.rmtree(work, ignore_errors=True)


def restore_all(f, days, work, states, label):
    """Restores every point of fleet `f` and checks it against its state's SHA-256;
    the oldest with the page cache dropped first."""
    points = [p["id"] for p in f.cli_json("points", SOURCE)]
    restores = []
    out = os.path.join(work, "restored.img")
    for row in days:
        if row["point"] not in points:
            restores.append({"day": row["day"], "check": f"point {row['point']} was pruned"})
            continue
        if os.path.exists(out):
            os.unlink(out)
        if row["day"] == 0:
            drop_caches()
        t0 = now()
        f.cli_json("restore", SOURCE, "--point", str(row["point"]), "--to", out, "--wait")
        secs = now() - t0
        got = data.sha256(out)
        check = "ok" if got == states[str(row["day"])] else f"WRONG DATA (sha256 {got})"
        restores.append({"day": row["day"], "restore_s": secs, "check": check})
        log(f"[{label}] restore of day {row['day']} (point {row['point']}): {secs:.2f} s, {check}")
    if os.path.exists(out):
        os.unlink(out)
    return restores


def peer_run(tool, data_dir, work, states):
    log(f"== {tool}")
    os.makedirs(work, exist_ok=True)
    vol = os.path.join(work, "volume.img")
    repo = os.path.join(work, "repo")
    env = dict(os.environ)
    if tool == "restic":
        env.update(RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=os.path.join(work, "cache"))
        subprocess.run(["restic", "init", "--repo", repo], env=env, check=True, capture_output=True)
        backup = ["restic", "backup", "--repo", repo, "volume.img"]
    else:
        env.update(
            BORG_PASSPHRASE="bench",
            BORG_BASE_DIR=os.path.join(work, "base"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )
        subprocess.run(["borg", "init", "--encryption=repokey-blake2", repo], env=env, check=True, capture_output=True)
    subprocess.run(["cp", "--sparse=always", os.path.join(data_dir, "base.img"), vol], check=True)
    days = []
    try:
        for day in range(0, DAYS + 1):
            if day > 0:
                data.apply_patch(vol, os.path.join(data_dir, f"day-{day}.patch"))
            if tool == "borg":
                backup = ["borg", "create", "--compression", "zstd,3", f"{repo}::day-{day}", "volume.img"]
            t0 = now()
            r = subprocess.run(backup, cwd=work, env=env, capture_output=True, text=True)
            secs = now() - t0
            if r.returncode != 0:
                raise RuntimeError(f"{tool} backup of day {day}: {r.stderr.strip()[-500:]}")
            row = {"day": day, "sync_s": secs, "repo_bytes": allocated(repo)}
            days.append(row)
            log(f"day {day}: backup {secs:.2f} s, repository {row['repo_bytes'] / 1e6:.1f} MB")
        out = os.path.join(work, "out")
        os.makedirs(out, exist_ok=True)
        os.unlink(vol)
        drop_caches()
        t0 = now()
        if tool == "restic":
            snaps = json.loads(subprocess.run(["restic", "snapshots", "--repo", repo, "--json"], env=env, check=True, capture_output=True, text=True).stdout)
            oldest = sorted(snaps, key=lambda s: s["time"])[0]["id"]
            subprocess.run(["restic", "restore", "--repo", repo, oldest, "--target", out], env=env, check=True, capture_output=True)
        else:
            subprocess.run(["borg", "extract", f"{repo}::day-0"], cwd=out, env=env, check=True, capture_output=True)
        restored = os.path.join(out, "volume.img")
        fd = os.open(restored, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        secs = now() - t0
        got = data.sha256(restored)
        check = "ok" if got == states["0"] else f"WRONG DATA (sha256 {got})"
        log(f"restore of day 0: {secs:.2f} s, {check}")
        return {"label": tool, "days": days, "restores": [{"day": 0, "restore_s": secs, "check": check}]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(bin_dir, data_dir, work, out_path):
    with open(os.path.join(data_dir, "states.json")) as f:
        states = json.load(f)
    runs = []
    ok, why = node_supports_compression(bin_dir, os.path.join(work, "probe"))
    if not ok:
        log(f"this node does not take [pool] compression yet ({why}): compression-on cannot be measured yet")
    plan = [("bulwark, compression off", "", False)]
    if ok:
        plan.append((f"bulwark, node {NODE_LEVEL}", NODE_LEVEL, False))
        plan.append((f"bulwark, node {NODE_LEVEL} + wire zstd", NODE_LEVEL, True))
    else:
        plan.append(("bulwark, wire zstd only", "", True))
    runs.extend(bulwark_runs(plan, bin_dir, data_dir, os.path.join(work, "bulwark"), states))
    for tool in ("restic", "borg"):
        runs.append(peer_run(tool, data_dir, os.path.join(work, tool), states))
    result = {
        "node_compression_supported": ok,
        "why_not": why,
        "image_bytes": os.path.getsize(os.path.join(data_dir, "base.img")),
        "runs": runs,
        "patch_bytes": [os.path.getsize(os.path.join(data_dir, f"day-{d}.patch")) for d in range(1, DAYS + 1)],
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


def mb(b):
    return f"{b / 1e6:.1f}"


def report(path):
    with open(path) as f:
        res = json.load(f)
    runs = res["runs"]
    bul = [r for r in runs if r["label"].startswith("bulwark")]
    peers = [r for r in runs if not r["label"].startswith("bulwark")]
    print()
    print(f"volume: ext4 image of {mb(res['image_bytes'])} MB made with mkfs.ext4 -d from real trees of /usr;")
    print("ten days of churn from real files (trees copied in, deleted, rewritten, logs appended)")
    for i, r in enumerate(runs):
        print(f"  [{i + 1}] {r['label']}")
    print()
    head = f"{'day':>3} {'changed MB':>10}"
    for i, r in enumerate(bul):
        head += f" | [{i + 1}] points MB  sync s  wire MB"
    for j, r in enumerate(peers):
        head += f" | [{len(bul) + j + 1}] repo MB  backup s"
    print(head)
    for d in range(DAYS + 1):
        line = f"{d:>3} {mb(bul[0]['days'][d]['bytes_sent']):>10}"
        for r in bul:
            x = r["days"][d]
            line += f" | {mb(x['points_bytes']):>13} {x['sync_s']:>7.2f} {mb(x['wire_bytes']):>8}"
        for r in peers:
            x = r["days"][d]
            line += f" | {mb(x['repo_bytes']):>12} {x['sync_s']:>9.2f}"
        print(line)
    print()
    print(f"{'system':<42} {'points MB':>10} {'total MB':>10} {'syncs s (days 1-10)':>20} {'oldest restore s':>17}  restores")
    for r in bul:
        last = r["days"][-1]
        syncs = sum(x["sync_s"] for x in r["days"][1:])
        oldest = next((x.get("restore_s") for x in r["restores"] if x["day"] == 0), None)
        bad = [x for x in r["restores"] if x["check"] != "ok"]
        checks = "all %d byte-identical" % len(r["restores"]) if not bad else "; ".join(f"day {x['day']}: {x['check']}" for x in bad)
        print(f"{r['label']:<42} {mb(last['points_bytes']):>10} {mb(last['total_bytes']):>10} {syncs:>20.2f} {oldest or 0:>17.2f}  {checks}")
    for r in peers:
        syncs = sum(x["sync_s"] for x in r["days"][1:])
        x = r["restores"][0]
        print(f"{r['label']:<42} {'-':>10} {mb(r['days'][-1]['repo_bytes']):>10} {syncs:>20.2f} {x['restore_s']:>17.2f}  {x['check']}")
    print()
    missed = False
    unmeasured = False

    def target(text, ok):
        nonlocal missed, unmeasured
        missed |= ok is False
        unmeasured |= ok is None
        print(f"  {text:<78} {'PASS' if ok else ('FAIL' if ok is False else 'NOT MEASURED')}")

    print("targets:")
    off = bul[0]
    on = next((r for r in bul if r["node_compression"] and not r["wire"]), None)
    if on is None:
        print(f"  (node compression not measured: {res['why_not']})")
        target("stored bytes of the ten points with compression <= 50% of without", None)
        target("syncs with compression at most 10% slower than without", None)
    else:
        p_off = off["days"][-1]["points_bytes"]
        p_on = on["days"][-1]["points_bytes"]
        target(f"points stored with compression {mb(p_on)} MB <= 50% of {mb(p_off)} MB ({100 * p_on / max(p_off, 1):.0f}%)", p_on <= 0.5 * p_off)
        s_off = sum(x["sync_s"] for x in off["days"][1:])
        s_on = sum(x["sync_s"] for x in on["days"][1:])
        target(f"syncs with compression {s_on:.2f} s <= 110% of {s_off:.2f} s ({100 * s_on / max(s_off, 1e-9):.0f}%)", s_on <= 1.1 * s_off)
    every = all(x["check"] == "ok" for r in runs for x in r["restores"])
    target("restores of every point byte-identical", every)
    for r in bul:
        if r["wire"]:
            sent = sum(x["bytes_sent"] for x in r["days"])
            wire = sum(x["wire_bytes"] for x in r["days"])
            print(f"  (wire zstd, {r['label']}: {mb(wire)} MB on the wire for {mb(sent)} MB changed, {100 * wire / max(sent, 1):.0f}%)")
    print()
    print("RESULT: " + ("MISSED" if missed else "NOT ALL MEASURED" if unmeasured else "MET"))
    sys.exit(1 if missed or unmeasured else 0)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "run":
        run(*args)
    elif cmd == "report":
        report(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
