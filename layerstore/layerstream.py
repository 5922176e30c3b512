"""A layer blob as the uncompressed tar it holds, checked against its digests as it streams.

:func:`open_layer` is the one way the store reads a layer: the blob is hashed (its
``digest``), sniffed and inflated (gzip, zstd, xz, bzip2 or none), hashed again (its
``diff_id``), and read ahead in a thread, so fetching, inflating and hashing
overlap with the consumer's work. :class:`ChunkReader` is the raw stream these
pieces (and a registry download) are built on; :class:`Growing` is a file one
thread downloads into while another reads it.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import zstandard

from .oci import LayerRef, SourceError


class ChunkReader(io.RawIOBase):
    """A raw stream over the chunks :meth:`next_chunk` returns (``b""`` at the end)."""

    _buf = memoryview(b"")

    def next_chunk(self) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buf:
            chunk = self.next_chunk()
            if not chunk:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Cancelled(Exception):
    pass


class Growing:
    """A file one thread appends to while others read it (:class:`GrowingReader`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed by finish()
        self._cond = threading.Condition()
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self._cancelled = False

    def append(self, data: bytes) -> None:
        if self._cancelled:
            raise _Cancelled
        self._f.write(data)
        self._f.flush()
        with self._cond:
            self.size += len(data)
            self._cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        self._f.close()
        with self._cond:
            if not self.done:
                self.done, self.error = True, error
            self._cond.notify_all()

    def cancel(self) -> None:
        self._cancelled = True

    def wait_beyond(self, pos: int) -> int:
        """The size once it exceeds ``pos`` or the download ended; raises the download's error at its end."""
        with self._cond:
            while self.size <= pos and not self.done:
                self._cond.wait()
            if self.size <= pos and self.error is not None:
                raise self.error
            return self.size


class GrowingReader(ChunkReader):
    """Reads a :class:`Growing` file from its start, waiting for what is not written yet."""

    def __init__(self, g: Growing) -> None:
        self._g = g
        self._f = open(g.path, "rb")  # noqa: SIM115 - closed by close()
        self._pos = 0

    def next_chunk(self) -> bytes:
        end = self._g.wait_beyond(self._pos)
        data = self._f.read(min(end - self._pos, 1 << 20))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


class _Hashing(ChunkReader):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.h = hashlib.sha256()
        self.n = 0
        self.on_read = on_read  # called with the bytes read so far

    def next_chunk(self) -> bytes:
        data = self.raw.read(1 << 20)
        self.h.update(data)
        self.n += len(data)
        if self.on_read is not None:
            self.on_read(self.n)
        return data

    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


class _ReadAhead(ChunkReader):
    """Reads ``source`` in a thread, up to ``depth`` chunks ahead of the consumer.

    Fetching, decompressing and hashing a layer (zlib, zstd and sha256 release the
    GIL) then overlap with the consumer's tar parsing and blob writing. An error in
    the thread is raised to the consumer where it reached; :meth:`close` stops the
    thread and waits for it.
    """

    def __init__(self, source: BinaryIO, depth: int = 8) -> None:
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(source,), name="layer-read", daemon=True)
        self._thread.start()

    def _run(self, source: BinaryIO) -> None:
        try:
            while not self._stop.is_set():
                data = source.read(1 << 20)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_chunk(self) -> bytes:
        if self._eof:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._eof = not item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


class _Gunzip(ChunkReader):
    """gzip (all members, as ``gzip -d``) inflated from 1 MiB input chunks.

    ``gzip.GzipFile`` feeds zlib 8 KiB at a time through Python code, which
    took a third of an import's time; this reads the same streams.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""  # input not yet given to zlib

    def next_chunk(self) -> bytes:
        while True:
            if self._z.eof:  # a member ended: zero padding may follow, then another member (as gzip -d reads)
                rest = (self._z.unused_data + self._pending).lstrip(b"\0")
                self._pending = b""
                while not rest:
                    more = self._raw.read(1 << 20)
                    if not more:
                        return b""
                    rest = more.lstrip(b"\0")
                self._z = zlib.decompressobj(wbits=31)
                self._pending = rest
            data = self._pending or self._raw.read(1 << 20)
            if not data:
                raise EOFError("compressed layer ended before the end of its gzip stream")
            out = self._z.decompress(data, 4 << 20)
            self._pending = self._z.unconsumed_tail
            if out:
                return out


#: what reading a damaged stream through :func:`decompressed` may raise
DECODE_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError)


def decompressed(buffered: io.BufferedReader) -> BinaryIO:
    """``buffered``'s bytes inflated as its first bytes say: gzip, zstd, xz, bzip2, or none (as they are).

    Concatenated streams are read as ``gzip -d`` and the others' tools read them.
    """
    magic = buffered.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        return _Gunzip(buffered)  # type: ignore[return-value]
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered)  # type: ignore[return-value]
    if magic[:3] == b"BZh":
        return bz2.BZ2File(buffered)  # type: ignore[return-value]
    return buffered


@contextmanager
def open_layer(ref: LayerRef, on_read: Callable[[int], None] | None = None) -> Iterator[BinaryIO]:
    """The layer's uncompressed tar stream; digests are verified when the block ends.

    ``on_read`` is told how many bytes of the blob were read so far (from another thread).
    """
    raw = ref.open()
    try:
        outer = _Hashing(raw, on_read)
        inner = _Hashing(decompressed(io.BufferedReader(outer, 1 << 20)))
        ahead = _ReadAhead(inner)  # type: ignore[arg-type]  # a ChunkReader reads as a BinaryIO
        try:
            yield io.BufferedReader(ahead, 1 << 20)
            ahead.drain()
        finally:
            ahead.close()  # the reader thread has ended: the hashes are ours again
        inner.drain()
        outer.drain()
        if ref.digest is not None and outer.digest() != ref.digest:
            raise SourceError(f"layer blob {ref.digest[:19]} is corrupt (sha256 {outer.digest()[:19]})")
        if inner.digest() != ref.diff_id:
            raise SourceError(f"layer {ref.diff_id[:19]} does not match its diff_id (got {inner.digest()[:19]})")
    except DECODE_ERRORS as e:
        raise SourceError(f"cannot read layer {ref.diff_id[:19]}: {e}") from None
    finally:
        raw.close()
