"""zstd:chunked layers: the table of contents that lets a layer be taken file by file.

A zstd:chunked layer (containers/storage; ``skopeo copy --dest-compress-format
zstd:chunked`` writes it) is a zstd stream of a tar in which every file's contents
are frames of their own, followed by a table of contents (TOC): every entry's
metadata, and for each regular file its sha256 and the byte range of its frames in
the blob. The layer's descriptor in the manifest says where the TOC lies and what its
sha256 is (annotations ``io.github.containers.zstd-chunked.manifest-position`` and
``-checksum``; skopeo 1.9 writes them without ``github.``).

The trust chain of a layer taken this way: the manifest (by its digest, or the tag's)
→ the descriptor's checksum annotation → the TOC's bytes → each file's sha256, checked
when its bytes arrive. The blob's own digest is not checked (its bytes are never all
read), nor is the config's diff_id (skopeo rewrites the tar and keeps the old one): so
the store keeps such a layer under ``toc:HEX`` (the TOC's sha256), never under a
diff_id it has not verified.

Guarantees: everything here is untrusted input checked before use. A TOC whose bytes
do not match the annotation, that lies outside the blob, is larger than
:data:`TOC_MAX` or is not the JSON it should be; an entry with an unknown type, a
path climbing out, an owner or mode out of range, or a file range outside the blob's
data or longer than the compressed form of its size could be; file bytes that do not
decompress to exactly their size and sha256: each is a :class:`LayerError` of one
line, raised before anything of that file is stored.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import hashlib
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import zstandard

from .blobs import BlobStore
from .entry import Entry
from .tarlayer import NAME_MAX, LayerError, check_entry, clean_path, marker

_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
PREFIX = b"toc:"  # of the store's key of a layer taken by its zstd:chunked TOC
TOC_MAX = 256 << 20  # bytes of a TOC, compressed or not: a layer of a million files has about 300 MB
_TYPE_JSON = 1  # manifest-position's last field: the TOC is JSON (the only kind there is)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_TIME_RE = re.compile(r"(-?\d{4,})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)\Z")
_MAX_ID = 2**32 - 2
#: the longest a zstd frame holding N bytes can be, as zstd bounds it (ZSTD_compressBound), plus framing slack
_SLACK = 1 << 10

_KINDS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class Position:
    """Where a layer's TOC lies in its blob, and the sha256 its compressed bytes must have."""

    offset: int
    length: int
    uncompressed: int
    checksum: str  # sha256:HEX

    @property
    def key(self) -> bytes:
        """The layer's name in the store (``toc:HEX``, as long as a diff_id's hex is: the same key room)."""
        return PREFIX + self.checksum[7:].encode()


class File(NamedTuple):
    """A regular file of the layer whose bytes lie in the blob: [start, end) decompresses to ``size`` bytes
    (zstd frames; with ``gzip``, gzip members whose bytes from ``inner`` on are the file's, as eStargz has
    them: several small files may share one member, and so one range)."""

    path: bytes
    digest: str  # sha256:HEX of the contents
    size: int
    start: int
    end: int
    gzip: bool = False
    inner: int = 0  # (eStargz) bytes the members decompress to before the file's: files packed in one member


class Member(NamedTuple):
    """One TOC entry as the store takes it: a path and its entry (with no blob yet for a file whose
    bytes are in ``file``), or a whiteout or opaque mark (``entry.kind``)."""

    path: bytes
    entry: Entry
    file: File | None = None


def position(annotations: Mapping[str, object], blob_size: int | None) -> Position | None:
    """The TOC's place from a layer descriptor's annotations; None for a layer that is not zstd:chunked.

    LayerError when the annotations are there but make no sense (out of the blob, not numbers).
    """
    for prefix in _PREFIXES:
        pos, checksum = annotations.get(prefix + "manifest-position"), annotations.get(prefix + "manifest-checksum")
        if pos is None and checksum is None:
            continue
        if not isinstance(pos, str) or not isinstance(checksum, str) or not DIGEST_RE.match(checksum):
            raise LayerError("zstd:chunked layer with malformed TOC annotations")
        fields = pos.split(":")
        if len(fields) != 4 or not all(f.isdigit() and len(f) <= 15 for f in fields):
            raise LayerError(f"zstd:chunked layer with a malformed TOC position '{pos[:60]}'")
        offset, length, uncompressed, kind = map(int, fields)
        if kind != _TYPE_JSON:
            raise LayerError(f"zstd:chunked layer with a TOC of unknown type {kind}")
        if length == 0 or length > TOC_MAX or uncompressed > TOC_MAX:
            raise LayerError(f"zstd:chunked layer whose TOC is {max(length, uncompressed)} bytes (at most {TOC_MAX})")
        if blob_size is not None and offset + length > blob_size:
            raise LayerError("zstd:chunked layer whose TOC lies beyond the end of its blob")
        return Position(offset, length, uncompressed, checksum)
    return None


