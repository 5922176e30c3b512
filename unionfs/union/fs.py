"""The union filesystem's operations, independent of FUSE's calling conventions.

Every method either returns a result or raises :class:`OSError` with the errno
the caller should see; :mod:`unionfs.fuse.operations` turns that into FUSE replies.

Concurrency protocol (trio): code between two ``await`` points is atomic. Every
operation that changes a layer runs under :attr:`UnionFS.lock`, because copy-up
awaits worker threads and nothing may change the tree under it. Read-only
operations never await and need no lock.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerstore.host import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    fs_magic,
    proc_path,
    release_free_memory,
    renameat2,
)

from . import override, stats
from .copy_up import CopyUp
from .graft import Graft
from .idmap import IdMap
from .inodes import GRAFT_ID, ROOT_INO, InodeTable, Node, make_ino
from .layers import DirLayer, FdCache, Layer, join
from .markers import CAPS_XATTR, WriteDialect, is_marker_name, is_private_xattr
from .mutex import Mutex
from .namei import Found, Resolver
from .readdir import merged_names
from .records import Attrs, Caller, Changes, CreateCaller, FsStats, KillRequests, NewAttrs, Opened
from .settle import DELAY as SETTLE_DELAY
from .space import Room
from .storelayer import StoreLayer
from .upper import Upper

TIMEOUT = 300.0  # seconds: every change passes through us, so the kernel may cache long
LISTING_CACHE = 4096  # lower-only directories whose resolved listing is kept
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
    found: dict[bytes, tuple[Found | None, Attrs | None]] | None = None  # lower-only dir


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


class UnionFS:
    """A union of lower directories under an optional upper directory."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cache = FdCache()
        self.euid = os.geteuid()
        dialect = WriteDialect.probe(opts.work_dir) if opts.work_dir else WriteDialect(b"trusted.")
        self.lowers: list[Layer] = [DirLayer(i, p, self.cache) for i, p in enumerate(opts.lowers)]
        if opts.image is not None:
            self.lowers.append(StoreLayer(len(self.lowers), *opts.image))
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
        self._listings: OrderedDict[int, tuple[Node, list[bytes], dict]] = OrderedDict()  # type: ignore[type-arg]
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

    async def prepare(self) -> None:
        """Make every graft point a directory (created where missing), outer grafts first.

        A point inside another graft is made in that graft's directory (Docker makes the
        mount point inside the outer volume); a point the union lacks is made in its
        upper layer and marked, so it is no change of the container. Raises
        OSError(ENOTDIR) naming the target when a non-directory is there, and EROFS when
        a missing point would have to be made in a read-only graft.
        """
        ctx = _Ctx()
        order = sorted(range(1, len(self.realms)), key=lambda k: self.realms[k].graft.target.count(b"/"))  # type: ignore[union-attr]
        for k in order:
            realm = self.realms[k]
            assert realm.graft is not None
            node = self.table.root
            done = b""
            parts = realm.graft.target.split(b"/")
            for i, name in enumerate(parts):
                done = join(done, name)
                last = i == len(parts) - 1
                outer = self._graft_root(node, name)
                if outer is not None:  # an enclosing graft: go on inside it
                    node = outer
                    continue
                r = self.realms[node.realm]
                found = r.resolver.lookup(node, name)
                if found is None:
                    if r.upper is None:
                        if node.realm:
                            raise OSError(errno.EROFS, "missing inside a read-only mount", "/" + os.fsdecode(done))
                        if last:
                            self.graft_at[(node.ino, name)] = k  # a read-only union shows the point all the same
                        break
                    try:
                        await self._make_graft_point(node, name, done, ctx)
                    except OSError as e:
                        raise OSError(e.errno, e.strerror, "/" + os.fsdecode(done)) from None
                    found = self._lookup_found(node, name)
                elif found.kind != stat.S_IFDIR:
                    raise OSError(errno.ENOTDIR, "not a directory in the union", "/" + os.fsdecode(done))
                if last:
                    self.graft_at[(node.ino, name)] = k  # from now on the name shows the graft
                node = self._found_node(found, node, name)
                self.table.remember(node)  # kept for the daemon's life

    async def _make_graft_point(self, parent: Node, name: bytes, path: bytes, ctx: _Ctx) -> None:
        """mkdir ``name`` in ``parent`` for a graft; in the union's upper it is marked, its parent keeps its times."""
        r = self.realms[parent.realm]
        if parent.realm:  # inside a volume or bind: a plain directory of the host's, as Docker makes it
            assert r.upper is not None
            os.mkdir(name, 0o755, dir_fd=r.upper.layer.dirfd(parent.path))
            return
        before = self._stat(parent)[0]
        await self.mkdir(parent.ino, name, stat.S_IFDIR | 0o755, ctx)
        if self.upper is None:
            return
        os.setxattr(self.upper.layer.xpath(path), self.upper.dialect.graftpoint, b"1", follow_symlinks=False)
        # the parent keeps its times, so a graft point alone is no change of the container
        os.utime(
            self.upper.layer.xpath(parent.path), ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False
        )

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

    # -- helpers -----------------------------------------------------------------
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

    def _lookup_found(self, parent: Node, name: bytes) -> Found:
        found = self.realms[parent.realm].resolver.lookup(parent, name)
        if found is None:
            raise _err(errno.ENOENT)
        return found

    # -- attributes ----------------------------------------------------------------
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

    # -- lookup & listing ------------------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes) -> Attrs:
        parent = self.node(parent_ino)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.links[0][0] if parent.links else self.table.root
        elif (graft := self._graft_root(parent, name)) is not None:
            node = graft
        else:
            found = self.realms[parent.realm].resolver.lookup(parent, name)
            if found is None:
                return self._negative(parent)
            node = self._found_node(found, parent, name)
            a = self.attrs(node, found)
            self.table.remember(node)
            return a
        a = self.attrs(node)
        self.table.remember(node)
        return a

    def _negative(self, parent: Node) -> Attrs:
        """No such entry, cached by the kernel as long as positive entries (inode 0 is a negative dentry).

        Only in the union realm, where every change comes through this mount: the kernel
        turns the negative dentry into a positive one itself on create, mknod, link or
        rename. A graft's host directory may gain names behind our back: ENOENT, uncached.
        """
        if parent.realm:
            raise _err(errno.ENOENT)
        e = self.new_attrs()
        e.st_ino = 0
        e.entry_timeout = self.realms[0].timeout
        return e

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        before = len(self.table)
        for ino, n in items:
            self.table.forget(ino, n)
        if len(items) > 1 and self.table.shrink(before):  # the kernel let go of most of its inodes: so do we
            self._drop_caches()

    def _drop_caches(self) -> None:
        """Drop what is kept of directories: each of them pins the memory its entries' nodes used."""
        self._listings.clear()
        self._listed = 0
        for ino in [i for i, h in self._unopened_dirs.items() if h.names is None or self.table.get(i) is None]:
            del self._unopened_dirs[ino]
        for r in self.realms:
            r.resolver.forget_cache()
        release_free_memory()

    def list_without_open(
        self, request_ino: Callable[[], int], after_reply: Callable[[Callable[[], None]], None]
    ) -> bool:
        """Let the kernel list directories without opening them; True if taken.

        ``request_ino`` gives the inode of the request being served (pyfuse3 does not
        pass it to ``readdir``; :class:`unionfs.fuse.fuseloop.RequestLoop` reads it), and
        ``after_reply`` runs a call once that request is answered, before the next. From
        then on OPENDIR is answered ENOSYS, after which the kernel never sends OPENDIR or
        RELEASEDIR again and keeps every directory's listing (FOPEN_CACHE_DIR), dropping
        it on each change made through the mount. A volume or bind can change behind the
        mount, so after each complete listing of one of theirs the kernel is told to
        forget it (:meth:`_forget_listing`). Only with the listing cache on (``dircache``).
        """
        if not self.opts.dircache:
            return False
        self._request_ino = request_ino
        self._after_reply = after_reply
        return True

    def take_privilege_kills(self, requests: KillRequests) -> None:
        """Drop setuid/setgid where the kernel asks, once it leaves that to us (``killpriv``).

        With ``FUSE_HANDLE_KILLPRIV_V2`` granted, the kernel no longer drops the bits
        itself when a caller without CAP_FSETID writes, truncates or opens with
        ``O_TRUNC``; it marks those requests (``requests.kill_caller``) and the union drops
        the bits as the VFS would (:meth:`_drop_privileges`). chown needs nothing: the
        daemon's own chown of the upper file drops them (and so does the override's).
        """
        self._kills = requests

    def opendir(self, ino: int) -> Opened:
        """A handle for listing ``ino``; the kernel may keep the listing if the union's realm owns it (``dircache``).

        Only the union's own directories change solely through this mount (each change
        makes the kernel drop its copy); a volume or bind can change behind it.
        """
        if self._request_ino is not None:
            raise _err(errno.ENOSYS)  # see list_without_open
        node = self.node(ino)
        fh = self._fh()
        self.dirs[fh] = DirHandle(node)
        return Opened(fh, cache_dir=self.opts.dircache and not node.realm)

    def _unopened(self) -> DirHandle:
        """The listing state of a directory the kernel did not open: one per directory, kept from offset 0."""
        assert self._request_ino is not None
        node = self.node(self._request_ino())
        h = self._unopened_dirs.get(node.ino)
        if h is None or h.node is not node:
            h = self._unopened_dirs[node.ino] = DirHandle(node)
            if len(self._unopened_dirs) > LISTING_CACHE:
                self._unopened_dirs.popitem(last=False)
        else:
            self._unopened_dirs.move_to_end(node.ino)
        return h

    def _forget_listing(self, ino: int) -> None:
        """After this reply, drop the kernel's copy of the listing of ``ino`` (a volume's or bind's).

        Runs once the reply is written, before the next request is read: the kernel
        filled its copy while parsing the earlier replies, so the pages it drops are the
        complete listing, and the next listing asks again.
        """

        def forget() -> None:
            try:
                self.invalidate(ino)
            except OSError:
                pass  # unmounted meanwhile, or the inode is gone: nothing kept

        self._after_reply(forget)

    def readdir(self, fh: int, start: int, emit: Callable[[bytes, Attrs, int], bool]) -> None:
        """List the directory of handle ``fh`` (0: the request's, see :meth:`list_without_open`) from offset ``start``.

        Each entry goes to ``emit(name, attrs, next offset)``, which returns False when the
        reply is full (that entry not taken). An entry taken counts as a lookup (READDIRPLUS).
        """
        h = self.dirs[fh] if fh else self._unopened()
        if start == 0 or h.names is None:
            self._take_listing(h)  # rewinddir sees changes
        if self._send_entries(h, start, emit) == 0 and not fh:  # the empty reply that ends a listing
            if self._unopened_dirs.get(h.node.ino) is h:
                del self._unopened_dirs[h.node.ino]  # nothing to continue (memory: the listing cache is bounded)
            if h.node.realm:
                self._forget_listing(h.node.ino)

    def _send_entries(self, h: DirHandle, start: int, emit: Callable[[bytes, Attrs, int], bool]) -> int:
        """Reply with the entries from ``start`` on; returns how many, or -1 if the reply is full."""
        names = h.names
        assert names is not None
        sent = 0
        for i in range(start, len(names)):
            name = names[i]
            if i < 2:
                target = h.node if i == 0 else (h.node.links[0][0] if h.node.links else h.node)
                if not emit(name, self._dot_attrs(target.ino), i + 1):
                    return -1
                sent += 1
                continue
            graft = self._graft_root(h.node, name)
            if graft is not None:
                node, found, known = graft, None, None
            else:
                cached = h.found.get(name) if h.found is not None else None
                resolver = self.realms[h.node.realm].resolver
                found, known = cached if cached is not None else (resolver.lookup(h.node, name), None)
                if found is None:
                    if h.found is not None:
                        h.found[name] = (None, None)
                    continue
                node = self._found_node(found, h.node, name)
            try:
                a = known if known is not None and not node.in_upper else self.attrs(node, found)
                if h.found is not None and known is None:
                    if not node.in_upper and found is not None:
                        found.lower_st = None  # its attributes are kept as ``a``: the stat is not needed again
                    h.found[name] = (found, None if node.in_upper else a)
            except FileNotFoundError:
                self.table.maybe_drop(node)
                continue
            if not emit(name, a, i + 1):
                self.table.maybe_drop(node)
                return -1
            self.table.remember(node)
            sent += 1
        return sent

    def _take_listing(self, h: DirHandle) -> None:
        """The names of an open directory, and for one that lies only in lower layers, their resolutions.

        Lower layers do not change, and a directory gets an upper part (copy-up)
        before anything in it can change, so the listing of a lower-only directory
        is resolved once and kept (bounded LRU) for every later read of it.
        """
        node = h.node
        if node.in_upper or node.realm:
            h.names, h.found = [b".", b".."] + self._names(node), None
            return
        hit = self._listings.get(node.ino)
        if hit is not None and hit[0] is node:
            self._listings.move_to_end(node.ino)
            h.names, h.found = hit[1], hit[2]
            return
        h.names = [b".", b".."] + self._names(node)
        resolver = self.realms[node.realm].resolver
        h.found = {n: (f, None) for n, f in resolver.lookup_listing(node, h.names[2:])}
        old = self._listings.pop(node.ino, None)
        if old is not None:
            self._listed -= len(old[2])
        self._listings[node.ino] = (node, h.names, h.found)
        self._listed += len(h.found)
        while self._listings and (len(self._listings) > LISTING_CACHE or self._listed > LISTING_ENTRIES):
            self._listed -= len(self._listings.popitem(last=False)[1][2])

    def _names(self, node: Node) -> list[bytes]:
        names = merged_names(self.realms[node.realm].resolver, node)
        if self.graft_at:
            have = set(names)
            names += [n for (ino, n) in self.graft_at if ino == node.ino and n not in have]
        return names

    def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        up = self.realms[node.realm].resolver.upper_layer
        if node.in_upper and up is not None:
            if node.index_name is not None and self.upper is not None:
                return os.readlink(node.index_name, dir_fd=self.upper.index_fd)
            return up.readlink(node.path)
        li, lpath = node.lowers[0]
        return self.lowers[li].readlink(lpath)

    def _is_empty(self, node: Node) -> bool:
        resolver = self.realms[node.realm].resolver
        return all(resolver.lookup(node, n) is None for n in merged_names(resolver, node))

    # -- files -------------------------------------------------------------------------
    def _data_fd(self, node: Node, flags: int) -> int:
        """Open the file that holds ``node``'s data."""
        if node.data is not None and (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC:
            li, lpath = node.data
            return self.lowers[li].open(lpath, flags)
        up = self.realms[node.realm].resolver.upper_layer
        if node.in_upper and up is not None:
            if node.index_name is not None and self.upper is not None:
                return os.open(node.index_name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.upper.index_fd)
            return up.open(node.path, flags)
        li, lpath = node.lowers[0]
        return self.lowers[li].open(lpath, flags)

    def _io_flags(self, flags: int) -> int:
        """Open flags for writing a data file: with the writeback cache the kernel also
        reads through a write-only handle (to fill partial pages) and places appends itself."""
        if not self.opts.writeback:
            return flags
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def _io_fd(self, node: Node, flags: int) -> int:
        """Open ``node``'s data for writing (:meth:`_io_flags`); write-only where reading is refused
        (a plain-user daemon and a mode 0200 file)."""
        io = self._io_flags(flags)
        try:
            return self._data_fd(node, io)
        except PermissionError:
            if io & os.O_ACCMODE == flags & os.O_ACCMODE:
                raise
            return self._data_fd(node, (io & ~os.O_ACCMODE) | (flags & os.O_ACCMODE))

    async def open(self, ino: int, flags: int, ctx: Caller | None = None) -> Opened:
        node = self.node(ino)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        killer = self._killer(ctx if flags & os.O_TRUNC else None)
        real = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)
        if writable or flags & os.O_TRUNC:
            _, copy = self._writable(node)
            async with self.lock:
                truncating = bool(flags & os.O_TRUNC)
                # settled behind the open, unless every write to it must be durable at once
                await copy.file(node, data=not truncating, defer=not flags & os.O_DSYNC)
                if truncating and node.metacopy:
                    copy.drop_metacopy(node)  # the open below empties the file
                fd = self._io_fd(node, real)
                if killer is not None:
                    self._drop_privileges(node, fd, killer)
        else:
            fd = self._data_fd(node, real)
        fh = self._fh()
        self.files[fh] = FileHandle(node, fd, writable, node.version)
        node.opens += 1
        # keep_cache: a volume may change behind our back; direct_io: see unionfs.union.space
        return Opened(fh, keep_cache=node.realm == 0, direct_io=writable and self._room_low())

    def passthrough_fd(self, fh: int) -> int | None:
        """The fd of open file ``fh`` if the kernel may read and write its file directly; else None.

        That is so when the file cannot be replaced while open: it is in the upper layer
        (or a graft) with its data (not a metadata-only copy), or it is in a lower layer
        of a realm that nothing can be copied up into. A lower file that may yet be copied
        up is not, so that a reader follows the copy-up (:meth:`read`), as in overlayfs.
        A file with setuid or setgid is not either: the kernel would write it without
        dropping them. Nor is a file on anything but a local disk file system
        (:data:`PASSTHROUGH_FS`): a network or FUSE file system (a volume driver's) may act
        on the flush at close, which the kernel does not send for a backing file.
        """
        h = self.files[fh]
        node = h.node
        if node.metacopy or node.kind != stat.S_IFREG:
            return None
        if not node.in_upper and self.realms[node.realm].upper is not None:
            return None
        st = os.fstat(h.fd)
        if st.st_mode & 0o6000:
            return None
        local = self._local_dev.get(st.st_dev)
        if local is None:
            local = self._local_dev[st.st_dev] = fs_magic(h.fd) in PASSTHROUGH_FS
        return h.fd if local else None

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

    def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.files[fh]
        if h.version != h.node.version and not h.writable and h.node.links:
            # The file was copied up since this handle was opened: follow it.
            fd = self._data_fd(h.node, os.O_RDONLY)
            os.close(h.fd)
            h.fd, h.version = fd, h.node.version
        return os.pread(h.fd, size, off)

    def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.files[fh]
        kills = self._kills
        if kills is not None and kills.kill_caller is not None:
            self._drop_privileges(h.node, h.fd, kills.kill_caller)
        return os.pwrite(h.fd, buf, off)

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self.files[fh]
        copy = self.realms[h.node.realm].copy
        if copy is not None and copy.settler is not None:
            copy.settler.settle(h.node.ino)  # its copy-up first, so no crash can undo what this syncs
        (os.fdatasync if datasync else os.fsync)(h.fd)

    def release(self, fh: int) -> None:
        h = self.files.pop(fh)
        os.close(h.fd)
        h.node.opens -= 1
        self.table.maybe_drop(h.node)

    # -- creating entries ------------------------------------------------------------------
    def _owner(self, parent: Node, ctx: CreateCaller, parent_st: os.stat_result) -> tuple[int, int]:
        """The ids a new entry gets on disk: its creator's, mapped out of the mount (EOVERFLOW if unmapped)."""
        r = self.realms[parent.realm]
        try:
            uid = r.uidmap.to_outside(ctx.uid)
            gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else r.gidmap.to_outside(ctx.gid)
        except OSError:
            raise _err(errno.EOVERFLOW) from None
        return uid, gid

    async def _prepare_create(self, parent: Node, name: bytes) -> tuple[Upper, int, bool, os.stat_result]:
        """Common start of every creation: checks, parent copy-up; returns (upper, dirfd, over_whiteout, parent st)."""
        self._check_new_name(name)
        upper, copy = self._writable(parent)
        if self._graft_root(parent, name) is not None or self.realms[parent.realm].resolver.lookup(parent, name):
            raise _err(errno.EEXIST)
        await copy.dir(parent)
        pfd = upper.layer.dirfd(parent.path)
        over = upper.is_whiteout_at(pfd, name)
        pst = os.stat(".", dir_fd=pfd)
        return upper, pfd, over, pst

    def _new_node(self, parent: Node, name: bytes, found: Found | None = None) -> tuple[Node, Attrs]:
        """The node and attributes of an entry just made in ``parent`` (resolved unless ``found`` is given)."""
        found = found or self._lookup_found(parent, name)
        node = self._found_node(found, parent, name)
        a = self.attrs(node, found)
        self.table.remember(node)
        return node, a

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: CreateCaller
    ) -> tuple[Opened, Attrs]:
        parent = self.node(parent_ino)
        async with self.lock:
            upper, pfd, over, pst = await self._prepare_create(parent, name)
            oflags = (
                (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_DIRECT)) | os.O_CREAT | os.O_EXCL
            )
            oflags = self._io_flags(oflags) | os.O_NOFOLLOW | os.O_CLOEXEC
            uid, gid = self._owner(parent, ctx, pst)
            if over:
                tmp = upper.tmpname()
                fd = os.open(tmp, oflags, stat.S_IMODE(mode), dir_fd=upper.work_fd)
                self._chown_new(fd, uid, gid)
                upper.place(tmp, pfd, name, is_dir=False)
            else:
                fd = os.open(name, oflags, stat.S_IMODE(mode), dir_fd=pfd)
                self._chown_new(fd, uid, gid)
            # A new upper file: no origin, no lower, no index -- no need to resolve the name again.
            st = os.fstat(fd)
            resolver = self.realms[parent.realm].resolver
            ino = resolver.ino(resolver.upper_id, st.st_ino)
            node, a = self._new_node(parent, name, Found(ino, stat.S_IFREG, st, None))
        node.no_caps = node.realm == 0  # a new file has no capabilities (they are never inherited)
        fh = self._fh()
        self.files[fh] = FileHandle(node, fd, True, node.version)
        node.opens += 1
        return Opened(fh, keep_cache=True, direct_io=self._room_low()), a

    def _dot_attrs(self, ino: int) -> Attrs:
        """Attributes for a ``.`` or ``..`` entry: the kernel takes only the number and type from them."""
        e = self.new_attrs()
        e.st_ino = ino
        e.st_mode = stat.S_IFDIR
        return e

    def _room_low(self) -> bool:
        """Whether a file opened for writing now must bypass the writeback cache (:mod:`unionfs.union.space`)."""
        return self.room is not None and self.room.low()

    def _chown_new(self, target: int | bytes, uid: int, gid: int) -> None:
        """Give a new entry its creator's ids, keeping set-id bits that chown would clear.

        Rootless, ids the daemon cannot give go to the override xattr.
        """
        st = os.fstat(target) if isinstance(target, int) else os.stat(target, follow_symlinks=False)
        if (st.st_uid, st.st_gid) == (uid, gid):
            return
        if self.euid != 0 and not self.rootless:
            return
        override.chown(target, uid, gid, rootless=self.rootless)
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
            if isinstance(target, int):
                os.fchmod(target, stat.S_IMODE(st.st_mode))
            else:
                os.chmod(target, stat.S_IMODE(st.st_mode))

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: CreateCaller) -> Attrs:
        parent = self.node(parent_ino)
        async with self.lock:
            upper, pfd, over, pst = await self._prepare_create(parent, name)
            uid, gid = self._owner(parent, ctx, pst)
            perm = stat.S_IMODE(mode)
            if pst.st_mode & stat.S_ISGID:
                perm |= stat.S_ISGID
            if over or self.realms[parent.realm].resolver.lower_visible(parent, name):
                tmp = upper.tmpname()
                os.mkdir(tmp, 0o700, dir_fd=upper.work_fd)
                tpath = proc_path(upper.work_fd, tmp)
                upper.set_opaque(upper.work_fd, tmp)
                self._chown_new(tpath, uid, gid)
                os.chmod(tpath, perm)
                upper.place(tmp, pfd, name, is_dir=True)
            else:
                os.mkdir(name, perm, dir_fd=pfd)
                self._chown_new(proc_path(pfd, name), uid, gid)
                if perm & stat.S_ISGID:
                    os.chmod(proc_path(pfd, name), perm)
            return self._new_node(parent, name)[1]

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: CreateCaller) -> Attrs:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM)  # a 0/0 device would be a whiteout, as overlayfs refuses it
        parent = self.node(parent_ino)
        async with self.lock:
            upper, pfd, over, pst = await self._prepare_create(parent, name)
            uid, gid = self._owner(parent, ctx, pst)
            dfd, dname = (upper.work_fd, upper.tmpname()) if over else (pfd, name)
            try:
                os.mknod(dname, mode, rdev, dir_fd=dfd)
            except PermissionError:
                if not self.rootless or not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
                    raise
                # rootless: a device is an empty file whose override says what it is
                os.close(os.open(dname, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd))
                st = os.stat(dname, dir_fd=dfd)
                override.record(proc_path(dfd, dname), override.Override(st.st_uid, st.st_gid, mode, rdev))
            self._chown_new(proc_path(dfd, dname), uid, gid)
            if over:
                upper.place(dname, pfd, name, is_dir=False)
            return self._new_node(parent, name)[1]

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, ctx: CreateCaller) -> Attrs:
        parent = self.node(parent_ino)
        async with self.lock:
            upper, pfd, over, pst = await self._prepare_create(parent, name)
            uid, gid = self._owner(parent, ctx, pst)
            dfd, dname = (upper.work_fd, upper.tmpname()) if over else (pfd, name)
            os.symlink(target, dname, dir_fd=dfd)
            self._chown_new(proc_path(dfd, dname), uid, gid)
            if over:
                upper.place(dname, pfd, name, is_dir=False)
            return self._new_node(parent, name)[1]

    async def link(self, ino: int, parent_ino: int, name: bytes) -> Attrs:
        node = self.node(ino)
        parent = self.node(parent_ino)
        if node.realm != parent.realm:
            raise _err(errno.EXDEV)
        async with self.lock:
            upper, pfd, over, _ = await self._prepare_create(parent, name)
            copy = self._writable(parent)[1]
            await copy.file(node, data=True)
            pfd = upper.layer.dirfd(parent.path)
            if node.index_name is not None:
                sfd, sname = upper.index_fd, node.index_name
            else:
                sfd, sname = upper.layer.at(node.path)
            dfd, dname = (upper.work_fd, upper.tmpname()) if over else (pfd, name)
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            if over:
                upper.place(dname, pfd, name, is_dir=False)
            if node.index_name is not None:
                self._set_index_nlink(node, +1)
            node.add_link(parent, name)
            return self._new_node(parent, name)[1]

    # -- removing entries ---------------------------------------------------------------
    async def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        async with self.lock:
            upper, copy = self._writable(parent)
            self._graft_busy(parent, name)
            found = self._lookup_found(parent, name)
            if found.kind == stat.S_IFDIR:
                raise _err(errno.EISDIR)
            node = self._found_node(found, parent, name)
            if node.index_name is not None:
                await copy.file(node, data=True)  # the other names keep the data
                self._set_index_nlink(node, -1)
                found = self._lookup_found(parent, name)
            await self._remove(parent, name, found, is_dir=False)
            node.drop_link(parent, name)
            self._orphaned(node, found)
            self.table.maybe_drop(node)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        async with self.lock:
            self._writable(parent)
            self._graft_busy(parent, name)
            found = self._lookup_found(parent, name)
            if found.kind != stat.S_IFDIR:
                raise _err(errno.ENOTDIR)
            node = self._found_node(found, parent, name)
            if not self._is_empty(node):
                raise _err(errno.ENOTEMPTY)
            await self._remove(parent, name, found, is_dir=True)
            node.links = []
            self._orphaned(node, found)
            self.table.maybe_drop(node)

    @staticmethod
    def _orphaned(node: Node, found: Found | None) -> None:
        """``node`` lost a name; if that was its last, keep its attributes for the kernel, which may still ask.

        After ``rm`` of a file written through the writeback cache, the kernel sends the
        file's times (SETATTR) when it writes the inode back, and ``fstat`` of a removed
        directory still asks: overlayfs answers both from the orphan inode, and so do we.
        """
        if not node.links and found is not None:
            node.gone = found.upper_st or found.lower_st

    async def _remove(self, parent: Node, name: bytes, found: Found, *, is_dir: bool) -> None:
        """Take ``name`` out of the union: delete its upper part, whiteout its lower part."""
        upper, copy = self._writable(parent)
        need_wh = self.realms[parent.realm].resolver.lower_visible(parent, name)
        await copy.dir(parent)
        pfd = upper.layer.dirfd(parent.path)
        if found.upper_st is None:
            upper.mknod_whiteout(pfd, name)
            return
        if not is_dir:
            if need_wh:
                upper.whiteout_over(pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
            return
        tmp = upper.tmpname()
        if need_wh:
            os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=upper.work_fd)
            renameat2(upper.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
        else:
            renameat2(pfd, name, upper.work_fd, tmp)
        upper.layer.forget_dirs()
        upper.remove_tree(upper.work_fd, tmp)

    # -- rename -------------------------------------------------------------------------
    async def rename(self, old_ino: int, old: bytes, new_ino: int, new: bytes, flags: int) -> None:
        p1, p2 = self.node(old_ino), self.node(new_ino)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        self._check_new_name(new)
        if p1.realm != p2.realm:
            raise _err(errno.EXDEV)
        resolver = self.realms[p1.realm].resolver
        async with self.lock:
            upper, copy = self._writable(p1)
            self._graft_busy(p1, old)
            self._graft_busy(p2, new)
            src = self._lookup_found(p1, old)
            dst = resolver.lookup(p2, new)
            exchange = bool(flags & RENAME_EXCHANGE)
            if dst is not None and flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            if exchange and dst is None:
                raise _err(errno.ENOENT)
            if dst is not None and dst.ino == src.ino:
                return
            src_node = self._found_node(src, p1, old)
            dst_node = self._found_node(dst, p2, new) if dst is not None else None
            if dst is not None and not exchange:
                if src.kind == stat.S_IFDIR and dst.kind != stat.S_IFDIR:
                    raise _err(errno.ENOTDIR)
                if src.kind != stat.S_IFDIR and dst.kind == stat.S_IFDIR:
                    raise _err(errno.EISDIR)
                if dst_node is not None and dst.kind == stat.S_IFDIR and not self._is_empty(dst_node):
                    raise _err(errno.ENOTEMPTY)
            await self._move_prepare(src_node, p2, new)
            if exchange:
                assert dst_node is not None
                await self._move_prepare(dst_node, p1, old)
            await copy.dir(p2)
            src_wh = not exchange and resolver.lower_visible(p1, old)
            if dst_node is not None and dst_node.index_name is not None and not exchange:
                await copy.file(dst_node, data=True)
                self._set_index_nlink(dst_node, -1)
            if dst is not None:
                dst = resolver.lookup(p2, new)
            pfd1 = upper.layer.dirfd(p1.path)
            pfd2 = upper.layer.dirfd(p2.path)
            if exchange:
                renameat2(pfd1, old, pfd2, new, RENAME_EXCHANGE)
            else:
                self._rename_into(upper, pfd1, old, pfd2, new, src.kind == stat.S_IFDIR, dst, src_wh)
            if src.kind == stat.S_IFDIR or (dst is not None and dst.kind == stat.S_IFDIR):
                upper.layer.forget_dirs()
            self._relink(src_node, p1, old, p2, new)
            if dst_node is not None:
                if exchange:
                    self._relink(dst_node, p2, new, p1, old)
                else:
                    dst_node.drop_link(p2, new)
                    if dst_node.is_dir:
                        dst_node.links = []
                    self._orphaned(dst_node, dst)
                    self.table.maybe_drop(dst_node)

    async def _move_prepare(self, node: Node, to_parent: Node, to_name: bytes) -> None:
        """Copy ``node`` up and mark it so that it keeps its own lower parts at its new place."""
        upper, copy = self._writable(node)
        if not node.is_dir:
            await copy.file(node, data=False)
            return
        await copy.dir(node)
        parent, name = node.links[0]
        pfd = upper.layer.dirfd(parent.path)
        if node.lowers and not node.opaque:
            xp = proc_path(pfd, name)
            try:
                os.getxattr(xp, upper.dialect.redirect, follow_symlinks=False)
            except OSError:
                upper.set_redirect(pfd, name, node.lowers[0][1])
        elif not node.opaque and self._lower_whiteout_target(to_parent, to_name):
            upper.set_opaque(pfd, name)
            node.opaque = True

    def _lower_whiteout_target(self, parent: Node, name: bytes) -> bool:
        """True if a lower layer has an entry at ``name`` that the upper whites out."""
        return bool(parent.lowers) and any(
            self.lowers[li].lstat(join(lp, name)) is not None for li, lp in parent.lowers
        )

    def _rename_into(
        self, upper: Upper, pfd1: int, old: bytes, pfd2: int, new: bytes, is_dir: bool, dst: Found | None, src_wh: bool
    ) -> None:
        if dst is not None and dst.upper_st is not None and dst.kind == stat.S_IFDIR:
            upper.empty_dir(pfd2, new)  # only whiteouts are left in it
        if is_dir and dst is None and upper.is_whiteout_at(pfd2, new):
            try:
                os.stat(new, dir_fd=pfd2, follow_symlinks=False)
                renameat2(pfd1, old, pfd2, new, RENAME_EXCHANGE)  # the whiteout lands at the source
                if not src_wh:
                    os.unlink(old, dir_fd=pfd1)
                return
            except FileNotFoundError:
                pass  # a .wh. file, not an entry in the way
        if src_wh:
            try:
                renameat2(pfd1, old, pfd2, new, RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
            renameat2(pfd1, old, pfd2, new)
            upper.mknod_whiteout(pfd1, old)
        else:
            renameat2(pfd1, old, pfd2, new)

    @staticmethod
    def _relink(node: Node, p1: Node, old: bytes, p2: Node, new: bytes) -> None:
        if node.is_dir:
            node.links = [(p2, new)]
        else:
            node.drop_link(p1, old)
            node.links.insert(0, (p2, new))

    # -- attributes and xattrs ---------------------------------------------------------
    async def _copy_meta(self, node: Node) -> None:
        _, copy = self._writable(node)
        if node.is_dir:
            await copy.dir(node)
        else:
            await copy.file(node, data=False)

    def _upper_at(self, node: Node) -> tuple[int, bytes]:
        up = self.realms[node.realm].resolver.upper_layer
        assert up is not None
        if node.index_name is not None and self.upper is not None:
            return self.upper.index_fd, node.index_name
        return up.at(node.path)

    async def setattr(self, ino: int, attr: NewAttrs, fields: Changes, fh: int | None) -> Attrs:
        node = self.node(ino)
        r = self.realms[node.realm]
        killer = self._killer(None) if fields.update_size else None  # a truncation for a caller without CAP_FSETID
        if fields.update_uid or fields.update_gid:  # ids as the mount shows them -> ids on disk (EINVAL if unmapped)
            attr.st_uid = r.uidmap.to_outside(attr.st_uid) if fields.update_uid else attr.st_uid
            attr.st_gid = r.gidmap.to_outside(attr.st_gid) if fields.update_gid else attr.st_gid
        async with self.lock:
            _, copy = self._writable(node)
            handle = self.files.get(fh) if fh is not None else None
            if fields.update_size and not node.is_dir:
                await copy.file(node, data=attr.st_size != 0)
                if node.metacopy:
                    copy.drop_metacopy(node)
            elif node.links:
                await self._copy_meta(node)
            if not node.links:  # unlinked but open: only a handle reaches it
                if handle is None or not handle.writable:
                    handle = self._writable_handle(node)
                if handle is None:
                    if node.gone is not None:  # an orphan: the change is its last word, as on an orphan inode
                        node.gone = _with_attrs(node.gone, attr, fields)
                    return self.attrs(node)  # nothing of it is in the upper layer to change
            if handle is not None and handle.writable:
                self._apply_attrs(handle.fd, attr, fields, False)  # open for writing: the upper file
                if killer is not None:
                    self._drop_privileges(node, handle.fd, killer)
                if node.index_name is None and node.links:
                    st = os.fstat(handle.fd)  # what a path would reach, without walking it
                    return self.attrs(node, Found(node.ino, node.kind, st, None))
            else:
                self._apply_attrs(self._upper_at(node), attr, fields, node.kind == stat.S_IFLNK)
                if killer is not None:
                    self._drop_privileges(node, proc_path(*self._upper_at(node)), killer)
            return self.attrs(node)

    def _writable_handle(self, node: Node) -> FileHandle | None:
        """A handle open for writing on ``node`` (its fd is the upper file; a read-only one may be a lower's)."""
        return next((h for h in self.files.values() if h.node is node and h.writable), None)

    def _apply_attrs(
        self,
        where: int | tuple[int, bytes],
        attr: NewAttrs,
        fields: Changes,
        is_link: bool,
    ) -> None:
        """Apply a setattr to an upper file given as an fd or as (dirfd, name).

        By name, owner and times go through ``fchownat``/``utimensat`` (no ``/proc``
        walk) unless rootless, where the override xattr may be involved.
        """
        fd = where if isinstance(where, int) else -1  # (unused when ``at`` is given)
        at = where if not isinstance(where, int) else None
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if at is not None and not self.rootless:
                os.chown(at[1], uid, gid, dir_fd=at[0], follow_symlinks=False)
            else:
                override.chown(fd if at is None else proc_path(*at), uid, gid, rootless=self.rootless)
        if fields.update_mode and not is_link:
            override.chmod(fd if at is None else proc_path(*at), stat.S_IMODE(attr.st_mode), rootless=self.rootless)
        if fields.update_size:
            if at is None:
                os.ftruncate(fd, attr.st_size)
            else:
                tfd = os.open(at[1], os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at[0])
                try:
                    os.ftruncate(tfd, attr.st_size)
                finally:
                    os.close(tfd)
        if fields.update_atime or fields.update_mtime:
            if fields.update_atime and fields.update_mtime:
                times = (attr.st_atime_ns, attr.st_mtime_ns)
            else:
                st = os.fstat(fd) if at is None else os.stat(at[1], dir_fd=at[0], follow_symlinks=False)
                at_ns = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                times = (at_ns, attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            if at is None:
                os.utime(fd, ns=times)
            else:
                os.utime(at[1], ns=times, dir_fd=at[0], follow_symlinks=False)

    def _xattr_at(self, node: Node) -> tuple[Layer, bytes] | bytes | int:
        """Where a node's xattrs are: a host path (upper, index), an fd (an open orphan) or (lower layer, path)."""
        if not node.links and node.ino != ROOT_INO:
            return self._orphan_file(node, writing=False)
        if node.in_upper and self.realms[node.realm].resolver.upper_layer is not None:
            return proc_path(*self._upper_at(node))
        li, lpath = node.lowers[0]
        return self.lowers[li], lpath

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        node = self.node(ino)
        if node.no_caps and name == CAPS_XATTR:
            raise _err(errno.ENODATA)
        at = self._xattr_at(node)
        try:
            if isinstance(at, int):
                return os.getxattr(at, name)
            if isinstance(at, bytes):
                return os.getxattr(at, name, follow_symlinks=False)
            return at[0].getxattr(at[1], name)
        except OSError as e:
            # Only this daemon changes the union's layers while mounted; a graft's host may not.
            if e.errno == errno.ENODATA and name == CAPS_XATTR and node.realm == 0:
                node.no_caps = True
            raise

    def listxattr(self, ino: int) -> list[bytes]:
        at = self._xattr_at(self.node(ino))
        if isinstance(at, int):
            names = [os.fsencode(n) for n in os.listxattr(at)]
        elif isinstance(at, bytes):
            names = [os.fsencode(n) for n in os.listxattr(at, follow_symlinks=False)]
        else:
            names = at[0].listxattr(at[1])
        return [n for n in names if not is_private_xattr(n)]

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if is_private_xattr(name):
            raise _err(errno.EPERM)
        node = self.node(ino)
        node.no_caps = False
        async with self.lock:
            if not node.links and node.ino != ROOT_INO:  # open but unlinked: its open file is all there is
                os.setxattr(self._orphan_file(node, writing=True), name, value)
                return
            await self._copy_meta(node)
            os.setxattr(proc_path(*self._upper_at(node)), name, value, follow_symlinks=False)

    async def removexattr(self, ino: int, name: bytes) -> None:
        if is_private_xattr(name):
            raise _err(errno.EPERM)
        self.getxattr(ino, name)  # ENODATA before any copy-up
        node = self.node(ino)
        async with self.lock:
            if not node.links and node.ino != ROOT_INO:
                os.removexattr(self._orphan_file(node, writing=True), name)
                return
            await self._copy_meta(node)
            os.removexattr(proc_path(*self._upper_at(node)), name, follow_symlinks=False)

    def _orphan_file(self, node: Node, *, writing: bool) -> int:
        """An fd of an open file of an unlinked ``node``; for ``writing``, one of the upper layer's (a handle
        open for writing, or one opened since its copy-up), never a lower layer's."""
        for h in self.files.values():
            if h.node is node and (not writing or h.writable or (node.in_upper and h.version == node.version)):
                return h.fd
        raise _err(errno.EROFS if writing and any(h.node is node for h in self.files.values()) else errno.ENOENT)

    def statfs(self) -> FsStats:
        layer = self.upper.layer if self.upper is not None else self.lowers[0]
        # by fd, never by path: a path could lead into this very mount (a layer containing the mount point)
        sv = os.statvfs(layer.root_fd if isinstance(layer, DirLayer) else layer.root)
        return FsStats(
            sv.f_bsize, sv.f_frsize, sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_favail,
            sv.f_namemax,
        )  # fmt: skip


def _with_attrs(st: os.stat_result, attr: NewAttrs, fields: Changes) -> os.stat_result:
    """``st`` with a SETATTR's fields applied (for an orphan, which has no file left to change)."""
    v = list(st)
    names = ("st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev")
    extra = {k: getattr(st, k) for k in names}
    if fields.update_mode:
        v[stat.ST_MODE] = stat.S_IFMT(st.st_mode) | stat.S_IMODE(attr.st_mode)
    if fields.update_uid:
        v[stat.ST_UID] = attr.st_uid
    if fields.update_gid:
        v[stat.ST_GID] = attr.st_gid
    if fields.update_size:
        v[stat.ST_SIZE] = attr.st_size
    if fields.update_atime:
        extra["st_atime_ns"] = attr.st_atime_ns
    if fields.update_mtime:
        extra["st_mtime_ns"] = attr.st_mtime_ns
    for i, k in ((stat.ST_ATIME, "st_atime_ns"), (stat.ST_MTIME, "st_mtime_ns"), (stat.ST_CTIME, "st_ctime_ns")):
        v[i] = extra[k] // 10**9
    return os.stat_result(v, extra)
