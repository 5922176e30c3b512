"""The image model, and images read from local files: ``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
``docker-archive:FILE[:REF]`` (:func:`layerstore.transports.parse` opens any of them, or a registry).

An :class:`ImageSource` names the image's config and its layers bottom first;
:func:`layerstore.layerstream.open_layer` streams one layer's tar while checking
both of its digests: the blob's (sha256 of what is on disk, where the source names
it) and its ``diff_id`` (sha256 of the uncompressed tar, from the config). A
mismatch raises :class:`SourceError` once the stream has been read to its end.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO


class SourceError(Exception):
    """An image source that cannot be read (message is one line)."""


class RangeIgnored(SourceError):
    """A source asked for part of a blob answered with all of it (a registry that ignores ``Range``)."""


@dataclass(slots=True, frozen=True)
class LayerRef:
    diff_id: str  # sha256:... of the uncompressed tar (from the config)
    digest: str | None  # sha256:... of the blob as stored, when the source names it
    open: Callable[[], BinaryIO]
    size: int | None = None  # the blob's size, when the source names it (for progress)
    annotations: Mapping[str, object] = dataclasses.field(default_factory=dict)  # the descriptor's
    # [start, end) of the blob, where the source can read parts of it (a file, a registry that honours Range)
    open_range: Callable[[int, int], BinaryIO] | None = None
    origin: tuple[str, str, bool] | None = None  # a registry's (host, repository, insecure) that serves it
    media_type: str | None = None  # the descriptor's, where the source is a registry
    #: several [start, end) ranges in one request, where the registry sends them as parts: (start, its bytes)
    #: for each part it sends (see ``Session.blob_parts``)
    open_parts: Callable[[list[tuple[int, int]]], Iterator[tuple[int, BinaryIO]]] | None = None


def _nothing() -> None:
    pass


@dataclass(slots=True, frozen=True)
class ImageSource:
    config: bytes
    config_digest: str
    manifest_digest: str
    layers: list[LayerRef]
    tags: list[str]
    close: Callable[[], None] = _nothing  # releases what the source holds (a registry session)
    repo_digests: tuple[str, ...] = ()  # REPO@sha256:... a registry knows it by
    # fetch these layers ahead (in parallel), temporaries in this directory; the store calls it, once
    prefetch: Callable[[list[LayerRef], str], None] | None = None


@dataclass(slots=True, frozen=True)
class SourceOptions:
    """How to read a source: the platform to pick from an index; a registry's login and TLS."""

    platform: str | None = None  # OS/ARCH[/VARIANT]; default: this machine's
    creds: str | None = None  # USER:PASS for a registry
    tls_verify: bool = True
    cert_dir: str | None = None


def split_ref(rest: str) -> tuple[str, str | None]:
    if os.path.exists(rest):
        return rest, None
    path, _, ref = rest.rpartition(":")
    if path and os.path.exists(path):
        return path, ref or None
    raise SourceError(f"'{rest}' does not exist")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_platform() -> str:
    """This machine's platform as OCI names it: ``linux/amd64``, ``linux/arm64``, ..."""
    machine = platform.machine()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def pick_platform(manifests: list[dict], want: str | None) -> dict:  # type: ignore[type-arg]
    """The descriptor in an image index for ``want`` (OS/ARCH[/VARIANT]), default this machine (linux)."""
    want = want or host_platform()
    os_, _, rest = want.partition("/")
    arch, _, variant = rest.partition("/")
    for m in manifests:
        p = m.get("platform", {}) if isinstance(m, dict) else {}
        if p.get("os", "linux") == os_ and p.get("architecture") == arch and variant in ("", p.get("variant")):
            if not isinstance(m.get("digest"), str):
                break
            return m
    have = sorted(
        "/".join(filter(None, (p.get("os"), p.get("architecture"), p.get("variant"))))
        for p in (m.get("platform") or {} for m in manifests if isinstance(m, dict))
    )
    raise SourceError(f"no {want} image in the index (it has: {', '.join(have) or 'nothing'})")


def diff_ids(config: bytes) -> list[str]:
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise SourceError("image config has no rootfs.diff_ids") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i.startswith("sha256:") for i in ids):
        raise SourceError("image config has malformed rootfs.diff_ids")
    return ids


# -- OCI image layout -----------------------------------------------------------


def layout(root: str, ref: str | None, opts: SourceOptions) -> ImageSource:
    """An OCI image layout directory (skopeo, umoci, buildah)."""

    def open_file(name: str) -> BinaryIO:
        return open_regular(root, name)

    return _layout(open_file, "oci", root, ref, opts)


