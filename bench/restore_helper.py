#!/usr/bin/env python3
"""Small helpers for bench/restore.sh (standard library only).

  free-ports N                   print N currently free TCP ports on 127.0.0.1
  get FILE KEY                   print KEY of the JSON object in FILE
  node-up FILE NAME              exit 0 if `bulwark nodes --json` in FILE shows NAME up
  agent-connected FILE NAME      exit 0 if `bulwark agents --json` in FILE shows NAME connected
  source-node FILE NAME          print the node of source NAME, exit 1 if not placed yet
  point-ids FILE                 print the ids of `bulwark points --json` in FILE, one a line
  rewrite FILE BLOCK COUNT SEED  overwrite COUNT distinct BLOCK-aligned blocks of FILE at
                                 random places with random bytes (seeded), then fsync
  restic-summary FILE KEY        print KEY of the summary line of `restic backup --json`
  timed OUT ERR SYNCPATH CMD...  run CMD (stdout to OUT, stderr to ERR), then fsync every
                                 regular file under SYNCPATH (a file or a directory) and
                                 its directory; print "WALL_MS CPU_MS MAXRSS_KIB FSYNC_MS"
                                 (CPU = user + system of CMD and its children); exit
                                 with CMD's status
  one-file DIR                   print the path of the only regular file under DIR
  cpu-ms PID                     user + system CPU time of PID so far, in ms
"""

import json
import os
import random
import resource
import socket
import subprocess
import sys
import time


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def files_under(path):
    if os.path.isfile(path):
        return [path]
    out = []
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def fsync_path(p, flags=os.O_RDONLY):
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "free-ports":
        socks = []
        for _ in range(int(args[0])):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
        for s in socks:
            s.close()
    elif cmd == "get":
        print(load(args[0])[args[1]])
    elif cmd == "node-up":
        ok = any(n.get("name") == args[1] and n.get("state") == "up" for n in load(args[0]))
        sys.exit(0 if ok else 1)
    elif cmd == "agent-connected":
        ok = any(a.get("name") == args[1] and a.get("connected") is True for a in load(args[0]))
        sys.exit(0 if ok else 1)
    elif cmd == "source-node":
        for s in load(args[0]):
            if s.get("name") == args[1] and s.get("node"):
                print(s["node"])
                return
        sys.exit(1)
    elif cmd == "point-ids":
        for p in load(args[0]):
            print(p["id"])
    elif cmd == "rewrite":
        path, block, count, seed = args[0], int(args[1]), int(args[2]), int(args[3])
        blocks = os.path.getsize(path) // block
        rng = random.Random(seed)
        picked = sorted(rng.sample(range(blocks), count))
        with open(path, "r+b", buffering=0) as f:
            for b in picked:
                f.seek(b * block)
                f.write(rng.randbytes(block))
            os.fsync(f.fileno())
    elif cmd == "restic-summary":
        summary = None
        with open(args[0], encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if obj.get("message_type") == "summary":
                    summary = obj
        if summary is None:
            sys.exit(f"no summary line in {args[0]}")
        print(summary[args[1]])
    elif cmd == "timed":
        out, err, syncpath, command = args[0], args[1], args[2], args[3:]
        t0 = time.monotonic()
        with open(out, "wb") as o, open(err, "wb") as e:
            rc = subprocess.call(command, stdout=o, stderr=e)
        t1 = time.monotonic()
        if rc == 0 and os.path.exists(syncpath):
            dirs = set()
            for p in files_under(syncpath):
                fsync_path(p)
                dirs.add(os.path.dirname(p))
            for d in dirs:
                fsync_path(d)
        t2 = time.monotonic()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_ms = int((ru.ru_utime + ru.ru_stime) * 1000)
        print(int((t2 - t0) * 1000), cpu_ms, ru.ru_maxrss, int((t2 - t1) * 1000))
        sys.exit(rc)
    elif cmd == "one-file":
        files = files_under(args[0])
        if len(files) != 1:
            sys.exit(f"expected one file under {args[0]}, found {len(files)}: {files[:5]}")
        print(files[0])
    elif cmd == "cpu-ms":
        with open(f"/proc/{args[0]}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        print(int((int(fields[11]) + int(fields[12])) * 1000 / ticks))
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
