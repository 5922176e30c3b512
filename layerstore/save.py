"""Writing an image out: ``oci:DIR[:REF]`` (an OCI image layout) and ``docker-archive:FILE[:NAME:TAG]``.

Each layer's tar is written again from the store's record of it (the entries,
with whiteouts and opaque markers in the OCI form, hard links as links, file
data from the blobs), uncompressed. Its digest is computed as it is written, and
the image's config gets these digests as its ``rootfs.diff_ids``; the layers'
contents are exactly the imported ones, but their tar bytes (and so the image
id) may differ from the original archive's. What ``skopeo``, ``umoci`` and
``podman load`` read back is the same tree.

Guarantees: an OCI layout is written blobs first, ``index.json`` last (through a
rename), so a reader never sees a manifest whose blobs are missing; other images
already in the layout are kept. A docker archive is written to ``FILE.part``
and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from . import tarwrite
from .entry import Entry
from .schema import KIND_OPAQUE, KIND_WHITEOUT
from .store import Store, StoreError

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass(slots=True, frozen=True)
class _Blob:
    digest: str
    size: int
    path: str  # a temporary file holding it


class _HashWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_layer_tar(store: Store, diff_id: bytes, out: BinaryIO) -> None:
    """The layer ``diff_id`` as an OCI layer tar."""
    links: list[tuple[bytes, Entry]] = []
    files: set[bytes] = set()  # non-directories of this layer
    with store.env.begin() as txn, tarwrite.writer(out) as tar:  # type: ignore[arg-type]
        for path, e in store.layer_entries(txn, diff_id):
            if e.kind == KIND_WHITEOUT:
                if not _below(path, files):  # one below a file of the same layer means nothing; tools choke on it
                    tar.addfile(tarwrite.whiteout(path))
                continue
            if e.mode and not stat.S_ISDIR(e.mode):
                files.add(path)
            if e.link is not None:
                links.append((path, e))  # after their targets, which may sort later
                continue
            if e.mode:
                t = tarwrite.info(path, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.rdev, e.target, e.xattrs)
                if t.type == tarfile.REGTYPE and e.size:
                    assert e.blob is not None
                    with os.fdopen(_blob_fd(store, e.blob), "rb") as f:
                        tar.addfile(t, f)
                else:
                    t.size = 0
                    tar.addfile(t)
            if e.kind == KIND_OPAQUE:
                tar.addfile(tarwrite.opaque(path))
        for path, e in links:
            assert e.link is not None
            tar.addfile(tarwrite.hardlink(path, e.link, e.mtime_ns))


def _below(path: bytes, files: set[bytes]) -> bool:
    while b"/" in path:
        path = path.rpartition(b"/")[0]
        if path in files:
            return True
    return False


def _blob_fd(store: Store, digest: bytes) -> int:
    h = digest.hex()
    return os.open(f"{h[:2]}/{h}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store.blob_fd)


@contextmanager
def _image_blobs(store: Store, image_id: bytes, tmpdir: str) -> Iterator[tuple[_Blob, list[_Blob]]]:
    """(config blob, layer blobs) of an image, as temporary files."""
    cfg = store.config(image_id)
    layers = []
    for d in cfg["layers"]:
        fd, path = tempfile.mkstemp(dir=tmpdir)
        with os.fdopen(fd, "wb") as f:
            w = _HashWriter(f)
            write_layer_tar(store, d.encode(), w)  # type: ignore[arg-type]
        layers.append(_Blob("sha256:" + w.h.hexdigest(), w.n, path))
    config = dict(cfg["config"])
    config["rootfs"] = {"type": "layers", "diff_ids": [b.digest for b in layers]}
    raw = json.dumps(config, separators=(",", ":")).encode()
    fd, path = tempfile.mkstemp(dir=tmpdir)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    yield _Blob("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), path), layers


def save(store: Store, name: str, dest: str) -> str:
    """Write image ``name`` to ``dest`` (``oci:DIR[:REF]`` or ``docker-archive:FILE[:NAME:TAG]``)."""
    image_id = store.resolve(name)
    full = next((i.name for i in store.images() if i.image_id == image_id.decode() and i.name == name), None)
    full = full or next((i.name for i in store.images() if i.image_id == image_id.decode()), name)
    transport, _, rest = dest.partition(":")
    if not rest:
        raise StoreError(f"'{dest}' is not oci:DIR[:REF] or docker-archive:FILE[:NAME:TAG]")
    if transport == "oci":
        path, _, ref = rest.partition(":")
        return _save_oci(store, image_id, path, ref or full.rsplit(":", 1)[1])
    if transport == "docker-archive":
        path, _, ref = rest.partition(":")
        return _save_docker(store, image_id, path, ref or full)
    raise StoreError(f"unknown transport '{transport}' (use oci: or docker-archive:)")


def _save_oci(store: Store, image_id: bytes, root: str, ref: str) -> str:
    blobs_dir = os.path.join(root, "blobs", "sha256")
    try:
        os.makedirs(blobs_dir, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create '{root}': {e.strerror}") from None
    layout = os.path.join(root, "oci-layout")
    if not os.path.exists(layout):
        with open(layout, "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with (
        tempfile.TemporaryDirectory(dir=root, prefix=".save-") as tmp,
        _image_blobs(store, image_id, tmp) as (
            cfg,
            layers,
        ),
    ):
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": cfg.digest, "size": cfg.size},
            "layers": [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": b.size} for b in layers],
        }
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
        for b in [*layers, cfg]:
            os.replace(b.path, os.path.join(blobs_dir, b.digest[7:]))
        with open(os.path.join(blobs_dir, mdigest[7:]), "wb") as f:
            f.write(raw)
        index_path = os.path.join(root, "index.json")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except FileNotFoundError:
            index = {"schemaVersion": 2, "manifests": []}
        except ValueError:
            raise StoreError(f"'{index_path}' is not valid JSON") from None
        index["manifests"] = [
            m
            for m in index.get("manifests", [])
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != ref
        ]
        index["manifests"].append(
            {
                "mediaType": MANIFEST_TYPE,
                "digest": mdigest,
                "size": len(raw),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        )
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f)
        os.replace(index_path + ".tmp", index_path)
    return mdigest


@contextmanager
def replacing(path: str) -> Iterator[BinaryIO]:
    """A file written as ``PATH.part`` and renamed to ``path`` only once complete (removed on failure).

    Raises :class:`StoreError` with one line if it cannot be written.
    """
    part = path + ".part"
    try:
        with open(part, "wb") as f:
            yield f
        os.replace(part, path)
    except OSError as e:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise StoreError(f"cannot write '{path}': {e.strerror}") from None
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise


def _save_docker(store: Store, image_id: bytes, path: str, repotag: str) -> str:
    tmproot = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(tmproot, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write '{path}': {e.strerror}") from None
    with (
        replacing(path) as out,
        tempfile.TemporaryDirectory(dir=tmproot, prefix=".save-") as tmp,
        _image_blobs(store, image_id, tmp) as (cfg, layers),
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        now = time.time()

        def put(name: str, src: str | bytes) -> None:
            t = tarfile.TarInfo(name)
            t.mtime = now
            if isinstance(src, bytes):
                t.size = len(src)
                tar.addfile(t, io.BytesIO(src))
            else:
                t.size = os.path.getsize(src)
                with open(src, "rb") as f:
                    tar.addfile(t, f)

        names = []
        for b in layers:
            name = f"{b.digest[7:]}/layer.tar"
            put(name, b.path)
            names.append(name)
        put(f"{cfg.digest[7:]}.json", cfg.path)
        manifest = [{"Config": f"{cfg.digest[7:]}.json", "RepoTags": [repotag], "Layers": names}]
        put("manifest.json", json.dumps(manifest).encode())
        repo, _, tag = repotag.rpartition(":")
        put("repositories", json.dumps({repo: {tag: layers[-1].digest[7:]}} if layers else {}).encode())
    return cfg.digest
