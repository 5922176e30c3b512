"""Writing an image out: ``oci:DIR[:REF]`` (an OCI image layout), ``oci-archive:FILE[:REF]`` (one as
a tar), ``docker-archive:FILE[:NAME:TAG]`` and ``docker://REF`` (a registry, :func:`push`).

Each layer's tar is written again from the store's record of it (the entries,
with whiteouts and opaque markers in the OCI form, hard links as links, file
data from the blobs), uncompressed (gzip level 1 with mtime 0 for a registry, so the
same image pushed again has the same blobs). Its digest is computed as it is written, and
the image's config gets these digests as its ``rootfs.diff_ids``; the layers'
contents are exactly the imported ones, but their tar bytes (and so the image
id) may differ from the original archive's. What ``skopeo``, ``umoci`` and
``podman load`` read back is the same tree.

Guarantees: an OCI layout is written blobs first, ``index.json`` last (through a
rename), so a reader never sees a manifest whose blobs are missing; other images
already in the layout are kept. An archive (oci or docker) is written to
``FILE.part`` and renamed into place. A push sends the manifest after every blob, so the tag
never names an image the registry cannot serve whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from . import chunked, chunked_write, tarwrite
from .entry import Entry
from .oci import SourceError, SourceOptions, diff_ids
from .schema import KIND_OPAQUE, KIND_WHITEOUT
from .store import Store, StoreError, valid_name

log = logging.getLogger(__name__)

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
PUSH_PARALLEL = 3


@dataclass(slots=True, frozen=True)
class _Blob:
    digest: str
    size: int
    path: str  # a temporary file holding it
    diff_id: str = ""  # a layer's uncompressed digest (its digest, unless compressed)
    media_type: str = LAYER_TYPE
    annotations: dict[str, str] | None = None  # (a zstd:chunked layer's: where its TOC lies)


#: what ``push --compression`` takes; None: gzip, and any pulled blob is reused as it is
COMPRESSIONS = ("gzip", "zstd", "zstd:chunked")


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
    with store.env.begin() as txn, tarwrite.writer(out) as tar:
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


def _layer_blob(store: Store, diff_id: str, tmpdir: str, *, compression: str | None = None) -> _Blob:
    """A layer's tar as a temporary file, compressed as ``compression`` (of :data:`COMPRESSIONS`) says: gzip
    (level 1, mtime 0: fast and reproducible), zstd, or zstd:chunked (:mod:`layerstore.chunked_write`).

    Safe to call from several threads at once (each reads in its own lmdb transaction).
    """
    if compression == "zstd:chunked":
        return _chunked_blob(store, diff_id, tmpdir)
    fd, path = tempfile.mkstemp(dir=tmpdir)
    with os.fdopen(fd, "wb") as f:
        outer = _HashWriter(f)
        if compression == "gzip":
            with gzip.GzipFile(fileobj=outer, mode="wb", mtime=0, compresslevel=1) as gz:
                inner = _HashWriter(gz)  # type: ignore[arg-type]
                write_layer_tar(store, diff_id.encode(), inner)  # type: ignore[arg-type]
        elif compression == "zstd":
            zstd = zstandard.ZstdCompressor(level=chunked_write.LEVEL)
            with zstd.stream_writer(outer, closefd=False) as zw:  # type: ignore[arg-type]
                inner = _HashWriter(zw)
                write_layer_tar(store, diff_id.encode(), inner)  # type: ignore[arg-type]
        else:
            inner = outer
            write_layer_tar(store, diff_id.encode(), inner)  # type: ignore[arg-type]
    media_type = LAYER_TYPE + ("+" + compression if compression else "")
    return _Blob("sha256:" + outer.h.hexdigest(), outer.n, path, "sha256:" + inner.h.hexdigest(), media_type)


def _chunked_blob(store: Store, diff_id: str, tmpdir: str) -> _Blob:
    """A layer as zstd:chunked: its tar written first (the writer reads it twice), then compressed file by file."""
    tar = _layer_blob(store, diff_id, tmpdir)
    try:
        fd, path = tempfile.mkstemp(dir=tmpdir)
        with open(tar.path, "rb") as src, os.fdopen(fd, "w+b") as out:
            annotations = chunked_write.write(src, out)
            out.seek(0)
            h = hashlib.file_digest(out, "sha256")
            size = out.tell()
    finally:
        os.unlink(tar.path)
    return _Blob("sha256:" + h.hexdigest(), size, path, tar.digest, LAYER_TYPE + "+zstd", annotations)


def _config_blob(store: Store, image_id: bytes, layers: list[_Blob], tmpdir: str) -> _Blob:
    """The image's config with these layers' digests as its ``rootfs.diff_ids``, as a temporary file."""
    config = dict(store.config(image_id)["config"])
    config["rootfs"] = {"type": "layers", "diff_ids": [b.diff_id for b in layers]}
    return _raw_blob(json.dumps(config, separators=(",", ":")).encode(), tmpdir)


def _raw_blob(raw: bytes, tmpdir: str) -> _Blob:
    """``raw`` as a temporary file."""
    fd, path = tempfile.mkstemp(dir=tmpdir)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return _Blob("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), path)


@contextmanager
def _image_blobs(store: Store, image_id: bytes, tmpdir: str) -> Iterator[tuple[_Blob, list[_Blob]]]:
    """(config blob, layer blobs) of an image, uncompressed, as temporary files."""
    layers = [_layer_blob(store, d, tmpdir) for d in store.config(image_id)["layers"]]
    yield _config_blob(store, image_id, layers, tmpdir), layers


def save(store: Store, name: str, dest: str, opts: SourceOptions | None = None) -> str:
    """Write image ``name`` to ``dest`` (``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:NAME:TAG]``, ``docker://REF``)."""
    image_id = store.resolve(name)
    full = next((i.name for i in store.images() if i.image_id == image_id.decode() and i.name == name), None)
    full = full or next((i.name for i in store.images() if i.image_id == image_id.decode()), name)
    transport, _, rest = dest.partition(":")
    if not rest:
        raise StoreError(f"'{dest}' is not oci:DIR[:REF], oci-archive:FILE[:REF] or docker-archive:FILE[:NAME:TAG]")
    if transport == "oci":
        path, _, ref = rest.partition(":")
        return _save_oci(store, image_id, path, _oci_ref(ref, dest) or full.rsplit(":", 1)[1])
    if transport == "oci-archive":
        path, _, ref = rest.partition(":")
        return _save_oci_archive(store, image_id, path, _oci_ref(ref, dest) or full.rsplit(":", 1)[1])
    if transport == "docker-archive":
        path, _, ref = rest.partition(":")
        return _save_docker(store, image_id, path, valid_name(ref) if ref else full)
    if transport == "docker":
        return push(store, name, rest, opts)[0]
    raise StoreError(f"unknown transport '{transport}' (use oci:, oci-archive:, docker-archive: or docker://)")


