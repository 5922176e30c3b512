"""pyfuse3 request handlers: thin adapters from FUSE calls to :class:`unionfs.fs.UnionFS`.

The errno is chosen here and only here: an :class:`OSError` from the union
becomes ``FUSEError(errno)``; anything else is a bug, logged with its traceback
and answered ``EIO`` (an exception escaping a handler would end the mount).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .fs import UnionFS
from .stats import record

log = logging.getLogger(__name__)
T = TypeVar("T")


def _translate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
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


class Operations(pyfuse3.Operations):
    """The FUSE face of a union filesystem."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: UnionFS, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.on_init = on_init
        self.enable_writeback_cache = fs.opts.writeback

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.fs.lookup(parent_inode, name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.fs.forget(inode_list)

    @_translate
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.fs.attrs(self.fs.node(inode))

    @_translate
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return await self.fs.setattr(inode, attr, fields, fh)

    @_translate
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_translate
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.fs.opendir(inode)

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.fs.readdir(fh, start_id, token)

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_translate
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self.fs.open(inode, flags, ctx)

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
        return await self.fs.create(parent_inode, name, mode, flags, ctx)

    @_translate
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.fs.mknod(parent_inode, name, mode, rdev, ctx)

    @_translate
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.fs.mkdir(parent_inode, name, mode, ctx)

    @_translate
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.fs.symlink(parent_inode, name, target, ctx)

    @_translate
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.fs.link(inode, new_parent_inode, new_name)

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

    @_translate
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
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
        return self.fs.statfs()

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel has already checked
