"""Named and anonymous volumes, laid out as Docker lays them out (``volumes/NAME/_data``).

A volume is a directory that outlives containers. Its record (sub-database
``volumes``, see :mod:`layerstore.schema`) holds its driver, options, labels,
creation time, whether it is anonymous, and whether it was ever filled from
an image (Docker fills a new, empty volume once, with what the image has at the
mount path). The ``local`` driver's bind options (``type=none,o=bind,device=DIR``)
point a volume at an existing directory instead of ``_data``.

Which containers use a volume is read from the containers' records (their
``mounts``), so it cannot go stale: ``remove`` is refused while any container
records it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field

import msgpack

from .store import Store, StoreError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BIND_KEYS = {"type", "o", "device"}


@dataclass(slots=True)
class Volume:
    name: str
    driver: str = "local"
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    anonymous: bool = False
    populated: bool = False
    mountpoint: str = ""

    def record(self) -> bytes:
        return msgpack.packb(
            {
                "driver": self.driver,
                "options": self.options,
                "labels": self.labels,
                "created": self.created,
                "anonymous": self.anonymous,
                "populated": self.populated,
            }
        )


def _db(store: Store):  # noqa: ANN202
    db = store.db.get("volumes")
    if db is None:
        raise StoreError("this store has no volume table (open it writable once: any image or volume command)")
    return db


def mountpoint(store: Store, name: str, options: dict[str, str]) -> str:
    if options.get("o") == "bind" or options.get("type") == "none":
        return options.get("device", "")
    return os.path.join(store.root, "volumes", name, "_data")


def _from_record(store: Store, name: str, raw: bytes) -> Volume:
    r = msgpack.unpackb(raw, raw=False)
    v = Volume(name, r["driver"], r["options"], r["labels"], r["created"], r["anonymous"], r["populated"])
    v.mountpoint = mountpoint(store, name, v.options)
    return v


def get(store: Store, name: str) -> Volume:
    with store.env.begin() as txn:
        raw = txn.get(name.encode(), db=_db(store))
    if raw is None:
        raise StoreError(f"no volume '{name}' (see 'unionmount volume ls')")
    return _from_record(store, name, raw)


def all_volumes(store: Store) -> list[Volume]:
    with store.env.begin() as txn:
        return [_from_record(store, bytes(k).decode(), v) for k, v in txn.cursor(db=_db(store))]


def create(
    store: Store,
    name: str | None,
    driver: str = "local",
    options: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    *,
    anonymous: bool = False,
    exist_ok: bool = False,
) -> tuple[Volume, bool]:
    """Create a volume (a random 64-hex name when ``name`` is None); returns (volume, newly created)."""
    if driver != "local":
        raise StoreError(f"volume driver '{driver}' is not supported (only 'local')")
    options = dict(options or {})
    unknown = set(options) - _BIND_KEYS
    if unknown:
        raise StoreError(f"unknown volume option '{sorted(unknown)[0]}' (the local driver takes type, o, device)")
    if options:
        if options.get("o") != "bind" or options.get("type", "none") != "none" or not options.get("device"):
            raise StoreError("the local driver binds a directory with -o type=none -o o=bind -o device=/path")
        dev = options["device"]
        if not os.path.isabs(dev) or not os.path.isdir(dev):
            raise StoreError(f"volume device '{dev}' is not an existing absolute directory")
        options["device"] = os.path.realpath(dev)
    name = name or secrets.token_hex(32)
    if not NAME_RE.match(name):
        raise StoreError(f"invalid volume name '{name}' (letters, digits, '_', '.', '-'; not first '.', '_', '-')")
    vol = Volume(name, driver, options, dict(labels or {}), time.time(), anonymous)
    vol.mountpoint = mountpoint(store, name, options)
    with store.env.begin(write=True) as txn:
        raw = txn.get(name.encode(), db=_db(store))
        if raw is not None:
            if exist_ok:
                return _from_record(store, name, raw), False
            raise StoreError(f"volume '{name}' already exists")
        if not options:
            os.makedirs(os.path.join(store.root, "volumes"), mode=0o701, exist_ok=True)
            os.makedirs(os.path.join(store.root, "volumes", name), mode=0o701, exist_ok=True)
            os.makedirs(vol.mountpoint, mode=0o755, exist_ok=True)
        txn.put(name.encode(), vol.record(), db=_db(store))
    return vol, True


def mark_populated(store: Store, name: str) -> None:
    with store.env.begin(write=True) as txn:
        raw = txn.get(name.encode(), db=_db(store))
        if raw is not None:
            v = _from_record(store, name, raw)
            v.populated = True
            txn.put(name.encode(), v.record(), db=_db(store))


def users(store: Store, name: str) -> list[str]:
    """The containers whose recorded mounts use volume ``name``."""
    return sorted(c for c, rec in store.containers() if any(m.get("Name") == name for m in rec.get("mounts", [])))


def remove(store: Store, name: str, *, force: bool = False) -> None:
    vol = get(store, name)
    used = users(store, name)
    if used and not force:
        raise StoreError(f"volume '{name}' is in use by container(s) {', '.join(used)}")
    with store.env.begin(write=True) as txn:
        txn.delete(name.encode(), db=_db(store))
    if not vol.options:
        shutil.rmtree(os.path.join(store.root, "volumes", name), ignore_errors=True)


def prune(store: Store, *, everything: bool = False) -> list[str]:
    """Remove unused volumes: anonymous ones, or all with ``everything`` (Docker's ``--all``)."""
    gone = []
    for v in all_volumes(store):
        if (v.anonymous or everything) and not users(store, v.name):
            remove(store, v.name)
            gone.append(v.name)
    return gone
