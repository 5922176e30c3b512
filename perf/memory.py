#!/usr/bin/env python3
"""The daemon's memory per inode the kernel holds, and whether it is given back when the kernel forgets them.

    sudo .venv/bin/python perf/memory.py [--files 200000] [--per-dir 1000]

Builds a lower directory of FILES empty files (PER_DIR to a directory, cached in
/var/tmp/unionmount-perf-memory), mounts unionmount and fuse-overlayfs over it, walks
each with ``find -printf %s`` (a LOOKUP or READDIRPLUS entry per file: the kernel then
holds every inode), reads each daemon's resident memory, drops the kernel's inode cache
(``echo 2 > /proc/sys/vm/drop_caches``: FORGET for every inode) and reads it again.
Prints MiB and bytes per file. Goal for unionmount: under 200 MiB after 200,000 files,
and back near its start once forgotten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

UM = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "unionmount")
CACHE = Path("/var/tmp/unionmount-perf-memory")


def lower(files: int, per_dir: int) -> Path:
    d = CACHE / f"l-{files}-{per_dir}"
    if not (d / ".done").exists():
        shutil.rmtree(d, ignore_errors=True)
        for i in range(files):
            sub = d / f"d{i // per_dir:05}"
            if i % per_dir == 0:
                sub.mkdir(parents=True)
            (sub / f"file{i % per_dir:06}.txt").touch()
        (d / ".done").touch()
    return d


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fuse_pid(mnt: Path, name: str) -> int:
    if name == "unionmount":
        return int(os.getxattr(mnt, "user.unionmount.pid"))
    out = subprocess.run(["pgrep", "-f", f"fuse-overlayfs.*{mnt}"], capture_output=True, text=True).stdout.split()
    return int(out[0])


def measure(name: str, low: Path, base: Path) -> tuple[float, float, float]:
    up, work, mnt = base / f"{name}-u", base / f"{name}-w", base / f"{name}-m"
    for d in (up, work, mnt):
        d.mkdir()
    if name == "unionmount":
        args = ["--lower", str(low), "--upper", str(up), "--work", str(work), str(mnt)]
        subprocess.run([UM, "mount", *args], check=True)
    else:
        opts = f"lowerdir={low},upperdir={up},workdir={work}"
        subprocess.run(["fuse-overlayfs", "-o", opts, str(mnt)], check=True)
    try:
        pid = fuse_pid(mnt, name)
        start = rss_mib(pid)
        subprocess.run(["find", str(mnt), "-printf", "%s\\n"], check=True, stdout=subprocess.DEVNULL)
        walked = rss_mib(pid)
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("2")
        time.sleep(3)
        forgotten = rss_mib(pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    return start, walked, forgotten


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--per-dir", type=int, default=1000)
    args = ap.parse_args()
    low = lower(args.files, args.per_dir)
    print(f"{args.files} files, {args.per_dir} to a directory; resident MiB of the daemon")
    print(f"{'TARGET':<16} {'START':>8} {'WALKED':>8} {'FORGOTTEN':>10} {'BYTES/FILE':>11}")
    targets = ["unionmount"] + (["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else [])
    for name in targets:
        with tempfile.TemporaryDirectory(prefix="um-mem.") as base:
            start, walked, forgotten = measure(name, low, Path(base))
        per = (walked - start) * 2**20 / args.files
        print(f"{name:<16} {start:>8.0f} {walked:>8.0f} {forgotten:>10.0f} {per:>11.0f}")


if __name__ == "__main__":
    main()
