"""The requests of our own FUSE session (:mod:`unionfs.fuse.session`), answered by the union.

Each handler takes a :class:`unionfs.fuse.session.Request`, parses its arguments
(:mod:`unionfs.fuse.wire`), calls :class:`unionfs.union.fs.UnionFS` and returns the reply
body. The errno is chosen here: an :class:`OSError` from the union is its errno; anything
else is a bug, logged with its traceback and answered ``EIO``.

**Passthrough.** Where the kernel granted ``FUSE_PASSTHROUGH`` (root, kernel 6.9 and
later), an open file whose data cannot move while it is open is handed to the kernel
(:meth:`UnionFS.passthrough_fd`): its reads, writes and mmaps go to the backing file
without the daemon. The kernel requires every open of one inode to be passthrough to
the same backing file, or none of them: the handlers keep one backing id per inode while
it has passthrough opens, and open an inode the ordinary way while it has ordinary opens.
"""

from __future__ import annotations

import errno
import logging
import time
import types
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any, cast

from unionfs.union import stats
from unionfs.union.fs import UnionFS
from unionfs.union.records import Attrs, Caller, Opened
from unionfs.union.stats import record

from . import control, device, wire
from .session import Handler, Reply, Request, Session

log = logging.getLogger(__name__)
#: the names requests are counted under: pyfuse3's handlers' (one per operation, whatever the opcode)
_NAMES = {**wire.OPCODES, wire.READDIRPLUS: "readdir", wire.RENAME2: "rename", wire.BATCH_FORGET: "forget"}


def _name(args: memoryview) -> bytes:
    """The NUL-terminated name at the start of ``args``."""
    b = args.tobytes()
    end = b.find(b"\0")
    return b if end < 0 else b[:end]


def _two_names(args: memoryview) -> tuple[bytes, bytes]:
    a, b, _ = args.tobytes().split(b"\0", 2)
    return a, b


