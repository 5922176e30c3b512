"""Reaching the daemon that serves a mount, through the mount itself.

The daemon answers two read-only extended attributes of the mount's root
directory, which no layer can shadow (the union answers them before looking at
any layer, and never lists them):

``user.unionmount.pid``
    the daemon's process id, as decimal text;
``user.unionmount.stats``
    its request counters as JSON (:func:`unionfs.union.stats.snapshot`).

Because the kernel routes a ``getxattr`` on the mount's root to the daemon that
serves that very mount, the answer cannot come from anybody else: no command line
is matched and no process is guessed at. A client that then waits for the daemon
to exit holds a pidfd, opened while the mount was still up, so a recycled pid
can never be mistaken for it.
"""

from __future__ import annotations

import errno
import json
import os
import select

PID_XATTR = b"user.unionmount.pid"
STATS_XATTR = b"user.unionmount.stats"
NAMES = (PID_XATTR, STATS_XATTR)


def answer(name: bytes) -> bytes | None:
    """Daemon side: the value of control attribute ``name`` of the root, or None if it is none of ours."""
    if name == PID_XATTR:
        return str(os.getpid()).encode()
    if name == STATS_XATTR:
        from unionfs.union.stats import snapshot

        return json.dumps(snapshot()).encode()
    return None


class NotServed(Exception):
    """No unionmount daemon serves that path (not a mount, another file system, or an old daemon)."""


def _ask(mnt: str, name: bytes) -> bytes:
    try:
        return os.getxattr(mnt, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTCONN, errno.ENOENT):
            raise NotServed(mnt) from None
        raise


def daemon_pid(mnt: str) -> int:
    """Client side: the pid of the daemon serving the mount at ``mnt`` (which must be its root)."""
    if not os.path.ismount(mnt):
        raise NotServed(mnt)
    try:
        return int(_ask(mnt, PID_XATTR))
    except ValueError:
        raise NotServed(mnt) from None


def stats(mnt: str) -> dict[str, object]:
    """Client side: the request counters of the daemon serving ``mnt``."""
    if not os.path.ismount(mnt):
        raise NotServed(mnt)
    data: dict[str, object] = json.loads(_ask(mnt, STATS_XATTR))
    return data


class Daemon:
    """A handle on the daemon serving a mount, valid even after the mount is gone (a pidfd)."""

    def __init__(self, mnt: str) -> None:
        self.pid = daemon_pid(mnt)
        try:
            self.fd: int | None = os.pidfd_open(self.pid)
        except OSError:  # already gone
            self.fd = None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the daemon to exit; True once it has."""
        if self.fd is None:
            return True
        return bool(select.select([self.fd], [], [], timeout)[0])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
