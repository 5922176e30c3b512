"""Union semantics that go beyond (or are not visible in) the differential suite."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .mounts import COMMAND, daemon_pid, fresh_dirs, is_mounted, overlay, union
from .tree import make_lowers, snapshot


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    l1, l2 = make_lowers(tmp_path / "lowers")
    u, w, m = fresh_dirs(tmp_path, "u", "w", "m")
    return {"l1": l1, "l2": l2, "u": u, "w": w, "m": m}


def mount(layers: dict[str, Path]):  # noqa: ANN201 - a context manager
    return union(layers["m"], [layers["l1"], layers["l2"]], layers["u"], layers["w"])


def test_every_whiteout_dialect_is_read(tmp_path: Path) -> None:
    top, base = tmp_path / "top", tmp_path / "base"
    for d in ("chr", "whfile", "xwh", "opq_oci", "opq_trusted", "opq_user", "opq_fuse", "plain"):
        (base / d).mkdir(parents=True)
        (base / d / "f").write_text("base")
        (base / f"{d}.file").write_text("base")
    top.mkdir()
    os.mknod(top / "chr.file", stat.S_IFCHR, 0)
    (top / ".wh.whfile.file").touch()
    (top / "xwh.file").touch()
    os.setxattr(top / "xwh.file", "trusted.overlay.whiteout", b"y")
    os.setxattr(top, "trusted.overlay.opaque", b"x")  # "holds xattr whiteouts" (not opaque)
    for d, xattr in (
        ("opq_trusted", "trusted.overlay.opaque"),
        ("opq_user", "user.overlay.opaque"),
        ("opq_fuse", "user.fuseoverlayfs.opaque"),
    ):
        (top / d).mkdir()
        os.setxattr(top / d, xattr, b"y")
        (top / d / "g").write_text("top")
    (top / "opq_oci").mkdir()
    (top / "opq_oci" / ".wh..wh..opq").touch()
    (top / "opq_oci" / "g").write_text("top")
    (top / "plain").mkdir()
    (top / "plain" / "g").write_text("top")
    m = tmp_path / "m"
    m.mkdir()
    with union(m, [top, base]):
        names = set(os.listdir(m))
        for d in ("chr", "whfile", "xwh"):
            assert f"{d}.file" not in names, d
            assert not (m / f"{d}.file").exists(), d
            assert (m / d / "f").exists()
        for d in ("opq_oci", "opq_trusted", "opq_user", "opq_fuse"):
            assert sorted(os.listdir(m / d)) == ["g"], d
        assert sorted(os.listdir(m / "plain")) == ["f", "g"]
        assert (m / "plain.file").read_text() == "base"
        assert not any(n.startswith(".wh.") for n in names)
        assert not (m / ".wh.whfile.file").exists()


def test_markers_and_private_xattrs_stay_hidden(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        with pytest.raises(OSError) as e:
            (m / ".wh.sneaky").touch()
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            os.mkdir(m / ".wh..wh..opq")
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            os.setxattr(m / "b", "trusted.overlay.opaque", b"y")
        assert e.value.errno == errno.EPERM
        os.rename(m / "lowdir", m / "renamed")  # writes overlay.redirect in the upper
        os.chmod(m / "a", 0o600)  # writes unionmount.metacopy/origin
        os.unlink(m / "b")
        os.mkdir(m / "b")  # an opaque directory
        for p in (m / "renamed", m / "a", m / "b", m):
            assert not [x for x in os.listxattr(p) if "overlay." in x or "unionmount." in x], p
            with pytest.raises(OSError):
                os.getxattr(p, "trusted.overlay.redirect")
        assert "renamed" in os.listdir(m) and "lowdir" not in os.listdir(m)


def test_upper_is_readable_by_kernel_overlayfs(layers: dict[str, Path], tmp_path: Path) -> None:
    """Our upper, stacked as a lower layer under the kernel, shows what our mount showed."""
    with mount(layers) as m:
        (m / "a").write_text("rewritten\n")
        os.unlink(m / "b")
        (m / "d" / "sub" / "deep").unlink()
        os.rename(m / "lowdir", m / "moved")  # a redirect
        os.mkdir(m / "b")  # dir over whiteout: opaque
        (m / "b" / "new").write_text("n\n")
        os.rmdir(m / "empty")
        ours = snapshot(m)
    (km,) = fresh_dirs(tmp_path, "km")
    opts = f"lowerdir={layers['u']}:{layers['l1']}:{layers['l2']},redirect_dir=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(km)], check=True)
    try:
        assert snapshot(km) == ours
    finally:
        subprocess.run(["umount", str(km)], check=True)


def test_inode_numbers_are_stable(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        before = {p: os.lstat(m / p).st_ino for p in ("a", "b", "d", "d/x", "lowdir", "hl1", "hl2", "link")}
        assert before["hl1"] == before["hl2"]
        listed = {e.name: e.inode() for e in os.scandir(m)}
        assert all(listed[p] == before[p] for p in ("a", "b", "d", "lowdir", "hl1", "link"))
        (m / "a").write_text("copied up\n")
        os.chmod(m / "b", 0o600)
        (m / "d" / "new").touch()  # copies d up
        os.chown(m / "link", 1, 1, follow_symlinks=False)
        with open(m / "hl1", "a") as f:
            f.write("group copy-up\n")
        os.rename(m / "lowdir", m / "lowdir2")
        after = {p: os.lstat(m / p).st_ino for p in ("a", "b", "d", "d/x", "hl1", "hl2", "link")}
        after["lowdir"] = os.lstat(m / "lowdir2").st_ino
        assert after == before
        assert os.lstat(m / "hl1").st_nlink == 2
        assert (m / "hl2").read_text().endswith("group copy-up\n")
    with mount(layers) as m:
        again = {p: os.lstat(m / p).st_ino for p in ("a", "b", "d", "d/x", "hl1", "hl2", "link")}
        again["lowdir"] = os.lstat(m / "lowdir2").st_ino
        assert again == before
        assert os.lstat(m / "hl2").st_nlink == 2
        assert (m / "hl2").read_text().endswith("group copy-up\n")


def test_hard_link_counts_survive_remount_and_rename(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        os.mkdir(m / "dir")
        (m / "dir" / "f").write_text("x")
        os.link(m / "dir" / "f", m / "g")
        os.link(m / "a", m / "a2")
        os.rename(m / "dir", m / "dir2")
        assert os.stat(m / "g").st_nlink == 2
        assert os.stat(m / "a").st_nlink == 2
        fd = os.open(m / "g", os.O_RDONLY)
        try:
            os.unlink(m / "g")
            os.unlink(m / "dir2" / "f")
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
    with mount(layers) as m:
        assert os.stat(m / "a2").st_nlink == 2
        assert os.stat(m / "a").st_ino == os.stat(m / "a2").st_ino


def test_metadata_changes_copy_no_data(layers: dict[str, Path]) -> None:
    big = layers["l2"] / "big"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 4)
    data = big.read_bytes()
    with mount(layers) as m:
        os.chmod(m / "big", 0o600)
        os.chown(m / "big", 42, 43)
        os.utime(m / "big", ns=(5, 6_000_000_000))
        os.setxattr(m / "big", "user.tag", b"t")
        up = layers["u"] / "big"
        assert up.exists() and os.stat(up).st_blocks <= 8, "metadata change copied data"  # 8: an xattr block
        st = os.stat(m / "big")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o600, 42, 43, 6_000_000_000)
        assert st.st_size == len(data) and st.st_blocks > 0
        assert (m / "big").read_bytes() == data
    with mount(layers) as m:
        assert (m / "big").read_bytes() == data
        with open(m / "big", "r+b") as f:
            f.seek(10)
            f.write(b"XY")
        assert os.stat(layers["u"] / "big").st_blocks > 0
        expected = data[:10] + b"XY" + data[12:]
        assert (m / "big").read_bytes() == expected
    with mount(layers) as m:
        assert (m / "big").read_bytes() == expected
        assert os.getxattr(m / "big", "user.tag") == b"t"


def test_copy_up_keeps_sparse_files_sparse_and_metadata(layers: dict[str, Path]) -> None:
    lst = os.stat(layers["l2"] / "sparse")
    with mount(layers) as m:
        with open(m / "sparse", "ab") as f:
            f.write(b"!")
        ust = os.stat(layers["u"] / "sparse")
        assert ust.st_blocks <= lst.st_blocks + 16, "holes were filled in"
        assert (m / "sparse").read_bytes() == b"\0" * (8 << 20) + b"end!"
        (m / "a").open("a").write("x")
        ast = os.stat(layers["u"] / "a")
        assert (stat.S_IMODE(ast.st_mode), ast.st_uid, ast.st_gid) == (0o640, 1000, 1000)
        assert os.getxattr(layers["u"] / "a", "user.origin") == b"base"


def test_interrupted_copy_up_leaves_no_trace(layers: dict[str, Path]) -> None:
    big = layers["l2"] / "huge"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    original = big.read_bytes()
    (layers["w"] / "work").mkdir()
    (layers["w"] / "work" / "#stale.1").write_text("left by a crash")
    with mount(layers) as m:
        assert os.listdir(layers["w"] / "work") == []
        pid = daemon_pid(m)
        writer = subprocess.Popen(["sh", "-c", f"echo tail >> {m / 'huge'}"])
        time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=30)
        subprocess.run(["umount", "-l", str(m)], check=False)
        time.sleep(0.1)
    with mount(layers) as m:
        body = (m / "huge").read_bytes()
        assert body in (original, original + b"tail\n")
        assert os.listdir(layers["w"] / "work") == []


def test_read_only_without_upper(layers: dict[str, Path]) -> None:
    with union(layers["m"], [layers["l1"], layers["l2"]]) as m:
        assert (m / "a").read_text() == "base a\n"
        for op in (
            lambda: (m / "new").touch(),
            lambda: os.unlink(m / "a"),
            lambda: os.mkdir(m / "x"),
            lambda: os.chmod(m / "a", 0o777),
        ):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS


def test_reads_ahead_a_mebibyte_at_a_time(layers: dict[str, Path]) -> None:
    """The kernel would give a FUSE mount 128 KiB of readahead; the daemon asks for 1 MiB after INIT."""
    with mount(layers) as m:
        dev = os.stat(m).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert bdi.read_text().strip() == "1024"


def _requests(mnt: Path, op: str) -> int:
    r = subprocess.run([*COMMAND, "stats", str(mnt), "--format", "json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["ops"].get(op, {}).get("count", 0)


def _lookups(mnt: Path) -> int:
    return _requests(mnt, "lookup")


def test_missing_names_are_asked_once(layers: dict[str, Path]) -> None:
    """The kernel keeps "no such entry" like any other (a negative dentry); changes made through the mount undo it."""
    with mount(layers) as m:
        before = _lookups(m)
        for _ in range(5):
            assert not (m / "missing").exists()
        assert _lookups(m) - before == 1
        (m / "missing").write_text("now\n")
        assert (m / "missing").read_text() == "now\n" and "missing" in os.listdir(m)
        os.rename(m / "missing", m / "moved")
        assert not (m / "missing").exists() and (m / "moved").exists()
        os.unlink(m / "moved")
        assert not (m / "moved").exists()
        os.mkdir(m / "missing")
        assert (m / "missing").is_dir()
    with union(layers["m"], [layers["l1"]], extra=["-o", "timeout=0"]) as m:  # nothing kept: asked every time
        before = _lookups(m)
        for _ in range(5):
            assert not (m / "missing").exists()
        assert _lookups(m) - before == 5


def test_symlink_targets_are_read_once(layers: dict[str, Path]) -> None:
    """The kernel keeps a symlink's target (merged /usr makes every exec walk /bin and /lib); a symlink
    replaced through the mount, even under an inode number the upper file system reuses, reads anew."""
    with mount(layers) as m:
        os.symlink("a", m / "sym")
        before = _requests(m, "readlink")
        for _ in range(5):
            assert os.readlink(m / "sym") == "a" and (m / "sym").read_text() == (m / "a").read_text()
        assert _requests(m, "readlink") - before <= 1
        for i in range(20):  # rm + ln -s: ext4 hands the freed inode number to the next file made, while
            held = os.open(m / "sym", os.O_PATH | os.O_NOFOLLOW)  # the kernel still holds the old inode
            os.unlink(m / "sym")
            os.symlink(f"t{i}", m / "sym")
            assert os.readlink(m / "sym") == f"t{i}"
            os.close(held)
        for i in range(20):  # ln -sfn's way: a new link renamed over the old
            os.symlink(f"r{i}", m / "tmp")
            os.rename(m / "tmp", m / "sym")
            assert os.readlink(m / "sym") == f"r{i}"


def test_the_kernel_keeps_listings_until_they_change(layers: dict[str, Path]) -> None:
    """A directory read once is listed again from the kernel's cache; a change through the mount drops it."""
    with mount(layers) as m:
        first = sorted(os.listdir(m / "d"))
        before = _requests(m, "readdir")
        for _ in range(3):
            assert sorted(os.listdir(m / "d")) == first
        assert _requests(m, "readdir") == before
        (m / "d" / "new").touch()
        assert sorted(os.listdir(m / "d")) == sorted([*first, "new"])
        assert _requests(m, "readdir") > before
        # Directories are listed without being opened: OPENDIR was answered ENOSYS once.
        assert (_requests(m, "opendir"), _requests(m, "releasedir")) == (1, 0)
    for options in ("dircache=0", "fastloop=0"):  # no listing cache (pyfuse3 cannot ask for one): every listing asks
        with union(layers["m"], [layers["l1"], layers["l2"]], extra=["-o", options]) as m:
            for d in ("d", "d", "lowdir", "lowdir"):
                os.listdir(m / d)
            assert _requests(m, "opendir") == 4
            before = _requests(m, "readdir")
            os.listdir(m / "d")
            assert _requests(m, "readdir") > before


