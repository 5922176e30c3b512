"""Room left in the upper layer, so that a write that does not fit fails at ``write()``.

With the writeback cache the kernel takes a ``write()`` into its page cache and sends
the data later: a full upper layer would report ENOSPC only at ``close()`` or
``fsync()``, after ``write()`` had said yes (kernel overlayfs fails the ``write()``).
The kernel can hold at most its dirty limit for this mount (the FUSE bdi's
``max_bytes``, about 47 MiB here) before it writes back. So while the upper layer
has less room than :attr:`Room.threshold` (twice that, at least 128 MiB), files are
opened for writing with ``direct_io``: each ``write()`` reaches the daemon and gets
the file system's own answer, ENOSPC included.

What this does not cover: a file opened while there was room, which then writes
more than the room that was left; its ENOSPC still comes at ``close()``/``fsync()``.
"""

from __future__ import annotations

import os
import time

FLOOR = 128 << 20
DEFAULT_DIRTY = 64 << 20  # where sysfs does not say
RECHECK_S = 0.05


def dirty_limit(bdi: str | None) -> int:
    """The most dirty data the kernel keeps for the mount with backing device ``bdi`` (``MAJ:MIN``)."""
    if bdi is not None:
        try:
            with open(f"/sys/class/bdi/{bdi}/max_bytes") as f:
                return int(f.read())
        except (OSError, ValueError):
            pass
    return DEFAULT_DIRTY


class Room:
    """How much room the file system of ``fd`` has; :meth:`low` is cached for :data:`RECHECK_S`."""

    def __init__(self, fd: int, dirty: int = DEFAULT_DIRTY) -> None:
        self.fd = fd
        self.threshold = max(FLOOR, 2 * dirty)
        self._checked = 0.0
        self._low = False

    def set_dirty_limit(self, dirty: int) -> None:
        self.threshold = max(FLOOR, 2 * dirty)
        self._checked = 0.0

    def low(self) -> bool:
        """True while the file system has less than :attr:`threshold` free (to its user)."""
        now = time.monotonic()
        if now - self._checked > RECHECK_S:
            try:
                sv = os.statvfs(self.fd)
                self._low = sv.f_bavail * sv.f_frsize < self.threshold
            except OSError:
                self._low = False
            self._checked = now
        return self._low
