"""The same operations through our mount and through kernel overlayfs.

Every scenario runs on the same lower directories twice: once under
``mount -t overlay -o ...,redirect_dir=on,index=on`` and once under our
daemon. The recorded results (values and errnos) and the resulting trees must
be equal; then our mount is remounted and must still show the same tree.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from layerstore.host import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from .mounts import fresh_dirs, overlay, union
from .tree import Recorder, make_lowers, snapshot

AT_FDCWD = -100
Scenario = Callable[[Recorder, Path], None]


def rename2(a: Path, b: Path, flags: int) -> None:
    renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), flags)


def write(p: Path, data: str, mode: str = "w") -> int:
    with open(p, mode) as f:
        return f.write(data)


def read_fd(p: Path) -> bytes:
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.read(fd, 10)
    finally:
        os.close(fd)


def sc_read_only(r: Recorder, m: Path) -> None:
    r("listdir", lambda: os.listdir(m))
    r("read a", lambda: (m / "a").read_text())
    r("read gone", lambda: (m / "gone").read_text())
    r("readlink", lambda: os.readlink(m / "link"))
    r("read via link", lambda: (m / "link").read_text())
    r("stat dangling", lambda: os.stat(m / "dangling"))
    r("opq", lambda: os.listdir(m / "opq"))
    r("merged d", lambda: os.listdir(m / "d"))
    r("xattr", lambda: os.getxattr(m / "a", "user.origin"))
    r("no xattr", lambda: os.getxattr(m / "b", "user.nothing"))
    r("read dir", lambda: read_fd(m / "d"))
    r("ENOENT", lambda: os.stat(m / "nope"))
    r("ENOTDIR", lambda: os.stat(m / "a" / "x"))
    r("name too long", lambda: os.stat(m / ("n" * 256)))
    r("opaque hides", lambda: os.stat(m / "opq" / "hidden"))


def sc_write_files(r: Recorder, m: Path) -> None:
    r("append lower", lambda: write(m / "a", "more\n", "a"))
    r("overwrite lower", lambda: write(m / "d" / "x", "new x\n"))
    r("new file", lambda: write(m / "d" / "new", "fresh\n"))
    r("truncate", lambda: os.truncate(m / "b", 2))
    r("truncate grow", lambda: os.truncate(m / "d" / "sub" / "deep", 10000))
    r("sparse append", lambda: write(m / "sparse", "x", "a"))
    r("excl existing", lambda: os.open(m / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    r("read back", lambda: (m / "a").read_text())


def sc_metadata(r: Recorder, m: Path) -> None:
    r("chmod lower file", lambda: os.chmod(m / "a", 0o604))
    r("chown lower file", lambda: os.chown(m / "b", 123, 456))
    r("chmod lower dir", lambda: os.chmod(m / "lowdir", 0o700))
    r("chown lower dir", lambda: os.chown(m / "d" / "sub", 7, 8))
    r("lchown symlink", lambda: os.chown(m / "link", 5, 5, follow_symlinks=False))
    # (listed first: a lower entry's xattr names are kept once listed, and must not outlive its copy-up)
    r("listxattr lower", lambda: (sorted(os.listxattr(m / "a")), sorted(os.listxattr(m / "b"))))
    r("getxattr lower", lambda: os.getxattr(m / "a", "user.origin"))
    r("setxattr", lambda: os.setxattr(m / "a", "user.added", b"1"))
    r("getxattr added", lambda: os.getxattr(m / "a", "user.added"))
    r("removexattr", lambda: os.removexattr(m / "a", "user.origin"))
    r("getxattr removed", lambda: os.getxattr(m / "a", "user.origin"))
    r("removexattr missing", lambda: os.removexattr(m / "b", "user.nothing"))
    r("listxattr", lambda: os.listxattr(m / "a"))
    r("setxattr b", lambda: os.setxattr(m / "b", "user.b", b"2"))
    r("listxattr b", lambda: sorted(os.listxattr(m / "b")))
    r("setxattr dir", lambda: os.setxattr(m / "d", "user.dir", b"d"))
    r("setuid kept by chmod", lambda: os.chmod(m / "b", 0o4755))
    r("stat b", lambda: os.stat(m / "b"))


def sc_delete(r: Recorder, m: Path) -> None:
    r("unlink lower", lambda: os.unlink(m / "a"))
    r("unlink again", lambda: os.unlink(m / "a"))
    r("unlink dir", lambda: os.unlink(m / "d"))
    r("rmdir nonempty", lambda: os.rmdir(m / "d"))
    r("rmdir file", lambda: os.rmdir(m / "b"))
    r("rmdir empty lower", lambda: os.rmdir(m / "empty"))
    for p in ("f1", "inner/f2"):
        r(f"unlink {p}", lambda p=p: os.unlink(m / "lowdir" / p))
    r("rmdir inner", lambda: os.rmdir(m / "lowdir" / "inner"))
    r("rmdir lowdir", lambda: os.rmdir(m / "lowdir"))
    r("stat lowdir", lambda: os.stat(m / "lowdir"))
    r("recreate as file", lambda: write(m / "lowdir", "now a file\n"))
    r("recreate dir over whiteout", lambda: os.mkdir(m / "a"))
    r("new dir empty", lambda: os.listdir(m / "a"))
    r("fifo unlink", lambda: os.unlink(m / "fifo"))
    r("mkfifo back", lambda: os.mkfifo(m / "fifo"))


def sc_rmtree_recreate(r: Recorder, m: Path) -> None:
    def rmtree(p: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(p, topdown=False):
            for f in filenames:
                os.unlink(os.path.join(dirpath, f))
            for d in dirnames:
                os.rmdir(os.path.join(dirpath, d))
        os.rmdir(p)

    r("rmtree d", lambda: rmtree(m / "d"))
    r("mkdir d", lambda: os.mkdir(m / "d"))
    r("d is empty", lambda: os.listdir(m / "d"))
    r("file in d", lambda: write(m / "d" / "z", "z\n"))
    r("mkdir sub", lambda: os.mkdir(m / "d" / "sub"))
    r("sub empty", lambda: os.listdir(m / "d" / "sub"))


def sc_rename_files(r: Recorder, m: Path) -> None:
    r("rename lower file", lambda: os.rename(m / "a", m / "a2"))
    r("rename over lower", lambda: os.rename(m / "b", m / "d" / "x"))
    r("rename new file", lambda: (write(m / "n", "n\n"), os.rename(m / "n", m / "lowdir" / "n"))[1])
    r("rename onto whiteout", lambda: os.rename(m / "a2", m / "gone"))
    r("rename to self", lambda: os.rename(m / "link", m / "link"))
    r("rename file over dir", lambda: os.rename(m / "gone", m / "empty"))
    r("rename dir over file", lambda: os.rename(m / "empty", m / "gone"))
    r("rename missing", lambda: os.rename(m / "missing", m / "x"))
    r("noreplace", lambda: rename2(m / "gone", m / "link", RENAME_NOREPLACE))
    r("noreplace free", lambda: rename2(m / "gone", m / "fresh", RENAME_NOREPLACE))
    r("exchange files", lambda: rename2(m / "fresh", m / "link", RENAME_EXCHANGE))
    r("exchange missing", lambda: rename2(m / "fresh", m / "nothing", RENAME_EXCHANGE))
    r("rename hardlink to its twin", lambda: os.rename(m / "hl1", m / "hl2"))


def sc_rename_dirs(r: Recorder, m: Path) -> None:
    r("rename lower dir", lambda: os.rename(m / "lowdir", m / "moved"))
    r("list moved", lambda: os.listdir(m / "moved"))
    r("list inner", lambda: os.listdir(m / "moved" / "inner"))
    r("old gone", lambda: os.stat(m / "lowdir"))
    r("write in moved", lambda: write(m / "moved" / "inner" / "f3", "f3\n"))
    r("rename merged dir", lambda: os.rename(m / "d", m / "lowdir"))
    r("list renamed merged", lambda: os.listdir(m / "lowdir"))
    r("nested move", lambda: os.rename(m / "moved" / "inner", m / "lowdir" / "sub" / "inner"))
    r("list nested", lambda: os.listdir(m / "lowdir" / "sub" / "inner"))
    r("mkdir at old", lambda: os.mkdir(m / "d"))
    r("old place empty", lambda: os.listdir(m / "d"))
    r("dir over nonempty", lambda: os.rename(m / "opq", m / "lowdir"))
    r("dir over empty dir", lambda: os.rename(m / "opq", m / "empty"))
    r("list replaced", lambda: os.listdir(m / "empty"))
    r("new dir over lower dir", lambda: (os.mkdir(m / "nd"), os.rename(m / "nd", m / "moved"))[1])
    r("exchange dirs", lambda: rename2(m / "d", m / "lowdir", RENAME_EXCHANGE))
    r("list after exchange", lambda: (os.listdir(m / "d"), os.listdir(m / "lowdir")))
    r("move dir into itself", lambda: os.rename(m / "d", m / "d" / "sub" / "x"))


def sc_links(r: Recorder, m: Path) -> None:
    r("link lower", lambda: os.link(m / "a", m / "d" / "a-link"))
    r("stat link", lambda: os.stat(m / "d" / "a-link"))
    r("stat orig", lambda: os.stat(m / "a"))
    r("write via link", lambda: write(m / "d" / "a-link", "via link\n", "a"))
    r("read orig", lambda: (m / "a").read_text())
    r("lower group write", lambda: write(m / "hl1", "changed\n"))
    r("lower group read twin", lambda: (m / "hl2").read_text())
    r("lower group stat", lambda: os.stat(m / "hl2"))
    r("unlink one of group", lambda: os.unlink(m / "t1"))
    r("twin nlink", lambda: os.stat(m / "t2"))
    r("link into group", lambda: os.link(m / "hl2", m / "hl3"))
    r("group stat", lambda: os.stat(m / "hl1"))
    r("symlink", lambda: os.symlink("../a", m / "d" / "sl"))
    r("readlink", lambda: os.readlink(m / "d" / "sl"))
    r("symlink exists", lambda: os.symlink("x", m / "a"))
    r("link over existing", lambda: os.link(m / "a", m / "b"))
    r("link dir", lambda: os.link(m / "d", m / "d2"))


def sc_special(r: Recorder, m: Path) -> None:
    r("mkfifo", lambda: os.mkfifo(m / "f2"))
    r("whiteout mknod", lambda: os.mknod(m / "w", stat.S_IFCHR | 0o600, 0))
    r("char dev", lambda: os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    r("stat dev", lambda: os.stat(m / "null"))
    r("unix socket node", lambda: os.mknod(m / "sock", stat.S_IFSOCK | 0o600))
    r("mkdir mode", lambda: os.mkdir(m / "mdir", 0o701))
    r("create mode", lambda: os.close(os.open(m / "cfile", os.O_CREAT | os.O_WRONLY, 0o604)))
    r("utime", lambda: os.utime(m / "a", ns=(1_000_000_000, 2_000_000_000)))
    r("times", lambda: os.stat(m / "a").st_mtime_ns)
    r("utime dir", lambda: os.utime(m / "d", ns=(3_000_000_000, 4_000_000_000)))
    r("dir times", lambda: os.stat(m / "d").st_mtime_ns)


def sc_umask_zero(r: Recorder, m: Path) -> None:
    old = os.umask(0)
    try:
        r("create 04777", lambda: os.close(os.open(m / "suid", os.O_CREAT | os.O_WRONLY, 0o4777)))
        r("mkdir 0777", lambda: os.mkdir(m / "open", 0o777))
        r("mkfifo 0666", lambda: os.mkfifo(m / "open" / "fifo", 0o666))
        r("copy-up keeps 0777 dir", lambda: os.mkdir(m / "d" / "new", 0o1777))
    finally:
        os.umask(old)
    r("stat", lambda: [oct(os.stat(m / p).st_mode) for p in ("suid", "open", "open/fifo", "d/new")])


def as_nobody(m: Path, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run in ``m`` with the effective ids of nobody, so without CAP_FSETID (then back to root).

    From inside the mount: the test's temporary directories above it are root's alone.
    """

    def run() -> object:
        cwd = os.getcwd()
        os.chdir(m)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            return fn()
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.chdir(cwd)

    return run


CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # vfs_cap_data v2: effective, permitted cap_net_raw


def sc_privileges_dropped(r: Recorder, m: Path) -> None:
    """Writes, truncation and chown drop setuid and setgid as the VFS does: for a writer without
    CAP_FSETID; and every write drops file capabilities, root's too."""
    modes = {"u": 0o4777, "g": 0o2777, "ug": 0o6777}
    modes |= {"t": 0o6777, "o": 0o6777, "root": 0o6777, "c": 0o6777, "again": 0o4777, "cap": 0o777, "cap2": 0o777}
    create = os.O_CREAT | os.O_WRONLY
    old = os.umask(0)
    try:
        for name, mode in modes.items():
            r(f"create {name}", lambda name=name, mode=mode: os.close(os.open(m / name, create, mode)))
    finally:
        os.umask(old)
    r("root dir searchable by all", lambda: os.chmod(m, 0o755))
    r("lower file made setuid", lambda: os.chmod(m / "a", 0o6777))
    for name in ("cap", "cap2"):
        r(f"capability on {name}", lambda name=name: os.setxattr(m / name, "security.capability", CAP_NET_RAW))
    for name in ("u", "g", "ug", "a", "again", "cap2"):
        r(f"nobody appends to {name}", as_nobody(m, lambda name=name: write(Path(name), "x", "a")))
    r("setuid again", lambda: os.chmod(m / "again", 0o4777))
    r("nobody appends again", as_nobody(m, lambda: write(Path("again"), "y", "a")))
    r("nobody truncates t", as_nobody(m, lambda: os.truncate("t", 0)))
    r("nobody opens o with O_TRUNC", as_nobody(m, lambda: os.close(os.open("o", os.O_WRONLY | os.O_TRUNC))))
    r("root appends", lambda: write(m / "root", "x", "a"))
    r("root appends to cap", lambda: write(m / "cap", "x", "a"))
    r("root chowns c", lambda: os.chown(m / "c", 1, 1))
    r("modes", lambda: {n: oct(os.stat(m / n).st_mode) for n in [*modes, "a"]})
    r("capabilities", lambda: [os.listxattr(m / n) for n in ("cap", "cap2")])


