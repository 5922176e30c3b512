"""Wiring: build the union, mount it, serve it, tear it down.

:func:`mount` returns only once the mount is live (or has failed): in the
background mode the parent waits on a pipe for the daemon's word, so a caller
can use the mount point the moment the command exits. SIGTERM, SIGINT and an
external ``umount`` all end the daemon with a clean unmount and exit status 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING

import trio

from layerstore import volumes as vols
from layerstore.host import real_root
from unionfs.fuse import device
from unionfs.fuse.handlers import Handlers
from unionfs.fuse.session import PUMP_MISSING, Session

if TYPE_CHECKING:
    from unionfs.fuse.operations import Pyfuse3Mount
from unionfs.union import stats
from unionfs.union.fs import TIMEOUT, Options, UnionFS
from unionfs.union.space import dirty_limit

from .config import MountConfig, UsageError
from .grafts import plugin_unmount, remove_tmpfs
from .views import isolate

log = logging.getLogger("unionmount")


def fuse_options(cfg: MountConfig) -> set[str]:
    """The options for the FUSE mount.

    As root the mount honours setuid bits and device files, as kernel overlayfs does,
    unless ``nosuid``/``nodev`` are asked for (libfuse's own default is both off, which
    breaks ``su``, ``sudo``, ``ping`` and ``passwd`` in containers). A plain user's FUSE
    mount is always ``nosuid,nodev`` (fusermount3 enforces it), so ``suid``/``dev`` are
    dropped there.
    """
    opts = set(cfg.fuse_options)
    root = real_root()  # (root of a user namespace mounts nodev whatever it asks)
    for want, off in (("suid", "nosuid"), ("dev", "nodev")):
        if not root or off in opts:
            opts.discard(want)
        else:
            opts.add(want)
    if not any(o.startswith("fsname=") for o in opts):
        opts.add("fsname=unionmount")
    if not any(o.startswith("subtype=") for o in opts):
        opts.add("subtype=unionmount")
    opts.add("default_permissions")
    if os.geteuid() == 0:
        opts.add("allow_other")
    if cfg.upper is None:
        opts.add("ro")
    if cfg.debug:
        opts.add("debug")
    return opts


def writeback_wanted(cfg: MountConfig) -> bool:
    """Whether the kernel may cache writes (FUSE's writeback cache; fuse-overlayfs' default).

    It turns a stream of small writes into a few large ones, but the kernel then
    keeps sizes and times of files it has cached as its own. That is right for the
    union: lower layers never change and the upper layer is the daemon's alone while
    mounted. A volume or host directory can be written by others at the same time
    (the host, another container), so a mount that grafts one keeps the cache off
    unless ``-o writeback=1`` asks for it; a tmpfs graft is private and does not count.
    """
    if cfg.writeback is not None:
        return cfg.writeback
    return cfg.upper is not None and not cfg.read_only and all(g.kind == "tmpfs" for g in cfg.grafts)


def passthrough_possible() -> str | None:
    """Why the kernel cannot pass file I/O through for this daemon, or None if it may.

    ``FUSE_DEV_IOC_BACKING_OPEN`` needs CAP_SYS_ADMIN in the first user namespace, and a
    kernel of 6.9 or later (whether it was built with ``CONFIG_FUSE_PASSTHROUGH`` shows
    only in the INIT exchange: without it the daemon says so and serves file I/O itself).
    """
    if not real_root():
        return "passthrough needs root (CAP_SYS_ADMIN)"
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (6, 9):
        return f"passthrough needs Linux 6.9 or later (this is {os.uname().release})"
    return None


def passthrough_wanted(cfg: MountConfig) -> bool:
    """Whether the mount asks the kernel for passthrough (``-o passthrough=0|1``; default: where possible).

    The kernel offers passthrough or the writeback cache, not both: ``-o writeback=1`` asks
    for the cache instead. Asked for explicitly where it cannot be, the mount fails with one line.
    """
    if cfg.passthrough is False:
        return False
    why = passthrough_possible()
    if not cfg.fastloop:
        why = "passthrough needs our own FUSE session (not fastloop=0)"
    elif cfg.writeback:
        why = "passthrough and writeback=1 exclude each other (the kernel offers one or the other)"
    if why is not None and cfg.passthrough:
        raise UsageError(why)
    return why is None


def pump_wanted(cfg: MountConfig) -> bool:
    """Whether our session reads the device with its compiled hot path (``-o pump=0|1``; default: where built).

    Asked for explicitly where it cannot be, the mount fails with one line; not built, the
    daemon says so at WARNING and reads its requests in Python.
    """
    if cfg.pump is False:
        return False
    if not cfg.fastloop:
        if cfg.pump:
            raise UsageError("pump=1 needs our own FUSE session (not fastloop=0)")
        return False
    if PUMP_MISSING:
        why = f"the compiled request pump is not built (reinstall with gcc and Python's headers): {PUMP_MISSING}"
        if cfg.pump:
            raise UsageError(why)
        log.warning("%s; requests are read by Python (slower)", why)
        return False
    return True


class _Served:
    """What serves the mount once it is up: our own session, or pyfuse3's (``-o fastloop=0``)."""

    session: Session | None = None
    handlers: Handlers | None = None
    fd = -1
    fallback: Pyfuse3Mount | None = None
    pump = False  # our session reads the device with its compiled hot path


