#!/usr/bin/env python3
"""Real-data volume states for bench/compression.sh (standard library only; root).

  make DIR SEED MIB      make DIR/base.img (ext4, `mkfs.ext4 -d` from a copy of real
                         trees of this machine's /usr, MIB MiB) and ten days of churn
                         made from real files on the loop-mounted image: trees copied
                         in, trees deleted, files rewritten, logs appended. Each day's
                         changed 4 KiB blocks are kept as DIR/day-N.patch, and the
                         SHA-256 of every state in DIR/states.json (0 = base).
  apply IMAGE PATCH      write a day's changed blocks into IMAGE in place (only those
                         blocks, as a real volume sees them), then fsync
  sha256 FILE            print the SHA-256 of FILE

The churn is seeded: the same SEED on the same machine gives the same ten days, and
the states are made once, so every system under test replays the same bytes.
"""

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys

BLOCK = 4096
# The base tree: real binaries, libraries, docs, headers (about 1.7 GB here).
BASE_TREES = ["/usr/share", "/usr/include", "/usr/bin", "/usr/lib/x86_64-linux-gnu"]
# Where the days' new trees come from: real files that are not in the base.
POOL_ROOTS = [
    "/usr/lib/python3",
    "/usr/lib/python3.11",
    "/usr/lib/gcc",
    "/usr/lib/llvm-14",
    "/usr/lib/jvm",
    "/usr/lib/google-cloud-sdk",
    "/usr/lib/postgresql",
    "/usr/lib/git-core",
    "/usr/lib/node_modules",
    "/usr/local",
    "/usr/libexec",
    "/usr/sbin",
]
# Text that log lines are made of: real changelogs and license texts.
LOG_TEXT_ROOTS = ["/usr/share/common-licenses", "/usr/share/doc"]


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def tree_bytes(path):
    n = 0
    for d, _, names in os.walk(path):
        for name in names:
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                n += os.path.getsize(p)
    return n


def pool_trees(lo=4 << 20, hi=90 << 20):
    """Directories two levels under the pool roots of LO..HI bytes, sorted."""
    out = []
    for root in POOL_ROOTS:
        if not os.path.isdir(root):
            continue
        for d, subdirs, _ in os.walk(root):
            depth = d[len(root):].count("/")
            if depth >= 3:
                subdirs[:] = []
                continue
            size = tree_bytes(d)
            if lo <= size <= hi:
                out.append((d, size))
                subdirs[:] = []
    return sorted(out)


def log_lines():
    lines = []
    for root in LOG_TEXT_ROOTS:
        for d, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                p = os.path.join(d, name)
                if not os.path.isfile(p) or os.path.getsize(p) > 1 << 20:
                    continue
                try:
                    if name.endswith(".gz"):
                        import gzip

                        with gzip.open(p, "rt", errors="replace") as f:
                            text = f.read()
                    else:
                        with open(p, errors="replace") as f:
                            text = f.read()
                except (OSError, EOFError):
                    continue
                lines.extend(l.strip() for l in text.splitlines() if len(l.strip()) > 20)
            if len(lines) > 400_000:
                return lines
    return lines


def files_in(mnt):
    out = []
    for d, _, names in os.walk(mnt):
        if "/lost+found" in d:
            continue
        for name in names:
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return sorted(out)


