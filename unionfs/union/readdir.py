"""Merged directory listings.

A listing is the union of the names of the directory's upper part and its
lower parts, top to bottom, minus marker names (``.wh.*``) and minus names a
higher layer whites out (``.wh.NAME`` files hide lower layers only). Names
whose entry is a whiteout of another dialect (a 0/0 device, an xwhiteout) stay
in the raw list and are dropped when the entry is resolved, so this module
makes no per-name syscall.

The listing of one open directory is taken at every read from offset 0 (the
first read, and again after ``rewinddir``); cookies are positions in it, so
``telldir``/``seekdir`` stay valid for that handle whatever happens to the
directory meanwhile (as for overlayfs' merged-dir cache).
"""

from __future__ import annotations

from .inodes import Node
from .markers import WH_OPAQUE, WH_PREFIX
from .namei import Resolver


def merged_names(resolver: Resolver, node: Node) -> list[bytes]:
    """Candidate names of a union directory, each once, upper first."""
    listings = []
    if node.in_upper and resolver.upper_layer is not None:
        listings.append(resolver.upper_layer.listdir(node.path))
    if not node.opaque:
        listings.extend(resolver.lower_listing(li, lpath) for li, lpath in node.lowers)
    seen: set[bytes] = set()
    hidden: set[bytes] = set()
    out: list[bytes] = []
    for listing in listings:
        whiteouts = set()
        for name in listing:
            if name.startswith(WH_PREFIX):
                if name != WH_OPAQUE:
                    whiteouts.add(name[len(WH_PREFIX) :])
                continue
            if name in seen or name in hidden:
                continue
            seen.add(name)
            out.append(name)
        hidden |= whiteouts
    return out
