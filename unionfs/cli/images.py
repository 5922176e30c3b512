"""The bodies of the store commands (``image ...``, ``mount --image``); cli.py only parses.

Every store failure becomes a :class:`~unionfs.daemon.config.UsageError` with one line.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from layerstore import maintenance
from layerstore.blobs import CollisionError
from layerstore.lazy import Lazy, still_to_fetch
from layerstore.oci import SourceError, SourceOptions
from layerstore.store import Store, StoreError, normalize_name, valid_name
from layerstore.tarlayer import LayerError
from unionfs.daemon.config import MountConfig, UsageError
from unionfs.daemon.store import open_store


def _check_tag(tag: str | None) -> None:
    """A name given for an image is checked before anything is read or written."""
    if tag is not None:
        try:
            valid_name(tag)
        except StoreError as e:
            raise UsageError(str(e)) from None


def image_import(root: str | None, source: str, tag: str | None, lazy: bool = False, **options: Any) -> int:
    """``options``: those of :func:`_source_options`. Without ``lazy``, what an earlier lazy pull of the
    image left to fetch is fetched too."""
    _check_tag(tag)
    opts = _source_options(**options)

    def run(store: Store, progress: Any) -> tuple[str, str]:
        name, image_id = store.import_image(source, tag, progress, opts, lazy)
        if not lazy:
            _complete(store, image_id.encode(), opts)
        return name, image_id

    return _importing(root, run)


def _complete(store: Store, image_id: bytes, opts: SourceOptions) -> None:
    """Fetch every file of the image an earlier lazy pull left to come."""
    layers = store.config(image_id)["layers"]
    if Lazy.pending_in(store, layers):
        lazy = Lazy(store, opts)
        try:
            _fetch_rest(lazy, layers)
        finally:
            lazy.close()


def _fetch_rest(lazy: Lazy, layers: list[str]) -> None:
    """Fetch what a lazy pull left of ``layers``; one line if it cannot."""
    try:
        lazy.complete(k.encode() for k in layers)
    except OSError as e:
        raise UsageError(str(e.strerror or e)) from None


def image_import_rootfs(
    root: str | None, path: str, tag: str | None, changes: list[str], message: str | None, platform: str | None
) -> int:
    """``docker import``: a flat root filesystem tarball (``-``: stdin) as a one-layer image."""
    _check_tag(tag)
    _source_options(platform)
    return _importing(
        root, lambda store, progress: store.import_rootfs(path, tag, changes, message, platform, progress)
    )


def _importing(root: str | None, run: Callable[[Store, Any], tuple[str, str]]) -> int:
    """Run one import with a progress bar on a terminal; print the image's name, id and the time taken."""
    start = time.monotonic()
    with open_store(root, create=True) as store, _progress() as progress:
        name, image_id = run(store, progress)
    print(f"{name} {image_id[7:19]} ({time.monotonic() - start:.1f}s)")
    return 0


