"""Store maintenance: statistics (``store df``), garbage collection, consistency check.

Because an import holds the lmdb write transaction from its first blob to its
commit, and ``gc`` holds it too, a gc never runs during an import: blob files
that no row names are leftovers of an import that died (kill -9), and are safe
to delete. ``gc`` drops, in order: image rows that lost their name, layers no
image uses (their entries, and one reference per blob they used), blobs left
with no reference (one commit), and then the files no row names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lmdb
import msgpack
import xxhash

from . import names
from .entry import Entry
from .schema import SEP
from .store import Store, image_key


@dataclass(slots=True, frozen=True)
class Usage:
    images: int
    layers: int
    blobs: int
    logical: int  # what the images' layers would take if each image stored its own copy
    stored: int  # bytes the blob files take on disk
    containers: int


def usage(store: Store) -> Usage:
    logical = 0
    with store.env.begin() as txn:
        images = list(txn.cursor(db=store.db["images"]))
        for _, image_id in images:
            cfg = msgpack.unpackb(txn.get(image_id, db=store.db["configs"]), raw=False)
            for d in cfg["layers"]:
                logical += msgpack.unpackb(txn.get(d.encode(), db=store.db["layers"]), raw=False)["size"]
        layers = txn.stat(store.db["layers"])["entries"]
        blobs = txn.stat(store.db["blobs"])["entries"]
        containers = txn.stat(store.db["containers"])["entries"]
    stored = 0
    for dirpath, _, files in os.walk(os.path.join(store.root, "blobs")):
        for f in files:
            stored += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return Usage(len(images), layers, blobs, logical, stored, containers)


def _blob_files(store: Store) -> dict[bytes, str]:
    out = {}
    for dirpath, _, files in os.walk(os.path.join(store.root, "blobs")):
        for f in files:
            try:
                out[bytes.fromhex(f)] = os.path.join(dirpath, f)
            except ValueError:
                out[f.encode()] = os.path.join(dirpath, f)
    return out


def gc(store: Store) -> tuple[int, int, int]:
    """Collect garbage; returns (layers dropped, blobs dropped, bytes freed).

    Two transactions, so that a file is deleted only after the commit that
    dropped its row: first the rows (images without a name or a container,
    unused layers, blobs left with no reference), then the files no row names.
    Both hold the write lock, so no import can dedup against a file about to
    vanish. A kill -9 anywhere leaves at most garbage for the next gc.
    """
    assert store.blobs is not None
    dropped_layers = dropped_blobs = freed = 0
    with store.env.begin(write=True) as txn:
        named = {bytes(v) for _, v in txn.cursor(db=store.db["images"])}
        for image_id, _ in list(txn.cursor(db=store.db["configs"])):
            if bytes(image_id) not in named and not _used_by_container(store, txn, bytes(image_id)):
                store._drop_merged(txn, bytes(image_id))
        used: set[bytes] = set()
        for _, raw in txn.cursor(db=store.db["configs"]):
            used.update(d.encode() for d in msgpack.unpackb(raw, raw=False)["layers"])
        for raw_diff, _ in list(txn.cursor(db=store.db["layers"])):
            diff = bytes(raw_diff)
            if diff in used:
                continue
            lazy: set[bytes] = set()
            for path, e in list(store.layer_entries(txn, diff)):
                if e.blob is not None:
                    store.ref_blob(txn, e.blob, e.size, -1)
                elif e.sha256 is not None and e.sha256 not in lazy:  # a lazy pull's: fetched, or still pending
                    lazy.add(e.sha256)
                    if not txn.delete(e.sha256 + diff, db=store.db["pending"]):
                        fetched = txn.get(e.sha256, db=store.db["sha256"])
                        if fetched is not None:  # (its reference was this layer's, once per content)
                            store.ref_blob(txn, bytes(fetched), e.size, -1)
                txn.delete(diff + SEP + path, db=store.db["entries"])
            txn.delete(diff, db=store.db["layers"])
            dropped_layers += 1
        for digest, raw in list(txn.cursor(db=store.db["blobs"])):
            if msgpack.unpackb(raw)[1] <= 0:
                txn.delete(bytes(digest), db=store.db["blobs"])
        if "sha256" in store.db:  # what names a blob no more: gone with it
            for sha, blob in list(txn.cursor(db=store.db["sha256"])):
                if txn.get(blob, db=store.db["blobs"]) is None:
                    txn.delete(bytes(sha), db=store.db["sha256"])
    with store.env.begin(write=True) as txn:  # the lock only: this one writes no row
        live = {bytes(k) for k, _ in txn.cursor(db=store.db["blobs"])}
        for name, file in _blob_files(store).items():
            if name not in live:
                freed += os.lstat(file).st_blocks * 512
                store.blobs.remove(name)
                dropped_blobs += 1
    return dropped_layers, dropped_blobs, freed


def _used_by_container(store: Store, txn: lmdb.Transaction, image_id: bytes) -> bool:
    return any(
        msgpack.unpackb(v, raw=False)["image"] == image_id.decode() for _, v in txn.cursor(db=store.db["containers"])
    )


def check(store: Store) -> list[str]:
    """Every inconsistency between blobs, their digests and the index, one line each.

    Garbage is not an inconsistency: blob files no row names (left by an import
    that was killed) and unreferenced rows whose file is gone (a gc that was
    killed) are for ``store gc``.
    """
    problems = []
    files = _blob_files(store)
    with store.env.begin() as txn:
        rows = {bytes(k): msgpack.unpackb(v) for k, v in txn.cursor(db=store.db["blobs"])}
        for digest, (_, refs) in rows.items():
            path = files.get(digest)
            if path is None:
                if refs > 0:
                    problems.append(f"blob {digest.hex()} is recorded but missing")
                continue
            h = xxhash.xxh3_128()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.digest() != digest:
                problems.append(f"blob {digest.hex()} does not match its digest (damaged)")
        counts: dict[bytes, int] = {}
        lazy: set[bytes] = set()  # (sha256 + layer) of lazily pulled contents counted
        for key, raw in txn.cursor(db=store.db["entries"]):
            e = Entry.unpack(raw)
            if e.blob is not None:
                counts[e.blob] = counts.get(e.blob, 0) + 1
            elif e.sha256 is not None:  # fetched (one reference for its layer) or still pending
                pair = e.sha256 + bytes(key).split(SEP, 1)[0]
                if pair not in lazy and txn.get(pair, db=store.db["pending"]) is None:
                    lazy.add(pair)
                    blob = txn.get(e.sha256, db=store.db["sha256"])
                    if blob is None:
                        problems.append(
                            f"a lazily pulled file (sha256 {e.sha256.hex()[:12]}) is neither fetched nor pending"
                        )
                    else:
                        counts[bytes(blob)] = counts.get(bytes(blob), 0) + 1
        for digest, n in counts.items():
            if digest not in rows:
                problems.append(f"layer entries use blob {digest.hex()}, which is not recorded")
            elif rows[digest][1] != n:
                problems.append(f"blob {digest.hex()} has {rows[digest][1]} references recorded, {n} in use")
        for image_id, _ in txn.cursor(db=store.db["configs"]):
            prefix = image_key(bytes(image_id))
            if txn.get(prefix + SEP, db=store.db["merged"]) is None:
                problems.append(f"image {bytes(image_id).decode()[:19]} has no merged tree")
        problems += _unusable_records(store, txn)
    return problems


def _shown(key: bytes) -> str:
    name = key.decode("utf-8", "replace")
    return name if len(name) <= 40 else f"{name[:24]}... ({len(name)} characters)"


def _unusable_records(store: Store, txn: lmdb.Transaction) -> list[str]:
    """Records no command can use: names outside the grammar, a container without its layer, dangling names."""
    out = []
    for k, v in txn.cursor(db=store.db["containers"]):
        name = bytes(k).decode("utf-8", "replace")
        if not names.is_container(name):
            out.append(f"container record '{_shown(bytes(k))}' has an invalid name (remove it: container rm)")
            continue
        if not os.path.isdir(os.path.join(store.root, "containers", name, "upper")):
            out.append(f"container '{name}' has no layer directory")
        image = msgpack.unpackb(v, raw=False).get("image", "")
        if txn.get(image.encode(), db=store.db["configs"]) is None:
            out.append(f"container '{name}' uses image {image[:19]}, which is not in the store")
    for k, v in txn.cursor(db=store.db["images"]):
        if txn.get(bytes(v), db=store.db["configs"]) is None:
            out.append(f"image name '{_shown(bytes(k))}' points to {bytes(v).decode()[:19]}, which is not in the store")
    if store.db.get("volumes") is not None:
        for k, _ in txn.cursor(db=store.db["volumes"]):
            if not names.is_volume(bytes(k).decode("utf-8", "replace")):
                out.append(f"volume record '{_shown(bytes(k))}' has an invalid name")
    return out
