"""Images from and to a registry: ``docker://[HOST[:PORT]/]NAME[:TAG|@sha256:HEX]``, as docker pull/push.

Guarantees (the HTTP side, logins and TLS: :mod:`layerstore.regclient`):

* names are Docker's: ``alpine`` is ``docker.io/library/alpine:latest``; a first
  component with a dot or a port, or ``localhost``, names the registry;
* every manifest and the config are checked against their sha256 before use, and
  layers while they stream (by :func:`layerstore.layerstream.open_layer`);
* only the layers the store lacks are downloaded, three at a time (``_Fetcher.PARALLEL``);
* mirrors, location rewrites, insecure and blocked registries come from
  registries.conf (:mod:`layerstore.registries_conf`);
* a push sends the manifest after every blob, so the tag never names an image the
  registry cannot serve whole.

Every failure is a :class:`~layerstore.oci.SourceError` with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from . import registries_conf
from .layerstream import Growing, GrowingReader
from .oci import ImageSource, LayerRef, SourceError, SourceOptions, diff_ids, pick_platform
from .regclient import DOCKER_HUB, INDEX_TYPES, MANIFEST_TYPES, Session

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


@dataclass(slots=True, frozen=True)
class Reference:
    """A parsed image reference; ``host`` is as named (``docker.io`` for Docker Hub)."""

    host: str
    repo: str
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        """What to ask ``/manifests/`` for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str | None:
        """``host/repo:tag`` for a tagged reference, None for a digest alone."""
        return f"{self.host}/{self.repo}:{self.tag}" if self.tag else None


def parse_reference(text: str) -> Reference:
    """Docker's reference grammar and normalisation (``ubuntu`` → ``docker.io/library/ubuntu:latest``)."""
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST_RE.match(digest):
            raise SourceError(f"'{text}': a digest is sha256: and 64 lower-case hex digits")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", tag):
            raise SourceError(f"'{text}': invalid tag '{tag}'")
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        host = first
    else:
        host, path = DOCKER_HUB, rest
    if host == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not path or not all(_COMPONENT_RE.match(c) for c in path.split("/")):
        raise SourceError(f"'{text}' is not an image reference ([HOST[:PORT]/]NAME[:TAG|@DIGEST], lower-case name)")
    return Reference(host, path, tag if tag or digest else "latest", digest)


def open_registry(text: str, opts: SourceOptions) -> ImageSource:
    """The image ``text`` names (skopeo's ``//`` after ``docker:`` may stay); its ``close`` ends the session.

    Asked where registries.conf says, in order (mirrors first); the first place that has
    the image serves it all. The image keeps the name it was asked for.
    """
    ref = parse_reference(text.removeprefix("//"))
    failures: list[str] = []
    places = registries_conf.endpoints(ref.host, ref.repo, ref.digest is not None)
    for place in places:
        try:
            return _open_at(place, ref, text, opts)
        except SourceError as e:
            if place is places[-1]:
                if failures:
                    raise SourceError(f"{e} (and mirrors: {'; '.join(failures)})") from None
                raise
            failures.append(str(e))
    raise AssertionError("unreachable")


def _session(place: registries_conf.Endpoint, opts: SourceOptions) -> Session:
    """A session with ``place``; registries.conf's ``insecure`` there is ``--tls-verify=false``."""
    return Session(place.host, dataclasses.replace(opts, tls_verify=False) if place.insecure else opts)


