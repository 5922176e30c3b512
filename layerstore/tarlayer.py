"""A layer tar, read as untrusted input: entries and blobs, never files on the host.

Nothing in a layer is ever created on the host filesystem: file contents go to
the blob store under their digest, everything else becomes an
:class:`~layerstore.entry.Entry`. So a hostile tar cannot write outside the
store whatever its paths say; what remains is to reject what makes no sense,
each with a one-line :class:`LayerError`:

* ``..`` components (rejected) and absolute paths (made relative, as Docker does);
* hard links to a path that exists in neither this layer nor the ones below;
* an entry below a non-directory of the same layer (a path through a symlink);
* a truncated archive. Archives without the end-of-archive blocks are fine.

Tars as real tools write them are accepted: members of one directory need not
be contiguous, parents may be missing, ``.wh..wh..opq`` may follow its
directory, PAX headers carry xattrs (``SCHILY.xattr.*``), names may be long.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .blobs import BlobStore
from .entry import Entry
from .schema import KIND_OPAQUE, KIND_WHITEOUT

WH = b".wh."
OPQ = b".wh..wh..opq"
_XATTR = "SCHILY.xattr."


class LayerError(Exception):
    """A layer tar that cannot be imported (message is one line)."""


#: the longest path the store indexes: an ``entries`` key is diff_id + NUL + path, and lmdb keys are at most 511 bytes
MAX_PATH = 511 - len(b"sha256:") - 64 - 1
NAME_MAX = 255  # bytes in one name, as every Linux file system has it (Docker refuses longer ones too)
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"
_NS = 10**9
_MTIME_MAX = (2**63 - 1) // _NS  # seconds that fit an int64 of nanoseconds (the year 2262)


def mtime_ns(m: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exactly: from the PAX ``mtime`` text where there is one (tarfile reads it
    through a float, which keeps only microseconds), else from the header's seconds. Out of range: LayerError."""
    text = m.pax_headers.get("mtime")
    if text is not None:
        neg = text.startswith("-")
        whole, _, frac = text.lstrip("+-").partition(".")
        if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > 12:
            raise LayerError(f"layer entry '{m.name}' has an mtime out of range ('{text[:40]}')")
        ns = int(whole) * _NS + int((frac + "0" * 9)[:9])
        return -ns if neg else ns
    if not -_MTIME_MAX <= m.mtime <= _MTIME_MAX:
        raise LayerError(f"layer entry '{m.name}' has an mtime out of range ({m.mtime})")
    return int(m.mtime) * _NS if float(m.mtime).is_integer() else round(m.mtime * _NS)


def check_entry(name: str, path: bytes, uid: int, gid: int) -> None:
    """What no file system (or no store key) can hold: a refusal, one line (``name`` as the layer spells it)."""
    if len(path) > MAX_PATH:
        raise LayerError(f"layer entry '{name[:60]}...' has a path of {len(path)} bytes (the store takes {MAX_PATH})")
    if len(path) > NAME_MAX and max(map(len, path.split(b"/"))) > NAME_MAX:
        raise LayerError(f"layer entry '{name[:60]}...' has a name longer than {NAME_MAX} bytes")
    if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
        raise LayerError(f"layer entry '{name}' has an owner out of range ({uid}:{gid})")


def _check(m: tarfile.TarInfo, path: bytes) -> None:
    check_entry(m.name, path, m.uid, m.gid)


def marker(name: str, path: bytes) -> tuple[bytes, Entry] | None:
    """The whiteout or opaque mark ``path`` stands for (its target, and the mark), or None for a plain entry."""
    parent, _, base = path.rpartition(b"/")
    if base == OPQ:
        return parent, Entry(stat.S_IFDIR, kind=KIND_OPAQUE)
    if base.startswith(WH):
        if base[len(WH) :] in (b"", b".", b".."):  # would whiteout the root or a parent: no image has that
            raise LayerError(f"layer entry '{name}' is a whiteout of no name")
        return (parent + b"/" if parent else b"") + base[len(WH) :], Entry(0, kind=KIND_WHITEOUT)
    return None


