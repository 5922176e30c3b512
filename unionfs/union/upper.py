"""Writing the upper layer: whiteouts, opaque marks, atomic placement, the work dir.

Guarantees:

* every new upper entry that replaces something (a whiteout, a directory) is
  built in the work directory and renamed into place, so a crash shows either
  the old entry or the new one, never half of either;
* whiteouts are character devices 0/0 (what every peer reads); only where
  ``mknod`` is refused do we fall back to an OCI ``.wh.NAME`` file;
* the work directory (``WORKDIR/work``) holds only in-flight temporaries and is
  emptied at mount, which is how an interrupted copy-up is cleaned;
* copy-ups an earlier mount published before their data was on the disk are
  checked at mount, before anything else (:func:`unionfs.union.settle.recover_dirs`).

Layout of WORKDIR (kernel overlayfs uses ``work`` the same way; our hard-link
index lives apart from the kernel's ``index`` so neither misreads the other):

    WORKDIR/work/               temporaries, emptied at every mount
    WORKDIR/unionmount-index/   one entry per copied-up lower hard-link group
    WORKDIR/unsettled           while copy-ups may be unsettled (see unionfs.union.settle)
"""

from __future__ import annotations

import errno
import itertools
import os
import stat

from layerstore.host import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from .layers import DirLayer
from .markers import WH_PREFIX, WriteDialect
from .settle import Settler, recover_dirs

_counter = itertools.count()


class Upper:
    """The writable layer plus its work directory."""

    def __init__(self, layer: DirLayer, workdir: str | None, dialect: WriteDialect) -> None:
        """``workdir`` None: a layer with nothing below it (a graft), where nothing needs a work dir."""
        self.layer = layer
        self.dialect = dialect
        if workdir is None:
            self.work_fd = self.index_fd = self.base_fd = -1  # any use fails with EBADF
            return
        self.base_fd = wfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for sub in ("work", "unionmount-index"):
                try:
                    os.mkdir(sub, 0o700, dir_fd=wfd)
                except FileExistsError:
                    pass
            self.work_fd = os.open("work", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
            self.index_fd = os.open(
                "unionmount-index", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd
            )
        except BaseException:
            os.close(wfd)
            raise
        recover_dirs(layer.root, workdir, dialect.unsettled)
        self.clean_work()

    def settler(self, delay: float) -> Settler:
        """A :class:`~unionfs.union.settle.Settler` for copies into this layer (it owns a readable fd of the layer)."""
        fd = os.open(_proc(self.layer.root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return Settler(self.base_fd, fd, self.dialect.unsettled, delay)

    def close(self) -> None:
        if self.work_fd >= 0:
            os.close(self.work_fd)
            os.close(self.index_fd)
            os.close(self.base_fd)

    def tmpname(self) -> bytes:
        return b"#%x.%x" % (os.getpid(), next(_counter))

    # -- work dir --------------------------------------------------------------
    def clean_work(self) -> None:
        """Remove every temporary left in the work dir (an interrupted operation)."""
        for name in os.listdir(_proc(self.work_fd)):
            self.remove_tree(self.work_fd, name)

    def remove_tree(self, dirfd: int, name: bytes) -> None:
        """Delete ``name`` below ``dirfd`` recursively, never following symlinks."""
        try:
            os.unlink(name, dir_fd=dirfd)
            return
        except IsADirectoryError:
            pass
        except FileNotFoundError:
            return
        except PermissionError as e:  # EPERM from unlink(2) on a directory
            if e.errno != errno.EPERM:
                raise
        self.empty_dir(dirfd, name)
        os.rmdir(name, dir_fd=dirfd)

    # -- whiteouts and marks ---------------------------------------------------
    def mknod_whiteout(self, dirfd: int, name: bytes) -> None:
        """Create a whiteout named ``name`` (char device 0/0, or ``.wh.name`` if refused)."""
        try:
            os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dirfd)
        except PermissionError:
            fd = os.open(WH_PREFIX + name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o000, dir_fd=dirfd)
            os.close(fd)

    def whiteout_over(self, dirfd: int, name: bytes) -> None:
        """Atomically replace the non-directory ``name`` with a whiteout."""
        tmp = self.tmpname()
        try:
            os.mknod(tmp, stat.S_IFCHR | 0o000, 0, dir_fd=self.work_fd)
        except PermissionError:
            os.unlink(name, dir_fd=dirfd)
            self.mknod_whiteout(dirfd, name)
            return
        renameat2(self.work_fd, tmp, dirfd, name)

    def is_whiteout_at(self, dirfd: int, name: bytes) -> bool:
        """True if ``name`` in the upper dir is a whiteout (of either dialect we write)."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        except FileNotFoundError:
            pass
        if len(name) + 4 > 255:
            return False
        try:
            os.stat(WH_PREFIX + name, dir_fd=dirfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def set_opaque(self, dirfd: int, name: bytes) -> None:
        os.setxattr(_proc(dirfd, name), self.dialect.opaque, b"y", follow_symlinks=False)

    def set_redirect(self, dirfd: int, name: bytes, lower_path: bytes) -> None:
        os.setxattr(_proc(dirfd, name), self.dialect.redirect, b"/" + lower_path, follow_symlinks=False)

    # -- placing new entries ---------------------------------------------------
    def place(self, tmp: bytes, dirfd: int, name: bytes, is_dir: bool) -> None:
        """Move ``tmp`` from the work dir to ``name``, replacing a whiteout there if any."""
        try:
            renameat2(self.work_fd, tmp, dirfd, name, RENAME_NOREPLACE)
            return
        except FileExistsError:
            pass
        if is_dir:
            # A directory cannot replace a device: swap them, then drop the whiteout.
            renameat2(self.work_fd, tmp, dirfd, name, RENAME_EXCHANGE)
            os.unlink(tmp, dir_fd=self.work_fd)
        else:
            renameat2(self.work_fd, tmp, dirfd, name)

    def empty_dir(self, dirfd: int, name: bytes) -> None:
        """Remove everything inside directory ``name`` (never following symlinks)."""
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            for child in os.listdir(fd):
                self.remove_tree(fd, os.fsencode(child))
        finally:
            os.close(fd)


def _proc(dirfd: int, name: bytes | None = None) -> bytes:
    return b"/proc/self/fd/%d" % dirfd if name is None else b"/proc/self/fd/%d/%s" % (dirfd, name)
