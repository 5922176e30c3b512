"""Flattening an image's layer stack into one merged tree, done once at import.

OCI rules, applied bottom layer first: a layer's whiteouts and opaque marks
act on the layers below it (never on its own entries), then its entries are
added; a non-directory replaces whatever was at its path, a directory over a
directory keeps the children below. Parents missing from a tar are created as
0755 root directories. Hard links share the inode of their target; ``nlink``
counts the names left in the final tree (directories: 2 + subdirectories).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

from .entry import Entry, dir_size
from .schema import KIND_OPAQUE, KIND_WHITEOUT
from .tarlayer import LayerError

_IMPLICIT_DIR = Entry(stat.S_IFDIR | 0o755)


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Tree:
    """A mutable tree of entries keyed by layer-relative path."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {b"": _IMPLICIT_DIR}
        self.children: dict[bytes, set[bytes]] = {b"": set()}
        self.group: dict[bytes, int] = {b"": 1}
        self._next_group = 2

    def remove(self, path: bytes) -> None:
        e = self.entries.pop(path, None)
        if e is None:
            return
        self.group.pop(path, None)
        for child in self.children.pop(path, set()):
            self.remove(_join(path, child))
        parent, name = _split(path)
        self.children.get(parent, set()).discard(name)

    def clear(self, path: bytes) -> None:
        for child in list(self.children.get(path, ())):
            self.remove(_join(path, child))

    def _ensure_dir(self, path: bytes) -> None:
        e = self.entries.get(path)
        if e is not None:
            if not e.is_dir:
                raise LayerError(f"'{path.decode(errors='replace')}' is not a directory but has entries below it")
            return
        parent, name = _split(path)
        self._ensure_dir(parent)
        self._put(path, _IMPLICIT_DIR)

    def _put(self, path: bytes, e: Entry, group: int | None = None) -> None:
        parent, name = _split(path)
        self.entries[path] = e
        self.children[parent].add(name)
        if e.is_dir:
            self.children.setdefault(path, set())
        if group is None:
            group = self._next_group
            self._next_group += 1
        self.group[path] = group

    def add(self, path: bytes, e: Entry) -> None:
        if not path:
            self.entries[b""] = e.with_(kind=0)
            return
        group = None
        if e.link is not None:
            target = self.entries.get(e.link)
            if target is None or target.is_dir:
                raise LayerError(f"hard link '{path.decode(errors='replace')}' has no file to point to")
            group = self.group[e.link]
            e = target
        parent, _ = _split(path)
        self._ensure_dir(parent)
        old = self.entries.get(path)
        if old is not None and not (old.is_dir and e.is_dir):
            self.remove(path)
        self._put(path, e if e.kind == 0 and e.link is None else e.with_(kind=0, link=None), group)

    def apply_layer(self, items: Iterable[tuple[bytes, Entry]]) -> None:
        items = list(items)
        for path, e in items:
            if e.kind == KIND_WHITEOUT:
                self.remove(path)
            elif e.kind == KIND_OPAQUE and path in self.entries:
                self.clear(path)
        links: dict[bytes, Entry] = {}
        for path, e in items:
            if e.kind == KIND_WHITEOUT or (e.kind == KIND_OPAQUE and e.mode == 0):
                continue
            if e.link is not None:
                links[path] = e
            else:
                self.add(path, e)
        # hard links after the files they name, whatever the order of the names: a tar names
        # the first path it met as the file (d/keep.hard) and a later one as the link (d/keep)
        while links:
            ready = [(path, e) for path, e in links.items() if e.link not in links]
            if not ready:  # links that name only each other
                raise LayerError(f"hard link '{next(iter(links)).decode(errors='replace')}' has no file to point to")
            for path, e in ready:
                self.add(path, e)
                del links[path]

    def finish(self) -> Iterable[tuple[bytes, Entry]]:
        """Entries with ``ino`` and ``nlink`` filled, in path order."""
        links: dict[int, int] = {}
        for path, g in self.group.items():
            if not self.entries[path].is_dir:
                links[g] = links.get(g, 0) + 1
        for path in sorted(self.entries):
            e = self.entries[path]
            g = self.group[path]
            if e.is_dir:
                kids = self.children.get(path, set())
                nlink = 2 + sum(1 for c in kids if self.entries[_join(path, c)].is_dir)
                yield path, e.with_(ino=g, nlink=nlink, size=dir_size(kids))
            else:
                yield path, e.with_(ino=g, nlink=links[g])
