"""Crash consistency of copy-up, on a real ext4 that is shut down without flushing its journal.

A copy-up publishes its copy with a rename. Were that rename to reach the disk before
the copied data, the file would come back empty after a crash and hide the lower
file's data for good. ``EXT4_IOC_SHUTDOWN`` with ``NOLOGFLUSH`` (xfstests' ``godown``)
drops everything not yet committed to the journal, as pulling the plug would; the
filesystem is then mounted again, which replays the journal.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounts import force_unmount, run, union

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A fresh journaled ext4 on a loop device, mounted at ``tmp_path/ext4`` (the loop goes with the umount)."""
    img, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    run(["truncate", "-s", "128M", str(img)])
    run(["mkfs.ext4", "-q", "-F", "-O", "has_journal", str(img)])
    run(["mount", "-o", "loop", str(img), str(mnt)])
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def _crash(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def _replay(mnt: Path) -> None:
    run(["umount", str(mnt)])
    run(["mount", "-o", "loop", str(mnt.with_suffix(".img")), str(mnt)])


def test_copied_up_data_survives_a_crash(tmp_path: Path, ext4: Path) -> None:
    lower, mnt = tmp_path / "lower", tmp_path / "m"
    upper, work = ext4 / "upper", ext4 / "work"
    for d in (lower, mnt, upper, work):
        d.mkdir()
    payload = {f"f{i}": os.urandom(4096 + 37 * i) for i in range(64)}
    for name, data in payload.items():
        (lower / name).write_bytes(data)
    with union(mnt, [lower], upper, work):
        for name in payload:
            with open(mnt / name, "ab") as f:
                f.write(b"+")
        # ext4's fsync of any file commits the running transaction: every rename of the
        # copy-ups is now in the journal, but nobody has asked for the copies' data.
        fd = os.open(ext4 / "commit", os.O_CREAT | os.O_WRONLY, 0o600)
        os.fsync(fd)
        os.close(fd)
        _crash(ext4)
    _replay(ext4)
    assert sorted(p.name for p in upper.iterdir()) == sorted(payload)
    for name, data in payload.items():
        got = (upper / name).read_bytes()
        # The appended byte was never synced: ext4 may keep it, drop it, or keep the
        # size with a zero there. The copied-up bytes before it must all be back.
        assert got[: len(data)] == data, f"{name}: copied-up data lost ({len(got)} bytes after the crash)"
        assert len(got) in (len(data), len(data) + 1)