class _SetAttr:
    """A SETATTR's new attributes and which of them it changes (the union's NewAttrs and Changes)."""

    __slots__ = (
        "st_mode", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
        "update_mode", "update_uid", "update_gid", "update_size", "update_atime", "update_mtime",
    )  # fmt: skip

    def __init__(self, args: memoryview) -> None:
        (valid, _, _, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _) = (
            wire.SETATTR_IN.unpack_from(args)
        )
        now = time.time_ns()
        self.st_mode, self.st_uid, self.st_gid, self.st_size = mode, uid, gid, size
        self.update_mode = bool(valid & wire.FATTR_MODE)
        self.update_uid = bool(valid & wire.FATTR_UID)
        self.update_gid = bool(valid & wire.FATTR_GID)
        self.update_size = bool(valid & wire.FATTR_SIZE)
        self.update_atime = bool(valid & (wire.FATTR_ATIME | wire.FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (wire.FATTR_MTIME | wire.FATTR_MTIME_NOW))
        self.st_atime_ns = now if valid & wire.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec
        self.st_mtime_ns = now if valid & wire.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec


class Handlers:
    """The request handlers of one mount, and what INIT agreed with the kernel."""

    def __init__(
        self,
        fs: UnionFS,
        *,
        passthrough: bool,
        killpriv: bool,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        self.fs = fs
        self.session: Session | None = None
        self.want_passthrough = passthrough
        self.want_killpriv = killpriv
        self.on_init = on_init
        self.granted = 0  # the INIT flags the kernel agreed to
        self.proto_minor = 0
        self.kill_caller: Caller | None = None  # set per request where the kernel asks us to drop setuid/setgid
        self._backing: dict[int, list[int]] = {}  # inode -> [backing id, passthrough opens]
        self._cached: dict[int, int] = {}  # inode -> ordinary (page-cached) opens of a regular file
        self._fh_ino: dict[int, tuple[int, bool]] = {}  # file handle -> (inode, passthrough)
        self.passthrough_refused = ""  # why the last backing open failed (for the log, once)

    @property
    def killpriv(self) -> bool:
        return bool(self.granted & wire.HANDLE_KILLPRIV_V2)

    @property
    def passthrough(self) -> bool:
        return bool(self.granted & wire.PASSTHROUGH)

    def table(self) -> dict[int, Handler]:
        """The handler of each opcode (the others are answered ENOSYS)."""
        h: dict[int, Callable[[Request], Any]] = {
            wire.INIT: self.init,
            wire.DESTROY: lambda req: None,
            wire.LOOKUP: self.lookup,
            wire.FORGET: self.forget,
            wire.BATCH_FORGET: self.batch_forget,
            wire.GETATTR: self.getattr,
            wire.SETATTR: self.setattr,
            wire.READLINK: self.readlink,
            wire.OPENDIR: self.opendir,
            wire.READDIRPLUS: self.readdirplus,
            wire.RELEASEDIR: self.releasedir,
            wire.FSYNCDIR: lambda req: None,
            wire.OPEN: self.open,
            wire.READ: self.read,
            wire.WRITE: self.write,
            wire.FSYNC: self.fsync,
            wire.RELEASE: self.release,
            wire.CREATE: self.create,
            wire.MKNOD: self.mknod,
            wire.MKDIR: self.mkdir,
            wire.SYMLINK: self.symlink,
            wire.LINK: self.link,
            wire.UNLINK: self.unlink,
            wire.RMDIR: self.rmdir,
            wire.RENAME: self.rename,
            wire.RENAME2: self.rename2,
            wire.GETXATTR: self.getxattr,
            wire.LISTXATTR: self.listxattr,
            wire.SETXATTR: self.setxattr,
            wire.REMOVEXATTR: self.removexattr,
            wire.STATFS: self.statfs,
            wire.INTERRUPT: lambda req: None,  # handlers run to their end; the kernel drops what it no longer waits for
        }
        table = {op: _counted(_NAMES.get(op, str(op)), fn) if op != wire.GETATTR else fn for op, fn in h.items()}
        counted_getxattr = table[wire.GETXATTR]

        def getxattr(req: Request) -> Reply:
            """The daemon's own attributes of the root (:mod:`unionfs.fuse.control`) are not counted."""
            if req.nodeid == wire.ROOT_ID:
                size = wire.GETXATTR_IN.unpack_from(req.args)[0]
                name = _name(req.args[wire.GETXATTR_IN.size :])
                if name in control.NAMES:
                    value = control.answer(name)
                    assert value is not None
                    return _sized(value, size)
            return cast(Reply, counted_getxattr(req))  # a plain handler

        table[wire.GETXATTR] = getxattr
        return table

    def on_error(self, opcode: int, e: BaseException) -> int:
        log.error("internal error in %s", _NAMES.get(opcode, opcode), exc_info=e)
        return errno.EIO

    # -- INIT ------------------------------------------------------------------------------
    def init(self, req: Request) -> bytes:
        major, minor, max_readahead, flags = wire.INIT_IN.unpack_from(req.args.tobytes().ljust(20, b"\0"))[:4]
        flags2 = wire.INIT_IN.unpack_from(req.args.tobytes().ljust(20, b"\0"))[4] if flags & wire.INIT_EXT else 0
        if major != wire.MAJOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor}")
        offered = flags | flags2 << 32
        want = (
            wire.ASYNC_READ | wire.PARALLEL_DIROPS | wire.AUTO_INVAL_DATA | wire.ASYNC_DIO | wire.ATOMIC_O_TRUNC
            | wire.EXPORT_SUPPORT | wire.BIG_WRITES | wire.DO_READDIRPLUS | wire.MAX_PAGES | wire.INIT_EXT
            | wire.CACHE_SYMLINKS
        )  # fmt: skip
        if self.want_killpriv:  # (else the kernel drops setuid/setgid itself, as pyfuse3 has it)
            want |= wire.HANDLE_KILLPRIV_V2
        if self.want_passthrough:
            want |= wire.PASSTHROUGH  # (the kernel refuses it together with the writeback cache)
        elif self.fs.opts.writeback:
            want |= wire.WRITEBACK_CACHE
        self.granted = granted = want & offered
        self.proto_minor = min(minor, wire.MINOR)
        if self.want_passthrough and not self.passthrough:
            log.warning("the kernel offers no FUSE passthrough: file I/O goes through the daemon")
        stats.SETTINGS["passthrough"] = lambda: self.passthrough
        stats.SETTINGS["killpriv"] = lambda: self.killpriv
        if self.on_init is not None:
            self.on_init()
        return wire.INIT_OUT.pack(
            wire.MAJOR, self.proto_minor, max_readahead, granted & 0xFFFFFFFF, 0, 0,
            1 << 20, 1, 256, 0, granted >> 32, 1 if granted & wire.PASSTHROUGH else 0,
        )  # fmt: skip

    # -- names and attributes --------------------------------------------------------------
    def lookup(self, req: Request) -> bytes:
        return wire.entry_out(self.fs.lookup(req.nodeid, _name(req.args)))

    def forget(self, req: Request) -> None:
        self.fs.forget([(req.nodeid, wire.FORGET_IN.unpack_from(req.args)[0])])

    def batch_forget(self, req: Request) -> None:
        count = wire.BATCH_FORGET_IN.unpack_from(req.args)[0]
        one = wire.FORGET_ONE
        self.fs.forget([one.unpack_from(req.args, 8 + i * 16) for i in range(count)])

    def getattr(self, req: Request) -> bytes:
        """Counted on its own: a lower-only entry's reply is kept with it and costs no more than the count."""
        t0 = perf_counter_ns()
        fs = self.fs
        node = fs.kept_attrs(req.nodeid)
        failed = True
        try:
            if node is not None:
                body = node.attrs_reply
                if body is None:
                    body = node.attrs_reply = wire.attr_out(node.attrs)  # type: ignore[arg-type]  # kept_attrs: set
            else:
                body = wire.attr_out(fs.attrs(fs.node(req.nodeid)))
            failed = False
            return body
        finally:
            record("getattr", perf_counter_ns() - t0, failed)

    async def setattr(self, req: Request) -> bytes:
        valid, _, fh = wire.SETATTR_IN.unpack_from(req.args)[:3]
        changes = _SetAttr(req.args)
        self._kill_from(req, valid & wire.FATTR_KILL_SUIDGID)
        return wire.attr_out(await self.fs.setattr(req.nodeid, changes, changes, fh if valid & wire.FATTR_FH else None))

    def readlink(self, req: Request) -> bytes:
        return self.fs.readlink(req.nodeid)

    # -- directories -----------------------------------------------------------------------
    def opendir(self, req: Request) -> bytes:
        o = self.fs.opendir(req.nodeid)
        flags = wire.FOPEN_CACHE_DIR | wire.FOPEN_KEEP_CACHE if o.cache_dir else 0
        return wire.OPEN_OUT.pack(o.fh, flags, 0)

    def readdirplus(self, req: Request) -> list[bytes]:
        fh, off, size = wire.READ_IN.unpack_from(req.args)[:3]
        out: list[bytes] = []
        room = [size]

        def emit(name: bytes, a: Attrs, nxt: int) -> bool:
            ent = wire.direntplus(name, a, nxt)
            if len(ent) > room[0]:
                return False
            room[0] -= len(ent)
            out.append(ent)
            return True

        self.fs.readdir(fh, off, emit)
        return out

    def releasedir(self, req: Request) -> None:
        self.fs.releasedir(wire.RELEASE_IN.unpack_from(req.args)[0])

    # -- files -----------------------------------------------------------------------------
    def _kill_from(self, req: Request, asked: int) -> None:
        """Before the union runs a request: whether the kernel asks it to drop setuid/setgid, for whom."""
        if self.granted & wire.HANDLE_KILLPRIV_V2:
            self.kill_caller = req if asked else None

    def _opened(self, ino: int, o: Opened) -> bytes:
        """The OPEN (or CREATE) reply for handle ``o`` of ``ino``: passthrough where it may be."""
        entry = self._backing.get(ino)
        if entry is None and self.passthrough and not self._cached.get(ino):
            fd = self.fs.passthrough_fd(o.fh)
            if fd is not None:
                assert self.session is not None
                try:
                    entry = self._backing[ino] = [device.backing_open(self.session.fd, fd), 0]
                except OSError as e:
                    if str(e) != self.passthrough_refused:
                        self.passthrough_refused = str(e)
                        log.warning("passthrough refused for inode %d (%s): served by the daemon", ino, e)
        if entry is not None:
            entry[1] += 1
            self._fh_ino[o.fh] = (ino, True)
            return wire.OPEN_OUT.pack(o.fh, wire.FOPEN_PASSTHROUGH, entry[0])
        self._cached[ino] = self._cached.get(ino, 0) + 1
        self._fh_ino[o.fh] = (ino, False)
        flags = (wire.FOPEN_KEEP_CACHE if o.keep_cache else 0) | (wire.FOPEN_DIRECT_IO if o.direct_io else 0)
        return wire.OPEN_OUT.pack(o.fh, flags, 0)

    async def open(self, req: Request) -> bytes:
        flags, open_flags = wire.OPEN_IN.unpack_from(req.args)
        self._kill_from(req, open_flags & wire.OPEN_KILL_SUIDGID)
        return self._opened(req.nodeid, await self.fs.open(req.nodeid, flags, req))

    def read(self, req: Request) -> bytes:
        fh, off, size = wire.READ_IN.unpack_from(req.args)[:3]
        return self.fs.read(fh, off, size)

    def write(self, req: Request) -> bytes:
        fh, off, size, write_flags = wire.WRITE_IN.unpack_from(req.args)[:4]
        self._kill_from(req, write_flags & wire.WRITE_KILL_SUIDGID)
        start = wire.WRITE_IN.size
        n = self.fs.write(fh, off, req.args[start : start + size])  # type: ignore[arg-type]  # a buffer will do
        return wire.WRITE_OUT.pack(n, 0)

    def fsync(self, req: Request) -> None:
        fh, flags, _ = wire.FSYNC_IN.unpack_from(req.args)
        self.fs.fsync(fh, bool(flags & wire.FSYNC_FDATASYNC))

    def release(self, req: Request) -> None:
        fh = wire.RELEASE_IN.unpack_from(req.args)[0]
        self._forget_open(fh)
        self.fs.release(fh)

    def _forget_open(self, fh: int) -> None:
        ino, through = self._fh_ino.pop(fh, (0, False))
        if through:
            entry = self._backing[ino]
            entry[1] -= 1
            if not entry[1]:
                del self._backing[ino]
                assert self.session is not None
                try:
                    device.backing_close(self.session.fd, entry[0])
                except OSError as e:
                    log.warning("closing backing id %d: %s", entry[0], e)
        elif ino:
            n = self._cached[ino] - 1
            if n:
                self._cached[ino] = n
            else:
                del self._cached[ino]

    # -- making and removing entries -------------------------------------------------------
    async def create(self, req: Request) -> list[bytes]:
        flags, mode, umask, open_flags = wire.CREATE_IN.unpack_from(req.args)
        req.umask = umask
        self._kill_from(req, 0)
        o, a = await self.fs.create(req.nodeid, _name(req.args[wire.CREATE_IN.size :]), mode, flags, req)
        return [wire.entry_out(a), self._opened(a.st_ino, o)]

    async def mknod(self, req: Request) -> bytes:
        mode, rdev, umask, _ = wire.MKNOD_IN.unpack_from(req.args)
        req.umask = umask
        name = _name(req.args[wire.MKNOD_IN.size :])
        return wire.entry_out(await self.fs.mknod(req.nodeid, name, mode, rdev, req))

    async def mkdir(self, req: Request) -> bytes:
        mode, umask = wire.MKDIR_IN.unpack_from(req.args)
        req.umask = umask
        return wire.entry_out(await self.fs.mkdir(req.nodeid, _name(req.args[wire.MKDIR_IN.size :]), mode, req))

    async def symlink(self, req: Request) -> bytes:
        name, target = _two_names(req.args)
        return wire.entry_out(await self.fs.symlink(req.nodeid, name, target, req))

    async def link(self, req: Request) -> bytes:
        old = wire.LINK_IN.unpack_from(req.args)[0]
        return wire.entry_out(await self.fs.link(old, req.nodeid, _name(req.args[wire.LINK_IN.size :])))

    async def unlink(self, req: Request) -> None:
        await self.fs.unlink(req.nodeid, _name(req.args))

    async def rmdir(self, req: Request) -> None:
        await self.fs.rmdir(req.nodeid, _name(req.args))

    async def rename(self, req: Request) -> None:
        new_dir = wire.RENAME_IN.unpack_from(req.args)[0]
        old, new = _two_names(req.args[wire.RENAME_IN.size :])
        await self.fs.rename(req.nodeid, old, new_dir, new, 0)

    async def rename2(self, req: Request) -> None:
        new_dir, flags, _ = wire.RENAME2_IN.unpack_from(req.args)
        old, new = _two_names(req.args[wire.RENAME2_IN.size :])
        await self.fs.rename(req.nodeid, old, new_dir, new, flags)

    # -- extended attributes ---------------------------------------------------------------
    def getxattr(self, req: Request) -> bytes:
        size = wire.GETXATTR_IN.unpack_from(req.args)[0]
        return _sized(self.fs.getxattr(req.nodeid, _name(req.args[wire.GETXATTR_IN.size :])), size)

    def listxattr(self, req: Request) -> bytes:
        size = wire.GETXATTR_IN.unpack_from(req.args)[0]
        return _sized(b"".join(n + b"\0" for n in self.fs.listxattr(req.nodeid)), size)

    async def setxattr(self, req: Request) -> None:
        size, _ = wire.SETXATTR_IN.unpack_from(req.args)
        rest = req.args[wire.SETXATTR_IN.size :].tobytes()
        name, _, value = rest.partition(b"\0")
        await self.fs.setxattr(req.nodeid, name, value[:size])

    async def removexattr(self, req: Request) -> None:
        await self.fs.removexattr(req.nodeid, _name(req.args))

    def statfs(self, req: Request) -> bytes:
        return wire.statfs_out(self.fs.statfs())


def _sized(value: bytes, size: int) -> bytes:
    """A GETXATTR/LISTXATTR answer: the size alone when asked with size 0, ERANGE when it does not fit."""
    if size == 0:
        return wire.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "")
    return value


def _counted(name: str, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """``fn``, with each call counted in the stats under ``name`` (for an async handler: until it ends)."""

    def sync(req: Request) -> Any:
        t0 = perf_counter_ns()
        failed = True
        try:
            result = fn(req)
            failed = False
        finally:
            if failed:
                record(name, perf_counter_ns() - t0, True)
        if type(result) is not types.CoroutineType:
            record(name, perf_counter_ns() - t0, False)
            return result
        return _timed(name, t0, result)

    return sync


async def _timed(name: str, t0: int, coro: Coroutine[Any, Any, Reply]) -> Reply:
    failed = True
    try:
        result = await coro
        failed = False
        return result
    finally:
        record(name, perf_counter_ns() - t0, failed)
