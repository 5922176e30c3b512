"""A tiny pyfuse3 file system served by :class:`unionfs.fuse.fuseloop.RequestLoop`, for its tests.

``python tests/loopfs.py MNT`` mounts it in the foreground and exits 0 when unmounted
(3 if the loop is not available). The root directory answers ``getxattr``:

* ``user.wait.N``: blocks until ``user.release.N`` has been asked, then answers ``N``;
* ``user.release.N``: releases the waiter N and answers ``ok``;
* ``user.nonerefs``: ``sys.getrefcount(None)`` (pyfuse3's ``py_retval`` counts on it);
* anything else: ENODATA.
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

from unionfs.fuse.fuseloop import RequestLoop


class LoopFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.released: dict[bytes, trio.Event] = {}

    def _event(self, key: bytes) -> trio.Event:
        return self.released.setdefault(key, trio.Event())

    async def getattr(self, ino: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if ino != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2
        return e

    async def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(b"user.wait."):
            key = name[len(b"user.wait.") :]
            await self._event(key).wait()  # the handler yields to trio: the loop must serve others
            return key
        if name.startswith(b"user.release."):
            self._event(name[len(b"user.release.") :]).set()
            return b"ok"
        if name == b"user.nonerefs":
            return str(sys.getrefcount(None)).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)


def main() -> int:
    pyfuse3.init(LoopFS(), sys.argv[1], set(pyfuse3.default_options))
    try:
        loop = RequestLoop.create()
        if loop is None:
            return 3
        trio.run(loop.run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
