"""Volumes and binds for a mount: ``-v``, ``--mount``, ``--volumes-from``, image VOLUMEs, id maps.

:func:`resolve` turns the specs of a :class:`~unionfs.daemon.config.MountConfig` into
its :class:`~unionfs.union.graft.Graft` list, the way Docker does:

* ``-v NAME:/path[:ro][,nocopy]`` names a volume (created when missing);
  ``-v /host/dir:/path[:ro]`` binds a host directory (created when missing, as
  ``docker run -v`` does); ``-v /path`` is an anonymous volume;
* ``--mount type=volume|bind|tmpfs,source=...,target=...[,readonly][,volume-nocopy]
  [,uidmap=IN:OUT:N[/IN:OUT:N...]][,gidmap=...]`` (a bind's source must exist);
* ``--volumes-from CONTAINER[:ro|:rw]``: that container's recorded volumes and
  binds at the same paths, whether it is mounted or not;
* every ``VOLUME`` of the image without a graft gets an anonymous volume, the
  same one each time the container is mounted again (``--image-volumes``:
  ``tmpfs`` or ``ignore`` instead, as podman's option);
* a volume created by this mount is filled once with what the union holds at
  its path (owners, modes, times, xattrs, links), unless ``nocopy``.

Every bad spec is a one-line :class:`~unionfs.daemon.config.UsageError`: relative host
paths, relative or duplicate targets, unknown options, bad id maps. A target inside
another mount's target is grafted onto that mount (its directory is made there).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field

from layerstore import names
from layerstore import volumes as vols
from layerstore.store import Store, StoreError
from unionfs.union.graft import Graft
from unionfs.union.idmap import IdMap, IdMapError
from unionfs.union.markers import WriteDialect
from unionfs.union.view import Item, View

from .config import MountConfig, UsageError

_V_OPTS = {"ro", "rw", "nocopy", "z", "Z", "shared", "slave", "private", "rshared", "rslave", "rprivate", "copy"}


@dataclass(slots=True)
class Spec:
    kind: str  # "volume", "bind", "tmpfs"
    source: str | None  # volume name (None: anonymous), host path, or None for tmpfs
    target: bytes
    read_only: bool = False
    nocopy: bool = False
    uidmap: list[str] = field(default_factory=list)
    gidmap: list[str] = field(default_factory=list)
    make_source: bool = False  # -v creates a missing host directory
    tmpfs_size: int | None = None  # tmpfs-size= in bytes (a real tmpfs is mounted, as root)
    tmpfs_mode: int = 0o1777  # tmpfs-mode= (Docker's default: world-writable, sticky)
    relabel: str | None = None  # "z" (shared) or "Z" (private): SELinux relabelling of the source
    driver: str | None = None  # --mount volume-driver= (None: the volume's own, or local for a new one)
    driver_opts: dict[str, str] = field(default_factory=dict)  # --mount volume-opt=KEY=VALUE


def _target(path: str, spec: str) -> bytes:
    if not path.startswith("/"):
        raise UsageError(f"mount target '{path}' in '{spec}' is not an absolute path")
    norm = posixpath.normpath(path).lstrip("/")
    if not norm or norm == ".":
        raise UsageError(f"cannot graft on '/' ('{spec}')")
    if any(part == ".." for part in norm.split("/")):
        raise UsageError(f"mount target '{path}' in '{spec}' climbs with '..'")
    return os.fsencode(norm)


def parse_volume(spec: str) -> Spec:
    """``-v``/``--volume``: ``[SOURCE:]TARGET[:OPTIONS]``."""
    parts = spec.split(":")
    if len(parts) == 1:
        return Spec("volume", None, _target(parts[0], spec))
    if len(parts) > 3:
        raise UsageError(f"'{spec}' is not SOURCE:TARGET[:OPTIONS]")
    if len(parts) == 2 and not parts[1].startswith("/"):
        if parts[0].startswith("/"):  # /target:opts
            source, target, opts = None, parts[0], parts[1]
        else:
            raise UsageError(f"mount target '{parts[1]}' in '{spec}' is not an absolute path")
    else:
        source, target, opts = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    s = Spec("volume", source, _target(target, spec))
    for o in filter(None, opts.split(",")):
        if o not in _V_OPTS:
            raise UsageError(f"unknown volume option '{o}' in '{spec}' (ro, rw, nocopy)")
        s.read_only = s.read_only or o == "ro"
        s.nocopy = s.nocopy or o == "nocopy"
        s.relabel = o if o in ("z", "Z") else s.relabel
    if source is None:
        return s
    if source.startswith("/"):
        s.kind, s.source, s.make_source = "bind", source, True
    elif "/" in source or source.startswith("."):
        raise UsageError(f"host path '{source}' in '{spec}' is relative: give an absolute path")
    else:
        _volume_name(source, spec)
    return s


def parse_mount(spec: str) -> Spec:
    """``--mount type=...,source=...,target=...,...``."""
    kv: dict[str, str] = {}
    flags = set()
    volume_opts: dict[str, str] = {}
    for item in filter(None, spec.split(",")):
        k, eq, v = item.partition("=")
        if k == "volume-opt":  # volume-opt=KEY=VALUE, repeatable
            ok, oeq, ov = v.partition("=")
            if not oeq or not ok:
                raise UsageError(f"volume-opt '{v}' in '{spec}' is not KEY=VALUE")
            volume_opts[ok] = ov
        elif eq:
            kv[k] = v
        else:
            flags.add(k)
    kind = kv.pop("type", "volume")
    if kind not in ("volume", "bind", "tmpfs"):
        raise UsageError(f"unknown mount type '{kind}' in '{spec}' (volume, bind, tmpfs)")
    source = kv.pop("source", None) or kv.pop("src", None)
    target = kv.pop("target", None) or kv.pop("destination", None) or kv.pop("dst", None)
    if target is None:
        raise UsageError(f"--mount '{spec}' has no target=")
    s = Spec(kind, source, _target(target, spec))
    ro = kv.pop("readonly", None) or kv.pop("ro", None)
    s.read_only = "readonly" in flags or "ro" in flags or (ro is not None and ro.lower() in ("1", "true"))
    flags -= {"readonly", "ro"}
    nocopy = kv.pop("volume-nocopy", None)
    s.nocopy = "volume-nocopy" in flags or (nocopy is not None and nocopy.lower() in ("1", "true"))
    flags -= {"volume-nocopy"}
    if "uidmap" in kv:
        s.uidmap = [kv.pop("uidmap")]
    if "gidmap" in kv:
        s.gidmap = [kv.pop("gidmap")]
    if "tmpfs-size" in kv or "tmpfs-mode" in kv:
        if kind != "tmpfs":
            raise UsageError(f"tmpfs-size and tmpfs-mode are for type=tmpfs ('{spec}')")
        if "tmpfs-size" in kv:
            s.tmpfs_size = _size(kv.pop("tmpfs-size"), spec)
        if "tmpfs-mode" in kv:
            s.tmpfs_mode = _mode(kv.pop("tmpfs-mode"), spec)
    for flag in ("z", "Z"):
        if flag in flags:
            s.relabel = flag
    s.driver = kv.pop("volume-driver", None) or None
    s.driver_opts = volume_opts
    if (s.driver or volume_opts) and kind != "volume":
        raise UsageError(f"volume-driver and volume-opt are for type=volume ('{spec}')")
    for ignored in ("bind-propagation", "consistency", "z", "Z"):
        kv.pop(ignored, None)
        flags.discard(ignored)
    if kv or flags:
        bad = sorted(kv) + sorted(flags)
        raise UsageError(f"unknown --mount option '{bad[0]}' in '{spec}'")
    if kind == "bind":
        if not source:
            raise UsageError(f"--mount type=bind needs source= ('{spec}')")
        if not source.startswith("/"):
            raise UsageError(f"host path '{source}' in '{spec}' is relative: give an absolute path")
    if kind == "tmpfs" and source:
        raise UsageError(f"--mount type=tmpfs takes no source ('{spec}')")
    if kind == "volume" and source:
        _volume_name(source, spec)
    return s


_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)


def _size(text: str, spec: str) -> int:
    """Docker's tmpfs-size: bytes, or a number with k, m, g, t or p (powers of 1024), as its RAMInBytes reads it."""
    m = _SIZE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"tmpfs-size '{text}' in '{spec}' is not a size (bytes, or a number with k, m, g)")
    power = "kmgtp".find(m.group(2).lower()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * 1024**power)


