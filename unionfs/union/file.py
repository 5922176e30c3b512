"""Open files: open, read, write, fsync, release, and which files the kernel may be handed (overlayfs' ``file.c``)."""

from __future__ import annotations

import os
import stat

from layerstore.host import fs_magic

from .inodes import Node
from .records import Caller, KillRequests, Opened
from .storelayer import fetched
from .super import PASSTHROUGH_FS, FileHandle, Super


class FileOps(Super):
    """Operations on open files."""

    def take_privilege_kills(self, requests: KillRequests) -> None:
        """Drop setuid/setgid where the kernel asks, once it leaves that to us (``killpriv``).

        With ``FUSE_HANDLE_KILLPRIV_V2`` granted, the kernel no longer drops the bits
        itself when a caller without CAP_FSETID writes, truncates or opens with
        ``O_TRUNC``; it marks those requests (``requests.kill_caller``) and the union drops
        the bits as the VFS would (:meth:`_drop_privileges`). chown needs nothing: the
        daemon's own chown of the upper file drops them (and so does the override's).
        """
        self._kills = requests

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

    async def _fetch_lazy(self, node: Node) -> None:
        """Bring in the contents of a file of a lazily pulled image before they are opened or copied up
        (fetched in a worker thread: other requests go on meanwhile)."""
        if node.data is not None:
            li, lpath = node.data
        elif node.in_upper or not node.lowers:
            return
        else:
            li, lpath = node.lowers[0]
        await fetched(self.lowers[li], lpath)

    async def open(self, ino: int, flags: int, ctx: Caller | None = None) -> Opened:
        node = self.node(ino)
        await self._fetch_lazy(node)
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
