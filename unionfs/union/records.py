"""What the union answers and what it is given: plain records, no FUSE types.

The union's operations (:class:`unionfs.union.fs.UnionFS`) return these; the FUSE layer
(:mod:`unionfs.fuse`) turns them into replies. What they are given by a request (who
sent it, the attributes a SETATTR changes) is described by protocols that the FUSE
layer's own objects satisfy, so nothing is copied on the way in.

:class:`Attrs` uses the field names of ``struct stat`` (and of pyfuse3's
``EntryAttributes``), with times in nanoseconds; ``st_ino`` 0 in a LOOKUP answer is a
negative entry that the kernel may cache for ``entry_timeout`` seconds.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Protocol


class Attrs:
    """The attributes of an entry as the kernel is told them, and how long it may keep them."""

    __slots__ = (
        "st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink", "st_uid", "st_gid",
        "st_rdev", "st_size", "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
    )  # fmt: skip

    def __init__(self) -> None:  # the defaults of pyfuse3's EntryAttributes, which may stand in for it
        self.st_ino = 0
        self.generation = 0
        self.entry_timeout = 300.0
        self.attr_timeout = 300.0
        self.st_mode = stat.S_IFREG
        self.st_nlink = 1
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blksize = 4096
        self.st_blocks = 0
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0


@dataclass(slots=True, frozen=True)
class Opened:
    """An open file or directory: its handle, and how the kernel may cache what it reads through it."""

    fh: int
    keep_cache: bool = False  # the kernel may keep the file's pages (or the directory's listing) across opens
    direct_io: bool = False  # every read and write goes to the daemon, bypassing the page cache
    cache_dir: bool = False  # (a directory) the kernel may keep its listing (FOPEN_CACHE_DIR)


@dataclass(slots=True, frozen=True)
class FsStats:
    """``statvfs`` of the union, as the kernel is told it."""

    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int


class Caller(Protocol):
    """Who sent a request."""

    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def pid(self) -> int: ...


class CreateCaller(Caller, Protocol):
    """Who sent a request that makes an entry: its umask too."""

    @property
    def umask(self) -> int: ...


class NewAttrs(Protocol):
    """The attributes a SETATTR gives (only those its :class:`Changes` name are meant)."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int


class Changes(Protocol):
    """Which attributes a SETATTR changes."""

    @property
    def update_mode(self) -> bool: ...
    @property
    def update_uid(self) -> bool: ...
    @property
    def update_gid(self) -> bool: ...
    @property
    def update_size(self) -> bool: ...
    @property
    def update_atime(self) -> bool: ...
    @property
    def update_mtime(self) -> bool: ...


class KillRequests(Protocol):
    """The request source, where it tells which requests must drop setuid/setgid (``HANDLE_KILLPRIV_V2``)."""

    @property
    def killpriv(self) -> bool: ...
    @property
    def kill_caller(self) -> Caller | None: ...
