#!/usr/bin/env python3
"""Small helpers for bench/trackers.sh (standard library only).

  free-ports N                   print N currently free TCP ports on 127.0.0.1
  get FILE KEY                   print KEY of the JSON object in FILE
  node-up FILE NAME              exit 0 if `bulwark nodes --json` in FILE shows NAME up
  agent-connected FILE NAME      exit 0 if `bulwark agents --json` in FILE shows NAME
                                 connected
  all-placed FILE NAME...        exit 0 if `bulwark sources --json` in FILE shows every
                                 NAME placed on a node
  rewrite-data DIR TOTAL COUNT SEED
                                 pick COUNT distinct 64 KiB block indices in [0, TOTAL)
                                 with a PRNG seeded by SEED, write one 64 KiB file of
                                 seeded pseudo-random bytes per block as DIR/blk-INDEX,
                                 and print the indices, sorted, one a line
  qemu-io-cmds DIR BLOCKFILE     print one qemu-io `write` command a line, for the
                                 blocks in BLOCKFILE, with the data files in DIR
  restic-summary FILE KEY        print KEY of the summary line of `restic backup --json`
  bench-secs FILE                print the seconds of `qemu-img bench`'s "Run completed"
  median N...                    print the median of the numbers (an integer when whole)
  io-read-bytes PID              print read_bytes of /proc/PID/io
"""

import json
import os
import random
import re
import socket
import statistics
import sys

BLOCK = 65536


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
        ok = any(
            a.get("name") == args[1] and a.get("connected") is True for a in load(args[0])
        )
        sys.exit(0 if ok else 1)
    elif cmd == "all-placed":
        placed = {s.get("name") for s in load(args[0]) if s.get("node")}
        sys.exit(0 if all(n in placed for n in args[1:]) else 1)
    elif cmd == "rewrite-data":
        out, total, count, seed = args[0], int(args[1]), int(args[2]), int(args[3])
        rng = random.Random(seed)
        blocks = sorted(rng.sample(range(total), count))
        os.makedirs(out, exist_ok=True)
        for b in blocks:
            with open(os.path.join(out, f"blk-{b}"), "wb") as f:
                f.write(rng.randbytes(BLOCK))
        print("\n".join(str(b) for b in blocks))
    elif cmd == "qemu-io-cmds":
        out = args[0]
        with open(args[1], encoding="utf-8") as f:
            for line in f:
                b = int(line)
                print(f"write -q -s {os.path.join(out, f'blk-{b}')} {b * BLOCK} {BLOCK}")
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
    elif cmd == "bench-secs":
        with open(args[0], encoding="utf-8") as f:
            m = re.search(r"Run completed in ([0-9.]+) seconds", f.read())
        if not m:
            sys.exit(f"no 'Run completed in X seconds' in {args[0]}")
        print(m.group(1))
    elif cmd == "median":
        m = statistics.median(float(a) for a in args)
        print(int(m) if m == int(m) else round(m, 3))
    elif cmd == "io-read-bytes":
        with open(f"/proc/{args[0]}/io", encoding="utf-8") as f:
            for line in f:
                k, v = line.split(":")
                if k == "read_bytes":
                    print(int(v))
                    return
        sys.exit(f"no read_bytes in /proc/{args[0]}/io")
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
