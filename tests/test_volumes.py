"""Volumes, binds and id maps on real mounts (Docker's and podman's rules)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .images import um
from .mounts import force_unmount, is_mounted
from .tree import snapshot


@contextmanager
def mounted(*args: str | Path) -> Iterator[None]:
    """``unionmount mount ARGS`` (the mount point last); always unmounted."""
    r = um("mount", *args)
    assert r.returncode == 0, r.stderr
    mnt = Path(args[-1])
    try:
        yield
    finally:
        if um("umount", mnt).returncode != 0:
            force_unmount(mnt)


@pytest.fixture
def store(image: Path, tmp_path: Path) -> Path:
    s = tmp_path / "store"
    assert um("image", "--root", s, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    return s


def dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir(parents=True, exist_ok=True)
        out.append(base / n)
    return out


def test_volume_commands(store: Path, tmp_path: Path) -> None:
    (nfs,) = dirs(tmp_path, "nfs")
    assert um("volume", "--root", store, "create", "data", "--label", "tier=db").stdout.strip() == "data"
    r = um("volume", "--root", store, "create", "ext", "-o", "type=none", "-o", "o=bind", "-o", f"device={nfs}")
    assert r.returncode == 0, r.stderr
    (data,) = json.loads(um("volume", "--root", store, "inspect", "data").stdout)
    assert data["Mountpoint"] == str(store / "volumes" / "data" / "_data") and Path(data["Mountpoint"]).is_dir()
    assert data["Labels"] == {"tier": "db"} and data["Driver"] == "local" and data["UsedBy"] == []
    assert {"Name", "Driver", "Mountpoint", "CreatedAt", "Labels", "Options"} <= set(data)
    (ext,) = json.loads(um("volume", "--root", store, "inspect", "ext").stdout)
    assert ext["Mountpoint"] == str(nfs) and ext["Options"]["device"] == str(nfs)
    names = [v["Name"] for v in json.loads(um("volume", "--root", store, "ls", "--format", "json").stdout)]
    assert names == ["data", "ext"]
    (mnt,) = dirs(tmp_path, "mnt")
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", "ext:/srv", "-v", "data:/db", mnt):
        (mnt / "srv" / "f").write_text("on the bind device\n")
        (mnt / "db" / "g").write_text("in the volume\n")
    assert (nfs / "f").read_text() == "on the bind device\n"
    assert (store / "volumes" / "data" / "_data" / "g").read_text() == "in the volume\n"
    r = um("volume", "--root", store, "rm", "data")
    assert r.returncode != 0 and r.stderr.strip() == "unionmount: volume 'data' is in use by container(s) c"
    (data,) = json.loads(um("volume", "--root", store, "inspect", "data").stdout)
    assert data["UsedBy"] == ["c"]
    assert um("container", "--root", store, "rm", "c").returncode == 0
    assert um("volume", "--root", store, "create", "spare").returncode == 0
    anon = [
        v["Name"] for v in json.loads(um("volume", "--root", store, "ls", "--format", "json").stdout) if v["Anonymous"]
    ]
    assert len(anon) == 1  # the image's VOLUME /data
    assert um("volume", "--root", store, "prune").stdout.split() == anon  # named volumes stay without -a
    assert sorted(um("volume", "--root", store, "prune", "-a").stdout.split()) == ["data", "ext", "spare"]
    assert not (store / "volumes" / "data").exists() and (nfs / "f").exists()  # a bind device is not deleted


def test_graft_rules(tmp_path: Path) -> None:
    low, up, work, mnt, host = dirs(tmp_path, "low", "up", "work", "mnt", "host")
    (low / "etc").mkdir()
    (low / "etc" / "conf").write_text("lower\n")
    (host / "h").write_text("host file\n")
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    args = ["--lower", low, "--upper", up, "--work", work, "-v", f"{host}:/srv/data", "-v", f"{ro_dir}:/ro:ro"]
    with mounted(*args, mnt):
        assert sorted(os.listdir(mnt)) == ["etc", "ro", "srv"]  # graft points exist though the lower lacks them
        assert (mnt / "srv" / "data" / "h").read_text() == "host file\n"
        (mnt / "srv" / "data" / "new").write_text("x\n")
        assert (host / "new").exists() and not list(up.rglob("new"))  # written to the volume, not the layer
        for fn, a, b in (
            (os.rename, mnt / "srv" / "data" / "new", mnt / "etc" / "new"),
            (os.rename, mnt / "etc" / "conf", mnt / "srv" / "data" / "conf"),
            (os.link, mnt / "srv" / "data" / "new", mnt / "etc" / "hard"),
            (os.link, mnt / "etc" / "conf", mnt / "srv" / "data" / "hard"),
        ):
            with pytest.raises(OSError) as e:
                fn(a, b)
            assert e.value.errno == errno.EXDEV
        for fn, a in ((os.rmdir, mnt / "srv" / "data"), (os.rename, mnt / "srv" / "data")):
            with pytest.raises(OSError) as e:
                fn(a) if fn is os.rmdir else fn(a, mnt / "elsewhere")
            assert e.value.errno == errno.EBUSY
        with pytest.raises(OSError) as e:
            (mnt / "ro" / "x").write_text("no\n")
        assert e.value.errno == errno.EROFS
        os.rename(mnt / "srv" / "data" / "new", mnt / "srv" / "data" / "renamed")  # within the graft: fine
        assert (host / "renamed").exists()


def test_a_bind_shows_a_symlink_changed_on_the_host(tmp_path: Path) -> None:
    """The kernel keeps symlink targets, but a bind's can change behind the mount: the change shows once the
    entry is looked up again (within the graft's one-second timeout), as attributes do."""
    low, up, work, mnt, host = dirs(tmp_path, "low", "up", "work", "mnt", "host")
    os.symlink("one", host / "link")
    with mounted("--lower", low, "--upper", up, "--work", work, "-v", f"{host}:/h", mnt):
        assert os.readlink(mnt / "h" / "link") == "one"
        for target in ("two", "three"):
            os.unlink(host / "link")
            os.symlink(target, host / "link")
            time.sleep(1.2)
            assert os.readlink(mnt / "h" / "link") == target
            assert sorted(os.listdir(mnt / "h")) == ["link"]  # a listing revalidates it too
            os.rename(host / "link", host / "old")
            os.symlink(target + "!", host / "link")
            os.unlink(host / "old")
            time.sleep(1.2)
            assert os.readlink(mnt / "h" / "link") == target + "!"


def test_new_volume_is_filled_from_the_image(store: Path, image: Path, tmp_path: Path) -> None:
    (mnt,) = dirs(tmp_path, "mnt")
    ref = image / "ref" / "rootfs"
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", "filled:/d", "-v", "empty:/usr:nocopy", mnt):
        assert snapshot(mnt / "d") == snapshot(ref / "d")
        assert os.listdir(mnt / "usr") == []
        (mnt / "d" / "keep").write_text("mine\n")
    vol = store / "volumes" / "filled" / "_data"
    assert snapshot(vol)["sub"] == snapshot(ref / "d")["sub"]  # owners, modes, xattrs, ACLs on disk
    st, ref_st = os.stat(vol), os.stat(ref / "d")
    assert (st.st_mode, st.st_uid, st.st_gid) == (ref_st.st_mode, ref_st.st_uid, ref_st.st_gid)
    # a volume that has content is never filled again
    with mounted("--root", store, "--image", "base", "--name", "c2", "-v", "filled:/d", mnt):
        assert (mnt / "d" / "keep").read_text() == "mine\n"


def test_image_volume_is_anonymous_and_kept_by_the_container(store: Path, tmp_path: Path) -> None:
    (mnt,) = dirs(tmp_path, "mnt")
    with mounted("--root", store, "--image", "base", "--name", "c", mnt):
        (mnt / "data" / "x").write_text("kept\n")
    (vol,) = json.loads(um("volume", "--root", store, "ls", "--format", "json").stdout)
    assert vol["Anonymous"] and len(vol["Name"]) == 64 and vol["UsedBy"] == ["c"]
    assert not list((store / "containers" / "c" / "upper").rglob("x"))
    with mounted("--root", store, "--image", "base", "--name", "c", mnt):
        assert (mnt / "data" / "x").read_text() == "kept\n"
    assert len(json.loads(um("volume", "--root", store, "ls", "--format", "json").stdout)) == 1
    assert um("container", "--root", store, "rm", "c").returncode == 0
    assert um("volume", "--root", store, "prune").stdout.split() == [vol["Name"]]


def test_nested_mounts(store: Path, tmp_path: Path) -> None:
    """A mount inside another one is grafted onto it, whatever the order given (Docker's -v a:/x -v b:/x/y)."""
    mnt, outer, inner, ro = dirs(tmp_path, "mnt", "outer", "inner", "ro")
    (inner / "i").write_text("inner\n")
    args = ["--root", store, "--image", "base", "--name", "c", "-v", f"{inner}:/srv/data/deep/in"]
    with mounted(*args, "-v", f"{outer}:/srv/data", "-v", "vol:/srv/data/deep/in/v", mnt):
        data = mnt / "srv" / "data"
        assert (data / "deep" / "in" / "i").read_text() == "inner\n"
        assert (outer / "deep" / "in").is_dir() and not list((outer / "deep" / "in").iterdir())  # the point, empty
        assert (inner / "v").is_dir()  # the volume's point, made in the bind it sits in
        assert sorted(os.listdir(data / "deep" / "in")) == ["i", "v"]
        (data / "o").write_text("outer\n")
        (data / "deep" / "in" / "n").write_text("new\n")
        (data / "deep" / "in" / "v" / "w").write_text("vol\n")
        assert (outer / "o").exists() and (inner / "n").exists() and not (outer / "deep" / "in" / "n").exists()
        assert not (inner / "v" / "w").exists()  # in the named volume, not in the bind below it
        for a, b in ((data / "o", data / "deep" / "in" / "o"), (data / "deep" / "in" / "n", data / "n")):
            with pytest.raises(OSError) as e:
                os.rename(a, b)
            assert e.value.errno == errno.EXDEV
        for fn in (os.rmdir, os.unlink):
            with pytest.raises(OSError) as e:
                fn(data / "deep" / "in")
            assert e.value.errno in (errno.EBUSY, errno.EISDIR)
        with pytest.raises(OSError) as e:
            os.rename(data / "deep" / "in", data / "elsewhere")
        assert e.value.errno == errno.EBUSY
    # a missing mount point inside a read-only mount cannot be made: one line, no mount
    ro_args = ["--root", store, "--image", "base", "--name", "d", "-v", f"{ro}:/rox:ro", "-v", "w:/rox/sub"]
    r = um("mount", *ro_args, mnt)
    assert r.returncode != 0 and "missing inside a read-only mount" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)
    (ro / "sub").mkdir()
    with mounted(*ro_args, mnt):
        (mnt / "rox" / "sub" / "x").write_text("writable inside a read-only mount\n")
    # the point is the host's own directory, also where the outer mount's id map has no root
    (mapped,) = dirs(tmp_path, "mapped")
    binds = ["--mount", f"type=bind,source={mapped},target=/m,uidmap=184:1000:1", "--mount", "type=tmpfs,target=/m/t"]
    with mounted("--root", store, "--image", "base", "--name", "e", *binds, mnt):
        (mnt / "m" / "t" / "x").write_text("x\n")
        assert (mapped / "t").is_dir() and os.stat(mapped / "t").st_uid == 0