def churn(mnt, day, rng, pool, lines, log):
    """One day on the mounted volume."""
    # Trees copied in (a package install, a project checkout).
    incoming = os.path.join(mnt, "srv", f"day{day:02}")
    os.makedirs(incoming, exist_ok=True)
    copied = 0
    for src, size in rng.sample(pool, 2):
        dst = os.path.join(incoming, src.strip("/").replace("/", "_"))
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        copied += size
    # A tree deleted: an earlier day's, or a part of the base.
    earlier = sorted(
        os.path.join(mnt, "srv", d)
        for d in os.listdir(os.path.join(mnt, "srv"))
        if d != f"day{day:02}"
    )
    base_dirs = sorted(
        os.path.join(mnt, "share", d)
        for d in os.listdir(os.path.join(mnt, "share"))
        if os.path.isdir(os.path.join(mnt, "share", d))
    )
    victim = rng.choice(earlier) if earlier and rng.random() < 0.6 else rng.choice(base_dirs)
    deleted = tree_bytes(victim)
    shutil.rmtree(victim)
    # Files rewritten: some in place (an edit of a few KiB), some whole (an upgrade:
    # new file, then rename over the old one).
    files = files_in(mnt)
    rewritten = 0
    for p in rng.sample(files, min(300, len(files))):
        size = os.path.getsize(p)
        if size == 0:
            continue
        if rng.random() < 0.5:
            with open(p, "r+b") as f:
                at = rng.randrange(size)
                f.seek(at)
                chunk = f.read(min(8192, size - at))
                f.seek(at)
                f.write(bytes(reversed(chunk)))
                rewritten += len(chunk)
        else:
            with open(p, "rb") as f:
                data = f.read()
            cut = rng.randrange(len(data))
            tmp = p + ".new"
            with open(tmp, "wb") as f:
                f.write(data[cut:] + data[:cut])
            os.replace(tmp, p)
            rewritten += len(data)
    # Logs appended (an application's and the system's).
    logdir = os.path.join(mnt, "log")
    os.makedirs(logdir, exist_ok=True)
    appended = 0
    for name, count in (("syslog", 40_000), ("app.log", 25_000), ("access.log", 15_000)):
        with open(os.path.join(logdir, name), "a") as f:
            for i in range(count):
                t = 86400 * day + i * 2
                line = (
                    f"2026-11-{day:02}T{t // 3600 % 24:02}:{t // 60 % 60:02}:{t % 60:02}Z "
                    f"host{rng.randrange(8)} {name.split('.')[0]}[{rng.randrange(1, 32768)}]: "
                    f"{rng.choice(lines)}\n"
                )
                f.write(line)
                appended += len(line)
    log(
        f"day {day}: copied in {copied / 1e6:.1f} MB, deleted {deleted / 1e6:.1f} MB "
        f"({os.path.relpath(victim, mnt)}), rewrote {rewritten / 1e6:.1f} MB, "
        f"appended {appended / 1e6:.1f} MB of logs"
    )


def diff_patch(old, new, patch):
    """Writes the 4 KiB blocks of NEW that differ from OLD; returns their bytes."""
    n = 0
    chunk = 256 * BLOCK
    with open(old, "rb") as a, open(new, "rb") as b, open(patch, "wb") as out:
        off = 0
        while True:
            x = a.read(chunk)
            y = b.read(chunk)
            if not y:
                break
            if x != y:
                for i in range(0, len(y), BLOCK):
                    if x[i : i + BLOCK] != y[i : i + BLOCK]:
                        blk = y[i : i + BLOCK]
                        out.write(struct.pack("<QI", off + i, len(blk)))
                        out.write(blk)
                        n += len(blk)
            off += len(y)
    return n


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def apply_patch(image, patch):
    with open(patch, "rb") as p, open(image, "r+b") as f:
        while True:
            head = p.read(12)
            if not head:
                break
            off, n = struct.unpack("<QI", head)
            f.seek(off)
            f.write(p.read(n))
        f.flush()
        os.fsync(f.fileno())


def make(work, seed, mib):
    log = lambda m: print(f"   {m}", flush=True)
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "base.img")
    tree = os.path.join(work, "tree")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    for src in BASE_TREES:
        run("cp", "-a", src, os.path.join(tree, os.path.basename(src)))
    os.makedirs(os.path.join(tree, "srv"))
    log(f"base tree: {tree_bytes(tree) / 1e6:.0f} MB from {', '.join(BASE_TREES)}")
    if os.path.exists(base):
        os.unlink(base)
    # Fixed UUID and hash seed, so the same tree gives the same image.
    run(
        "mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree,
        "-U", "6b1f3c2e-0d7a-4c55-9a3e-2f8e1d0c5b47",
        "-E", "hash_seed=0e6f2b1a-3c4d-4e5f-8a9b-c0d1e2f3a4b5,lazy_itable_init=0,lazy_journal_init=0",
        base, f"{mib}M",
    )
    shutil.rmtree(tree)
    rng = random.Random(seed)
    pool = pool_trees()
    lines = log_lines()
    log(f"churn pool: {len(pool)} real trees; {len(lines)} real text lines for logs")
    cur = os.path.join(work, "cur.img")
    prev = os.path.join(work, "prev.img")
    run("cp", "--sparse=always", base, cur)
    run("cp", "--sparse=always", base, prev)
    states = {"0": sha256(base)}
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    for day in range(1, 11):
        run("mount", "-o", "loop", cur, mnt)
        try:
            churn(mnt, day, rng, pool, lines, log)
        finally:
            run("umount", mnt)
        n = diff_patch(prev, cur, os.path.join(work, f"day-{day}.patch"))
        apply_patch(prev, os.path.join(work, f"day-{day}.patch"))
        states[str(day)] = sha256(cur)
        log(f"day {day}: {n / 1e6:.1f} MB of 4 KiB blocks changed")
    os.unlink(cur)
    os.unlink(prev)
    with open(os.path.join(work, "states.json"), "w") as f:
        json.dump(states, f)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "make":
        make(args[0], int(args[1]), int(args[2]))
    elif cmd == "apply":
        apply_patch(args[0], args[1])
    elif cmd == "sha256":
        print(sha256(args[0]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
