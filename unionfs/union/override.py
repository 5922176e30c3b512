"""Owners, modes and device numbers kept in an xattr where the daemon cannot chown (rootless).

An unprivileged daemon (or root in a user namespace that maps only itself)
cannot give a file another owner, nor create a device node. containers/storage
and fuse-overlayfs then keep what the file should be in the
``user.containers.override_stat`` xattr, as ``UID:GID:MODE[:TYPE]`` (MODE in
octal; TYPE ``file``, ``dir``, ``symlink``, ``pipe``, ``socket``,
``block-MAJOR-MINOR`` or ``char-MAJOR-MINOR``); we read and write the same, so
layers move between us and them. Guarantee: when :func:`chown` or
:func:`mknod` cannot do the real thing, the xattr records it and
:func:`apply` shows it; nothing is ever silently lost.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

XATTR = b"user.containers.override_stat"

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "pipe",
    stat.S_IFSOCK: "socket",
}
_NAMES = {v: k for k, v in _TYPES.items()}


@dataclass(slots=True, frozen=True)
class Override:
    uid: int
    gid: int
    mode: int  # with the type bits
    rdev: int = 0

    def encode(self) -> bytes:
        fmt = stat.S_IFMT(self.mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = f"{'char' if fmt == stat.S_IFCHR else 'block'}-{os.major(self.rdev)}-{os.minor(self.rdev)}"
        else:
            kind = _TYPES.get(fmt, "file")
        return f"{self.uid}:{self.gid}:{stat.S_IMODE(self.mode):04o}:{kind}".encode()


def decode(value: bytes, real_mode: int) -> Override | None:
    """Parse the xattr (``UID:GID:MODE`` as older fuse-overlayfs writes it, or with ``:TYPE``)."""
    try:
        parts = value.decode().strip("\0").split(":")
        uid, gid, perm = int(parts[0]), int(parts[1]), int(parts[2], 8)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    fmt, rdev = stat.S_IFMT(real_mode), 0
    if len(parts) > 3:
        kind = parts[3]
        if kind.startswith(("char-", "block-")):
            name, major, minor = kind.split("-")
            fmt = stat.S_IFCHR if name == "char" else stat.S_IFBLK
            rdev = os.makedev(int(major), int(minor))
        else:
            fmt = _NAMES.get(kind, fmt)
    return Override(uid, gid, fmt | stat.S_IMODE(perm), rdev)


def _x(fn: Callable[..., Any], target: int | bytes, *args: object) -> Any:
    """An xattr call on an fd, or on a path without following its last component."""
    return fn(target, *args) if isinstance(target, int) else fn(target, *args, follow_symlinks=False)


def read(target: int | bytes, real_mode: int) -> Override | None:
    try:
        return decode(_x(os.getxattr, target, XATTR), real_mode)
    except OSError:
        return None


def apply(st: os.stat_result, ov: Override | None) -> tuple[int, int, int, int]:
    """(uid, gid, mode, rdev) as the mount shows them."""
    if ov is None:
        return st.st_uid, st.st_gid, st.st_mode, st.st_rdev
    return ov.uid, ov.gid, ov.mode, ov.rdev


def record(target: int | bytes, ov: Override) -> None:
    try:
        _x(os.setxattr, target, XATTR, ov.encode())
    except OSError as e:
        if e.errno != errno.EPERM or not stat.S_ISLNK(ov.mode):
            raise  # a symlink cannot carry user.* xattrs: its owner is lost, as with fuse-overlayfs


def chown(target: int | bytes, uid: int, gid: int, *, rootless: bool) -> None:
    """``fchown``/``lchown``, or in a rootless mount where that is refused, the override xattr."""
    try:
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)
        if rootless:
            _drop(target)
        return
    except OSError as e:
        if not rootless or e.errno not in (errno.EPERM, errno.EINVAL):
            raise
    st = os.fstat(target) if isinstance(target, int) else os.stat(target, follow_symlinks=False)
    old = read(target, st.st_mode)
    cur_uid, cur_gid, mode, rdev = apply(st, old)
    if not stat.S_ISDIR(mode):  # as chown(2): setuid goes, setgid too where the group may execute
        mode &= ~(stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0))
    record(target, Override(cur_uid if uid == -1 else uid, cur_gid if gid == -1 else gid, mode, rdev))


def chmod(target: int | bytes, perm: int, *, rootless: bool) -> None:
    """``fchmod``/``chmod`` (never given a symlink); rootless, an override the file has follows the mode."""
    os.chmod(target, perm)
    if not rootless:
        return
    st = os.fstat(target) if isinstance(target, int) else os.stat(target, follow_symlinks=False)
    old = read(target, st.st_mode)
    if old is not None:
        record(target, Override(old.uid, old.gid, stat.S_IFMT(old.mode) | stat.S_IMODE(perm), old.rdev))


def _drop(target: int | bytes) -> None:
    try:
        _x(os.removexattr, target, XATTR)
    except OSError:
        pass


def can_chown(dirpath: str) -> bool:
    """True if the daemon can give a file in ``dirpath`` another owner (a probe file, removed)."""
    probe = os.path.join(dirpath, f".unionmount-chown-probe.{os.getpid()}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        os.fchown(fd, st.st_uid + 1 if st.st_uid < 65533 else 1, st.st_gid)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)