def test_two_mounts_share_a_volume(store: Path, tmp_path: Path) -> None:
    a, b = dirs(tmp_path, "a", "b")
    with (
        mounted("--root", store, "--image", "base", "--name", "ca", "-v", "shared:/shared", a),
        mounted("--root", store, "--image", "base", "--name", "cb", "-v", "shared:/shared", b),
    ):
        assert not (b / "shared" / "f").exists()  # a graft's missing names are not cached: the other may make them
        assert os.listdir(b / "shared") == [] and os.listdir(b / "shared") == []  # read twice: a listing is not kept
        (a / "shared" / "f").write_text("one\n")
        assert os.listdir(b / "shared") == ["f"]
        assert (b / "shared" / "f").read_text() == "one\n"
        (b / "shared" / "f").write_text("two, longer\n")
        assert (a / "shared" / "f").read_text() == "two, longer\n"  # the next open sees the other's write
        os.stat(a / "shared" / "f")
        os.chmod(b / "shared" / "f", 0o600)
        deadline = time.monotonic() + 3
        while os.stat(a / "shared" / "f").st_mode & 0o777 != 0o600:
            assert time.monotonic() < deadline, "attribute change not visible through the other mount"
            time.sleep(0.1)


def test_volumes_from_a_container_that_is_not_mounted(store: Path, tmp_path: Path) -> None:
    mnt, host = dirs(tmp_path, "mnt", "host")
    with mounted("--root", store, "--image", "base", "--name", "src", "-v", "v1:/v1", "-v", f"{host}:/h", mnt):
        (mnt / "v1" / "f").write_text("from src\n")
        (mnt / "h" / "g").write_text("bound\n")
    with mounted("--root", store, "--image", "base", "--name", "dst", "--volumes-from", "src:ro", mnt):
        assert (mnt / "v1" / "f").read_text() == "from src\n" and (mnt / "h" / "g").read_text() == "bound\n"
        with pytest.raises(OSError) as e:
            (mnt / "v1" / "new").write_text("x")
        assert e.value.errno == errno.EROFS
    with mounted("--root", store, "--image", "base", "--name", "dst2", "--volumes-from", "src", mnt):
        (mnt / "v1" / "rw").write_text("y\n")
    assert (store / "volumes" / "v1" / "_data" / "rw").exists()


