#!/usr/bin/env python3
"""Small helpers for bench/sync-throughput.sh (standard library only).

  free-ports N                 print N currently free TCP ports on 127.0.0.1
  get FILE KEY                 print KEY of the JSON object in FILE
  node-up FILE NAME            exit 0 if `bulwark nodes --json` in FILE shows NAME up
  agent-connected FILE NAME    exit 0 if `bulwark agents --json` in FILE shows NAME connected
  source-node FILE NAME        print the node of source NAME (`bulwark sources --json`),
                               exit 1 if it is not placed yet
  pick-blocks TOTAL COUNT SEED print COUNT distinct block indices in [0, TOTAL), sorted
"""

import json
import random
import socket
import sys


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
        value = load(args[0])[args[1]]
        print(value)
    elif cmd == "node-up":
        nodes = load(args[0])
        ok = any(n.get("name") == args[1] and n.get("state") == "up" for n in nodes)
        sys.exit(0 if ok else 1)
    elif cmd == "agent-connected":
        agents = load(args[0])
        ok = any(a.get("name") == args[1] and a.get("connected") is True for a in agents)
        sys.exit(0 if ok else 1)
    elif cmd == "source-node":
        for s in load(args[0]):
            if s.get("name") == args[1] and s.get("node"):
                print(s["node"])
                return
        sys.exit(1)
    elif cmd == "pick-blocks":
        total, count, seed = int(args[0]), int(args[1]), int(args[2])
        rng = random.Random(seed)
        print("\n".join(str(b) for b in sorted(rng.sample(range(total), count))))
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