def open_regular(root: str, name: str) -> BinaryIO:
    """``root/name`` if it is a regular file inside ``root``: no component may be a symlink (a blob pointing at
    ``/dev/zero`` or outside the layout), and a FIFO or device is refused before it is read (it could block forever)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags | os.O_DIRECTORY)
    except OSError as e:
        raise SourceError(f"cannot open '{root}': {e.strerror}") from None
    try:
        parts = name.split("/")
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        f = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        raise SourceError(f"'{name}' is missing from {root}") from None
    except OSError as e:
        raise SourceError(f"'{name}' in {root} is not a regular file ({e.strerror})") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        os.close(f)
        raise SourceError(f"'{name}' in {root} is not a regular file")
    os.set_blocking(f, True)
    return os.fdopen(f, "rb")


#: the most a manifest, an index or a config may take (containerd's and skopeo's limit)
META_MAX = 4 << 20


def read_meta(f: BinaryIO, what: str, size: object = None) -> bytes:
    """Read image metadata (a manifest, index or config) from ``f``: at most :data:`META_MAX` bytes, and exactly
    ``size`` where a descriptor gives it; more is refused before it is read."""
    given = _size(size)
    limit = given if given is not None and given <= META_MAX else META_MAX
    data = f.read(limit + 1)
    if len(data) > limit:
        if limit == META_MAX:
            raise SourceError(f"{what} is larger than {META_MAX >> 20} MiB")
        raise SourceError(f"{what} is larger than its descriptor says ({size} bytes)")
    if given is not None and len(data) != given:
        raise SourceError(f"{what} has {len(data)} bytes, its descriptor says {size}")
    return data


class Malformed(SourceError):
    """Metadata JSON of the wrong shape (a missing key, a wrong type)."""


def _obj(v: object, what: str) -> dict:  # type: ignore[type-arg]
    if not isinstance(v, dict):
        raise Malformed(f"{what} is not a JSON object")
    return v


def _str(d: dict, key: str, what: str) -> str:  # type: ignore[type-arg]
    v = d.get(key)
    if not isinstance(v, str):
        raise Malformed(f"{what} has no '{key}' string")
    return v


def _list(d: dict, key: str, what: str) -> list:  # type: ignore[type-arg]
    v = d.get(key, [])
    if not isinstance(v, list):
        raise Malformed(f"{what}: '{key}' is not a list")
    return v


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise Malformed(f"{what} is not JSON") from None


class _Bounded:
    """A layer blob read no further than its descriptor's size (a sparse 8 GiB file is refused, not hashed)."""

    def __init__(self, f: BinaryIO, size: int, what: str) -> None:
        self.f, self.left, self.what = f, size, what

    def read(self, n: int = -1) -> bytes:
        want = self.left + 1 if n is None or n < 0 else min(n, self.left + 1)
        data = self.f.read(want)
        if len(data) > self.left:
            raise SourceError(f"{self.what} is larger than its descriptor says")
        self.left -= len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def oci_archive(path: str, ref: str | None, opts: SourceOptions) -> ImageSource:
    """A tar of an OCI image layout (``podman save --format oci-archive``, ``buildx --output type=oci``)."""
    try:
        tar = tarfile.open(path, "r:*")
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError):
        raise SourceError(f"'{path}' is not an oci-archive (not a tar)") from None
    if "index.json" not in members:
        tar.close()
        raise SourceError(f"'{path}' is not an oci-archive (no index.json)")

    def open_file(name: str) -> BinaryIO:
        m = members.get(name)
        f = tar.extractfile(m) if m is not None else None
        if f is None:
            raise SourceError(f"'{name}' is missing from {path}")
        return f  # type: ignore[return-value]

    try:
        src = _layout(open_file, "oci-archive", path, ref, opts)
    except BaseException:
        tar.close()
        raise
    return dataclasses.replace(src, close=tar.close)


