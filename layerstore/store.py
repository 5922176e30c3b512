"""The store's facade: images, layers, containers (see :mod:`layerstore.schema`).

Guarantees:

* an import is one lmdb write transaction: either the image, its layers, their
  entries, the blob reference counts and the merged tree are all recorded, or
  none is, and the blobs this import stored first are removed again;
* re-importing an image whose layers are all present reads no layer at all;
* the store never follows a symlink from image content: contents live in blobs
  named by digest, and nothing from a layer is ever created on the host.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import lmdb
import msgpack

from . import chunked, names
from .blobs import BlobStore
from .chunked_pull import TOC_KEYS, layer_key, pull_chunked
from .entry import Entry
from .flatten import Tree
from .host import real_root
from .layerstream import open_layer
from .oci import ImageSource, LayerRef, SourceError, SourceOptions
from .rootfs import open_rootfs
from .schema import DB_NAMES, KIND_OPAQUE, KIND_WHITEOUT, MAP_SIZE, SEP
from .tarlayer import read_layer
from .transports import parse

Progress = Callable[[int, int, int | None, int], None]  # (layer, layers, blob size, bytes read)


class StoreError(Exception):
    """A request the store refuses (message is one line)."""


def default_root() -> str:
    """``$UNIONMOUNT_ROOT``; else ``/var/lib/unionmount`` for root; else, for a plain user, also inside a user
    namespace where it is uid 0, ``$XDG_DATA_HOME/unionmount`` (``~/.local/share/unionmount``)."""
    env = os.environ.get("UNIONMOUNT_ROOT")
    if env:
        return env
    if real_root():
        return "/var/lib/unionmount"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "unionmount")


def image_key(image_id: bytes) -> bytes:
    """The 32-byte prefix of an image's rows in ``merged``."""
    return bytes.fromhex(image_id.split(b":", 1)[1].decode())


def merged_key(prefix: bytes, path: bytes) -> bytes:
    parent, _, name = path.rpartition(b"/")
    return prefix + parent + SEP + name


def _pack(v: object) -> bytes:
    return cast(bytes, msgpack.packb(v, use_bin_type=True))


def _unpack(v: object) -> dict[str, Any]:
    """A record as stored (lmdb hands out bytes; its types also allow a buffer or a miss)."""
    return cast(dict[str, Any], msgpack.unpackb(v, raw=False))


SOURCES = 8  # registry blobs remembered per layer


@dataclass(slots=True, frozen=True)
class LayerSource:
    """A registry blob a layer was pulled as: the same contents, compressed as that registry serves them."""

    host: str
    repo: str
    digest: str
    media_type: str | None
    size: int
    annotations: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ImageInfo:
    name: str
    image_id: str
    layers: list[str]
    created: float
    size: int


_NAME_RE = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::[0-9]+)?/)?"  # registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"  # path
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"  # :tag
)


def valid_name(name: str) -> str:
    """``name`` normalised, if it is a valid image reference (Docker's grammar and length limits, without digests)."""
    if not _NAME_RE.match(name):
        shown = name if len(name) <= 64 else name[:24] + "..."
        raise StoreError(f"invalid image name '{shown}' (NAME[:TAG], lower-case, e.g. app:1 or reg.io/team/app:v2)")
    try:
        names.repository_length(name)
    except names.InvalidName as e:
        raise StoreError(str(e)) from None
    return normalize_name(name)


def _key(name: str) -> bytes | None:
    """``name`` as an lmdb key, or None where no key can be (empty, or over lmdb's 511 bytes): nothing is stored so."""
    key = name.encode("utf-8", "surrogateescape")
    return key if 0 < len(key) <= 511 else None


