"""The union as a whole: its layers and grafts, its inode table, and what every operation shares.

As overlayfs' ``super.c`` (with the attribute helpers of its ``inode.c`` that all operations use):
:class:`Super` builds the union from :class:`Options` and holds its state; the operations are
its subclasses in :mod:`.inode`, :mod:`.readdir`, :mod:`.file` and :mod:`.dir`, joined in
:class:`unionfs.union.fs.UnionFS`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerstore.host import proc_path

from . import override, stats
from .copy_up import CopyUp
from .graft import Graft
from .idmap import IdMap
from .inodes import GRAFT_ID, ROOT_INO, InodeTable, Node, make_ino
from .layers import DirLayer, FdCache, Layer
from .markers import WriteDialect, is_marker_name
from .mutex import Mutex
from .namei import Found, Resolver
from .records import Attrs, Caller, FsStats, KillRequests
from .settle import DELAY as SETTLE_DELAY
from .space import Room

if TYPE_CHECKING:
    from layerstore.oci import SourceOptions
from .storelayer import StoreLayer
from .upper import Upper

TIMEOUT = 300.0  # seconds: every change passes through us, so the kernel may cache long
LISTING_CACHE = 4096  # directories whose lower parts' resolved listing is kept
LISTING_ENTRIES = 1 << 15  # and at most this many of their entries in all (memory: about 200 bytes each)
GRAFT_TIMEOUT = 1.0  # a volume or host directory can change behind our back: attributes show within a second


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _in_group(ctx: Caller, gid: int) -> bool:
    """Whether the caller of a request has ``gid`` as its group or a supplementary one."""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass  # the caller is gone: as if not a member
    return False


@dataclass(slots=True)
class _Ctx:
    """The request context of the daemon's own operations (graft points are made by root)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


@dataclass(slots=True)
class FileHandle:
    node: Node
    fd: int
    writable: bool
    version: int


@dataclass(slots=True)
class DirHandle:
    node: Node
    names: list[bytes] | None = None  # taken at the first read from offset 0
    #: the resolutions of the names the directory's lower parts give (kept across listings; see
    #: ``ListingOps._take_listing``); None in a graft
    found: dict[bytes, tuple[Found | None, Attrs | None]] | None = None
    upper: set[bytes] | None = None  # the names its upper part held at the listing: resolved afresh


@dataclass(slots=True, frozen=True)
class Options:
    lowers: tuple[str, ...]
    upper_dir: str | None = None  # the upper layer's directory (None: a read-only union)
    work_dir: str | None = None
    volatile: bool = False
    image: tuple[str, bytes] | None = None  # (store root, image id): the image is the bottom layer
    grafts: tuple[Graft, ...] = ()
    uidmap: IdMap = IdMap()
    gidmap: IdMap = IdMap()
    writeback: bool = False  # the kernel caches writes (see :func:`unionfs.daemon.mount.writeback_wanted`)
    timeout: float = TIMEOUT  # how long the kernel keeps the union's entries, attributes and misses
    dircache: bool = False  # the kernel may keep the union's directory listings (Opened.cache_dir)
    settle: float = SETTLE_DELAY  # pause in copy-ups after which they are settled (0: in the open; see settle)
    prefetch: float = 0.0  # a lazily pulled image: share of the time to spend fetching the rest (0: none)
    registry: SourceOptions | None = None  # a lazily pulled image: its registry's login and TLS (else auth files)


class _NoCopy:
    """Copy-up in a graft: there is nothing below a graft, every entry is already where it is written."""

    async def dir(self, node: Node) -> None:
        return None

    async def file(self, node: Node, *, data: bool, defer: bool = False) -> None:
        return None

    def drop_metacopy(self, node: Node) -> None:
        return None

    def index_exists(self, node: Node) -> bool:
        return False


_NO_COPY = _NoCopy()


#: the file systems whose files the kernel may be handed (passthrough): local disks and tmpfs
#: (ext2/3/4, xfs, btrfs, tmpfs, f2fs, zfs, bcachefs); not FUSE, network or stacked ones
PASSTHROUGH_FS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1, 0xCA451A4E})


