"""The ``unionmount`` command: argument parsing and dispatch only (the bodies are in this package's other modules).

Three ways in, one configuration out:

* ``unionmount mount --lower L1:L2 [--upper U --work W] [-f] MNT``
* the fuse-overlayfs command line: ``unionmount [-f] -o lowerdir=...,upperdir=...,workdir=... MNT``
* the mount helper form that ``mount -t fuse.unionmount SRC MNT -o OPTS`` runs:
  ``unionmount SRC MNT -o OPTS``

Every error ends as one line on stderr and a non-zero exit status.

Imports are kept to what parsing needs: a command's body, and the daemon's wiring for
``mount``, are imported when that command runs (``umount`` and ``stats`` load neither the
store nor trio nor pyfuse3).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from unionfs.daemon.config import MountConfig, UsageError, parse_o, validate

EPILOG = """\
examples:
  unionmount mount --lower /img/top:/img/base --upper /c/upper --work /c/work /mnt/root
  unionmount mount --lower /img/base /mnt/ro            # read-only union
  unionmount -o lowerdir=/a:/b,upperdir=/u,workdir=/w /mnt/root   # fuse-overlayfs syntax
  mount -t fuse.unionmount unionmount /mnt/root -o lowerdir=/a,upperdir=/u,workdir=/w
  unionmount umount /mnt/root
  unionmount image import oci:/images/debian:12 --tag debian:12
  unionmount image pull registry.example:5000/team/app:1
  unionmount image import rootfs.tar.gz base:1 --change 'CMD ["/bin/sh"]'   # docker import
  unionmount mount --image debian:12 --name web1 /mnt/web1   # container layer kept in the store
