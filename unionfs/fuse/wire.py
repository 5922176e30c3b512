"""The kernel's FUSE wire format (``include/uapi/linux/fuse.h``, protocol 7.x): numbers and layouts.

Only what the daemon sends or reads is here, as :class:`struct.Struct` objects in the
kernel's native layout (``=``: no padding beyond what the header spells out). Replies
are packed from :class:`unionfs.union.records.Attrs` and friends; nothing here knows
the union.
"""

from __future__ import annotations

import struct

from unionfs.union.records import Attrs, FsStats

MAJOR = 7
MINOR = 40  # the newest minor whose layouts this module knows (fuse_open_out.backing_id: 7.40)
ROOT_ID = 1
MIN_READ_BUFFER = 8192

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = 27, 28, 29, 30, 31, 32, 33, 34, 35
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = 36, 37, 38, 39, 40, 41, 42, 43
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SYNCFS, TMPFILE, STATX = 44, 45, 46, 47, 50, 51, 52
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
#: opcode -> its name in lower case (the stats count requests under it)
OPCODES = {
    v: k.lower()
    for k, v in list(globals().items())
    if k.isupper() and isinstance(v, int) and k not in ("MAJOR", "MINOR", "ROOT_ID", "MIN_READ_BUFFER")
}

# INIT flags (bits 32.. travel in flags2, read by the kernel only with INIT_EXT)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

# fuse_setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
FATTR_KILL_SUIDGID = 1 << 11
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in / fuse_create_in .open_flags
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags
FSYNC_FDATASYNC = 1 << 0

# notifications: fuse_out_header.error carries the code, unique is 0
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# device ioctls: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)
BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2
BACKING_MAP = struct.Struct("=iIQ")  # fd, flags, padding

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
INIT_IN = struct.Struct("=IIIII")  # major, minor, max_readahead, flags, flags2 (the last only with INIT_EXT)
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran,
# max_pages, map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")
FORGET_IN = struct.Struct("=Q")
FORGET_ONE = struct.Struct("=QQ")
BATCH_FORGET_IN = struct.Struct("=II")
GETATTR_IN = struct.Struct("=IIQ")
# valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
# unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("=II")  # mode, umask
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")  # flags, open_flags
CREATE_IN = struct.Struct("=IIII")  # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh, open_flags, backing_id
RELEASE_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("=II")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=II")  # size, flags (without FUSE_SETXATTR_EXT)
GETXATTR_IN = struct.Struct("=II")  # size, padding
GETXATTR_OUT = struct.Struct("=II")
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, pad
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino, off, len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent, namelen, flags
# struct fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
# nlink, uid, gid, rdev, blksize, flags
ATTR_OUT = struct.Struct("=QII6Q10I")  # attr_valid, attr_valid_nsec, dummy, struct fuse_attr
ENTRY_OUT = struct.Struct("=QQQQII6Q10I")  # nodeid, generation, entry_valid, attr_valid, both nsecs, fuse_attr
DIRENT = struct.Struct("=QQII")  # ino, off, namelen, type

_U64 = (1 << 64) - 1
_NS = 1_000_000_000


_VALID: dict[float, tuple[int, int]] = {}  # the few timeouts a mount uses, converted once


def _valid(t: float) -> tuple[int, int]:
    """A cache timeout as the kernel takes it: whole seconds and nanoseconds, never negative."""
    v = _VALID.get(t)
    if v is None:
        c = max(t, 0.0)
        s = int(c)
        v = (s, min(int((c - s) * 1e9), _NS - 1))
        if len(_VALID) < 64:
            _VALID[t] = v
    return v


def _attr(a: Attrs) -> tuple[int, ...]:
    at, atn = divmod(a.st_atime_ns, _NS)
    mt, mtn = divmod(a.st_mtime_ns, _NS)
    ct, ctn = divmod(a.st_ctime_ns, _NS)
    return (
        a.st_ino, a.st_size, a.st_blocks, at & _U64, mt & _U64, ct & _U64, atn, mtn, ctn,
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
    )  # fmt: skip


def attr_out(a: Attrs) -> bytes:
    """``struct fuse_attr_out`` for ``a``."""
    s, ns = _valid(a.attr_timeout)
    return ATTR_OUT.pack(s, ns, 0, *_attr(a))


def entry_out(a: Attrs) -> bytes:
    """``struct fuse_entry_out`` for ``a`` (``st_ino`` 0: a negative entry, kept ``entry_timeout``)."""
    es, ens = _valid(a.entry_timeout)
    as_, ans = _valid(a.attr_timeout)
    return ENTRY_OUT.pack(a.st_ino, a.generation, es, as_, ens, ans, *_attr(a))


def statfs_out(s: FsStats) -> bytes:
    return STATFS_OUT.pack(
        s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0
    )


DIRENTPLUS = struct.Struct(ENTRY_OUT.format + DIRENT.format[1:])  # struct fuse_direntplus without the name
_PAD = [b"\0" * (-n & 7) for n in range(8)]


def direntplus(name: bytes, a: Attrs, off: int) -> bytes:
    """One entry of a READDIRPLUS reply (``struct fuse_direntplus``), padded to 8 bytes. A listing sends one
    per name, so it is packed in one go with :func:`_attr` written out (2.4 instead of 3.5 µs an entry);
    ``tests/test_units.py`` checks it against :func:`entry_out`."""
    es, ens = _valid(a.entry_timeout)
    as_, ans = _valid(a.attr_timeout)
    at, atn = divmod(a.st_atime_ns, _NS)
    mt, mtn = divmod(a.st_mtime_ns, _NS)
    ct, ctn = divmod(a.st_ctime_ns, _NS)
    ino, mode = a.st_ino, a.st_mode
    # fmt: off
    return (
        DIRENTPLUS.pack(
            ino, a.generation, es, as_, ens, ans,
            ino, a.st_size, a.st_blocks, at & _U64, mt & _U64, ct & _U64, atn, mtn, ctn,
            mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
            ino, off, len(name), (mode >> 12) & 0o17,
        )
        + name
        + _PAD[len(name) & 7]
    )
    # fmt: on