def _mode(text: str, spec: str) -> int:
    """Docker's tmpfs-mode: octal permission bits (and setuid, setgid, sticky)."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise UsageError(f"tmpfs-mode '{text}' in '{spec}' is not an octal mode (0 to 7777)")
    return mode


def _volume_name(name: str, spec: str) -> None:
    try:
        names.volume(name)
    except names.InvalidName as e:
        raise UsageError(f"{e} in '{spec}'") from None


def _check_targets(specs: list[Spec]) -> None:
    """One mount per target; a target inside another one is fine (it is grafted on the outer mount, as Docker does)."""
    seen: set[bytes] = set()
    for s in specs:
        if s.target in seen:
            raise UsageError(f"two mounts on /{os.fsdecode(s.target)}")
        seen.add(s.target)


def _idmap(specs: list[str], what: str) -> IdMap:
    try:
        return IdMap.parse(specs, what)
    except IdMapError as e:
        raise UsageError(str(e)) from None


def resolve(cfg: MountConfig, root: str | None, container: str | None, image_id: bytes | None) -> None:
    """Fill ``cfg.grafts`` (and the mount's id maps) from its specs; creates and fills volumes."""
    cfg.uidmap = _idmap(cfg.uidmap_specs, "uidmap")
    cfg.gidmap = _idmap(cfg.gidmap_specs, "gidmap")
    specs = [parse_volume(v) for v in cfg.volumes] + [parse_mount(m) for m in cfg.mounts]
    if not specs and not cfg.volumes_from and image_id is None:
        return
    from .store import open_store

    need_store = image_id is not None or cfg.volumes_from or any(s.kind == "volume" for s in specs)
    with open_store(root, create=True) if need_store else nullcontext() as store:  # binds alone need no store
        if store is not None:
            vols.sweep(store)  # what dead daemons left mounted
        specs += _volumes_from(_held(store), cfg.volumes_from) if cfg.volumes_from else []
        if image_id is not None and cfg.image_volumes != "ignore":
            specs += _image_volumes(_held(store), image_id, container, {s.target for s in specs}, cfg.image_volumes)
        _check_targets(specs)
        if not specs:
            return
        image = (store, image_id) if store is not None and image_id is not None else None
        dialect = WriteDialect.probe(cfg.work) if cfg.work else WriteDialect(b"trusted.")
        with View(cfg.upper, list(cfg.lowers), image, dialect, cfg.work) as view:
            for s in specs:
                item = view.lookup(s.target)
                if item is not None and not item.is_dir:
                    raise UsageError(f"mount target /{os.fsdecode(s.target)} is not a directory in the image")
            for s in specs:
                g, created = _graft(store, s, cfg, container)
                cfg.grafts.append(g)
                if created and not s.nocopy:
                    item = view.lookup(g.target)
                    if item is not None and item.is_dir:
                        _copy_tree(view, item, g.source)
                    if g.name is not None:
                        vols.mark_populated(_held(store), g.name)
        if container is not None:
            _held(store).set_container_mounts(container, [g.describe() for g in cfg.grafts])


def _held(store: Store | None) -> Store:
    """The store that :func:`resolve` opened: it does whenever volumes, an image or a container are involved."""
    assert store is not None
    return store


def _volumes_from(store: Store, refs: list[str]) -> list[Spec]:
    out = []
    for ref in refs:
        name, _, mode = ref.partition(":")
        if mode not in ("", "ro", "rw"):
            raise UsageError(f"'--volumes-from {ref}': the mode is ro or rw")
        rec = store.container_record(name)
        for m in rec.get("mounts", []):
            if m["Type"] == "tmpfs":
                continue
            ro = mode == "ro" or (mode == "" and not m["RW"])
            target = _target(m["Destination"], ref)
            source = m["Name"] if m["Type"] == "volume" else m["Source"]
            out.append(Spec(m["Type"], source, target, ro, nocopy=True))
    return out


def _image_volumes(store: Store, image_id: bytes, container: str | None, taken: set[bytes], mode: str) -> list[Spec]:
    config = store.config(image_id)["config"].get("config") or {}
    recorded = {}
    if container is not None:
        for m in store.container_record(container).get("mounts", []):
            if m["Type"] == "volume":
                recorded[_target(m["Destination"], "recorded mount")] = m["Name"]
    out = []
    for path in sorted(config.get("Volumes") or {}):
        target = _target(path, f"image VOLUME {path}")
        if target in taken:
            continue
        out.append(Spec("tmpfs", None, target) if mode == "tmpfs" else Spec("volume", recorded.get(target), target))
    return out


def _graft(store: Store | None, s: Spec, cfg: MountConfig, container: str | None) -> tuple[Graft, bool]:
    uidmap, gidmap = _idmap(s.uidmap, "uidmap"), _idmap(s.gidmap, "gidmap")
    if s.kind == "tmpfs":
        d = tempfile.mkdtemp(prefix="unionmount-tmpfs.", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        cfg.cleanup.append(d)
        cfg.undo.append(lambda: remove_tmpfs(d))
        if s.tmpfs_size is not None:
            if os.geteuid() != 0:
                raise UsageError("tmpfs-size needs root (a tmpfs mount of its own); without it /dev/shm is shared")
            opts = f"size={s.tmpfs_size},mode={s.tmpfs_mode:o},nosuid,nodev"
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d], capture_output=True, text=True)
            if r.returncode != 0:
                raise UsageError(f"cannot mount a tmpfs for /{os.fsdecode(s.target)}: {r.stderr.strip()}")
        os.chmod(d, s.tmpfs_mode)
        return Graft(s.target, d, s.read_only, "tmpfs", None, uidmap, gidmap, True), False
    if s.kind == "bind":
        assert s.source is not None
        if s.make_source and not os.path.lexists(s.source):
            os.makedirs(s.source, 0o755)
        if not os.path.isdir(s.source):
            raise UsageError(f"bind source '{s.source}' is not an existing directory")
        _relabel(s.source, s.relabel)
        return Graft(s.target, os.path.realpath(s.source), s.read_only, "bind", None, uidmap, gidmap), False
    assert store is not None
    try:
        vol, created = vols.create(
            store, s.source, s.driver or "local", s.driver_opts, anonymous=s.source is None, exist_ok=True
        )
        if s.driver is not None and vol.driver != s.driver:
            raise StoreError(f"volume '{vol.name}' has driver '{vol.driver}', not '{s.driver}'")
    except StoreError as e:
        raise UsageError(str(e)) from None
    root = store.root
    if created:  # a mount that fails leaves no volume it made (nothing but the image's files is in it yet)
        cfg.undo.append(lambda: _forget_volume(root, vol.name))
    try:  # held by the daemon: `volume rm` and `prune` refuse the volume while it lives
        lease, ident = vols.lease(store, vol.name, os.path.realpath(cfg.mountpoint), container, vol.driver)
        cfg.hold_fds.append(lease)
        if vols.mounts(vol):  # its file system is mounted while any mount uses it, unmounted after the last
            cfg.undo.append(lambda: vols.release(root, vol.name))
            vols.acquire(store, vol)
            cfg.volume_mounts.append((root, vol.name, lease))
        elif vol.driver != "local":  # a plugin mounts it for this use (ID: the lease's), before the graft
            vol.mountpoint = _plugin_mount(vol, ident, cfg, lease)
    except StoreError as e:
        raise UsageError(str(e)) from None
    if not os.path.isdir(vol.mountpoint):
        raise UsageError(f"volume '{vol.name}' points to '{vol.mountpoint}', which is not a directory")
    _relabel(vol.mountpoint, s.relabel)
    fresh = created or (not vol.populated and not os.listdir(vol.mountpoint))
    return Graft(s.target, vol.mountpoint, s.read_only, "volume", vol.name, uidmap, gidmap, s.nocopy), fresh


