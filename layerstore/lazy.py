"""Files of lazily pulled images, fetched when they are first needed and in the background.

A lazy pull (``image pull --lazy``, ``mount --pull lazy``) records a zstd:chunked or eStargz layer
from its table of contents alone: every file whose contents the store lacks is a row of
``pending`` (its sha256, the layer, its range in the layer's blob), and its entries carry
the sha256 instead of a blob (:mod:`layerstore.schema`). :class:`Lazy` turns such rows into
blobs: :meth:`Lazy.blob` for one file (a mount opening it), :meth:`Lazy.complete` for all of
some layers (the background fetch, and ``image pull`` of an image pulled lazily before).

Guarantees: a file's bytes are checked against its sha256 before the store keeps them
(:func:`layerstore.chunked.store_file`); the blob is on disk (``syncfs``) before the one
transaction that records it in ``sha256``, drops its ``pending`` rows and gives it one
reference per layer whose row went, so a kill -9 at any point leaves either the row or the
blob (and at worst an unreferenced blob file for ``store gc``). One file is fetched once
however many ask at the same time. A registry that cannot be reached, or sends bytes that
do not match, makes :meth:`Lazy.blob` raise OSError(EIO) with one log line naming the
file and the error, after the registry client's bounded retries (no wait is unbounded).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO

import msgpack

from . import estargz
from .chunked import File
from .chunked_pull import fetch_files
from .oci import SourceError, SourceOptions
from .regclient import Session
from .store import Store
from .tarlayer import LayerError

log = logging.getLogger(__name__)
_SHA = 32


def still_to_fetch(store: Store, keys: Iterable[str]) -> tuple[int, int]:
    """(files, bytes) of these layers (keys as in an image's record) that a lazy pull left to fetch."""
    if "pending" not in store.db:
        return 0, 0
    want = {k.encode() for k in keys}
    files = size = 0
    with store.env.begin() as txn:
        for k, v in txn.cursor(db=store.db["pending"]):
            if bytes(k[_SHA:]) in want:
                files += 1
                size += msgpack.unpackb(v)[2]
    return files, size


def _file(sha: bytes, key: bytes, start: int, end: int, size: int, inner: int = 0) -> File:
    """A pending row's file: in gzip members for an eStargz layer's (``sgz:`` key; ``inner``: where in
    what its member decompresses to, for files packed in one), else zstd frames."""
    return File(b"", "sha256:" + sha.hex(), size, start, end, key.startswith(estargz.PREFIX), inner)


class Lazy:
    """Fetches pending files of ``store`` (opened writable) from the registries their layers came from."""

    def __init__(self, store: Store, opts: SourceOptions | None = None) -> None:
        assert store.blobs is not None, "a read-only store cannot take fetched files"
        self.store = store
        self.opts = opts or SourceOptions()
        self._sessions: dict[tuple[str, bool], Session] = {}
        self._lock = threading.Lock()  # guards _inflight
        self._inflight: dict[bytes, threading.Event] = {}
        self._connecting = threading.Lock()  # guards _sessions; held while a registry is reached

    def close(self) -> None:
        with self._connecting:
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()

    @staticmethod
    def pending_in(store: Store, keys: Iterable[str]) -> bool:
        """Whether any of these layers (their keys as in an image's record) has files still to fetch."""
        with store.env.begin() as txn:
            if "pending" not in store.db:
                return False
            for key in keys:
                raw = txn.get(key.encode(), db=store.db["layers"])
                if raw is not None and msgpack.unpackb(raw, raw=False).get("origin"):
                    break
            else:
                return False
            want = {k.encode() for k in keys}
            return any(bytes(k[_SHA:]) in want for k in txn.cursor(db=store.db["pending"]).iternext(values=False))

    # -- lookups ------------------------------------------------------------------
    def known(self, sha: bytes) -> bytes | None:
        """The blob holding contents with this sha256, if the store has it."""
        with self.store.env.begin() as txn:
            return self.store.known_sha256(txn)(sha)

    def pending(self, keys: Iterable[bytes] | None = None) -> list[tuple[bytes, bytes, File]]:
        """(sha256, layer key, file) of every file still to fetch (of these layers only, if given)."""
        want = set(keys) if keys is not None else None
        out = []
        with self.store.env.begin() as txn:
            for k, v in txn.cursor(db=self.store.db["pending"]):
                sha, key = bytes(k[:_SHA]), bytes(k[_SHA:])
                if want is None or key in want:
                    out.append((sha, key, _file(sha, key, *msgpack.unpackb(v))))
        return out

    def _rows(self, sha: bytes) -> list[tuple[bytes, File]]:
        """(layer key, file) of each layer that has contents ``sha`` pending."""
        out = []
        with self.store.env.begin() as txn:
            cur = txn.cursor(db=self.store.db["pending"])
            if cur.set_range(sha):
                for k, v in cur:
                    if bytes(k[:_SHA]) != sha:
                        break
                    key = bytes(k[_SHA:])
                    out.append((key, _file(sha, key, *msgpack.unpackb(v))))
        return out

    # -- fetching -----------------------------------------------------------------
    def blob(self, sha: bytes, name: bytes = b"") -> bytes:
        """The blob with the contents ``sha``; fetched first if it is pending. OSError(EIO) if it cannot be
        (``name``: the file's path, for the log line)."""
        while True:
            have = self.known(sha)
            if have is not None:
                return have
            with self._lock:
                busy = self._inflight.get(sha)
                if busy is None:
                    self._inflight[sha] = threading.Event()
            if busy is not None:
                busy.wait()
                continue
            try:
                rows = self._rows(sha)
                if not rows:
                    shown = name.decode(errors="replace")
                    raise OSError(
                        errno.EIO, f"{shown}: its contents (sha256 {sha.hex()[:12]}) are neither stored nor pending"
                    )
                self._fetch(rows[0][0], [(sha, rows[0][1])], name)
            except OSError as e:
                if logging.getLogger().handlers:  # a daemon's log (the reader only sees EIO); a command says it itself
                    log.error("%s", e.strerror)
                raise
            finally:
                with self._lock:
                    self._inflight.pop(sha).set()

    def complete(self, keys: Iterable[bytes], stop: threading.Event | None = None, share: float = 1.0) -> int:
        """Fetch every pending file of these layers, a range at a time; returns how many were fetched.

        ``share`` (0 < share <= 1): after each range, wait so that fetching takes about that share of the
        time (bandwidth left to what a container reads on demand). Stops early once ``stop`` is set.
        Errors propagate (SourceError, LayerError); what was fetched before stays.
        """
        done = 0
        by_layer: dict[bytes, list[tuple[bytes, File]]] = {}
        for sha, key, f in self.pending(keys):
            by_layer.setdefault(key, []).append((sha, f))
        for key, rows in by_layer.items():
            rows.sort(key=lambda r: r[1].start)
            i = 0
            while i < len(rows):
                if stop is not None and stop.is_set():
                    return done
                group = [rows[i]]  # a range's worth: neighbours up to chunked_pull's limits
                while i + len(group) < len(rows) and rows[i + len(group)][1].end - group[0][1].start <= 8 << 20:
                    group.append(rows[i + len(group)])
                i += len(group)
                with self._lock:
                    claimed = [r for r in group if r[0] not in self._inflight]
                    for sha, _ in claimed:
                        self._inflight[sha] = threading.Event()
                began = time.monotonic()
                try:
                    todo = [r for r in claimed if self.known(r[0]) is None or self._settle(r[0])]
                    if todo:
                        self._fetch(key, todo, b"")
                        done += len(todo)
                finally:
                    with self._lock:
                        for sha, _ in claimed:
                            self._inflight.pop(sha).set()
                if not claimed:
                    continue
                if share < 1.0 and stop is not None:
                    stop.wait((time.monotonic() - began) * (1 - share) / share)
        return done

    def _settle(self, sha: bytes) -> bool:
        """A pending row whose contents arrived meanwhile (another image's pull): drop it, giving the blob its
        reference. False (nothing left to fetch)."""
        blob = self.known(sha)
        assert blob is not None
        self._record(blob, sha)
        return False

    def _fetch(self, key: bytes, rows: list[tuple[bytes, File]], name: bytes) -> None:
        """Fetch the files ``rows`` of layer ``key`` (one range where they lie close) and record them."""
        origin = self._origin(key)
        shown = name.decode(errors="replace") or f"{len(rows)} file(s) of layer {key[:16].decode()}"
        if not origin:
            raise OSError(errno.EIO, f"{shown}: its layer has no registry to fetch it from", name)
        host, repo, insecure, digest = origin
        opener = functools.partial(self._range, host, insecure, f"{repo}/blobs/{digest}")
        assert self.store.blobs is not None
        try:
            got = [(f, blob) for f, blob, _, _ in fetch_files(opener, [f for _, f in rows], self.store.blobs)]
        except (SourceError, LayerError, OSError) as e:
            raise OSError(errno.EIO, f"cannot fetch {shown} from {host}/{repo}: {e}", name) from None
        self.store.blobs.sync()  # the blobs on disk before the rows that name them
        for f, blob in got:
            self._record(blob, bytes.fromhex(f.digest[7:]))

    def _record(self, blob: bytes, sha: bytes) -> None:
        """``sha``'s contents are ``blob``: in one transaction, the sha256 row, and for every layer that had
        the file pending one reference to the blob, and its pending row gone."""
        db = self.store.db
        with self.store.env.begin(write=True) as txn:
            txn.put(sha, blob, db=db["sha256"])
            cur = txn.cursor(db=db["pending"])
            rows = []
            if cur.set_range(sha):
                for k, v in cur:
                    if bytes(k[:_SHA]) != sha:
                        break
                    rows.append((bytes(k), msgpack.unpackb(v)[2]))
            for k, size in rows:
                txn.delete(k, db=db["pending"])
                self.store.ref_blob(txn, blob, size, +1)

    def connect(self, keys: Iterable[bytes]) -> None:
        """Open the sessions to the registries the layers ``keys`` are fetched from (the client made, the
        registry reached), so that a first open waits for its range alone. Errors are left for the fetches."""
        origins = {(o[0], bool(o[2])) for o in map(self._origin, keys) if o}
        for host, insecure in origins:
            try:
                self._session(host, insecure)
            except SourceError:
                pass

    def _origin(self, key: bytes) -> list[Any] | None:
        """Layer ``key``'s [host, repository, insecure, blob digest], where its pending files come from."""
        with self.store.env.begin() as txn:
            raw = txn.get(key, db=self.store.db["layers"])
        return msgpack.unpackb(raw, raw=False).get("origin") if raw is not None else None

    def _session(self, host: str, insecure: bool) -> Session:
        with self._connecting:
            s = self._sessions.get((host, insecure))
            if s is None:
                opts = dataclasses.replace(self.opts, tls_verify=False) if insecure else self.opts
                s = self._sessions[(host, insecure)] = Session(host, opts, known=True)  # (forked from the pull)
            return s

    def _range(self, host: str, insecure: bool, path: str, start: int, end: int) -> BinaryIO:
        return self._session(host, insecure).blob_range(path, start, end)  # type: ignore[return-value]  # a ChunkReader reads as a BinaryIO
