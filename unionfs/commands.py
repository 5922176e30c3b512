"""The bodies of the store commands (``image ...``, ``mount --image``); cli.py only parses.

Every store failure becomes a :class:`~unionfs.config.UsageError` with one line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from layerstore.blobs import CollisionError
from layerstore.oci import SourceError
from layerstore.store import Store, StoreError, default_root
from layerstore.tarlayer import LayerError

from .config import MountConfig, UsageError


@contextmanager
def open_store(root: str | None, *, readonly: bool = False) -> Iterator[Store]:
    try:
        store = Store(root or default_root(), readonly=readonly)
    except StoreError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot open the store at '{root or default_root()}': {e.strerror}") from None
    try:
        yield store
    except (StoreError, SourceError, LayerError, CollisionError) as e:
        raise UsageError(str(e)) from None
    finally:
        store.close()


def image_import(root: str | None, source: str, tag: str | None) -> int:
    start = time.monotonic()
    with open_store(root) as store:
        tty = sys.stderr.isatty()

        def progress(i: int, n: int) -> None:
            if tty:
                print(f"\rimporting layer {i + 1}/{n}", end="", file=sys.stderr, flush=True)

        name, image_id = store.import_image(source, tag, progress)
        if tty:
            print("\r", end="", file=sys.stderr)
    print(f"{name} {image_id[7:19]} ({time.monotonic() - start:.1f}s)")
    return 0


def image_ls(root: str | None, fmt: str) -> int:
    with open_store(root) as store:
        images = store.images()
    if fmt == "json":
        print(
            json.dumps(
                [
                    {"Name": i.name, "Id": i.image_id, "Layers": len(i.layers), "Size": i.size, "Created": i.created}
                    for i in images
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'NAME':<40} {'IMAGE ID':<12} {'LAYERS':>6} {'SIZE':>10}")
    for i in images:
        print(f"{i.name:<40} {i.image_id[7:19]:<12} {len(i.layers):>6} {_human(i.size):>10}")
    return 0


def image_inspect(root: str | None, name: str) -> int:
    with open_store(root) as store:
        image_id = store.resolve(name)
        cfg = store.config(image_id)
    config = cfg["config"].get("config", {})
    print(
        json.dumps(
            {
                "Id": image_id.decode(),
                "Manifest": cfg["manifest"],
                "Layers": cfg["layers"],
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


def prepare_image_mount(cfg: MountConfig, root: str | None, image: str, container: str | None) -> None:
    """Point ``cfg`` at an image and its container layer (created when new)."""
    if cfg.upper or cfg.work:
        raise UsageError("--image brings its own container layer: drop --upper/--work")
    with open_store(root) as store:
        image_id = store.resolve(image)
        name, upper, work = store.container(container, image_id)
    cfg.image = (store.root, image_id)
    cfg.upper, cfg.work = upper, work
    if container is None:
        print(name)  # the generated container name, for the next mount or rm


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"
