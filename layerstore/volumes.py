"""Named and anonymous volumes, laid out as Docker lays them out (``volumes/NAME/_data``).

A volume is a directory that outlives containers. Its record (sub-database
``volumes``, see :mod:`layerstore.schema`) holds its driver, options, labels,
creation time, whether it is anonymous, and whether it was ever filled from
an image (Docker fills a new, empty volume once, with what the image has at the
mount path). The ``local`` driver's bind options (``type=none,o=bind,device=DIR``)
point a volume at an existing directory instead of ``_data``.

Who uses a volume is known two ways, neither of which can go stale:

* the containers whose records (their ``mounts``) name it;
* the live mounts that graft it, container or not: each holds a *lease*, a file
  ``volumes/NAME/users/ID`` (its mount point and container) that its daemon keeps
  ``flock``ed for its whole life. The kernel drops the lock when the daemon dies,
  however it dies, so a lease whose lock is free is stale and is removed by the
  next look.

``remove`` and ``prune`` refuse a volume any live mount uses (``force`` overrides
container records only), and take a lease or check for leases inside an lmdb write
transaction, which serializes them against each other across processes: a volume
is never removed under a mount that is starting.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import names, plugins, volmount
from .store import Store, StoreError

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
        return msgpack.packb(  # type: ignore[no-any-return]
            {
                "driver": self.driver,
                "options": self.options,
                "labels": self.labels,
                "created": self.created,
                "anonymous": self.anonymous,
                "populated": self.populated,
            }
        )


def _db(store: Store) -> Any:
    db = store.db.get("volumes")
    if db is None:
        raise StoreError("this store has no volume table (open it writable once: any image or volume command)")
    return db


def is_bind(options: dict[str, str]) -> bool:
    """The local driver's bind form (``type=none,o=bind,device=DIR``); other options name a file system to mount."""
    return options.get("o") == "bind" or options.get("type") == "none"


def mountpoint(store: Store, name: str, options: dict[str, str], driver: str = "local") -> str:
    """Where the volume's files are on this host (a plugin's volume: known only once mounted, "")."""
    if driver != "local":
        return ""
    if is_bind(options):
        return options.get("device", "")
    return os.path.join(store.root, "volumes", name, "_data")


def _from_record(store: Store, name: str, raw: bytes) -> Volume:
    r = msgpack.unpackb(raw, raw=False)
    v = Volume(name, r["driver"], r["options"], r["labels"], r["created"], r["anonymous"], r["populated"])
    v.mountpoint = mountpoint(store, name, v.options, v.driver)
    return v


def get(store: Store, name: str) -> Volume:
    with store.env.begin() as txn:
        raw = txn.get(name.encode(), db=_db(store)) if names.is_volume(name) else None
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
    """Create a volume (a random 64-hex name when ``name`` is None); returns (volume, newly created).

    Another ``driver`` than ``local`` is a volume plugin (:mod:`.plugins`): the plugin creates the volume
    (or already has it: another host made it), and the store records it with its driver and options.
    """
    name = name or secrets.token_hex(32)
    try:
        names.volume(name)
    except names.InvalidName as e:
        raise StoreError(str(e)) from None
    if driver != "local":
        return _create_with_plugin(store, name, driver, dict(options or {}), dict(labels or {}), anonymous, exist_ok)
    options = dict(options or {})
    unknown = set(options) - _BIND_KEYS
    if unknown:
        raise StoreError(f"unknown volume option '{sorted(unknown)[0]}' (the local driver takes type, o, device)")
    if is_bind(options):
        if options.get("o") != "bind" or options.get("type", "none") != "none" or not options.get("device"):
            raise StoreError("the local driver binds a directory with -o type=none -o o=bind -o device=/path")
        dev = options["device"]
        if not os.path.isabs(dev) or not os.path.isdir(dev):
            raise StoreError(f"volume device '{dev}' is not an existing absolute directory")
        options["device"] = os.path.realpath(dev)
    elif options:
        try:
            volmount.check(options)
        except volmount.MountError as e:
            raise StoreError(str(e)) from None
    vol = Volume(name, driver, options, dict(labels or {}), time.time(), anonymous)
    vol.mountpoint = mountpoint(store, name, options)
    with store.env.begin(write=True) as txn:
        raw = txn.get(name.encode(), db=_db(store))
        if raw is not None:
            if exist_ok:
                return _from_record(store, name, raw), False
            raise StoreError(f"volume '{name}' already exists")
        if not is_bind(options):
            os.makedirs(os.path.join(store.root, "volumes"), mode=0o701, exist_ok=True)
            os.makedirs(os.path.join(store.root, "volumes", name), mode=0o701, exist_ok=True)
            os.makedirs(vol.mountpoint, mode=0o755, exist_ok=True)
        txn.put(name.encode(), vol.record(), db=_db(store))
    return vol, True


