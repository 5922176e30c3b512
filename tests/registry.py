"""A real registry for tests: distribution's ``docker-registry``, filled with skopeo.

:func:`registry` serves one for the body of a ``with`` (plain HTTP, htpasswd logins,
TLS with its own CA, or token logins) and always stops it. Token logins need a
token service, which a registry deployment provides beside the registry; here it
is :class:`TokenService`, issuing RS256 JWTs (signed by ``openssl``) with an ``x5c``
chain the registry checks against its ``rootcertbundle``, as Docker Hub's does.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx

USER, PASSWORD = "alice", "s3cret"


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    data: Path  # the filesystem driver's root
    push_args: list[str] = field(default_factory=list)  # skopeo's --dest-* options for this registry
    certs: Path | None = None  # a --cert-dir holding the registry's CA
    tokens: TokenService | None = None  # the token service of a "token" registry

    def push(self, src: str, name: str, *extra: str) -> str:
        """``skopeo copy SRC docker://HOST/NAME``; returns the manifest digest."""
        digest = self.data.parent / "digest"
        cmd = [
            "skopeo",
            "copy",
            "--digestfile",
            str(digest),
            *self.push_args,
            *extra,
            src,
            f"docker://{self.host}/{name}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return digest.read_text().strip()

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob (manifests are blobs too)."""
        hexd = digest.removeprefix("sha256:")
        return self.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_ca(base: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    crt, key = base / "ca.crt", base / "ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt, "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


class TokenService:
    """Answers ``GET /token?service=&scope=`` for USER:PASSWORD with a JWT granting the scope; counts calls."""

    def __init__(self, base: Path, service: str) -> None:
        self.crt, self.key = make_ca(base)
        self.service = service
        self.calls: list[str] = []
        der = subprocess.run(["openssl", "x509", "-in", self.crt, "-outform", "DER"], check=True, capture_output=True)
        self.x5c = base64.b64encode(der.stdout).decode()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self.server.server_port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token(self, scope: str) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        access = []
        for s in filter(None, scope.split(" ")):
            kind, name, actions = s.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": "unionmount-tests", "sub": USER, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}  # fmt: skip
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key], input=signing.encode(), check=True, capture_output=True
        ).stdout
        return f"{signing}.{_b64url(sig)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                service.calls.append(auth)
                if auth != good:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": service.token(" ".join(query.get("scope", [])))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


class CuttingProxy:
    """A TCP proxy to ``target`` that breaks a connection once ``cut_after`` bytes went back to the
    client, ``cuts`` times in all (what a flaky network does to a long download); ``rate`` limits
    each connection to that many bytes a second downstream (what a CDN does per connection);
    ``latency`` delays what the client sends by that many seconds (a round trip per request);
    :attr:`down` counts the bytes that went back to clients."""

    def __init__(
        self,
        target: str,
        cut_after: int = 1 << 62,
        cuts: int = 0,
        rate: float | None = None,
        upstream: bool = False,
        latency: float = 0.0,
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cut_upstream = upstream  # count and cut what the client sends (an upload) instead
        self.rate = rate
        self.latency = latency
        self.down = 0
        self.cuts_left = cuts
        self.cut = 0
        self.active = 0
        self.max_active = 0  # the most connections open at once
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        due = time.monotonic()  # when the bytes sent so far may have gone at ``rate`` (no credit for idle time)
        try:
            while data := src.recv(65536):
                if not downstream and self.latency:
                    time.sleep(self.latency)
                if downstream and self.rate:
                    due = max(due, time.monotonic()) + len(data) / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
                if downstream != self.cut_upstream and sent + len(data) > self.cut_after:
                    with self.lock:
                        cut = self.cuts_left > 0
                        self.cuts_left -= cut
                        self.cut += cut
                    if cut:
                        dst.sendall(data[: self.cut_after - sent])
                        break
                dst.sendall(data)
                sent += len(data)
                if downstream:
                    with self.lock:
                        self.down += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if downstream:
            with self.lock:
                self.active -= 1


@contextmanager
def registry(base: Path, auth: str | None = None) -> Iterator[Registry]:
    """A registry serving from ``base/data``; ``auth`` is None, ``"htpasswd"``, ``"tls"`` or ``"token"``."""
    base.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    reg = Registry(f"127.0.0.1:{port}", base / "data", ["--dest-tls-verify=false"])
    lines = ["version: 0.1", "log:", "  level: error", "storage:", "  filesystem:", f"    rootdirectory: {reg.data}",
             "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{port}"]  # fmt: skip
    scheme = "http"
    if auth == "htpasswd":
        pw = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True).stdout
        (base / "htpasswd").write_text(pw)
        lines += ["auth:", "  htpasswd:", "    realm: tests", f"    path: {base / 'htpasswd'}"]
        reg.push_args.append(f"--dest-creds={USER}:{PASSWORD}")
    elif auth == "tls":
        crt, key = make_ca(base)
        lines += ["  tls:", f"    certificate: {crt}", f"    key: {key}"]
        reg.certs = base / "certs"
        reg.certs.mkdir()
        (reg.certs / "ca.crt").write_bytes(crt.read_bytes())
        scheme = "https"
    elif auth == "token":
        reg.tokens = t = TokenService(base, "unionmount-test-registry")
        lines += ["auth:", "  token:", f"    realm: {t.realm}", f"    service: {t.service}",
                  "    issuer: unionmount-tests", f"    rootcertbundle: {t.crt}"]  # fmt: skip
        reg.push_args.append(f"--dest-creds={USER}:{PASSWORD}")
    (base / "config.yml").write_text("\n".join(lines) + "\n")
    log = open(base / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{scheme}://{reg.host}/v2/", verify=False, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = (base / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {why}") from None
                time.sleep(0.05)
        yield reg
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        if reg.tokens is not None:
            reg.tokens.close()


def auth_file(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """An auth.json as ``podman login`` writes it."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    os.chmod(path, 0o600)
    return path


class BlobProxy:
    """An HTTP proxy in front of a plain-HTTP registry that counts what goes out: every GET's path,
    ``Range`` and body bytes (:attr:`gets`). ``ranges=False`` drops the ``Range`` header, as a
    registry (or a cache in front of one) that sends whole blobs only; ``parts=False`` keeps only the
    first range of a ``Range`` that asks for several, as one that sends one part at a time."""

    def __init__(self, target: str, ranges: bool = True, parts: bool = True) -> None:
        self.target = target
        self.ranges = ranges
        self.parts = parts
        self.gets: list[tuple[str, str | None, int]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def blob_bytes(self) -> int:
        """Bytes of layer blobs sent so far (manifests and configs are blobs too, and small)."""
        with self.lock:
            return sum(n for path, _, n in self.gets if "/blobs/" in path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method: str) -> None:
                skip = {"host", "connection"} | (set() if proxy.ranges else {"range"})
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                if not proxy.parts and "," in headers.get("Range", ""):
                    headers["Range"] = headers["Range"].split(",")[0]
                with httpx.stream(method, f"http://{proxy.target}{self.path}", headers=headers, timeout=60) as r:
                    body = r.read()
                    self.send_response(r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if method == "GET":
                        self.wfile.write(body)
                        with proxy.lock:
                            proxy.gets.append((self.path, self.headers.get("Range"), len(body)))

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._forward("HEAD")

            def log_message(self, *args: object) -> None:
                pass

        return Handler
