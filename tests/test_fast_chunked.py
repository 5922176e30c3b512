"""zstd:chunked tables of contents as untrusted input (fast tier: no root, no mount).

Layers are made here the way containers/storage lays them out (each file's contents
their own zstd frames, the TOC a frame of JSON after them), so that every field can be
made hostile; real ones, made by skopeo, are pulled in tests/test_chunked.py.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from layerstore import chunked, chunked_write
from layerstore.blobs import BlobStore
from layerstore.oci import SourceError
from layerstore.tarlayer import LayerError, clean_path

CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
POSITION = "io.github.containers.zstd-chunked.manifest-position"


def _layer(files: dict[str, bytes], extra: list[dict] | None = None) -> tuple[bytes, dict[str, str], list[dict]]:  # type: ignore[type-arg]
    """A blob, its descriptor's annotations and its TOC entries for these files (and ``extra`` entries)."""
    blob = bytearray()
    entries: list[dict] = [{"type": "dir", "name": "./", "mode": 0o755, "modtime": "2024-01-02T03:04:05Z"}]  # type: ignore[type-arg]
    for name, data in files.items():
        start = len(blob)
        blob += zstandard.ZstdCompressor().compress(data)
        entries.append({"type": "reg", "name": name, "mode": 0o644, "size": len(data), "uid": 1, "gid": 2,
                        "modtime": "2024-01-02T03:04:05.123456789+01:00",
                        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                        "offset": start, "endOffset": len(blob)})  # fmt: skip
    entries += extra or []
    return (*_with_toc(blob, entries), entries)


def _with_toc(blob: bytearray | bytes, entries: list[dict]) -> tuple[bytes, dict[str, str]]:  # type: ignore[type-arg]
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    toc = zstandard.ZstdCompressor().compress(raw)
    pos = len(blob)
    annotations = {CHECKSUM: "sha256:" + hashlib.sha256(toc).hexdigest(), POSITION: f"{pos}:{len(toc)}:{len(raw)}:1"}
    return bytes(blob) + toc, annotations


def _read(blob: bytes, annotations: dict[str, str]) -> list[chunked.Member]:
    pos = chunked.position(annotations, len(blob))
    assert pos is not None
    return list(chunked.members(chunked.read_toc(pos, blob[pos.offset : pos.offset + pos.length]), pos.offset))


def test_a_toc_gives_every_member_with_its_metadata() -> None:
    blob, ann, _ = _layer({"etc/a": b"alpha\n", "bin/b": b"b" * 100_000})
    members = _read(blob, ann)
    assert [m.path for m in members] == [b"", b"etc/a", b"bin/b"]
    root, a, b = members
    assert stat.S_ISDIR(root.entry.mode) and root.file is None
    assert a.entry.mode == stat.S_IFREG | 0o644 and (a.entry.uid, a.entry.gid, a.entry.size) == (1, 2, 6)
    assert a.entry.mtime_ns == (1704164645 - 3600) * 10**9 + 123456789  # to the nanosecond, in UTC
    assert a.file is not None and blob[a.file.start : a.file.end]
    assert chunked.position({}, 10) is None  # not chunked: a plain layer


def test_files_are_checked_against_their_sha256(tmp_path: Path) -> None:
    blob, ann, _ = _layer({"a": b"alpha\n" * 1000})
    (f,) = [m.file for m in _read(blob, ann) if m.file is not None]
    store = BlobStore(str(tmp_path))
    digest, new = chunked.store_file(f, io.BytesIO(blob[f.start : f.end]), store)
    assert new and store.exists(digest)
    other = zstandard.ZstdCompressor().compress(b"omega\n" * 1000)  # frames of other bytes in the file's place
    forged = chunked.File(f.path, f.digest, f.size, 0, len(other))
    with pytest.raises(LayerError, match="does not match its sha256"):
        chunked.store_file(forged, io.BytesIO(other), store)
    short = zstandard.ZstdCompressor().compress(b"alpha\n")
    with pytest.raises(LayerError, match="shorter"):
        chunked.store_file(chunked.File(f.path, f.digest, f.size, 0, len(short)), io.BytesIO(short), store)
    with pytest.raises(LayerError, match="decompress"):
        chunked.store_file(chunked.File(f.path, f.digest, f.size, 0, 9), io.BytesIO(b"not zstd!"), store)
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == [digest.hex()]  # nothing else kept


