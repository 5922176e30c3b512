"""The inode table: one :class:`Node` per union inode the kernel knows about.

Inode numbers are stable: they are derived from the real inode an entry comes
from, never allocated. Where every layer is a plain directory on one filesystem,
the number is the real inode's own, as overlayfs reports it then
(:meth:`unionfs.union.namei.Resolver.ino`); elsewhere ``ino = layer_id << 48 | st_ino``
where ``layer_id`` is 1 for the upper layer and ``2 + i`` for lower layer ``i``
(the leftmost lower is 0). A copied-up entry keeps the number of its lower origin
(recorded in the upper as the ``unionmount.origin`` xattr), a directory takes the
number of its topmost lower directory, so copy-up and remount never change a
number. A lower hard-link group's index entry is named by the encoded number
either way, and carries its name (``unionmount.index``) for its upper aliases.

Lookup counts follow the FUSE protocol's rules: every successful lookup, create, mkdir,
mknod, symlink, link and readdirplus entry adds one; ``forget`` subtracts; a
node leaves the table only when its count is zero and no handle is open.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .records import Attrs

ROOT_INO = 1  # FUSE_ROOT_ID
LAYER_SHIFT = 48
UPPER_ID = 1
GRAFT_ID = 0x8000  # graft k's entries use layer id GRAFT_ID + k


def make_ino(layer_id: int, st_ino: int) -> int:
    """The union inode number of real inode ``st_ino`` of layer ``layer_id``."""
    if st_ino >> LAYER_SHIFT:
        # Beyond 48 bits (rare: some btrfs/xfs setups). Fold into the range; still stable.
        st_ino = (st_ino ^ (st_ino >> LAYER_SHIFT)) & ((1 << LAYER_SHIFT) - 1)
    return (layer_id << LAYER_SHIFT) | st_ino


@dataclass(eq=False, slots=True)
class Node:
    """A union inode.

    ``links`` are the (parent directory node, name) pairs the node is known under
    (a directory has exactly one; an unlinked, still-open file none). ``in_upper`` is
    true when the entry exists in the upper layer; ``lowers`` holds the lower
    (layer index, relpath) pairs it draws from: every merged directory for a
    directory, the data source for a file.

    A node in the table with ``in_upper`` false and a link is *fixed*: what is kept on it
    (``attrs`` with ``attrs_reply``; ``lower_xattrs`` in realm 0) stays true until one of
    those changes. The FUSE layer's compiled hot path (``unionfs/fuse/_pump.c``) answers
    GETATTR, LISTXATTR and the GETXATTR of an absent name from exactly these fields under
    exactly these conditions, without calling back: keep the two in step.
    """

    ino: int
    kind: int  # stat.S_IFMT bits
    links: list[tuple[Node, bytes]]
    in_upper: bool = False  # the entry exists in the upper layer (a directory there may merge lowers)
    lowers: list[tuple[int, bytes]] = field(default_factory=list)
    opaque: bool = False
    index_name: bytes | None = None  # lower hard-link group: name of its index entry
    data: tuple[int, bytes] | None = None  # metadata-only entry: (lower index, path) of its data
    lookups: int = 0
    opens: int = 0
    version: int = 0  # bumped when the node's real file changes (copy-up)
    realm: int = 0  # 0: the union; k > 0: graft k (a volume or bind mount on a path of the union)
    realm_root: bool = False  # the root of a graft: its path in its realm is b""
    no_caps: bool = False  # known to have no security.capability (the kernel asks before every write)
    #: the xattr names a lower-only entry of the union shows, listed once (image layers do not change);
    #: trusted by :mod:`unionfs.union.inode` only while ``in_upper`` is false
    lower_xattrs: tuple[bytes, ...] | None = None
    #: the attributes of a lower-only entry of the union (image layers do not change); set and
    #: trusted by :meth:`unionfs.union.fs.UnionFS.attrs` only while ``in_upper`` is false
    attrs: Attrs | None = None
    attrs_reply: bytes | None = None  # kept for the FUSE layer: ``attrs`` as it answers them (a GETATTR reply body)
    #: the last attributes of an entry removed while the kernel still knows it (its nlink now 0): what
    #: GETATTR and SETATTR of it answer once no open file reaches it, as overlayfs answers for an orphan
    gone: os.stat_result | None = None

    @property
    def metacopy(self) -> bool:
        return self.data is not None

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def path(self) -> bytes:
        """Layer-relative path in the upper layer of its realm (for the union: in the union) of the first link."""
        if self.ino == ROOT_INO or self.realm_root:
            return b""
        parent, name = self.links[0]
        pp = parent.path
        return pp + b"/" + name if pp else name

    def add_link(self, parent: Node, name: bytes) -> None:
        if (parent, name) not in self.links:
            self.links.append((parent, name))

    def drop_link(self, parent: Node, name: bytes) -> None:
        try:
            self.links.remove((parent, name))
        except ValueError:
            pass


SHRINK_FROM = 4096  # a table that never held more nodes is not worth rebuilding


class InodeTable:
    """Maps inode numbers to nodes and enforces the lookup-count protocol."""

    def __init__(self, root: Node) -> None:
        self._nodes: dict[int, Node] = {ROOT_INO: root}
        self.root = root
        self._peak = 1  # the most nodes since the table last shrank

    def shrink(self, before: int) -> bool:
        """After the kernel forgot most of what it held: rebuild the table at its new size; True if it did.

        ``before``: the table's size before the forgets that called this (the peak is taken
        there, not on every insertion). A Python dict never gives back the room of deleted
        keys; a table that held 500,000 nodes would keep their slots for good.
        """
        self._peak = max(self._peak, before)
        n = len(self._nodes)
        if self._peak < SHRINK_FROM or n * 8 > self._peak:
            self._peak = max(self._peak, n)
            return False
        kept = list(self._nodes.items())
        self._nodes.clear()  # (frees its slots; the dict stays the same object, see by_ino)
        self._nodes.update(kept)
        self._peak = n
        return True

    @property
    def by_ino(self) -> dict[int, Node]:
        """The table itself, for reading only: the same dict object for the table's life (the FUSE layer's
        compiled hot path holds it, :mod:`unionfs.fuse.session`)."""
        return self._nodes

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def __getitem__(self, ino: int) -> Node:
        return self._nodes[ino]

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, node: Node) -> Node:
        """Insert a node (or return the one already holding its number)."""
        return self._nodes.setdefault(node.ino, node)

    def remember(self, node: Node) -> None:
        """Count one lookup reply sent to the kernel."""
        node.lookups += 1

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            return
        node.lookups -= n
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        if node.lookups <= 0 and node.opens <= 0 and node.ino != ROOT_INO:
            if self._nodes.get(node.ino) is node:
                del self._nodes[node.ino]
