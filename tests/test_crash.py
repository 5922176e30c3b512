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
import signal
import struct
import time
from pathlib import Path

import pytest

from .mounts import daemon_pid, run, union

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def _crash(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def _replay(mnt: Path) -> None:
    """Unmount the crashed ext4 and mount it again (its journal is replayed).

    The loop device of the first mount is detached after the umount returns, in the
    background; ``mount -o loop`` would reuse a device still being torn down (reads
    then fail with EIO), so the mount waits until the image has no loop device.
    """
    img = str(mnt.with_suffix(".img"))
    run(["umount", str(mnt)])
    deadline = time.monotonic() + 30
    while run(["losetup", "-j", img]).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    run(["mount", "-o", "loop", img, str(mnt)])


MARK = "trusted.unionmount.unsettled"


def _dirs(tmp_path: Path, ext4: Path) -> tuple[Path, Path, Path, Path]:
    """(lower, mount point, upper, work): the layer and mount point outside the ext4 that crashes."""
    dirs = (tmp_path / "lower", tmp_path / "m", ext4 / "upper", ext4 / "work")
    for d in dirs:
        d.mkdir()
    return dirs


def _marked(path: Path) -> bool:
    try:
        os.getxattr(path, MARK)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("settle", ["settle=0", "settle=5", "settle=10000"])
def test_copied_up_data_survives_a_crash(tmp_path: Path, ext4: Path, settle: str) -> None:
    """settle=0: each copy is on the disk before its open returns; otherwise copies are
    settled behind it, and 10000 ms means none is when the crash comes."""
    lower, mnt, upper, work = _dirs(tmp_path, ext4)
    payload = {f"f{i}": os.urandom(4096 + 37 * i) for i in range(64)}
    for name, data in payload.items():
        (lower / name).write_bytes(data)
    with union(mnt, [lower], upper, work, extra=["-o", settle], warnings=True):
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
    damaged = [n for n, data in payload.items() if (upper / n).read_bytes()[: len(data)] != data]
    if settle == "settle=10000":
        assert damaged, "the crash lost no copied data: nothing shows the recovery works"
        assert all(_marked(upper / n) for n in damaged)
    log = tmp_path / "recovery.log"
    with union(mnt, [lower], upper, work, log=log, warnings=True):  # the mount checks what was left unsettled
        pass
    if damaged:
        assert f"restored the copied-up data of {len(damaged)} file(s)" in log.read_text()
    for name, data in payload.items():
        got = (upper / name).read_bytes()
        # The appended byte was never synced: ext4 may keep it, drop it, or keep the
        # size with a zero there. The copied-up bytes before it must all be back.
        assert got[: len(data)] == data, f"{name}: copied-up data lost ({len(got)} bytes after the crash)"
        assert len(got) in (len(data), len(data) + 1)
        assert not _marked(upper / name)
    assert not (work / "unsettled").exists()


def test_a_killed_daemon_loses_no_write(tmp_path: Path, ext4: Path) -> None:
    """Killed with copies unsettled, the filesystem still mounted: nothing is lost, the next mount only unmarks."""
    lower, mnt, upper, work = _dirs(tmp_path, ext4)
    payload = {f"f{i}": os.urandom(5000) for i in range(8)}
    for name, data in payload.items():
        (lower / name).write_bytes(data)
    with union(mnt, [lower], upper, work, extra=["-o", "settle=10000"], warnings=True):
        for name in payload:
            with open(mnt / name, "ab") as f:
                f.write(b"+")
        with open(mnt / "f0", "r+b") as f:
            f.write(b"changed")  # a change of the copied bytes themselves
        pid = daemon_pid(mnt)
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.01)
    assert (work / "unsettled").exists() and all(_marked(upper / n) for n in payload)
    log = tmp_path / "again.log"
    with union(mnt, [lower], upper, work, log=log):
        assert (mnt / "f0").read_bytes()[:7] == b"changed"
    assert "restored" not in log.read_text()
    for name, data in payload.items():
        want = data + b"+" if name != "f0" else b"changed" + data[7:] + b"+"
        assert (upper / name).read_bytes() == want
        assert not _marked(upper / name)
    assert not (work / "unsettled").exists()


def test_fsync_settles_the_copy_up_first(tmp_path: Path, ext4: Path) -> None:
    lower, mnt, upper, work = _dirs(tmp_path, ext4)
    for name in ("a", "b"):
        (lower / name).write_bytes(b"x" * 9000)
    with union(mnt, [lower], upper, work, extra=["-o", "settle=10000"]):
        fd = os.open(mnt / "a", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"+")
            assert _marked(upper / "a")
            os.fsync(fd)
            assert not _marked(upper / "a")
        finally:
            os.close(fd)
        fd = os.open(mnt / "b", os.O_WRONLY | os.O_APPEND | os.O_SYNC)  # every write durable: never deferred
        os.close(fd)
        assert (upper / "b").exists() and not _marked(upper / "b")
    assert not (work / "unsettled").exists()


def test_fsync_while_copies_are_being_settled(tmp_path: Path, ext4: Path) -> None:
    """fsync of a copy the settler's thread is writing out waits for that thread, and nothing hangs."""
    lower, mnt, upper, work = _dirs(tmp_path, ext4)
    names = [f"f{i}" for i in range(300)]
    for name in names:
        (lower / name).write_bytes(b"y" * 6000)
    with union(mnt, [lower], upper, work, extra=["-o", "settle=0.2"]):
        for i, name in enumerate(names):
            fd = os.open(mnt / name, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"+")
                if i % 3 == 2:  # the copy-ups of the two before may be in the settler's thread now
                    other = os.open(mnt / names[i - 1], os.O_WRONLY)
                    os.fsync(other)
                    os.close(other)
                os.fsync(fd)
                assert not _marked(upper / name)
            finally:
                os.close(fd)
    assert all((upper / n).read_bytes() == b"y" * 6000 + b"+" for n in names)