def _entry(**kw: object) -> dict:  # type: ignore[type-arg]
    return {"type": "reg", "name": "f", "mode": 0o644, "modtime": "2024-01-02T03:04:05Z", **kw}


def test_a_mode_with_its_type_bits_is_taken_as_tar_takes_it() -> None:
    """Go's tar headers may carry the file type's bits in ``mode`` (``c_ISREG``); a tar import ignores them."""
    blob, ann, _ = _layer({}, [_entry(mode=0o104755)])
    assert [m.entry.mode for m in _read(blob, ann) if m.path == b"f"] == [stat.S_IFREG | 0o4755]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (_entry(name="../../etc/passwd"), "climbs out"),
        (_entry(type="socket"), "unknown type"),
        (_entry(uid=2**32), "uid out of range"),
        (_entry(mode=0o200000), "mode out of range"),
        (_entry(modtime="yesterday"), "malformed time"),
        (_entry(size=5, digest="sha256:" + "0" * 64, offset=0, endOffset=10**9), "outside the layer's data"),
        (_entry(size=5, digest="sha256:" + "0" * 64, offset=5, endOffset=5), "outside the layer's data"),
        (_entry(size=5, digest="md5:0", offset=0, endOffset=4), "no sha256"),
        (_entry(size=1, digest="sha256:" + "0" * 64, offset=0, endOffset=5000), "longer than"),
        (_entry(type="symlink", linkName=""), "no target"),
        (_entry(name="x/.wh."), "whiteout of no name"),
        (_entry(xattrs={"user.a": "not base64!"}), "not base64"),
        (_entry(name="n" * 300), "longer than 255"),
        (_entry(name="a/../../b"), "climbs out"),
        (_entry(uid=True), "uid out of range"),
        (_entry(modtime="2024-13-02T03:04:05Z"), "time out of range"),  # (times are parsed once per text, cached)
        (_entry(modtime="2024-13-02T03:04:05Z", name="g"), "'g' has a time out of range"),
    ],
)
def test_hostile_toc_entries_are_refused(extra: dict, needle: str) -> None:  # type: ignore[type-arg]
    blob, ann, _ = _layer({"a": b"alpha\n" * 1000, "r": os.urandom(20_000)}, [extra])
    with pytest.raises(LayerError, match=needle):
        _read(blob, ann)


def test_clean_path_agrees_with_the_rule_on_every_spelling() -> None:
    """Its shortcut for names with nothing to clean gives what splitting does, and refuses every '..'."""
    parts = ["", ".", "..", "a", ".a", "a.", "..a", "a..b"]
    for combo in itertools.product(parts, repeat=3):
        for name in ("/".join(combo), "/" + "/".join(combo), "/".join(combo) + "/"):
            kept = [p for p in name.split("/") if p not in ("", ".")]
            if ".." in kept:
                with pytest.raises(LayerError, match="climbs out"):
                    clean_path(name)
            else:
                assert clean_path(name) == "/".join(kept).encode(), name


def test_hostile_tocs_are_refused() -> None:
    blob, ann, entries = _layer({"a": b"alpha\n"})
    bad = {**ann, CHECKSUM: "sha256:" + "1" * 64}
    with pytest.raises(LayerError, match="does not match its checksum"):
        _read(blob, bad)
    offset, length, raw, _ = ann[POSITION].split(":")
    for position, needle in [
        (f"{len(blob)}:{length}:{raw}:1", "beyond the end"),
        (f"{offset}:{length}:{raw}:2", "unknown type"),
        (f"{offset}:{length}:{raw}", "malformed"),
        (f"{offset}:{length}:{10**12}:1", "at most"),
        (f"{offset}:-1:{raw}:1", "malformed"),
    ]:
        with pytest.raises(LayerError, match=needle):
            chunked.position({**ann, POSITION: position}, len(blob))
    # TOCs whose JSON is not a TOC, checksums and all right
    for doc in [b"[]", b'{"version": 2, "entries": []}', b'{"version": 1, "entries": [1]}', b"\xff"]:
        toc = zstandard.ZstdCompressor().compress(doc)
        a = {CHECKSUM: "sha256:" + hashlib.sha256(toc).hexdigest(), POSITION: f"0:{len(toc)}:{len(doc)}:1"}
        with pytest.raises(LayerError, match="TOC"):
            _read(toc, a)
    # a TOC that inflates beyond what its position says
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    toc = zstandard.ZstdCompressor().compress(doc)
    a = {CHECKSUM: "sha256:" + hashlib.sha256(toc).hexdigest(), POSITION: f"0:{len(toc)}:{len(doc) - 1}:1"}
    with pytest.raises(LayerError, match="not the"):
        _read(toc, a)


