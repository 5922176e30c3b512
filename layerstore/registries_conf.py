"""Where to pull an image from: podman's ``registries.conf`` (mirrors, insecure and blocked registries).

Reads ``$CONTAINERS_REGISTRIES_CONF``, else ``~/.config/containers/registries.conf``
if it exists, else ``/etc/containers/registries.conf`` and the drop-ins in
``/etc/containers/registries.conf.d/*.conf`` (later files override a ``prefix``
given earlier), as containers-registries.conf(5) describes:

* ``[[registry]]`` tables (version 2): ``prefix`` (default: ``location``; ``*.`` for
  subdomains), ``location``, ``insecure``, ``blocked``, ``mirror-by-digest-only``
  and ``[[registry.mirror]]`` tables (``location``, ``insecure``, ``pull-from-mirror``);
* version 1 lists ``[registries.insecure] registries`` and ``[registries.block] registries``.

The reference's longest matching ``prefix`` decides. :func:`endpoints` lists where to
try, mirrors first; short names keep Docker's meaning (``docker.io``), and
``unqualified-search-registries`` and aliases are not used.
"""

from __future__ import annotations

import glob
import os
import tomllib
from dataclasses import dataclass, field

from .oci import SourceError


@dataclass(slots=True, frozen=True)
class Endpoint:
    """One place to ask: a registry host, the repository there, and whether plain HTTP/bad TLS is allowed."""

    host: str
    repo: str
    insecure: bool = False


@dataclass(slots=True)
class _Entry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    digest_only: bool = False
    mirrors: list[tuple[str, bool, str]] = field(default_factory=list)  # (location, insecure, pull-from-mirror)


def config_files() -> list[str]:
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return [env]
    user = os.path.expanduser("~/.config/containers/registries.conf")
    if os.geteuid() != 0 and os.path.exists(user):
        return [user]
    return ["/etc/containers/registries.conf", *sorted(glob.glob("/etc/containers/registries.conf.d/*.conf"))]


def load(files: list[str] | None = None) -> dict[str, _Entry]:
    """The entries by prefix; a file that does not parse is an error naming it."""
    entries: dict[str, _Entry] = {}
    for path in config_files() if files is None else files:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SourceError(f"cannot read {path}: {e}") from None
        try:
            for t in doc.get("registry", []):
                location = str(t.get("location", ""))
                prefix = str(t.get("prefix") or location)
                if not prefix:
                    continue
                mirrors = [
                    (str(m["location"]), bool(m.get("insecure", False)), str(m.get("pull-from-mirror", "all")))
                    for m in t.get("mirror", [])
                ]
                entries[prefix] = _Entry(prefix, location or prefix, bool(t.get("insecure", False)),
                                         bool(t.get("blocked", False)), bool(t.get("mirror-by-digest-only", False)),
                                         mirrors)  # fmt: skip
            v1 = doc.get("registries", {})
            for kind in ("insecure", "block"):
                for host in v1.get(kind, {}).get("registries", []):
                    old = entries.setdefault(str(host), _Entry(str(host), str(host)))
                    old.insecure |= kind == "insecure"
                    old.blocked |= kind == "block"
        except (AttributeError, KeyError, TypeError) as e:
            raise SourceError(f"{path}: malformed registry table ({e})") from None
    return entries


def _matches(prefix: str, name: str) -> bool:
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        return host.endswith(prefix[1:])
    return name == prefix or name.startswith(prefix + "/")


def endpoints(host: str, repo: str, by_digest: bool, entries: dict[str, _Entry] | None = None) -> list[Endpoint]:
    """Where to pull ``host/repo`` from, in order: the mirrors that apply, then the registry itself."""
    entries = load() if entries is None else entries
    name = f"{host}/{repo}"
    matching = [e for e in entries.values() if _matches(e.prefix, name)]
    if not matching:
        return [Endpoint(host, repo)]
    e = max(matching, key=lambda e: len(e.prefix))
    if e.blocked:
        raise SourceError(f"{name} is blocked by registries.conf (prefix {e.prefix})")

    def rewrite(location: str) -> Endpoint:
        if e.prefix.startswith("*."):
            return Endpoint(host, repo)
        rest = name[len(e.prefix) :].lstrip("/")
        where = f"{location}/{rest}" if rest else location
        new_host, _, new_repo = where.partition("/")
        return Endpoint(new_host, new_repo or repo)

    out = []
    for location, insecure, when in e.mirrors:
        if (e.digest_only or when == "digest-only") and not by_digest:
            continue
        if when == "tag-only" and by_digest:
            continue
        m = rewrite(location)
        out.append(Endpoint(m.host, m.repo, insecure))
    primary = rewrite(e.location)
    return [*out, Endpoint(primary.host, primary.repo, e.insecure)]
