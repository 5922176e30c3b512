"""Real mounts for tests: our daemon and kernel overlayfs, always unmounted.

Both helpers are context managers; the mount is gone when they exit, even if
the body raised. Our daemon logs to a file; a WARNING or ERROR line in it
fails the test (an unexpected internal error is a bug even if the syscall
that triggered it looked fine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent / "unionmount"
COMMAND = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "unionfs"]


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=120)


def force_unmount(mnt: Path) -> None:
    for cmd in (["fusermount3", "-u", str(mnt)], ["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mounted(mnt):
            return
        run(cmd, check=False)
        time.sleep(0.05)


@contextmanager
def union(
    mnt: Path,
    lowers: Sequence[Path],
    upper: Path | None = None,
    work: Path | None = None,
    extra: Sequence[str] = (),
    log: Path | None = None,
    warnings: bool = False,
) -> Iterator[Path]:
    """Mount our union at ``mnt`` for the body of the ``with``; ``warnings``: the daemon may log some."""
    log = log or mnt.with_name(mnt.name + ".log")
    args = [*COMMAND, "mount", "--lower", ":".join(map(str, lowers)), "--log", str(log)]
    if upper is not None:
        args += ["--upper", str(upper), "--work", str(work)]
    args += [*extra, str(mnt)]
    r = run(args, check=False)
    assert r.returncode == 0, f"mount failed: {r.stderr}"
    assert is_mounted(mnt)
    ok = False
    try:
        yield mnt
        ok = True
    finally:
        still = is_mounted(mnt)
        r = run([*COMMAND, "umount", str(mnt)], check=False) if still else None
        force_unmount(mnt)
        if ok and not warnings:
            assert r is None or r.returncode == 0, f"umount failed: {r.stderr}"
            text = log.read_text() if log.exists() else ""
            bad = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
            assert not bad, "daemon logged problems:\n" + text


@contextmanager
def overlay(mnt: Path, lowers: Sequence[Path], upper: Path, work: Path, extra: str = "") -> Iterator[Path]:
    """Mount kernel overlayfs, configured as our reference (redirect_dir=on,index=on); ``extra``: more options."""
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work},redirect_dir=on,index=on"
    opts += f",{extra}" if extra else ""
    run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def fresh_dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        p = base / n
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)
        out.append(p)
    return out


def daemon_pid(mnt: Path) -> int:
    """The pid of the daemon serving ``mnt``, asked through the mount (see :mod:`unionfs.fuse.control`)."""
    return int(os.getxattr(mnt, "user.unionmount.pid"))