def _plugin_mount(vol: vols.Volume, ident: str, cfg: MountConfig, lease: int) -> str:
    """Ask the volume's plugin to mount it for this mount; the daemon tells it ``Unmount`` at its end."""
    with vols.plugin(vol.driver) as p:
        path = p.mount(vol.name, ident)
    driver, name = vol.driver, vol.name
    cfg.undo.append(lambda: plugin_unmount(driver, name, ident))
    cfg.plugin_mounts.append((driver, name, ident, lease))
    return path


def plugin_unmount(driver: str, name: str, ident: str) -> None:
    """Tell a plugin this use of its volume has ended (best effort: a plugin that is gone has nothing to undo)."""
    try:
        with vols.plugin(driver) as p:
            p.unmount(name, ident)
    except StoreError as e:
        raise UsageError(str(e)) from None


def selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


def _relabel(source: str, flag: str | None) -> None:
    """``:z``/``:Z``: give the source the label containers may use, as Docker does where SELinux is enabled
    (``container_file_t``; ``:Z`` gets the same shared level, there being no per-container category here).
    Where SELinux is not enabled there is nothing to label: accepted, and nothing happens."""
    if flag is None or not selinux_enabled():
        return
    r = subprocess.run(["chcon", "-R", "-t", "container_file_t", "-l", "s0", source], capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"cannot relabel '{source}' for :{flag}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


def remove_tmpfs(d: str) -> None:
    """Remove a tmpfs graft's directory, unmounting its own tmpfs first (tmpfs-size)."""
    if os.path.ismount(d):
        subprocess.run(["umount", "-l", d], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _forget_volume(root: str, name: str) -> None:
    store = Store(root)
    try:
        vols.remove(store, name, force=True)
    finally:
        store.close()


# -- filling a new volume from the union --------------------------------------------------


def _copy_tree(view: View, top: Item, dest: str) -> None:
    """Copy what the union has below ``top`` into the empty directory ``dest`` (Docker's volume fill)."""
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.listdir(root):
            return  # only an empty volume is filled
        links: dict[int, str] = {}
        dirs: list[tuple[str, Item]] = []
        stack: list[tuple[str, Item]] = [("", top)]
        while stack:
            rel, item = stack.pop()
            for kid in view.children(item):
                name = os.fsdecode(kid.path.rpartition(b"/")[2])
                path = f"{rel}/{name}" if rel else name
                _make(view, kid, root, path, links)
                if kid.is_dir:
                    stack.append((path, kid))
                    dirs.append((path, kid))
        for path, item in reversed(dirs):
            os.utime(path, ns=(item.st.st_atime_ns, item.st.st_mtime_ns), dir_fd=root, follow_symlinks=False)
        _meta(view, top, root, ".")
    finally:
        os.close(root)


def _make(view: View, item: Item, root: int, path: str, links: dict[int, str]) -> None:
    st = item.st
    mode = st.st_mode
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        first = links.get(item.node.ino)
        if first is not None:
            os.link(first, path, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
            return
        links[item.node.ino] = path
    if stat.S_ISDIR(mode):
        os.mkdir(path, 0o700, dir_fd=root)
    elif stat.S_ISREG(mode):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root)
        with os.fdopen(fd, "wb") as out, os.fdopen(view.open(item), "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    elif stat.S_ISLNK(mode):
        os.symlink(view.readlink(item), path, dir_fd=root)
    else:
        os.mknod(path, mode, st.st_rdev, dir_fd=root)
    _meta(view, item, root, path)
    if not stat.S_ISDIR(mode):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=root, follow_symlinks=False)


def _meta(view: View, item: Item, root: int, path: str) -> None:
    st = item.st
    os.chown(path, st.st_uid, st.st_gid, dir_fd=root, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode), dir_fd=root)
    target = f"/proc/self/fd/{root}/{path}" if path != "." else f"/proc/self/fd/{root}"
    for name, value in view.xattrs(item).items():
        try:
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError:
            pass  # e.g. security.* refused on this filesystem: the data still lands
