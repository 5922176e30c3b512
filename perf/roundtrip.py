#!/usr/bin/env python3
"""One client, one request at a time: the round trip of a request through each target.

    sudo .venv/bin/python perf/roundtrip.py [--rounds 4] [--count 20000] [--targets "kernel;fuse-overlayfs;unionmount"]

Mounts kernel overlayfs, fuse-overlayfs and unionmount (variants as ``unionmount:OPTS``)
over the same small lower directory, and times, interleaved (order reversed every other
round), ``lstat`` of names that do not exist (one LOOKUP each) and ``lstat`` of the
same file with the kernel told to ask again (``AT_STATX_FORCE_SYNC``: one GETATTR
each). Prints the median µs per request, the FUSE daemon's CPU µs per request and the
ratio to fuse-overlayfs. What it shows is the fixed cost of a request: the device's read
and write, waking the daemon, and the handler.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

UM = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "unionmount")
_AT_STATX_FORCE_SYNC = 0x2000
_libc = ctypes.CDLL(None, use_errno=True)


def _daemon_cpu(mnt: Path) -> float | None:
    needle = os.fsencode(str(mnt))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                continue
    return None


def _mount(name: str, lower: Path, work: Path) -> Path:
    for d in ("upper", "work", "mnt"):
        (work / d).mkdir(parents=True)
    up, wk, mnt = work / "upper", work / "work", work / "mnt"
    if name == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={up},workdir={wk}", str(mnt)]
    elif name == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={up},workdir={wk}", str(mnt)]
    else:
        opts = name.partition(":")[2]
        cmd = [UM, "mount", "--lower", str(lower), "--upper", str(up), "--work", str(wk), str(mnt)]
        if opts:
            cmd[2:2] = ["-o", opts]
    subprocess.run(cmd, check=True, capture_output=True)
    return mnt


def _lookups(mnt: Path, count: int, tag: str) -> None:
    d = mnt / "d"
    for i in range(count):
        try:
            os.lstat(d / f"missing-{tag}-{i}")
        except FileNotFoundError:
            pass


def _getattrs(mnt: Path, count: int) -> None:
    path = os.fsencode(str(mnt / "d" / "f"))
    buf = ctypes.create_string_buffer(256)
    statx = _libc.statx
    for _ in range(count):
        statx(-100, path, _AT_STATX_FORCE_SYNC, 0x7FF, buf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--targets", default="kernel;fuse-overlayfs;unionmount")
    args = ap.parse_args()
    targets = args.targets.split(";")
    base = Path(tempfile.mkdtemp(prefix="um-roundtrip-", dir="/var/tmp"))
    lower = base / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_text("x")
    times: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else reversed(targets):
                work = base / f"r{r}-{t.replace(':', '_').replace(',', '_')}"
                mnt = _mount(t, lower, work)
                try:
                    os.lstat(mnt / "d" / "f")
                    for kind in ("LOOKUP (missing name)", "GETATTR (forced statx)"):
                        c0 = _daemon_cpu(mnt)
                        t0 = time.perf_counter()
                        if kind.startswith("LOOKUP"):
                            _lookups(mnt, args.count, str(r))
                        else:
                            _getattrs(mnt, args.count)
                        dt = time.perf_counter() - t0
                        c1 = _daemon_cpu(mnt)
                        times.setdefault((kind, t), []).append(dt / args.count * 1e6)
                        if c0 is not None and c1 is not None:
                            cpus.setdefault((kind, t), []).append((c1 - c0) / args.count * 1e6)
                finally:
                    subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    print(f"median of {args.rounds} rounds, {args.count} requests each; µs per request (daemon CPU µs)")
    for kind in ("LOOKUP (missing name)", "GETATTR (forced statx)"):
        ref = statistics.median(times.get((kind, "fuse-overlayfs"), [float("nan")]))
        for t in targets:
            us = statistics.median(times[(kind, t)])
            cpu = f" ({statistics.median(cpus[(kind, t)]):.1f})" if (kind, t) in cpus else ""
            print(f"{kind:24} {t:28} {us:7.1f}{cpu:9}  x{us / ref:.2f} fuse-overlayfs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