"""


COMMANDS = ("mount", "umount", "stats", "server", "image", "container", "volume", "diff", "commit", "export", "store")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


ROOT_HELP = "the store (default $UNIONMOUNT_ROOT or /var/lib/unionmount)"


def _shared(*, root: bool = False, fmt: bool = False, leaf: bool = False) -> list[argparse.ArgumentParser]:
    """The options many commands share, defined here once: ``--root`` and ``--format``.

    A group (``image``, ``container``, ...) takes ``--root`` before its action and every
    action after it (``leaf``: there it overrides the group's only when given).
    """
    parents: list[argparse.ArgumentParser] = []
    if root:
        p = _Parser(add_help=False)
        p.add_argument("--root", metavar="DIR", help=ROOT_HELP, default=argparse.SUPPRESS if leaf else None)
        parents.append(p)
    if fmt:
        p = _Parser(add_help=False)
        p.add_argument("--format", choices=("table", "json"), default="table")
        parents.append(p)
    return parents


def _call(module: str, func: str, *names: str, registry: bool = False) -> Callable[[argparse.Namespace], int]:
    """A command: ``unionfs.cli.MODULE.FUNC`` called with the parsed arguments ``names`` (and with ``registry``,
    the registry options as keywords), imported when it runs: a command loads only what it needs."""

    def run(ns: argparse.Namespace) -> int:
        body = getattr(importlib.import_module(f"unionfs.cli.{module}"), func)
        return int(body(*(getattr(ns, n) for n in names), **(_registry(ns) if registry else {})))

    return run


def _group(sub: Any, name: str, help: str) -> Any:
    g = sub.add_parser(name, help=help, parents=_shared(root=True))
    return g.add_subparsers(dest=f"{name}_cmd", metavar="ACTION", required=True)


def _action(group: Any, name: str, help: str, run: Callable[[argparse.Namespace], int], *, fmt: bool = False) -> Any:
    a = group.add_parser(name, help=help, parents=_shared(root=True, fmt=fmt, leaf=True))
    a.set_defaults(run=run)
    return a


def _command(sub: Any, name: str, help: str, run: Callable[[argparse.Namespace], int], **shared: bool) -> Any:
    c = sub.add_parser(name, help=help, parents=_shared(**shared))
    c.set_defaults(run=run)
    return c


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The whole command line (built once: about 20 ms, mostly argparse's gettext lookups;
    ``unionmount server`` builds it before it forks)."""
    p = _Parser(
        prog="unionmount",
        description="A userspace union filesystem for containers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    _mount_parser(sub)
    u = _command(
        sub, "umount", "unmount a union (the daemon exits 0)", _call("mounts", "umount", "mountpoint", "timeout")
    )
    u.add_argument("mountpoint", metavar="MNT")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
    sx = _command(
        sub, "stats", "a mounted daemon's requests per operation, mean cost, CPU and RSS",
        _call("mounts", "stats", "mountpoint", "format"), fmt=True,
    )  # fmt: skip
    sx.add_argument("mountpoint", metavar="MNT")
    sv = _command(
        sub, "server", "keep a process with everything imported: later commands of this user start in a fork of it",
        _call("server", "serve", "socket"),
    )  # fmt: skip
    sv.add_argument("--socket", help="where to listen (default: /run/unionmount/server.sock as root)")

    im = _group(sub, "image", "import, list, inspect and remove images")
    imp = _action(
        im, "import",
        "import oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:REF], docker://REFERENCE, "
        "or a flat root filesystem tarball FILE|- (docker import)",
        _image_import,
    )  # fmt: skip
    imp.add_argument("source", metavar="SOURCE")
    imp.add_argument("name", metavar="NAME[:TAG]", nargs="?", help="for a tarball: the image's name (as --tag)")
    imp.add_argument(
        "-c", "--change", action="append", default=[], metavar="INSTRUCTION",
        help="for a tarball: a Dockerfile instruction for the config (CMD, ENTRYPOINT, ENV, VOLUME, ...)",
    )  # fmt: skip
    imp.add_argument("-m", "--message", help="for a tarball: the history comment")
    _source_options(imp)
    pl = _action(im, "pull", "import [HOST[:PORT]/]NAME[:TAG|@DIGEST] from a registry, as docker pull", _image_import)
    pl.add_argument("source", metavar="REFERENCE")
    pl.add_argument(
        "--lazy",
        action="store_true",
        help="zstd:chunked and eStargz layers: record their files, fetch them when first read "
        "(a pull without it completes it)",
    )
    _source_options(pl)
    _action(im, "ls", "list images", _call("images", "image_ls", "root", "format"), fmt=True)
    ii = _action(im, "inspect", "an image's config as JSON", _call("images", "image_inspect", "root", "name"))
    ii.add_argument("name", metavar="NAME")
    ir = _action(im, "rm", "remove an image name", _call("images", "image_rm", "root", "name"))
    ir.add_argument("name", metavar="NAME")
    sv = _action(
        im, "save",
        "write an image as oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:NAME:TAG], docker://REF",
        _call("images", "image_save", "root", "name", "dest", registry=True),
    )  # fmt: skip
    sv.add_argument("name", metavar="NAME")
    sv.add_argument("dest", metavar="DEST")
    _registry_options(sv)
    ps = _action(
        im, "push", "push an image to a registry, as docker push (DEST default: NAME)",
        _call("images", "image_push", "root", "name", "dest", "compression", registry=True),
    )  # fmt: skip
    ps.add_argument("name", metavar="NAME")
    ps.add_argument("dest", metavar="DEST", nargs="?", help="[HOST[:PORT]/]NAME[:TAG]")
    ps.add_argument(
        "--compression",
        choices=("gzip", "zstd", "zstd:chunked"),
        help="compress the layers so (zstd:chunked: pullable file by file, lazily); a pulled blob is reused only "
        "if it is already so (default: gzip, and every pulled blob reused as it is)",
    )
    _registry_options(ps)
    tg = _action(im, "tag", "give an image another name", _call("images", "image_tag", "root", "name", "new"))
    tg.add_argument("name", metavar="NAME")
    tg.add_argument("new", metavar="NEW:TAG")

    c = _group(sub, "container", "list, inspect and remove containers (writable layers)")
    _action(c, "ls", "list containers", _call("containers", "container_ls", "root", "format"), fmt=True)
    ci = _action(c, "inspect", "a container as JSON", _call("containers", "container_inspect", "root", "name"))
    ci.add_argument("name", metavar="NAME")
    crm = _action(
        c, "rm", "remove containers (-f: unmount first)", _call("containers", "container_rm", "root", "names", "force")
    )
    crm.add_argument("names", metavar="NAME", nargs="+")
    crm.add_argument("-f", "--force", action="store_true")
    _action(c, "prune", "remove every container that is not mounted", _call("containers", "container_prune", "root"))

    v = _group(sub, "volume", "create, list, inspect and remove volumes")
    vc = _action(
        v, "create", "create a volume (local driver; -o type=none -o o=bind -o device=DIR)",
        _call("volumes", "create", "root", "name", "driver", "opt", "label"),
    )  # fmt: skip
    vc.add_argument("name", metavar="NAME", nargs="?")
    vc.add_argument("--driver", "-d", default="local")
    vc.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE")
    vc.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    vl = _action(v, "ls", "list volumes", _call("volumes", "ls", "root", "format", "quiet"), fmt=True)
    vl.add_argument("-q", "--quiet", action="store_true")
    vi = _action(v, "inspect", "volumes as JSON", _call("volumes", "inspect", "root", "names"))
    vi.add_argument("names", metavar="NAME", nargs="+")
    vr = _action(
        v, "rm", "remove volumes (refused while a container uses one, unless -f)",
        _call("volumes", "rm", "root", "names", "force"),
    )  # fmt: skip
    vr.add_argument("names", metavar="NAME", nargs="+")
    vr.add_argument("-f", "--force", action="store_true")
    vp = _action(
        v, "prune", "remove unused anonymous volumes (-a: all unused)", _call("volumes", "prune", "root", "all")
    )
    vp.add_argument("-a", "--all", action="store_true")

    d = _command(
        sub, "diff", "what a container changed: A (added), C (changed), D (deleted) paths",
        _call("containers", "diff", "root", "name"), root=True,
    )  # fmt: skip
    d.add_argument("name", metavar="CONTAINER")
    cm = _command(
        sub, "commit", "a container's changes as a new image layer",
        _call("containers", "commit", "root", "name", "tag", "message", "author"), root=True,
    )  # fmt: skip
    cm.add_argument("name", metavar="CONTAINER")
    cm.add_argument("--tag", "-t", required=True, metavar="NAME:TAG")
    cm.add_argument("--message", "-m", metavar="MSG")
    cm.add_argument("--author", "-a", metavar="AUTHOR")
    ex = _command(
        sub, "export", "a container's merged tree as one tar ('-' for stdout)",
        _call("containers", "export", "root", "name", "file"), root=True,
    )  # fmt: skip
    ex.add_argument("name", metavar="CONTAINER")
    ex.add_argument("file", metavar="FILE.tar")
    st = _command(
        sub, "store", "store usage, garbage collection, consistency check",
        lambda ns: _call("images", f"store_{ns.action}", "root")(ns), root=True,
    )  # fmt: skip
    st.add_argument("action", choices=("df", "gc", "check"))
    return p


def _mount_parser(sub: Any) -> None:
    m = sub.add_parser(
        "mount",
        help="mount a union of directories",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=_shared(root=True),
    )
    m.set_defaults(run=_mount_command)
    layers = m.add_argument_group("layers")
    layers.add_argument(
        "--lower", required=False, default="", help="lower directories, leftmost on top (as overlayfs lowerdir=)"
    )
    layers.add_argument("--upper", help="writable upper directory (without it the mount is read-only)")
    layers.add_argument("--work", help="work directory on the same filesystem as --upper")
    layers.add_argument("--image", metavar="NAME[:TAG]", help="mount an imported image (with a container layer)")
    layers.add_argument("--name", metavar="CONTAINER", help="the container layer to use (new name: a new layer)")
    pg = m.add_argument_group("pulling the image (as docker run)")
    pg.add_argument(
        "--pull",
        choices=("missing", "always", "never", "lazy"),
        default="missing",
        help="pull --image from its registry when the store lacks it (default), every time, never, or when the "
        "store lacks it lazily (zstd:chunked and eStargz files are fetched as they are read, the rest in the "
        "background)",
    )
    pg.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        help="of an image pulled lazily, fetch only what is read (no background fetch of the rest)",
    )
    _registry_options(pg)
    vg = m.add_argument_group("volumes and id maps")
    vg.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="[SRC:]/PATH[:ro][,nocopy]",
        help="a named volume (created when missing), a host directory, or an anonymous volume",
    )
    vg.add_argument(
        "--mount",
        action="append",
        default=[],
        dest="mounts",
        metavar="type=...,target=...",
        help="type=volume|bind|tmpfs,source=...,target=...[,readonly][,uidmap=...][,gidmap=...]",
    )
    vg.add_argument(
        "--volumes-from",
        action="append",
        default=[],
        metavar="CONTAINER[:ro]",
        help="the volumes and binds of another container, at the same paths",
    )
    vg.add_argument(
        "--uidmap",
        action="append",
        default=[],
        metavar="IN:OUT:N",
        help="uid map of the whole mount (repeatable): IN seen through the mount, OUT on disk",
    )
    vg.add_argument("--gidmap", action="append", default=[], metavar="IN:OUT:N", help="gid map, as --uidmap")
    vg.add_argument(
        "--image-volumes",
        choices=("bind", "tmpfs", "ignore"),
        default="bind",
        help="the image's VOLUMEs: anonymous volumes (bind, the default), tmpfs, or none (podman's option)",
    )
    run = m.add_argument_group("daemon")
    run.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    run.add_argument("-d", "--debug", action="store_true", help="debug logging (implies nothing else)")
    run.add_argument("--log", metavar="FILE", help="log file for the background daemon")
    run.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="overlay/FUSE mount options, comma separated",
    )
    m.add_argument("mountpoint", metavar="MNT")


