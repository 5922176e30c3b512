"""The on-disk format of layers: whiteouts, opaque directories, redirects, origins.

Read side — every dialect found in the wild is understood in every layer:

* a character device 0/0 (overlayfs, OCI runtimes);
* a ``.wh.NAME`` file (OCI/AUFS layer tars, rootless fuse-overlayfs);
* ``.wh..wh..opq`` inside a directory (OCI opaque marker);
* the ``opaque`` xattr ``y`` under ``trusted.overlay.``, ``user.overlay.`` and
  ``user.fuseoverlayfs.``;
* an empty regular file carrying the ``overlay.whiteout`` xattr (overlayfs
  "xwhiteouts", Linux 6.7+), in a lower directory marked ``overlay.opaque=x``
  or ``overlay.whiteouts`` as the kernel requires (so other files cost nothing).

Write side — what we put in an upper layer is what kernel overlayfs reads:
character-device whiteouts (a ``.wh.NAME`` file only where ``mknod`` is refused)
and ``overlay.opaque``/``overlay.redirect`` under ``trusted.`` where the kernel
lets us write it, ``user.`` otherwise (overlayfs' ``userxattr`` dialect, e.g.
inside a user namespace). Our own bookkeeping
(``unionmount.origin``, ``unionmount.nlink``, ``unionmount.index``, ``unionmount.unsettled``,
``unionmount.graftpoint`` on a directory made only to graft a volume on) uses the same namespace choice.
Metadata-only copies are overlayfs' own: ``overlay.metacopy`` plus an absolute
``overlay.redirect`` to the data, which a kernel mounted ``metacopy=on`` reads,
and which we follow in every layer, so an upper can become a lower. None of these
names is ever visible through the mount.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Protocol

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"

#: xattr name prefixes that belong to union filesystems, never shown to users.
PRIVATE_XATTR_PREFIXES: tuple[bytes, ...] = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
    b"trusted.unionmount.",
    b"user.unionmount.",
    b"user.containers.override_stat",  # rootless owners and modes (see unionfs.union.override)
)
_OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
_XWHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
_REDIRECT_XATTRS = (b"trusted.overlay.redirect", b"user.overlay.redirect")
_METACOPY_XATTRS = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
_XWHITEOUTS_DIR_XATTRS = (b"trusted.overlay.whiteouts", b"user.overlay.whiteouts")
_GRAFTPOINT_XATTRS = (b"trusted.unionmount.graftpoint", b"user.unionmount.graftpoint")
CAPS_XATTR = b"security.capability"  # file capabilities: the kernel asks for them before every write


def is_private_xattr(name: bytes) -> bool:
    """True for the xattrs that carry union metadata."""
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def is_marker_name(name: bytes) -> bool:
    """True for names that a layer uses as markers; users may not create them."""
    return name.startswith(WH_PREFIX)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """A character device 0/0 is a whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class XattrSource(Protocol):
    """What marker detection needs from a layer: its xattrs, by layer-relative path."""

    def listxattr(self, path: bytes) -> list[bytes]: ...

    def getxattr(self, path: bytes, name: bytes) -> bytes: ...


def _names(layer: XattrSource, path: bytes) -> list[bytes]:
    try:
        return layer.listxattr(path)
    except OSError:
        return []


def _get(layer: XattrSource, path: bytes, name: bytes) -> bytes | None:
    try:
        return layer.getxattr(path, name)
    except OSError:
        return None


def is_xwhiteout(layer: XattrSource, path: bytes, st: os.stat_result) -> bool:
    """An empty regular file with an ``overlay.whiteout`` xattr is a whiteout."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(x in _XWHITEOUT_XATTRS for x in _names(layer, path))


def metacopy_source(layer: XattrSource, path: bytes) -> bytes | None:
    """For a metadata-only copy (``overlay.metacopy``), the layer-relative path of its data.

    None if the file holds its own data; ``b""`` if the data is at the same path
    in a lower layer (no ``overlay.redirect``).
    """
    names = _names(layer, path)
    if not any(n in _METACOPY_XATTRS for n in names):
        return None
    for n in names:
        if n in _REDIRECT_XATTRS:
            value = _get(layer, path, n)
            if value is not None:
                return value.strip(b"/")
    return b""


def is_graftpoint(layer: XattrSource, path: bytes) -> bool:
    """A directory the daemon made in the upper layer only to graft a volume on (not a change of the user's)."""
    return any(n in _GRAFTPOINT_XATTRS for n in _names(layer, path))


@dataclass(slots=True, frozen=True)
class DirMarks:
    """What a directory's own markers say about merging the layers below it."""

    opaque: bool
    redirect: bytes | None  # layer-relative path of the lower directory it continues, if any
    xwhiteouts: bool = False  # it may hold xattr whiteouts (``overlay.opaque=x`` or ``overlay.whiteouts``)


def dir_marks(layer: XattrSource, path: bytes, listing_has_opq: bool) -> DirMarks:
    """Read a directory's opaque, redirect and xwhiteouts markers."""
    opaque = listing_has_opq
    redirect = None
    xwh = False
    for name in _names(layer, path):
        if name in _OPAQUE_XATTRS:
            value = _get(layer, path, name)
            opaque = opaque or value == b"y"
            xwh = xwh or value == b"x"
        elif name in _REDIRECT_XATTRS:
            redirect = _get(layer, path, name)
        elif name in _XWHITEOUTS_DIR_XATTRS:
            xwh = True
    return DirMarks(opaque, redirect, xwh)


@dataclass(slots=True, frozen=True)
class WriteDialect:
    """Names of the xattrs we write in the upper layer (``trusted.`` as root, else ``user.``)."""

    ns: bytes

    @classmethod
    def probe(cls, workdir: str) -> WriteDialect:
        """``trusted.`` if the work dir's filesystem lets us write it, else ``user.``.

        Being uid 0 is not enough: inside a user namespace (rootless podman) the
        kernel refuses ``trusted.*``, and overlayfs' ``userxattr`` dialect applies.
        """
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.setxattr(fd, b"trusted.overlay.unionmount-probe", b"1")
            os.removexattr(fd, b"trusted.overlay.unionmount-probe")
            return cls(b"trusted.")
        except OSError:
            return cls(b"user.")
        finally:
            os.close(fd)

    @property
    def opaque(self) -> bytes:
        return self.ns + b"overlay.opaque"

    @property
    def redirect(self) -> bytes:
        return self.ns + b"overlay.redirect"

    @property
    def origin(self) -> bytes:
        return self.ns + b"unionmount.origin"

    @property
    def metacopy(self) -> bytes:
        """overlayfs' mark of a metadata-only copy; its data is at ``overlay.redirect``."""
        return self.ns + b"overlay.metacopy"

    @property
    def graftpoint(self) -> bytes:
        """Marks a directory made only to graft a volume on (``diff`` and ``commit`` leave it out)."""
        return self.ns + b"unionmount.graftpoint"

    @property
    def nlink(self) -> bytes:
        return self.ns + b"unionmount.nlink"

    @property
    def unsettled(self) -> bytes:
        """On a copy-up whose data may not be on the disk yet (see :mod:`unionfs.union.settle`)."""
        return self.ns + b"unionmount.unsettled"

    @property
    def index(self) -> bytes:
        """On an index entry (so on every alias linked to it): the entry's name in the index."""
        return self.ns + b"unionmount.index"
