"""A tiny file system served by our own FUSE session (:class:`unionfs.fuse.session.Session`), for its tests.

``python tests/loopfs.py MNT`` mounts it in the foreground and exits 0 when unmounted.
The root directory answers ``getxattr``:

* ``user.wait.N``: blocks until ``user.release.N`` has been asked, then answers ``N``;
* ``user.release.N``: releases the waiter N and answers ``ok``;
* ``user.boom``: the handler raises a bug (the request is answered EIO, the mount lives on);
* anything else: ENODATA.

Every other request but INIT and GETATTR of the root is answered ENOSYS by the session.
"""

from __future__ import annotations

import errno
import stat
import sys

import trio

from unionfs.fuse import device, wire
from unionfs.fuse.session import Reply, Request, Session
from unionfs.union.records import Attrs


class LoopFS:
    def __init__(self) -> None:
        self.released: dict[bytes, trio.Event] = {}

    def _event(self, key: bytes) -> trio.Event:
        return self.released.setdefault(key, trio.Event())

    def init(self, req: Request) -> bytes:
        major, minor, readahead, flags = wire.INIT_IN.unpack_from(req.args)[:4]
        return wire.INIT_OUT.pack(7, min(minor, wire.MINOR), readahead, 0, 0, 0, 1 << 16, 1, 0, 0, 0, 0)

    def getattr(self, req: Request) -> bytes:
        if req.nodeid != wire.ROOT_ID:
            raise OSError(errno.ENOENT, "")
        a = Attrs()
        a.st_ino, a.st_mode, a.st_nlink, a.attr_timeout = 1, stat.S_IFDIR | 0o755, 2, 0.0
        return wire.attr_out(a)

    def getxattr(self, req: Request) -> Reply | object:
        name = req.args[wire.GETXATTR_IN.size :].tobytes().split(b"\0")[0]
        if name.startswith(b"user.wait."):
            return self._wait(name[len(b"user.wait.") :])
        if name.startswith(b"user.release."):
            self._event(name[len(b"user.release.") :]).set()
            return b"ok"
        if name == b"user.boom":
            raise RuntimeError("a bug in a handler")
        raise OSError(errno.ENODATA, "")

    async def _wait(self, key: bytes) -> bytes:
        await self._event(key).wait()  # the handler yields to trio: the loop must serve others
        return key


def main() -> int:
    fs = LoopFS()
    fd = device.mount(sys.argv[1], {"fsname=loopfs", "subtype=loopfs"})
    handlers = {wire.INIT: fs.init, wire.GETATTR: fs.getattr, wire.GETXATTR: fs.getxattr}
    session = Session(fd, handlers, lambda op, e: errno.EIO)  # type: ignore[arg-type]
    try:
        trio.run(session.run)
    finally:
        device.unmount(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
