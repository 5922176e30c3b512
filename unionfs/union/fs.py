"""The union filesystem's operations, independent of FUSE's calling conventions.

Every method either returns a result or raises :class:`OSError` with the errno
the caller should see; :mod:`unionfs.fuse.operations` turns that into FUSE replies.

Concurrency protocol (trio): code between two ``await`` points is atomic. Every
operation that changes a layer runs under :attr:`UnionFS.lock`, because copy-up
awaits worker threads and nothing may change the tree under it. Read-only
operations never await and need no lock.
"""

from __future__ import annotations

from .dir import DirOps
from .file import FileOps
from .inode import InodeOps
from .readdir import ListingOps
from .super import TIMEOUT, Options

__all__ = ["TIMEOUT", "Options", "UnionFS"]


class UnionFS(InodeOps, ListingOps, FileOps, DirOps):
    """A union of lower directories under an optional upper directory.

    Its operations live along overlayfs' own seams: :mod:`.super` (the union's state),
    :mod:`.inode`, :mod:`.readdir`, :mod:`.file` and :mod:`.dir`.
    """