_served = _Served()


async def _serve(fs: UnionFS, cfg: MountConfig) -> None:
    session = _served.session
    stats.SETTINGS["fastloop"] = lambda: session is not None
    settler = fs.copy.settler if fs.copy is not None else None
    stats.SETTINGS["settle"] = lambda: f"{settler.delay * 1000:g}ms" if settler is not None else False
    if session is not None:
        if not cfg.spin:
            session.spin_ns = 0
        stats.SETTINGS["spin"] = lambda: session.spin_ns > 0
        if _served.pump:
            session.use_pump(fs.table.by_ino)
            stats.SOURCES.append(session.pump_counts)
        stats.SETTINGS["pump"] = lambda: session.pump is not None
        unopened = fs.list_without_open(lambda: session.nodeid, session.after_reply.append)
        fs.keep_symlinks()  # (our INIT asks the kernel to keep them)
        stats.SETTINGS["opendir"] = lambda: not unopened
        assert _served.handlers is not None
        if cfg.killpriv:
            fs.take_privilege_kills(_served.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, nursery.cancel_scope)
        if session is not None:
            await session.run()
        else:
            assert _served.fallback is not None
            await _served.fallback.run()
        nursery.cancel_scope.cancel()


async def _on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            if _served.session is not None:
                _served.session.terminate()
            elif _served.fallback is not None:
                _served.fallback.terminate()
            return


