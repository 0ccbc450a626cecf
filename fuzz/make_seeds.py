#!/usr/bin/env python3
"""Writes the seed corpora of the byte-input fuzz targets (fuzz/corpus/<target>/seed-*).

Run from fuzz/: python3 make_seeds.py. The inputs follow each target's format (see
the target's doc comment): NBD handshake and request transcripts as a client sends
them, delta and journal files as the store writes them (their BLAKE3 checks are
filled in by the target's fix-up flags, so this script needs no BLAKE3), and the
example configurations. sync_stream's seeds are kept from a first run (its input
is `arbitrary`'s encoding of typed messages).
"""
import os
import struct

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def write(target, name, data):
    with open(os.path.join("corpus", target, "seed-" + name), "wb") as f:
        f.write(data)


def opt(option, data=b""):
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def s32(s):
    return struct.pack(">I", len(s)) + s


def info(name, reqs):
    return s32(name) + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(export, queries):
    return s32(export) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


FLAGS = struct.pack(">I", 3)  # fixed newstyle, no zeroes
# nbd_options: [mode][client flags][options...]; mode bit 0 read-only, bit 1 TLS required.
write("nbd_options", "go", b"\x10" + FLAGS + opt(8) + opt(10, meta(b"", [b"base:allocation"]))
      + opt(3) + opt(6, info(b"fuzz", [1, 3])) + opt(7, info(b"", [0])))
write("nbd_options", "export-name", b"\x01" + struct.pack(">I", 1) + opt(9, meta(b"fuzz", [b"base:"]))
      + opt(1, b"fuzz"))
write("nbd_options", "starttls", b"\x02" + FLAGS + opt(3) + opt(5))
write("nbd_options", "abort", b"\x00" + FLAGS + opt(42, b"xx") + opt(7, info(b"nope", [])) + opt(2))


def req(typ, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, offset, length) + payload


# nbd_transmission: [mode][requests...]; mode 6: structured replies and base:allocation.
write("nbd_transmission", "rw", b"\x0e" + req(1, 0, 512, payload=b"\xab" * 512) + req(0, 0, 4096, cookie=2)
      + req(3, 0, 0, cookie=3) + req(4, 512, 512, cookie=4) + req(6, 1024, 2048, flags=2, cookie=5)
      + req(7, 0, 8192, cookie=6) + req(7, 0, 4096, flags=8, cookie=7) + req(2, 0, 0, cookie=8))
write("nbd_transmission", "simple", b"\x01" + req(0, 0, 4096) + req(1, 0, 1, payload=b"x")
      + req(0, 4000, 200, cookie=9) + req(9, 0, 0, cookie=10))
write("nbd_transmission", "fua", b"\x40" + req(1, 4096, 4096, flags=1, payload=b"\x00" * 4096)
      + req(0, 4096, 4096))


def record(block, data, length):
    head = struct.pack("<QBI", block, 1 if data is not None else 0, length) + b"\0" * 32
    return head + b"\0" * 8 + (data or b"")


def record_input(flags, shift, size, extra, file):
    return bytes([flags, shift]) + struct.pack("<QI", size, extra) + file


BS = 4096
size = 5 * BS + 1000  # five whole blocks and a partial one
fix = 8 | 16  # header checks and data digests
delta = b"BWKDELTA" + struct.pack("<I", 1) + b"\0" * 4
delta += record(0, b"\x11" * BS, BS) + record(3, None, BS) + record(5, b"\x22" * 1000, 1000)
write("delta_record", "v1", record_input(fix, 0, size, 0, delta))
write("delta_record", "v1-tolerant", record_input(fix | 1 | 4, 0, size, 0, delta + b"torn"))
write("delta_record", "v0", record_input(fix | 2, 0, size, 0,
                                          record(1, b"\x33" * BS, BS) + record(2, b"\x44" * BS, BS)))
write("delta_record", "8k", record_input(fix, 1, 3 * 8192, 0, b"BWKDELTA" + struct.pack("<I", 1) + b"\0" * 4
                                         + record(2, b"\x55" * 8192, 8192)))

journal = b"BWKJRNL1" + struct.pack("<I", 1) + b"\0" * 4
journal += record(0, b"\x11" * BS, BS) + record(1, b"\x12" * BS, BS) + record(2, None, BS) + record(5, None, 1000)
write("journal_record", "v1", record_input(8 | 16 | 32, 0, size, 2 * BS, journal))
write("journal_record", "one-group", record_input(8 | 16 | 32, 0, size, 1 << 20, journal))
write("journal_record", "bad-zero", record_input(8 | 16, 0, size, BS, journal))

# config: [loader: 0 agent, 1 node, 2 coordinator][the TOML file]
for i, kind in enumerate(("agent", "node", "coordinator")):
    with open(os.path.join("..", "deploy", "examples", kind + ".toml"), "rb") as f:
        write("config", kind + ".toml", bytes([i]) + f.read())