def _create_with_plugin(
    store: Store,
    name: str,
    driver: str,
    options: dict[str, str],
    labels: dict[str, str],
    anonymous: bool,
    exist_ok: bool,
) -> tuple[Volume, bool]:
    with store.env.begin() as txn:
        raw = txn.get(name.encode(), db=_db(store))
    if raw is not None:
        old = _from_record(store, name, raw)
        if not exist_ok:
            raise StoreError(f"volume '{name}' already exists")
        if old.driver != driver:
            raise StoreError(f"volume '{name}' already exists with driver '{old.driver}'")
        return old, False
    with plugin(driver) as p:
        if p.get(name) is None:
            p.create(name, options)
    vol = Volume(name, driver, options, labels, time.time(), anonymous)
    with store.env.begin(write=True) as txn:
        if txn.get(name.encode(), db=_db(store)) is None:
            txn.put(name.encode(), vol.record(), db=_db(store))
    return vol, True


@contextmanager
def plugin(driver: str) -> Iterator[plugins.Plugin]:
    """The volume plugin ``driver`` for the ``with`` block; its failures are :class:`StoreError` lines."""
    try:
        with plugins.Plugin.open(driver) as p:
            yield p
    except plugins.PluginError as e:
        raise StoreError(str(e)) from None


def mark_populated(store: Store, name: str) -> None:
    with store.env.begin(write=True) as txn:
        raw = txn.get(name.encode(), db=_db(store))
        if raw is not None:
            v = _from_record(store, name, raw)
            v.populated = True
            txn.put(name.encode(), v.record(), db=_db(store))


def _users_dir(root: str, name: str) -> str:
    return os.path.join(root, "volumes", name, "users")