def sc_setgid_dropped_for_non_members(r: Recorder, m: Path) -> None:
    """A write by someone outside the file's group drops setgid even where the group may not execute it.

    FUSE's kernel side leaves this case alone; the union handles it once the kernel leaves
    dropping the bits to it (``killpriv``, README "Semantics").
    """
    r("create", lambda: write(m / "ng", "", "w"))
    r("group 1", lambda: os.chown(m / "ng", 0, 1))
    r("setgid, group may not execute", lambda: os.chmod(m / "ng", 0o2767))
    r("root dir searchable by all", lambda: os.chmod(m, 0o755))
    r("nobody appends", as_nobody(m, lambda: write(Path("ng"), "x", "a")))
    r("mode", lambda: oct(os.stat(m / "ng").st_mode))


def sc_inode_numbers(r: Recorder, m: Path) -> None:
    """With every layer on one filesystem, entries report their layers' own inode numbers, as overlayfs
    does, through copy-up and renames (a new entry's number is whatever the upper gives it)."""
    names = ["a", "b", "d", "d/x", "d/sub", "lowdir", "lowdir/f1", "opq", "hl1", "hl2", "link", "fifo", "sparse"]
    r("before", lambda: [os.lstat(m / n).st_ino for n in names])
    r("append to a", lambda: write(m / "a", "x", "a"))
    r("write hl1", lambda: write(m / "hl1", "changed\n"))
    r("rename b", lambda: os.rename(m / "b", m / "b2"))
    r("rename lowdir", lambda: os.rename(m / "lowdir", m / "ld2"))
    r("after", lambda: [os.lstat(m / n).st_ino for n in ("a", "hl1", "hl2", "b2", "ld2", "ld2/f1", "d")])