def test_capabilities_are_asked_for_once_per_file(layers: dict[str, Path]) -> None:
    """With ``killpriv`` the kernel stops asking ``security.capability`` before every write().

    It asks once, then trusts the file until its attributes change (setuid, setgid and
    capabilities being dropped is checked against overlayfs in ``test_differential``).
    """

    def writes(m: Path, name: str) -> int:
        before = _requests(m, "getxattr")
        with open(m / name, "wb", buffering=0) as f:
            for _ in range(20):
                f.write(b"x" * 100)
        return _requests(m, "getxattr") - before

    with mount(layers) as m:
        assert writes(m, "new") <= 2
        assert writes(m, "new") <= 2
    with union(layers["m"], [layers["l1"], layers["l2"]], layers["u"], layers["w"], extra=["-o", "killpriv=0"]) as m:
        assert writes(m, "other") >= 20


def test_an_idle_daemon_does_not_poll(layers: dict[str, Path]) -> None:
    """After a burst of requests close together (which the loop polls for), a quiet mount costs no CPU."""

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with mount(layers) as m:
        pid = daemon_pid(m)
        for i in range(3000):
            try:
                os.lstat(m / f"missing-{i}")
            except FileNotFoundError:
                pass
        before = cpu(pid)
        time.sleep(1.0)
        assert cpu(pid) - before < 0.2, "the daemon kept polling a quiet device"


