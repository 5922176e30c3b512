"""eStargz layers: a gzip layer that can be taken file by file, by its table of contents.

An eStargz layer (containerd's stargz-snapshotter; ``nerdctl image convert --estargz``
writes it) is a valid ``tar+gzip`` layer made of many gzip members: every regular file's
contents start a member of their own (a big file's, one member per chunk), and the tar
headers of what follows go in the member of the file before. After the files come a
member holding the tar entry ``stargz.index.json`` (the TOC: the same JSON document as
zstd:chunked's, every file with its sha256 and the ``offset`` of its first member) and a
51-byte footer, an empty gzip member whose extra field says where the TOC member starts.
A file's bytes are the first ``size`` bytes its members decompress to, from its offset to
the next file's (or the TOC's).

The trust chain: the manifest (by its digest, or the tag's) → the layer descriptor's
``containerd.io/snapshot/stargz/toc.digest`` annotation (the sha256 of the TOC's JSON) →
the TOC → each file's sha256, checked when its bytes arrive. The footer is not trusted,
only used to find the TOC, whose bytes must match the annotation. The store keeps such a
layer under ``sgz:HEX`` (the TOC's sha256), never under a diff_id it has not verified.
A layer without the annotation is read whole, as the gzip tar it also is.

The TOC names two marker files at the layer's root, ``.prefetch.landmark`` and
``.no.prefetch.landmark`` (where the files a container reads first end): they are not
the image's, and are left out as stargz-snapshotter leaves them out.

Guarantees: as :mod:`layerstore.chunked`'s, everything is untrusted and checked before
use: a footer that is not one, a TOC out of the blob, larger than
:data:`layerstore.chunked.TOC_MAX`, not a tar entry ``stargz.index.json``, or whose JSON
does not match the annotation; file ranges out of order or outside the data: each a
:class:`LayerError` of one line. Small files packed in one member (stargz-snapshotter's
``--estargz-min-chunk-size``: the same ``offset``, each at its ``innerOffset`` in what the
member decompresses to) are read from that member, fetched once for all of them.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Callable, Mapping

from .chunked import DIGEST_RE, TOC_MAX, parse_toc
from .tarlayer import LayerError

ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
PREFIX = b"sgz:"  # of the store's key of a layer taken by its eStargz TOC
FOOTER = 51
TOC_NAME = "stargz.index.json"
#: the blob's last bytes read at first: the footer, and the TOC too when it is no longer (one round trip)
TAIL = 256 << 10
_LANDMARKS = frozenset(p + n for p in ("", "./", "/") for n in (".prefetch.landmark", ".no.prefetch.landmark"))
_HEX16 = re.compile(rb"[0-9a-f]{16}\Z")


def toc_digest(annotations: Mapping[str, object]) -> str | None:
    """The TOC's sha256 (``sha256:HEX``) from a layer descriptor's annotations; None for a layer that is not
    eStargz. LayerError when the annotation is there but is not a sha256 digest."""
    digest = annotations.get(ANNOTATION)
    if digest is None:
        return None
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise LayerError("eStargz layer with a malformed TOC digest annotation")
    return digest


def key(digest: str) -> bytes:
    """The layer's name in the store: ``sgz:HEX`` (as long as a ``toc:`` key, in the same key room)."""
    return PREFIX + digest[7:].encode()


def toc_offset(footer: bytes, blob_size: int) -> int:
    """Where the TOC's member starts, from the blob's last :data:`FOOTER` bytes."""
    if (
        len(footer) != FOOTER
        or footer[:4] != b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA
        or footer[10:16] != b"\x1a\x00SG\x16\x00"  # 26 bytes of extra: subfield "SG" of 22
        or footer[32:38] != b"STARGZ"
        or not _HEX16.match(footer[16:32])
    ):
        raise LayerError("eStargz layer without its footer")
    offset = int(footer[16:32], 16)
    if offset >= blob_size - FOOTER:
        raise LayerError("eStargz layer whose TOC lies beyond the end of its blob")
    if blob_size - FOOTER - offset > TOC_MAX:
        raise LayerError(f"eStargz layer whose TOC is {blob_size - FOOTER - offset} bytes (at most {TOC_MAX})")
    return offset


Entries = list[dict[str, object]]


def read_toc(read: Callable[[int, int], bytes], blob_size: int, digest: str) -> tuple[Entries, int, int]:
    """(entries, the TOC's offset: where the files' data ends, bytes read) of the layer whose bytes
    [start, end) ``read`` returns; the TOC's JSON must have the sha256 ``digest``."""
    if blob_size <= FOOTER:
        raise LayerError("eStargz layer too short for its footer")
    tail_start = max(0, blob_size - TAIL)
    tail = read(tail_start, blob_size)
    offset = toc_offset(tail[-FOOTER:], blob_size)
    nread = len(tail)
    if offset >= tail_start:
        member = tail[offset - tail_start : -FOOTER]
    else:
        member = read(offset, blob_size - FOOTER)
        nread += len(member)
    raw = _toc_json(member)
    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
        raise LayerError(f"eStargz TOC does not match its digest {digest[:19]}")
    return with_ends(parse_toc(raw, "eStargz"), offset), offset, nread


def _toc_json(member: bytes) -> bytes:
    """The JSON of the tar entry ``stargz.index.json`` that the gzip ``member`` holds."""
    z = zlib.decompressobj(31)
    try:
        tar = z.decompress(member, TOC_MAX + 4096)  # the entry's header, padding and the tar's end
    except zlib.error as e:
        raise LayerError(f"eStargz TOC cannot be decompressed: {e}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            info = tf.next()
            if info is None or info.name != TOC_NAME or not info.isreg():
                raise LayerError(f"eStargz TOC is not a tar entry '{TOC_NAME}'")
            if info.size > TOC_MAX:
                raise LayerError(f"eStargz TOC is {info.size} bytes (at most {TOC_MAX})")
            f = tf.extractfile(info)
            raw = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, ValueError):
        raise LayerError(f"eStargz TOC is not a tar entry '{TOC_NAME}'") from None
    if len(raw) != info.size:
        raise LayerError("eStargz TOC is cut short")
    return raw


def with_ends(entries: list[dict[str, object]], data_end: int) -> list[dict[str, object]]:
    """The entries as :func:`layerstore.chunked.members` takes them: each regular file's ``endOffset`` set
    to where the first member after its last chunk's starts (or ``data_end``: its chunks and the tar headers
    after it lie between), the root's landmark files left out. Files packed in one member (the same
    ``offset``, each at its ``innerOffset``) get the same range. Offsets that are not numbers are left
    for :func:`layerstore.chunked.members` to refuse."""
    starts = sorted({o for e in entries if type(o := e.get("offset")) is int and e.get("type") in ("reg", "chunk")})
    starts.append(data_end)
    out: list[dict[str, object]] = []
    last: dict[str, object] | None = None  # the regular file the chunks that follow belong to
    for e in entries:
        kind = e.get("type")
        at = e.get("offset")
        if kind == "reg" and e.get("size") and type(at) is int:
            last = e
        elif kind != "chunk":
            last = None
        if last is not None and type(at) is int:  # (the file's first member, or one of its chunks)
            last["endOffset"] = starts[bisect.bisect_right(starts, at)] if at < data_end else data_end
        if e.get("name") not in _LANDMARKS:
            out.append(e)
    return out