def sc_listings_follow_changes(r: Recorder, m: Path) -> None:
    """Each directory is listed before and after every change: a listing the kernel keeps must not go stale."""

    def ls(*dirs: str) -> tuple[list[str], ...]:
        out = []
        for d in dirs:
            with os.scandir(m / d) as it:  # opendir, read to the end, closedir: what ls and find do
                out.append([(e.name, e.inode() > 0, *_shown(e.stat(follow_symlinks=False))) for e in it])
        return tuple(out)

    steps: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
        ("create", lambda: write(m / "d" / "c1", "c\n"), ("d",)),
        ("unlink lower", lambda: os.unlink(m / "d" / "x"), ("d",)),
        ("mkdir", lambda: os.mkdir(m / "d" / "m1"), ("d", "d/m1")),
        ("mknod", lambda: os.mkfifo(m / "d" / "m1" / "p"), ("d/m1",)),
        ("symlink", lambda: os.symlink("x", m / "d" / "s1"), ("d",)),
        ("link", lambda: os.link(m / "a", m / "d" / "a1"), (".", "d")),
        ("chmod lower", lambda: os.chmod(m / "d" / "y", 0o600), ("d",)),
        ("append lower", lambda: write(m / "d" / "y", "more\n", "a"), ("d",)),
        ("replace lower", lambda: (write(m / "d" / "t", "t\n"), os.rename(m / "d" / "t", m / "d" / "y")), ("d",)),
        ("rename within", lambda: os.rename(m / "d" / "c1", m / "d" / "c2"), ("d",)),
        ("rename across", lambda: os.rename(m / "d" / "c2", m / "lowdir" / "c3"), ("d", "lowdir")),
        ("rename dir", lambda: os.rename(m / "lowdir", m / "ld2"), (".", "ld2", "ld2/inner")),
        ("exchange", lambda: rename2(m / "d" / "m1", m / "ld2", RENAME_EXCHANGE), (".", "d", "ld2", "d/m1")),
        ("rmdir", lambda: os.rmdir(m / "empty"), (".",)),
        ("unlink in moved", lambda: os.unlink(m / "d" / "m1" / "f1"), ("d/m1",)),
        ("replace dir", lambda: (os.unlink(m / "ld2" / "p"), os.rmdir(m / "ld2"), os.mkdir(m / "ld2")), (".", "ld2")),
    ]
    r("first", lambda: ls(".", "d", "d/sub", "lowdir", "lowdir/inner", "opq", "empty"))
    r("again", lambda: ls(".", "d", "d/sub", "lowdir", "lowdir/inner", "opq", "empty"))
    for label, change, dirs in steps:
        r(f"before {label}", lambda dirs=dirs: ls(*[d for d in dirs if (m / d).is_dir()]))
        r(label, change)
        r(f"after {label}", lambda dirs=dirs: ls(*dirs))