def clean_path(name: str) -> bytes:
    """Normalise a member name to a layer-relative path; rejects ``..``."""
    raw = name.encode("utf-8", "surrogateescape")
    if b"//" not in raw and b"/." not in raw and not raw.startswith((b"/", b".")) and not raw.endswith(b"/"):
        return raw  # no empty, "." or ".." part: already clean (most names)
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise LayerError(f"layer entry '{name}' climbs out of the layer with '..'")
    return b"/".join(parts)


def _mode(m: tarfile.TarInfo) -> int:
    perm = m.mode & 0o7777
    if m.isdir():
        return stat.S_IFDIR | perm
    if m.issym():
        return stat.S_IFLNK | 0o777
    if m.ischr():
        return stat.S_IFCHR | perm
    if m.isblk():
        return stat.S_IFBLK | perm
    if m.isfifo():
        return stat.S_IFIFO | perm
    return stat.S_IFREG | perm


def _xattrs(m: tarfile.TarInfo) -> dict[bytes, bytes] | None:
    out = {}
    for k, v in m.pax_headers.items():
        if k.startswith(_XATTR):
            out[k[len(_XATTR) :].encode("utf-8", "surrogateescape")] = v.encode("utf-8", "surrogateescape")
    return out or None


def read_layer(
    stream: BinaryIO,
    blobs: BlobStore,
    exists_below: Callable[[bytes], bool],
    on_new_blob: Callable[[bytes], None],
    on_file: Callable[[bytes, bytes], None] | None = None,
) -> Iterator[tuple[bytes, Entry]]:
    """Yield (path, entry) for every member of a layer tar, storing file data as blobs.

    ``exists_below(path)`` tells whether a lower layer has ``path`` (for hard
    links into lower layers); ``on_new_blob`` is told each blob this call stored
    first, so a failed import can take them back; ``on_file(sha256, blob)`` each
    regular file's sha256 and blob.
    """
    seen: dict[bytes, Entry] = {}
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
        for m in tar:
            path = clean_path(m.name)
            if not path:
                if m.isdir():  # the root itself: keep its metadata
                    _check(m, path)
                    e = Entry(_mode(m), m.uid, m.gid, mtime_ns(m), xattrs=_xattrs(m))
                    seen[b""] = e
                    yield b"", e
                continue
            _check(m, path)
            mark = marker(m.name, path)
            if mark is not None:
                yield mark
                continue
            parent = path.rpartition(b"/")[0]
            pe = seen.get(parent)
            if pe is not None and not pe.is_dir:  # (whiteouts below one are harmless: tools write them)
                raise LayerError(f"layer entry '{m.name}' lies below a non-directory of the same layer")
            mtime = mtime_ns(m)
            if m.islnk():
                target = clean_path(m.linkname)
                if target not in seen and not exists_below(target):
                    raise LayerError(f"hard link '{m.name}' points to '{m.linkname}', which the image does not have")
                e = Entry(stat.S_IFREG, link=target)
            elif m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                digest, new, sha = blobs.ingest(f, m.size)  # type: ignore[arg-type]
                if new:
                    on_new_blob(digest)
                if on_file is not None:
                    on_file(sha, digest)
                e = Entry(_mode(m), m.uid, m.gid, mtime, m.size, blob=digest, xattrs=_xattrs(m))
            else:
                rdev = os.makedev(m.devmajor, m.devminor) if (m.ischr() or m.isblk()) else 0
                target_b = m.linkname.encode("utf-8", "surrogateescape") if m.issym() else None
                size = len(target_b) if target_b is not None else 0
                e = Entry(_mode(m), m.uid, m.gid, mtime, size, rdev, target_b, _xattrs(m))
            seen[path] = e
            yield path, e
    except tarfile.ReadError as err:
        raise LayerError(f"layer tar is damaged or truncated: {err}") from None
    except EOFError as err:
        raise LayerError(str(err)) from None