def _source_options(
    platform: str | None = None, creds: str | None = None, tls_verify: bool = True, cert_dir: str | None = None
) -> SourceOptions:
    """The options as given, checked; a password left out of ``--creds USER`` is asked for on a terminal."""
    if platform is not None and not re.match(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$", platform):
        raise UsageError(f"--platform '{platform}' is not OS/ARCH[/VARIANT] (e.g. linux/arm64/v8)")
    if creds is not None and ":" not in creds:
        if not sys.stdin.isatty():
            raise UsageError("--creds is USER:PASS (the password is asked for only on a terminal)")
        creds = f"{creds}:{getpass.getpass(f'password for {creds}: ')}"
    return SourceOptions(platform=platform, creds=creds, tls_verify=tls_verify, cert_dir=cert_dir)


@contextmanager
def _progress() -> Iterator[Callable[[int, int, int | None, int], None] | None]:
    """A rich progress bar on a terminal (layer i/n, bytes of its blob), nothing otherwise.

    Updates may come from the layer's reader thread; rich locks and rate-limits them.
    """
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("layers", total=None)

        def update(i: int, n: int, size: int | None, done: int) -> None:
            bar.update(task, completed=done, total=size, description=f"layer {i + 1}/{n}")

        yield update


def image_save(root: str | None, name: str, dest: str, **registry: Any) -> int:
    from layerstore.save import save

    opts = _source_options(**registry)
    start = time.monotonic()
    with open_store(root) as store:
        _complete(store, store.resolve(name), opts)  # every file of it is written
        digest = save(store, name, dest, opts)
    print(f"{dest} {digest[7:19]} ({time.monotonic() - start:.1f}s)")
    return 0


def image_push(root: str | None, name: str, dest: str | None, compression: str | None, **registry: Any) -> int:
    """``docker push``: to ``dest``, else to the registry and repository ``name`` names; layers written again
    are compressed as ``compression`` says (gzip unless given)."""
    from layerstore.save import push

    opts = _source_options(**registry)
    start = time.monotonic()
    with open_store(root) as store:
        lazy = Lazy(store, opts)
        dest = dest or normalize_name(name)
        try:  # a layer written again is fetched whole first; one named by its pulled blob is not
            digest, uploaded, total = push(store, name, dest.removeprefix("docker://"), opts,
                                           lambda layer: _fetch_rest(lazy, [layer]), compression)  # fmt: skip
        finally:
            lazy.close()
    took = time.monotonic() - start
    print(f"{dest} {digest} ({uploaded} of {total} blobs uploaded, {took:.1f}s)")
    return 0


def image_tag(root: str | None, name: str, new: str) -> int:
    with open_store(root) as store:
        print(store.tag(name, new))
    return 0


def store_df(root: str | None) -> int:
    with open_store(root) as store:
        u = maintenance.usage(store)
    saved = u.logical - u.stored
    print(f"images {u.images}  layers {u.layers}  blobs {u.blobs}  containers {u.containers}")
    print(f"logical {human(u.logical)}  stored {human(u.stored)}  saved by dedup {human(max(saved, 0))}")
    return 0


def store_gc(root: str | None) -> int:
    with open_store(root) as store:
        layers, blobs, freed = maintenance.gc(store)
    print(f"removed {layers} layers and {blobs} blobs, freed {human(freed)}")
    return 0


def store_check(root: str | None) -> int:
    with open_store(root) as store:
        problems = maintenance.check(store)
    for p in problems:
        print(p)
    if problems:
        raise UsageError(f"{len(problems)} problem(s) in the store")
    print("store is consistent")
    return 0


def image_ls(root: str | None, fmt: str) -> int:
    with open_store(root, create=True) as store:
        images = store.images()
        missing = [still_to_fetch(store, i.layers)[1] for i in images]
    if fmt == "json":
        print(
            json.dumps(
                [
                    {
                        "Name": i.name,
                        "Id": i.image_id,
                        "Layers": len(i.layers),
                        "Size": i.size,
                        "Created": i.created,
                        "Present": i.size - gone,
                    }
                    for i, gone in zip(images, missing, strict=True)
                ],
                indent=2,
            )  # fmt: skip
        )
        return 0
    print(f"{'NAME':<40} {'IMAGE ID':<12} {'LAYERS':>6} {'SIZE':>10} {'PRESENT':>8}")
    for i, gone in zip(images, missing, strict=True):
        present = f"{100 * (i.size - gone) // i.size if i.size else 100}%"
        print(f"{i.name:<40} {i.image_id[7:19]:<12} {len(i.layers):>6} {human(i.size):>10} {present:>8}")
    return 0


def image_inspect(root: str | None, name: str) -> int:
    with open_store(root) as store:
        image_id = store.resolve(name)
        cfg = store.config(image_id)
        size, shared = store.image_sizes(image_id)
        missing_files, missing_bytes = still_to_fetch(store, cfg["layers"])
    config = cfg["config"].get("config", {})
    print(
        json.dumps(
            {
                "Id": image_id.decode(),
                "Manifest": cfg["manifest"],
                "RepoDigests": cfg.get("repo_digests", []),
                "Layers": cfg["layers"],
                "Size": size,
                "SharedSize": shared,
                "Missing": {"Files": missing_files, "Size": missing_bytes},  # left by a lazy pull
                "Env": config.get("Env"),
                "Cmd": config.get("Cmd"),
                "Entrypoint": config.get("Entrypoint"),
                "Volumes": config.get("Volumes"),
                "WorkingDir": config.get("WorkingDir"),
                "Config": cfg["config"],
            },
            indent=2,
        )
    )
    return 0


def image_rm(root: str | None, name: str) -> int:
    with open_store(root) as store:
        store.remove_image(name)
    print(f"removed {name}")
    return 0


def prepare_image_mount(
    cfg: MountConfig,
    root: str | None,
    image: str,
    container: str | None,
    pull: tuple[str, dict[str, Any]] = ("never", {}),
) -> str:
    """Point ``cfg`` at an image and its container layer (created when new).

    ``pull`` is (policy, registry options): ``missing`` pulls an image the store lacks,
    ``always`` pulls first (a moved tag is followed), ``never`` does not.
    """
    if cfg.upper or cfg.work:
        raise UsageError("--image brings its own container layer: drop --upper/--work")
    policy, registry = pull
    with open_store(root, create=policy != "never") as store:
        opts = _source_options(**registry)
        image_id = _image_or_pull(store, image, policy, opts)
        cfg.registry = opts  # a lazy image's daemon fetches with the same login
        fresh = container is None or not _exists(store, container)
        name, upper, work = store.container(container, image_id)
        if fresh:  # a mount that fails leaves no container behind
            cfg.undo.append(lambda: _forget_container(root, name))
        cfg.hold_fds.append(store.lock_container(name))
        store.set_mounted_at(name, os.path.realpath(cfg.mountpoint))
        if fresh:
            _root_like_image(store, image_id, upper)
    cfg.image = (store.root, image_id)
    cfg.upper, cfg.work = upper, work
    if container is None:  # the generated container name, for the next mount or rm (once the mount is up)
        cfg.on_live.append(lambda: print(name, flush=True))
    return name


def _image_or_pull(store: Store, image: str, policy: str, opts: SourceOptions) -> bytes:
    """The image id of ``image``, pulled first as ``policy`` says (one-line error naming both failures)."""
    if policy in ("missing", "lazy"):
        try:
            return store.resolve(image)
        except StoreError:
            pass
    elif policy == "never":
        return store.resolve(image)
    try:
        name, image_id = store.import_image(f"docker://{image}", None, None, opts, lazy=policy == "lazy")
    except (SourceError, LayerError, CollisionError) as e:
        why = "and pulling it failed" if policy in ("missing", "lazy") else "pulling it failed"
        raise UsageError(f"no image '{image}' in the store, {why}: {e}") from None
    print(f"pulled {name} {image_id[7:19]}", file=sys.stderr)
    return store.resolve(name)


def _forget_container(root: str | None, name: str) -> None:
    with open_store(root) as store:
        store.remove_container(name)


def _exists(store: Store, name: str) -> bool:
    try:
        store.container_record(name)
        return True
    except StoreError:
        return False


def _root_like_image(store: Store, image_id: bytes, upper: str) -> None:
    """A new container layer's root takes the image root's owner, mode and times (the union's root shows it).

    Where the owner cannot be given (rootless), it goes to the override xattr.
    """
    from layerstore.entry import Entry
    from layerstore.store import image_key, merged_key
    from unionfs.union import override

    with store.env.begin() as txn:
        raw = txn.get(merged_key(image_key(image_id), b""), db=store.db["merged"])
    if raw is None:
        return
    e = Entry.unpack(raw)
    path = os.fsencode(upper)
    override.chown(path, e.uid, e.gid, rootless=not override.can_chown(upper))
    os.chmod(path, e.mode & 0o7777)
    os.utime(path, ns=(e.mtime_ns, e.mtime_ns))


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"
