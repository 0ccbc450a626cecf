#!/usr/bin/env python3
"""Small helpers for bench/sync-throughput.sh (standard library only).

  free-ports N                 print N currently free TCP ports on 127.0.0.1
  get FILE KEY                 print KEY of the JSON object in FILE
  node-up FILE NAME            exit 0 if `bulwark nodes --json` in FILE shows NAME up
  agent-connected FILE NAME    exit 0 if `bulwark agents --json` in FILE shows NAME connected
  source-node FILE NAME        print the node of source NAME (`bulwark sources --json`),
                               exit 1 if it is not placed yet
  pick-blocks TOTAL COUNT SEED print COUNT distinct block indices in [0, TOTAL), sorted
  tls-copy SRC DST CERT KEY    copy SRC into DST over TLS 1.3 on 127.0.0.1 (OpenSSL, through
                               Python's ssl), the receiver in a child process writing 1 MiB
                               at a time, starting writeback every 8 MiB and fsyncing at the
                               end (none of that when DST is /dev/null); print the
                               milliseconds from connect to the receiver's end
"""

import ctypes
import json
import os
import random
import socket
import ssl
import sys
import time

CHUNK = 1 << 20
WRITEBACK_EVERY = 8 << 20
SYNC_FILE_RANGE_WRITE = 2


def tls_receive(listener, dst, cert, key):
    """The receiving end of tls-copy: everything it is sent into DST, then fsync."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    conn, _ = listener.accept()
    conn = ctx.wrap_socket(conn, server_side=True)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    regular = os.path.isfile(dst)
    fill = total = 0
    while True:
        try:
            n = conn.recv_into(view[fill:], CHUNK - fill)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            n = 0
        fill += n
        if n != 0 and fill < CHUNK:
            continue
        done = 0
        while done < fill:
            done += os.write(fd, view[done:fill])
        total += fill
        fill = 0
        if regular and total % WRITEBACK_EVERY == 0:
            # Start writing back what is written, as the node's writes do:
            # otherwise the final fsync writes the whole file alone.
            libc.sync_file_range(fd, total - WRITEBACK_EVERY, WRITEBACK_EVERY, SYNC_FILE_RANGE_WRITE)
        if n == 0:
            break
    if regular:
        os.fsync(fd)
    os.close(fd)
    conn.close()
    return total


def tls_copy(src, dst, cert, key):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    count_r, count_w = os.pipe()
    child = os.fork()
    if child == 0:
        status = 0
        try:
            got = tls_receive(listener, dst, cert, key)
            os.write(count_w, str(got).encode())
        except Exception as e:  # the parent reports the failure through the status
            print(f"tls-copy receiver: {e}", file=sys.stderr)
            status = 1
        os._exit(status)
    listener.close()
    os.close(count_w)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    started = time.monotonic()
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    sent = 0
    with open(src, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sock.sendall(view[:n])
            sent += n
    try:
        sock.unwrap()
    except (ssl.SSLError, OSError):
        pass
    sock.close()
    _, status = os.waitpid(child, 0)
    elapsed = time.monotonic() - started
    got = os.read(count_r, 64).decode()
    os.close(count_r)
    if status != 0:
        sys.exit("tls-copy: the receiver failed")
    if got != str(sent):
        sys.exit(f"tls-copy: sent {sent} bytes, the receiver got {got or 'none'}")
    print(int(elapsed * 1000))


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
    elif cmd == "tls-copy":
        tls_copy(*args[:4])
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
