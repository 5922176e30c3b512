"""pyfuse3 request handlers (``-o fastloop=0``): thin adapters from FUSE calls to :class:`unionfs.union.fs.UnionFS`.

The fallback to our own session (:mod:`unionfs.fuse.session`), through pyfuse3's public API only:
no passthrough, no directory-listing cache, no ``HANDLE_KILLPRIV_V2``.

The union answers with plain records (:mod:`unionfs.union.records`); they become
pyfuse3's reply objects here and only here. The errno is chosen here and only here:
an :class:`OSError` from the union becomes ``FUSEError(errno)``; anything else is a
bug, logged with its traceback and answered ``EIO`` (an exception escaping a handler
would end the mount).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from time import perf_counter_ns
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
from pyfuse3 import FUSEError

from unionfs.union.fs import UnionFS
from unionfs.union.records import Attrs, FsStats, Opened
from unionfs.union.stats import record

from . import control

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


def _translate(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    name = fn.__name__.lstrip("_")  # counted under the operation's name

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        t0 = perf_counter_ns()
        failed = True
        try:
            result = await fn(*args, **kwargs)
            failed = False
            return result
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", name)
            raise FUSEError(errno.EIO) from None
        finally:
            record(name, perf_counter_ns() - t0, failed)

    return wrapper


def entry(a: Attrs) -> pyfuse3.EntryAttributes:
    """The union's attributes as pyfuse3's reply: they are one already (:class:`Operations` makes the union build
    its records as ``pyfuse3.EntryAttributes``, :attr:`UnionFS.new_attrs`, so no reply copies them)."""
    return cast(pyfuse3.EntryAttributes, a)


def file_info(o: Opened) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=o.fh, keep_cache=o.keep_cache, direct_io=o.direct_io)


def statvfs(s: FsStats) -> pyfuse3.StatvfsData:
    d = pyfuse3.StatvfsData()
    for k in FsStats.__slots__:
        setattr(d, k, getattr(s, k))
    return d


async def _value(value: bytes | None) -> bytes:
    if value is None:
        raise FUSEError(errno.ENODATA)
    return value


class Operations(pyfuse3.Operations):
    """The FUSE face of a union filesystem."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: UnionFS, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.on_init = on_init
        self.enable_writeback_cache = fs.opts.writeback
        fs.invalidate = _invalidate
        fs.new_attrs = cast(Callable[[], Attrs], pyfuse3.EntryAttributes)  # the same fields: replies need no copy

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.forget(inode_list)

    @_translate
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.fs.attrs(self.fs.node(inode)))

    @_translate
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.setattr(inode, attr, fields, fh))

    @_translate
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_translate
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.fs.opendir(inode).fh  # (pyfuse3 cannot pass on Opened.cache_dir)

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.fs.readdir(fh, start_id, functools.partial(pyfuse3.readdir_reply, token))  # (attrs: see entry)

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_translate
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return file_info(await self.fs.open(inode, flags, ctx))

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        raise FUSEError(errno.ENOSYS)  # the kernel then stops sending flush at all

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh, datasync)

    @_translate
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @_translate
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        o, a = await self.fs.create(parent_inode, name, mode, flags, ctx)
        return file_info(o), entry(a)

    @_translate
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.mknod(parent_inode, name, mode, rdev, ctx))

    @_translate
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.mkdir(parent_inode, name, mode, ctx))

    @_translate
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.symlink(parent_inode, name, target, ctx))

    @_translate
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.link(inode, new_parent_inode, new_name))

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_translate
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Coroutine[Any, Any, bytes]:
        """The union's xattr, or one of the daemon's own on the root (:mod:`unionfs.fuse.control`, not counted).

        A plain function that returns the handler's coroutine: pyfuse3 awaits it, and the
        request costs no second coroutine (the kernel asks security.capability before writes).
        """
        if inode == pyfuse3.ROOT_INODE and name in control.NAMES:
            return _value(control.answer(name))
        return self._getxattr(inode, name)

    @_translate
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        return self.fs.getxattr(inode, name)

    @_translate
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_translate
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.setxattr(inode, name, value)

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name)

    @_translate
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs(self.fs.statfs())

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel has already checked


def _invalidate(ino: int) -> None:
    pyfuse3.invalidate_inode(ino, attr_only=False)


class Pyfuse3Mount:
    """A mount served by ``pyfuse3.main()`` through pyfuse3's public API (``-o fastloop=0``)."""

    def __init__(self, fs: UnionFS, mountpoint: str, options: set[str], on_init: Callable[[], None]) -> None:
        """Mount (``RuntimeError`` if pyfuse3 cannot)."""
        pyfuse3.init(Operations(fs, on_init=on_init), mountpoint, options)

    async def run(self) -> None:
        await pyfuse3.main()

    def terminate(self) -> None:
        pyfuse3.terminate()

    def close(self, clean: bool) -> None:
        """Unmount; an error is raised only if the loop did not end cleanly (else: unmounted from outside)."""
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            if not clean:
                raise
