"""Copy-ups made durable behind the request that made them.

A copy-up publishes its copy with a rename. Were the rename to reach the disk before
the data, a crash would leave an empty or zeroed file hiding the lower one, so
:mod:`unionfs.union.copy_up` waits for the data before the rename (most of an ``open``
that copies a small file up; for a 1 GiB file, the time to write it: perf/README.md,
"Copy-ups settled behind the open"). For a file copied up by an ``open`` for writing, this module takes
the wait off the request, on the filesystems where copy-up already relies on the
journal's order (ext4 with a journal, xfs: :func:`layerstore.host.journal_orders_data`).

Guarantees:

* the copy is published at once, carrying the xattr ``unionmount.unsettled`` (the
  copied size and the host path of the data copied), set before the rename; the
  journal makes the mark durable no later than the rename;
* :class:`Settler` writes marked copies out in batches, waiting for the device once
  per batch in a worker thread, and removes a mark only once its copy's data is on
  the device: a mark never leaves the disk before the data it guards is there. A
  batch starts once no copy-up has come for ``delay`` seconds, or the oldest copy has
  waited :data:`MAX_AGE` seconds, or :data:`MAX_PENDING` copies wait (each holds an
  fd): writing out while copy-ups keep coming slowed each of them down 2x here, and
  the kernel itself leaves written data in memory for up to 30 s;
* ``fsync``/``fdatasync`` of a marked file settles it first (:meth:`Settler.settle`),
  ``O_SYNC``/``O_DSYNC`` opens are never deferred, and unmount settles every copy,
  syncs the upper filesystem and removes WORKDIR's ``unsettled`` file;
* ``unsettled`` exists, fsynced, from the first deferred copy of a mount until its
  marks are all removed and synced; it names the mount of the upper filesystem it
  was written under (:func:`layerstore.host.mount_instance`). The next mount finds it
  and calls :func:`recover`: if the upper filesystem has been mounted again since (a
  crash, a reboot), every marked file whose first ``size`` bytes differ from the data
  named in its mark gets that data back, and changes never synced to it are lost, as
  a crash may lose them; under the same mount (the daemon was killed) the page cache
  lost nothing, and after a ``syncfs`` the marks are only removed.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from functools import partial

import trio

from layerstore.host import mount_instance, openat2_beneath, proc_path, start_write_out, syncfs, write_out

log = logging.getLogger(__name__)

FLAG = b"unsettled"  # in WORKDIR, next to work/ (which every mount empties)
DELAY = 0.005  # seconds without a copy-up before the waiting ones are settled (``-o settle=MS``)
MAX_AGE = 1.0  # seconds a copy may stay unsettled while copy-ups keep coming
MAX_PENDING = 1024  # copies waiting at most: each holds an fd until it is settled
_CHUNK = 1 << 20


def _settle_batch(fds: list[int], mark: bytes) -> None:
    """Write every copy out (all started first, so the device is waited for once), then unmark it; closes the fds."""
    for fd in fds:
        try:
            start_write_out(fd)
        except OSError:
            pass  # write_out below reports it
    for fd in fds:
        try:
            write_out(fd)
            os.removexattr(fd, mark)
        except OSError as e:
            if e.errno != errno.ENODATA:
                log.warning("copy-up not settled, its mark stays for the next mount: %s", e.strerror)
        finally:
            os.close(fd)


def _wake(token: trio.lowlevel.TrioToken, finished: trio.Event, _: object) -> None:
    """A worker thread's batch is done: wake the task waiting for it (if trio still runs)."""
    try:
        token.run_sync_soon(finished.set)
    except trio.RunFinishedError:
        pass


