"""The local driver's file systems: a volume created with ``-o type=TYPE -o device=DEV -o o=OPTS`` is a mount.

As Docker's ``local`` driver does it, ``DEV`` is mounted on the volume's ``_data``
(with mount(8), so helpers such as ``mount.fuse.sshfs`` and ``mount.nfs`` work) when
the first mount that uses the volume starts, and unmounted when the last one ends:

* who uses a volume is its live leases (:func:`layerstore.volumes.lease`, flocks that
  the kernel drops when a daemon dies), so the count cannot go stale;
* :func:`acquire` here and :func:`layerstore.volumes.release` decide under
  ``volumes/NAME/mount.lock`` (:func:`locked`), so two starting or ending mounts never
  both mount or both unmount;
* a ``_data`` that is already a mount point is reused, never mounted over again
  (a daemon killed with -9 leaves its mount; the next user takes it as it is, and
  :func:`layerstore.volumes.sweep`, which the ``mount`` and ``volume`` commands run,
  unmounts it when nobody uses it);
* mount(8) runs with a timeout: a dead NFS server or SSH host fails the mount with
  one line instead of hanging it.

This module needs only the store's root path, not its lmdb (a daemon releases its
volumes at its exit), and knows nothing of leases: :mod:`layerstore.volumes` counts them.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

MOUNT_TIMEOUT = 30.0  # seconds mount(8) or umount(8) may take
_TYPE = re.compile(r"[a-z0-9][a-z0-9._-]*")


class MountError(Exception):
    """A volume's file system could not be mounted (the message is one line)."""


def check(options: dict[str, str]) -> None:
    """Refuse options that cannot make a mount, before anything is created."""
    kind, device, o = options.get("type"), options.get("device"), options.get("o", "")
    if not kind:
        raise MountError("the local driver needs -o type=TYPE to mount a file system (or type=none,o=bind)")
    if not _TYPE.fullmatch(kind):
        raise MountError(f"'{kind}' is not a file system type")
    if not device:
        raise MountError(f"-o type={kind} needs -o device=DEVICE (e.g. tmpfs, /dev/sdb1, /path/img with o=loop)")
    if "\n" in device or "\n" in o or device.startswith("-") or o.startswith("-"):
        raise MountError("volume options cannot hold newlines or start with '-'")
    if "loop" in o.split(",") and not os.path.isfile(device):
        raise MountError(f"volume device '{device}' is not a file (o=loop mounts an image file)")


def data_dir(root: str, name: str) -> str:
    return os.path.join(root, "volumes", name, "_data")


@contextmanager
def locked(root: str, name: str) -> Iterator[None]:
    path = os.path.join(root, "volumes", name, "mount.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mounted(path: str) -> int:
    """How many mounts are stacked on ``path`` (0: none)."""
    n = 0
    with open("/proc/self/mountinfo") as f:
        for line in f:
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            n += where == path
    return n


def _run(cmd: list[str]) -> str | None:
    """Run mount(8)/umount(8); None if it worked, else its last line."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no answer in {MOUNT_TIMEOUT:g} s"
    except FileNotFoundError as e:
        return str(e)
    if r.returncode == 0:
        return None
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip() and "dmesg(1)" not in ln]
    return lines[0] if lines else f"exit status {r.returncode}"


def acquire(root: str, name: str, options: dict[str, str]) -> bool:
    """Make sure the volume's file system is mounted on its ``_data`` (the caller holds a lease); True if this
    call mounted it. A mount already there (another user's, or one a dead daemon left) is used as it is."""
    path = data_dir(root, name)
    with locked(root, name):
        if mounted(path):
            return False
        cmd = ["mount", "-t", options["type"]]
        if options.get("o"):
            cmd += ["-o", options["o"]]
        why = _run([*cmd, options["device"], path])
        if why is not None:
            if mounted(path):  # a timed-out helper that got there after all: not ours to keep
                _run(["umount", "-l", path])
            raise MountError(f"cannot mount volume '{name}' ({options['type']} {options['device']}): {why}")
        return True


def unmount(path: str) -> None:
    """Unmount what is mounted on ``path``; lazily where it is busy (a shell inside it): gone when it lets go."""
    while mounted(path):
        if _run(["umount", path]) is not None:
            _run(["umount", "-l", path])
            break