def read_toc(pos: Position, compressed: bytes) -> list[dict[str, object]]:
    """The TOC's entries from its compressed bytes, which must match the annotation's checksum."""
    if len(compressed) != pos.length or "sha256:" + hashlib.sha256(compressed).hexdigest() != pos.checksum:
        raise LayerError(f"zstd:chunked TOC does not match its checksum {pos.checksum[:19]}")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
        raw = reader.read(pos.uncompressed + 1)
    except zstandard.ZstdError as e:
        raise LayerError(f"zstd:chunked TOC cannot be decompressed: {e}") from None
    if len(raw) != pos.uncompressed:
        raise LayerError(f"zstd:chunked TOC is not the {pos.uncompressed} bytes its position says")
    return parse_toc(raw, "zstd:chunked")


def parse_toc(raw: bytes, fmt: str) -> list[dict[str, object]]:
    """The entries of a TOC's JSON (``fmt`` names the layer format in errors): zstd:chunked's and
    eStargz's are the same document, version 1, a list of entry objects."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise LayerError(f"{fmt} TOC is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("entries"), list):
        raise LayerError(f"{fmt} TOC is not a version 1 table of contents")
    entries: list[dict[str, object]] = doc["entries"]
    if not all(isinstance(e, dict) for e in entries):
        raise LayerError(f"{fmt} TOC has an entry that is not an object")
    return entries


def mtime_ns(text: object, name: str) -> int:
    """An RFC 3339 time (Go's, to the nanosecond) in nanoseconds since the epoch."""
    ns = _parse_time(text) if isinstance(text, str) else None
    if ns is None:
        raise LayerError(f"layer entry '{name}' has a malformed time ({str(text)[:40]!r})")
    if ns < 0:
        raise LayerError(f"layer entry '{name}' has a time out of range ({text!r})")
    return ns


@functools.lru_cache(maxsize=4096)
def _parse_time(text: str) -> int | None:
    """``text`` in nanoseconds, None if malformed, -1 if out of range (cached: the files of one package share a
    time, so an image's TOC has a few thousand distinct times for tens of thousands of entries)."""
    m = _TIME_RE.match(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61 and year < 10000):
        return -1
    secs = calendar.timegm((year, month, day, hour, minute, second))
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        secs -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    ns = secs * 10**9 + int(((m.group(7) or "") + "000000000")[:9])
    return ns if ns >= 0 else -1


def _int(e: Mapping[str, object], key: str, name: str, top: int) -> int:
    v = e.get(key, 0)
    if type(v) is not int or not 0 <= v <= top:  # (not a bool, nor any other subclass)
        raise LayerError(f"layer entry '{name}' has a {key} out of range ({str(v)[:40]})")
    return v


def _xattrs(e: Mapping[str, object], name: str) -> dict[bytes, bytes] | None:
    x = e.get("xattrs")
    if x is None:
        return None
    if not isinstance(x, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in x.items()):
        raise LayerError(f"layer entry '{name}' has malformed xattrs")
    try:
        return {k.encode("utf-8", "surrogateescape"): base64.b64decode(v, validate=True) for k, v in x.items()} or None
    except binascii.Error:
        raise LayerError(f"layer entry '{name}' has an xattr that is not base64") from None


def members(entries: list[dict[str, object]], data_end: int, gzip: bool = False) -> Iterator[Member]:
    """The layer's members in TOC order; file ranges must lie in [0, ``data_end``) (before the TOC), each
    file's given by ``offset`` and ``endOffset``; ``gzip``: they are eStargz's gzip members (whose range
    also holds the tar headers after the file, so no bound on its length), not zstd frames.

    Whiteouts (``.wh.NAME``) and opaque marks come out as marks, as :func:`layerstore.tarlayer.marker` makes them.
    Hard links are entries with ``link`` set; whether their target exists is the importer's check.
    """
    kinds, parse_time = _KINDS.get, _parse_time
    for e in entries:  # (the common case inline: an image's TOC has tens of thousands of entries)
        get = e.get
        kind, name = get("type"), get("name")
        if type(kind) is not str or type(name) is not str:
            raise LayerError("layer TOC has an entry without type or name")
        if kind == "chunk":  # a part of the file before it: its bytes lie within that file's range
            continue
        path = clean_path(name)
        uid, gid, mode = get("uid", 0), get("gid", 0), get("mode", 0)
        if type(uid) is not int or type(gid) is not int or not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
            uid, gid = _int(e, "uid", name, _MAX_ID), _int(e, "gid", name, _MAX_ID)  # (raises)
        if len(path) > NAME_MAX:  # (shorter ones hold no name too long either)
            check_entry(name, path, uid, gid)
        mark = marker(name, path) if b".wh." in path else None
        if mark is not None:
            yield Member(*mark)
            continue
        if type(mode) is not int or not 0 <= mode <= 0o177777:
            mode = _int(e, "mode", name, 0o177777)  # (raises)
        mode &= 0o7777  # (a tar's mode field may carry the type's bits too)
        text = get("modtime")
        mtime = parse_time(text) if type(text) is str else None
        if mtime is None or mtime < 0:
            mtime = mtime_ns(text, name)  # (raises)
        if kind == "hardlink":
            target = get("linkName")
            if not isinstance(target, str) or not clean_path(target):
                raise LayerError(f"hard link '{name}' has no target")
            yield Member(path, Entry(stat.S_IFREG, link=clean_path(target)))
            continue
        fmt = kinds(kind)
        if fmt is None:
            raise LayerError(f"layer entry '{name}' has an unknown type '{kind[:20]}'")
        if not path and fmt != stat.S_IFDIR:
            raise LayerError(f"layer entry '{name}' (the root) is not a directory")
        xattrs = _xattrs(e, name) if "xattrs" in e else None
        if fmt == stat.S_IFREG:
            size = get("size", 0)
            if type(size) is not int or not 0 <= size < 2**63:
                size = _int(e, "size", name, 2**63 - 1)  # (raises)
            file = None
            if size:
                digest, start, end = get("digest"), get("offset"), get("endOffset")
                if not isinstance(digest, str) or not DIGEST_RE.match(digest):
                    raise LayerError(f"layer file '{name}' has no sha256 digest in the TOC")
                if not (type(start) is int and type(end) is int and 0 <= start < end <= data_end):
                    raise LayerError(f"layer file '{name}' has a range outside the layer's data")
                if not gzip and end - start > size + size // 64 + _SLACK * (1 + size // (1 << 17)):
                    raise LayerError(f"layer file '{name}' has a range longer than {size} bytes can take compressed")
                inner = get("innerOffset", 0)
                if type(inner) is not int or not 0 <= inner < 2**63 or (inner and not gzip):
                    raise LayerError(f"layer file '{name}' has an innerOffset that is not a place in its members")
                file = File(path, digest, size, start, end, gzip, inner)
            yield Member(path, Entry(fmt | mode, uid, gid, mtime, size, xattrs=xattrs), file)
            continue
        target_b = None
        rdev = 0
        if fmt == stat.S_IFLNK:
            target = get("linkName")
            if not isinstance(target, str) or not target:
                raise LayerError(f"symlink '{name}' has no target")
            target_b = target.encode("utf-8", "surrogateescape")
            mode = 0o777
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = _device(e, name)
        size = len(target_b) if target_b is not None else 0
        yield Member(path, Entry(fmt | mode, uid, gid, mtime, size, rdev, target_b, xattrs))


def _device(e: Mapping[str, object], name: str) -> int:
    return os.makedev(_int(e, "devMajor", name, 2**32 - 1), _int(e, "devMinor", name, 2**32 - 1))


def contents(members: list[Member]) -> list[File]:
    """The layer's files with contents, one per sha256 (the first), their ranges checked to lie apart: a TOC
    whose ranges overlap is refused here, when it is read, not when one of them is fetched (a lazy pull)."""
    unique: dict[str, File] = {}
    for m in members:
        if m.file is not None and m.file.digest not in unique:
            unique[m.file.digest] = m.file
    files = list(unique.values())
    _in_order(files)
    return files


def _in_order(files: list[File]) -> list[File]:
    """``files`` by their place in the blob (and in their member); LayerError if two overlap. eStargz files
    packed in one member overlap as its format has it: both end where it ends, and where both begin there
    too, one after the other (``inner`` and ``size``)."""
    ordered = sorted(files, key=lambda f: (f.start, f.inner))
    for before, f in zip(ordered, ordered[1:], strict=False):
        packed = f.gzip and before.gzip and f.end == before.end
        if packed and f.start == before.start:
            packed = f.inner >= before.inner + before.size
        if f.start < before.end and not packed:
            raise LayerError(f"layer file '{f.path.decode(errors='replace')}' overlaps another in the blob")
    return ordered


def plan(files: list[File], gap: int, most: int) -> list[tuple[int, int, list[File]]]:
    """Ranges to fetch for ``files``: neighbours at most ``gap`` bytes apart share one, up to ``most``
    bytes a range (a file longer than that has one of its own; files packed in one member always share
    one, the order of their ``inner`` offsets). Overlapping files: LayerError."""
    out: list[tuple[int, int, list[File]]] = []
    for f in _in_order(files):
        if out and (f.start < out[-1][1] or f.start - out[-1][1] <= gap and f.end - out[-1][0] <= most):
            start, end, group = out[-1]
            out[-1] = (start, max(end, f.end), [*group, f])
        else:
            out.append((f.start, f.end, [f]))
    return out


def store_file(f: File, frames: BinaryIO, blobs: BlobStore) -> tuple[bytes, bool]:
    """Decompress the file's frames (exactly ``end - start`` bytes from ``frames``; for a gzip file, its
    bytes from ``inner`` on) into the blob store; returns (blob, newly stored). LayerError, with nothing
    of it kept, unless they decompress to exactly ``size`` bytes with the TOC's sha256."""
    name = f.path.decode(errors="replace")
    bounded = _Exactly(frames, f.end - f.start)
    reader: BinaryIO
    if f.gzip:
        reader = _Gunzip(bounded, f.inner + f.size)  # type: ignore[assignment]
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(bounded, read_across_frames=True)  # type: ignore[arg-type]
    try:
        left = f.inner  # (what the member holds before the file: the files packed before it, tar headers)
        while left:
            left -= len(reader.read(min(left, 1 << 20)))
        digest, new, sha = blobs.ingest(reader, f.size)
        extra = b"" if f.gzip else reader.read(1)  # (after an eStargz file come the next tar headers)
    except EOFError:
        raise LayerError(f"layer file '{name}' is shorter than its size in the TOC") from None
    except (zstandard.ZstdError, zlib.error) as e:
        raise LayerError(f"layer file '{name}' cannot be decompressed: {e}") from None
    if extra or "sha256:" + sha.hex() != f.digest:
        if new:
            blobs.remove(digest)
        raise LayerError(f"layer file '{name}' does not match its sha256 in the TOC")
    bounded.drain()
    return digest, new


class _Exactly(io.RawIOBase):
    """The next ``n`` bytes of ``src`` as a stream; fewer than ``n`` there: EOFError."""

    def __init__(self, src: BinaryIO, n: int) -> None:
        self._src, self._left = src, n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(b), self._left)
        if want == 0:
            return 0
        data = self._src.read(want)
        if not data:
            raise EOFError("layer blob ends inside a file")
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def drain(self) -> None:
        """Read what the decompressor left (the frames' tail, after the last byte of the file)."""
        while self._left:
            self.read(min(self._left, 1 << 20))


class _Gunzip(io.RawIOBase):
    """The first ``n`` bytes that the gzip members in ``src``, one after another, decompress to (never more
    are decompressed, whatever the members hold); fewer there: EOFError; not gzip: zlib.error."""

    def __init__(self, src: io.RawIOBase, n: int) -> None:
        self._src, self._left = src, n
        self._z = zlib.decompressobj(31)
        self._in = b""  # compressed bytes read and not yet decompressed

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``b`` (up to the ``n`` bytes): a read is short only at the end, as the callers expect."""
        want = min(len(b), self._left)
        got = 0
        while got < want:
            if not self._in:
                self._in = self._src.read(1 << 16) or b""
                if not self._in:
                    raise EOFError("layer blob ends inside a file")
            out = self._z.decompress(self._in, want - got)
            self._in = self._z.unconsumed_tail
            if self._z.eof:  # a member ends: the next one starts in what follows it
                self._in = self._z.unused_data + self._in
                self._z = zlib.decompressobj(31)
            b[got : got + len(out)] = out
            got += len(out)
        self._left -= got
        return got


#: a stream of [start, end) of a layer's blob
RangeOpener = Callable[[int, int], BinaryIO]
