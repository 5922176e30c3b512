"""eStargz images for the tests, written here by the format's description (no tool on this machine writes
eStargz: skopeo and podman write zstd:chunked only): :func:`convert` does to an OCI layout's image what
``nerdctl image convert --estargz --oci`` does, following stargz-snapshotter's writer (``estargz.Writer``):

- every regular file's contents start a gzip member of their own, one member per ``chunk`` bytes
  (a ``chunk`` TOC entry for each after the first); the tar padding after a file and the headers of
  what follows go in the file's last member; with ``min_chunk`` (``--estargz-min-chunk-size``), a
  smaller file goes on in the open member, its ``offset`` that member's and its ``innerOffset`` where
  its bytes begin in what the member decompresses to;
- ``.no.prefetch.landmark`` (one byte, 0x0f) is the layer's first entry, as ``estargz.Build`` puts it
  when no file is prioritized;
- the TOC (JSON, tab-indented) is the tar entry ``stargz.index.json`` in a member of its own, followed
  by the tar's end and the 51-byte footer naming the TOC member's offset;
- the layer's descriptor carries ``containerd.io/snapshot/stargz/toc.digest`` (the JSON's sha256) and
  ``io.containers.estargz.uncompressed-size``; the config's diff_id is the whole uncompressed stream's.

The blob is an ordinary ``tar+gzip`` layer too (the tests check that ``gzip -t`` and GNU tar read it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

from layerstore.chunked_write import toc_entry

ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
LANDMARK = ".no.prefetch.landmark"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class _Writer:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.diff = hashlib.sha256()
        self.size = 0  # uncompressed
        self._z: Any = None
        self.member = self.inner = 0

    def write(self, data: bytes) -> None:
        if self._z is None:
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
            self.member, self.inner = self.out.tell(), 0  # where the open member starts; what it holds so far
        self.out.write(self._z.compress(data))
        self.diff.update(data)
        self.size += len(data)
        self.inner += len(data)

    def place(self) -> tuple[int, int]:
        """(offset, innerOffset) of the next byte written: the open member's, or a new one's."""
        return (self.member, self.inner) if self._z is not None else (self.out.tell(), 0)

    def close_member(self) -> None:
        if self._z is not None:
            self.out.write(self._z.flush())
            self._z = None


def _footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\0" * 4 + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def build(tar: bytes, chunk: int = 4 << 20, min_chunk: int = 0) -> tuple[bytes, str, str, int]:
    """(blob, the TOC JSON's sha256, the uncompressed stream's sha256, its size) of ``tar`` as eStargz.

    ``min_chunk`` (``--estargz-min-chunk-size``): a file smaller than that does not start a member but goes
    in the open one (after the tar headers and files before it), at its ``innerOffset`` there."""
    w = _Writer()
    entries: list[dict[str, Any]] = []
    landmark = tarfile.TarInfo(LANDMARK)
    landmark.size, landmark.mode = 1, 0o644
    members: list[tuple[tarfile.TarInfo, bytes]] = [(landmark, b"\x0f")]
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            members.append((ti, f.read() if f is not None else b""))
    for ti, data in members:
        w.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        e = toc_entry(ti)  # (eStargz and zstd:chunked TOCs are one schema)
        if not data:
            entries.append(e)
            continue
        e["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        for at in range(0, len(data), chunk):
            part: dict[str, Any] = e if at == 0 else {"name": ti.name, "type": "chunk"}
            if len(data) < min_chunk:
                part["offset"], inner = w.place()
                if inner:
                    part["innerOffset"] = inner
            else:
                w.close_member()
                part["offset"] = w.out.tell()
            if at:
                part["chunkOffset"] = at
            if len(data) - at >= chunk:
                part["chunkSize"] = chunk
            w.write(data[at : at + chunk])
            entries.append(part)
        w.write(b"\0" * (-len(data) % 512))
    w.close_member()
    toc_offset = w.out.tell()
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc)
    w.write(info.tobuf(tarfile.USTAR_FORMAT) + toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024)
    w.close_member()
    w.out.write(_footer(toc_offset))
    return w.out.getvalue(), "sha256:" + hashlib.sha256(toc).hexdigest(), "sha256:" + w.diff.hexdigest(), w.size


def _put(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def convert(layout: Path, tag: str, new_tag: str, chunk: int = 4 << 20, min_chunk: int = 0) -> list[str]:
    """Add ``new_tag`` to the OCI layout: image ``tag`` with every layer as eStargz; returns the TOC digests."""
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(ref) == tag)
    manifest = json.loads(_blob(layout, desc["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    layers, diff_ids, tocs = [], [], []
    for la in manifest["layers"]:
        raw = _blob(layout, la["digest"])
        tar = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        blob, toc, diff_id, size = build(tar, chunk, min_chunk)
        anns = {ANNOTATION: toc, "io.containers.estargz.uncompressed-size": str(size)}
        layers.append({"mediaType": GZIP_LAYER, **_put(layout, blob), "annotations": anns})
        diff_ids.append(diff_id)
        tocs.append(toc)
    config["rootfs"]["diff_ids"] = diff_ids
    manifest["config"] = {**manifest["config"], **_put(layout, json.dumps(config).encode())}
    manifest["layers"] = layers
    new = {**desc, **_put(layout, json.dumps(manifest).encode())}
    new["annotations"] = {**desc.get("annotations", {}), ref: new_tag}
    index["manifests"].append(new)
    (layout / "index.json").write_text(json.dumps(index))
    return tocs
