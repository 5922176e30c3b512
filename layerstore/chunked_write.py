"""Writing zstd:chunked layers, as containers/storage's compressor writes them.

The blob is a zstd stream of the layer's tar, cut into frames so that every regular
file's contents are frames of their own (the tar headers, padding and the tar's end go
in the frames between), followed by two zstd skippable frames: the table of contents
(zstd-compressed JSON: every entry's metadata, and each file's sha256, ``offset`` and
``endOffset`` in the blob) and a 40-byte footer saying where that lies. Any zstd decoder
reads the blob as the plain tar (skippable frames are skipped), so the layer's diff_id is
the tar's sha256 and podman or docker pull it as any zstd layer; readers that know the
format (podman's partial pulls, :mod:`layerstore.chunked`) find the TOC from the
descriptor's annotations and take it file by file.

Guarantees: the frames decompress to the input tar byte for byte; every file's range
decompresses to exactly its contents; the annotations are both spellings,
``io.github.containers.zstd-chunked.*`` (containers/storage since 1.45) and
``io.containers.zstd-chunked.*`` (before: podman 4.3 and skopeo 1.9 read these).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import tarfile
import time
from typing import Any, BinaryIO

import zstandard

from .chunked import TOC_MAX
from .tarlayer import LayerError

_SKIPPABLE = b"\x50\x2a\x4d\x18"
_FOOTER_MAGIC = b"GNUlInUx"
_MANIFEST_TYPE = 1
_KINDS = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_PIECE = 1 << 20
LEVEL = 3  # containers/storage's default


def write(tar: BinaryIO, out: BinaryIO, level: int = LEVEL) -> dict[str, str]:
    """Write the uncompressed, seekable ``tar`` to ``out`` (at its start) as a zstd:chunked blob; returns the
    layer descriptor's annotations. LayerError for an entry the format has no type for."""
    cctx = zstandard.ZstdCompressor(level=level)
    with tarfile.open(fileobj=tar, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()  # (all headers first: the copying below moves the file's position)
    entries: list[dict[str, Any]] = []
    at = 0  # the tar's bytes before ``at`` are written
    for ti in members:
        if ti.offset_data > at:
            _frame(cctx, tar, at, ti.offset_data - at, out)
            at = ti.offset_data
        e = toc_entry(ti)
        if e["type"] == "reg" and ti.size:
            start = out.tell()
            e["digest"] = "sha256:" + _frame(cctx, tar, ti.offset_data, ti.size, out)
            e["offset"], e["endOffset"] = start, out.tell()
            at = ti.offset_data + ti.size
        entries.append(e)
    end = tar.seek(0, 2)
    if end > at:
        _frame(cctx, tar, at, end - at, out)
    raw = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    if len(raw) > TOC_MAX:
        raise LayerError(f"the layer's table of contents would be {len(raw)} bytes (at most {TOC_MAX})")
    toc = cctx.compress(raw)
    position = f"{out.tell() + 8}:{len(toc)}:{len(raw)}:{_MANIFEST_TYPE}"
    _skippable(out, toc)
    _skippable(out, struct.pack("<4Q", out.tell() - len(toc), len(toc), len(raw), _MANIFEST_TYPE) + _FOOTER_MAGIC)
    checksum = "sha256:" + hashlib.sha256(toc).hexdigest()
    return {
        f"{prefix}zstd-chunked.{k}": v
        for prefix in ("io.github.containers.", "io.containers.")
        for k, v in (("manifest-checksum", checksum), ("manifest-position", position))
    }


def _skippable(out: BinaryIO, data: bytes) -> None:
    out.write(_SKIPPABLE + struct.pack("<I", len(data)) + data)


def _frame(cctx: zstandard.ZstdCompressor, tar: BinaryIO, start: int, n: int, out: BinaryIO) -> str:
    """Bytes [start, start + n) of ``tar`` as one zstd frame on ``out``; returns their sha256 (hex)."""
    h = hashlib.sha256()
    tar.seek(start)
    w = cctx.stream_writer(out, size=n, closefd=False, write_return_read=True)
    while n:
        piece = tar.read(min(n, _PIECE))
        if not piece:
            raise LayerError("the layer's tar ends early")
        h.update(piece)
        w.write(piece)
        n -= len(piece)
    w.flush(zstandard.FLUSH_FRAME)
    return h.hexdigest()


def toc_entry(ti: tarfile.TarInfo) -> dict[str, Any]:
    """The TOC entry of one tar member, zstd:chunked's and eStargz's schema alike (Go's field names; zero and
    empty fields left out, as ``omitempty``)."""
    kind = _KINDS.get(ti.type)
    if kind is None:
        raise LayerError(f"layer entry '{ti.name}' has a tar type zstd:chunked cannot name ({ti.type!r})")
    xattrs = {
        k.removeprefix("SCHILY.xattr."): base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
        for k, v in ti.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }
    e: dict[str, Any] = {
        "type": kind,
        "name": ti.name,
        "linkName": ti.linkname if kind in ("symlink", "hardlink") else "",
        "mode": ti.mode,
        "size": ti.size if kind == "reg" else 0,
        "uid": ti.uid,
        "gid": ti.gid,
        "modtime": _rfc3339(ti),
        "devMajor": ti.devmajor if kind in ("char", "block") else 0,
        "devMinor": ti.devminor if kind in ("char", "block") else 0,
        "xattrs": xattrs,
    }
    return {k: v for k, v in e.items() if v or k in ("type", "name")}


def _rfc3339(ti: tarfile.TarInfo) -> str:
    """The member's mtime as Go's RFC 3339 with nanoseconds (the PAX ``mtime`` text when there is one, else the
    header's seconds); before 1970 is written as 1970 (no reader of TOCs takes earlier times)."""
    text = ti.pax_headers.get("mtime")
    secs, frac = int(ti.mtime), ""
    if text and not text.startswith("-"):
        whole, _, digits = text.partition(".")
        if whole.isdigit() and (not digits or digits.isdigit()):
            secs, frac = int(whole), digits[:9].rstrip("0")
    secs = max(secs, 0)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + (f".{frac}" if frac else "") + "Z"
