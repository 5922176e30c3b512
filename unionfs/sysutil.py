"""Thin wrappers for the Linux syscalls Python's ``os`` module lacks.

Guarantees:

* :func:`openat2_beneath` resolves a relative path below a directory fd without
  following any symlink, magic link or ``..`` escape (``RESOLVE_NO_SYMLINKS |
  RESOLVE_BENEATH``). It is how the daemon reaches a directory inside a layer.
* :func:`renameat2` exposes ``RENAME_NOREPLACE``, ``RENAME_EXCHANGE`` and
  ``RENAME_WHITEOUT``.

Every failure is raised as :class:`OSError` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic and x86)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _raise(path: bytes | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


def openat2_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """Open ``path`` (relative, no leading slash) below ``dirfd``; no symlink is followed."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path or b"."),
        ctypes.byref(how),
        ctypes.c_size_t(_HOW_SIZE),
    )
    if fd < 0:
        if ctypes.get_errno() == errno.ELOOP:
            # A symlink where a directory was expected: to us, that path does not exist.
            raise OSError(errno.ENOENT, "symlink in layer path refused", path)
        _raise(path)
    return int(fd)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; names are single components relative to the directory fds."""
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        _raise(oldname)


def proc_path(dirfd: int, name: bytes) -> bytes:
    """A path that reaches ``name`` inside the directory ``dirfd`` without re-resolving its parents.

    Used for the calls that have no ``*at`` form (the xattr family). The final
    component is never followed by callers, who pass ``follow_symlinks=False``.
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, name)