@dataclass(slots=True)
class Realm:
    """Where a node's entries live: the union (realm 0), or one graft (a volume or bind mount)."""

    resolver: Resolver
    upper: Upper | None  # None: read-only
    copy: CopyUp | None
    timeout: float
    uidmap: IdMap
    gidmap: IdMap
    graft: Graft | None = None
    root: Node | None = None  # a graft's root node


class Super:
    """The union's state and the helpers every operation uses."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cache = FdCache()
        self.euid = os.geteuid()
        dialect = WriteDialect.probe(opts.work_dir) if opts.work_dir else WriteDialect(b"trusted.")
        self.lowers: list[Layer] = [DirLayer(i, p, self.cache) for i, p in enumerate(opts.lowers)]
        if opts.image is not None:
            image = StoreLayer(len(self.lowers), *opts.image, prefetch=opts.prefetch, registry=opts.registry)
            self.lowers.append(image)
        up_layer = DirLayer(-1, opts.upper_dir, self.cache, writable=True) if opts.upper_dir else None
        self.upper = Upper(up_layer, opts.work_dir, dialect) if up_layer is not None and opts.work_dir else None
        self.resolver = Resolver(up_layer, self.lowers, dialect)
        # rootless: owners, modes and devices the daemon cannot set live in an xattr (unionfs.union.override)
        self.rootless = not override.can_chown(opts.work_dir) if opts.work_dir else self.euid != 0
        # with the writeback cache, the room left in the upper layer decides how files are opened for writing
        self.room = Room(self.upper.layer.root_fd) if self.upper is not None and opts.writeback else None
        self.copy = (
            CopyUp(self.resolver, self.upper, sync=not opts.volatile, rootless=self.rootless, defer=opts.settle)
            if self.upper
            else None
        )
        root = Node(
            ROOT_INO,
            stat.S_IFDIR,
            [],
            in_upper=up_layer is not None,
            lowers=[(i, b"") for i in range(len(self.lowers))],
        )
        self.table = InodeTable(root)
        self.realms = [Realm(self.resolver, self.upper, self.copy, opts.timeout, opts.uidmap, opts.gidmap)]
        # (parent directory's ino, name) in the union -> realm; filled by prepare(). Keyed by the parent's
        # stable inode number, so a lookup costs one dict probe and no path walk.
        self.graft_at: dict[tuple[int, bytes], int] = {}
        #: ino -> (node, (opaque, lower parts), the names they give, their resolutions): see ``_take_listing``
        self._listings: OrderedDict[int, tuple[Node, tuple, list[bytes], dict]] = OrderedDict()  # type: ignore[type-arg]
        self._listed = 0  # entries in all of _listings
        for k, g in enumerate(opts.grafts, start=1):
            self._add_graft(k, g, opts, dialect)
        self.lock = Mutex()
        self.files: dict[int, FileHandle] = {}
        self._local_dev: dict[int, bool] = {}  # st_dev -> its file system may back passthrough
        self.dirs: dict[int, DirHandle] = {}
        self._request_ino: Callable[[], int] | None = None  # see list_without_open
        self._kills: KillRequests | None = None  # see take_privilege_kills
        #: tells the kernel to drop what it keeps of an inode (its attributes and pages); set by the FUSE layer
        self.invalidate: Callable[[int], None] = lambda ino: None
        #: makes the attribute records the union answers with: :class:`Attrs`, or a FUSE binding's own reply type
        #: with the same fields (set by the FUSE layer, so that replies need no copy)
        self.new_attrs: Callable[[], Attrs] = Attrs
        self._after_reply: Callable[[Callable[[], None]], None] = lambda call: None
        self._targets_kept = False  # see keep_symlinks
        self._unopened_dirs: OrderedDict[int, DirHandle] = OrderedDict()
        stats.SETTINGS["writeback"] = lambda: opts.writeback
        stats.SETTINGS["inodes"] = lambda: len(self.table)  # known to the kernel (or open)
        stats.SETTINGS["listed"] = lambda: self._listed  # resolutions kept in the listing cache
        self._next_fh = 1

    def _add_graft(self, k: int, g: Graft, opts: Options, dialect: WriteDialect) -> None:
        layer = DirLayer(-1 - k, g.source, self.cache, writable=not g.read_only)
        st = layer.lstat(b"")
        assert st is not None
        resolver = Resolver(layer, [], dialect, upper_id=GRAFT_ID + k)
        upper = Upper(layer, None, dialect) if not g.read_only else None
        root = Node(make_ino(GRAFT_ID + k, st.st_ino), stat.S_IFDIR, [], in_upper=True, realm=k, realm_root=True)
        uidmap = g.uidmap if g.uidmap else opts.uidmap
        gidmap = g.gidmap if g.gidmap else opts.gidmap
        self.realms.append(Realm(resolver, upper, None, GRAFT_TIMEOUT, uidmap, gidmap, g, root))

    def _graft_root(self, parent: Node, name: bytes) -> Node | None:
        """The root node of the graft mounted at ``name`` in ``parent``, if one is."""
        if not self.graft_at:
            return None
        k = self.graft_at.get((parent.ino, name))
        if k is None:
            return None
        root = self.realms[k].root
        assert root is not None
        root.links = [(parent, name)]
        return self.table.add(root)

    def _graft_busy(self, parent: Node, name: bytes) -> None:
        if self._graft_root(parent, name) is not None:
            raise _err(errno.EBUSY)

    def close(self) -> None:
        if self.copy is not None:
            self.copy.close()
        for h in self.files.values():
            os.close(h.fd)
        self.files.clear()
        for realm in self.realms[1:]:
            if realm.upper is not None:
                realm.upper.close()
            realm.resolver.upper_layer.close()  # type: ignore[union-attr]
        self.cache.close()
        for layer in self.lowers:
            layer.close()
        if self.upper is not None:
            self.upper.layer.close()
            self.upper.close()

    def node(self, ino: int) -> Node:
        n = self.table.get(ino)
        if n is None:
            raise _err(errno.ESTALE)
        return n

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _writable(self, node: Node) -> tuple[Upper, CopyUp | _NoCopy]:
        """The upper layer and copy-up of ``node``'s realm (EROFS if it is read-only)."""
        r = self.realms[node.realm]
        if r.upper is None:
            raise _err(errno.EROFS)
        return r.upper, (r.copy or _NO_COPY)

    @staticmethod
    def _check_new_name(name: bytes) -> None:
        if len(name) > 255:
            raise _err(errno.ENAMETOOLONG)
        if is_marker_name(name):
            raise _err(errno.EINVAL)

    def _found_node(self, found: Found, parent: Node, name: bytes) -> Node:
        """The table's node for a resolution, created or refreshed; no lookup is counted."""
        node = self.table.get(found.ino)
        if node is None:
            node = self.table.add(Node(found.ino, found.kind, [(parent, name)], realm=parent.realm))
        elif node.is_dir or found.kind == stat.S_IFDIR:
            node.links = [(parent, name)]
        else:
            # The alias being operated on comes first: copy-up and paths use links[0].
            node.drop_link(parent, name)
            node.links.insert(0, (parent, name))
        node.kind = found.kind
        node.in_upper = found.upper_st is not None
        node.lowers = found.lowers
        node.opaque = found.opaque
        node.index_name = found.index_name
        node.data = found.data
        if parent.realm:
            node.index_name = node.data = None  # a graft has no hard-link index and nothing below
        copy = self.realms[parent.realm].copy
        if node.index_name is not None and not node.in_upper and copy is not None:
            node.in_upper = copy.index_exists(node)
        if node.index_name is not None and node.in_upper and not node.lowers and copy is not None:
            if not copy.index_exists(node):
                node.index_name = None  # hard links made in the upper itself, not a lower group
        return node

    def _handed(self, node: Node) -> None:
        """The kernel was handed ``node`` (a lookup's answer or a listing's entry): one more lookup it holds,
        and for a graft's symlink, whose host may have changed it, no kept target (see ``keep_symlinks``)."""
        self.table.remember(node)
        if node.realm:
            self._drop_target(node)

    def _drop_target(self, node: Node) -> None:
        """Make the kernel forget the target it keeps of symlink ``node`` (see ``keep_symlinks``)."""
        if self._targets_kept and node.kind == stat.S_IFLNK:
            try:
                self.invalidate(node.ino)
            except OSError:
                pass  # the kernel does not hold the inode: nothing kept

    def _lookup_found(self, parent: Node, name: bytes) -> Found:
        found = self.realms[parent.realm].resolver.lookup(parent, name)
        if found is None:
            raise _err(errno.ENOENT)
        return found

    def _stat(self, node: Node, found: Found | None = None) -> tuple[os.stat_result, int]:
        """(real stat, union nlink) of a node; ``found`` (a fresh resolution) saves a syscall."""
        st: os.stat_result | None = None
        if found is not None and (node.is_dir or node.index_name is None or not node.in_upper):
            st = found.upper_st or found.lower_st
        if st is None:
            if not node.links and node.ino != ROOT_INO:
                for h in self.files.values():
                    if h.node is node:
                        return os.fstat(h.fd), 0  # open but unlinked
                if node.gone is not None:
                    return node.gone, 0  # removed, still known to the kernel
                raise _err(errno.ENOENT)
            up = self.realms[node.realm].resolver.upper_layer
            if node.in_upper and up is not None:
                if node.index_name is not None and not node.is_dir and self.upper is not None:
                    st = os.stat(node.index_name, dir_fd=self.upper.index_fd, follow_symlinks=False)
                    return st, self._index_nlink(node, st)
                st = up.lstat(node.path)
            else:
                li, lpath = node.lowers[0]
                st = self.lowers[li].lstat(lpath)
            if st is None:
                raise _err(errno.ENOENT)
        if node.is_dir and ((node.in_upper and node.lowers and not node.opaque) or len(node.lowers) > 1):
            return st, 1  # a merged directory, as overlayfs reports it
        return st, st.st_nlink

    def _index_nlink(self, node: Node, st: os.stat_result) -> int:
        assert self.upper is not None and node.index_name is not None
        try:
            return int(
                os.getxattr(
                    proc_path(self.upper.index_fd, node.index_name), self.upper.dialect.nlink, follow_symlinks=False
                )
            )
        except (OSError, ValueError):
            return max(st.st_nlink - 1, 1)

    def _set_index_nlink(self, node: Node, delta: int) -> None:
        assert self.upper is not None and node.index_name is not None
        st = os.stat(node.index_name, dir_fd=self.upper.index_fd, follow_symlinks=False)
        n = self._index_nlink(node, st) + delta
        os.setxattr(
            proc_path(self.upper.index_fd, node.index_name), self.upper.dialect.nlink, b"%d" % n, follow_symlinks=False
        )

    def attrs(self, node: Node, found: Found | None = None) -> Attrs:
        """What the kernel is told of ``node``.

        A lower-only entry of the union keeps its answer on the node: lower layers do not
        change under a mount (an image layer cannot; overlayfs leaves changes to a lower
        directory undefined), and the first change through the mount copies the entry up,
        which ends the reuse. The kernel asks again after each listing or read of it
        (atime), and when its own copy times out.
        """
        if node.attrs is not None and not node.in_upper and node.links:
            return node.attrs
        st, nlink = self._stat(node, found)
        r = self.realms[node.realm]
        e = self.new_attrs()
        e.st_ino = node.ino
        e.generation = 0
        e.entry_timeout = r.timeout
        e.attr_timeout = r.timeout
        uid, gid, mode, rdev = override.apply(st, self._override(node, st)) if self.rootless else (
            st.st_uid, st.st_gid, st.st_mode, st.st_rdev
        )  # fmt: skip
        e.st_mode = mode
        e.st_nlink = nlink
        e.st_uid = r.uidmap.to_inside(uid)
        e.st_gid = r.gidmap.to_inside(gid)
        e.st_rdev = rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        if node.data is not None:
            li, lpath = node.data
            lst = self.lowers[li].lstat(lpath)
            if lst is not None:
                e.st_blocks = lst.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        if not node.in_upper and node.realm == 0 and node.links and found is None:
            # kept once the kernel asks for them again (GETATTR, after a read's atime or a timeout), not
            # for every entry a walk resolves: that would be 200 bytes on each of them (see perf/memory.py)
            node.attrs, node.attrs_reply = e, None
        return e

    def kept_attrs(self, ino: int) -> Node | None:
        """The node of ``ino`` if :meth:`attrs` would answer from what it keeps on it; else None."""
        node = self.table.get(ino)
        if node is None or node.attrs is None or node.in_upper or not node.links:
            return None
        return node

    def _override(self, node: Node, st: os.stat_result) -> override.Override | None:
        """The owner/mode/device override of a node's real entry, if it has one."""
        try:
            at = self._xattr_at(node)
            if isinstance(at, (bytes, int)):
                return override.read(at, st.st_mode)
            return override.decode(at[0].getxattr(at[1], override.XATTR), st.st_mode)
        except (OSError, IndexError):
            return None

    def _room_low(self) -> bool:
        """Whether a file opened for writing now must bypass the writeback cache (:mod:`unionfs.union.space`)."""
        return self.room is not None and self.room.low()

    def statfs(self) -> FsStats:
        layer = self.upper.layer if self.upper is not None else self.lowers[0]
        # by fd, never by path: a path could lead into this very mount (a layer containing the mount point)
        sv = os.statvfs(layer.root_fd if isinstance(layer, DirLayer) else layer.root)
        return FsStats(
            sv.f_bsize, sv.f_frsize, sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_favail,
            sv.f_namemax,
        )  # fmt: skip

    def _killer(self, ctx: Caller | None) -> Caller | None:
        """Who the request being started drops setuid/setgid for, if anyone; call before any await.

        Where the kernel leaves the dropping to us (:meth:`take_privilege_kills`), it says so
        in the request. Otherwise the kernel drops them itself, except on ``open(O_TRUNC)``
        (``ctx`` given), where a caller other than root stands for one without CAP_FSETID
        (the request does not carry capabilities).
        """
        kills = self._kills
        if kills is not None and kills.killpriv:
            return kills.kill_caller
        return ctx if ctx is not None and ctx.uid != 0 else None

    def _drop_privileges(self, node: Node, target: int | bytes, caller: Caller) -> None:
        """Clear setuid and setgid of ``node`` (open as ``target``) as the VFS does for ``caller``.

        Done where the daemon, being root, would keep the bits: when it writes or
        truncates for a caller without CAP_FSETID. setgid goes only if the group may
        execute the file or the caller is not in its group.
        """
        if not self.rootless and isinstance(target, int) and not os.fstat(target).st_mode & 0o6000:
            return  # the common case, without working out the union's attributes
        a = self.attrs(node)
        kill = a.st_mode & stat.S_ISUID
        if a.st_mode & stat.S_ISGID and (a.st_mode & stat.S_IXGRP or not _in_group(caller, a.st_gid)):
            kill |= stat.S_ISGID
        if kill:
            override.chmod(target, stat.S_IMODE(a.st_mode) & ~kill, rootless=self.rootless)

    def _io_flags(self, flags: int) -> int:
        """Open flags for writing a data file: with the writeback cache the kernel also
        reads through a write-only handle (to fill partial pages) and places appends itself."""
        if not self.opts.writeback:
            return flags
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def _xattr_at(self, node: Node) -> tuple[Layer, bytes] | bytes | int:
        """Where a node's xattrs are: a host path (upper, index), an fd (an open orphan) or (lower layer, path)."""
        if not node.links and node.ino != ROOT_INO:
            return self._orphan_file(node, writing=False)
        if node.in_upper and self.realms[node.realm].resolver.upper_layer is not None:
            return proc_path(*self._upper_at(node))
        li, lpath = node.lowers[0]
        return self.lowers[li], lpath

    def _orphan_file(self, node: Node, *, writing: bool) -> int:
        """An fd of an open file of an unlinked ``node``; for ``writing``, one of the upper layer's (a handle
        open for writing, or one opened since its copy-up), never a lower layer's."""
        for h in self.files.values():
            if h.node is node and (not writing or h.writable or (node.in_upper and h.version == node.version)):
                return h.fd
        raise _err(errno.EROFS if writing and any(h.node is node for h in self.files.values()) else errno.ENOENT)

    def _upper_at(self, node: Node) -> tuple[int, bytes]:
        up = self.realms[node.realm].resolver.upper_layer
        assert up is not None
        if node.index_name is not None and self.upper is not None:
            return self.upper.index_fd, node.index_name
        return up.at(node.path)
