"""One registry over HTTP (the OCI distribution API, ``/v2/``): a session, its logins, its TLS.

Guarantees:

* ``Bearer`` (token) and ``Basic`` challenges are answered with ``creds`` or the
  auth files podman and docker write (with docker's credential helpers);
  credentials go only to the registry's own origin and its token realm, never
  along a redirect or to an upload URL on another host;
* HTTPS is verified against the system's CAs plus ``*.crt`` in the certificate
  directory (``cert_dir``, else ``/etc/containers/certs.d/HOST`` and
  ``/etc/docker/certs.d/HOST``); plain HTTP is tried only for loopback hosts
  (Docker's default insecure registries) or with ``tls_verify=False``;
* a manifest or config larger than :data:`MAX_DOCUMENT` is refused unread, and is
  checked against its digest (or the ``Docker-Content-Digest`` the registry sends);
* a GET or HEAD meeting a broken connection or a 502/503/504 is tried again, a blob
  download that breaks off resumes where it stopped, an upload is started over:
  :data:`RETRIES` times, backing off;
* every failure is a :class:`~layerstore.oci.SourceError` with one line.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import glob
import hashlib
import ipaddress
import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx

from .layerstream import ChunkReader
from .oci import RangeIgnored, SourceError, SourceOptions

MAX_DOCUMENT = 4 << 20  # manifests and configs; containerd's limit for manifests
RETRIES = 3  # a broken connection or a 502/503/504, as docker pull and push retry
DOCKER_HUB = "docker.io"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
# (host, tls_verify) -> the base URL a registry answered on in this process, so that a later session
# (a lazy mount's daemon, forked from the pull) starts without probing; a fetch that fails says so itself
_BASES: dict[tuple[str, bool], str] = {}


class Session:
    """One HTTP client for one registry: scheme, certificates and authorization."""

    def __init__(
        self, host: str, opts: SourceOptions, transport: httpx.BaseTransport | None = None, known: bool = False
    ) -> None:
        """``transport``: httpx's, to serve the session from elsewhere than the network (the tests' registry);
        ``known``: start from the base URL an earlier session of this process found, if any, unprobed."""
        self.host = host
        self.api = "registry-1.docker.io" if host == DOCKER_HUB else host
        self.opts = opts
        self.parts_refused = False  # the registry answered a request for several ranges otherwise: not asked again
        self._creds = _parse_creds(opts.creds) if opts.creds is not None else None
        self.authorization: str | None = None
        self.client = httpx.Client(
            verify=_tls_context(host, opts),
            timeout=httpx.Timeout(60.0, connect=15.0),
            follow_redirects=True,
            headers={"User-Agent": "unionmount"},
            transport=transport,
        )
        try:
            found = _BASES.get((host, opts.tls_verify)) if known else None
            self.base = found or self._probe()
            _BASES[(host, opts.tls_verify)] = self.base
        except BaseException:
            self.client.close()
            raise

    @functools.cached_property
    def creds(self) -> tuple[str, str] | None:
        """``--creds``, else the auth files' (and helpers') entry for this host: looked up only when
        the registry asks for a login, so an anonymous pull runs no credential helper."""
        return self._creds or _credentials(self.host)

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

    def document(self, path: str, what: str, expect: str | None, accept: str | None = None) -> tuple[bytes, str]:
        """A manifest or config and its digest; at most MAX_DOCUMENT bytes, checked against ``expect``
        (or the registry's digest)."""
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
        return bytes(body), digest

    def manifest(self, repo: str, ref: str, expect: str | None) -> tuple[dict, str]:  # type: ignore[type-arg]
        what = f"{repo}{'@' if ref.startswith('sha256:') else ':'}{ref}"
        body, digest = self.document(f"{repo}/manifests/{ref}", what, expect, _ACCEPT)
        try:
            doc = json.loads(body)
        except ValueError:
            raise SourceError(f"{self.host}/{what}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{self.host}/{what}: the manifest is not a JSON object")
        return doc, digest

    def blob(self, path: str, size: int | None = None) -> _Body:
        """A layer blob as a stream, resumed where a broken download stopped, never longer than ``size``
        (the manifest's word); the caller checks its digest."""
        return _Body(self, path, size)

    def blob_range(self, path: str, start: int, end: int) -> _Body:
        """Bytes [start, end) of a blob as a stream (HTTP ``Range``), resumed as :meth:`blob`'s;
        :class:`RangeIgnored` if the registry sends the whole blob instead."""
        return _Body(self, path, end - start, start)

    def blob_parts(self, path: str, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, ChunkReader]]:
        """Several [start, end) ranges of a blob in one request (``Range: bytes=a-b,c-d``, answered as
        ``multipart/byteranges``): (start, stream of exactly its bytes) for each part, in the order sent;
        a part is read before the next is asked for. :class:`PartsRefused` if the registry answers
        otherwise (the whole blob, one part only); SourceError if the answer breaks off or sends a part
        not asked for. Parts it leaves out are not an error: the caller asks for them alone."""
        what = path.replace("/blobs/", "@")
        refused = PartsRefused(f"{self.host}/{what}: the registry does not send several parts at once")
        if self.parts_refused:
            raise refused
        spec = ",".join(f"{s}-{e - 1}" for s, e in ranges)
        r = self._send("GET", self.base + path, {"Range": f"bytes={spec}"})
        ctype, _, params = r.headers.get("content-type", "").partition(";")
        boundary = ""
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.lower() == "boundary":
                boundary = v.strip('"')
        if r.status_code != 206 or ctype.strip().lower() != "multipart/byteranges" or not 0 < len(boundary) <= 70:
            r.close()
            if r.status_code not in (200, 206):
                self._check(r, what)
            self.parts_refused = True
            raise refused
        return _Parts(r, boundary.encode(), f"{self.host}/{what}", dict(ranges)).parts()

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self._send("HEAD", f"{self.base}{repo}/blobs/{digest}", {})
        self._check(r, f"{repo}@{digest}", (200, 404))
        r.close()
        return r.status_code == 200

    def mount_blob(self, repo: str, digest: str, source: str) -> bool:
        """Cross-repository mount: whether the registry now has blob ``digest`` of repository ``source``
        in ``repo`` too (201). A registry that cannot (it opened an upload instead, 202) has that upload
        cancelled; False."""
        url = httpx.URL(f"{self.base}{repo}/blobs/uploads/", params={"mount": digest, "from": source})
        r = self._send("POST", url, {"Content-Length": "0"})
        r.close()
        if r.status_code == 201:
            return True
        self._check(r, f"{repo} (a mount of {digest} from {source})", (202,))
        location = r.headers.get("location")
        if location:
            with contextlib.suppress(SourceError):
                self._send("DELETE", httpx.URL(self.base).join(location), {}).close()
        return False

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

    def __init__(self, session: Session, path: str, size: int | None = None, start: int | None = None) -> None:
        self._s = session
        self._path = path
        self._size = size
        self._start = start  # None: the whole blob; else a part of ``size`` bytes from here
        self._received = 0  # bytes of the blob (or the part) taken from the network
        self._breaks = 0
        self._open()

    def _open(self) -> None:
        what = self._path.replace("/blobs/", "@")
        at = (self._start or 0) + self._received
        if self._start is not None and self._size is not None:
            headers = {"Range": f"bytes={at}-{self._start + self._size - 1}"}
        else:
            headers = {"Range": f"bytes={at}-"} if at else {}
        r = self._s._send("GET", self._s.base + self._path, headers)
        self._skip = 0
        if (at or self._start is not None) and r.status_code == 206:
            if not r.headers.get("content-range", "").startswith(f"bytes {at}-"):
                r.close()
                how = "resumed the download at the wrong place" if self._received else "sent another part than asked"
                raise SourceError(f"{self._s.host}/{what}: the registry {how}")
        elif self._start is not None and r.status_code == 200:
            r.close()
            raise RangeIgnored(f"{self._s.host}/{what}: the registry does not send parts of blobs")
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


