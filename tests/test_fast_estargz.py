"""eStargz tables of contents and file ranges as untrusted input (fast tier: no root, no mount).

Blobs are written by :mod:`tests.estargz` (stargz-snapshotter's layout) from tars made here;
images of them are pulled from a real registry in tests/test_chunked.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from layerstore import chunked, estargz
from layerstore.blobs import BlobStore
from layerstore.tarlayer import LayerError

from . import estargz as writer

FILES = {"etc/a": b"alpha\n", "bin/big": bytes(range(256)) * 1000, "empty": b""}


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("etc", "bin"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), 0o4755, 7, 8, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("etc/l")
        link.type, link.linkname = tarfile.SYMTYPE, "a"
        tf.addfile(link)
    return out.getvalue()


def _read(blob: bytes, digest: str) -> tuple[list[chunked.Member], int]:
    entries, data_end, _ = estargz.read_toc(lambda s, e: blob[s:e], len(blob), digest)
    return list(chunked.members(entries, data_end, gzip=True)), data_end


def test_an_estargz_toc_gives_every_member_and_its_files_read(tmp_path: Path) -> None:
    tar = _tar(FILES)
    blob, toc, diff_id, _ = writer.build(tar, chunk=100_000)  # bin/big: three chunks, three members
    assert gzip.decompress(blob).startswith(b".no.prefetch.landmark")  # an ordinary gzip tar too
    members, data_end = _read(blob, toc)
    by_path = {m.path: m for m in members}
    assert sorted(by_path) == [b"bin", b"bin/big", b"empty", b"etc", b"etc/a", b"etc/l"]  # the landmark left out
    big = by_path[b"bin/big"].entry
    assert stat.S_IMODE(big.mode) == 0o4755 and (big.uid, big.gid, big.size) == (7, 8, 256_000)
    assert big.mtime_ns == 1_700_000_000 * 10**9
    assert by_path[b"etc/l"].entry.target == b"a" and by_path[b"empty"].file is None
    store = BlobStore(str(tmp_path / "blobs"))
    files = chunked.contents(members)
    assert files[-1].end == data_end and all(f.gzip for f in files)
    for f in files:
        digest, _ = chunked.store_file(f, io.BytesIO(blob[f.start : f.end]), store)
        assert Path(store.path(digest)).read_bytes() == FILES[f.path.decode()]
    # a range that stops inside the file's members: short, refused
    f = next(f for f in files if f.path == b"bin/big")
    short = chunked.File(f.path, f.digest, f.size, f.start, f.start + 2000, True)
    with pytest.raises(LayerError, match="shorter"):
        chunked.store_file(short, io.BytesIO(blob[f.start :]), store)


def test_files_packed_in_one_member_are_read_at_their_inner_offsets(tmp_path: Path) -> None:
    """``--estargz-min-chunk-size``: small files go on in the open member (one after a chunked file, in its
    last chunk's member), each at its ``innerOffset``: every file reads right fetched with its neighbours
    (the member's bytes read once) and alone (a lazy read), and packed files stay one range."""
    from layerstore import chunked_pull

    files = {"etc/a": b"alpha\n", "bin/big": bytes(range(256)) * 1000, "etc/b": b"beta" * 10,
             "etc/c": b"gamma" * 50, "empty": b"", "etc/d": bytes(5000), "etc/e": b"e"}  # fmt: skip
    blob, toc, _, _ = writer.build(_tar(files), chunk=100_000, min_chunk=4096)
    assert gzip.decompress(blob).startswith(b".no.prefetch.landmark")  # still an ordinary gzip tar
    members, _ = _read(blob, toc)
    got = {f.path.decode(): f for f in chunked.contents(members)}
    big, b, c = got["bin/big"], got["etc/b"], got["etc/c"]
    assert b.inner and c.inner > b.inner and b.start == c.start > big.start and b.end == c.end == big.end
    assert got["etc/e"].start == got["etc/d"].start and got["etc/e"].inner  # (after a file of a member's own)
    groups = [[f.path for f in g] for _, _, g in chunked.plan(list(got.values()), -1, 1 << 20)]  # (no neighbours)
    assert groups == [[b"etc/a"], [b"bin/big", b"etc/b", b"etc/c"], [b"etc/d", b"etc/e"]]  # packed: one range
    singles: list[tuple[int, int]] = []

    def opener(start: int, end: int) -> io.BytesIO:
        singles.append((start, end))
        return io.BytesIO(blob[start:end])

    together = BlobStore(str(tmp_path / "together"))
    stored = list(chunked_pull.fetch_files(opener, list(got.values()), together, parallel=1))
    assert sorted(f.path.decode() for f, _, _, _ in stored) == sorted(p for p in files if files[p])
    for f, digest, _, _ in stored:
        assert Path(together.path(digest)).read_bytes() == files[f.path.decode()], f.path
    assert sum(n for _, _, _, n in stored) == sum(e - s for s, e in singles) <= len(blob)  # each byte once
    alone = BlobStore(str(tmp_path / "alone"))
    for f in got.values():
        digest, _ = chunked.store_file(f, io.BytesIO(blob[f.start : f.end]), alone)
        assert Path(alone.path(digest)).read_bytes() == files[f.path.decode()], f.path


def test_file_bytes_that_do_not_match_are_refused(tmp_path: Path) -> None:
    blob, toc, _, _ = writer.build(_tar(FILES))
    members, _ = _read(blob, toc)
    f = next(m.file for m in members if m.file is not None and m.path == b"bin/big")
    store = BlobStore(str(tmp_path / "blobs"))
    # another file's bytes in its place (gzip and its CRC are sound: the sha256 is what tells)
    other = gzip.compress(b"x" * f.size)
    with pytest.raises(LayerError, match="does not match its sha256"):
        chunked.store_file(chunked.File(f.path, f.digest, f.size, 0, len(other), True), io.BytesIO(other), store)
    # not gzip at all
    with pytest.raises(LayerError, match="cannot be decompressed"):
        chunked.store_file(chunked.File(f.path, f.digest, f.size, 0, 100, True), io.BytesIO(b"\0" * 100), store)
    assert not [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]


def _damaged(fix: Callable[[bytearray, int], None]) -> tuple[bytes, str]:
    blob, toc, _, _ = writer.build(_tar(FILES))
    b = bytearray(blob)
    fix(b, int(blob[-35:-19], 16))
    return bytes(b), toc


@pytest.mark.parametrize(
    ("fix", "needle"),
    [
        (lambda b, off: b.__setitem__(slice(-19, -13), b"STARGY"), "without its footer"),
        (lambda b, off: b.__setitem__(slice(-35, -19), b"%016x" % (len(b) - 10)), "beyond the end"),
        (lambda b, off: b.__setitem__(slice(-35, -19), b"%016x" % (off - 7)), "cannot be decompressed"),
        (lambda b, off: b.__setitem__(slice(-35, -19), b"%016X" % off), "without its footer"),
    ],
)
def test_hostile_footers_are_refused(fix: Callable[[bytearray, int], None], needle: str) -> None:
    blob, toc = _damaged(fix)
    with pytest.raises(LayerError, match=needle):
        _read(blob, toc)


def _relaid(entries_fix: Callable[[list[dict]], None]) -> tuple[bytes, str]:  # type: ignore[type-arg]
    """A layer whose TOC was changed by ``entries_fix`` and written again, with its digest (an annotation
    that vouches for the hostile TOC: what the checks after the digest's must catch)."""
    blob, toc, _, _ = writer.build(_tar(FILES))
    off = int(blob[-35:-19], 16)
    raw = gzip.decompress(blob[off:-51])
    info = tarfile.open(fileobj=io.BytesIO(raw)).next()
    assert info is not None
    doc = json.loads(raw[512 : 512 + info.size])
    entries_fix(doc["entries"])
    new = json.dumps(doc).encode()
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(new)
    member = gzip.compress(ti.tobuf() + new + b"\0" * (-len(new) % 512 + 1024))
    return blob[:off] + member + blob[-51:], "sha256:" + hashlib.sha256(new).hexdigest()


def _reg(entries: list[dict], name: str) -> dict:  # type: ignore[type-arg]
    return next(e for e in entries if e.get("name") == name and e["type"] == "reg")


@pytest.mark.parametrize(
    ("fix", "needle"),
    [
        (lambda es: _reg(es, "bin/big").update(innerOffset=-1), "innerOffset"),
        (lambda es: _reg(es, "bin/big").update(innerOffset="10"), "innerOffset"),
        (lambda es: _reg(es, "bin/big").update(offset=10**9), "outside the layer's data"),
        (lambda es: _reg(es, "etc/a").update(offset="x"), "outside the layer's data"),
        (lambda es: _reg(es, "bin/big").pop("digest"), "no sha256 digest"),
        (lambda es: _reg(es, "bin/big").update(name="../../etc/passwd"), "climb|outside|\\.\\."),
        (lambda es: es.insert(es.index(_reg(es, "bin/big")) + 1,
                              {**_reg(es, "bin/big"), "name": "bin/twin", "digest": "sha256:" + "1" * 64}),
         "overlaps"),  # two files at one place in one member
    ],
)  # fmt: skip
def test_hostile_estargz_tocs_are_refused(fix: Callable[[list[dict]], None], needle: str) -> None:  # type: ignore[type-arg]
    blob, toc = _relaid(fix)
    with pytest.raises(LayerError, match=needle):
        members, _ = _read(blob, toc)
        chunked.contents(members)


def test_a_toc_that_does_not_match_its_digest_is_refused() -> None:
    blob, toc, _, _ = writer.build(_tar(FILES))
    with pytest.raises(LayerError, match="does not match its digest"):
        _read(blob, "sha256:" + "0" * 64)
    relaid, _ = _relaid(lambda es: _reg(es, "etc/a").update(uid=0))
    with pytest.raises(LayerError, match="does not match its digest"):
        _read(relaid, toc)  # a TOC changed under the annotation of the sound one
    with pytest.raises(LayerError, match="malformed TOC digest"):
        estargz.toc_digest({estargz.ANNOTATION: "sha256:XYZ"})
    assert estargz.toc_digest({}) is None


def test_gnu_tar_reads_the_blob_the_tests_write(tmp_path: Path) -> None:
    """The test writer's blobs are what eStargz promises: an ordinary tar+gzip layer, to GNU tar too."""
    blob, _, diff_id, size = writer.build(_tar(FILES))
    (tmp_path / "l.tgz").write_bytes(blob)
    listed = subprocess.run(["tar", "-tzf", tmp_path / "l.tgz"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [".no.prefetch.landmark", "etc/", "bin/", *FILES, "etc/l", "stargz.index.json"]
    raw = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id and len(raw) == size