def _legacy(argv: list[str]) -> MountConfig:
    """fuse-overlayfs / mount-helper syntax: [-f] [-d] -o OPTS [SRC] MNT."""
    opts: list[str] = []
    pos: list[str] = []
    fg = debug = False
    it = iter(argv)
    for a in it:
        if a in ("-f", "--foreground"):
            fg = True
        elif a in ("-d", "--debug"):
            debug = fg = True
        elif a == "-o":
            try:
                opts.append(next(it))
            except StopIteration:
                raise UsageError("-o needs an argument") from None
        elif a.startswith("-o"):
            opts.append(a[2:])
        elif a in ("-s", "-n", "-v"):  # mount(8) helper flags: single-threaded, no mtab, verbose
            continue
        elif a.startswith("-"):
            raise UsageError(f"unknown option '{a}' (see 'unionmount --help')")
        else:
            pos.append(a)
    if len(pos) not in (1, 2):
        raise UsageError("expected a mount point (see 'unionmount --help')")
    cfg = MountConfig(mountpoint=pos[-1], lowers=[], foreground=fg, debug=debug)
    parse_o(opts, cfg)
    if len(pos) == 2 and not any(o.startswith("fsname=") for o in cfg.fuse_options):
        cfg.fuse_options.add(f"fsname={pos[0]}")  # mount(8)'s source column
    return cfg


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", metavar="NAME:TAG", help="the name to give the image (default: the source's)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="the image to take from a multi-platform index")
    _registry_options(p)


def _registry_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--creds", metavar="USER[:PASS]", help="registry login (default: podman's and docker's auth files)")
    p.add_argument(
        "--tls-verify",
        type=_boolean,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="false: allow plain HTTP and unverified TLS (loopback registries may use HTTP anyway)",
    )
    p.add_argument(
        "--cert-dir", metavar="DIR", help="the registry's CA as *.crt (default /etc/containers/certs.d/HOST)"
    )


def _registry(ns: argparse.Namespace) -> dict[str, Any]:
    return {"creds": ns.creds, "tls_verify": ns.tls_verify, "cert_dir": ns.cert_dir}


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not true or false")


def _image_import(ns: argparse.Namespace) -> int:
    """``image import`` and ``image pull``: a registry, a layout or archive, or a root filesystem tarball."""
    from . import images

    if ns.image_cmd == "import" and _is_tarball(ns.source):
        return images.image_import_rootfs(
            ns.root, ns.source, ns.tag if ns.tag is not None else ns.name, ns.change, ns.message, platform=ns.platform
        )
    if ns.image_cmd == "import" and (ns.name or ns.change or ns.message):
        raise UsageError("NAME, --change and --message are for a root filesystem tarball; name an image with --tag")
    source = ns.source
    if ns.image_cmd == "pull" and not source.startswith("docker://"):
        source = "docker://" + source
    lazy = getattr(ns, "lazy", False)
    return images.image_import(ns.root, source, ns.tag, platform=ns.platform, lazy=lazy, **_registry(ns))


def _is_tarball(source: str) -> bool:
    """``-`` or a file named without a transport (``oci:``, ``oci-archive:``, ``docker-archive:``, ``docker://``)."""
    transport = source.partition(":")[0]
    transports = ("oci", "oci-archive", "docker-archive", "docker")
    return source == "-" or (transport not in transports and os.path.isfile(source))


def _mount(cfg: MountConfig, prepare: Callable[[], None]) -> int:
    """Prepare and mount; if the mount never goes live, undo what preparing recorded (``cfg.undo``)."""
    from unionfs.daemon.mount import mount

    try:
        prepare()
        return mount(cfg)
    except BaseException:
        if cfg.undo:
            for fd in cfg.hold_fds:  # our locks first: the undo removes what they guard
                os.close(fd)
            cfg.hold_fds.clear()
            for step in reversed(cfg.undo):
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - the first failure is the one to report
                    print(f"unionmount: warning: could not undo a step of the failed mount: {e}", file=sys.stderr)
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return _main(args)
    except UsageError as e:
        print(f"unionmount: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(args: list[str]) -> int:

    if args and args[0] == "--version":
        from unionfs import __version__

        print(f"unionmount {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if args else 2
    if args[0] in COMMANDS:
        ns = _parser().parse_args(args)
        return int(ns.run(ns))
    return _mount_plain(_legacy(args), None)


def _mount_command(ns: argparse.Namespace) -> int:
    """``unionmount mount``: of an image (with its container layer) or of plain directories."""
    cfg = MountConfig(
        mountpoint=ns.mountpoint,
        lowers=[p for p in ns.lower.split(":") if p],
        upper=ns.upper,
        work=ns.work,
        foreground=ns.foreground or ns.debug,
        debug=ns.debug,
        log_file=ns.log,
    )
    parse_o(ns.options, cfg)
    cfg.volumes, cfg.mounts, cfg.volumes_from = ns.volume, ns.mounts, ns.volumes_from
    cfg.image_volumes = ns.image_volumes
    cfg.prefetch = 0.5 if ns.prefetch else 0.0
    cfg.uidmap_specs += ns.uidmap
    cfg.gidmap_specs += ns.gidmap
    if not ns.image:
        return _mount_plain(cfg, ns.root)
    pull = (ns.pull, _registry(ns))

    def prepare() -> None:
        from unionfs.daemon import grafts

        from . import images

        container = images.prepare_image_mount(cfg, ns.root, ns.image, ns.name, pull)
        validate(cfg)
        assert cfg.image is not None
        grafts.resolve(cfg, ns.root, container, cfg.image[1])

    return _mount(cfg, prepare)


def _mount_plain(cfg: MountConfig, root: str | None) -> int:
    def prepare() -> None:
        from unionfs.daemon import grafts

        validate(cfg)
        grafts.resolve(cfg, root, None, None)

    return _mount(cfg, prepare)


if __name__ == "__main__":
    raise SystemExit(main())
