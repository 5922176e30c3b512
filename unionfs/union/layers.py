"""Layers: the places a union entry can come from.

A layer answers questions about layer-relative paths (``b"a/b/c"``, the root is
``b""``): stat, list, open, readlink, xattrs. :class:`DirLayer` is a plain
directory on the host; the image store will add another kind with the same
surface.

Safety guarantee: a layer never follows a symlink found in its content. Parent
directories are reached with ``openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH)``
and the final component is always acted on with ``*at`` calls that do not
follow it (or through ``/proc/self/fd/N/name`` with ``follow_symlinks=False``).

Resource guarantee: directory fds are cached in one bounded LRU shared by all
layers (:data:`FD_CACHE_SIZE`), never one per inode. A borrowed fd stays valid
until the next-but-``FD_CACHE_SIZE`` call to :meth:`DirLayer.dirfd`; callers use
it at once and never across an ``await``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Protocol

from layerstore.host import openat2_beneath, proc_path

FD_CACHE_SIZE = 256
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY
_CHUNK = 3072  # resolve paths in pieces below PATH_MAX (4096): paths in a layer may be longer


class FdCache:
    """A bounded LRU of O_PATH directory fds keyed by (layer index, relpath)."""

    def __init__(self, size: int = FD_CACHE_SIZE) -> None:
        self._size = size
        self._fds: OrderedDict[tuple[int, bytes], int] = OrderedDict()

    def get(self, key: tuple[int, bytes]) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: tuple[int, bytes], fd: int) -> None:
        self._fds[key] = fd
        while len(self._fds) > self._size:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def drop_layer(self, index: int) -> None:
        """Forget every cached directory of one layer (after it was restructured)."""
        for key in [k for k in self._fds if k[0] == index]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Layer(Protocol):
    """What the union needs from a lower layer; paths are layer-relative, the root is ``b""``.

    Implementations: :class:`DirLayer` (a host directory) and
    :class:`unionfs.union.storelayer.StoreLayer` (an image in the layer store).
    """

    index: int
    root: str

    def lstat(self, path: bytes) -> os.stat_result | None: ...
    def listdir(self, path: bytes) -> list[bytes]: ...
    def open(self, path: bytes, flags: int, mode: int = ...) -> int: ...
    def readlink(self, path: bytes) -> bytes: ...
    def listxattr(self, path: bytes) -> list[bytes]: ...
    def getxattr(self, path: bytes, name: bytes) -> bytes: ...
    def close(self) -> None: ...


def split(path: bytes) -> tuple[bytes, bytes]:
    """Split a layer-relative path into (parent, name); the root has no parent."""
    parent, _, name = path.rpartition(b"/")
    return parent, name


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class DirLayer:
    """A plain directory used as a layer (lower or upper)."""

    def __init__(self, index: int, root: str, cache: FdCache, *, writable: bool = False) -> None:
        self.index = index
        self.root = root
        self.writable = writable
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache = cache

    def close(self) -> None:
        os.close(self.root_fd)

    def dirfd(self, relpath: bytes) -> int:
        """A borrowed O_PATH fd of the directory at ``relpath`` (raises OSError)."""
        if not relpath:
            return self.root_fd
        key = (self.index, relpath)
        fd = self._cache.get(key)
        if fd is None:
            if len(relpath) < _CHUNK:
                fd = openat2_beneath(self.root_fd, relpath, _DIR_FLAGS)
            else:
                # Longer than one syscall may take: continue from a (cached) ancestor.
                cut = relpath.index(b"/", len(relpath) - _CHUNK)
                fd = openat2_beneath(self.dirfd(relpath[:cut]), relpath[cut + 1 :], _DIR_FLAGS)
            self._cache.put(key, fd)
        return fd

    def forget_dirs(self) -> None:
        """Call after renaming or removing a directory of this layer."""
        self._cache.drop_layer(self.index)

    def at(self, path: bytes) -> tuple[int, bytes]:
        """(parent dir fd, final name) for ``path``; the root maps to (root fd, ``.``)."""
        if not path:
            return self.root_fd, b"."
        parent, name = split(path)
        return self.dirfd(parent), name

    def lstat(self, path: bytes) -> os.stat_result | None:
        """The entry's own stat, or None when it does not exist (or a parent is not a directory)."""
        try:
            fd, name = self.at(path)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == 36:  # ENAMETOOLONG for a derived marker name: it cannot exist
                return None
            raise

    def xpath(self, path: bytes) -> bytes:
        """A path for the xattr calls (to be used with ``follow_symlinks=False``)."""
        fd, name = self.at(path)
        return proc_path(fd, name)

    def listxattr(self, path: bytes) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self.xpath(path), follow_symlinks=False)]

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        return os.getxattr(self.xpath(path), name, follow_symlinks=False)

    def listdir(self, path: bytes) -> list[bytes]:
        """Names in a directory (no per-entry syscall)."""
        pfd, name = self.at(path)
        fd = openat2_beneath(pfd, name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)

    def open(self, path: bytes, flags: int, mode: int = 0o600) -> int:
        fd, name = self.at(path)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def readlink(self, path: bytes) -> bytes:
        fd, name = self.at(path)
        return os.readlink(name, dir_fd=fd)
