"""Writing layer tars as OCI tools read them (PAX, xattrs as ``SCHILY.xattr.*``).

Guarantees: names and link targets are bytes on the way in and come out byte
for byte (non-UTF-8 names included); xattr values are binary-safe (PAX
``hdrcharset=BINARY``); mtimes keep sub-second precision in PAX headers;
whiteouts and opaque markers are written in the OCI form (``.wh.NAME``,
``.wh..wh..opq``), each an empty regular file.
"""

from __future__ import annotations

import os
import stat
import tarfile
from typing import BinaryIO

from .tarlayer import OPQ, WH

_ENC = "utf-8"
_ERR = "surrogateescape"


def _s(b: bytes) -> str:
    return b.decode(_ENC, _ERR)


def info(
    path: bytes,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    size: int = 0,
    rdev: int = 0,
    target: bytes | None = None,
    xattrs: dict[bytes, bytes] | None = None,
) -> tarfile.TarInfo:
    """The header of one entry (``path`` layer-relative, ``b""`` for the root)."""
    t = tarfile.TarInfo(_s(path) if path else ".")
    t.mode = stat.S_IMODE(mode)
    t.uid, t.gid = uid, gid
    t.uname = t.gname = ""
    _mtime(t, mtime_ns)
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFDIR:
        t.type = tarfile.DIRTYPE
        if path:
            t.name += "/"
    elif fmt == stat.S_IFLNK:
        t.type = tarfile.SYMTYPE
        t.linkname = _s(target or b"")
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        t.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        t.devmajor, t.devminor = os.major(rdev), os.minor(rdev)
    elif fmt == stat.S_IFIFO:
        t.type = tarfile.FIFOTYPE
    else:
        t.type = tarfile.REGTYPE
        t.size = size
    if xattrs:
        t.pax_headers = {**t.pax_headers, **{f"SCHILY.xattr.{_s(k)}": _s(v) for k, v in sorted(xattrs.items())}}
    return t


def _mtime(t: tarfile.TarInfo, mtime_ns: int) -> None:
    """Whole seconds in the header; the exact time as PAX ``mtime`` text when there is a fraction (never a float)."""
    whole, frac = divmod(abs(mtime_ns), 10**9)
    t.mtime = mtime_ns // 10**9 if mtime_ns >= 0 else 0
    if frac or mtime_ns < 0:
        text = ("-" if mtime_ns < 0 else "") + f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
        t.pax_headers = {**t.pax_headers, "mtime": text}


def hardlink(path: bytes, target: bytes, mtime_ns: int = 0) -> tarfile.TarInfo:
    t = tarfile.TarInfo(_s(path))
    t.type = tarfile.LNKTYPE
    t.linkname = _s(target)
    _mtime(t, mtime_ns)
    return t


def whiteout(path: bytes) -> tarfile.TarInfo:
    """``.wh.NAME`` next to the deleted ``path``."""
    parent, _, name = path.rpartition(b"/")
    t = tarfile.TarInfo(_s((parent + b"/" if parent else b"") + WH + name))
    t.mode = 0o600
    return t


def opaque(dirpath: bytes) -> tarfile.TarInfo:
    """``.wh..wh..opq`` inside ``dirpath``: nothing below it from lower layers shows."""
    t = tarfile.TarInfo(_s((dirpath + b"/" if dirpath else b"") + OPQ))
    t.mode = 0o600
    return t


def writer(fileobj: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, encoding=_ENC, errors=_ERR)
