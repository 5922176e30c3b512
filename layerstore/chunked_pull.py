"""Taking a zstd:chunked or eStargz layer file by file: only the files the store does not hold are fetched.

:func:`pull_chunked` reads the layer's TOC (:mod:`layerstore.chunked`, :mod:`layerstore.estargz`)
with one or two range reads, looks every regular file up by its sha256 among the blobs the store already has
(files of any earlier import, whatever its format), and fetches the others' bytes in
ranges, neighbours merged (:data:`GAP`, :data:`MOST`). Each file's bytes are checked
against the TOC's sha256 before the store keeps them.

Where the source cannot read parts of the blob (a registry that ignores ``Range``), the
whole blob is downloaded once to the store's ``tmp/``, checked against the
manifest's digest, and read from there: the layer is the same either way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from . import chunked, estargz
from .blobs import BlobStore
from .entry import Entry
from .oci import LayerRef, RangeIgnored, SourceError
from .schema import KIND_OPAQUE, KIND_WHITEOUT
from .tarlayer import LayerError

# files at most GAP apart in the blob are fetched in one range: 32 KiB take about as long at 100 Mbit/s as
# a request's share of a 20 ms round trip six at a time; a second Debian image version sharing 90% of its
# files then fetches 10.3% of its blob in 424 ranges (64 KiB: 15.3% in 252; 4 KiB: 6.3% in 897). Where the
# registry sends several ranges in one answer a range costs no round trip of its own: PARTS_GAP, 8 KiB
# (that pull: 7.6% in about 600 ranges, in as long as 11% took; 4 KiB saved no more time)
GAP = 32 << 10
PARTS_GAP = 8 << 10
MOST = 16 << 20  # the longest range that merges several files
PARALLEL = 6  # requests at once (a remote registry's round trip is most of a small range's time)

Opener = Callable[[int, int], BinaryIO]
PartsOpener = Callable[[list[tuple[int, int]]], Iterator[tuple[int, BinaryIO]]]
MANY = 128  # ranges asked for in one request where the registry sends parts (a Range header of about 3 KB)
# A range this long has a request of its own even where the registry sends parts: its bytes, not its round
# trip, are its time (256 KiB is 20 ms at 100 Mbit/s), and batched with others it would leave requests
# unevenly loaded (a full pull of the Debian image in perf/: 9.2 s with its ranges as parts, 6.7 s alone)
ALONE = 256 << 10


#: the prefixes of the keys of layers taken by their TOC: zstd:chunked's and eStargz's
TOC_KEYS = (chunked.PREFIX, estargz.PREFIX)


def layer_key(layer: LayerRef) -> bytes:
    """The key the store keeps ``layer`` under: ``toc:HEX`` for a zstd:chunked layer and ``sgz:HEX`` for an
    eStargz one (of known size) whose source can read parts of blobs, else its diff_id. LayerError for
    malformed TOC annotations."""
    if layer.open_range is None or not layer.annotations:
        return layer.diff_id.encode()
    pos = chunked.position(layer.annotations, layer.size)
    if pos is not None:
        return pos.key
    digest = estargz.toc_digest(layer.annotations)
    if digest is not None and layer.size is not None:
        return estargz.key(digest)
    return layer.diff_id.encode()


def _toc(layer: LayerRef, opener: Opener) -> tuple[list[chunked.Member], int]:
    """The members of a layer taken by its TOC (zstd:chunked or eStargz), and the bytes read for them."""
    pos = chunked.position(layer.annotations, layer.size)
    if pos is not None:
        toc = _read(opener, pos.offset, pos.offset + pos.length)
        return list(chunked.members(chunked.read_toc(pos, toc), pos.offset)), len(toc)
    digest = estargz.toc_digest(layer.annotations)
    assert digest is not None and layer.size is not None
    entries, data_end, nread = estargz.read_toc(functools.partial(_read, opener), layer.size, digest)
    return list(chunked.members(entries, data_end, gzip=True)), nread


def pull_chunked(
    layer: LayerRef,
    blobs: BlobStore,
    exists_below: Callable[[bytes], bool],
    on_new_blob: Callable[[bytes], None],
    known: Callable[[bytes], bytes | None],
    learn: Callable[[bytes, bytes], None],
    tmpdir: str,
    on_read: Callable[[int], None] | None = None,
    pending: Callable[[chunked.File], None] | None = None,
) -> Iterator[tuple[bytes, Entry]]:
    """Yield (path, entry) for every member of a zstd:chunked or eStargz layer, as
    :func:`layerstore.tarlayer.read_layer` does for a tar: file contents are in the blob store (``on_new_blob``
    told of each new one), ``known(sha256)`` names a blob the store has with that content, ``learn(sha256,
    blob)`` is told each file's. A whole blob downloaded for a source that cannot read parts is an unnamed
    file in ``tmpdir``.

    With ``pending`` (a lazy pull), the files the store lacks are not fetched: ``pending`` is told
    each one (once per content), and their entries carry their sha256 and no blob."""
    assert layer.open_range is not None
    with contextlib.ExitStack() as stack:
        opener: Opener = layer.open_range
        try:
            members, fetched = _toc(layer, opener)
        except RangeIgnored:
            opener = _whole(layer, stack, tmpdir)
            members, fetched = _toc(layer, opener)
        if on_read:
            on_read(fetched)
        blob_of: dict[str, bytes] = {}  # sha256:HEX -> blob, for the files of this layer
        wanted: dict[str, chunked.File] = {}
        for f in chunked.contents(members):
            have = known(bytes.fromhex(f.digest[7:]))
            if have is not None:
                blob_of[f.digest] = have
            else:
                wanted[f.digest] = f
        if pending is not None:
            for f in wanted.values():
                pending(f)
            wanted = {}
        parallel = PARALLEL if opener is layer.open_range and layer.origin is not None else 1  # (a registry's)
        parts = layer.open_parts if opener is layer.open_range else None
        for f, digest, new, n in fetch_files(opener, list(wanted.values()), blobs, parallel, parts):
            if new:
                on_new_blob(digest)
            learn(bytes.fromhex(f.digest[7:]), digest)
            blob_of[f.digest] = digest
            fetched += n
            if on_read:
                on_read(fetched)
        yield from _entries(members, blob_of, blobs, exists_below, on_new_blob)


def fetch_files(
    opener: Opener,
    files: list[chunked.File],
    blobs: BlobStore,
    parallel: int = PARALLEL,
    parts: PartsOpener | None = None,
) -> Iterator[tuple[chunked.File, bytes, bool, int]]:
    """Fetch ``files`` into the blob store, neighbours in one range, PARALLEL requests at a time: (file,
    blob, newly stored, bytes of the blob read for it) for each, each checked against its sha256
    (``parallel`` 1: one range after another, for an opener whose streams share a file position).
    With ``parts`` (a registry that may send several ranges in one answer), the ranges shorter than ALONE
    are asked for MANY to a request, spread over the PARALLEL requests, and the longer ones alone; what
    the registry does not send that way is asked for range by range. The requests go the longest first.
    If a request fails, what the others stored is still yielded before the error is raised (so that a
    failed import can take back every blob it stored)."""
    jobs: list[tuple[int, Callable[[], _Fetched]]] = []  # (bytes, job)
    if parts is not None and parallel > 1:
        groups = chunked.plan(files, PARTS_GAP, MOST)
        small = [g for g in groups if g[1] - g[0] < ALONE]
        if len(small) > parallel:
            n = min(MANY, -(-len(small) // parallel))
            for i in range(0, len(small), n):
                batch = small[i : i + n]
                jobs.append(
                    (sum(e - s for s, e, _ in batch), functools.partial(_fetch_parts, opener, parts, blobs, batch))
                )
            jobs += [
                (g[1] - g[0], functools.partial(_fetch_range, opener, blobs, *g))
                for g in groups
                if g[1] - g[0] >= ALONE
            ]
    if not jobs:  # (a range a request)
        jobs = [
            (g[1] - g[0], functools.partial(_fetch_range, opener, blobs, *g)) for g in chunked.plan(files, GAP, MOST)
        ]
    if len(jobs) == 1 or parallel <= 1:
        for _, job in jobs:
            out, err = job()
            yield from out
            if err is not None:
                raise err
        return
    jobs.sort(key=lambda j: -j[0])  # the longest first: the requests end closer together
    with ThreadPoolExecutor(parallel, thread_name_prefix="range") as pool:
        futures = [pool.submit(job) for _, job in jobs]
        first: BaseException | None = None
        for fut in futures:
            if fut.cancelled():
                continue
            out, err = fut.result()
            yield from out
            if err is not None and first is None:
                first = err
                for other in futures:
                    other.cancel()
        if first is not None:
            raise first


_Stored = tuple[chunked.File, bytes, bool, int]  # (file, blob, newly stored, bytes of the blob read for it)
_Fetched = tuple[list[_Stored], BaseException | None]  # what was stored, and the error that ended it


def _fetch_range(opener: Opener, blobs: BlobStore, start: int, end: int, group: list[chunked.File]) -> _Fetched:
    out: list[_Stored] = []
    try:
        with contextlib.closing(opener(start, end)) as stream:
            _store_group(stream, start, group, blobs, out)
    except BaseException as e:  # noqa: BLE001 - handed to the caller with what was stored before it
        return out, e
    return out, None


def _store_group(
    stream: BinaryIO,
    start: int,
    group: list[chunked.File],
    blobs: BlobStore,
    out: list[_Stored],
) -> None:
    """Store the files of ``group`` from ``stream``, which begins at byte ``start`` of the blob. A file that
    begins inside the one before (eStargz files packed in one member, the first at ``inner`` 0 or in the
    last member of a chunked file) is read from those bytes, kept as they went by."""
    at = start
    kept_from, kept = start, b""  # bytes of the blob already read and kept, from kept_from on
    for i, f in enumerate(group):
        if f.start < at:  # (chunked.plan put it in this group; chunked.contents checked it ends where at is)
            if f.start < kept_from or f.end > at:
                raise LayerError(f"layer file '{f.path.decode(errors='replace')}' overlaps another in the blob")
            digest, new = chunked.store_file(f, io.BytesIO(kept[f.start - kept_from : f.end - kept_from]), blobs)
            out.append((f, digest, new, 0))
            continue
        _skip(stream, f.start - at)
        nxt = group[i + 1].start if i + 1 < len(group) else f.end
        keeping = _Keeping(stream, f.start, nxt) if nxt < f.end else None
        digest, new = chunked.store_file(f, keeping or stream, blobs)  # type: ignore[arg-type]  # (read() is all it needs)
        if keeping is not None:
            kept_from, kept = nxt, bytes(keeping.kept)
        out.append((f, digest, new, f.end - at))
        at = f.end


class _Keeping:
    """A stream at byte ``at`` of the blob that keeps what it reads from byte ``keep`` on (in ``kept``)."""

    def __init__(self, src: BinaryIO, at: int, keep: int) -> None:
        self._src, self._at, self._keep = src, at, keep
        self.kept = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if self._at + len(data) > self._keep:
            self.kept += data[max(0, self._keep - self._at) :]
        self._at += len(data)
        return data


def _fetch_parts(
    opener: Opener, parts: PartsOpener, blobs: BlobStore, groups: list[tuple[int, int, list[chunked.File]]]
) -> _Fetched:
    """The ranges of ``groups`` in one request; those the registry does not send so (it refuses parts,
    leaves some out, or the answer breaks off) one by one, as :func:`_fetch_range` does."""
    if len(groups) == 1:  # (one range is answered as one, not as a part: that is no refusal)
        return _fetch_range(opener, blobs, *groups[0])
    out: list[_Stored] = []
    left = {start: (start, end, group) for start, end, group in groups}
    answer: Iterator[tuple[int, BinaryIO]] | None = None
    try:
        answer = parts([(s, e) for s, e, _ in groups])  # (a refusal may come here already)
        for start, stream in answer:
            _, _, group = left[start]
            _store_group(stream, start, group, blobs, out)
            del left[start]
    except SourceError:
        pass  # (a registry that cannot, or a broken answer: the ranges still missing are asked for alone)
    except BaseException as e:  # noqa: BLE001 - as in _fetch_range
        return out, e
    finally:
        if answer is not None:
            getattr(answer, "close", lambda: None)()  # (a generator: its response closed now, not when collected)
    stored = {f for f, _, _, _ in out}
    for _, _, group in sorted(left.values()):
        rest = [f for f in group if f not in stored]
        if rest:
            more, err = _fetch_range(opener, blobs, rest[0].start, rest[-1].end, rest)
            out += more
            if err is not None:
                return out, err
    return out, None


def _entries(
    members: list[chunked.Member],
    blob_of: dict[str, bytes],
    blobs: BlobStore,
    exists_below: Callable[[bytes], bool],
    on_new_blob: Callable[[bytes], None],
) -> Iterator[tuple[bytes, Entry]]:
    """The members as entries, checked as a tar's are: nothing below a non-directory of the layer,
    hard links to what the layer or the ones below have."""
    seen: dict[bytes, Entry] = {}
    empty: bytes | None = None
    for m in members:
        path, e = m.path, m.entry
        if e.kind in (KIND_WHITEOUT, KIND_OPAQUE):
            yield path, e
            continue
        name = path.decode(errors="replace")
        pe = seen.get(path.rpartition(b"/")[0]) if path else None
        if pe is not None and not pe.is_dir:
            raise LayerError(f"layer entry '{name}' lies below a non-directory of the same layer")
        if e.link is not None:
            if e.link not in seen and not exists_below(e.link):
                raise LayerError(f"hard link '{name}' points to a path the image does not have")
        elif stat.S_ISREG(e.mode):
            if m.file is not None and m.file.digest not in blob_of:  # to come (a lazy pull)
                e = e.with_(sha256=bytes.fromhex(m.file.digest[7:]))
            elif m.file is not None:
                e = e.with_(blob=blob_of[m.file.digest])
            else:  # empty: every empty file is the empty blob, as a tar import makes it
                if empty is None:
                    empty, new, _ = blobs.ingest(io.BytesIO(b""), 0)
                    if new:
                        on_new_blob(empty)
                e = e.with_(blob=empty)
        seen[path] = e
        yield path, e


def _read(opener: Opener, start: int, end: int) -> bytes:
    with contextlib.closing(opener(start, end)) as f:
        data = _read_exactly(f, end - start)
    return data


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(min(n - len(out), 1 << 20))
        if not chunk:
            raise LayerError("layer blob ends before the range its TOC names")
        out += chunk
    return bytes(out)


def _skip(f: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise LayerError("layer blob ends before the range its TOC names")
        n -= len(chunk)


def _whole(layer: LayerRef, stack: contextlib.ExitStack, tmpdir: str) -> Opener:
    """Download the whole blob into a temporary file (its digest checked); parts are read from there."""
    tmp = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - the stack closes it
    stack.callback(tmp.close)
    h = hashlib.sha256()
    with contextlib.closing(layer.open()) as src:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            tmp.write(chunk)
    if layer.digest is not None and "sha256:" + h.hexdigest() != layer.digest:
        raise SourceError(f"layer blob {layer.digest[:19]} is corrupt (sha256 sha256:{h.hexdigest()[:12]})")
    tmp.flush()
    fd = tmp.fileno()

    def opened(start: int, end: int) -> BinaryIO:
        f = os.fdopen(os.dup(fd), "rb")
        f.seek(start)
        return f

    return opened
