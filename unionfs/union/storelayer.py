"""An image from the layer store as one lower layer of the union.

The image's layers were flattened at import (see :mod:`layerstore.flatten`),
so whatever the depth of the stack a lookup is one lmdb read and a listing one
prefix scan; file data is read from the blob named by the entry's digest. The
layer has the same surface as :class:`unionfs.union.layers.DirLayer` (stat, list,
open, readlink, xattrs) and holds no fd per entry.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import trio

from layerstore.entry import Entry, dir_size
from layerstore.lazy import Lazy
from layerstore.oci import SourceOptions
from layerstore.schema import SEP
from layerstore.store import Store, image_key, merged_key

log = logging.getLogger(__name__)


class StoreLayer:
    """Read-only view of one imported image."""

    def __init__(
        self,
        index: int,
        root: str,
        image_id: bytes,
        store: Store | None = None,
        prefetch: float = 0.0,
        registry: SourceOptions | None = None,
    ) -> None:
        """Open the image; ``store``: an already open store of ``root`` to use (and not close).

        (lmdb forbids opening one environment twice in a process.) An image pulled lazily
        has its store opened writable (its files are fetched into it as they are opened,
        :class:`layerstore.lazy.Lazy`); ``prefetch`` > 0 fetches the rest in the background
        meanwhile, taking about that share of the time, until :meth:`close`; ``registry``: the login and TLS
        options it is fetched with (else the auth files').
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
        self.lazy: Lazy | None = None
        self._stop = threading.Event()
        self._prefetcher: threading.Thread | None = None
        cfg = self.store.config(image_id)
        if cfg.get("lazy") and Lazy.pending_in(self.store, cfg["layers"]):
            if self._own and self.store.blobs is None:
                self.store.close()
                self.store = Store(root)
                self._db = self.store.db["merged"]
            if self.store.blobs is not None:
                self.lazy = Lazy(self.store, registry)
                keys = [k.encode() for k in cfg["layers"]]
                self._prefetcher = threading.Thread(target=self._prefetch, args=(keys, prefetch), daemon=True)
                self._prefetcher.start()

    def _prefetch(self, keys: list[bytes], share: float) -> None:
        """Reach the registries at once (a first open then waits for its range alone), then, with a ``share``,
        fetch the rest."""
        assert self.lazy is not None
        self.lazy.connect(keys)
        if share <= 0:
            return
        try:
            n = self.lazy.complete(keys, self._stop, share)
            if not self._stop.is_set():
                log.info("image fetched whole in the background (%d files)", n)
        except Exception as e:  # noqa: BLE001 - on-demand fetches go on; the next mount resumes
            log.warning("background fetch stopped: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self._prefetcher is not None:
            self._prefetcher.join(timeout=120)  # at most a range in flight (the registry client's timeouts bound it)
        if self.lazy is not None:
            self.lazy.close()
        if self._own:
            self.store.close()

    def missing(self, path: bytes) -> bool:
        """Whether ``path``'s contents are still to be fetched (an image pulled lazily)."""
        if self.lazy is None:  # (no lookup per open of a whole image's files)
            return False
        e = self._get(path)
        return e is not None and e.blob is None and e.sha256 is not None and self._blob(e, path, fetch=False) is None

    def fetch(self, path: bytes) -> None:
        """Fetch ``path``'s contents if they are still to come (blocks: call from a worker thread)."""
        e = self._get(path)
        if e is not None and e.blob is None and e.sha256 is not None:
            self._blob(e, path, fetch=True)

    def _blob(self, e: Entry, path: bytes, fetch: bool) -> bytes | None:
        assert e.sha256 is not None
        if self.lazy is not None:
            return self.lazy.blob(e.sha256, path) if fetch else self.lazy.known(e.sha256)
        with self.store.env.begin() as txn:  # a read-only store: what earlier fetches left
            blob = txn.get(e.sha256, db=self.store.db["sha256"])
        if blob is None and fetch:
            raise OSError(errno.EIO, "contents not fetched (the image was pulled lazily)", path)
        return bytes(blob) if blob is not None else None

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
        blob = e.blob
        if blob is None and e.sha256 is not None:
            blob = self._blob(e, path, fetch=True)
        if blob is None:
            raise OSError(errno.EINVAL if e.is_dir else errno.ENXIO, "no data", path)
        h = blob.hex()
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


async def fetched(layer: object, path: bytes) -> None:
    """Make sure the contents of ``path`` in ``layer`` are there (a lazily pulled image's are fetched, in a
    worker thread, so other requests go on meanwhile); nothing to do for any other layer."""
    if isinstance(layer, StoreLayer) and layer.missing(path):
        await trio.to_thread.run_sync(layer.fetch, path)