def test_uid_map_on_a_bind_the_seed_case(store: Path, tmp_path: Path) -> None:
    (host,) = dirs(tmp_path, "mongo")
    mnt = Path(tempfile.mkdtemp(prefix="um-seed."))  # uid 184 must reach it (pytest's tmp dirs are 0700)
    mnt.chmod(0o755)
    os.chown(host, 1000, 1000)
    (host / "stranger").write_text("x\n")
    os.chown(host / "stranger", 5, 5)
    spec = f"type=bind,source={host},target=/var/lib/mongodb,uidmap=184:1000:1,gidmap=184:1000:1"
    with mounted("--root", store, "--image", "base", "--name", "db", "--mount", spec, mnt):
        db = mnt / "var" / "lib" / "mongodb"
        st = os.stat(db)
        assert (st.st_uid, st.st_gid) == (184, 184)
        assert (os.stat(db / "stranger").st_uid, os.stat(db / "stranger").st_gid) == (65534, 65534)
        r = subprocess.run(
            ["setpriv", "--reuid", "184", "--regid", "184", "--clear-groups", "sh", "-c", f"echo w > {db}/made"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (os.stat(db / "made").st_uid, os.stat(db / "made").st_gid) == (184, 184)
        with pytest.raises(OSError) as e:
            os.chown(db / "made", 4242, -1)
        assert e.value.errno == errno.EINVAL
    mnt.rmdir()
    made = os.stat(host / "made")
    assert (made.st_uid, made.st_gid) == (1000, 1000)


def test_uid_map_for_the_whole_mount(tmp_path: Path) -> None:
    low, up, work, mnt = dirs(tmp_path, "low", "up", "work", "mnt")
    (low / "f").write_text("x\n")
    os.chown(low / "f", 100005, 100005)
    os.chown(low, 100000, 100000)
    os.chown(up, 100000, 100000)  # the root shows the upper dir (as in overlayfs)
    with mounted("--lower", low, "--upper", up, "--work", work, "--uidmap", "0:100000:65536", "--gidmap",
                 "0:100000:65536", mnt):  # fmt: skip
        assert (os.stat(mnt).st_uid, os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid) == (0, 5, 5)
        (mnt / "new").write_text("y\n")
        os.chown(mnt / "f", 7, 8)
        assert (os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid) == (7, 8)
    assert (os.stat(up / "new").st_uid, os.stat(up / "new").st_gid) == (100000, 100000)
    assert (os.stat(up / "f").st_uid, os.stat(up / "f").st_gid) == (100007, 100008)


BAD = [
    (["-v", "relative/dir:/x"], "is relative"),
    (["-v", "./dir:/x"], "is relative"),
    (["-v", "vol:x"], "not an absolute path"),
    (["-v", "vol:/etc/motd"], "mount target /etc/motd is not a directory in the image"),
    (["-v", "a:/x", "-v", "b:/x"], "two mounts on /x"),
    (["-v", "a:/x:bogus"], "unknown volume option 'bogus'"),
    (["--mount", "type=foo,target=/x"], "unknown mount type 'foo'"),
    (["--mount", "type=volume,target=/x,bogus=1"], "unknown --mount option 'bogus'"),
    (["--mount", "type=bind,target=/x"], "needs source="),
    (["--mount", "type=bind,source=/nonexistent-dir,target=/x"], "not an existing directory"),
    (["--uidmap", "0:1000:10", "--uidmap", "5:2000:1"], "overlap"),
    (["--uidmap", "0:1000:10", "--uidmap", "20:1005:1"], "overlap on the outside side"),
    (["--gidmap", "1:2"], "not INSIDE:OUTSIDE:COUNT"),
    (["--volumes-from", "nope"], "no container 'nope'"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_specs(args: list[str], needle: str, store: Path, tmp_path: Path) -> None:
    (mnt,) = dirs(tmp_path, "mnt")
    r = um("mount", "--root", store, "--image", "base", "--name", "c", *args, mnt)
    try:
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)


def test_a_volume_in_use_by_a_live_mount_is_not_removed(store: Path, tmp_path: Path) -> None:
    """Plain-directory and container mounts alike hold their volumes: rm and prune refuse; a dead daemon does not."""
    lower, upper, work, mnt, cmnt = dirs(tmp_path, "l", "u", "w", "mnt", "cmnt")
    assert um("volume", "--root", store, "create", "keep").returncode == 0
    plain = ("--root", store, "--lower", lower, "--upper", upper, "--work", work, "-v", "keep:/data", mnt)
    with mounted(*plain), mounted("--root", store, "--image", "base", "--name", "c", "-v", "keep:/k", cmnt):
        (mnt / "data" / "f").write_text("precious\n")
        for args in (("rm", "keep"), ("rm", "-f", "keep")):
            r = um("volume", "--root", store, *args)
            assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert f"in use by container(s) c and the mount(s) at {mnt}" in r.stderr, r.stderr
        assert "keep" not in um("volume", "--root", store, "prune", "-a").stdout.split()
        (info,) = json.loads(um("volume", "--root", store, "inspect", "keep").stdout)
        assert info["UsedBy"] == ["c", str(mnt)]
        assert (mnt / "data" / "f").read_text() == "precious\n"
        assert (cmnt / "k" / "f").read_text() == "precious\n"
    assert um("container", "--root", store, "rm", "c").returncode == 0
    r = um("mount", *plain)  # a daemon killed with -9 leaves a lease nobody holds: it no longer counts
    assert r.returncode == 0, r.stderr
    try:
        pid = int(subprocess.run(["getfattr", "--only-values", "-n", "user.unionmount.pid", str(mnt)],
                                 capture_output=True, text=True, check=True).stdout)  # fmt: skip
        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        force_unmount(mnt)
    assert um("volume", "--root", store, "rm", "keep").returncode == 0
    assert not (store / "volumes" / "keep").exists()


def _stacked(path: Path) -> int:
    """How many mounts sit on ``path``."""
    with open("/proc/self/mountinfo") as f:
        return sum(line.split()[4] == str(path) for line in f)


def test_local_driver_tmpfs_is_mounted_while_used_and_shared(store: Path, tmp_path: Path) -> None:
    """`-o type=tmpfs`: mounted when the first user starts, shared, unmounted after the last; a crash is swept."""
    lower, u1, w1, m1, u2, w2, m2 = dirs(tmp_path, "l", "u1", "w1", "m1", "u2", "w2", "m2")
    r = um("volume", "--root", store, "create", "scratch", "-o", "type=tmpfs", "-o", "device=tmpfs",
           "-o", "o=size=64m,uid=1000")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = store / "volumes" / "scratch" / "_data"
    assert _stacked(data) == 0  # nothing is mounted before a container needs it
    with (
        mounted("--root", store, "--image", "base", "--name", "c", "-v", "scratch:/s", m1),
        mounted("--root", store, "--lower", lower, "--upper", u2, "--work", w2, "-v", "scratch:/s", m2),
    ):
        assert _stacked(data) == 1
        opts = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(data)], capture_output=True, text=True)
        assert opts.stdout.split()[0] == "tmpfs" and "size=65536k" in opts.stdout and "uid=1000" in opts.stdout
        (m1 / "s" / "f").write_text("shared\n")
        assert (m2 / "s" / "f").read_text() == "shared\n"
        assert os.stat(m2 / "s").st_uid == 1000
    assert _stacked(data) == 0  # the last user unmounted it
    # a daemon killed with -9 leaves the mount; the next volume command or mount sweeps it, never stacks it
    r = um("mount", "--root", store, "--lower", lower, "--upper", u1, "--work", w1, "-v", "scratch:/s", m1)
    assert r.returncode == 0, r.stderr
    pid = int(os.getxattr(m1, "user.unionmount.pid"))
    os.kill(pid, 9)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    force_unmount(m1)
    assert _stacked(data) == 1
    with mounted("--root", store, "--lower", lower, "--upper", u1, "--work", w1, "-v", "scratch:/s", m1):
        assert _stacked(data) == 1
    assert _stacked(data) == 0
    r = um("mount", "--root", store, "--lower", lower, "--upper", u1, "--work", w1, "-v", "scratch:/s", m1)
    pid = int(os.getxattr(m1, "user.unionmount.pid"))
    os.kill(pid, 9)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    force_unmount(m1)
    assert um("volume", "--root", store, "ls").returncode == 0
    assert _stacked(data) == 0
    assert um("volume", "--root", store, "rm", "-f", "scratch").returncode == 0  # (container c records it)


def test_local_driver_loop_ext4_keeps_its_data_in_the_image(store: Path, tmp_path: Path) -> None:
    (mnt,) = dirs(tmp_path, "mnt")
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    r = um("volume", "--root", store, "create", "disk", "-o", "type=ext4", "-o", f"device={img}", "-o", "o=loop")
    assert r.returncode == 0, r.stderr
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", "disk:/var/data", mnt):
        (mnt / "var" / "data" / "db").write_text("on the ext4 image\n")
        r = um("volume", "--root", store, "rm", "-f", "disk")
        assert r.returncode != 0 and "in use" in r.stderr
    assert _stacked(store / "volumes" / "disk" / "_data") == 0
    loops = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout
    assert loops == ""  # the loop device went with the unmount
    check = tmp_path / "check"
    check.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(img), str(check)], check=True)
    try:
        assert (check / "db").read_text() == "on the ext4 image\n"
    finally:
        force_unmount(check)
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", "disk:/var/data", mnt):
        assert (mnt / "var" / "data" / "db").read_text() == "on the ext4 image\n"