def test_overlapping_files_are_refused_when_the_toc_is_read() -> None:
    """Before anything is fetched (a lazy pull fetches later): two contents in one range are refused; one
    content named twice (a copy) is one file to fetch."""
    a = b"alpha\n" * 1000
    sha = "sha256:" + hashlib.sha256(a).hexdigest()
    copy = _entry(name="copy", size=len(a), digest=sha, offset=0, endOffset=10)
    blob, ann, _ = _layer({"a": a, "r": os.urandom(5000)}, [copy])
    assert [f.path for f in chunked.contents(_read(blob, ann))] == [b"a", b"r"]
    forged = _entry(name="c", size=6000, digest="sha256:" + "1" * 64, offset=0, endOffset=10)
    blob, ann, _ = _layer({"a": a, "r": os.urandom(5000)}, [forged])
    with pytest.raises(LayerError, match="overlaps"):
        chunked.contents(_read(blob, ann))


def test_ranges_are_merged_and_overlaps_refused() -> None:
    def f(start: int, end: int) -> chunked.File:
        return chunked.File(b"p%d" % start, "sha256:" + "0" * 64, 1, start, end)

    plan = chunked.plan([f(300, 400), f(0, 100), f(100, 200), f(5000, 6000)], gap=1000, most=10_000)
    assert [(s, e, [x.start for x in g]) for s, e, g in plan] == [(0, 400, [0, 100, 300]), (5000, 6000, [5000])]
    assert len(chunked.plan([f(0, 100), f(100, 200)], gap=1000, most=150)) == 2  # too long to merge
    with pytest.raises(LayerError, match="overlaps"):
        chunked.plan([f(0, 100), f(50, 150)], gap=0, most=10_000)


def test_a_written_chunked_layer_is_the_tar_and_reads_file_by_file(tmp_path: Path) -> None:
    """``push --compression zstd:chunked``'s writer: every zstd decoder reads the tar back byte for byte (the
    TOC and footer are skippable frames); the TOC the annotations name gives each file, read from its range."""
    files = {"etc/a": b"alpha\n", "bin/big": os.urandom(300_000), "empty": b"", "z/zeros": bytes(100_000)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), 0o4755, 7, 8, 1_700_000_000
            ti.pax_headers = {"mtime": "1700000000.25", "SCHILY.xattr.user.k": "v"}
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("etc/l")
        link.type, link.linkname = tarfile.LNKTYPE, "etc/a"
        tf.addfile(link)
    tar = raw.getvalue()
    out = io.BytesIO()
    annotations = chunked_write.write(io.BytesIO(tar), out)
    blob = out.getvalue()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True) as r:
        assert r.read() == tar
    assert annotations[CHECKSUM] == annotations["io.containers.zstd-chunked.manifest-checksum"]
    members = {m.path: m for m in _read(blob, annotations)}
    assert members[b"bin/big"].entry.mtime_ns == 1_700_000_000_250_000_000
    assert members[b"bin/big"].entry.xattrs == {b"user.k": b"v"} and members[b"etc/l"].entry.link == b"etc/a"
    store = BlobStore(str(tmp_path / "blobs"))
    for f in chunked.contents(list(members.values())):
        digest, _ = chunked.store_file(f, io.BytesIO(blob[f.start : f.end]), store)
        assert Path(store.path(digest)).read_bytes() == files[f.path.decode()]
    # the footer names the TOC as the annotation does (readers without annotations use it)
    offset, length = (int(x) for x in annotations[POSITION].split(":")[:2])
    assert blob[-40:-8] == struct.pack("<4Q", offset, length, int(annotations[POSITION].split(":")[2]), 1)