def _shown(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a listing's entry must show alike on both (a directory's size is its file system's own)."""
    return st.st_mode, st.st_nlink, st.st_uid, 0 if stat.S_ISDIR(st.st_mode) else st.st_size


SCENARIOS: dict[str, Scenario] = {
    name[3:]: fn for name, fn in dict(globals()).items() if name.startswith("sc_") and callable(fn)
}


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lowers(tmp_path_factory.mktemp("lowers"))


MODES = {
    "passthrough": "passthrough=1",  # the kernel reads and writes open files itself (the default as root)
    "writeback": "writeback=1",  # the daemon serves file I/O, the kernel caches writes
    # the daemon serves file I/O, every write passed on; and Python reads every request (no compiled hot path)
    "write-through": "passthrough=0,writeback=0,pump=0",
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_as_kernel_overlay(name: str, mode: str, lowers: list[Path], tmp_path: Path) -> None:
    """Every way of doing file I/O behaves as overlayfs."""
    compare(SCENARIOS[name], ["-o", MODES[mode]], lowers, tmp_path)


@pytest.mark.parametrize("options", ["killpriv=0", "fastloop=0", "killpriv=0,writeback=0"])
def test_privileges_dropped_by_the_kernel(options: str, lowers: list[Path], tmp_path: Path) -> None:
    """Without ``killpriv`` (or our loop, which it needs) the kernel drops setuid/setgid itself, to the same effect."""
    compare(sc_privileges_dropped, ["-o", options], lowers, tmp_path)


def compare(scenario: Scenario, args: list[str], lowers: list[Path], tmp_path: Path) -> None:
    """Run ``scenario`` on kernel overlayfs and on the union mounted with ``args``: same results, same tree."""
    ku, kw, km, ou, ow, om = fresh_dirs(tmp_path, "ku", "kw", "km", "ou", "ow", "om")
    with overlay(km, lowers, ku, kw):
        expected = Recorder()
        scenario(expected, km)
        expected_tree = snapshot(km)
    with union(om, lowers, ou, ow, args):
        got = Recorder()
        scenario(got, om)
        got_tree = snapshot(om)
    assert got.log == expected.log
    assert got_tree == expected_tree
    with union(om, lowers, ou, ow):
        assert snapshot(om) == expected_tree, "the tree changed across a remount"


def _privileges(mnt: Path) -> tuple[str, str]:
    """(euid of a setuid-root program run by nobody, what opening a device node gives) through ``mnt``."""
    import subprocess

    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(mnt / "id"), "-u"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    try:
        with open(mnt / "null", "wb") as f:
            f.write(b"x")
        dev = "opened"
    except OSError as e:
        dev = errno_name(e.errno)
    return r.stdout.strip() or r.stderr.strip(), dev


def errno_name(n: int | None) -> str:
    import errno

    return errno.errorcode.get(n or 0, str(n))


@pytest.mark.parametrize("options", ["", "nosuid", "nodev", "nosuid,nodev"])
def test_setuid_and_devices_as_kernel_overlay(options: str, tmp_path: Path) -> None:
    """As root, setuid programs and device nodes work unless nosuid/nodev are asked for: as on `mount -t overlay`."""
    import shutil

    lower, up1, wk1, up2, wk2, m1, m2 = fresh_dirs(tmp_path, "lower", "u1", "w1", "u2", "w2", "m1", "m2")
    shutil.copy("/usr/bin/id", lower / "id")
    os.chmod(lower / "id", 0o4755)
    os.mknod(lower / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    tmp_path.chmod(0o755)  # nobody must reach the program
    extra = ["-o", options] if options else []
    with union(m1, [lower], up1, wk1, extra=extra) as ours:
        got = _privileges(ours)
    with overlay(m2, [lower], up2, wk2, extra=options) as ref:
        want = _privileges(ref)
    assert got == want
    assert want[0] == ("65534" if "nosuid" in options else "0")


def _orphans(mnt: Path) -> list[object]:
    """Removed entries the kernel still holds: written then removed files, a removed working directory."""
    import subprocess

    out: list[object] = []
    for i in range(5):
        (mnt / f"f{i}").write_text("hello\n" * (i + 1))
    fd = os.open(mnt / "open", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"abc")
    for i in range(5):
        os.unlink(mnt / f"f{i}")
    os.unlink(mnt / "open")
    os.fsync(fd)
    os.ftruncate(fd, 1)
    os.fchmod(fd, 0o600)
    for op in (lambda: os.setxattr(fd, "user.a", b"1"), lambda: os.getxattr(fd, "user.a"), lambda: os.listxattr(fd),
               lambda: os.removexattr(fd, "user.a"), lambda: os.listxattr(fd)):  # fmt: skip
        try:
            out.append(op())
        except OSError as e:
            out.append(errno_name(e.errno))
    st = os.fstat(fd)
    out.append((st.st_nlink, st.st_size, oct(st.st_mode)))
    os.close(fd)
    out.append(subprocess.run(["sync", "-f", str(mnt)], capture_output=True, text=True).returncode)
    (mnt / "d").mkdir()
    cwd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(mnt / "d")
    st = os.fstat(cwd)
    out.append((st.st_nlink, stat.S_ISDIR(st.st_mode)))
    try:
        os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=cwd)
    except OSError as e:
        out.append(e.errno)
    os.close(cwd)
    out.append(subprocess.run(["sync", "-f", str(mnt)], capture_output=True, text=True).returncode)
    return out


def test_removed_but_known_entries_as_kernel_overlay(tmp_path: Path) -> None:
    """After `rm` of files written through the cache, the kernel's late SETATTR succeeds (`sync -f` gives 0)."""
    lower, up1, wk1, up2, wk2, m1, m2 = fresh_dirs(tmp_path, "lower", "u1", "w1", "u2", "w2", "m1", "m2")
    with union(m1, [lower], up1, wk1) as ours:
        got = _orphans(ours)
    with overlay(m2, [lower], up2, wk2) as ref:
        want = _orphans(ref)
    assert got == want
    assert want[6] == 0 and want[1] == b"1"  # sync -f succeeds; the orphan keeps its xattrs