BAD_DRIVER_OPTIONS = [
    (["-o", "type=ext4"], "needs -o device"),
    (["-o", "device=/dev/sda"], "needs -o type"),
    (["-o", "type=ext4", "-o", "device=/nonexistent.img", "-o", "o=loop"], "is not a file"),
    (["-o", "type=Bad Type", "-o", "device=x"], "not a file system type"),
    (["-o", "type=tmpfs", "-o", "device=tmpfs", "-o", "size=1"], "unknown volume option 'size'"),
]


@pytest.mark.parametrize(("opts", "needle"), BAD_DRIVER_OPTIONS, ids=[" ".join(o) for o, _ in BAD_DRIVER_OPTIONS])
def test_local_driver_bad_options(opts: list[str], needle: str, store: Path) -> None:
    r = um("volume", "--root", store, "create", "v", *opts)
    assert r.returncode != 0 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert um("volume", "--root", store, "inspect", "v").returncode != 0


def test_a_volume_that_cannot_be_mounted_fails_the_mount_cleanly(store: Path, tmp_path: Path) -> None:
    (mnt,) = dirs(tmp_path, "mnt")
    r = um("volume", "--root", store, "create", "gone", "-o", "type=ext4", "-o", "device=/dev/nonexistent-disk")
    assert r.returncode == 0, r.stderr
    r = um("mount", "--root", store, "--image", "base", "--name", "c", "-v", "gone:/d", mnt)
    assert r.returncode != 0 and "cannot mount volume 'gone'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not is_mounted(mnt)
    assert _stacked(store / "volumes" / "gone" / "_data") == 0
    (info,) = json.loads(um("volume", "--root", store, "inspect", "gone").stdout)
    assert info["UsedBy"] == []  # no lease, no container left behind
    assert um("volume", "--root", store, "rm", "gone").returncode == 0


