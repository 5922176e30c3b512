"""A read-only view of a union without mounting it: for diff, commit and export.

:class:`View` resolves names with the same :class:`~unionfs.union.namei.Resolver` the
daemon uses, so what it walks is exactly what a mount shows (whiteouts of every
dialect, opaque and redirected directories, metadata-only copies, hard-link
groups), but in-process: no FUSE, no mount point, nothing written. It may be
opened while the container is mounted (its work directory is never touched);
it then sees the upper layer as it is at that moment.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from layerstore.host import proc_path
from layerstore.store import Store

from .inodes import ROOT_INO, Node
from .layers import DirLayer, FdCache, Layer, join
from .markers import WriteDialect, is_private_xattr
from .namei import Found, Resolver
from .readdir import merged_names
from .storelayer import StoreLayer


@dataclass(slots=True)
class Item:
    """One entry of the union: its path, its node (for reads) and its attributes."""

    path: bytes
    node: Node
    st: os.stat_result
    found: Found | None  # None for the root
    index: bytes | None = None  # a lower hard-link group copied up by another of its names

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def in_upper(self) -> bool:
        return self.node.in_upper or self.index is not None

    @property
    def source(self) -> bytes | None:
        """The lower path this entry shows, when it has no upper part (None otherwise)."""
        if self.in_upper or not self.node.lowers:
            return None
        return self.node.lowers[0][1]


class View:
    """The merged tree of ``upper`` over ``lowers`` and an optional store image (bottom)."""

    def __init__(
        self,
        upper: str | None,
        lowers: list[str],
        image: tuple[Store, bytes] | None,
        dialect: WriteDialect,
        work: str | None = None,
    ) -> None:
        """``image``: (open store, image id) of the bottom layer; ``work``: the upper's work dir (hard-link index)."""
        self.cache = FdCache()
        self.lowers: list[Layer] = [DirLayer(i, p, self.cache) for i, p in enumerate(lowers)]
        if image is not None:
            self.lowers.append(StoreLayer(len(self.lowers), image[0].root, image[1], image[0]))
        self.upper = DirLayer(-1, upper, self.cache) if upper else None
        self.resolver = Resolver(self.upper, self.lowers, dialect)
        self.index_fd: int | None = None
        if work is not None:
            try:
                self.index_fd = os.open(
                    os.path.join(work, "unionmount-index"), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                )
            except FileNotFoundError:
                pass
        self.root_node = Node(
            ROOT_INO,
            stat.S_IFDIR,
            [],
            in_upper=self.upper is not None,
            lowers=[(i, b"") for i in range(len(self.lowers))],
        )

    def close(self) -> None:
        if self.index_fd is not None:
            os.close(self.index_fd)
        self.cache.close()
        for layer in self.lowers:
            layer.close()
        if self.upper is not None:
            self.upper.close()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tree ------------------------------------------------------------------------
    def root(self) -> Item:
        st = (self.upper.lstat(b"") if self.upper is not None else None) or self.lowers[0].lstat(b"")
        assert st is not None
        return Item(b"", self.root_node, st, None)

    def children(self, parent: Item) -> list[Item]:
        """The entries of a directory, sorted by name."""
        out = []
        for name in sorted(merged_names(self.resolver, parent.node)):
            found = self.resolver.lookup(parent.node, name)
            if found is not None:
                out.append(self._item(parent, name, found))
        return out

    def _item(self, parent: Item, name: bytes, found: Found) -> Item:
        node = Node(
            found.ino, found.kind, [(parent.node, name)], found.upper_st is not None, found.lowers, found.opaque,
            found.index_name, found.data,
        )  # fmt: skip
        st = found.upper_st or found.lower_st
        assert st is not None
        index = None
        if found.index_name is not None and found.upper_st is None and self.index_fd is not None:
            try:
                st = os.stat(found.index_name, dir_fd=self.index_fd, follow_symlinks=False)
                index = found.index_name
            except FileNotFoundError:
                pass
        return Item(join(parent.path, name), node, st, found, index)

    def walk(self, top: Item | None = None) -> Iterator[Item]:
        """Every entry below ``top`` (the root by default; not ``top`` itself), parents first."""
        stack = [top or self.root()]
        while stack:
            item = stack.pop()
            kids = self.children(item)
            yield from kids
            stack.extend(k for k in reversed(kids) if k.is_dir)

    def lookup(self, path: bytes) -> Item | None:
        item = self.root()
        for name in (p for p in path.split(b"/") if p):
            if not item.is_dir:
                return None
            found = self.resolver.lookup(item.node, name)
            if found is None:
                return None
            item = self._item(item, name, found)
        return item

    # -- contents ----------------------------------------------------------------------
    def _at(self, item: Item) -> tuple[Layer, bytes] | bytes:
        """(layer, path) of an entry's own metadata, or a host path (its hard-link index entry)."""
        if item.index is not None:
            assert self.index_fd is not None
            return proc_path(self.index_fd, item.index)
        node = item.node
        if node.in_upper and self.upper is not None:
            return self.upper, node.path
        li, lpath = node.lowers[0]
        return self.lowers[li], lpath

    def readlink(self, item: Item) -> bytes:
        at = self._at(item)
        assert not isinstance(at, bytes)  # symlinks are never in the hard-link index
        return at[0].readlink(at[1])

    def xattrs(self, item: Item) -> dict[bytes, bytes]:
        """The user-visible xattrs (union markers excluded)."""
        at = self._at(item)
        try:
            if isinstance(at, bytes):
                names = [os.fsencode(n) for n in os.listxattr(at, follow_symlinks=False)]
            else:
                names = at[0].listxattr(at[1])
        except OSError:
            return {}
        out = {}
        for n in names:
            if not is_private_xattr(n):
                try:
                    out[n] = (
                        os.getxattr(at, n, follow_symlinks=False) if isinstance(at, bytes) else at[0].getxattr(at[1], n)
                    )
                except OSError:
                    pass
        return out

    def open(self, item: Item) -> int:
        """An O_RDONLY fd of a regular file's data (a metadata-only copy reads its lower data)."""
        node = item.node
        if node.data is not None:
            li, lpath = node.data
            return self.lowers[li].open(lpath, os.O_RDONLY)
        at = self._at(item)
        if isinstance(at, bytes):
            assert self.index_fd is not None and item.index is not None
            return os.open(item.index, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.index_fd)
        return at[0].open(at[1], os.O_RDONLY)