def lease(store: Store, name: str, mountpoint: str, container: str | None, driver: str = "local") -> tuple[int, str]:
    """Record that the mount at ``mountpoint`` uses volume ``name``; returns (the fd that holds the lease, its id).

    The caller keeps the fd open for the mount's life (the daemon inherits it); the
    lease ends when the last copy of the fd is closed. The id is unique: a plugin is
    told it as the ID of this use of the volume (``Mount``/``Unmount``). Fails if the
    volume was removed meanwhile.
    """
    with store.env.begin(write=True) as txn:  # serialized with remove()
        if txn.get(name.encode(), db=_db(store)) is None:
            raise StoreError(f"volume '{name}' was removed meanwhile")
        d = _users_dir(store.root, name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        ident = f"{os.getpid()}.{secrets.token_hex(8)}"
        path = os.path.join(d, ident)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            record = {"mountpoint": mountpoint, "container": container, "driver": driver, "id": ident}
            os.write(fd, json.dumps(record).encode())
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
    return fd, ident


def live_users(store: Store | str, name: str) -> list[dict[str, str | None]]:
    """The live mounts that use volume ``name``: ``{"mountpoint", "container"}`` each; stale leases are removed.

    ``store``: the store, or its root (a daemon at its exit has no lmdb to spare)."""
    d = _users_dir(store if isinstance(store, str) else store.root, name)
    try:
        ids = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out = []
    for i in ids:
        try:
            fd = os.open(os.path.join(d, i), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its daemon lives
                try:
                    out.append(json.loads(os.read(fd, 1 << 16)))
                except ValueError:
                    out.append({"mountpoint": "?", "container": None})
                continue
            _end_stale(name, fd)
            os.unlink(os.path.join(d, i))  # its daemon is gone
        finally:
            os.close(fd)
    return out


def release(root: str, name: str) -> None:
    """Unmount the volume's file system (local driver, ``-o type/device``) if no live mount uses it any more.

    Call after closing one's lease. Serialized with :func:`layerstore.volmount.acquire`.
    """
    path = volmount.data_dir(root, name)
    if not os.path.isdir(os.path.dirname(path)):
        return
    with volmount.locked(root, name):
        if not live_users(root, name):
            volmount.unmount(path)


def _end_stale(name: str, fd: int) -> None:
    """A dead daemon's lease: a plugin it mounted the volume from is told the volume is unmounted (best effort)."""
    try:
        record = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or record.get("driver", "local") == "local" or not record.get("id"):
        return
    try:
        with plugin(str(record["driver"])) as p:
            p.unmount(name, str(record["id"]))
    except StoreError:
        pass  # gone, or it forgot already: nothing of ours is left there


def _recorded(store: Store, name: str) -> list[str]:
    """The containers whose recorded mounts (of their last mount) name volume ``name``."""
    return [c for c, rec in store.containers() if any(m.get("Name") == name for m in rec.get("mounts", []))]


def users(store: Store, name: str) -> list[str]:
    """Who uses volume ``name``: the containers that record it, and the mount points of live non-container mounts."""
    containers = set(_recorded(store, name))
    places = set()
    for u in live_users(store, name):
        if u.get("container"):
            containers.add(str(u["container"]))
        else:
            places.add(str(u.get("mountpoint")))
    return sorted(containers) + sorted(places)


def _in_use(name: str, recorded: list[str], live: list[dict[str, str | None]]) -> str:
    containers = sorted(set(recorded) | {str(u["container"]) for u in live if u.get("container")})
    mounts = sorted({str(u.get("mountpoint")) for u in live if not u.get("container")})
    parts = ([f"container(s) {', '.join(containers)}"] if containers else []) + (
        [f"the mount(s) at {', '.join(mounts)}"] if mounts else []
    )
    return f"volume '{name}' is in use by {' and '.join(parts)}"


def remove(store: Store, name: str, *, force: bool = False) -> None:
    """Remove a volume and its data: refused while a live mount uses it or a container records it (unless force)."""
    vol = get(store, name)
    recorded = _recorded(store, name)
    base = os.path.join(store.root, "volumes", name)
    with store.env.begin(write=True) as txn:  # no lease can be taken meanwhile
        live = live_users(store, name)
        if live or (recorded and not force):
            raise StoreError(_in_use(name, recorded, live))
        if mounts(vol):
            release(store.root, name)  # nobody uses it: a mount left by a dead daemon goes
            if os.path.ismount(vol.mountpoint):
                raise StoreError(f"volume '{name}' is still mounted at {vol.mountpoint} and cannot be unmounted")
        if vol.driver != "local":
            with plugin(vol.driver) as p:
                if p.get(name) is not None:
                    p.remove(name)
        txn.delete(name.encode(), db=_db(store))
        trash = None
        if os.path.isdir(base):  # out of the way before another mount may create the name again
            trash = os.path.join(store.root, "volumes", f".removed.{secrets.token_hex(8)}")
            os.rename(base, trash)
    if trash is not None:  # for a bind (options) only our bookkeeping: the device is the user's
        shutil.rmtree(trash, ignore_errors=True)


def mounts(vol: Volume) -> bool:
    """Whether the volume is a file system the local driver mounts (not a directory, not a bind, not a plugin's)."""
    return vol.driver == "local" and bool(vol.options) and not is_bind(vol.options)


def acquire(store: Store, vol: Volume) -> bool:
    """Mount the volume's file system if it is one and nobody has yet (call holding a lease; see :mod:`.volmount`)."""
    if not mounts(vol):
        return False
    try:
        return volmount.acquire(store.root, vol.name, vol.options)
    except volmount.MountError as e:
        raise StoreError(str(e)) from None


def _scope(vol: Volume) -> str:
    try:
        with plugin(vol.driver) as p:
            return p.scope()
    except StoreError:
        return "local"


def sweep(store: Store) -> None:
    """Unmount the file systems of volumes that dead daemons left mounted and nobody uses."""
    for v in all_volumes(store):
        if mounts(v) and volmount.mounted(volmount.data_dir(store.root, v.name)):
            release(store.root, v.name)


def prune(store: Store, *, everything: bool = False) -> list[str]:
    """Remove unused volumes: anonymous ones, or all with ``everything`` (Docker's ``--all``); live ones stay."""
    gone = []
    scopes: dict[str, str] = {}
    for v in all_volumes(store):
        if v.driver != "local" and v.driver not in scopes:
            scopes[v.driver] = _scope(v)
        if v.driver != "local" and scopes[v.driver] == "global":
            continue  # shared with other hosts: not this host's to remove (as in Docker)
        if (v.anonymous or everything) and not users(store, v.name):
            try:
                remove(store, v.name)
            except StoreError:
                continue  # taken by a mount that started meanwhile
            gone.append(v.name)
    return gone
