"""The store as commands and the mount open it: its failures become one line for the user (:class:`UsageError`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from layerstore.blobs import CollisionError
from layerstore.oci import SourceError
from layerstore.store import Store, StoreError, default_root
from layerstore.tarlayer import LayerError

from .config import UsageError


@contextmanager
def open_store(root: str | None, *, readonly: bool = False, create: bool = False) -> Iterator[Store]:
    """The store at ``root`` (default root if None); only commands that fill it may ``create`` it."""
    path = root or default_root()
    if not create and not os.path.isdir(os.path.join(path, "meta")):
        raise UsageError(f"no store at '{path}' (import an image first, or give --root)")
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