#: the OCI image layout's ``org.opencontainers.image.ref.name`` grammar
_OCI_REF = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*")


def _oci_ref(ref: str, dest: str) -> str:
    if ref and (len(ref) > 255 or not _OCI_REF.fullmatch(ref)):
        raise StoreError(f"'{ref}' in '{dest}' is not a valid reference name of an OCI layout")
    return ref


def push(
    store: Store,
    name: str,
    ref: str,
    opts: SourceOptions | None = None,
    before_write: Callable[[str], None] | None = None,
    compression: str | None = None,
) -> tuple[str, int, int]:
    """Push image ``name`` to the registry tag ``ref`` (``docker push``). Returns (manifest digest, blobs
    uploaded, blobs).

    A layer pulled from the destination's registry is named by the blob it came as (its digest, media type
    and annotations, so a zstd:chunked layer stays one) when the repository has that blob or can mount it
    from the repository it came from: nothing of it is uploaded; with ``compression`` (of
    :data:`COMPRESSIONS`), only a blob of that compression is. A layer pulled from another registry is
    copied from there as it is (downloaded, checked against its digest, uploaded), keeping its digest;
    where that registry cannot serve it (a WARNING says why), it is written again. The others are
    compressed (gzip unless ``compression`` says otherwise) and uploaded PUSH_PARALLEL at a time (zlib
    and zstd release the GIL), each only if the repository lacks it; then the config (the imported one,
    byte for byte, when every layer is its original blob), then the manifest.
    ``before_write(key)`` is called before a layer is written again (from several threads at once): a
    lazily pulled layer's files are fetched there."""
    from .registry import Destination

    assert compression is None or compression in COMPRESSIONS, compression
    image_id = store.resolve(name)
    keys: list[str] = store.config(image_id)["layers"]
    raw_config = store.raw_config(image_id)
    try:
        original = diff_ids(raw_config)
    except SourceError:
        original = []
    if len(original) != len(keys):  # (a config this store wrote, e.g. a commit's, names its layers by key)
        original = [k if k.startswith("sha256:") else "" for k in keys]
    sources = [store.layer_sources(k) if original[i] else [] for i, k in enumerate(keys)]
    dest = Destination(ref, opts or SourceOptions())

    def layer(i: int) -> tuple[_Blob, dict[str, Any], bool]:
        usable = []  # (source, the descriptor naming its blob) of the blobs this push may name as they are
        for src in sources[i]:
            kind = REUSABLE.get(src.media_type or "")
            if kind is not None and _compressed_as(kind, src.annotations, compression):
                desc = {"mediaType": kind, "digest": src.digest, "size": src.size, **_annotations(src.annotations)}
                usable.append((src, desc))
        for src, desc in usable:
            if dest.reuse(src.host, src.repo, src.digest):
                return _Blob(src.digest, src.size, "", original[i]), desc, False
        for src, desc in usable:  # another registry's blob, copied as it is (the digest it was pulled by kept)
            if src.host == dest.ref.host:
                continue
            try:
                uploaded = dest.copy(src.host, src.repo, src.digest, src.size, tmp)
            except SourceError as e:
                log.warning("layer %s: not copied from %s (%s); compressed again", keys[i][:19], src.host, e)
                continue
            return _Blob(src.digest, src.size, "", original[i]), desc, uploaded
        if before_write is not None:
            before_write(keys[i])
        b = _layer_blob(store, keys[i], tmp, compression=compression or "gzip")
        try:
            desc = {"mediaType": b.media_type, "digest": b.digest, "size": b.size, **_annotations(b.annotations or {})}
            return b, desc, dest.put_blob(b.digest, b.size, b.path)
        finally:
            os.unlink(b.path)

    try:
        # in the store (not /tmp: layers are big); PID-named, so a later import cleans up after a kill
        with tempfile.TemporaryDirectory(dir=os.path.join(store.root, "tmp"), prefix=f"{os.getpid()}.push") as tmp:
            with ThreadPoolExecutor(PUSH_PARALLEL, thread_name_prefix="push") as pool:
                done = list(pool.map(layer, range(len(keys))))
            layers = [b for b, _, _ in done]
            if [b.diff_id for b in layers] == original:  # every layer as it was pulled: the config too
                cfg = _raw_blob(raw_config, tmp)
                places = {(s.host, s.repo) for layer_sources in sources for s in layer_sources}
                mounted = any(dest.reuse(host, repo, cfg.digest) for host, repo in sorted(places))
            else:
                cfg, mounted = _config_blob(store, image_id, layers, tmp), False
            uploaded = sum(up for _, _, up in done) + (not mounted and dest.put_blob(cfg.digest, cfg.size, cfg.path))
            digest = dest.put_manifest(MANIFEST_TYPE, _manifest(cfg, [d for _, d, _ in done]))
    finally:
        dest.close()
    return digest, uploaded, len(layers) + 1


