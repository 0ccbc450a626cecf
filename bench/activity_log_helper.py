#!/usr/bin/env python3
"""Helpers for bench/activity-log.sh that bench/trackers_helper.py lacks (standard
library only).

  source-field FILE NAME KEY     print KEY of source NAME in `bulwark sources --json`
                                 (FILE); an empty line if the source or key is absent
                                 or null; booleans as true/false
  region-writes VOLUME REGION PERCENT SEED
                                 pick PERCENT% (at least one) of the VOLUME // REGION
                                 whole regions of REGION bytes with a PRNG seeded by
                                 SEED and print, for each (by offset), one qemu-io
                                 command `write -q -P 0xNN OFF LEN`: LEN a multiple of
                                 64 KiB from 64 KiB to 1 MiB (at most REGION), at a
                                 64 KiB-aligned offset inside the region, NN from 0x01
                                 to 0xff (a pattern never equal to random data)
  write-blocks FILE              print how many 64 KiB blocks the `write` commands in
                                 FILE cover (they do not overlap)
  socket-listening PATH          exit 0 if a unix stream socket at PATH accepts a
                                 connection (a stale socket left by kill -9 does not)
"""

import json
import random
import socket
import sys

BLOCK = 65536


def source_field(path, name, key):
    with open(path, encoding="utf-8") as f:
        sources = json.load(f)
    for s in sources:
        if s.get("name") == name:
            v = s.get(key)
            if v is None:
                return ""
            if isinstance(v, bool):
                return "true" if v else "false"
            return str(v)
    return ""


def region_writes(volume, region, percent, seed):
    if region % BLOCK or region < BLOCK:
        sys.exit(f"region size {region} is not a multiple of {BLOCK}")
    regions = volume // region
    if regions < 1:
        sys.exit(f"volume of {volume} bytes holds no whole region of {region} bytes")
    count = max(1, regions * percent // 100)
    rng = random.Random(seed)
    out = []
    for r in sorted(rng.sample(range(regions), count)):
        max_blocks = min(16, region // BLOCK)
        blocks = rng.randint(1, max_blocks)
        start = rng.randrange(0, region // BLOCK - blocks + 1)
        pattern = rng.randint(1, 255)
        off = r * region + start * BLOCK
        out.append(f"write -q -P 0x{pattern:02x} {off} {blocks * BLOCK}")
    return out


def write_blocks(path):
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if not words or words[0] != "write":
                continue
            length = int(words[-1])
            total += (length + BLOCK - 1) // BLOCK
    return total


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "source-field":
        print(source_field(args[0], args[1], args[2]))
    elif cmd == "region-writes":
        for line in region_writes(int(args[0]), int(args[1]), int(args[2]), int(args[3])):
            print(line)
    elif cmd == "write-blocks":
        print(write_blocks(args[0]))
    elif cmd == "socket-listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(args[0])
        except OSError:
            sys.exit(1)
        finally:
            s.close()
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
