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

import errno
import stat
from collections.abc import Callable

from .inodes import Node
from .markers import WH_OPAQUE, WH_PREFIX
from .namei import Resolver
from .records import Attrs, Opened
from .super import LISTING_CACHE, LISTING_ENTRIES, DirHandle, Super, _err


def merged_names(resolver: Resolver, node: Node) -> list[bytes]:
    """Candidate names of a union directory, each once, upper first."""
    below = lower_names(resolver, node) if not node.opaque else []
    if node.in_upper and resolver.upper_layer is not None:
        return over(resolver.upper_layer.listdir(node.path), below)
    return below


def lower_names(resolver: Resolver, node: Node) -> list[bytes]:
    """The names ``node``'s lower parts give, each once, the topmost first (lower layers never change)."""
    return _merge([resolver.lower_listing(li, lpath) for li, lpath in node.lowers])


def over(upper: list[bytes], below: list[bytes]) -> list[bytes]:
    """The names of an upper directory's listing, then those of ``below`` it neither has nor whites out."""
    return _merge([upper, below])


def _merge(listings: list[list[bytes]]) -> list[bytes]:
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


class ListingOps(Super):
    """Listing directories (overlayfs' ``readdir.c``): open, read and release a listing."""

    def list_without_open(
        self, request_ino: Callable[[], int], after_reply: Callable[[Callable[[], None]], None]
    ) -> bool:
        """Let the kernel list directories without opening them; True if taken.

        ``request_ino`` gives the inode of the request being served (pyfuse3 does not
        pass it to ``readdir``; :class:`unionfs.fuse.fuseloop.RequestLoop` reads it), and
        ``after_reply`` runs a call once that request is answered, before the next. From
        then on OPENDIR is answered ENOSYS, after which the kernel never sends OPENDIR or
        RELEASEDIR again and keeps every directory's listing (FOPEN_CACHE_DIR), dropping
        it on each change made through the mount. A volume or bind can change behind the
        mount, so after each complete listing of one of theirs the kernel is told to
        forget it (:meth:`_forget_listing`). Only with the listing cache on (``dircache``).
        """
        if not self.opts.dircache:
            return False
        self._request_ino = request_ino
        self._after_reply = after_reply
        return True

    def opendir(self, ino: int) -> Opened:
        """A handle for listing ``ino``; the kernel may keep the listing if the union's realm owns it (``dircache``).

        Only the union's own directories change solely through this mount (each change
        makes the kernel drop its copy); a volume or bind can change behind it.
        """
        if self._request_ino is not None:
            raise _err(errno.ENOSYS)  # see list_without_open
        node = self.node(ino)
        fh = self._fh()
        self.dirs[fh] = DirHandle(node)
        return Opened(fh, cache_dir=self.opts.dircache and not node.realm)

    def _unopened(self) -> DirHandle:
        """The listing state of a directory the kernel did not open: one per directory, kept from offset 0."""
        assert self._request_ino is not None
        node = self.node(self._request_ino())
        h = self._unopened_dirs.get(node.ino)
        if h is None or h.node is not node:
            h = self._unopened_dirs[node.ino] = DirHandle(node)
            if len(self._unopened_dirs) > LISTING_CACHE:
                self._unopened_dirs.popitem(last=False)
        else:
            self._unopened_dirs.move_to_end(node.ino)
        return h

    def _forget_listing(self, ino: int) -> None:
        """After this reply, drop the kernel's copy of the listing of ``ino`` (a volume's or bind's).

        Runs once the reply is written, before the next request is read: the kernel
        filled its copy while parsing the earlier replies, so the pages it drops are the
        complete listing, and the next listing asks again.
        """

        def forget() -> None:
            try:
                self.invalidate(ino)
            except OSError:
                pass  # unmounted meanwhile, or the inode is gone: nothing kept

        self._after_reply(forget)

    def readdir(self, fh: int, start: int, emit: Callable[[bytes, Attrs, int], bool]) -> None:
        """List the directory of handle ``fh`` (0: the request's, see :meth:`list_without_open`) from offset ``start``.

        Each entry goes to ``emit(name, attrs, next offset)``, which returns False when the
        reply is full (that entry not taken). An entry taken counts as a lookup (READDIRPLUS).
        """
        h = self.dirs[fh] if fh else self._unopened()
        if start == 0 or h.names is None:
            self._take_listing(h)  # rewinddir sees changes
        if self._send_entries(h, start, emit) == 0 and not fh:  # the empty reply that ends a listing
            if self._unopened_dirs.get(h.node.ino) is h:
                del self._unopened_dirs[h.node.ino]  # nothing to continue (memory: the listing cache is bounded)
            if h.node.realm:
                self._forget_listing(h.node.ino)

    def _send_entries(self, h: DirHandle, start: int, emit: Callable[[bytes, Attrs, int], bool]) -> int:
        """Reply with the entries from ``start`` on; returns how many, or -1 if the reply is full."""
        names = h.names
        assert names is not None
        sent = 0
        for i in range(start, len(names)):
            name = names[i]
            if i < 2:
                target = h.node if i == 0 else (h.node.links[0][0] if h.node.links else h.node)
                if not emit(name, self._dot_attrs(target.ino), i + 1):
                    return -1
                sent += 1
                continue
            graft = self._graft_root(h.node, name)
            if graft is not None:
                node, found, known, keep = graft, None, None, False
            else:
                keep = h.found is not None and (h.upper is None or name not in h.upper)  # (a lower part's name)
                cached = h.found.get(name) if keep else None  # type: ignore[union-attr]
                resolver = self.realms[h.node.realm].resolver
                found, known = cached if cached is not None else (resolver.lookup(h.node, name), None)
                if found is None:
                    if keep:
                        h.found[name] = (None, None)  # type: ignore[index]
                    continue
                node = self._found_node(found, h.node, name)
            try:
                a = known if known is not None and not node.in_upper else self.attrs(node, found)
                if keep and known is None:
                    if not node.in_upper and found is not None:
                        found.lower_st = None  # its attributes are kept as ``a``: the stat is not needed again
                    h.found[name] = (found, None if node.in_upper else a)  # type: ignore[index]
            except FileNotFoundError:
                self.table.maybe_drop(node)
                continue
            if not emit(name, a, i + 1):
                self.table.maybe_drop(node)
                return -1
            self._handed(node)
            sent += 1
        return sent

    def _take_listing(self, h: DirHandle) -> None:
        """The names of an open directory, and the resolutions of those its lower parts give.

        Lower layers do not change, so the names a directory's lower parts give, and what
        each resolves to, are taken once and kept (bounded LRU, keyed by the node and its
        lower parts) for every later listing of it. Only an upper part changes (through
        this mount): it is listed again each time, and its names are resolved afresh.
        """
        node = h.node
        if node.realm:
            h.names, h.found = (
                [b".", b".."] + self._with_grafts(node, merged_names(self.realms[node.realm].resolver, node)),
                None,
            )
            return
        resolver = self.realms[0].resolver
        key = (node.opaque, tuple(node.lowers))
        hit = self._listings.get(node.ino)
        if hit is not None and hit[0] is node and hit[1] == key:
            self._listings.move_to_end(node.ino)
            below, found = hit[2], hit[3]
        else:
            below = lower_names(resolver, node) if not node.opaque else []
            found = {n: (f, None) for n, f in resolver.lookup_listing(node, below, below=node.in_upper)}
            old = self._listings.pop(node.ino, None)
            if old is not None:
                self._listed -= len(old[3])
            self._listings[node.ino] = (node, key, below, found)
            self._listed += len(found)
            while self._listings and (len(self._listings) > LISTING_CACHE or self._listed > LISTING_ENTRIES):
                self._listed -= len(self._listings.popitem(last=False)[1][3])
        names = below
        h.upper = None
        if node.in_upper and resolver.upper_layer is not None:
            listing = resolver.upper_layer.listdir(node.path)
            names = over(listing, below)
            h.upper = set(listing)
        h.names = [b".", b".."] + self._with_grafts(node, names)
        h.found = found

    def _with_grafts(self, node: Node, names: list[bytes]) -> list[bytes]:
        """``names`` and the graft points in ``node`` that its layers lack."""
        if self.graft_at:
            have = set(names)
            names = names + [n for (ino, n) in self.graft_at if ino == node.ino and n not in have]
        return names

    def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    def _dot_attrs(self, ino: int) -> Attrs:
        """Attributes for a ``.`` or ``..`` entry: the kernel takes only the number and type from them."""
        e = self.new_attrs()
        e.st_ino = ino
        e.st_mode = stat.S_IFDIR
        return e
