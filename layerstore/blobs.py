"""File contents by XXH3-128: atomic ingest, dedup that compares bytes, sparse blobs.

Guarantees:

* a blob file appears under ``blobs/XX/HEX`` only complete: it is written in
  ``tmp/`` and renamed into place, and is never modified again;
* durability is the caller's single :meth:`BlobStore.sync` (``syncfs``) before
  it commits the index that names the new blobs: one flush per import rather
  than one fsync per file. A crash before that commit leaves blobs nobody
  references (``store gc`` drops them; ``store check`` does not count them as
  damage); a crash after it cannot lose a referenced blob;
* a digest hit is a candidate, not a proof: the bytes are compared before the
  new content is dropped in favour of the stored one; a true collision raises;
* runs of zeros are written as holes, so sparse layer files stay sparse;
* nothing here touches lmdb: the caller records digests and reference counts
  in the same transaction as the entries that use them.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
from collections.abc import Iterator
from typing import BinaryIO

import xxhash

from .host import syncfs

_CHUNK = 1 << 20
_counter = itertools.count()


class CollisionError(Exception):
    """Two different contents with the same XXH3-128 digest."""


def hexname(digest: bytes) -> str:
    h = digest.hex()
    return f"{h[:2]}/{h}"


class BlobStore:
    """The ``blobs/`` and ``tmp/`` directories of a store."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.tmp = os.path.join(root, "tmp")
        os.makedirs(self.blobs, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        self.fd = os.open(self.blobs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fanout: set[str] = set()

    def close(self) -> None:
        os.close(self.fd)

    def clean_tmp(self) -> None:
        """Remove temporaries of imports and pushes whose process is gone (named ``PID.*``)."""
        for name in os.listdir(self.tmp):
            pid = name.split(".", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                path = os.path.join(self.tmp, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    _unlink_quiet(path)

    def path(self, digest: bytes) -> str:
        return os.path.join(self.blobs, hexname(digest))

    def open(self, digest: bytes) -> int:
        """An O_RDONLY fd of a blob (never follows a symlink)."""
        return os.open(hexname(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)

    def exists(self, digest: bytes) -> bool:
        try:
            os.stat(hexname(digest), dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def ingest(self, src: BinaryIO, size: int) -> tuple[bytes, bool, bytes]:
        """Store ``size`` bytes read from ``src``; returns (digest, newly stored, their sha256).

        A file of up to one chunk is hashed in memory first, so a duplicate costs
        no temporary file; a bigger one streams through ``tmp/``. The sha256 is what
        OCI tables of contents name files by (:mod:`layerstore.chunked`).
        """
        if size <= _CHUNK:
            data = _read_exactly(src, size)
            sha = hashlib.sha256(data).digest()
            digest = xxhash.xxh3_128_digest(data)
            if self.exists(digest):
                with open(self.path(digest), "rb") as f:
                    if f.read(size + 1) != data:
                        raise CollisionError(f"XXH3-128 collision on {digest.hex()}")
                return digest, False, sha
            return (*self._store(iter((data,)), size, digest), sha)
        h = hashlib.sha256()
        digest, new = self._store(_hashed(_chunks(src, size), h), size, None)
        return digest, new, h.digest()

    def _store(self, chunks: Iterator[bytes], size: int, digest: bytes | None) -> tuple[bytes, bool]:
        tmp = os.path.join(self.tmp, f"{os.getpid()}.{next(_counter)}")
        h = xxhash.xxh3_128() if digest is None else None
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            for buf in chunks:
                if h is not None:
                    h.update(buf)
                if buf.count(0) == len(buf):
                    os.lseek(fd, len(buf), os.SEEK_CUR)  # a hole
                else:
                    _write_all(fd, buf)
            os.ftruncate(fd, size)
            if h is not None:
                digest = h.digest()
            assert digest is not None
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        if h is not None and self.exists(digest):
            same = _same_content(tmp, self.path(digest))
            os.unlink(tmp)
            if not same:
                raise CollisionError(f"XXH3-128 collision on {digest.hex()}")
            return digest, False
        name = hexname(digest)
        if name[:2] not in self._fanout:
            try:
                os.mkdir(name[:2], 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass
            self._fanout.add(name[:2])
        os.rename(tmp, name, dst_dir_fd=self.fd)
        return digest, True

    def sync(self) -> None:
        """Flush every blob written so far (and their renames) to disk: ``syncfs`` of the store."""
        syncfs(self.blobs)

    def remove(self, digest: bytes) -> None:
        """Take back a blob (an import that failed); its fan-out dir goes too if now empty."""
        path = self.path(digest)
        _unlink_quiet(path)
        try:
            os.rmdir(os.path.dirname(path))
            self._fanout.discard(hexname(digest)[:2])
        except OSError:
            pass


def _read_exactly(src: BinaryIO, size: int) -> bytes:
    data = src.read(size)
    if len(data) != size:
        raise EOFError("layer tar ends inside a file (truncated archive)")
    return data


def _chunks(src: BinaryIO, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        buf = src.read(min(_CHUNK, left))
        if not buf:
            raise EOFError("layer tar ends inside a file (truncated archive)")
        left -= len(buf)
        yield buf


def _hashed(chunks: Iterator[bytes], h: hashlib._Hash) -> Iterator[bytes]:
    for buf in chunks:
        h.update(buf)
        yield buf


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view) :]


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
