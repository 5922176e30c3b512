"""Operations on one entry: lookup, forget, attributes, SETATTR, links' targets and xattrs (overlayfs' ``inode.c``)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from layerstore.host import (
    proc_path,
    release_free_memory,
)

from . import override
from .inodes import ROOT_INO, Node
from .layers import Layer
from .markers import CAPS_XATTR, is_private_xattr
from .namei import Found
from .records import Attrs, Changes, NewAttrs
from .super import (
    FileHandle,
    Super,
    _err,
)


class InodeOps(Super):
    """Operations on one entry."""

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
            self._handed(node)
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

    def keep_symlinks(self) -> None:
        """The kernel keeps a symlink's target once read (``FUSE_CACHE_SYMLINKS``, asked by the FUSE layer).

        A union inode's target never changes while the inode lives, but its number can come
        back for another symlink (the upper file system reuses a removed file's inode number),
        so a symlink that loses a name through the mount has its kept target dropped. A graft's
        host directory can change behind the mount: each of its symlinks has its kept target
        dropped whenever the kernel (re)validates it (lookup or listing), before the reply, so
        a host's change shows as soon as it would without the cache.
        """
        self._targets_kept = True

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        up = self.realms[node.realm].resolver.upper_layer
        if node.in_upper and up is not None:
            if node.index_name is not None and self.upper is not None:
                return os.readlink(node.index_name, dir_fd=self.upper.index_fd)
            return up.readlink(node.path)
        li, lpath = node.lowers[0]
        return self.lowers[li].readlink(lpath)

    async def _copy_meta(self, node: Node) -> None:
        _, copy = self._writable(node)
        if node.is_dir:
            await copy.dir(node)
        else:
            await copy.file(node, data=False)

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

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        node = self.node(ino)
        if node.no_caps and name == CAPS_XATTR:
            raise _err(errno.ENODATA)
        at = self._xattr_at(node)
        names = self._lower_xattrs(node, at)
        if names is not None and name not in names:
            raise _err(errno.ENODATA)
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

    def _lower_xattrs(self, node: Node, at: tuple[Layer, bytes] | bytes | int) -> tuple[bytes, ...] | None:
        """The xattr names a lower-only entry of the union shows (``at`` a lower layer's; our private ones
        left out), listed from its layer once: lower layers do not change while mounted, and a copy-up
        moves the entry's xattrs to the upper layer. None for anything else (upper, a graft's host files,
        an open orphan) or if listing fails."""
        if node.realm != 0 or not isinstance(at, tuple):
            return None
        names = node.lower_xattrs
        if names is None:
            try:
                names = tuple(n for n in at[0].listxattr(at[1]) if not is_private_xattr(n))
            except OSError:
                return None
            node.lower_xattrs = names
        return names

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        at = self._xattr_at(node)
        kept = self._lower_xattrs(node, at)
        if kept is not None:
            return list(kept)
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