def test_attributes_answered_by_the_loop_are_pyfuse3s(layers: dict[str, Path]) -> None:
    """A lower-only entry's GETATTR, answered by our loop without pyfuse3, says what pyfuse3 would.

    ``stat --cached=never`` makes the kernel ask the daemon (AT_STATX_FORCE_SYNC).
    """
    fmt = "%f %i %h %u %g %s %b %o %.9Y %.9Z %F"
    paths = ["a", "d", "d/x", "d/sub", "link", "fifo", "sparse", "hl1", "hl2", "lowdir", "opq"]

    def attrs(m: Path) -> list[str]:
        for p in paths:
            os.lstat(m / p)  # looked up (and answered) once through pyfuse3
        cmd = ["stat", "--cached=never", "-c", fmt, *(str(m / p) for p in paths)]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()

    lowers = [layers["l1"], layers["l2"]]
    with union(layers["m"], lowers) as m:
        fast = attrs(m)
        assert _requests(m, "getattr") >= len(paths)
    with union(layers["m"], lowers, extra=["-o", "fastloop=0"]) as m:
        assert attrs(m) == fast


def test_one_device_and_statfs(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        dev = os.stat(m).st_dev
        for p in ("a", "b", "d", "d/x", "link", "fifo"):
            assert os.lstat(m / p).st_dev == dev
        sv = os.statvfs(m)
        assert sv.f_namemax == 255 and sv.f_blocks > 0


def test_fds_bounded_and_no_leaks(layers: dict[str, Path]) -> None:
    """Walking thousands of entries and mkdir/rmdir loops do not grow the daemon's fds."""
    tree = layers["l2"] / "many"
    for i in range(60):
        d = tree / f"d{i}" / "x" / "y"
        d.mkdir(parents=True)
        for j in range(30):
            (d / f"f{j}").write_text("x")
    with mount(layers) as m:
        pid = daemon_pid(m)
        start = len(os.listdir(f"/proc/{pid}/fd"))
        for _ in range(3):
            for dirpath, _, files in os.walk(m / "many"):
                for f in files:
                    os.stat(os.path.join(dirpath, f))
        for i in range(300):
            os.mkdir(m / f"loop{i}")
            os.rmdir(m / f"loop{i}")
        for i in range(100):
            (m / "many" / f"d{i % 60}" / "x" / "y" / "f0").open("a").close()
        used = len(os.listdir(f"/proc/{pid}/fd"))
        assert used < start + 300, (start, used)


def test_names_at_the_limits(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        name = "n" * 255
        (m / name).write_text("long")
        assert (m / name).read_text() == "long"
        with pytest.raises(OSError) as e:
            (m / ("n" * 256)).write_text("x")
        assert e.value.errno == errno.ENAMETOOLONG
        deep = m
        comp = "d" * 200
        depth = 0
        while len(str(deep)) + len(comp) + 1 < 4000:
            deep = deep / comp
            depth += 1
        os.makedirs(deep)
        (deep / "f").write_text("deep")
        assert (deep / "f").read_text() == "deep"
        assert depth > 15


def test_concurrent_reader_follows_copy_up(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        with open(m / "a", "rb") as reader:
            with open(m / "a", "r+b") as writer:
                writer.write(b"CHANGED")
                writer.flush()
            reader.seek(0)
            assert reader.read(7) == b"CHANGED"


def test_signal_unmounts_cleanly(layers: dict[str, Path]) -> None:
    with mount(layers) as m:
        pid = daemon_pid(m)
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not is_mounted(m):
                break
            time.sleep(0.05)
        assert not is_mounted(m)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")


def test_same_tree_as_kernel_with_tools(layers: dict[str, Path], tmp_path: Path) -> None:
    """tar, cp -a and a python compileall through both mounts give the same tree."""
    script = (
        "set -e; cd {m}; tar cf /dev/null .; cp -a d d-copy; cp -a lowdir lowdir-copy; rm -rf lowdir;"
        " mkdir -p py && printf 'x = 1\\n' > py/m.py && python3 -m compileall -q py >/dev/null;"
        " tar cf {t} d-copy; mkdir untar && tar xf {t} -C untar; mv untar/d-copy untar/d2; rm -rf opq"
    )
    ku, kw, km, ou, ow, om = fresh_dirs(tmp_path, "ku", "kw", "km", "ou", "ow", "om")
    lowers = [layers["l1"], layers["l2"]]
    with overlay(km, lowers, ku, kw):
        subprocess.run(["sh", "-c", script.format(m=km, t=tmp_path / "k.tar")], check=True)
        expected = snapshot(km)
    with union(om, lowers, ou, ow):
        subprocess.run(["sh", "-c", script.format(m=om, t=tmp_path / "o.tar")], check=True)
        got = snapshot(om)
    pyc = [k for k in expected if k.endswith(".pyc")]
    for k in pyc:  # the pyc embeds the source mtime, which differs between the two runs
        expected.pop(k)
        got.pop(k)
    assert pyc and got == expected


def test_paths_deeper_than_path_max(layers: dict[str, Path]) -> None:
    """Relative to the layer root a path may exceed PATH_MAX; the daemon must still reach it."""
    comp = "p" * 200
    with mount(layers) as m:
        fds = [os.open(m, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for _ in range(30):  # 30 * 201 bytes > 6000
                os.mkdir(comp, dir_fd=fds[-1])
                fds.append(os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fds[-1])
            os.write(fd, b"deep")
            os.close(fd)
            os.rename("f", "g", src_dir_fd=fds[-1], dst_dir_fd=fds[-1])
            assert os.listdir(fds[-1]) == ["g"]
            os.unlink("g", dir_fd=fds[-1])
            while len(fds) > 1:
                os.close(fds.pop())
                os.rmdir(comp, dir_fd=fds[-1])
        finally:
            for fd in fds:
                os.close(fd)
        assert not (m / comp).exists()


def _in_chroot(root: Path, actions: list[tuple[str, str]]) -> int:
    """Run (op, path) actions as a process whose root is the union; returns how many failed."""
    pid = os.fork()
    if pid == 0:
        failed = 0
        try:
            os.chroot(root)
            os.chdir("/")
            for op, path in actions:
                try:
                    if op == "write":
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.write(fd, b"escape")
                        os.close(fd)
                    elif op == "mkdir":
                        os.mkdir(path)
                    elif op == "chmod":
                        os.chmod(path, 0o777)
                except OSError:
                    failed += 1
        finally:
            os._exit(failed)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_symlinks_planted_in_layers_are_never_followed(layers: dict[str, Path], tmp_path: Path) -> None:
    """Host-side tampering with the upper (a symlink where a directory was) never leaks writes outside.

    The client acts as a container process would: chrooted into the union, so a
    planted absolute symlink resolves inside the union, and only the daemon could
    carry a write to the host path.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    with mount(layers) as m:
        assert (m / "d" / "x").read_text() == "x from base\n"  # the kernel now caches d and d/x
        os.symlink(outside, layers["u"] / "d")  # planted behind the daemon's back
        (m / "lowdir" / "f1").write_text("copied up")  # lowdir now exists in the upper
        os.rename(layers["u"] / "lowdir", tmp_path / "moved-away")
        os.symlink(outside, layers["u"] / "lowdir")
        actions = [
            ("write", "/d/x"),
            ("write", "/d/new"),
            ("write", "/lowdir/new"),
            ("write", "/lowdir/f1"),
            ("mkdir", "/lowdir/sub"),
            ("chmod", "/lowdir/inner"),
            ("mkdir", "/d/sub"),
        ]
        _in_chroot(m, actions)
    assert list(outside.iterdir()) == []


def test_rootless_in_a_user_namespace(tmp_path: Path) -> None:
    """As rootless podman runs it: uid 0 in a user namespace, where trusted.* xattrs are refused.

    Renaming a lower directory still works (a user.overlay.redirect), and the
    upper is in overlayfs' userxattr dialect.
    """
    lower = tmp_path / "l"
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "dir" / "sub" / "f").write_text("a")
    (lower / "file").write_text("b")
    u, w, m = fresh_dirs(tmp_path, "u", "w", "m")
    cmd = " ".join(COMMAND)
    script = (
        f"set -e; {cmd} mount --lower {lower} --upper {u} --work {w} --log {tmp_path}/log {m};"
        f" trap '{cmd} umount {m}' EXIT; cd {m}; mv dir dir2; ls dir2/sub; rm file; mkdir file; cd /"
    )
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["f"]
    assert os.getxattr(u / "dir2", "user.overlay.redirect") == b"/dir"
    assert os.getxattr(u / "file", "user.overlay.opaque") == b"y"
    assert not [x for x in os.listxattr(u / "dir2") if x.startswith("trusted.")]
    with union(m, [lower], u, w):
        assert sorted(os.listdir(m)) == ["dir2", "file"]
        assert (m / "dir2" / "sub" / "f").read_text() == "a"
        assert os.listdir(m / "file") == []


def test_the_daemon_lets_go_of_what_the_kernel_forgets(tmp_path: Path) -> None:
    """After the kernel forgets the inodes of a walk, the daemon holds no node and no listing for them."""
    import json
    import subprocess

    from .mounts import COMMAND, union

    lower, up, work, mnt = (tmp_path / n for n in ("l", "u", "w", "m"))
    for d in (up, work, mnt):
        d.mkdir()
    for i in range(10):
        (lower / f"d{i}").mkdir(parents=True)
        for j in range(600):
            (lower / f"d{i}" / f"f{j}").touch()

    def settings(m: Path) -> dict:  # type: ignore[type-arg]
        return json.loads(subprocess.run([*COMMAND, "stats", str(m), "--format", "json"], capture_output=True,
                                         text=True, check=True).stdout)["settings"]  # fmt: skip

    with union(mnt, [lower], up, work) as m:
        subprocess.run(["find", str(m), "-printf", "%s\n"], check=True, capture_output=True)
        held = settings(m)
        assert held["inodes"] > 6000 and held["listed"] > 0
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("2")
        deadline = time.monotonic() + 10
        while settings(m)["inodes"] > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = settings(m)
        assert after["inodes"] <= 2 and after["listed"] == 0, after
        assert len(os.listdir(m / "d3")) == 600  # and it lists again as before
