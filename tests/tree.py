"""Test data: a lower-layer template, a tree snapshot, and an op recorder."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb


def make_lowers(base: Path) -> list[Path]:
    """Two lower layers (top first) using the dialects kernel overlayfs reads.

    top (l1): a file, a whiteout of l2's ``gone``, an opaque ``opq`` over l2's,
    a dir merged with l2's ``d``, a hard-link pair, a symlink, xattrs.
    base (l2): files, nested dirs, a fifo, a sparse file, a hard-link pair.
    """
    l1, l2 = base / "l1", base / "l2"
    for p in (l1, l2):
        p.mkdir(parents=True)
    # base layer
    (l2 / "a").write_text("base a\n")
    (l2 / "gone").write_text("whited out\n")
    (l2 / "d").mkdir()
    (l2 / "d" / "x").write_text("x from base\n")
    (l2 / "d" / "sub").mkdir()
    (l2 / "d" / "sub" / "deep").write_text("deep\n")
    (l2 / "opq").mkdir()
    (l2 / "opq" / "hidden").write_text("hidden by opaque\n")
    (l2 / "lowdir").mkdir()
    (l2 / "lowdir" / "f1").write_text("f1\n")
    (l2 / "lowdir" / "inner").mkdir()
    (l2 / "lowdir" / "inner" / "f2").write_text("f2\n")
    (l2 / "empty").mkdir()
    os.mkfifo(l2 / "fifo")
    with open(l2 / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    (l2 / "hl1").write_text("hard linked\n")
    os.link(l2 / "hl1", l2 / "hl2")
    os.chmod(l2 / "a", 0o640)
    os.chown(l2 / "a", 1000, 1000)
    os.setxattr(l2 / "a", "user.origin", b"base")
    # top layer
    (l1 / "b").write_text("top b\n")
    os.mknod(l1 / "gone", stat.S_IFCHR | 0o600, 0)
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    (l1 / "opq" / "visible").write_text("in opaque\n")
    (l1 / "d").mkdir()
    (l1 / "d" / "y").write_text("y from top\n")
    (l1 / "link").symlink_to("a")
    (l1 / "dangling").symlink_to("/nonexistent/target")
    (l1 / "t1").write_text("top hard link\n")
    os.link(l1 / "t1", l1 / "t2")
    os.setxattr(l1 / "b", "user.note", b"top")
    return [l1, l2]


_SKIP_XATTR = ("trusted.overlay.", "user.overlay.", "trusted.unionmount.", "user.unionmount.", "security.")


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a process can observe about a tree, except inode numbers and times.

    Hard links are reported as groups: each entry names the first path (in
    sorted order) that shares its inode.
    """
    out: dict[str, tuple[Any, ...]] = {}
    first_of: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = tuple(
                sorted(
                    (x, os.getxattr(p, x, follow_symlinks=False))
                    for x in os.listxattr(p, follow_symlinks=False)
                    if not x.startswith(_SKIP_XATTR)
                )
            )
            if kind == stat.S_IFDIR:
                body: Any = None
                link = None
                size = None
            else:
                link = first_of.setdefault(st.st_ino, rel)
                size = st.st_size
                if kind == stat.S_IFREG:
                    with open(p, "rb") as f:
                        body = hashlib.sha256(f.read()).hexdigest()[:16]
                elif kind == stat.S_IFLNK:
                    body = os.readlink(p)
                else:
                    body = st.st_rdev
            out[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, size, body, link, xattrs)
    return out


class Recorder:
    """Runs operations and records each outcome as a value or an errno name."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def __call__(self, label: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
            self.log.append((label, _plain(value)))
            return value
        except OSError as e:
            self.log.append((label, errno.errorcode.get(e.errno or 0, str(e.errno))))
            return None


def view(root: Path) -> dict[str, tuple[Any, ...]]:
    """:func:`snapshot` without directory link counts (a merged directory reports 1, as overlayfs does)."""
    return {
        k: (v[:3] + (None,) + v[4:] if v[0].startswith("0o40") else v) for k, v in snapshot(root).items()
    }  # fmt: skip


def _plain(v: Any) -> Any:
    if isinstance(v, os.stat_result):
        return (oct(v.st_mode), v.st_nlink, v.st_size, v.st_uid, v.st_gid)
    if isinstance(v, list):
        return sorted(v)
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def store_digest(root: Path) -> str:
    """What the store holds, as one digest (names, sizes and contents of every file; the lmdb file by its records)."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for n in sorted(files) + dirnames:
            p = Path(dirpath) / n
            h.update(str(p.relative_to(root)).encode())
            if p.is_file() and p.parent.name != "meta":
                h.update(p.read_bytes())
    env = lmdb.open(str(root / "meta"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        for name, _ in txn.cursor():
            db = env.open_db(bytes(name), txn=txn, create=False)
            for k, v in txn.cursor(db=db):
                h.update(bytes(k) + b"=" + bytes(v))
    env.close()
    return h.hexdigest()
