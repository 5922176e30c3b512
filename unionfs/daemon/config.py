"""Mount configuration: parsing the overlay-style ``-o`` string and checking it.

:func:`validate` raises :class:`UsageError` with a one-line message for every
configuration the kernel's overlayfs would refuse (missing directories, upper
and work on different filesystems, nested or shared layer directories, a
mount point that is not a directory or is already mounted).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from unionfs.union.graft import Graft
from unionfs.union.idmap import IdMap

if TYPE_CHECKING:
    from layerstore.oci import SourceOptions  # (60 ms of imports a command without a registry need not pay)


class UsageError(Exception):
    """Bad input from the user: shown as one line on stderr, exit status 2."""


#: Options containers/storage, fstab and mount(8) pass that need nothing from us.
_IGNORED = {
    "rw",
    "exec",
    "atime",
    "relatime",
    "noatime",
    "nodiratime",
    "strictatime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "defaults",
    "async",
    "sync",
    "dirsync",
    "allow_root",
    "default_permissions",
    "allow_other",
    "noacl",
    "acl",
    "threaded",
    "static_nlink",
    "xattr_permissions",
    "redirect_dir",
    "index",
    "metacopy",
    "xino",
    "userxattr",
    "nfs_export",
    "uuid",
    "clone_fd",
    "debug",
    "max_idle_threads",
    "plugins",
    "squash_to_root",
    "squash_to_uid",
    "squash_to_gid",
    "noxattrs",
    "fast_ino",
    "ino32_t",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
}
#: Options handed on to FUSE (they change what the kernel does).
_FUSE = {"ro", "nodev", "nosuid", "noexec", "dev", "suid", "fsname", "subtype"}
#: fuse-overlayfs' id maps: ``uidmapping=IN:OUT:N[:IN:OUT:N...]`` (what containers/storage passes).
_IDMAP = {"uidmapping", "gidmapping"}


@dataclass(slots=True)
class MountConfig:
    mountpoint: str
    lowers: list[str]
    upper: str | None = None
    work: str | None = None
    foreground: bool = False
    debug: bool = False
    volatile: bool = False
    read_only: bool = False
    fuse_options: set[str] = field(default_factory=set)
    log_file: str | None = None
    image: tuple[str, bytes] | None = None  # (store root, image id)
    prefetch: float = 0.5  # a lazily pulled image: share of the time spent fetching the rest (0: none)
    registry: SourceOptions | None = None  # a lazily pulled image: how its files are fetched (--creds, TLS)
    hold_fds: list[int] = field(default_factory=list)  # kept open for the daemon's life (container lock, leases)
    #: volumes whose file system the local driver mounted for us: (store root, name, lease fd), released at exit
    volume_mounts: list[tuple[str, str, int]] = field(default_factory=list)
    #: volumes a plugin mounted for us: (driver, name, ID, lease fd); Unmount is sent at exit
    plugin_mounts: list[tuple[str, str, str, int]] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)  # -v specs
    mounts: list[str] = field(default_factory=list)  # --mount specs
    volumes_from: list[str] = field(default_factory=list)
    image_volumes: str = "bind"  # the image's VOLUMEs: "bind" (anonymous volumes), "tmpfs" or "ignore"
    uidmap_specs: list[str] = field(default_factory=list)
    gidmap_specs: list[str] = field(default_factory=list)
    grafts: list[Graft] = field(default_factory=list)  # resolved from the specs above
    uidmap: IdMap = IdMap()
    gidmap: IdMap = IdMap()
    cleanup: list[str] = field(default_factory=list)  # directories removed when the daemon exits (tmpfs)
    undo: list[Callable[[], None]] = field(default_factory=list)  # run, newest first, if the mount never goes live
    on_live: list[Callable[[], None]] = field(default_factory=list)  # run once the mount is live

    writeback: bool | None = None  # -o writeback=0|1; None: on unless a volume or host directory is grafted
    timeout: float | None = None  # -o timeout=SECONDS: how long the kernel keeps the union's entries and attributes
    dircache: bool | None = None  # -o dircache=0|1; None: on unless timeout=0
    fastloop: bool = True  # -o fastloop=0|1: our own FUSE session (unionfs.fuse.session) or pyfuse3.main()
    killpriv: bool = True  # -o killpriv=0|1: the daemon drops setuid/setgid on write (needs fastloop)
    spin: bool = True  # -o spin=0|1: our loop polls the device briefly before sleeping (unionfs.fuse.session)
    pump: bool | None = None  # -o pump=0|1: our loop reads the device with its compiled hot path; None: where built
    passthrough: bool | None = None  # -o passthrough=0|1: the kernel does file I/O itself; None: where possible
    settle_ms: float = 5.0  # -o settle=MS: the pause in copy-ups after which they are settled (0: in the open)

    def went_live(self) -> None:
        """The mount is up: nothing is to be undone from here on."""
        self.undo.clear()
        for step in self.on_live:
            step()


def parse_o(opts: list[str], cfg: MountConfig) -> None:
    """Apply ``-o`` strings (comma-separated key[=value]) to ``cfg``."""
    for chunk in opts:
        for item in _split_commas(chunk):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key == "lowerdir":
                cfg.lowers = [p for p in value.split(":") if p]
            elif key == "upperdir":
                cfg.upper = value
            elif key == "workdir":
                cfg.work = value
            elif key in ("volatile",) or (key == "fsync" and value == "0"):
                cfg.volatile = True
            elif key == "fsync":
                cfg.volatile = False
            elif key == "writeback":
                if value not in ("0", "1"):
                    raise UsageError(f"'{item}': writeback takes 0 or 1")
                cfg.writeback = value == "1"
            elif key in ("dircache", "fastloop", "killpriv", "spin", "passthrough", "pump"):
                if value not in ("0", "1"):
                    raise UsageError(f"'{item}': {key} takes 0 or 1")
                setattr(cfg, key, value == "1")
            elif key == "settle":
                try:
                    cfg.settle_ms = float(value)
                except ValueError:
                    cfg.settle_ms = -1.0
                if not 0 <= cfg.settle_ms <= 10_000:
                    raise UsageError(f"'{item}': settle takes milliseconds (0 to 10000)")
            elif key == "timeout":
                try:
                    cfg.timeout = float(value)
                except ValueError:
                    cfg.timeout = -1.0
                if not 0 <= cfg.timeout < 1e9:
                    raise UsageError(f"'{item}': timeout takes seconds (0 or more)")
            elif key in _FUSE:
                if key == "ro":
                    cfg.read_only = True
                cfg.fuse_options.add(item)
            elif key in _IDMAP:
                nums = value.split(":")
                if len(nums) % 3 or not value:
                    raise UsageError(f"'{item}' is not {key}=IN:OUT:N[:IN:OUT:N...]")
                specs = [":".join(nums[i : i + 3]) for i in range(0, len(nums), 3)]
                (cfg.uidmap_specs if key == "uidmapping" else cfg.gidmap_specs).extend(specs)
            elif key in _IGNORED:
                continue
            else:
                raise UsageError(f"unknown mount option '{item}'")


def _split_commas(s: str) -> list[str]:
    r"""Split on commas not escaped with a backslash (``lowerdir=a\,b`` is one path)."""
    out, cur, esc = [], [], False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _real_dir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise UsageError(f"{what} '{path}': {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} '{path}' is not a directory")
    return os.path.realpath(path)


def _inside(a: str, b: str) -> bool:
    """True if ``a`` is ``b`` or below it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split(b" ")[4].decode("unicode_escape", "replace")
            if mp == path:
                return True
    return False