class PartsRefused(SourceError):
    """A registry asked for several ranges of a blob at once did not send them as parts."""


_CONTENT_RANGE = re.compile(rb"\s*bytes (\d+)-(\d+)/(\d+|\*)\s*")


class _Parts:
    """The parts of a ``multipart/byteranges`` answer (RFC 9110 14.6), read one after another from
    the response's body; each must be a range that was asked for, whole."""

    def __init__(self, r: httpx.Response, boundary: bytes, what: str, asked: dict[int, int]) -> None:
        self._r, self._what, self._asked = r, what, asked
        self._delim = b"--" + boundary
        self._chunks = r.iter_raw(1 << 20)
        self._buf, self._pos = b"", 0

    def _more(self) -> None:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise SourceError(f"{self._what}: the registry's answer ends inside its parts") from None
        except httpx.TransportError as e:
            raise SourceError(f"{self._what}: the download broke off: {_reason(e)}") from None
        self._buf, self._pos = self._buf[self._pos :] + chunk, 0

    def _line(self) -> bytes:
        while (i := self._buf.find(b"\r\n", self._pos)) < 0:
            if len(self._buf) - self._pos > 4096:
                raise self._malformed()
            self._more()
        line, self._pos = self._buf[self._pos : i], i + 2
        return line

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes of the part being read."""
        if self._pos == len(self._buf):
            self._more()
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    def _malformed(self) -> SourceError:
        return SourceError(f"{self._what}: the registry's parts are malformed")

    def parts(self) -> Iterator[tuple[int, ChunkReader]]:
        bad = self._malformed()
        try:
            for _ in range(64):  # a preamble, then the first delimiter
                if self._line() == self._delim:
                    break
            else:
                raise bad
            while True:
                start = last = -1
                for _ in range(64):  # the part's headers, up to an empty line
                    line = self._line()
                    if not line:
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-range":
                        m = _CONTENT_RANGE.fullmatch(value)
                        if m is None:
                            raise bad
                        start, last = int(m[1]), int(m[2])
                else:
                    raise bad
                if self._asked.get(start) != last + 1:
                    raise SourceError(f"{self._what}: the registry sent a part that was not asked for")
                part = _Part(self, last + 1 - start)
                yield start, part
                part.drain()  # (what the caller left of it)
                if self._line() != b"":
                    raise bad
                line = self._line()
                if line == self._delim + b"--":
                    return
                if line != self._delim:
                    raise bad
        finally:
            self._r.close()


class _Part(ChunkReader):
    """Exactly ``n`` bytes of the part :class:`_Parts` is reading."""

    def __init__(self, parts: _Parts, n: int) -> None:
        self._parts, self._left = parts, n

    def next_chunk(self) -> bytes:
        if not self._left:
            return b""
        data = self._parts.take(min(self._left, 1 << 20))
        self._left -= len(data)
        return data


class _Transient(SourceError):
    """A failure that trying again may mend: the connection broke, or a 502/503/504."""


def _backoff(attempt: int) -> float:
    return 0.5 * 2.0 ** (attempt - 1)


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


def _parse_creds(creds: str) -> tuple[str, str]:
    user, sep, password = creds.partition(":")
    if not sep or not user:
        raise SourceError("--creds is USER:PASS")
    return user, password


def _credentials(host: str) -> tuple[str, str] | None:
    """What the auth files podman and docker write hold for ``host``.

    In each file, as docker reads it: the host's credential helper (``credHelpers``), else
    the ``auths`` entry, else the default helper (``credsStore``). A helper is
    ``docker-credential-NAME get`` on ``$PATH``; one that fails or knows nothing is passed over.
    """
    home = os.path.expanduser("~")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    files = [
        os.environ.get("REGISTRY_AUTH_FILE"),
        os.path.join(runtime, "containers/auth.json") if runtime else None,
        os.path.join(home, ".config/containers/auth.json"),
        os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json"),
    ]
    keys = {host, f"https://{host}", f"http://{host}"}
    if host == DOCKER_HUB:
        keys |= {"https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"}
    server = "https://index.docker.io/v1/" if host == DOCKER_HUB else host
    for path in filter(None, files):
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        helpers = doc["credHelpers"] if isinstance(doc.get("credHelpers"), dict) else {}
        helper = next((h for k, h in helpers.items() if k in keys), None)
        if isinstance(helper, str) and (found := _from_helper(helper, server)):
            return found
        auths = doc["auths"] if isinstance(doc.get("auths"), dict) else {}
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
