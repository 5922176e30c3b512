"""unionmount run by a plain user (uid 1000 through setpriv), with its own store.

FUSE mounts by a plain user go through the setuid ``fusermount3``; this
machine's ``/dev/fuse`` is 0600, so the fixture opens it up (0666, Debian's
own default) for the test and puts it back. The daemon runs under Debian's
``/usr/bin/python3`` (the venv's interpreter lives under /root) with the
venv's packages on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER = 1000
PY = "/usr/bin/python3"


@pytest.fixture
def home() -> Iterator[Path]:
    """A world-traversable directory owned by the plain user, and /dev/fuse usable by it."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    d = Path(tempfile.mkdtemp(prefix="um-rootless."))
    d.chmod(0o755)
    os.chown(d, USER, USER)
    try:
        yield d
    finally:
        for m in ("mnt", "plain/m"):
            subprocess.run(["fusermount3", "-u", "-z", str(d / m)], capture_output=True)
        os.chmod("/dev/fuse", mode)
        shutil.rmtree(d, ignore_errors=True)


def user_run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command as the plain user (a mount of the user's is closed to root without allow_other)."""
    env = {
        "HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{sysconfig.get_paths()['purelib']}:{ROOT}",
        "XDG_RUNTIME_DIR": str(home),
    }
    cmd = ["setpriv", "--reuid", str(USER), "--regid", str(USER), "--clear-groups", *args]
    return subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=120)


