"""An image from the layer store as one lower layer of the union.

The image's layers were flattened at import (see :mod:`layerstore.flatten`),
so whatever the depth of the stack a lookup is one lmdb read and a listing one
prefix scan; file data is read from the blob named by the entry's digest. The
layer has the same surface as :class:`unionfs.union.layers.DirLayer` (stat, list,
open, readlink, xattrs) and holds no fd per entry.
"""

from __future__ import annotations

import errno
import os

from layerstore.entry import Entry, dir_size
from layerstore.schema import SEP
from layerstore.store import Store, image_key, merged_key


class StoreLayer:
    """Read-only view of one imported image."""

    def __init__(self, index: int, root: str, image_id: bytes, store: Store | None = None) -> None:
        """Open the image; ``store``: an already open store of ``root`` to use (and not close).

        (lmdb forbids opening one environment twice in a process.)
        """
        self.index = index
        self.root = root
        self.writable = False
        self._own = store is None
        self.store = store or Store(root, readonly=True)
        self._prefix = image_key(image_id)
        self._db = self.store.db["merged"]
        if self._get(b"") is None:
            raise OSError(errno.ENOENT, "image has no merged tree", image_id)

    def close(self) -> None:
        if self._own:
            self.store.close()

    def entry(self, path: bytes) -> Entry | None:
        """The image's record of ``path`` (None if the image has no such path)."""
        return self._get(path)

    def _get(self, path: bytes) -> Entry | None:
        with self.store.env.begin() as txn:
            raw = txn.get(merged_key(self._prefix, path), db=self._db)
        return Entry.unpack(raw) if raw is not None else None

    def _entry(self, path: bytes) -> Entry:
        e = self._get(path)
        if e is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return e

    def lstat(self, path: bytes) -> os.stat_result | None:
        e = self._get(path)
        if e is None:
            return None
        if e.is_dir and e.size == 0:  # flattened before directories had sizes
            e = e.with_(size=dir_size(self.listdir(path)))
        return e.stat_result()

    def listdir(self, path: bytes) -> list[bytes]:
        prefix = self._prefix + path + SEP
        out = []
        with self.store.env.begin() as txn:
            cur = txn.cursor(db=self._db)
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    name = k[len(prefix) :]
                    if name:
                        out.append(bytes(name))
        return out

    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        e = self._entry(path)
        if e.blob is None:
            raise OSError(errno.EINVAL if e.is_dir else errno.ENXIO, "no data", path)
        h = e.blob.hex()
        return os.open(f"{h[:2]}/{h}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.store.blob_fd)

    def readlink(self, path: bytes) -> bytes:
        e = self._entry(path)
        if e.target is None:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return e.target

    def listxattr(self, path: bytes) -> list[bytes]:
        return list((self._entry(path).xattrs or {}).keys())

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        value = (self._entry(path).xattrs or {}).get(name)
        if value is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), path)
        return value
