"""The bodies of the container commands: ls, inspect, rm, prune, diff, commit, export.

Every one reads the container through a :class:`~unionfs.union.view.View` of its
layer over its image, so it works whether the container is mounted or not,
and sees exactly what a mount shows. Every failure is one line
(:class:`~unionfs.daemon.config.UsageError`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from layerstore import tarwrite
from layerstore.host import syncfs
from layerstore.save import replacing
from layerstore.store import Store, StoreError, normalize_name, valid_name
from unionfs.daemon.config import UsageError
from unionfs.daemon.store import open_store
from unionfs.fuse import control
from unionfs.union.changes import Change, changes
from unionfs.union.markers import WriteDialect
from unionfs.union.settle import recover_dirs
from unionfs.union.storelayer import StoreLayer
from unionfs.union.view import Item, View

from .images import human


@contextmanager
def container_view(store: Store, name: str) -> Iterator[tuple[View, StoreLayer, bytes]]:
    """(view of the container, its image as a layer, image id).

    A mounted container's mount is synced first: writes the kernel still caches
    (the writeback cache) reach the container layer before the view reads it. An
    unmounted one's copy-ups left unsettled by a crash are checked first
    (:func:`unionfs.union.settle.recover`), as its next mount would.
    """
    rec = store.container_record(name)
    where = store.mounted_at(name)
    upper, work = store.container_paths(name)
    if where is not None:
        try:
            syncfs(where)
            _flush_open_files(where, upper)
        except OSError as e:
            print(f"unionmount: warning: cannot sync {where}: {e.strerror}", file=sys.stderr)
    dialect = WriteDialect.probe(work)
    if where is None:  # left by a crash: copy-ups whose data may not have reached the disk
        try:
            recover_dirs(upper, work, dialect.unsettled)
        except OSError as e:
            print(f"unionmount: warning: cannot check unsettled copy-ups: {e.strerror}", file=sys.stderr)
    image_id = rec["image"].encode()
    with View(upper, [], (store, image_id), dialect, work) as view:
        image = view.lowers[-1]
        assert isinstance(image, StoreLayer)
        yield view, image, image_id


def _flush_open_files(where: str, upper: str) -> None:
    """fsync, through the mount, each container-layer file its daemon has open.

    With the writeback cache the kernel may hold writes to a file until it is closed,
    and ``syncfs`` of a FUSE mount does not wait for the daemon to have them (the kernel
    asks FUSE servers for SYNCFS only on block-device mounts). fsync does wait, for the
    one file: the files still open are the only ones that can hold such writes (closing
    one flushes it), and the daemon has each of them open in the upper directory.
    """
    top = os.path.realpath(upper) + "/"
    try:
        pids = [control.daemon_pid(where)]  # the daemon that serves this mount, asked through it
    except control.NotServed:
        pids = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith(top) or target.endswith(" (deleted)"):
                continue
            try:
                f = os.open(os.path.join(where, target[len(top) :]), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # renamed or removed meanwhile, or not a file: nothing of it to flush
            try:
                if stat.S_ISREG(os.fstat(f).st_mode):
                    os.fsync(f)
            finally:
                os.close(f)


def _image_names(store: Store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in store.images():
        out.setdefault(i.image_id, []).append(i.name)
    return out


def _layer_size(upper: str) -> int:
    total = 0
    for dirpath, dirnames, files in os.walk(upper):
        for n in dirnames + files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def _describe(store: Store, name: str, rec: dict, names: dict[str, list[str]]) -> dict:  # type: ignore[type-arg]
    upper, work = store.container_paths(name)
    return {
        "Name": name,
        "Image": (names.get(rec["image"]) or [rec["image"][7:19]])[0],
        "ImageId": rec["image"],
        "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["created"])),
        "MountedAt": store.mounted_at(name),
        "Size": _layer_size(upper),
        "UpperDir": upper,
        "WorkDir": work,
    }


def container_ls(root: str | None, fmt: str) -> int:
    with open_store(root, create=True) as store:
        names = _image_names(store)
        rows = [_describe(store, n, rec, names) for n, rec in store.containers()]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<20} {'IMAGE':<30} {'CREATED':<20} {'SIZE':>9}  MOUNTED AT")
    for r in rows:
        print(f"{r['Name']:<20} {r['Image']:<30} {r['Created']:<20} {human(r['Size']):>9}  {r['MountedAt'] or '-'}")
    return 0


def container_inspect(root: str | None, name: str) -> int:
    with open_store(root) as store:
        print(json.dumps(_describe(store, name, store.container_record(name), _image_names(store)), indent=2))
    return 0


def container_rm(root: str | None, names: list[str], force: bool) -> int:
    with open_store(root) as store:
        for name in names:
            store.container_record(name)
            where = store.mounted_at(name)
            if where is not None:
                if not force:
                    raise UsageError(f"container '{name}' is mounted at {where} (unmount it, or use -f)")
                _unmount(store, name, where)
            store.remove_container(name)
            print(name)
    return 0


def _unmount(store: Store, name: str, where: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
    r = subprocess.run([tool, "-u", where] if "fuser" in tool else [tool, where], capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"cannot unmount container '{name}' at {where}: {r.stderr.strip() or 'failed'}")
    deadline = time.monotonic() + 30
    while store.mounted_at(name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon exits and releases the container's lock


def container_prune(root: str | None) -> int:
    with open_store(root) as store:
        for name, _ in store.containers():
            if store.mounted_at(name) is None:
                store.remove_container(name)
                print(name)
    return 0


def diff(root: str | None, name: str) -> int:
    with open_store(root) as store, container_view(store, name) as (view, image, _):
        for c in changes(view, image):
            print(c)
    return 0


# -- tars --------------------------------------------------------------------------------


class _TarOut:
    """Adds view items to a tar, turning the second name of a hard-link group into a link."""

    def __init__(self, view: View, tar: tarfile.TarFile) -> None:
        self.view = view
        self.tar = tar
        self.first: dict[int, bytes] = {}

    def add(self, item: Item) -> None:
        st = item.st
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self.first.get(item.node.ino)
            if first is not None:
                self.tar.addfile(tarwrite.hardlink(item.path, first, st.st_mtime_ns))
                return
            self.first[item.node.ino] = item.path
        target = self.view.readlink(item) if stat.S_ISLNK(st.st_mode) else None
        t = tarwrite.info(
            item.path, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, st.st_rdev, target,
            self.view.xattrs(item),
        )  # fmt: skip
        if t.type != tarfile.REGTYPE:
            self.tar.addfile(t)
            return
        with os.fdopen(self.view.open(item), "rb") as f:
            self.tar.addfile(t, f)


def write_layer(view: View, found: list[Change], out: BinaryIO) -> None:
    """The changes as an OCI layer tar: entries, ``.wh.`` whiteouts, ``.wh..wh..opq`` for opaque dirs."""
    with tarwrite.writer(out) as tar:
        w = _TarOut(view, tar)
        whole: list[bytes] = []  # opaque directories written with everything below them
        for c in found:
            if any(c.path.startswith(p + b"/") for p in whole):
                continue
            if c.kind == "D":
                tar.addfile(tarwrite.whiteout(c.path))
                continue
            item = view.lookup(c.path)
            if item is None:
                continue  # gone since the diff (the container is mounted and in use)
            w.add(item)
            if c.opaque and item.is_dir:
                tar.addfile(tarwrite.opaque(item.path))
                for sub in view.walk(item):
                    w.add(sub)
                whole.append(item.path)


def commit(root: str | None, name: str, tag: str, message: str | None, author: str | None) -> int:
    start = time.monotonic()
    try:
        valid_name(tag)  # before the layer is written
    except StoreError as e:
        raise UsageError(str(e)) from None
    with open_store(root) as store:
        tmp = os.path.join(store.root, "tmp", f"{os.getpid()}.commit.tar")
        try:
            with container_view(store, name) as (view, image, image_id):
                found = changes(view, image)
                with open(tmp, "wb") as out:
                    write_layer(view, found, out)
            new_id = store.commit(image_id, tmp, tag, message, author)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    took = time.monotonic() - start
    print(f"{normalize_name(tag)} {new_id[7:19]} ({len(found)} changes, {took:.1f}s)")
    return 0


def export(root: str | None, name: str, dest: str) -> int:
    with open_store(root) as store, container_view(store, name) as (view, _, _):
        if dest == "-":
            _export(view, sys.stdout.buffer)
            return 0
        with replacing(dest) as out:
            _export(view, out)
    return 0


def _export(view: View, out: BinaryIO) -> None:
    """The merged tree as one flat tar (``docker export``): no markers, hard links kept."""
    with tarwrite.writer(out) as tar:
        w = _TarOut(view, tar)
        for item in view.walk():
            w.add(item)
