"""Layers that contain the mount point: seen through private clones of their mounts, as overlayfs sees them.

Kernel overlayfs works on its layers' dentries and never crosses a mount inside a
layer. The daemon reaches layers by path from directory fds, and a path walk
crosses every mount point it meets: with the union mounted inside one of its own
layers (``--lower /t/mnt /t/mnt/a``), a lookup of ``a`` in that layer would cross
into the union itself and wait for the daemon, which is waiting for it; both hang
in uninterruptible sleep.

:func:`isolate` gives each layer, upper and work directory and graft source that
contains the mount point a view of its own that no mount shows through: a private,
detached clone of the mount it is on, without the mounts below
(:func:`layerstore.host.private_clone`), reached as ``/proc/self/fd/N/...``. The
upper and work directories share one clone (a copy-up renames from one into the
other). That needs CAP_SYS_ADMIN; where it is refused, a mount point strictly inside
a layer is refused with one line instead of hanging. A layer that *is* the mount
point needs nothing: its fd, opened before the mount, is the directory below it.
"""

from __future__ import annotations

import dataclasses
import os

from layerstore.host import private_clone

from .config import MountConfig, UsageError


def _inside(mnt: str, path: str) -> bool:
    """True if ``mnt`` lies strictly below directory ``path`` (both real paths)."""
    return mnt != path and mnt.startswith(path.rstrip("/") + "/")


class Isolation:
    """The clones made for one mount (their fds stay open for the daemon's life)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def view(self, path: str, what: str) -> str:
        """``path`` seen through a private clone rooted at it."""
        try:
            fd = private_clone(path)
        except OSError as e:
            raise UsageError(
                f"the mount point lies inside {what} '{path}', which needs a private view of it"
                f" (open_tree: {e.strerror}): mount somewhere outside it"
            ) from None
        self.fds.append(fd)
        return f"/proc/self/fd/{fd}"

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def isolate(cfg: MountConfig) -> Isolation:
    """Rewrite ``cfg``'s layer paths that contain its mount point to private views; see the module's text."""
    iso = Isolation()
    mnt = os.path.realpath(cfg.mountpoint)
    real = os.path.realpath
    try:
        cfg.lowers = [iso.view(real(p), "the lower directory") if _inside(mnt, real(p)) else p for p in cfg.lowers]
        if cfg.upper and cfg.work and (_inside(mnt, real(cfg.upper)) or _inside(mnt, real(cfg.work))):
            up, work = real(cfg.upper), real(cfg.work)
            base = os.path.commonpath([up, work])
            root = iso.view(base, "the upper and work directories' parent")
            cfg.upper = os.path.join(root, os.path.relpath(up, base)) if up != base else root
            cfg.work = os.path.join(root, os.path.relpath(work, base)) if work != base else root
        cfg.grafts = [
            dataclasses.replace(g, source=iso.view(g.source, "the graft source")) if _inside(mnt, real(g.source)) else g
            for g in cfg.grafts
        ]
    except BaseException:
        iso.close()
        raise
    return iso
