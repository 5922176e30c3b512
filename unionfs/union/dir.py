"""Changing directories: create, mkdir, mknod, symlink, link, unlink, rmdir and rename (overlayfs' ``dir.c``)."""

from __future__ import annotations

import errno
import os
import stat

from layerstore.host import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    proc_path,
    renameat2,
)

from . import override
from .inodes import Node
from .layers import join
from .namei import Found
from .readdir import merged_names
from .records import Attrs, CreateCaller, Opened
from .super import FileHandle, Super, _Ctx, _err
from .upper import Upper


class DirOps(Super):
    """Operations that change directories."""

    def _is_empty(self, node: Node) -> bool:
        resolver = self.realms[node.realm].resolver
        return all(resolver.lookup(node, n) is None for n in merged_names(resolver, node))

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
            self._drop_target(node)
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
                    self._drop_target(dst_node)
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