def as_user(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``unionmount ARGS`` as the plain user (Debian's python3, the venv's packages)."""
    return user_run(home, PY, "-m", "unionfs", *args)


FIND = "%P %U %G %m %y %l\\n"  # (no size: a directory's differs by filesystem)


def listing(lines: str, skip: str = "") -> set[str]:
    return {ln for ln in lines.splitlines() if ln and not (skip and ln.startswith(skip))}


def user_stat(home: Path, path: Path) -> tuple[int, int, int]:
    r = user_run(home, "stat", "-c", "%u %g %f", str(path))
    assert r.returncode == 0, r.stderr
    uid, gid, mode = r.stdout.split()
    return int(uid), int(gid), int(mode, 16)


def test_same_python_abi() -> None:
    out = subprocess.run([PY, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert out.stdout.strip() == str(sys.version_info[:2]), "the rootless tests need Debian's python3 = the venv's"


def user_layout(image: Path, home: Path) -> Path:
    """The test image's layout and a mount point ``mnt``, both the plain user's, in ``home``."""
    layout = home / "layout"
    shutil.copytree(image / "img", layout)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(layout)], check=True)
    (home / "mnt").mkdir()
    os.chown(home / "mnt", USER, USER)
    return layout


def test_plain_user_mounts_an_image_with_a_volume(image: Path, home: Path) -> None:
    layout = user_layout(image, home)
    r = as_user(home, "image", "--root", "store", "import", f"oci:{layout}:t", "--tag", "app")
    assert r.returncode == 0, r.stderr
    assert os.stat(home / "store" / "meta").st_uid == USER
    r = as_user(home, "mount", "--root", "store", "--image", "app", "--name", "c", "--image-volumes", "ignore",
                "-v", "mine:/vol", "--log", "log", "mnt")  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        # owners, modes, types, sizes, targets exactly as in the image, though the user could set none of
        # them (d/sub is mode 0700, root's: the user sees it but not into it)
        seen = user_run(home, "find", "mnt", "-printf", FIND).stdout
        ref = subprocess.run(["find", str(image / "ref" / "rootfs"), "-printf", FIND], capture_output=True, text=True)
        assert listing(seen, "vol") == listing(ref.stdout, "d/sub/")
        assert user_stat(home, home / "mnt" / "vol")[0] == USER
        w = user_run(home, "sh", "-c", "echo data > mnt/vol/f && echo more >> mnt/d/keep")
        assert w.returncode == 0, w.stderr
        uid, _, mode = user_stat(home, home / "mnt" / "d" / "keep")  # copied up
        assert uid == USER and mode & 0o755 == 0o755  # (the write drops setuid, as on any filesystem)
    finally:
        as_user(home, "umount", "mnt")
    assert (home / "store" / "volumes" / "mine" / "_data" / "f").read_text() == "data\n"
    assert "ERROR" not in (home / "log").read_text()


def test_plain_user_copy_up_keeps_foreign_owner_in_override_xattr(home: Path) -> None:
    plain = home / "plain"
    for d in ("l", "u", "w", "m"):
        (plain / d).mkdir(parents=True)
    (plain / "l" / "f").write_text("lower\n")
    os.chown(plain / "l" / "f", 5, 6)
    os.chmod(plain / "l" / "f", 0o666)
    for d in ("u", "w", "m"):
        os.chown(plain / d, USER, USER)
    os.chown(plain, USER, USER)
    r = as_user(home, "mount", "--lower", "plain/l", "--upper", "plain/u", "--work", "plain/w", "plain/m")
    assert r.returncode == 0, r.stderr
    try:
        w = user_run(home, "sh", "-c", "echo more >> plain/m/f")
        assert w.returncode == 0, w.stderr
        uid, gid, mode = user_stat(home, plain / "m" / "f")
        assert (uid, gid, mode & 0o777) == (5, 6, 0o666)
        x = user_run(home, "getfattr", "-d", "-m", "-", "plain/m/f")
        assert "override_stat" not in x.stdout  # kept out of sight
    finally:
        as_user(home, "umount", "plain/m")
    up = plain / "u" / "f"
    assert os.stat(up).st_uid == USER  # on disk the user's; the owner it should have is in the xattr
    assert os.getxattr(up, "user.containers.override_stat") == b"5:6:0666:file"


def test_plain_user_pulls_with_podmans_login_file(image: Path, home: Path, tmp_path: Path) -> None:
    """Rootless podman keeps its login in $XDG_RUNTIME_DIR/containers/auth.json; a pull finds it there."""
    from .registry import auth_file, registry

    with registry(tmp_path / "reg", "htpasswd") as reg:
        reg.push(f"oci:{image}/img:t", "app:1")
        (home / "containers").mkdir()
        auth_file(home / "containers" / "auth.json", reg.host)
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(home / "containers")], check=True)
        r = as_user(home, "image", "--root", "store", "pull", f"{reg.host}/app:1")
        assert r.returncode == 0, r.stderr
    (home / "mnt").mkdir()
    os.chown(home / "mnt", USER, USER)
    r = as_user(home, "mount", "--root", "store", "--image", f"{reg.host}/app:1", "--image-volumes", "ignore", "mnt")
    assert r.returncode == 0, r.stderr
    try:
        seen = user_run(home, "find", "mnt", "-printf", FIND).stdout
        ref = subprocess.run(["find", str(image / "ref" / "rootfs"), "-printf", FIND], capture_output=True, text=True)
        assert listing(seen, "d/sub/") == listing(ref.stdout, "d/sub/")  # (d/sub is 0700, root's)
    finally:
        as_user(home, "umount", "mnt")


def test_plain_user_in_a_user_namespace_gets_a_store_of_its_own(image: Path, home: Path) -> None:
    """Inside `unshare -r` the user is uid 0 but still not root: the default store is in its home, not /var/lib."""
    layout = user_layout(image, home)
    um = f"{PY} -m unionfs"
    script = (
        f"{um} image import oci:{layout}:t --tag app && {um} mount --image app --name c --image-volumes ignore mnt"
        f" && echo hi > mnt/new && {um} diff c && {um} umount mnt && {um} store check"
    )
    r = user_run(home, "unshare", "-rm", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert "A /new" in r.stdout and "store is consistent" in r.stdout
    assert (home / ".local" / "share" / "unionmount" / "meta").is_dir()
    assert os.stat(home / ".local" / "share" / "unionmount" / "meta").st_uid == USER