class _Cut(io.RawIOBase):
    """A part whose connection breaks after ``data``: the client's streams raise SourceError then."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.data:
            raise SourceError("the download broke off")
        n = min(len(b), len(self.data))
        b[:n], self.data = self.data[:n], self.data[n:]
        return n


@pytest.mark.parametrize("how", ["all", "some", "broken", "refused"])
def test_ranges_asked_several_to_a_request(how: str, tmp_path: Path) -> None:
    """``fetch_files`` with a source that sends several ranges in one answer: every file is stored, checked,
    once, whatever the source does with the request (sends all parts, leaves some out, breaks off
    inside one, refuses); the ranges it did not send come one by one."""
    from layerstore import chunked_pull
    from layerstore.regclient import PartsRefused

    files = {f"f{i}": os.urandom(50_000) for i in range(40)}  # random: 50 KB frames, more than GAP apart
    blob, annotations, _ = _layer(files)
    wanted = [f for f in chunked.contents(_read(blob, annotations)) if int(f.path[1:]) % 3 == 0]
    singles: list[tuple[int, int]] = []

    def opener(start: int, end: int) -> io.BytesIO:
        singles.append((start, end))
        return io.BytesIO(blob[start:end])

    def parts(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, io.BytesIO]]:
        if how == "refused":  # (as the client does: at the call, before any part)
            raise PartsRefused("one part at a time")
        return sent(ranges)

    def sent(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, io.BytesIO]]:
        for i, (start, end) in enumerate(ranges):
            if how == "some" and i % 2:
                continue
            if how == "broken" and i == 1:
                yield start, _Cut(blob[start : start + 10])  # type: ignore[misc]  # a connection cut inside a part
            yield start, io.BytesIO(blob[start:end])

    store = BlobStore(str(tmp_path / "blobs"))
    got = list(chunked_pull.fetch_files(opener, wanted, store, parallel=3, parts=parts))  # type: ignore[arg-type]
    assert sorted(f.path for f, _, _, _ in got) == sorted(f.path for f in wanted)  # each once
    for f, digest, _, _ in got:
        assert Path(store.path(digest)).read_bytes() == files[f.path.decode()]
    assert (len(singles) == 0) == (how == "all"), singles
    if how == "refused":
        assert len(singles) == len(wanted)


def test_long_ranges_are_asked_for_alone(tmp_path: Path) -> None:
    """Where the source sends parts, only ranges shorter than ALONE are batched: a long range (its bytes, not
    its round trip, are its time) has a request of its own, so a full pull's requests stay evenly loaded."""
    from layerstore import chunked_pull

    small = {f"s{i}": os.urandom(20_000) for i in range(12)}
    big = {f"b{i}": os.urandom(chunked_pull.ALONE + 1000) for i in range(3)}
    blob, annotations, _ = _layer({**small, **big})
    members = list(chunked.contents(_read(blob, annotations)))
    wanted = [f for f in members if f.path.startswith(b"b") or int(f.path[1:]) % 2 == 0]
    singles: list[tuple[int, int]] = []
    batched: list[list[tuple[int, int]]] = []

    def opener(start: int, end: int) -> io.BytesIO:
        singles.append((start, end))
        return io.BytesIO(blob[start:end])

    def parts(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, io.BytesIO]]:
        batched.append(ranges)
        return ((s, io.BytesIO(blob[s:e])) for s, e in ranges)

    store = BlobStore(str(tmp_path / "blobs"))
    got = list(chunked_pull.fetch_files(opener, wanted, store, parallel=2, parts=parts))  # type: ignore[arg-type]
    assert sorted(f.path for f, _, _, _ in got) == sorted(f.path for f in wanted)
    assert singles and all(e - s >= chunked_pull.ALONE for s, e in singles), singles  # long ranges alone
    for f in wanted:
        if f.path.startswith(b"b"):
            assert any(s <= f.start and f.end <= e for s, e in singles), f.path
    assert len(batched) == 2 and all(e - s < chunked_pull.ALONE for r in batched for s, e in r), batched
    assert sum(len(r) for r in batched) == 6  # the six short files, far apart: six ranges, in two requests