def _familiar(name: str) -> str:
    """Docker's familiar form of a repository: ``docker.io/library/x`` is ``x``, ``docker.io/me/x`` is ``me/x``."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def normalize_name(name: str) -> str:
    """Docker's familiar form, and the tag defaults to ``latest``."""
    name = _familiar(name)
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def normalize_digest_ref(ref: str) -> str:
    """``[HOST/]REPO[:TAG]@sha256:...`` as ``REPO@sha256:...`` in Docker's familiar form
    (``library/x``, ``docker.io/library/x`` and ``x`` are all ``x``)."""
    from .registry import parse_reference

    try:
        r = parse_reference(ref)
        repo, digest = f"{r.host}/{r.repo}", r.digest
    except SourceError:
        repo, _, digest = ref.partition("@")
    return f"{_familiar(repo)}@{digest}"


class Store:
    """An open store. ``readonly`` stores are what a mount daemon uses."""

    def __init__(self, root: str, *, readonly: bool = False) -> None:
        self.root = root = os.path.abspath(root)
        if not readonly:
            os.makedirs(os.path.join(root, "meta"), exist_ok=True)
            os.makedirs(os.path.join(root, "containers"), exist_ok=True)
        elif not os.path.isdir(os.path.join(root, "meta")):
            raise StoreError(f"no store at '{root}' (import an image first)")
        self.env = lmdb.open(
            os.path.join(root, "meta"), max_dbs=len(DB_NAMES), map_size=MAP_SIZE, readonly=readonly, lock=True
        )
        self.db = {}
        for n in DB_NAMES:
            try:
                self.db[n.decode()] = self.env.open_db(n, create=not readonly)
            except lmdb.NotFoundError:  # a read-only open of a store made by an older version
                pass
        self.blobs = BlobStore(root) if not readonly else None
        if self.blobs is not None:
            self.blobs.clean_tmp()
        self.blob_fd = os.open(os.path.join(root, "blobs"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.blob_fd)
        if self.blobs is not None:
            self.blobs.close()
        self.env.close()

    # -- import ---------------------------------------------------------------------
    def import_image(
        self,
        spec: str,
        tag: str | None = None,
        progress: Progress | None = None,
        opts: SourceOptions | None = None,
        lazy: bool = False,
    ) -> tuple[str, str]:
        """Import ``spec``; returns (name:tag, image id). ``progress(i, n, size, done)`` hears of layer
        ``i`` of ``n`` at its start and as its blob is read (``done`` bytes of ``size``, if known).

        ``lazy``: the files of zstd:chunked and eStargz layers from a registry that the store lacks are not
        fetched; they are recorded as pending (:mod:`layerstore.lazy` fetches them)."""
        src = parse(spec, opts)
        try:
            return self._import(src, tag, progress, lazy)
        finally:
            src.close()

    def import_rootfs(
        self,
        path: str,
        tag: str | None = None,
        changes: Sequence[str] = (),
        message: str | None = None,
        platform: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[str, str]:
        """``docker import``: the flat tarball ``path`` (``-``: stdin) as a one-layer image; see :mod:`.rootfs`."""
        assert self.blobs is not None
        src = open_rootfs(path, self.blobs.tmp, changes, message, platform)
        try:
            return self._import(src, tag, progress)
        finally:
            src.close()

    def _import(
        self, src: ImageSource, tag: str | None, progress: Progress | None, lazy: bool = False
    ) -> tuple[str, str]:
        keys = [layer_key(la) for la in src.layers]
        if tag is not None:
            name = valid_name(tag)
        elif src.tags:
            try:
                name = valid_name(src.tags[0])
            except StoreError:
                shown = src.tags[0][:64]
                raise StoreError(f"the source names the image '{shown}', not a valid name: give --tag") from None
        else:
            name = normalize_name(_image_id(src.config_digest, keys)[7:19])
        assert self.blobs is not None
        new_blobs: list[bytes] = []
        fresh: dict[bytes, list[tuple[bytes, Entry]]] = {}  # the layers read now, not read back for the flattening
        with self.env.begin(write=True) as txn:
            try:
                missing = [la for la, k in zip(src.layers, keys, strict=True) if not self._has_layer(txn, k)]
                whole = [la for la in missing if layer_key(la) == la.diff_id.encode()]  # chunked ones: by parts
                if whole and src.prefetch is not None:
                    src.prefetch(whole, os.path.join(self.root, "tmp"))
                for i, layer in enumerate(src.layers):
                    on_read = None
                    if progress:
                        on_read = functools.partial(progress, i, len(src.layers), layer.size)
                        on_read(0)
                    if not self._has_layer(txn, keys[i]):
                        fresh[keys[i]] = self._import_layer(txn, layer, keys[i], keys[:i], new_blobs, on_read, lazy)
                    self._add_source(txn, keys[i], layer)
                self._record_image(txn, src, name, keys, fresh)
                if new_blobs:
                    self.blobs.sync()  # blobs on disk before the index that names them
            except BaseException:
                # still under the write lock: no other import can have deduplicated against these
                for d in new_blobs:
                    self.blobs.remove(d)
                raise
        return name, _image_id(src.config_digest, keys)

    def _add_source(self, txn: lmdb.Transaction, key: bytes, layer: LayerRef) -> None:
        """Remember the registry blob ``layer`` came as (host, repository, digest, media type, size, annotations),
        the newest first, SOURCES at most: ``image push`` to that registry reuses it instead of uploading."""
        if layer.origin is None or layer.digest is None or layer.size is None:
            return
        info = _unpack(txn.get(key, db=self.db["layers"]))
        host, repo, _ = layer.origin
        new = [host, repo, layer.digest, layer.media_type, layer.size, dict(layer.annotations)]
        old = [s for s in info.get("sources", []) if s[:3] != new[:3]]
        txn.put(key, _pack({**info, "sources": [new, *old][:SOURCES]}), db=self.db["layers"])

    def layer_sources(self, key: str) -> list[LayerSource]:
        """The registry blobs layer ``key`` was pulled as, the newest first (see :meth:`_add_source`)."""
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=self.db["layers"])
        return [LayerSource(*s) for s in _unpack(raw).get("sources", [])] if raw is not None else []

    def raw_config(self, image_id: bytes) -> bytes:
        """The image's config as it was imported, byte for byte."""
        with self.env.begin() as txn:
            raw: bytes = _unpack(txn.get(image_id, db=self.db["configs"]))["config"]
        return raw

    def _has_layer(self, txn: lmdb.Transaction, key: bytes) -> bool:
        return txn.get(key, db=self.db["layers"]) is not None

    def _import_layer(
        self,
        txn: lmdb.Transaction,
        layer: LayerRef,
        key: bytes,
        below: Sequence[bytes],
        new_blobs: list[bytes],
        on_read: Callable[[int], None] | None = None,
        lazy: bool = False,
    ) -> list[tuple[bytes, Entry]]:
        """Read one layer (its tar, or a zstd:chunked or eStargz layer by its TOC) and record it under ``key``;
        ``lazy``: a chunked layer's missing files are recorded as ``pending`` instead of fetched.
        Returns the entries recorded, as :meth:`layer_entries` would read them back."""

        def exists_below(path: bytes) -> bool:
            return any(txn.get(d + SEP + path, db=self.db["entries"]) is not None for d in below)

        def learn(sha: bytes, blob: bytes) -> None:
            txn.put(sha, blob, db=self.db["sha256"])

        assert self.blobs is not None
        if key != layer.diff_id.encode():
            known = self.known_sha256(txn)
            tmp = os.path.join(self.root, "tmp")
            pending: list[chunked.File] = []
            later = pending.append if lazy and layer.origin is not None else None
            members = pull_chunked(layer, self.blobs, exists_below, new_blobs.append, known, learn, tmp, on_read, later)
        else:
            members = self._read_tar(layer, exists_below, new_blobs, learn, on_read)
        layer_entries: dict[bytes, Entry] = {}
        whiteouts: set[bytes] = set()
        opaque: set[bytes] = set()
        for path, e in members:
            if e.kind == KIND_WHITEOUT:
                whiteouts.add(path)
            elif e.kind == KIND_OPAQUE:
                opaque.add(path)
            else:
                layer_entries[path] = e
        for path in whiteouts:
            got = layer_entries.get(path)
            if got is None:
                layer_entries[path] = Entry(0, kind=KIND_WHITEOUT)
            elif got.is_dir:
                opaque.add(path)  # deleted and re-created in one layer: nothing below shows through
        for path in opaque:
            got = layer_entries.get(path)
            layer_entries[path] = (got or Entry(0)).with_(kind=KIND_OPAQUE)
        size = 0
        for e in layer_entries.values():
            if e.blob is not None:
                self.ref_blob(txn, e.blob, e.size, +1)
            size += e.size
        txn.cursor(db=self.db["entries"]).putmulti((key + SEP + path, e.pack()) for path, e in layer_entries.items())
        info: dict[str, Any] = {"size": size, "entries": len(layer_entries), "created": time.time()}
        if key != layer.diff_id.encode() and pending:
            assert layer.origin is not None
            info["origin"] = [*layer.origin, layer.digest]  # where the pending files are fetched from
            for f in pending:
                row = [f.start, f.end, f.size, f.inner] if f.inner else [f.start, f.end, f.size]
                txn.put(bytes.fromhex(f.digest[7:]) + key, _pack(row), db=self.db["pending"])
        txn.put(key, _pack(info), db=self.db["layers"])
        return sorted(layer_entries.items())

    def _read_tar(
        self,
        layer: LayerRef,
        exists_below: Callable[[bytes], bool],
        new_blobs: list[bytes],
        learn: Callable[[bytes, bytes], None],
        on_read: Callable[[int], None] | None,
    ) -> Iterator[tuple[bytes, Entry]]:
        assert self.blobs is not None
        with open_layer(layer, on_read) as stream:
            yield from read_layer(stream, self.blobs, exists_below, new_blobs.append, learn)

    def known_sha256(self, txn: lmdb.Transaction) -> Callable[[bytes], bytes | None]:
        """The store's blob with this sha256, if it holds one (a row whose blob is gone does not count)."""

        def known(sha: bytes) -> bytes | None:
            blob = txn.get(sha, db=self.db["sha256"])
            if blob is None or txn.get(blob, db=self.db["blobs"]) is None:
                return None
            assert self.blobs is not None
            return bytes(blob) if self.blobs.exists(bytes(blob)) else None

        return known

    def ref_blob(self, txn: lmdb.Transaction, digest: bytes, size: int, delta: int) -> None:
        raw = txn.get(digest, db=self.db["blobs"])
        refs = msgpack.unpackb(raw)[1] if raw else 0
        txn.put(digest, _pack([size, refs + delta]), db=self.db["blobs"])

    def layer_entries(self, txn: lmdb.Transaction, diff_id: bytes) -> Iterator[tuple[bytes, Entry]]:
        prefix = diff_id + SEP
        cur = txn.cursor(db=self.db["entries"])
        if cur.set_range(prefix):
            for k, v in cast("Iterator[tuple[bytes, bytes]]", cur):
                if not k.startswith(prefix):
                    break
                yield k[len(prefix) :], Entry.unpack(v)

    def _record_image(
        self,
        txn: lmdb.Transaction,
        src: ImageSource,
        name: str,
        keys: list[bytes],
        fresh: Mapping[bytes, list[tuple[bytes, Entry]]],
    ) -> None:
        image_id = _image_id(src.config_digest, keys).encode()
        known = txn.get(image_id, db=self.db["configs"])
        if known is not None:  # the image is there: only a digest it is now also known by is new
            cfg = _unpack(known)
            digests = cfg.get("repo_digests", [])
            new = [d for d in map(normalize_digest_ref, src.repo_digests) if d not in digests]
            if new:
                txn.put(image_id, _pack({**cfg, "repo_digests": digests + new}), db=self.db["configs"])
        else:
            tree = Tree()
            diff_ids = keys  # a layer taken by its TOC is known by the TOC's: its diff_id is not verified
            for d in diff_ids:
                tree.apply_layer(fresh[d] if d in fresh else self.layer_entries(txn, d))
            prefix = image_key(image_id)
            txn.cursor(db=self.db["merged"]).putmulti((merged_key(prefix, p), e.pack()) for p, e in tree.finish())
            cfg = {
                "config": src.config,
                "manifest": src.manifest_digest,
                "layers": [d.decode() for d in diff_ids],
                "created": time.time(),
                "repo_digests": [normalize_digest_ref(d) for d in src.repo_digests],
            }
            if any(_unpack(txn.get(k, db=self.db["layers"])).get("origin") for k in keys):
                cfg["lazy"] = True  # files of it may still be fetched (layerstore.lazy)
            txn.put(image_id, _pack(cfg), db=self.db["configs"])
        txn.put(name.encode(), image_id, db=self.db["images"])

    # -- queries --------------------------------------------------------------------
    def resolve(self, name: str) -> bytes:
        """The image id of ``name`` (``name:tag``, ``REPO@sha256:...`` it was pulled by, or an id or its prefix)."""
        with self.env.begin() as txn:
            if "@sha256:" in name:
                want = normalize_digest_ref(name)
                for k, v in txn.cursor(db=self.db["configs"]):
                    if want in _unpack(v).get("repo_digests", ()):
                        return bytes(k)
            key = _key(normalize_name(name)) if name else None
            got = txn.get(key, db=self.db["images"]) if key is not None else None
            if got is not None:
                return bytes(got)
            want = name if name.startswith("sha256:") else "sha256:" + name
            cur = txn.cursor(db=self.db["configs"])
            if 12 < len(want) <= 511 and cur.set_range(want.encode()) and cur.key().startswith(want.encode()):
                return bytes(cur.key())
        raise StoreError(f"no image '{name}' in the store (see 'unionmount image ls')")

    def images(self) -> list[ImageInfo]:
        out = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["images"]):
                cfg = _unpack(txn.get(v, db=self.db["configs"]))
                size = sum(_unpack(txn.get(d.encode(), db=self.db["layers"]))["size"] for d in cfg["layers"])
                out.append(ImageInfo(k.decode(), v.decode(), cfg["layers"], cfg["created"], size))
        return out

    def config(self, image_id: bytes) -> dict:  # type: ignore[type-arg]
        with self.env.begin() as txn:
            cfg = _unpack(txn.get(image_id, db=self.db["configs"]))
        return {**cfg, "config": json.loads(cfg["config"])}

    def image_sizes(self, image_id: bytes) -> tuple[int, int]:
        """(size, shared size) of an image, in bytes of file contents.

        ``size`` is what its layers hold (as ``image ls`` shows); ``shared`` is
        the part of its distinct blobs that layers of other images also use,
        i.e. what removing this image alone would not free.
        """
        with self.env.begin() as txn:
            cfg = _unpack(txn.get(image_id, db=self.db["configs"]))
            mine = set(cfg["layers"])
            size = sum(_unpack(txn.get(d.encode(), db=self.db["layers"]))["size"] for d in mine)
            others: set[str] = set()
            for k, v in txn.cursor(db=self.db["configs"]):
                if bytes(k) != image_id:
                    others.update(_unpack(v)["layers"])
            own = self._blobs_of(txn, mine)
            elsewhere = self._blobs_of(txn, others)
        return size, sum(n for d, n in own.items() if d in elsewhere)

    def _blobs_of(self, txn: lmdb.Transaction, layers: set[str]) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for d in layers:
            for _, e in self.layer_entries(txn, d.encode()):
                if e.blob is not None:
                    out[e.blob] = e.size
        return out

    def tag(self, name: str, new: str) -> str:
        image_id = self.resolve(name)
        new = valid_name(new)
        with self.env.begin(write=True) as txn:
            txn.put(new.encode(), image_id, db=self.db["images"])
        return new

    def remove_image(self, name: str) -> None:
        key = _key(normalize_name(name)) if name else None
        with self.env.begin(write=True) as txn:
            image_id = txn.get(key, db=self.db["images"]) if key is not None else None
            if key is None or image_id is None:
                raise StoreError(f"no image '{name}' in the store")
            users = [
                k.decode() for k, v in txn.cursor(db=self.db["containers"]) if _unpack(v)["image"] == image_id.decode()
            ]
            others = [k for k, v in txn.cursor(db=self.db["images"]) if v == image_id and k != key]
            if users and not others:
                raise StoreError(f"image '{name}' is used by container(s) {', '.join(users)}")
            txn.delete(key, db=self.db["images"])
            if not others:
                self._drop_merged(txn, bytes(image_id))

    def _drop_merged(self, txn: lmdb.Transaction, image_id: bytes) -> None:
        prefix = image_key(image_id)
        cur = txn.cursor(db=self.db["merged"])
        if cur.set_range(prefix):
            while cast(bytes, cur.key()).startswith(prefix):
                if not cur.delete():
                    break
        txn.delete(image_id, db=self.db["configs"])

    # -- containers -------------------------------------------------------------------
    def container(self, name: str | None, image_id: bytes) -> tuple[str, str, str]:
        """(name, upper dir, work dir) of a container of ``image_id``, created when new."""
        name = name if name is not None else "c-" + secrets.token_hex(4)
        try:
            names.container(name)
        except names.InvalidName as e:
            raise StoreError(str(e)) from None
        base = os.path.join(self.root, "containers", name)
        with self.env.begin(write=True) as txn:
            raw = txn.get(name.encode(), db=self.db["containers"])
            if raw is None:
                txn.put(
                    name.encode(), _pack({"image": image_id.decode(), "created": time.time()}), db=self.db["containers"]
                )
            elif _unpack(raw)["image"] != image_id.decode():
                raise StoreError(f"container '{name}' belongs to image {_unpack(raw)['image'][7:19]}")
        for sub in ("upper", "work"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        return name, os.path.join(base, "upper"), os.path.join(base, "work")

    def set_container_mounts(self, name: str, mounts: list[dict]) -> None:  # type: ignore[type-arg]
        with self.env.begin(write=True) as txn:
            raw = txn.get(name.encode(), db=self.db["containers"])
            if raw is not None:
                rec = _unpack(raw)
                rec["mounts"] = mounts
                txn.put(name.encode(), _pack(rec), db=self.db["containers"])

    def container_paths(self, name: str) -> tuple[str, str]:
        """(upper dir, work dir) of an existing container."""
        self.container_record(name)
        base = os.path.join(self.root, "containers", name)
        return os.path.join(base, "upper"), os.path.join(base, "work")

    def container_record(self, name: str) -> dict:  # type: ignore[type-arg]
        key = _key(name)
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.db["containers"]) if key is not None else None
        if raw is None:
            raise StoreError(f"no container '{name}' (see 'unionmount container ls')")
        return _unpack(raw)

    def containers(self) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
        with self.env.begin() as txn:
            return [(bytes(k).decode(), _unpack(v)) for k, v in txn.cursor(db=self.db["containers"])]

    def lock_container(self, name: str) -> int:
        """Take the container's mount lock; returns the fd that holds it (held for the daemon's life).

        Two daemons writing one container layer would corrupt it, so a second
        mount of a container is refused while the first one is up.
        """
        fd = os.open(os.path.join(self.root, "containers", name, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            where = self.mounted_at(name)
            raise StoreError(f"container '{name}' is already mounted" + (f" at {where}" if where else "")) from None
        return fd

    def set_mounted_at(self, name: str, mountpoint: str) -> None:
        path = os.path.join(self.root, "containers", name, "mountpoint")
        with open(path + ".tmp", "w") as f:
            f.write(mountpoint)
        os.replace(path + ".tmp", path)

    def mounted_at(self, name: str) -> str | None:
        """Where the container is mounted, or None (its lock is free)."""
        base = os.path.join(self.root, "containers", name)
        try:
            fd = os.open(os.path.join(base, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # never mounted (or a name no directory can have: a record from before names were checked)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            try:
                with open(os.path.join(base, "mountpoint")) as f:
                    return f.read() or "?"
            except FileNotFoundError:
                return "?"
        finally:
            os.close(fd)

    def remove_container(self, name: str) -> None:
        """Drop a container and its layer (the caller made sure it is not mounted)."""
        self.container_record(name)
        if self.mounted_at(name) is not None:
            raise StoreError(f"container '{name}' is mounted at {self.mounted_at(name)} (unmount it, or use -f)")
        base = os.path.join(self.root, "containers", name)
        with self.env.begin(write=True) as txn:
            txn.delete(name.encode(), db=self.db["containers"])
        if names.is_container(name):  # a bad name from an old record never had a directory
            shutil.rmtree(base, ignore_errors=True)

    # -- commit ---------------------------------------------------------------------------
    def commit(self, image_id: bytes, tar_path: str, tag: str, message: str | None, author: str | None) -> str:
        """A new image: ``image_id`` plus the layer in ``tar_path`` (an uncompressed tar); returns its id."""
        h = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        diff_id = "sha256:" + h.hexdigest()
        parent = self.config(image_id)
        config = dict(parent["config"])
        rootfs = dict(config.get("rootfs") or {"type": "layers"})
        rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), diff_id]
        config["rootfs"] = rootfs
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config["created"] = now
        if author:
            config["author"] = author
        hist = {"created": now, "created_by": "unionmount commit"}
        if message:
            hist["comment"] = message
        config["history"] = [*config.get("history", []), hist]
        raw = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
        config_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        layers = [LayerRef(d, None, _no_open) for d in parent["layers"]]
        layers.append(LayerRef(diff_id, None, lambda: open(tar_path, "rb")))
        src = ImageSource(raw, config_digest, "", layers, [])
        name = valid_name(tag)
        assert self.blobs is not None
        new_blobs: list[bytes] = []
        fresh: dict[bytes, list[tuple[bytes, Entry]]] = {}  # the layers read now, not read back for the flattening
        with self.env.begin(write=True) as txn:
            try:
                keys = [layer.diff_id.encode() for layer in layers]  # the parent's as the store keeps them
                for i, layer in enumerate(layers):
                    if not self._has_layer(txn, keys[i]):
                        if i < len(layers) - 1:
                            raise StoreError(f"layer {layer.diff_id[:19]} of the image is missing from the store")
                        fresh[keys[i]] = self._import_layer(txn, layer, keys[i], keys[:i], new_blobs)
                self._record_image(txn, src, name, keys, fresh)
                if new_blobs:
                    self.blobs.sync()
            except BaseException:
                for d in new_blobs:
                    self.blobs.remove(d)
                raise
        return _image_id(config_digest, keys)


def _image_id(config_digest: str, keys: list[bytes]) -> str:
    """An image's id: its config's digest, unless a layer is kept by its TOC (zstd:chunked, eStargz), whose
    contents the config's diff_ids do not vouch for; then a digest of the config's and the TOCs' (as
    podman names such images), so that no other image with the same config can take its place."""
    if not any(k.startswith(TOC_KEYS) for k in keys):
        return config_digest
    return "sha256:" + hashlib.sha256(b"\n".join([config_digest.encode(), *keys])).hexdigest()


def _no_open() -> BinaryIO:
    raise StoreError("a layer of the parent image is missing from the store")
