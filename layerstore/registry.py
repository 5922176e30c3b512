"""Images from and to a registry: ``docker://[HOST[:PORT]/]NAME[:TAG|@sha256:HEX]``, as docker pull/push.

Speaks the OCI distribution API (``/v2/``) over httpx. Guarantees:

* names are Docker's: ``alpine`` is ``docker.io/library/alpine:latest``; a first
  component with a dot or a port, or ``localhost``, names the registry;
* every manifest and the config are checked against their sha256 before use, a
  tag's manifest against the ``Docker-Content-Digest`` the registry sends, and
  layers while they stream (by :func:`layerstore.layerstream.open_layer`); a manifest or
  config larger than :data:`MAX_DOCUMENT` is refused unread;
* a layer is downloaded only when read: the store never reads one it already has;
* ``Bearer`` (token) and ``Basic`` challenges are answered with ``creds`` or the
  auth files podman and docker write; credentials go only to the registry's own
  origin and its token realm, never along a redirect to another host;
* HTTPS is verified against the system's CAs plus ``*.crt`` in the certificate
  directory (``cert_dir``, else ``/etc/containers/certs.d/HOST`` and
  ``/etc/docker/certs.d/HOST``); plain HTTP is tried only for loopback hosts (Docker's
  default insecure registries), with ``tls_verify=False`` or where registries.conf
  says ``insecure``;
* mirrors, location rewrites and blocked registries come from registries.conf
  (:mod:`layerstore.registries_conf`).

Every failure is a :class:`~layerstore.oci.SourceError` with one line.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import hashlib
import ipaddress
import json
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import httpx

from . import registries_conf
from .layerstream import ChunkReader
from .oci import ImageSource, LayerRef, SourceError, SourceOptions, diff_ids, pick_platform

MAX_DOCUMENT = 4 << 20  # manifests and configs; containerd's limit for manifests
RETRIES = 3  # a broken connection or a 502/503/504 on a GET, as docker pull retries

_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT = ", ".join(_MANIFEST_TYPES + _INDEX_TYPES)
_DOCKER_HUB = "docker.io"
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
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
        host, path = _DOCKER_HUB, rest
    if host == _DOCKER_HUB and "/" not in path:
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
    failures = []
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


def _open_at(place: registries_conf.Endpoint, ref: Reference, text: str, opts: SourceOptions) -> ImageSource:
    s = _Session(place.host, dataclasses.replace(opts, tls_verify=False) if place.insecure else opts)
    repo = place.repo
    try:
        manifest, digest = s.manifest(repo, ref.ref, expect=ref.digest)
        repo_digest = f"{ref.host}/{ref.repo}@{digest}"  # what the tag names: for a multi-platform image, the index
        if _media_type(manifest) in _INDEX_TYPES:
            desc = pick_platform(manifest.get("manifests") or [], opts.platform)
            manifest, digest = s.manifest(repo, desc["digest"], expect=desc["digest"])
        if _media_type(manifest) not in _MANIFEST_TYPES:
            raise SourceError(f"{text}: not a container image (manifest type {_media_type(manifest) or 'unknown'})")
        try:
            config_digest = manifest["config"]["digest"]
            blobs = [b["digest"] for b in manifest.get("layers") or []]
            sizes = [b.get("size") if isinstance(b.get("size"), int) else None for b in manifest.get("layers") or []]
        except (KeyError, TypeError):
            raise SourceError(f"{text}: the manifest has no config or malformed layers") from None
        if not all(isinstance(b, str) and _DIGEST_RE.match(b) for b in [config_digest, *blobs]):
            raise SourceError(f"{text}: the manifest names a digest that is not sha256")
        config = s.document(f"{repo}/blobs/{config_digest}", f"{repo}@{config_digest}", config_digest)
        ids = diff_ids(config)
        if len(ids) != len(blobs):
            raise SourceError("manifest and config disagree on the number of layers")
    except BaseException:
        s.close()
        raise
    fetch = _Fetcher(s, repo)
    layers = [
        LayerRef(d, b, (lambda b=b, size=size: fetch.open(b, size)), size)  # type: ignore[misc]
        for d, b, size in zip(ids, blobs, sizes, strict=True)
    ]
    tags = [ref.name] if ref.name else []
    return ImageSource(config, config_digest, digest, layers, tags, fetch.close, (repo_digest,), fetch.start)


class _Fetcher:
    """Downloads an image's layers PARALLEL at a time (as docker pull does) into files the importer
    reads while they grow; a layer it was not asked to fetch ahead is streamed when opened.
    :meth:`close` stops the downloads, removes their files and ends the session."""

    PARALLEL = 3

    def __init__(self, session: _Session, repo: str) -> None:
        self._s = session
        self._repo = repo
        self._files: dict[str, _Growing] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self, layers: list[LayerRef], tmpdir: str) -> None:
        self._pool = ThreadPoolExecutor(self.PARALLEL, thread_name_prefix="pull")
        for ref in layers:
            if ref.digest is None or ref.digest in self._files:
                continue
            path = os.path.join(tmpdir, f"{os.getpid()}.pull-{ref.digest[7:23]}")  # PID-named: swept after a kill
            self._files[ref.digest] = g = _Growing(path)
            self._pool.submit(self._download, ref.digest, ref.size, g)

    def _download(self, digest: str, size: int | None, g: _Growing) -> None:
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
        return _GrowingReader(g)  # type: ignore[return-value]

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


class _Cancelled(Exception):
    pass


class _Growing:
    """A file one thread appends to while others read it (:class:`_GrowingReader`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed by finish()
        self._cond = threading.Condition()
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self._cancelled = False

    def append(self, data: bytes) -> None:
        if self._cancelled:
            raise _Cancelled
        self._f.write(data)
        self._f.flush()
        with self._cond:
            self.size += len(data)
            self._cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        self._f.close()
        with self._cond:
            if not self.done:
                self.done, self.error = True, error
            self._cond.notify_all()

    def cancel(self) -> None:
        self._cancelled = True

    def wait_beyond(self, pos: int) -> int:
        """The size once it exceeds ``pos`` or the download ended; raises the download's error at its end."""
        with self._cond:
            while self.size <= pos and not self.done:
                self._cond.wait()
            if self.size <= pos and self.error is not None:
                raise self.error
            return self.size


class _GrowingReader(ChunkReader):
    def __init__(self, g: _Growing) -> None:
        self._g = g
        self._f = open(g.path, "rb")  # noqa: SIM115 - closed by close()
        self._pos = 0

    def next_chunk(self) -> bytes:
        end = self._g.wait_beyond(self._pos)
        data = self._f.read(min(end - self._pos, 1 << 20))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


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
        self._s = _Session(place.host, dataclasses.replace(opts, tls_verify=False) if place.insecure else opts)

    @property
    def name(self) -> str:
        return f"{self.ref.host}/{self.ref.repo}:{self.ref.tag}"

    def put_blob(self, digest: str, size: int, path: str) -> bool:
        """Upload the blob in ``path`` unless the repository has it; True if it was uploaded."""
        if self._s.has_blob(self.ref.repo, digest):
            return False
        self._s.upload(self.ref.repo, digest, size, path)
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
        return _INDEX_TYPES[0] if "manifests" in doc else _MANIFEST_TYPES[0]
    if doc.get("schemaVersion") == 1:
        raise SourceError("schema 1 manifests are not supported (push the image again with a current client)")
    return mt


class _Session:
    """One HTTP client for one registry: scheme, certificates and authorization."""

    def __init__(self, host: str, opts: SourceOptions) -> None:
        self.host = host
        self.api = "registry-1.docker.io" if host == _DOCKER_HUB else host
        self.opts = opts
        self.creds = _credentials(host, opts.creds)
        self.authorization: str | None = None
        self.client = httpx.Client(
            verify=_tls_context(host, opts),
            timeout=httpx.Timeout(60.0, connect=15.0),
            follow_redirects=True,
            headers={"User-Agent": "unionmount"},
        )
        try:
            self.base = self._probe()
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def _probe(self) -> str:
        """``https://HOST/v2/``, or ``http://`` where plain HTTP is allowed and HTTPS is not served."""
        schemes = ["https"]
        if not self.opts.tls_verify or _is_loopback(self.api):
            schemes.append("http")
        first: Exception | None = None
        for scheme in schemes:
            base = f"{scheme}://{self.api}/v2/"
            try:
                r = self.client.get(base)
            except httpx.HTTPError as e:
                first = first or e
                continue
            if r.status_code in (200, 401):
                return base
            if first is None:
                raise SourceError(f"{self.host} does not look like a registry ({base} answered {r.status_code})")
            # HTTPS failed and plain HTTP is not a registry either: the HTTPS failure is the story
        raise SourceError(f"cannot reach registry {self.host}: {_reason(first)}")

    def _get(self, path: str, accept: str | None = None) -> httpx.Response:
        """GET ``base + path`` as a stream, answering one authorization challenge."""
        return self._send("GET", self.base + path, {"Accept": accept} if accept else {})

    def _send(
        self,
        method: str,
        url: str | httpx.URL,
        headers: dict[str, str],
        body: Callable[[], Iterator[bytes]] | bytes | None = None,
    ) -> httpx.Response:
        """A request, its response streamed. Answers one authorization challenge; a GET or HEAD that
        meets a broken connection or a 502/503/504 is tried again, RETRIES times, backing off."""
        idempotent = method in ("GET", "HEAD")
        transient = 0
        authorized = False
        target = httpx.URL(url)
        ours = self.base.startswith(f"{target.scheme}://{target.netloc.decode()}/")  # an upload URL may be elsewhere
        while True:
            h = headers | {"Authorization": self.authorization} if self.authorization and ours else headers
            content = body() if callable(body) else body
            try:
                r = self.client.send(self.client.build_request(method, url, headers=h, content=content), stream=True)
            except httpx.TransportError as e:
                if idempotent and transient < RETRIES:
                    transient += 1
                    time.sleep(_backoff(transient))
                    continue
                raise _Transient(f"registry {self.host}: {_reason(e)}") from None
            except httpx.HTTPError as e:
                raise SourceError(f"registry {self.host}: {_reason(e)}") from None
            if r.status_code in (502, 503, 504) and idempotent and transient < RETRIES:
                r.close()
                transient += 1
                time.sleep(_backoff(transient))
                continue
            if r.status_code == 401 and not authorized:
                challenge = r.headers.get("www-authenticate", "")
                r.close()
                self.authorization = self._authorize(challenge)
                authorized = True
                continue
            return r

    def _authorize(self, challenge: str) -> str:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_RE.findall(params_text))
        if scheme.lower() == "basic":
            if self.creds is None:
                raise SourceError(f"registry {self.host} wants a login: pass --creds USER:PASS, or podman/docker login")
            return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        if scheme.lower() != "bearer" or "realm" not in params:
            raise SourceError(f"registry {self.host} asks for an unknown kind of login: {challenge[:60]!r}")
        query = {k: params[k] for k in ("service", "scope") if k in params}
        auth = httpx.BasicAuth(*self.creds) if self.creds else None
        try:
            r = self.client.get(params["realm"], params=query, auth=auth)
        except httpx.HTTPError as e:
            raise SourceError(f"cannot get a token for {self.host}: {_reason(e)}") from None
        if r.status_code != 200:
            raise SourceError(f"the token service of {self.host} refused: {r.status_code} (check the credentials)")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"the token service of {self.host} sent no token")
        return "Bearer " + token

    def _check(self, r: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
        if r.status_code in ok:
            return
        why = {
            401: "access refused (check the credentials)",
            403: "access denied",
            404: "not found",
            429: "too many requests (rate limited), try again later",
        }.get(r.status_code, f"HTTP {r.status_code}")
        try:  # a registry's own words, where they add to the status (OCI distribution's error body)
            if r.status_code != 404:
                r.read()
                errors = r.json().get("errors") or []
                why += "".join(f"; {e['code']}: {e.get('message', '')}" for e in errors[:1])
        except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError):
            pass
        finally:
            r.close()
        raise SourceError(f"{self.host}/{what}: {why}")

    def document(self, path: str, what: str, expect: str | None, accept: str | None = None) -> bytes:
        """A manifest or config, at most MAX_DOCUMENT bytes, checked against ``expect`` (or the registry's digest)."""
        r = self._get(path, accept)
        try:
            self._check(r, what)
            body = bytearray()
            for chunk in r.iter_raw():
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise SourceError(f"{self.host}/{what}: larger than {MAX_DOCUMENT >> 20} MiB, refused")
        except httpx.HTTPError as e:
            raise SourceError(f"registry {self.host}: {_reason(e)}") from None
        finally:
            r.close()
        named = expect or r.headers.get("docker-content-digest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if named is not None and digest != named:
            raise SourceError(f"{self.host}/{what}: content does not match its digest {named[:19]}")
        return bytes(body)

    def manifest(self, repo: str, ref: str, expect: str | None) -> tuple[dict, str]:  # type: ignore[type-arg]
        what = f"{repo}{'@' if ref.startswith('sha256:') else ':'}{ref}"
        body = self.document(f"{repo}/manifests/{ref}", what, expect, _ACCEPT)
        try:
            doc = json.loads(body)
        except ValueError:
            raise SourceError(f"{self.host}/{what}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{self.host}/{what}: the manifest is not a JSON object")
        return doc, "sha256:" + hashlib.sha256(body).hexdigest()

    def blob(self, path: str, size: int | None = None) -> _Body:
        """A layer blob as a stream, resumed where a broken download stopped, never longer than ``size``
        (the manifest's word); the caller checks its digest."""
        return _Body(self, path, size)

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self._send("HEAD", f"{self.base}{repo}/blobs/{digest}", {})
        self._check(r, f"{repo}@{digest}", (200, 404))
        r.close()
        return r.status_code == 200

    def upload(self, repo: str, digest: str, size: int, path: str) -> None:
        """Upload the blob in file ``path``; an upload the network broke is started over, RETRIES times."""
        for attempt in range(RETRIES + 1):
            try:
                return self._upload_once(repo, digest, size, path)
            except _Transient:
                if attempt == RETRIES:
                    raise
                time.sleep(_backoff(attempt + 1))

    def _upload_once(self, repo: str, digest: str, size: int, path: str) -> None:
        """One monolithic upload: POST for a session, then PUT of the whole blob (as skopeo does)."""
        r = self._send("POST", f"{self.base}{repo}/blobs/uploads/", {"Content-Length": "0"})
        self._check(r, f"{repo} (starting an upload)", (202,))
        r.close()
        location = r.headers.get("location")
        if not location:
            raise SourceError(f"registry {self.host} started an upload without a Location")
        url = httpx.URL(self.base).join(location).copy_merge_params({"digest": digest})

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while data := f.read(1 << 20):
                    yield data

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        r = self._send("PUT", url, headers, chunks)
        if r.status_code in (502, 503, 504):
            r.close()
            raise _Transient(f"registry {self.host}/{repo}@{digest}: HTTP {r.status_code}")
        self._check(r, f"{repo}@{digest}", (201,))
        r.close()

    def put_manifest(self, repo: str, ref: str, media_type: str, raw: bytes) -> str:
        r = self._send("PUT", f"{self.base}{repo}/manifests/{ref}", {"Content-Type": media_type}, raw)
        self._check(r, f"{repo}:{ref}", (201,))
        r.close()
        return "sha256:" + hashlib.sha256(raw).hexdigest()


class _Body(ChunkReader):
    """A blob's HTTP body as a file. A download that breaks off is resumed from the byte it reached
    (``Range``; a registry that ignores it sends the whole blob again, and what we have is skipped),
    RETRIES times; then, and on any other failure, SourceError."""

    def __init__(self, session: _Session, path: str, size: int | None = None) -> None:
        self._s = session
        self._path = path
        self._size = size
        self._received = 0  # bytes of the blob taken from the network
        self._breaks = 0
        self._open()

    def _open(self) -> None:
        what = self._path.replace("/blobs/", "@")
        headers = {"Range": f"bytes={self._received}-"} if self._received else {}
        r = self._s._send("GET", self._s.base + self._path, headers)
        self._skip = 0
        if self._received and r.status_code == 206:
            if not r.headers.get("content-range", "").startswith(f"bytes {self._received}-"):
                r.close()
                raise SourceError(f"{self._s.host}/{what}: the registry resumed the download at the wrong place")
        elif self._received and r.status_code == 200:
            self._skip = self._received
        else:
            self._s._check(r, what)
        self._r = r
        self._chunks = r.iter_raw(1 << 20)

    def next_chunk(self) -> bytes:
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return b""
            except httpx.TransportError as e:
                self._r.close()
                self._breaks += 1
                if self._breaks > RETRIES:
                    raise SourceError(f"download from {self._s.host} broke off: {_reason(e)}") from None
                time.sleep(_backoff(self._breaks))
                self._open()
                continue
            except httpx.HTTPError as e:
                raise SourceError(f"download from {self._s.host} broke off: {_reason(e)}") from None
            if self._skip:
                drop = min(self._skip, len(chunk))
                self._skip -= drop
                chunk = chunk[drop:]
            self._received += len(chunk)
            if self._size is not None and self._received > self._size:
                raise SourceError(f"{self._s.host}/{self._path.replace('/blobs/', '@')}: "
                                  f"longer than the {self._size} bytes its manifest says")  # fmt: skip
            if chunk:
                return chunk

    def close(self) -> None:
        if not self.closed:
            self._r.close()
        super().close()


class _Transient(SourceError):
    """A failure that trying again may mend: the connection broke, or a 502/503/504."""


def _backoff(attempt: int) -> float:
    return 0.5 * 2 ** (attempt - 1)


def _reason(e: Exception | None) -> str:
    """An httpx error as a short phrase (the innermost cause, without a traceback)."""
    while e is not None and e.__cause__ is not None and str(e.__cause__):
        e = e.__cause__  # type: ignore[assignment]
    text = str(e) if e is not None else "no answer"
    return text.splitlines()[0] if text else type(e).__name__


def _is_loopback(api: str) -> bool:
    host = api.rsplit(":", 1)[0] if not api.endswith("]") else api
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(host: str, opts: SourceOptions) -> ssl.SSLContext | bool:
    """The system's CAs plus the registry's own (``*.crt`` in its certs.d directory)."""
    if not opts.tls_verify:
        return False
    ctx = ssl.create_default_context()
    dirs = [opts.cert_dir] if opts.cert_dir else [f"/etc/containers/certs.d/{host}", f"/etc/docker/certs.d/{host}"]
    for d in dirs:
        for crt in sorted(glob.glob(os.path.join(glob.escape(d), "*.crt"))):
            try:
                ctx.load_verify_locations(crt)
            except (OSError, ssl.SSLError) as e:
                raise SourceError(f"cannot load the certificate {crt}: {e}") from None
    return ctx


def _credentials(host: str, creds: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` as given, else what the auth files podman and docker write hold for ``host``.

    In each file, as docker reads it: the host's credential helper (``credHelpers``), else
    the ``auths`` entry, else the default helper (``credsStore``). A helper is
    ``docker-credential-NAME get`` on ``$PATH``; one that fails or knows nothing is passed over.
    """
    if creds is not None:
        user, sep, password = creds.partition(":")
        if not sep or not user:
            raise SourceError("--creds is USER:PASS")
        return user, password
    home = os.path.expanduser("~")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    files = [
        os.environ.get("REGISTRY_AUTH_FILE"),
        os.path.join(runtime, "containers/auth.json") if runtime else None,
        os.path.join(home, ".config/containers/auth.json"),
        os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json"),
    ]
    keys = {host, f"https://{host}", f"http://{host}"}
    if host == _DOCKER_HUB:
        keys |= {"https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"}
    server = "https://index.docker.io/v1/" if host == _DOCKER_HUB else host
    for path in filter(None, files):
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
        helper = next((h for k, h in helpers.items() if k in keys), None)
        if isinstance(helper, str) and (found := _from_helper(helper, server)):
            return found
        auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
        for key, entry in auths.items():
            if key.rstrip("/") in keys or key in keys:
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (KeyError, TypeError, ValueError):
                    continue
                return user, password
        store = doc.get("credsStore")
        if isinstance(store, str) and (found := _from_helper(store, server)):
            return found
    return None


def _from_helper(name: str, server: str) -> tuple[str, str] | None:
    """``docker-credential-NAME get`` (docker's credential helper protocol), or None."""
    if not re.match(r"^[A-Za-z0-9._-]+$", name):
        return None
    try:
        r = subprocess.run(
            [f"docker-credential-{name}", "get"], input=server, capture_output=True, text=True, timeout=60
        )
        answer = json.loads(r.stdout) if r.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    user, secret = (answer.get("Username"), answer.get("Secret")) if isinstance(answer, dict) else (None, None)
    if not isinstance(user, str) or not isinstance(secret, str) or not user or user == "<token>":
        return None  # an identity token (docker login to an OAuth registry) is not a password
    return user, secret
