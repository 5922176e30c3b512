"""The session's compiled hot path (``unionfs/fuse/_pump.c``) on real mounts.

It answers GETATTR, LISTXATTR and the GETXATTR of an absent name of a fixed node (lower
only, linked) from what the union keeps on it, without entering Python. These tests make
it answer (its requests show in ``unionmount stats``), then change the node under it
(copy-up, unlink while open) and check that what a process sees is what the Python path
(``-o pump=0``) shows for the same steps. ``test_differential`` runs every scenario against
kernel overlayfs with and without it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .mounts import COMMAND, fresh_dirs, union

_libc = ctypes.CDLL(None, use_errno=True)
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC = 0x7FF


def _stats(mnt: Path) -> dict:  # type: ignore[type-arg]
    r = subprocess.run([*COMMAND, "stats", str(mnt), "--format", "json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _forced_mode_size(path: Path) -> tuple[int, int, int]:
    """(mode, size, nlink) by statx with AT_STATX_FORCE_SYNC: the kernel asks the daemon (a GETATTR)."""
    buf = ctypes.create_string_buffer(256)
    flags = _AT_STATX_FORCE_SYNC | 0x100  # AT_SYMLINK_NOFOLLOW
    if _libc.statx(-100, os.fsencode(str(path)), flags, _STATX_BASIC, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    raw = buf.raw
    nlink = int.from_bytes(raw[16:20], "little")
    mode = int.from_bytes(raw[28:30], "little")
    size = int.from_bytes(raw[40:48], "little")
    return mode, size, nlink


def _llistxattr_sized(path: Path, size: int) -> int:
    """llistxattr(2) with a buffer of ``size`` bytes: its result, or -errno."""
    buf = ctypes.create_string_buffer(max(size, 1))
    r = _libc.llistxattr(os.fsencode(str(path)), buf if size else None, size)
    return r if r >= 0 else -ctypes.get_errno()


def _steps(m: Path) -> list[object]:
    """What a process sees of lower entries before and after they change under kept answers."""
    seen: list[object] = []
    f, d, gone = m / "a", m / "dir", m / "b"
    for _ in range(2):  # the second time from what is kept
        seen.append(sorted(os.listxattr(f, follow_symlinks=False)))
        for name in ("user.one", "security.capability", "user.none"):
            try:
                seen.append(os.getxattr(f, name, follow_symlinks=False))
            except OSError as e:
                seen.append(errno.errorcode[e.errno])
        seen.append(_llistxattr_sized(f, 0))
        seen.append(_llistxattr_sized(f, 3))  # too small: ERANGE
        seen.append(_forced_mode_size(f))
        seen.append(sorted(os.listxattr(d, follow_symlinks=False)))
    os.setxattr(f, "user.added", b"new", follow_symlinks=False)  # copy-up of its metadata
    os.chmod(f, 0o600)
    seen.append(sorted(os.listxattr(f, follow_symlinks=False)))
    seen.append(os.getxattr(f, "user.added", follow_symlinks=False))
    seen.append(_forced_mode_size(f)[0] & 0o7777)
    os.removexattr(f, "user.one", follow_symlinks=False)
    seen.append(sorted(os.listxattr(f, follow_symlinks=False)))
    os.setxattr(d, "user.dir", b"d", follow_symlinks=False)  # a directory's copy-up
    seen.append(sorted(os.listxattr(d, follow_symlinks=False)))
    _forced_mode_size(gone)
    with open(gone, "rb") as held:
        os.unlink(gone)  # unlinked while open: no longer fixed
        st = os.fstat(held.fileno())
        seen.append((st.st_nlink, stat.S_IFMT(st.st_mode)))
        seen.append(sorted(os.listxattr(f"/proc/self/fd/{held.fileno()}")))
    return seen


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    low = tmp_path / "lower"
    (low / "dir").mkdir(parents=True)
    (low / "a").write_bytes(b"a" * 1000)
    (low / "b").write_bytes(b"b" * 10)
    os.setxattr(low / "a", "user.one", b"1")
    os.setxattr(low / "a", "user.two", b"22")
    os.setxattr(low / "dir", "user.three", b"333")
    os.setxattr(low / "b", "user.four", b"4")
    return low


def _run(tmp_path: Path, lower: Path, options: str, check: Callable[[dict], None]) -> list[object]:  # type: ignore[type-arg]
    u, w, m = fresh_dirs(tmp_path / options.replace("=", ""), "u", "w", "m")
    with union(m, [lower], u, w, ["-o", options]) as mnt:
        seen = _steps(mnt)
        check(_stats(mnt))
    return seen


def test_kept_answers_are_the_python_answers_and_follow_changes(tmp_path: Path, lower: Path) -> None:
    def answered_in_c(stats: dict) -> None:  # type: ignore[type-arg]
        assert stats["settings"]["pump"] is True
        ops = stats["ops"]
        # each counted once per request, wherever answered; the second pass was answered from what is kept
        assert ops["listxattr"]["count"] >= 8 and ops["getxattr"]["errors"] >= 4

    def in_python(stats: dict) -> None:  # type: ignore[type-arg]
        assert stats["settings"]["pump"] is False

    with_pump = _run(tmp_path, lower, "pump=1", answered_in_c)
    without = _run(tmp_path, lower, "pump=0", in_python)
    assert with_pump == without
    assert with_pump[0] == ["user.one", "user.two"] and with_pump[2] == "ENODATA"
    assert with_pump[5] == -errno.ERANGE and with_pump[4] == len(b"user.one\0user.two\0")


def test_the_root_of_a_mount_without_upper_still_answers_the_control_channel(tmp_path: Path, lower: Path) -> None:
    """The root of a read-only union is lower only; its xattrs include the daemon's own (``unionmount stats``)."""
    (m,) = fresh_dirs(tmp_path, "m")
    with union(m, [lower]) as mnt:
        os.listxattr(mnt)
        os.listxattr(mnt)
        assert _stats(mnt)["settings"]["pump"] is True


def test_pump_1_where_it_cannot_be_is_one_line(tmp_path: Path, lower: Path) -> None:
    (m,) = fresh_dirs(tmp_path, "m")
    r = subprocess.run(
        [*COMMAND, "mount", "--lower", str(lower), "-o", "pump=1,fastloop=0", str(m)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "pump=1 needs our own FUSE session" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(
        [*COMMAND, "mount", "--lower", str(lower), "-o", "pump=2", str(m)], capture_output=True, text=True, check=False
    )
    assert r.returncode != 0 and "pump takes 0 or 1" in r.stderr and r.stderr.count("\n") == 1