def test_selinux_relabel_flags_are_accepted_where_selinux_is_off(store: Path, tmp_path: Path) -> None:
    """`:z`, `:Z` and `--mount ...,z` relabel where SELinux is enabled; this kernel has it off: they change nothing."""
    from unionfs.daemon.grafts import selinux_enabled

    assert not selinux_enabled()  # (this machine's kernel has SELinux built in but not enabled)
    mnt, host = dirs(tmp_path, "mnt", "host")
    before = subprocess.run(["getfattr", "-d", "-m", "-", str(host)], capture_output=True, text=True).stdout
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", f"{host}:/h:z", "-v", "vz:/v:Z",
                 "--mount", f"type=bind,source={host},target=/h2,z", mnt):  # fmt: skip
        (mnt / "h" / "f").write_text("x")
        assert (mnt / "h2" / "f").read_text() == "x"
    assert subprocess.run(["getfattr", "-d", "-m", "-", str(host)], capture_output=True, text=True).stdout == before


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """An SSH server on loopback for root with a key of its own: (port, private key, a shared directory)."""
    d = tmp_path / "ssh"
    (d / "share").mkdir(parents=True)
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nPidFile {d / 'pid'}\n"
        "Subsystem sftp internal-sftp\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "log")], check=True)
    try:
        deadline = time.monotonic() + 10
        while not (d / "pid").exists():
            assert time.monotonic() < deadline, "sshd did not start"
            time.sleep(0.05)
        yield port, d / "user", d / "share"
    finally:
        if (d / "pid").exists():
            os.kill(int((d / "pid").read_text()), 15)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_driver_mounts_through_a_helper_sshfs(sshd: tuple[int, Path, Path], store: Path, tmp_path: Path) -> None:
    """`-o type=fuse.sshfs -o device=user@host:/dir`: mount(8) runs mount.fuse.sshfs; the data lands remotely."""
    port, key, share = sshd
    (mnt,) = dirs(tmp_path, "mnt")
    o = f"o=port={port},IdentityFile={key},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null"
    device = f"device=root@127.0.0.1:{share}"
    r = um("volume", "--root", store, "create", "remote", "-o", "type=fuse.sshfs", "-o", device, "-o", o)
    assert r.returncode == 0, r.stderr
    data = store / "volumes" / "remote" / "_data"
    with mounted("--root", store, "--image", "base", "--name", "c", "-v", "remote:/srv", mnt):
        assert _stacked(data) == 1
        (mnt / "srv" / "report.txt").write_text("over ssh\n")
    assert (share / "report.txt").read_text() == "over ssh\n"
    assert _stacked(data) == 0
