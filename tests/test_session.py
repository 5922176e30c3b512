"""Our own FUSE session (:mod:`unionfs.fuse.session`) on a real mount of a tiny file system."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounts import force_unmount, is_mounted

HERE = Path(__file__).parent


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, str(HERE / "loopfs.py"), str(mnt)], env=env)
    try:
        for _ in range(200):
            if is_mounted(mnt) or proc.poll() is not None:
                break
            time.sleep(0.025)
        assert is_mounted(mnt), f"loopfs did not mount (exit {proc.poll()})"
        yield mnt, proc
    finally:
        force_unmount(mnt)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ask(mnt: Path, name: str) -> bytes:
    return os.getxattr(mnt, name)


def _waiters(mnt: Path, keys: list[str]) -> tuple[list[threading.Thread], dict[str, bytes]]:
    got: dict[str, bytes] = {}

    def wait(key: str) -> None:
        got[key] = _ask(mnt, f"user.wait.{key}")

    threads = [threading.Thread(target=wait, args=(k,), daemon=True) for k in keys]
    for t in threads:
        t.start()
    return threads, got


def test_a_waiting_handler_does_not_stall_the_others(loopfs: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """Three handlers wait at once; every other request is still served, and each releases one."""
    mnt, _ = loopfs
    keys = ["a", "b", "c"]
    threads, got = _waiters(mnt, keys)
    answered = []

    def others() -> None:  # a stalled loop would block these for good: asked from a thread
        for _ in range(200):
            try:
                _ask(mnt, "user.none")
            except OSError as e:
                answered.append(e.errno)

    t = threading.Thread(target=others, daemon=True)
    t.start()
    t.join(timeout=30)
    assert answered == [errno.ENODATA] * 200
    assert not got
    for k in keys:
        assert _ask(mnt, f"user.release.{k}") == b"ok"
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive()
    assert got == {k: k.encode() for k in keys}


def test_a_bug_in_a_handler_is_eio_and_the_mount_lives_on(loopfs: tuple[Path, subprocess.Popen[bytes]]) -> None:
    mnt, proc = loopfs
    with pytest.raises(OSError) as e:
        _ask(mnt, "user.boom")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.listdir(mnt)  # OPENDIR: no handler, ENOSYS from the session
    assert e.value.errno == errno.ENOSYS
    assert _ask(mnt, "user.release.x") == b"ok"
    assert proc.poll() is None


def test_the_loop_ends_when_unmounted(loopfs: tuple[Path, subprocess.Popen[bytes]]) -> None:
    mnt, proc = loopfs
    threads, got = _waiters(mnt, ["x"])
    assert _ask(mnt, "user.release.x") == b"ok"
    threads[0].join(timeout=20)
    assert got == {"x": b"x"}
    force_unmount(mnt)
    assert proc.wait(timeout=20) == 0