def validate(cfg: MountConfig) -> None:
    """Check a configuration and normalise its paths to absolute ones."""
    if not cfg.lowers and cfg.image is None:
        raise UsageError("no lower directory given (--lower DIR[:DIR...], -o lowerdir=... or --image NAME)")
    if (cfg.upper is None) != (cfg.work is None):
        raise UsageError("an upper directory needs a work directory and vice versa (--upper U --work W)")
    cfg.lowers = [_real_dir(p, "lower directory") for p in cfg.lowers]
    mp = _real_dir(cfg.mountpoint, "mount point")
    if _is_mountpoint(mp):
        raise UsageError(f"mount point '{cfg.mountpoint}' is already mounted")
    cfg.mountpoint = mp
    if cfg.upper is not None and cfg.work is not None:
        up = _real_dir(cfg.upper, "upper directory")
        wk = _real_dir(cfg.work, "work directory")
        if os.stat(up).st_dev != os.stat(wk).st_dev:
            raise UsageError(f"upper '{cfg.upper}' and work '{cfg.work}' are on different filesystems")
        if _inside(wk, up) or _inside(up, wk):
            raise UsageError(
                f"work directory '{cfg.work}' and upper directory '{cfg.upper}' must not contain each other"
            )
        for low in cfg.lowers:
            if _inside(low, up) or _inside(up, low):
                raise UsageError(f"lower directory '{low}' overlaps the upper directory '{cfg.upper}'")
            if _inside(low, wk) or _inside(wk, low):
                raise UsageError(f"lower directory '{low}' overlaps the work directory '{cfg.work}'")
        if not os.access(up, os.W_OK) or not os.access(wk, os.W_OK):
            raise UsageError("upper and work directories must be writable")
        cfg.upper, cfg.work = up, wk
