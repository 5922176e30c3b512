"""Fast tier: the registry client's login, retries and resumed downloads, and registries.conf, without a network.

A registry is played by an ``httpx.MockTransport`` handler; everything above the transport
(challenges, tokens, backoff, ``Range`` resumption, digest checks) is the real client.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from layerstore import regclient, registries_conf
from layerstore.oci import RangeIgnored, SourceError, SourceOptions

BLOB = bytes(range(256)) * 4096 * 3  # 3 MiB: the client reads in 1 MiB pieces
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regclient, "_backoff", lambda attempt: 0.0)


def _session(handler: Callable[[httpx.Request], httpx.Response], creds: str | None = None) -> regclient.Session:
    return regclient.Session("reg.test", SourceOptions(creds=creds), transport=httpx.MockTransport(handler))


class _Body(httpx.SyncByteStream):
    """A body sent as a network's is: streamed (httpx reads ``content=`` bodies at once, which a real one is not)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data


def _ok(data: bytes, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, stream=_Body(data), headers=headers)


class _Breaking(httpx.SyncByteStream):
    """A body that breaks off after ``upto`` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, upto: int) -> None:
        self.data, self.upto = data, upto

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.upto]
        raise httpx.ReadError("connection reset by peer")


def test_a_bearer_challenge_is_answered_with_a_token_fetched_with_the_login() -> None:
    seen: list[tuple[str, str | None]] = []

    def registry(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.path, req.headers.get("authorization")))
        if req.url.host == "auth.test":
            assert req.url.params["scope"] == "repository:team/app:pull"
            assert req.headers["authorization"] == "Basic " + base64.b64encode(b"me:secret").decode()
            return httpx.Response(200, json={"token": "T0K"})
        if req.headers.get("authorization") != "Bearer T0K":
            challenge = 'Bearer realm="https://auth.test/token",service="reg",scope="repository:team/app:pull"'
            return httpx.Response(401, headers={"www-authenticate": challenge})
        return _ok(b'{"schemaVersion": 2}')

    s = _session(registry, creds="me:secret")
    try:
        doc, digest = s.manifest("team/app", "1", None)
    finally:
        s.close()
    assert doc == {"schemaVersion": 2}
    assert digest == "sha256:" + hashlib.sha256(b'{"schemaVersion": 2}').hexdigest()
    assert ("/v2/team/app/manifests/1", "Bearer T0K") in seen
    assert sum(1 for path, _ in seen if path == "/token") == 1  # one token serves the session


def test_a_basic_challenge_without_a_login_is_one_clear_error() -> None:
    def registry(req: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"www-authenticate": 'Basic realm="reg"'})

    s = _session(registry)
    s._creds = None
    s.__dict__["creds"] = None  # no auth files of this machine's user either
    try:
        with pytest.raises(SourceError, match="wants a login"):
            s.manifest("team/app", "1", None)
    finally:
        s.close()


def test_busy_registries_are_tried_again_a_bounded_number_of_times() -> None:
    calls = {"n": 0}

    def flaky(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        calls["n"] += 1
        return httpx.Response(503) if calls["n"] <= 2 else _ok(b"{}")

    s = _session(flaky)
    try:
        assert s.manifest("a/b", "1", None)[0] == {}
    finally:
        s.close()
    assert calls["n"] == 3

    calls["n"] = 0

    def down(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        calls["n"] += 1
        return httpx.Response(503)

    s = _session(down)
    try:
        with pytest.raises(SourceError, match="HTTP 503"):
            s.manifest("a/b", "1", None)
    finally:
        s.close()
    assert calls["n"] == regclient.RETRIES + 1


@pytest.mark.parametrize("honours_range", [True, False])
def test_a_broken_download_resumes_where_it_stopped(honours_range: bool) -> None:
    ranges: list[str | None] = []

    def registry(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        ranges.append(req.headers.get("range"))
        if len(ranges) == 1:
            return httpx.Response(200, stream=_Breaking(BLOB, 1_500_000))
        if honours_range:
            start = int(req.headers["range"].removeprefix("bytes=").rstrip("-"))
            return _ok(BLOB[start:], 206, **{"content-range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"})
        return _ok(BLOB)  # a registry that ignores Range sends it all again

    s = _session(registry)
    try:
        body = s.blob(f"a/b/blobs/{BLOB_DIGEST}", len(BLOB))
        got = body.read()
        body.close()
    finally:
        s.close()
    assert got == BLOB
    assert ranges == [None, f"bytes={1 << 20}-"]  # what it had taken: the piece it was reading is lost


def test_a_resumption_at_the_wrong_place_is_refused() -> None:
    def registry(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        if "range" not in req.headers:
            return httpx.Response(200, stream=_Breaking(BLOB, 1_500_000))
        return _ok(BLOB, 206, **{"content-range": f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}"})

    s = _session(registry)
    try:
        with pytest.raises(SourceError, match="wrong place"):
            s.blob(f"a/b/blobs/{BLOB_DIGEST}", len(BLOB)).read()
    finally:
        s.close()


def test_parts_of_blobs() -> None:
    """A part of a blob by ``Range``; a registry that sends the whole blob instead says so (RangeIgnored),
    and one that sends another part is refused."""
    honour = {"mode": "ranges"}

    def registry(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        first, last = (int(x) for x in req.headers["range"].removeprefix("bytes=").split("-"))
        if honour["mode"] == "whole":
            return _ok(BLOB)
        if honour["mode"] == "shifted":
            first, last = first + 1, last + 1
        part = BLOB[first : last + 1]
        return _ok(part, 206, **{"content-range": f"bytes {first}-{last}/{len(BLOB)}"})

    s = _session(registry)
    try:
        assert s.blob_range(f"a/b/blobs/{BLOB_DIGEST}", 1000, 5000).read() == BLOB[1000:5000]
        assert s.blob_range(f"a/b/blobs/{BLOB_DIGEST}", 0, 10).read() == BLOB[:10]
        honour["mode"] = "whole"
        with pytest.raises(RangeIgnored):
            s.blob_range(f"a/b/blobs/{BLOB_DIGEST}", 1000, 5000).read()
        honour["mode"] = "shifted"
        with pytest.raises(SourceError, match="another part"):
            s.blob_range(f"a/b/blobs/{BLOB_DIGEST}", 1000, 5000).read()
    finally:
        s.close()


class _Pieces(httpx.SyncByteStream):
    """A body that arrives in pieces of ``n`` bytes, then breaks off after ``upto`` bytes (if given)."""

    def __init__(self, data: bytes, n: int, upto: int | None = None) -> None:
        self.data, self.n, self.upto = data, n, upto

    def __iter__(self) -> Iterator[bytes]:
        end = len(self.data) if self.upto is None else self.upto
        for i in range(0, end, self.n):
            yield self.data[i : min(i + self.n, end)]
        if self.upto is not None:
            raise httpx.ReadError("connection reset by peer")


def _multipart(parts: list[tuple[int, int]], boundary: str = "B0uNd") -> bytes:
    out = b"preamble, ignored\r\n"
    for first, last in parts:
        out += f"--{boundary}\r\nContent-Type: application/octet-stream\r\n".encode()
        out += f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode() + BLOB[first : last + 1] + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("piece", [3, 4096, 1 << 20])
def test_several_parts_of_a_blob_in_one_answer(piece: int) -> None:
    """``Range: bytes=a-b,c-d`` answered as ``multipart/byteranges``: each part as sent (in any order,
    some left out), whatever pieces the network cuts the body into; a part not asked for, a malformed
    answer and one that breaks off are SourceErrors; an answer that is not parts is PartsRefused, and
    the session asks no more."""
    mode = {"how": "parts"}
    path = f"a/b/blobs/{BLOB_DIGEST}"
    asked = [(10, 20), (5000, 105_000), (2_000_000, 2_000_001)]

    def registry(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v2/":
            return httpx.Response(200)
        ranges = [tuple(int(x) for x in r.split("-")) for r in req.headers["range"].removeprefix("bytes=").split(",")]
        how = mode["how"]
        if how == "one":
            first, last = ranges[0]
            return _ok(BLOB[first : last + 1], 206, **{"content-range": f"bytes {first}-{last}/{len(BLOB)}"})
        sent = [ranges[2], ranges[0]] if how == "reordered" else [(11, 20)] if how == "other" else ranges
        body = _multipart(sent)  # type: ignore[arg-type]
        if how == "malformed":
            body = body.replace(b"Content-Range: bytes 10-19", b"Content-Range: 10-19")
        upto = len(body) // 2 if how == "broken" else None
        headers = {"content-type": 'multipart/byteranges; boundary="B0uNd"'}
        return httpx.Response(206, stream=_Pieces(body, piece, upto), headers=headers)

    def read(parts: Iterator[tuple[int, regclient.ChunkReader]], leave: bool = False) -> dict[int, bytes]:
        got = {}
        for start, stream in parts:
            got[start] = stream.read(3) if leave else stream.read()  # (a part left half read is skipped)
        return got

    s = _session(registry)
    try:
        want = {a: BLOB[a:b] for a, b in asked}
        assert read(s.blob_parts(path, asked)) == want
        assert read(s.blob_parts(path, asked), leave=True) == {a: v[:3] for a, v in want.items()}
        mode["how"] = "reordered"
        assert read(s.blob_parts(path, asked)) == {2_000_000: want[2_000_000], 10: want[10]}
        for how, needle in (("other", "not asked for"), ("malformed", "malformed"), ("broken", "broke off|ends")):
            mode["how"] = how
            with pytest.raises(SourceError, match=needle):
                read(s.blob_parts(path, asked))
        mode["how"] = "one"
        with pytest.raises(regclient.PartsRefused):
            read(s.blob_parts(path, asked))
        mode["how"] = "parts"
        with pytest.raises(regclient.PartsRefused):  # not asked again
            read(s.blob_parts(path, asked))
    finally:
        s.close()


def test_a_document_that_does_not_match_its_digest_is_refused() -> None:
    def registry(req: httpx.Request) -> httpx.Response:
        return _ok(b"{}", **{"docker-content-digest": "sha256:" + "0" * 64})

    s = _session(registry)
    try:
        with pytest.raises(SourceError, match="does not match its digest"):
            s.manifest("a/b", "1", None)
    finally:
        s.close()


def test_registries_conf_mirrors_rewrites_and_blocks(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        """
[[registry]]
prefix = "docker.io/library"
location = "docker.io/library"
[[registry.mirror]]
location = "mirror.test:5000/hub"
insecure = true
[[registry.mirror]]
location = "pinned.test/hub"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "old.test/team"
location = "new.test/people"

[[registry]]
prefix = "*.evil.test"
blocked = true
"""
    )
    entries = registries_conf.load([str(conf)])
    ep = registries_conf.endpoints
    assert [(e.host, e.repo, e.insecure) for e in ep("docker.io", "library/alpine", False, entries)] == [
        ("mirror.test:5000", "hub/alpine", True),
        ("docker.io", "library/alpine", False),
    ]
    assert [e.host for e in ep("docker.io", "library/alpine", True, entries)] == [
        "mirror.test:5000", "pinned.test", "docker.io",
    ]  # fmt: skip
    assert [(e.host, e.repo) for e in ep("old.test", "team/app", False, entries)] == [("new.test", "people/app")]
    assert [(e.host, e.repo) for e in ep("other.test", "x", False, entries)] == [("other.test", "x")]
    with pytest.raises(SourceError, match="blocked"):
        ep("a.evil.test", "x", False, entries)
    conf.write_text("[[registry]\n")
    with pytest.raises(SourceError, match=str(conf)):
        registries_conf.load([str(conf)])
