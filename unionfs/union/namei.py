"""Name resolution across layers: what ``NAME`` inside a union directory is.

The rules are overlayfs' (``Documentation/filesystems/overlayfs.rst``):

* the upper layer is searched first, then the parent's lower directories from
  top to bottom;
* a whiteout (in any dialect, see :mod:`unionfs.union.markers`) ends the search and
  hides every lower entry of that name; a ``.wh.NAME`` hides only layers below
  the one that holds it;
* a non-directory ends the search; a directory merges with the directories of
  the same name below it, until an opaque directory or a non-directory;
* a directory carrying a redirect continues the lower directories found at
  the redirect's path instead of at its own name (renamed lower directories).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from layerstore.host import proc_path

from .inodes import LAYER_SHIFT, ROOT_INO, UPPER_ID, Node, make_ino
from .layers import DirLayer, Layer, join
from .markers import (
    WH_OPAQUE,
    WH_PREFIX,
    DirMarks,
    WriteDialect,
    dir_marks,
    is_whiteout_stat,
    is_xwhiteout,
    metacopy_source,
)

S_IFDIR = stat.S_IFDIR
LOWER_DIR_CACHE = 16384  # lower directories whose whiteout names are remembered
_NO_NAMES: frozenset[bytes] = frozenset()


@dataclass(slots=True, frozen=True)
class LowerDir:
    """What a lower directory's own listing and xattrs say about its children."""

    whiteouts: frozenset[bytes]  # names hidden by a ``.wh.NAME`` file here
    xwhiteouts: bool  # empty files here may be xattr whiteouts


@dataclass(slots=True)
class Found:
    """The resolution of one name: where its parts are and which number it has."""

    ino: int
    kind: int
    upper_st: os.stat_result | None
    lower_st: os.stat_result | None  # topmost lower entry
    lowers: list[tuple[int, bytes]] = field(default_factory=list)
    opaque: bool = False
    index_name: bytes | None = None
    data: tuple[int, bytes] | None = None  # where the data of a metadata-only entry is


def _one_filesystem(layers: Sequence[Layer]) -> bool:
    """Whether every layer is a plain directory and all lie on one filesystem."""
    devs = set()
    for layer in layers:
        if not isinstance(layer, DirLayer):
            return False
        devs.add(os.fstat(layer.root_fd).st_dev)
    return len(devs) == 1


def _index_name(li: int, st: os.stat_result) -> bytes:
    """The hard-link index entry of a lower file with several links (by its layer and inode, whatever
    the union reports, so that an index made before raw inode numbers is still found)."""
    return b"%x" % make_ino(li + 2, st.st_ino)