def _setup_logging(cfg: MountConfig) -> None:
    handler: logging.Handler
    if cfg.log_file:
        handler = logging.FileHandler(cfg.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s unionmount[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of a lazy image's fetches


def _start(cfg: MountConfig) -> tuple[UnionFS, ExitStack]:
    """Open the layers, make the graft points, and mount; on return the mount is live."""
    os.umask(0)  # the kernel has applied the caller's umask to every mode it sends us
    passthrough = passthrough_wanted(cfg)  # (raises UsageError before anything is made)
    _served.pump = pump_wanted(cfg)
    stack = ExitStack()
    timeout = TIMEOUT if cfg.timeout is None else cfg.timeout
    for d in cfg.cleanup:
        stack.callback(remove_tmpfs, d)
    for root, name, lease in cfg.volume_mounts:  # the last user of a volume's file system unmounts it
        stack.callback(_release_volume, cfg, root, name, lease)
    for driver, name, ident, lease in cfg.plugin_mounts:  # a plugin is told when this use of its volume ends
        stack.callback(_end_plugin_use, cfg, driver, name, ident, lease)
    try:
        stack.callback(isolate(cfg).close)  # layers that contain the mount point: private views (unionfs.daemon.views)
    except UsageError:
        stack.close()
        raise
    try:
        fs = UnionFS(
            Options(
                tuple(cfg.lowers),
                cfg.upper if not cfg.read_only else None,
                cfg.work if not cfg.read_only else None,
                cfg.volatile,
                cfg.image,
                tuple(cfg.grafts),
                cfg.uidmap,
                cfg.gidmap,
                writeback_wanted(cfg) and not passthrough,  # the kernel offers one or the other
                timeout,
                timeout > 0 if cfg.dircache is None else cfg.dircache,
                cfg.settle_ms / 1000,
                cfg.prefetch,
                cfg.registry,
            )
        )
    except OSError as e:
        stack.close()
        raise UsageError(f"cannot open layers: {e.strerror}: {os.fsdecode(e.filename or b'')}") from None
    stack.callback(fs.close)
    try:
        trio.run(fs.prepare)
    except OSError as e:
        stack.close()
        raise UsageError(f"cannot graft on {os.fsdecode(e.filename or b'')}: {e.strerror}") from None
    where = os.path.realpath(cfg.mountpoint)  # before the mount: a stat of it would wait for us
    if not cfg.fastloop:
        _mount_pyfuse3(fs, cfg, where, stack)
        return fs, stack
    try:
        fd = device.mount(cfg.mountpoint, fuse_options(cfg))
    except (device.MountError, OSError) as e:
        stack.close()
        raise UsageError(f"cannot mount on '{cfg.mountpoint}': {e}") from None
    handlers = Handlers(fs, passthrough=passthrough, killpriv=cfg.killpriv, on_init=lambda: _after_init(where, fs))
    session = Session(fd, handlers.table(), handlers.on_error)
    handlers.session = session
    fs.invalidate = session.invalidate_inode
    _served.session, _served.handlers, _served.fd = session, handlers, fd
    return fs, stack


def _mount_pyfuse3(fs: UnionFS, cfg: MountConfig, where: str, stack: ExitStack) -> None:
    """Mount through pyfuse3's public API and serve with ``pyfuse3.main()`` (``-o fastloop=0``)."""
    from unionfs.fuse.operations import Pyfuse3Mount

    try:
        _served.fallback = Pyfuse3Mount(fs, cfg.mountpoint, fuse_options(cfg), lambda: _after_init(where, fs))
    except RuntimeError as e:
        stack.close()
        raise UsageError(f"cannot mount on '{cfg.mountpoint}': {e}") from None


def _drop_lease(cfg: MountConfig, lease: int) -> None:
    if lease in cfg.hold_fds:
        cfg.hold_fds.remove(lease)
        os.close(lease)


def _release_volume(cfg: MountConfig, root: str, name: str, lease: int) -> None:
    """End this mount's use of a mounted volume: its lease first, then the unmount if it was the last user."""
    _drop_lease(cfg, lease)
    try:
        vols.release(root, name)
    except OSError as e:
        log.warning("volume %s: cannot unmount its file system: %s", name, e)


def _end_plugin_use(cfg: MountConfig, driver: str, name: str, ident: str, lease: int) -> None:
    """``Unmount`` with this mount's ID, then the lease goes (a daemon that dies instead: the next command's sweep)."""
    try:
        plugin_unmount(driver, name, ident)
    except UsageError as e:
        log.warning("volume %s: %s", name, e)
    _drop_lease(cfg, lease)


def _after_init(where: str, fs: UnionFS) -> None:
    """Runs inside the INIT request: what must wait until the kernel has the reply runs next.

    Under our loop, before any other request is answered (so whoever sees the mount
    answer sees the larger readahead); under pyfuse3's, at its next wait.
    """
    if _served.session is not None:
        _served.session.after_reply.append(lambda: _tune(where, fs))
        return

    async def later() -> None:
        _tune(where, fs)

    trio.lowlevel.spawn_system_task(later)


READAHEAD_KB = 1024


def _tune(where: str, fs: UnionFS) -> None:
    """What depends on the mount's backing device: its readahead, and how much dirty data it may hold."""
    dev = _raise_readahead(where)
    if fs.room is not None:
        fs.room.set_dirty_limit(dirty_limit(dev))


def _raise_readahead(mountpoint: str) -> str | None:
    """Let the kernel read ahead 1 MiB at a time on this mount: one READ request per MiB instead of eight.

    The kernel gives a FUSE mount the default 128 KiB window (and lowers it again when
    the INIT reply arrives) although libfuse takes 1 MiB requests. Best effort: sysfs
    needs root. The mount's device number comes from /proc/self/mountinfo; it is returned.
    """
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]) == mountpoint:
                    dev = fields[2]  # the last one: our mount is the newest on this path
        if dev is not None:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("readahead left as it is: %s", e)
    return dev


def _run(fs: UnionFS, stack: ExitStack, cfg: MountConfig) -> int:
    unmounted = False
    try:
        trio.run(_serve, fs, cfg)
        unmounted = True
    finally:
        if _served.session is not None:
            device.unmount(cfg.mountpoint)  # (a no-op once unmounted from outside)
            os.close(_served.fd)
        elif _served.fallback is not None:
            _served.fallback.close(clean=unmounted)
        stack.close()
    return 0


def mount(cfg: MountConfig) -> int:
    """Mount as configured; returns the exit status of the command."""
    if cfg.foreground:
        _setup_logging(cfg)
        fs, stack = _start(cfg)
        cfg.went_live()
        log.info("mounted %s", cfg.mountpoint)
        return _run(fs, stack, cfg)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read()
        if msg == b"ok":
            cfg.went_live()
            return 0
        _, status = os.waitpid(pid, 0)
        raise UsageError(msg.decode(errors="replace") or "the daemon died while mounting")
    # child: the daemon
    os.close(rfd)
    os.setsid()
    _setup_logging(cfg)
    try:
        fs, stack = _start(cfg)
    except UsageError as e:
        os.write(wfd, str(e).encode())
        os._exit(2)
    except BaseException as e:  # noqa: BLE001 - report any failure to the waiting parent
        os.write(wfd, f"{type(e).__name__}: {e}".encode())
        os._exit(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(null, 2)  # never hold the caller's pipes open; logs go to --log
    os.close(null)
    os.write(wfd, b"ok")
    os.close(wfd)
    try:
        code = _run(fs, stack, cfg)
    except BaseException:  # noqa: BLE001
        log.exception("daemon failed")
        os._exit(1)
    os._exit(code)
