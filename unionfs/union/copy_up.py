"""Copy-up: bringing a lower entry into the upper layer before it is changed.

Guarantees:

* atomic: the copy is built in the work directory and renamed into place; a
  crash leaves the lower entry visible and a temporary that the next mount
  removes;
* faithful: mode, owner, atime/mtime and every non-private xattr are copied;
  sparse files stay sparse (``SEEK_DATA``/``SEEK_HOLE``), data moves with
  ``copy_file_range`` (a reflink where the filesystem can), and copies bigger
  than :data:`THREAD_THRESHOLD` run in a worker thread, off the trio loop;
* crash-safe: after a crash an upper entry made by copy-up is either absent (the
  lower shows, as before) or holds all of its data -- never a hole or an empty
  file. Overlayfs gets this from an ``fsync`` per copy (a journal commit);
  where the upper filesystem orders its journal after written data (ext4 with a
  journal, xfs: :func:`~layerstore.host.journal_orders_data`) the data is written
  out and waited for instead (``sync_file_range``, no commit: several times cheaper
  for a small file, see perf/README.md), and its allocation then commits no later than the rename.
  Elsewhere it is ``fsync``. Nothing for a ``volatile`` mount. ``tests/test_crash.py``
  checks this by shutting the filesystem down without flushing its log. A
  file copied up for an ``open`` (``defer``) is published before that wait, marked,
  and settled behind the request (:mod:`unionfs.union.settle`);
* metadata-only: a regular file can be copied up without its data (``metacopy``);
  its upper entry is a sparse file of the right size marked as overlayfs does
  (``overlay.metacopy`` and an absolute ``overlay.redirect`` to the data), which
  stays the source of reads until :meth:`CopyUp.data` copies it (on the first
  open for writing);
* hard links: a lower file with several links is copied once into the index
  (``WORKDIR/unionmount-index/<ino>``) and linked from there, so all its names
  stay one inode (see :mod:`unionfs.union.inodes`).

Callers hold the filesystem's mutation lock: copy-up awaits (threads), and no
other change may interleave with one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

from layerstore.host import RENAME_NOREPLACE, journal_orders_data, proc_path, renameat2, write_out

from . import override
from .inodes import Node
from .layers import Layer
from .markers import CAPS_XATTR, is_private_xattr
from .namei import Resolver
from .storelayer import fetched
from .upper import Upper

if TYPE_CHECKING:
    from .settle import Settler

THREAD_THRESHOLD = 1 << 20
_FALLBACK_ERRNOS = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)


Settle = Callable[[int], None]
"""What makes a copy's data safe before the step that publishes it: ``os.fsync`` or ``write_out``."""


def copy_data(src: int, dst: int, size: int, settle: Settle | None = None, dense: bool = False) -> None:
    """Copy ``size`` bytes between fds at the same offsets, keeping holes as holes, then ``settle(dst)``.

    ``dense``: the source has blocks for all of its size (no holes to look for).
    """
    if dense:
        _copy_range(src, dst, 0, size)
        if settle:
            settle(dst)
        return
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, hole - data)
        off = hole
    os.ftruncate(dst, size)
    if settle:
        settle(dst)


def _copy_range(src: int, dst: int, off: int, n: int) -> None:
    while n > 0:
        try:
            k = os.copy_file_range(src, dst, min(n, 1 << 30), off, off)
        except OSError as e:
            if e.errno not in _FALLBACK_ERRNOS:
                raise
            k = _pcopy(src, dst, off, n)
        if k == 0:
            return
        off += k
        n -= k


def _pcopy(src: int, dst: int, off: int, n: int) -> int:
    buf = os.pread(src, min(n, 1 << 20), off)
    if buf:
        os.pwrite(dst, buf, off)
    return len(buf)


def copy_xattrs(layer: Layer, src: bytes, dst: bytes | int) -> list[bytes]:
    """Copy every non-private xattr of ``src`` (in ``layer``) to the host path or fd ``dst``; returns the names.

    Ones the destination refuses (``security.*`` without privilege, ``user.*`` on
    a symlink) are skipped.
    """
    try:
        names = layer.listxattr(src)
    except OSError:
        return []
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            value = layer.getxattr(src, name)
            if isinstance(dst, int):
                os.setxattr(dst, name, value)
            else:
                os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EACCES):
                raise
    return names


def _set_meta(target: bytes | int, st: os.stat_result, kind: int, rootless: bool = False) -> None:
    """Owner, then mode (chown clears set-id bits), then times, on a path (never followed) or an fd.

    Rootless, an owner that cannot be given is kept in the override xattr (see :mod:`unionfs.union.override`).
    """
    override.chown(target, st.st_uid, st.st_gid, rootless=rootless)
    if kind != stat.S_IFLNK:
        override.chmod(target, stat.S_IMODE(st.st_mode), rootless=rootless)
    if isinstance(target, int):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _settle_for(fd: int) -> Settle:
    try:
        return write_out if journal_orders_data(fd) else os.fsync
    except OSError:
        return os.fsync


