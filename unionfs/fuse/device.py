"""The FUSE device: mounting a connection, unmounting it, and registering backing files.

As root, :func:`mount` opens ``/dev/fuse`` and calls ``mount(2)`` itself; a plain user's
mount goes through ``fusermount3``, which hands the device back over a socket (its
``_FUSE_COMMFD`` protocol), as libfuse does. The option words are those of ``mount.fuse3``:
``ro``, ``nosuid``/``suid``, ``nodev``/``dev``, ``noexec``, ``fsname=``, ``subtype=``,
``default_permissions``, ``allow_other``; anything else is refused with one line.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import socket
import stat
import subprocess

from . import wire

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
_KERNEL = {"default_permissions", "allow_other"}  # options the fuse file system itself takes


class MountError(Exception):
    """The mount could not be made; the message is one line for the user."""


def _split(options: set[str]) -> tuple[int, list[str], str, str]:
    """Mount flags, the file system's own options, the source name and the type's subtype."""
    flags = MS_NOSUID | MS_NODEV  # as libfuse: only "suid"/"dev" lift them
    data: list[str] = []
    fsname, subtype = "unionmount", "unionmount"
    for opt in sorted(options):
        key, _, value = opt.partition("=")
        if key in _FLAGS:
            flags |= _FLAGS[key]
        elif key == "suid":
            flags &= ~MS_NOSUID
        elif key == "dev":
            flags &= ~MS_NODEV
        elif key == "fsname":
            fsname = value
        elif key == "subtype":
            subtype = value
        elif key in _KERNEL:
            data.append(key)
        elif key != "debug":
            raise MountError(f"unknown FUSE mount option '{opt}'")
    if "suid" in options and "nosuid" in options:
        flags |= MS_NOSUID
    if "dev" in options and "nodev" in options:
        flags |= MS_NODEV
    return flags, data, fsname, subtype


def mount(mountpoint: str, options: set[str]) -> int:
    """Mount a FUSE connection on ``mountpoint``; returns the device's fd (close-on-exec)."""
    flags, data, fsname, subtype = _split(options)
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise MountError(f"{mountpoint}: {e.strerror}") from None
    if os.geteuid() != 0:
        return _fusermount(mountpoint, flags, data, fsname, subtype)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = [f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
    args = ",".join(opts + data).encode()
    if _libc.mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(), flags, args) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount on {mountpoint}: {os.strerror(err)}")
    return fd


def _fusermount(mountpoint: str, flags: int, data: list[str], fsname: str, subtype: str) -> int:
    """Mount through the setuid ``fusermount3``, which passes the opened device back over a socket."""
    exe = shutil.which("fusermount3")
    if exe is None:
        raise MountError("fusermount3 not found (install fuse3)")
    words = [w for w, f in _FLAGS.items() if flags & f] + data + [f"fsname={fsname}", f"subtype={subtype}"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        proc = subprocess.Popen(
            [exe, "-o", ",".join(words), "--", mountpoint], env=env, pass_fds=(theirs.fileno(),),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        err = proc.communicate()[1].decode(errors="replace").strip()
    if not fds:
        raise MountError(err.splitlines()[-1] if err else f"fusermount3 could not mount on {mountpoint}")
    fd = fds[0]
    os.set_inheritable(fd, False)
    return fd


def unmount_now(mountpoint: str) -> None:
    """Unmount at once, as ``umount``/``fusermount3 -u`` do: EBUSY while the mount is in use.

    As root with umount2(2) (no symlink followed), otherwise with fusermount3; OSError
    (with fusermount3's last line for a plain user) if the mount stays.
    """
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        raise OSError(2, "fusermount3 is not installed", mountpoint)
    r = subprocess.run([exe, "-u", "--", mountpoint], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise OSError(0, (r.stderr.strip().splitlines() or ["unmount failed"])[-1], mountpoint)


def unmount(mountpoint: str) -> None:
    """Detach the mount (best effort: it may be gone already)."""
    if os.geteuid() == 0:
        _libc.umount2(os.fsencode(mountpoint), MNT_DETACH)
        return
    exe = shutil.which("fusermount3")
    if exe is not None:
        subprocess.run([exe, "-u", "-q", "-z", "--", mountpoint], stderr=subprocess.DEVNULL, check=False)


def backing_open(dev: int, fd: int) -> int:
    """Register ``fd``'s file as a backing file of the connection; returns its id (needs CAP_SYS_ADMIN)."""
    return int(fcntl.ioctl(dev, wire.BACKING_OPEN, bytearray(wire.BACKING_MAP.pack(fd, 0, 0)), True))


def backing_close(dev: int, backing_id: int) -> None:
    """Let go of a backing file id (the files already open on it keep it)."""
    fcntl.ioctl(dev, wire.BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")), True)