class Settler:
    """Settles the copies :meth:`mark`\\ ed by copy-up (see the module guarantees)."""

    def __init__(self, base_fd: int, upper_fd: int, mark: bytes, delay: float = DELAY) -> None:
        """``base_fd``: WORKDIR (where the flag lives); ``upper_fd``: the upper layer's root; ``mark``: the xattr."""
        self.base_fd = base_fd
        self.upper_fd = upper_fd
        self.mark_name = mark
        self.delay = delay
        self.pending: dict[int, int] = {}  # union inode -> fd of its copy
        self._inflight: dict[int, int] = {}
        self._inflight_done = threading.Event()
        self._scheduled = False
        self._flagged = False
        self._last_add = self._oldest = 0.0
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_pending = MAX_PENDING if soft == resource.RLIM_INFINITY else max(1, min(MAX_PENDING, soft // 4))

    def mark(self, dst: int, size: int, source: int) -> bool:
        """Mark the copy ``dst`` (``size`` bytes copied from the fd ``source``) before it is published.

        False if it cannot be deferred (the source has no path to find it by again); the caller then waits.
        """
        src = os.readlink(b"/proc/self/fd/%d" % source)
        if not src.startswith(b"/") or src.endswith(b" (deleted)"):
            return False
        try:
            self._flag()
            os.setxattr(dst, self.mark_name, b"%d %s" % (size, src))
        except OSError as e:
            log.debug("copy-up settled at once: %s", e)
            return False
        return True

    def _flag(self) -> None:
        if self._flagged:
            return
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(FLAG, flags, 0o600, dir_fd=self.base_fd)
        try:
            os.write(fd, mount_instance(self.upper_fd))
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(proc_path(self.base_fd, b"."), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._flagged = True

    def add(self, ino: int, fd: int) -> None:
        """Take the fd of a published, marked copy of inode ``ino``; it is settled within ``delay``."""
        old = self.pending.pop(ino, None)
        if old is not None:  # copied up again while the first copy waits (rare): settle that one now
            _settle_batch([old], self.mark_name)
        self._last_add = now = trio.current_time()
        if not self.pending:
            self._oldest = now
        self.pending[ino] = fd
        if not self._scheduled:
            self._scheduled = True
            trio.lowlevel.spawn_system_task(self._run)

    async def _run(self) -> None:
        try:
            while self.pending:
                await trio.sleep(self.delay)
                now = trio.current_time()
                if (
                    now - self._last_add < self.delay
                    and now - self._oldest < MAX_AGE
                    and len(self.pending) < self.max_pending
                ):
                    continue  # copy-ups keep coming: later
                batch, self.pending = self.pending, {}
                self._inflight = batch
                done = self._inflight_done = threading.Event()
                finished = trio.Event()
                # Started now, not at trio's next checkpoint: settle() may block the loop waiting for it.
                trio.lowlevel.start_thread_soon(
                    partial(self._settle_inflight, list(batch.values()), done),
                    partial(_wake, trio.lowlevel.current_trio_token(), finished),
                )
                await finished.wait()
                self._inflight = {}
        finally:
            self._scheduled = False

    def _settle_inflight(self, fds: list[int], done: threading.Event) -> None:
        """In the worker thread: the batch, then ``done`` (which :meth:`settle` may be waiting for)."""
        try:
            _settle_batch(fds, self.mark_name)
        finally:
            done.set()

    def settle(self, ino: int) -> None:
        """Return once the copy of ``ino`` (if one is unsettled) is on the disk and unmarked."""
        fd = self.pending.pop(ino, None)
        if fd is not None:
            _settle_batch([fd], self.mark_name)
        elif ino in self._inflight:
            self._inflight_done.wait()

    def close(self) -> None:
        """Settle everything, sync the upper filesystem, drop the flag (errors are logged: the flag then stays).

        Closes the upper layer's fd it was given.
        """
        if self._inflight:
            self._inflight_done.wait()
        fds, self.pending = list(self.pending.values()), {}
        _settle_batch(fds, self.mark_name)
        try:
            if self._flagged:
                syncfs(f"/proc/self/fd/{self.upper_fd}")
                try:
                    os.unlink(FLAG, dir_fd=self.base_fd)
                except FileNotFoundError:
                    pass  # a mount made meanwhile (a plain umount does not wait for us) checked it already
                self._flagged = False
        except OSError as e:
            log.warning("copy-ups left for the next mount to check: %s", e.strerror)
        finally:
            os.close(self.upper_fd)


def recover(base_fd: int, upper_fd: int, mark: bytes) -> int:
    """Check the copies an earlier mount left unsettled (see the module guarantees); returns how many were restored.

    Nothing to do (one failed ``open``) unless WORKDIR holds the flag.
    """
    try:
        fd = os.open(FLAG, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
    except FileNotFoundError:
        return 0
    try:
        written_under = os.read(fd, 4096)
    finally:
        os.close(fd)
    same_mount = written_under == mount_instance(upper_fd)
    if same_mount:
        syncfs(f"/proc/self/fd/{upper_fd}")  # nothing was lost: make it durable before the marks go
    restored = 0
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _, _, files, dfd in os.fwalk(b".", dir_fd=upper_fd, follow_symlinks=False):
            for name in files:
                try:
                    if not stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        continue
                    value = os.getxattr(proc_path(dfd, name), mark, follow_symlinks=False)
                except OSError:
                    continue
                if not same_mount and _restore(root, dfd, name, value):
                    restored += 1
                os.removexattr(proc_path(dfd, name), mark, follow_symlinks=False)
    finally:
        os.close(root)
    syncfs(f"/proc/self/fd/{upper_fd}")
    os.unlink(FLAG, dir_fd=base_fd)
    if restored:
        log.warning("restored the copied-up data of %d file(s) after a crash", restored)
    return restored


def recover_dirs(upper: str, workdir: str, mark: bytes) -> int:
    """:func:`recover` for an upper layer and WORKDIR given as paths (a container read while not mounted)."""
    base = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return recover(base, root, mark)
        finally:
            os.close(root)
    finally:
        os.close(base)


def _restore(root: int, dfd: int, name: bytes, value: bytes) -> bool:
    """Give the upper file ``name`` back the data its mark names, unless its first bytes already are that data."""
    size_s, _, src = value.partition(b" ")
    try:
        size = int(size_s)
        lower = openat2_beneath(root, src.lstrip(b"/"), os.O_RDONLY)
    except (ValueError, OSError) as e:
        log.warning("cannot check the copy-up %s: its source %s: %s", name, src, e)
        return False
    try:
        up = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if _same_prefix(up, lower, size):
                return False
            os.ftruncate(up, 0)
            off = 0
            while off < size:
                buf = os.pread(lower, min(_CHUNK, size - off), off)
                if not buf:
                    break
                off += os.pwrite(up, buf, off)
            os.ftruncate(up, size)
            os.fsync(up)
            return True
        finally:
            os.close(up)
    finally:
        os.close(lower)


def _same_prefix(a: int, b: int, size: int) -> bool:
    off = 0
    while off < size:
        n = min(_CHUNK, size - off)
        x, y = os.pread(a, n, off), os.pread(b, n, off)
        if x != y or len(x) != n:
            return False
        off += n
    return True