class CopyUp:
    """Copies lower entries into the upper layer (see the module guarantees)."""

    def __init__(
        self, resolver: Resolver, upper: Upper, *, sync: bool = True, rootless: bool = False, defer: float = 0.0
    ) -> None:
        """``defer``: seconds a copy made with ``defer`` may stay unsettled (0: none may); it applies only
        where the journal orders data (the settle is ``write_out``)."""
        self.resolver = resolver
        self.upper = upper
        self.settle = _settle_for(upper.work_fd) if sync else None
        self.rootless = rootless  # owners that cannot be given go to the override xattr
        self.settler: Settler | None = upper.settler(defer) if defer > 0 and self.settle is write_out else None

    def close(self) -> None:
        """Settle every deferred copy (see :meth:`unionfs.union.settle.Settler.close`)."""
        if self.settler is not None:
            self.settler.close()
            self.settler = None

    def _lower(self, node: Node) -> tuple[Layer, bytes, os.stat_result]:
        li, lpath = node.lowers[0]
        layer = self.resolver.lowers[li]
        st = layer.lstat(lpath)
        if st is None:
            raise OSError(errno.ENOENT, "lower entry vanished", lpath)
        return layer, lpath, st

    async def dir(self, node: Node) -> None:
        """Make sure directory ``node`` (and its parents) exist in the upper layer."""
        if node.in_upper:
            return
        parent, name = node.links[0]
        await self.dir(parent)
        layer, lpath, st = self._lower(node)
        wfd = self.upper.work_fd
        tmp = self.upper.tmpname()
        os.mkdir(tmp, 0o700, dir_fd=wfd)
        with self._discard_on_error(tmp):
            tpath = proc_path(wfd, tmp)
            copy_xattrs(layer, lpath, tpath)
            _set_meta(tpath, st, stat.S_IFDIR, self.rootless)
            renameat2(wfd, tmp, self.upper.layer.dirfd(parent.path), name, RENAME_NOREPLACE)
        node.in_upper = True

    async def file(self, node: Node, *, data: bool, defer: bool = False) -> None:
        """Copy non-directory ``node`` up; with ``data=False`` a regular file is copied metadata-only.

        The alias copied is ``node.links[0]``. For a lower hard-link group the data
        goes to the index once and every alias copied later is linked to it.
        ``defer``: the copy may be settled after this returns (:mod:`unionfs.union.settle`).
        """
        if node.index_name is not None:
            await self._index_alias(node)
            return
        if node.in_upper:
            if data and node.metacopy:
                await self.data(node)
            return
        parent, name = node.links[0]
        await self.dir(parent)
        layer, lpath, st = self._lower(node)
        metacopy = not data and stat.S_ISREG(st.st_mode) and st.st_size > 0
        held: list[int] = []  # the fd of a deferred copy, for the settler
        tmp = await self._build(node, layer, lpath, st, data=not metacopy, defer=held if defer else None)
        data_at = node.data or node.lowers[0]
        try:
            with self._discard_on_error(tmp):
                if metacopy:
                    tpath = proc_path(self.upper.work_fd, tmp)
                    dialect = self.upper.dialect
                    os.setxattr(tpath, dialect.metacopy, b"", follow_symlinks=False)
                    os.setxattr(tpath, dialect.redirect, b"/" + data_at[1], follow_symlinks=False)
                renameat2(self.upper.work_fd, tmp, self.upper.layer.dirfd(parent.path), name, RENAME_NOREPLACE)
        except BaseException:
            for fd in held:
                os.close(fd)
            raise
        if held and self.settler is not None:
            self.settler.add(node.ino, held[0])
        node.in_upper = True
        node.data = data_at if metacopy else None
        node.version += 1

    async def _index_alias(self, node: Node) -> None:
        assert node.index_name is not None
        parent, name = node.links[0]
        await self.dir(parent)
        if not self.index_exists(node):
            layer, lpath, st = self._lower(node)
            await self._to_index(node, layer, lpath, st)
            node.version += 1
        try:
            os.link(
                node.index_name,
                name,
                src_dir_fd=self.upper.index_fd,
                dst_dir_fd=self.upper.layer.dirfd(parent.path),
                follow_symlinks=False,
            )
        except FileExistsError:
            pass
        node.in_upper = True

    @contextmanager
    def _discard_on_error(self, tmp: bytes) -> Iterator[None]:
        """Remove a temporary from the work dir if the step that would publish it fails."""
        try:
            yield
        except BaseException:
            self.upper.remove_tree(self.upper.work_fd, tmp)
            raise

    def index_exists(self, node: Node) -> bool:
        assert node.index_name is not None
        try:
            os.stat(node.index_name, dir_fd=self.upper.index_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    async def _to_index(self, node: Node, layer: Layer, lpath: bytes, st: os.stat_result) -> None:
        assert node.index_name is not None
        tmp = await self._build(node, layer, lpath, st, data=True)
        with self._discard_on_error(tmp):
            tpath = proc_path(self.upper.work_fd, tmp)
            os.setxattr(tpath, self.upper.dialect.nlink, b"%d" % st.st_nlink, follow_symlinks=False)
            os.setxattr(tpath, self.upper.dialect.index, node.index_name, follow_symlinks=False)
            renameat2(self.upper.work_fd, tmp, self.upper.index_fd, node.index_name, RENAME_NOREPLACE)

    async def _build(
        self, node: Node, layer: Layer, lpath: bytes, st: os.stat_result, *, data: bool, defer: list[int] | None = None
    ) -> bytes:
        """Build a copy of the lower entry in the work dir; returns its temporary name.

        ``defer``: where the copy is left unsettled (marked), its fd is appended there.
        """
        wfd = self.upper.work_fd
        tmp = self.upper.tmpname()
        with self._discard_on_error(tmp):
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                await self._build_file(node, layer, lpath, st, tmp, data, defer)
                return tmp
            if kind == stat.S_IFLNK:
                os.symlink(layer.readlink(lpath), tmp, dir_fd=wfd)
            else:
                os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=wfd)
            tpath = proc_path(wfd, tmp)
            copy_xattrs(layer, lpath, tpath)
            try:
                os.setxattr(tpath, self.upper.dialect.origin, b"%d" % node.ino, follow_symlinks=False)
            except OSError:
                pass  # user.* xattrs are refused on symlinks and devices: the number may change there
            _set_meta(tpath, st, kind, self.rootless)
        return tmp

    async def _build_file(
        self,
        node: Node,
        layer: Layer,
        lpath: bytes,
        st: os.stat_result,
        tmp: bytes,
        data: bool,
        defer: list[int] | None,
    ) -> None:
        """A regular file: data, xattrs, origin, owner, mode and times through one fd, then settled once
        (or marked, its fd handed out through ``defer``, if a settler takes it)."""
        if node.data is not None:  # a lower metadata-only copy: the data is deeper
            await fetched(self.resolver.lowers[node.data[0]], node.data[1])
            src = self.resolver.lowers[node.data[0]].open(node.data[1], os.O_RDONLY)
        else:
            await fetched(layer, lpath)
            src = layer.open(lpath, os.O_RDONLY)
        try:
            dst = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self.upper.work_fd)
            try:
                big = st.st_size > THREAD_THRESHOLD
                if not data:
                    os.ftruncate(dst, st.st_size)
                else:
                    dense = node.data is None and st.st_blocks * 512 >= st.st_size
                    if big:
                        await trio.to_thread.run_sync(copy_data, src, dst, st.st_size, None, dense)
                    else:
                        copy_data(src, dst, st.st_size, None, dense)
                names = copy_xattrs(layer, lpath, dst)
                if node.realm == 0 and CAPS_XATTR not in names:
                    node.no_caps = True
                os.setxattr(dst, self.upper.dialect.origin, b"%d" % node.ino)
                _set_meta(dst, st, stat.S_IFREG, self.rootless)
                if self.settle and data and st.st_size > 0:
                    settler = self.settler
                    if defer is not None and settler is not None and settler.mark(dst, st.st_size, src):
                        defer.append(os.dup(dst))
                    elif big:
                        await trio.to_thread.run_sync(self.settle, dst)
                    else:
                        self.settle(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    async def data(self, node: Node) -> None:
        """Turn a metadata-only copy into a full one; the lower stays the source until done."""
        assert node.data is not None
        li, lpath = node.data
        src = self.resolver.lowers[li].open(lpath, os.O_RDONLY)
        up = self.upper.layer
        try:
            dst = up.open(node.path, os.O_WRONLY)
            try:
                size = os.fstat(dst).st_size
                if size > THREAD_THRESHOLD:
                    await trio.to_thread.run_sync(copy_data, src, dst, size, self.settle)
                else:
                    copy_data(src, dst, size, self.settle)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.drop_metacopy(node)

    def drop_metacopy(self, node: Node) -> None:
        """Declare the upper file's own data authoritative (after a copy or a truncate to 0)."""
        xp = self.upper.layer.xpath(node.path)
        for name in (self.upper.dialect.metacopy, self.upper.dialect.redirect):
            try:
                os.removexattr(xp, name, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
        node.data = None
        node.version += 1
