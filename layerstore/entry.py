"""One file-system entry as the store records it (see :mod:`layerstore.schema`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import NamedTuple

import msgpack

from .schema import KIND_ENTRY


class Entry(NamedTuple):
    """A tuple, not a dataclass: an image of 10k files makes and replaces entries 40k times at import and a
    lookup unpacks one per path, and a tuple is made in a fifth of a frozen dataclass's time."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None
    blob: bytes | None = None
    link: bytes | None = None
    kind: int = KIND_ENTRY
    ino: int = 0
    nlink: int = 1
    sha256: bytes | None = None  # a file whose contents are not in the store yet (a lazy pull): their sha256

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def pack(self) -> bytes:
        """The msgpack array of the fields in order; without ``sha256`` when it is None (the record as before)."""
        return msgpack.packb(self if self.sha256 is not None else self[:13], use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        return cls(*msgpack.unpackb(raw, raw=True, strict_map_key=False))

    def with_(self, **kw: object) -> Entry:
        """A copy with ``kw``'s fields changed (a list copy, not ``_replace``'s generic path: an import of 10k
        files calls this 30k times)."""
        fields: list[object] = list(self)
        for k, v in kw.items():
            fields[_INDEX[k]] = v
        return tuple.__new__(Entry, fields)

    def stat_result(self) -> os.stat_result:
        """The entry as ``lstat`` would report it (times all equal to mtime)."""
        t = self.mtime_ns
        blocks = (self.size + 511) // 512 if stat.S_ISREG(self.mode) or stat.S_ISDIR(self.mode) else 0
        return os.stat_result(
            (self.mode, self.ino, 0, self.nlink, self.uid, self.gid, self.size, t // 10**9, t // 10**9, t // 10**9),
            {
                "st_atime_ns": t,
                "st_mtime_ns": t,
                "st_ctime_ns": t,
                "st_blocks": blocks,
                "st_blksize": 4096,
                "st_rdev": self.rdev,
            },
        )


DIR_BLOCK = 4096


def dir_size(names: Iterable[bytes]) -> int:
    """The size a directory holding ``names`` has on ext4, so that an image's directories report about what the same
    tree unpacked on disk reports (as kernel overlayfs over it shows), never 0.

    Each entry takes 8 bytes and its name padded to 4, after ``.`` and ``..``. What fits one 4 KiB block is one
    block, exactly as ext4 has it; a bigger directory is an htree there, an index block and leaves that splitting
    leaves about three quarters full (within a block or two of ext4 for 200 to 5,000 names)."""
    used = 24
    for n in names:
        used += 8 + ((len(n) + 3) & ~3)
    if used <= DIR_BLOCK:
        return DIR_BLOCK
    return DIR_BLOCK * (1 + -(-used // (DIR_BLOCK * 3 // 4)))


_INDEX = {name: i for i, name in enumerate(Entry._fields)}