def _open_at(place: registries_conf.Endpoint, ref: Reference, text: str, opts: SourceOptions) -> ImageSource:
    s = _session(place, opts)
    repo = place.repo
    try:
        manifest, digest = s.manifest(repo, ref.ref, expect=ref.digest)
        repo_digest = f"{ref.host}/{ref.repo}@{digest}"  # what the tag names: for a multi-platform image, the index
        if _media_type(manifest) in INDEX_TYPES:
            desc = pick_platform(manifest.get("manifests") or [], opts.platform)
            if not _DIGEST_RE.match(desc["digest"]):
                raise SourceError(f"{text}: the index names a digest that is not sha256")
            manifest, digest = s.manifest(repo, desc["digest"], expect=desc["digest"])
        if _media_type(manifest) not in MANIFEST_TYPES:
            raise SourceError(f"{text}: not a container image (manifest type {_media_type(manifest) or 'unknown'})")
        try:
            config_digest = manifest["config"]["digest"]
            blobs = [b["digest"] for b in manifest.get("layers") or []]
            sizes = [b.get("size") if isinstance(b.get("size"), int) else None for b in manifest.get("layers") or []]
            annotations = [b.get("annotations") or {} for b in manifest.get("layers") or []]
            types = [t if isinstance(t := b.get("mediaType"), str) else None for b in manifest.get("layers") or []]
            if not all(isinstance(a, dict) for a in annotations):
                raise TypeError
        except (KeyError, TypeError):
            raise SourceError(f"{text}: the manifest has no config or malformed layers") from None
        if not all(isinstance(b, str) and _DIGEST_RE.match(b) for b in [config_digest, *blobs]):
            raise SourceError(f"{text}: the manifest names a digest that is not sha256")
        config, _ = s.document(f"{repo}/blobs/{config_digest}", f"{repo}@{config_digest}", config_digest)
        ids = diff_ids(config)
        if len(ids) != len(blobs):
            raise SourceError("manifest and config disagree on the number of layers")
    except BaseException:
        s.close()
        raise
    fetch = _Fetcher(s, repo)
    layers = [
        LayerRef(
            d,
            b,
            (lambda b=b, size=size: fetch.open(b, size)),  # type: ignore[misc]
            size,
            a,
            functools.partial(_blob_range, s, f"{repo}/blobs/{b}"),
            (place.host, repo, place.insecure),
            mt,
            functools.partial(_blob_parts, s, f"{repo}/blobs/{b}"),
        )
        for d, b, size, a, mt in zip(ids, blobs, sizes, annotations, types, strict=True)
    ]
    tags = [ref.name] if ref.name else []
    return ImageSource(config, config_digest, digest, layers, tags, fetch.close, (repo_digest,), fetch.start)


def _blob_range(s: Session, path: str, start: int, end: int) -> BinaryIO:
    return s.blob_range(path, start, end)  # type: ignore[return-value]  # a ChunkReader reads as a BinaryIO


def _blob_parts(s: Session, path: str, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, BinaryIO]]:
    return s.blob_parts(path, ranges)  # type: ignore[return-value]  # (as above)


