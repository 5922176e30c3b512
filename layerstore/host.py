"""The host's kernel, for both packages: facts about the process's place on it, and thin
wrappers for the Linux syscalls Python's ``os`` module lacks. Nothing else in unionmount
calls into libc.

Guarantees:

* :func:`real_root` / :func:`in_user_namespace` say whether the process is root of the
  machine or of a user namespace (what decides defaults: /var/lib, devices, suid).
* :func:`openat2_beneath` resolves a relative path below a directory fd without
  following any symlink, magic link or ``..`` escape (``RESOLVE_NO_SYMLINKS |
  RESOLVE_BENEATH``). It is how the daemon reaches a directory inside a layer.
* :func:`private_clone` gives a detached, private copy of the mount a directory is
  on, rooted at that directory and without the mounts below it (``open_tree`` with
  ``OPEN_TREE_CLONE``, made private with ``mount_setattr``): later mounts, the
  union's own included, never show through it. Needs CAP_SYS_ADMIN.
* :func:`renameat2` exposes ``RENAME_NOREPLACE``, ``RENAME_EXCHANGE`` and
  ``RENAME_WHITEOUT``.
* :func:`write_out` returns once a file's dirty data is on its device
  (``sync_file_range``), without the journal commit an ``fsync`` waits for;
  :func:`journal_orders_data` says where that is enough to order a later rename;
  :func:`start_write_out` only starts it (many files then wait once, together).

* :func:`syncfs` flushes the filesystem holding a directory.

Every failure is raised as :class:`OSError` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os


def in_user_namespace() -> bool:
    """True inside a user namespace (``unshare -r``, rootless podman): uid 0 there is a plain user outside."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def real_root() -> bool:
    """True for root of the machine (not of a user namespace): who may write /var/lib and make devices."""
    return os.geteuid() == 0 and not in_user_namespace()


RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic and x86)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_libc.statx.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int

_SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_SYNC_FILE_RANGE_WRITE = 2
_EXT_MAGIC = 0xEF53  # ext2, ext3 and ext4 share it; only a journal makes them order anything
_XFS_MAGIC = 0x58465342  # always journaled


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _raise(path: bytes | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


def openat2_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """Open ``path`` (relative, no leading slash) below ``dirfd``; no symlink is followed."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path or b"."),
        ctypes.byref(how),
        ctypes.c_size_t(_HOW_SIZE),
    )
    if fd < 0:
        if ctypes.get_errno() == errno.ELOOP:
            # A symlink where a directory was expected: to us, that path does not exist.
            raise OSError(errno.ENOENT, "symlink in layer path refused", path)
        _raise(path)
    return int(fd)


_SYS_OPEN_TREE = 428  # (asm-generic and x86 alike)
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MS_PRIVATE = 1 << 18


class _MountAttr(ctypes.Structure):
    _fields_ = [  # struct mount_attr (linux/mount.h)
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def private_clone(path: str) -> int:
    """An ``O_PATH`` fd on a private, detached clone of the mount of ``path``, rooted at ``path``, no submounts."""
    fd = _libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(path), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        _raise(os.fsencode(path))
    attr = _MountAttr(0, 0, _MS_PRIVATE, 0)
    if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def release_free_memory() -> None:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; names are single components relative to the directory fds."""
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        _raise(oldname)


def write_out(fd: int) -> None:
    """Write every dirty page of ``fd`` to the device and wait for it; no metadata, no journal commit."""
    if _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_ALL) != 0:
        _raise()


def start_write_out(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to the device (blocks are allocated now); does not wait for the I/O."""
    if _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        _raise()


_STATX_MNT_ID = 0x1000
_STATX_MNT_ID_UNIQUE = 0x4000  # Linux 6.8: never reused within a boot
_STATX_MNT_ID_OFFSET = 144  # struct statx: __u64 stx_mnt_id


def mount_instance(fd: int) -> bytes:
    """Names the mount ``fd`` lies on, as it is now: another mount of the same filesystem (after a crash,
    a reboot or a plain remount) gets another name. The boot's id plus the mount's id in it."""
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        boot = f.read().strip()
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID | _STATX_MNT_ID_UNIQUE, buf) != 0:
        _raise()
    mask = ctypes.c_uint32.from_buffer(buf).value
    if not mask & (_STATX_MNT_ID | _STATX_MNT_ID_UNIQUE):
        raise OSError(errno.ENOSYS, "statx gives no mount id")
    mnt = ctypes.c_uint64.from_buffer(buf, _STATX_MNT_ID_OFFSET).value
    return b"%s:%s%d" % (boot, b"u" if mask & _STATX_MNT_ID_UNIQUE else b"", mnt)


def fs_magic(fd: int) -> int:
    """``f_type`` of ``fstatfs(2)``: which filesystem ``fd`` lies on."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        _raise()
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def journal_orders_data(fd: int) -> bool:
    """True if, on the filesystem of ``fd``, a rename is never durable before data written out ahead of it.

    That holds where metadata changes commit through a journal, in order: the block
    allocation and size that :func:`write_out` makes the filesystem log belong to a
    transaction no later than the rename's, and the data is already on the device.
    Known to hold: xfs, and ext3/ext4 with a journal (``/proc/fs/jbd2`` lists the
    device). Anything else answers False, and callers fsync.
    """
    magic = fs_magic(fd)
    if magic == _XFS_MAGIC:
        return True
    if magic != _EXT_MAGIC:
        return False
    dev = os.fstat(fd).st_dev
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
        return any(j.rpartition("-")[0] == name for j in os.listdir("/proc/fs/jbd2"))
    except OSError:
        return False


def proc_path(dirfd: int, name: bytes) -> bytes:
    """A path that reaches ``name`` inside the directory ``dirfd`` without re-resolving its parents.

    Used for the calls that have no ``*at`` form (the xattr family). The final
    component is never followed by callers, who pass ``follow_symlinks=False``.
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def syncfs(path: str) -> None:
    """``syncfs(2)`` of the filesystem holding the directory ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)