class Resolver:
    """Resolves names and reads attributes; it never writes."""

    def __init__(
        self, upper: DirLayer | None, lowers: Sequence[Layer], dialect: WriteDialect, upper_id: int = UPPER_ID
    ) -> None:
        self.upper_layer = upper
        self.upper_id = upper_id
        self.lowers = lowers
        self.dialect = dialect
        self._dirs: OrderedDict[tuple[int, bytes], LowerDir] = OrderedDict()
        #: the union's entries report their layers' own inode numbers (see :meth:`ino`)
        self.raw_inos = upper_id == UPPER_ID and _one_filesystem([*lowers, *([upper] if upper else [])])

    def forget_cache(self) -> None:
        """Drop what is kept of lower directories (only a cache: it is rebuilt as needed)."""
        self._dirs.clear()

    def ino(self, layer_id: int, st_ino: int) -> int:
        """The union inode number of real inode ``st_ino`` of layer ``layer_id``.

        Where every layer is a plain directory on one filesystem, its own number, as
        overlayfs reports it then: unique there, and what a tool comparing full inode
        numbers with the layers' expects. Elsewhere
        the layer is encoded in the high bits (:func:`unionfs.union.inodes.make_ino`); the two
        ranges never meet, so numbers kept from either (``origin``) stay unique.
        """
        if self.raw_inos and ROOT_INO < st_ino < 1 << LAYER_SHIFT:
            return st_ino
        return make_ino(layer_id, st_ino)

    # -- markers ---------------------------------------------------------------
    def lower_listing(self, li: int, path: bytes) -> list[bytes]:
        """List a lower directory and remember what its markers say (lower layers never change)."""
        layer = self.lowers[li]
        try:
            listing = layer.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            listing = []  # a redirect may name a path some layers do not have
        wh = frozenset(n[len(WH_PREFIX) :] for n in listing if n.startswith(WH_PREFIX) and n != WH_OPAQUE)
        xwh = False
        if listing:
            xwh = dir_marks(layer, path, False).xwhiteouts
        self._remember(li, path, LowerDir(wh or _NO_NAMES, xwh))
        return listing

    def lower_dir(self, li: int, path: bytes) -> LowerDir:
        """The whiteout names and xwhiteout mark of one lower directory (cached, bounded)."""
        info = self._dirs.get((li, path))
        if info is None:
            self.lower_listing(li, path)
            info = self._dirs[(li, path)]
        else:
            self._dirs.move_to_end((li, path))
        return info

    def _remember(self, li: int, path: bytes, info: LowerDir) -> None:
        self._dirs[(li, path)] = info
        if len(self._dirs) > LOWER_DIR_CACHE:
            self._dirs.popitem(last=False)

    def _marks(self, layer: Layer, path: bytes) -> DirMarks:
        has_opq = layer.lstat(join(path, WH_OPAQUE)) is not None
        return dir_marks(layer, path, has_opq)

    def _wh_file(self, layer: Layer, parent: bytes, name: bytes) -> bool:
        if len(name) + len(WH_PREFIX) > 255:
            return False
        return layer.lstat(join(parent, WH_PREFIX + name)) is not None

    def find_data(self, start: int, path: bytes) -> tuple[int, bytes] | None:
        """The lower layer (from ``start`` down) that holds the data of a metadata-only copy."""
        for li in range(start, len(self.lowers)):
            layer = self.lowers[li]
            st = layer.lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue  # a whiteout or other entry of a middle layer: the data is deeper
            src = metacopy_source(layer, path)
            if src is None:
                return li, path
            path = src or path
        return None

    def _data_of(self, layer: Layer, path: bytes, st: os.stat_result, below: int) -> tuple[int, bytes] | None:
        """Where the data of a metadata-only copy is (None: the file holds its own); ``below``: the first
        layer under ``layer``. With no layer below, no data could be found: no xattr is read."""
        if below >= len(self.lowers) or not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        src = metacopy_source(layer, path)
        if src is None:
            return None
        return self.find_data(below, src or path)

    # -- lower search ----------------------------------------------------------
    def _search_lowers(
        self, parent_lowers: list[tuple[int, bytes]], name: bytes, want_dir_only: bool
    ) -> tuple[list[tuple[int, bytes]], os.stat_result | None, int | None]:
        """Walk the parent's lower directories; returns (parts, topmost stat, kind)."""
        parts: list[tuple[int, bytes]] = []
        top: os.stat_result | None = None
        kind: int | None = S_IFDIR if want_dir_only else None
        for li, lpath in parent_lowers:
            layer = self.lowers[li]
            pinfo = self.lower_dir(li, lpath)
            path = join(lpath, name)
            st = layer.lstat(path)
            if st is not None:
                if is_whiteout_stat(st) or (pinfo.xwhiteouts and is_xwhiteout(layer, path, st)):
                    break
                k = stat.S_IFMT(st.st_mode)
                if kind is None:
                    kind = k
                elif not (kind == S_IFDIR and k == S_IFDIR):
                    break
                parts.append((li, path))
                if top is None:
                    top = st
                if k != S_IFDIR:
                    break
                marks = self._marks(layer, path)
                if marks.opaque:
                    break
                if marks.redirect is not None:
                    more, _ = self._follow_redirect(marks.redirect, parent_lowers, li + 1)
                    parts.extend(more)
                    break
            if name in pinfo.whiteouts:
                break
        return parts, top, kind

    def _follow_redirect(
        self, redirect: bytes, parent_lowers: list[tuple[int, bytes]], start: int
    ) -> tuple[list[tuple[int, bytes]], os.stat_result | None]:
        """Lower directories continued by a redirect, searched in layers ``start`` and below.

        An absolute redirect (``/a/b``) is a layer-relative path; a relative one is a
        name in the same parent directory (overlayfs writes both).
        """
        if redirect.startswith(b"/"):
            parent_rel, _, leaf = redirect.strip(b"/").rpartition(b"/")
            bases = [(i, parent_rel) for i in range(start, len(self.lowers))]
        else:
            leaf = redirect
            bases = [(i, p) for i, p in parent_lowers if i >= start]
        parts, top, _ = self._search_lowers(bases, leaf, want_dir_only=True)
        return parts, top

    def lower_visible(self, parent: Node, name: bytes) -> bool:
        """True if a lower layer shows ``name`` in ``parent`` (so removing it needs a whiteout)."""
        parts, _, _ = self._search_lowers(parent.lowers, name, want_dir_only=False)
        return bool(parts)

    # -- lookup ----------------------------------------------------------------
    def lookup(self, parent: Node, name: bytes) -> Found | None:
        """Resolve ``name`` in directory ``parent``; None if it does not exist."""
        if name.startswith(WH_PREFIX):
            return None
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        ppath = parent.path
        path = join(ppath, name)
        up = self.upper_layer if parent.in_upper else None
        upper_st = None
        search_lowers = bool(parent.lowers)
        if up is not None:
            upper_st = up.lstat(path)
            if upper_st is not None:
                if is_whiteout_stat(upper_st):  # xattr whiteouts belong to lower layers only
                    return None
                if not stat.S_ISDIR(upper_st.st_mode):
                    return self._upper_file(path, upper_st)
                marks = self._marks(up, path)
                if marks.opaque:
                    return Found(self.ino(self.upper_id, upper_st.st_ino), S_IFDIR, upper_st, None, [], True)
                if marks.redirect is not None:
                    parts, top = self._follow_redirect(marks.redirect, parent.lowers, 0)
                    return self._dir(upper_st, parts, top)
            if search_lowers and self._wh_file(up, ppath, name):
                if upper_st is None:
                    return None
                search_lowers = False
        if not search_lowers:
            if upper_st is None:
                return None
            return self._dir(upper_st, [], None)
        parts, top, kind = self._search_lowers(parent.lowers, name, want_dir_only=upper_st is not None)
        if upper_st is not None:
            return self._dir(upper_st, parts, top)
        return self._lower_found(parts, top, kind)

    def lookup_below(self, parent: Node, name: bytes) -> Found | None:
        """:meth:`lookup` of a name that ``parent``'s upper part is known to lack (neither an entry nor a
        whiteout of it there): only its lower parts are searched."""
        if name.startswith(WH_PREFIX):
            return None
        parts, top, kind = self._search_lowers(parent.lowers, name, want_dir_only=False)
        return self._lower_found(parts, top, kind)

    def _lower_found(
        self, parts: list[tuple[int, bytes]], top: os.stat_result | None, kind: int | None
    ) -> Found | None:
        """What a lower search found for a name the upper layer does not have."""
        if top is None or kind is None:
            return None
        if kind == S_IFDIR:
            return self._dir(None, parts, top)
        li, lpath = parts[0]
        ino = self.ino(li + 2, top.st_ino)
        index = _index_name(li, top) if top.st_nlink > 1 else None
        data = self._data_of(self.lowers[li], lpath, top, li + 1)
        return Found(ino, kind, None, top, parts, False, index, data)

    def lookup_listing(
        self, parent: Node, names: list[bytes], below: bool = False
    ) -> Iterator[tuple[bytes, Found | None]]:
        """:meth:`lookup` of every name of ``parent``'s listing, in order; ``below``: names that
        ``parent``'s upper part lacks (:meth:`lookup_below`).

        A directory that draws from one plain lower layer only (most of an image) has
        its non-directory entries resolved through one directory fd, with one
        ``fstatat`` each; anything else (directories, whiteouts, several lower parts)
        takes :meth:`lookup` (or :meth:`lookup_below`).
        """
        look = self.lookup_below if below else self.lookup
        part = parent.lowers[0] if len(parent.lowers) == 1 and (below or not parent.in_upper) else None
        layer = self.lowers[part[0]] if part is not None else None
        if part is None or not isinstance(layer, DirLayer) or self.lower_dir(*part).xwhiteouts:
            for name in names:
                yield name, look(parent, name)
            return
        li, lpath = part  # (its whiteouts hide names of deeper layers, and it has none below)
        dfd = layer.dirfd(lpath)
        for name in names:
            if name.startswith(WH_PREFIX):
                yield name, None
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                yield name, None
                continue
            if stat.S_ISDIR(st.st_mode) or is_whiteout_stat(st):
                yield name, look(parent, name)  # marks, redirects, deeper layers
                dfd = layer.dirfd(lpath)  # (the lookup may have pushed it out of the fd cache)
                continue
            path = join(lpath, name)
            ino = self.ino(li + 2, st.st_ino)
            index = _index_name(li, st) if st.st_nlink > 1 else None
            data = None
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size
                and li + 1 < len(self.lowers)
                and os.listxattr(proc_path(dfd, name), follow_symlinks=False)
            ):
                data = self._data_of(layer, path, st, li + 1)  # it has xattrs: maybe a metadata-only copy
            yield name, Found(ino, stat.S_IFMT(st.st_mode), None, st, [(li, path)], False, index, data)

    def _dir(
        self, upper_st: os.stat_result | None, parts: list[tuple[int, bytes]], top: os.stat_result | None
    ) -> Found:
        if parts and top is not None:
            ino = self.ino(parts[0][0] + 2, top.st_ino)
        else:
            assert upper_st is not None
            ino = self.ino(self.upper_id, upper_st.st_ino)
        return Found(ino, S_IFDIR, upper_st, top, parts)

    def _upper_file(self, path: bytes, st: os.stat_result) -> Found:
        assert self.upper_layer is not None
        kind = stat.S_IFMT(st.st_mode)
        ino = self.ino(self.upper_id, st.st_ino)
        xp = self.upper_layer.xpath(path)
        origin = _getx(xp, self.dialect.origin)
        index = None
        if origin is not None:
            try:
                ino = int(origin)
                if st.st_nlink > 1:  # linked to an index entry, whose name it carries (before: its origin)
                    index = _getx(xp, self.dialect.index) or b"%x" % ino
            except ValueError:
                pass
        found = Found(ino, kind, st, None, [], False, index)
        found.data = self._data_of(self.upper_layer, path, st, 0)
        return found


def _getx(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