def _layout(
    open_file: Callable[[str], BinaryIO], transport: str, where: str, ref: str | None, opts: SourceOptions
) -> ImageSource:
    """The image in an OCI layout whose files ``open_file`` opens by their names in it."""

    def blob(digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not hexd.isalnum():
            raise SourceError(f"unsupported digest '{digest}'")
        return f"blobs/{algo}/{hexd}"

    def read_verified(desc: dict, what: str) -> bytes:  # type: ignore[type-arg]
        digest = _str(desc, "digest", f"the descriptor of the {what}")
        with open_file(blob(digest)) as f:
            data = read_meta(f, f"the {what} {digest[:19]}", desc.get("size"))
        if _sha(data) != digest:
            raise SourceError(f"blob {digest[:19]} is corrupt")
        return data

    def open_layer(name: str, size: object) -> Callable[[], BinaryIO]:
        bound = _size(size)
        if bound is None:
            return lambda: open_file(name)
        return lambda: _Bounded(open_file(name), bound, f"layer {name[13:25]}")  # type: ignore[return-value]

    try:
        with open_file("index.json") as f:
            index = _json(read_meta(f, "index.json"), "index.json")
    except Malformed as e:
        raise SourceError(f"'{where}' is not an OCI image layout: {e}") from None
    except (SourceError, OSError):
        raise SourceError(f"'{where}' is not an OCI image layout (no readable index.json)") from None
    manifests = [_obj(m, "an entry of index.json") for m in _list(_obj(index, "index.json"), "manifests", "index.json")]
    if ref is not None:
        manifests = [m for m in manifests if _annotations(m).get("org.opencontainers.image.ref.name") == ref]
        if not manifests:
            raise SourceError(f"no image '{ref}' in {where}")
    elif len(manifests) != 1:
        raise SourceError(f"{where} holds {len(manifests)} images: name one as {transport}:{where}:REF")
    desc = manifests[0]
    manifest = _obj(_json(read_verified(desc, "manifest"), "the manifest"), "the manifest")
    if "manifests" in manifest:  # an image index: pick the platform
        desc = pick_platform(_list(manifest, "manifests", "the image index"), opts.platform)
        manifest = _obj(_json(read_verified(desc, "manifest"), "the manifest"), "the manifest")
    config_desc = _obj(manifest.get("config"), "the manifest's config")
    config_digest = _str(config_desc, "digest", "the manifest's config")
    config = read_verified(config_desc, "config")
    ids = diff_ids(config)
    blobs = [_obj(b, "a layer of the manifest") for b in _list(manifest, "layers", "the manifest")]
    if len(blobs) != len(ids):
        raise SourceError("manifest and config disagree on the number of layers")

    def open_range(name: str) -> Callable[[int, int], BinaryIO]:
        def opened(start: int, end: int) -> BinaryIO:
            f = open_file(name)
            f.seek(start)
            return f

        return opened

    layers = [
        LayerRef(
            d,
            _str(b, "digest", "a layer"),
            open_layer(blob(b["digest"]), b.get("size")),
            _size(b.get("size")),
            _annotations(b),
            open_range(blob(b["digest"])),
        )
        for d, b in zip(ids, blobs, strict=True)
    ]
    name = _annotations(desc).get("org.opencontainers.image.ref.name")
    return ImageSource(config, config_digest, desc["digest"], layers, [name] if isinstance(name, str) and name else [])


def _annotations(desc: dict) -> dict:  # type: ignore[type-arg]
    a = desc.get("annotations")
    return a if isinstance(a, dict) else {}


def _size(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


# -- docker save / podman save ----------------------------------------------------


def docker_archive(path: str, ref: str | None) -> ImageSource:
    try:
        tar = tarfile.open(path, "r:*")
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        manifest = _json(read_meta(tar.extractfile(members["manifest.json"]), "manifest.json"), "manifest.json")  # type: ignore[arg-type]
    except (OSError, tarfile.TarError, KeyError, ValueError):
        raise SourceError(f"'{path}' is not a docker-archive (no manifest.json)") from None
    if not isinstance(manifest, list) or not manifest:
        raise SourceError(f"'{path}' is not a docker-archive: manifest.json is not a list of images")
    manifest = [_obj(e, "an entry of manifest.json") for e in manifest]
    entries = manifest
    if ref is not None:
        entries = [e for e in manifest if ref in (e.get("RepoTags") or [])] or (
            [manifest[int(ref[1:])]] if ref.startswith("@") and ref[1:].isdigit() else []
        )
        if not entries:
            raise SourceError(f"no image '{ref}' in {path}")
    elif len(entries) != 1:
        raise SourceError(f"{path} holds {len(entries)} images: name one as docker-archive:{path}:REPO:TAG")
    entry = entries[0]

    def member(name: str) -> BinaryIO:
        m = members.get(name.lstrip("./"))
        f = tar.extractfile(m) if m is not None else None
        if f is None:
            raise SourceError(f"'{name}' is missing from {path}")
        return f  # type: ignore[return-value]

    config = read_meta(member(_str(entry, "Config", "the image in manifest.json")), "the config")
    config_digest = _sha(config)
    ids = diff_ids(config)
    names = _list(entry, "Layers", "the image in manifest.json")
    if not all(isinstance(n, str) for n in names):
        raise Malformed("manifest.json: 'Layers' is not a list of names")
    if len(names) != len(ids):
        raise SourceError("manifest and config disagree on the number of layers")
    layers = [LayerRef(d, None, functools.partial(member, n)) for d, n in zip(ids, names, strict=True)]
    tags = [t for t in _list(entry, "RepoTags", "the image in manifest.json") if isinstance(t, str)]
    return ImageSource(config, config_digest, config_digest, layers, tags)