#: layer media types a pushed manifest may name a pulled blob by (Docker's as their OCI equivalents)
REUSABLE = {
    LAYER_TYPE + "+gzip": LAYER_TYPE + "+gzip",
    LAYER_TYPE + "+zstd": LAYER_TYPE + "+zstd",
    LAYER_TYPE: LAYER_TYPE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": LAYER_TYPE + "+gzip",
}


def _compressed_as(media_type: str, annotations: dict[str, Any], compression: str | None) -> bool:
    """Whether a blob of this media type and these annotations is what ``compression`` asks for (None: any)."""
    if compression is None:
        return True
    if compression == "zstd:chunked":
        return media_type.endswith("+zstd") and chunked.position(annotations, None) is not None
    return media_type.endswith("+" + compression)


def _annotations(a: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in a.items() if isinstance(k, str) and isinstance(v, str)}
    return {"annotations": kept} if kept else {}


def _descs(layers: list[_Blob]) -> list[dict[str, Any]]:
    return [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": b.size} for b in layers]


def _manifest(cfg: _Blob, layers: list[dict[str, Any]]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": cfg.digest, "size": cfg.size},
        "layers": layers,
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def _index_entry(manifest: bytes, ref: str) -> dict[str, Any]:
    """The ``index.json`` entry naming ``manifest`` as ``ref``."""
    return {
        "mediaType": MANIFEST_TYPE,
        "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": ref},
    }


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
        raw = _manifest(cfg, _descs(layers))
        entry = _index_entry(raw, ref)
        mdigest = entry["digest"]
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
        index["manifests"].append(entry)
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f)
        os.replace(index_path + ".tmp", index_path)
    return str(mdigest)


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


@contextmanager
def _archive(
    store: Store, image_id: bytes, path: str
) -> Iterator[tuple[Callable[[str, str | bytes], None], _Blob, list[_Blob]]]:
    """(put(name, file or bytes), config, layers) for writing an image as the tar ``path``, replaced whole."""
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

        yield put, cfg, layers


def _save_oci_archive(store: Store, image_id: bytes, path: str, ref: str) -> str:
    """An OCI layout of the one image, as one tar (what ``podman save --format oci-archive`` writes)."""
    with _archive(store, image_id, path) as (put, cfg, layers):
        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for b in [*layers, cfg]:
            put(f"blobs/sha256/{b.digest[7:]}", b.path)
        raw = _manifest(cfg, _descs(layers))
        desc = _index_entry(raw, ref)
        put(f"blobs/sha256/{desc['digest'][7:]}", raw)
        put("index.json", json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode())
    return str(desc["digest"])


def _save_docker(store: Store, image_id: bytes, path: str, repotag: str) -> str:
    with _archive(store, image_id, path) as (put, cfg, layers):
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
