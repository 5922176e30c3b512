"""What a container changed, path by path, against its image (``docker diff``).

A path is *added* (``A``) when the image has nothing there, *changed* (``C``)
when the image has an entry there that differs (contents, type, metadata), and
*deleted* (``D``) when the image has it and the container does not. As in
Docker, a directory is also ``C`` when something below it changed, and a
deleted directory is one ``D`` (its contents are implied).

The comparison is between what the union shows (:class:`~unionfs.union.view.View`)
and the image's merged tree, so every way the container layer can record a
change comes out right: copy-ups, metadata-only copies, whiteouts of every
dialect, opaque directories (the image's old children come out ``D``) and
renamed directories (``D`` at the old path, ``A`` for the new one and all it
holds). Directories the daemon made only to graft a volume on are left out
unless something else was put in them (Docker keeps mount points in a layer of
their own). Only directories with an upper part, or showing a lower directory
from another path, are descended into: an untouched subtree costs nothing.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from layerstore.entry import Entry

from .markers import is_graftpoint
from .storelayer import StoreLayer
from .view import Item, View

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(slots=True, frozen=True)
class Change:
    kind: str  # "A", "C" or "D"
    path: bytes  # layer-relative (no leading slash)
    opaque: bool = False  # a changed directory that hides everything the image had below it

    def __str__(self) -> str:
        return f"{self.kind} /{self.path.decode('utf-8', 'surrogateescape')}"


def changes(view: View, image: StoreLayer) -> list[Change]:
    """Every change of ``view`` against ``image``, sorted by path."""
    out: list[Change] = []
    _compare(view, image, view.root(), out)
    out.sort(key=lambda c: c.path.split(b"/"))
    return out


def _compare(view: View, image: StoreLayer, item: Item, out: list[Change]) -> bool:
    """Append the changes below directory ``item``; True if there was any."""
    kids = view.children(item)
    here = image.entry(item.path)
    before = set(image.listdir(item.path)) if here is not None and here.is_dir else set()
    names = {k.path.rpartition(b"/")[2] for k in kids}
    changed = False
    for name in sorted(before - names):
        out.append(Change(DELETED, _join(item.path, name)))
        changed = True
    for kid in kids:
        if kid.source == kid.path:
            continue  # the image's own entry, untouched (and so is everything below it)
        old = image.entry(kid.path)
        if old is None and kid.is_dir and view.upper is not None and is_graftpoint(view.upper, kid.path):
            below: list[Change] = []
            if _compare(view, image, kid, below):  # made to graft a volume on: a change only if used
                out.append(Change(ADDED, kid.path))
                out.extend(below)
                changed = True
        elif old is None:
            out.append(Change(ADDED, kid.path))
            if kid.is_dir:
                out.extend(Change(ADDED, d.path) for d in view.walk(kid))
            changed = True
        elif kid.is_dir and old.is_dir:
            changed_below = _compare(view, image, kid, out)
            if changed_below or _differs(view, image, kid, old):
                out.append(Change(CHANGED, kid.path, opaque=kid.node.opaque))
                changed = True
        elif kid.in_upper or _differs(view, image, kid, old):
            out.append(Change(CHANGED, kid.path))
            if kid.is_dir:
                out.extend(Change(ADDED, d.path) for d in view.walk(kid))
            changed = True
    return changed


def _differs(view: View, image: StoreLayer, item: Item, old: Entry) -> bool:
    """True if ``item`` is not the image's entry ``old`` (same path) in type, metadata or xattrs."""
    st = item.st
    if (st.st_mode, st.st_uid, st.st_gid) != (old.mode, old.uid, old.gid):
        return True
    if not stat.S_ISDIR(st.st_mode) and (st.st_size, st.st_rdev) != (old.size, old.rdev):
        return True
    if st.st_mtime_ns != old.mtime_ns:
        return True
    if item.source is not None:  # a lower entry shown at another path (below a renamed directory)
        src = image.entry(item.source)
        if src is None or (src.blob, src.target) != (old.blob, old.target):
            return True
    return view.xattrs(item) != dict(old.xattrs or {})


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name