class _Fetcher:
    """Downloads an image's layers PARALLEL at a time (as docker pull does) into files the importer
    reads while they grow; a layer it was not asked to fetch ahead is streamed when opened.
    :meth:`close` stops the downloads, removes their files and ends the session."""

    PARALLEL = 3

    def __init__(self, session: Session, repo: str) -> None:
        self._s = session
        self._repo = repo
        self._files: dict[str, Growing] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self, layers: list[LayerRef], tmpdir: str) -> None:
        self._pool = ThreadPoolExecutor(self.PARALLEL, thread_name_prefix="pull")
        for ref in layers:
            if ref.digest is None or ref.digest in self._files:
                continue
            path = os.path.join(tmpdir, f"{os.getpid()}.pull-{ref.digest[7:23]}")  # PID-named: swept after a kill
            self._files[ref.digest] = g = Growing(path)
            self._pool.submit(self._download, ref.digest, ref.size, g)

    def _download(self, digest: str, size: int | None, g: Growing) -> None:
        try:
            body = self._s.blob(f"{self._repo}/blobs/{digest}", size)
            try:
                while chunk := body.next_chunk():
                    g.append(chunk)
            finally:
                body.close()
            g.finish(None)
        except BaseException as e:  # the reader raises it
            g.finish(e)

    def open(self, digest: str, size: int | None) -> BinaryIO:
        g = self._files.get(digest)
        if g is None:
            return self._s.blob(f"{self._repo}/blobs/{digest}", size)  # type: ignore[return-value]
        return GrowingReader(g)  # type: ignore[return-value]

    def close(self) -> None:
        for g in self._files.values():
            g.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for g in self._files.values():
            g.finish(SourceError("download cancelled"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(g.path)
        self._s.close()


class Destination:
    """A tag in a registry that ``image push`` writes; blobs first, the manifest last.

    A reader of the tag never sees a manifest whose blobs are missing: the registry
    refuses such a manifest, and we send it only after every blob is there.
    """

    def __init__(self, text: str, opts: SourceOptions) -> None:
        ref = parse_reference(text.removeprefix("//"))
        if ref.digest is not None:
            raise SourceError(f"'{text}': push to a tag, not a digest")
        place = registries_conf.endpoints(ref.host, ref.repo, False)[-1]  # no mirrors for a push
        self.ref = Reference(place.host, place.repo, ref.tag, None)
        self._s = _session(place, opts)

    def put_blob(self, digest: str, size: int, path: str) -> bool:
        """Upload the blob in ``path`` unless the repository has it; True if it was uploaded."""
        if self._s.has_blob(self.ref.repo, digest):
            return False
        self._s.upload(self.ref.repo, digest, size, path)
        return True

    def reuse(self, host: str, repo: str, digest: str) -> bool:
        """Whether the repository has blob ``digest``, which ``host``'s repository ``repo`` served, or can mount it
        from there (the same registry only): a manifest may then name it without an upload."""
        if host != self.ref.host:
            return False
        if self._s.has_blob(self.ref.repo, digest):
            return True
        return repo != self.ref.repo and self._s.mount_blob(self.ref.repo, digest, repo)

    def copy(self, host: str, repo: str, digest: str, size: int, tmpdir: str) -> bool:
        """Blob ``digest`` of ``host``'s repository ``repo`` (another registry) into the repository, its
        bytes as they are, so that a manifest may name it by the digest it was pulled by: downloaded into
        ``tmpdir``, checked against ``digest`` and ``size``, uploaded; True if it was uploaded (False: the
        repository has it). SourceError if ``host`` does not serve it (nothing is uploaded then).

        ``host`` is asked with the login its auth files (or helpers) give and the TLS settings of this
        push, plain HTTP where registries.conf calls it insecure."""
        if self._s.has_blob(self.ref.repo, digest):
            return False
        insecure = any(e.insecure for e in registries_conf.endpoints(host, repo, True) if e.host == host)
        opts = dataclasses.replace(self._s.opts, creds=None)  # (the push's login is the destination's)
        src = _session(registries_conf.Endpoint(host, repo, insecure), opts)
        fd, path = tempfile.mkstemp(dir=tmpdir, prefix=f"{os.getpid()}.copy-")
        try:
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                body = src.blob(f"{repo}/blobs/{digest}", size)
                try:
                    while chunk := body.next_chunk():
                        sha.update(chunk)
                        f.write(chunk)
                finally:
                    body.close()
                if f.tell() != size or "sha256:" + sha.hexdigest() != digest:
                    raise SourceError(f"{host}/{repo}@{digest[:19]}: the registry sent other bytes than the blob")
            self._s.upload(self.ref.repo, digest, size, path)
        finally:
            src.close()
            os.unlink(path)
        return True

    def put_manifest(self, media_type: str, raw: bytes) -> str:
        """Tag ``raw``; returns its digest."""
        return self._s.put_manifest(self.ref.repo, self.ref.tag or "latest", media_type, raw)

    def close(self) -> None:
        self._s.close()


def _media_type(doc: dict) -> str | None:  # type: ignore[type-arg]
    """A manifest's type; an OCI document may leave it out (``manifests`` then marks an index)."""
    mt = doc.get("mediaType")
    if mt is None and doc.get("schemaVersion") == 2:
        return INDEX_TYPES[0] if "manifests" in doc else MANIFEST_TYPES[0]
    if doc.get("schemaVersion") == 1:
        raise SourceError("schema 1 manifests are not supported (push the image again with a current client)")
    return mt
