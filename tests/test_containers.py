"""Containers: diff, commit, image save, export, ls/rm/prune, and a daemon killed mid-write.

Oracles are independent of our code: ``diff`` is checked against a comparison
of the mounted tree with ``umoci unpack`` of the image; commit, save and export
are checked by mounting, unpacking (umoci, skopeo) or extracting (GNU tar) what
they wrote and comparing it with what the container's mount showed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from unionfs.cli import containers

from .images import image_mount, sh, um
from .mounts import daemon_pid, force_unmount, is_mounted
from .tree import view


def state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Per path: what ``docker diff`` compares (type, mode, owner, size and links, content, target, xattrs, mtime)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            xattrs = sorted(
                (x, os.getxattr(p, x, follow_symlinks=False)) for x in os.listxattr(p, follow_symlinks=False)
            )
            size = None if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_nlink)
            out["/" + os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                size,
                body,
                xattrs,
                int(st.st_mtime),
            )
    return out


def expected_diff(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    """docker diff's rules, from two path states: top-most deletions, additions, changes, changed parents."""
    out: dict[str, str] = {}
    for p in before.keys() - after.keys():
        if os.path.dirname(p) in after or os.path.dirname(p) == "/":
            out[p] = "D"
    for p in after.keys() - before.keys():
        out[p] = "A"
    for p in after.keys() & before.keys():
        a, b = after[p], before[p]
        if stat.S_IFMT(a[0]) != stat.S_IFMT(b[0]):
            out[p] = "C"
        elif a != b:
            out[p] = "C"
    for p in list(out):
        parent = os.path.dirname(p)
        while parent != "/":
            out.setdefault(parent, "C")
            parent = os.path.dirname(parent)
    return [f"{k} {p}" for p, k in sorted(out.items(), key=lambda kv: kv[0].split("/"))]


def change_things(mnt: Path) -> None:
    """Every kind of change a container layer records."""
    (mnt / "etc" / "motd").write_text("changed\n")  # copy-up of a hard-linked file (motd.hard follows)
    os.chmod(mnt / "d" / "keep", 0o700)  # metadata only (metacopy)
    os.chown(mnt / "d" / "fifo", 7, 8)
    os.unlink(mnt / "d" / "abs-link")  # a deleted file
    shutil.rmtree(mnt / "gone")  # a deleted directory
    shutil.rmtree(mnt / "usr" / "share" / "apt", ignore_errors=True)
    (mnt / "usr" / "share" / "apt").mkdir()  # opaque: deleted and re-created
    (mnt / "usr" / "share" / "apt" / "fresh").write_text("fresh\n")
    os.rename(mnt / "usr" / "share" / "bash", mnt / "usr" / "share" / "bash-doc")  # a renamed directory
    (mnt / "new" / "deep").mkdir(parents=True)  # an added tree
    (mnt / "new" / "deep" / "file").write_bytes(os.urandom(5000))
    os.symlink("../etc/motd", mnt / "new" / "link")
    os.link(mnt / "d" / "sub" / ("n" * 200), mnt / "new" / "hard")
    os.setxattr(mnt / "d" / "sub", "user.color", b"red")
    (mnt / "r").unlink()
    (mnt / "r").mkdir()  # a file replaced by a directory
    (mnt / "r" / "inside").write_text("x\n")


def blob_count(store: Path) -> int:
    return sum(1 for p in (store / "blobs").rglob("*") if p.is_file())


def test_diff_commit_save_roundtrip(image: Path, tmp_path: Path) -> None:
    store, mnt, mnt2 = tmp_path / "store", tmp_path / "mnt", tmp_path / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "c1", mnt, tmp_path / "log"):
        change_things(mnt)
        seen = view(mnt)
        after = state(mnt)
        # diff while mounted, and the same after unmounting
        live = um("diff", "--root", store, "c1")
    assert live.returncode == 0, live.stderr
    r = um("diff", "--root", store, "c1")
    assert r.stdout == live.stdout
    assert r.stdout.splitlines() == expected_diff(state(image / "ref" / "rootfs"), after)
    # commit: a new image that mounts as the container did; files already stored are not stored again
    blobs = blob_count(store)
    r = um("commit", "--root", store, "c1", "--tag", "app:1", "--message", "changes")
    assert r.returncode == 0, r.stderr
    assert blob_count(store) == blobs + 3  # motd's new text, new/deep/file, apt/fresh ("x\n" and the rest exist)
    info = json.loads(um("image", "--root", store, "inspect", "app:1").stdout)
    assert len(info["Layers"]) == 4 and info["Config"]["history"][-1]["comment"] == "changes"
    with image_mount(store, "app:1", "c2", mnt2):
        assert view(mnt2) == seen
        assert um("diff", "--root", store, "c2").stdout == ""
    # save as an OCI layout: skopeo reads it, umoci unpacks exactly what the mount showed
    out = tmp_path / "out"
    r = um("image", "--root", store, "save", "app:1", f"oci:{out}:v1")
    assert r.returncode == 0, r.stderr
    skopeo = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:v1"], capture_output=True, check=True).stdout)
    assert len(skopeo["Layers"]) == 4
    sh(f"umoci unpack --image {out}:v1 {tmp_path / 'unpacked'}", tmp_path)
    assert view(tmp_path / "unpacked" / "rootfs") == seen
    top = Path(out / "blobs" / "sha256" / skopeo["Layers"][-1][7:])
    with tarfile.open(top) as t:
        names = t.getnames()
    assert "d/.wh.abs-link" in names and "gone" not in names and ".wh.gone" in names
    assert "usr/share/apt/.wh..wh..opq" in names and "usr/share/.wh.bash" in names
    # and as a docker archive and an oci-archive (the layout as one tar): skopeo converts each
    archive, oci_tar = tmp_path / "app.tar", tmp_path / "app-oci.tar"
    for transport, path in (("docker-archive", archive), ("oci-archive", oci_tar)):
        assert um("image", "--root", store, "save", "app:1", f"{transport}:{path}").returncode == 0
        sh(f"skopeo copy {transport}:{path} oci:c-{transport}:x && umoci unpack --image c-{transport}:x u", tmp_path)
        assert view(tmp_path / "u" / "rootfs") == seen
        shutil.rmtree(tmp_path / "u")
    # podman loads all three (its own storage here, vfs driver)
    runroot = tempfile.mkdtemp(prefix="pdr.")  # podman wants a short runroot path
    podman = ["podman", "--root", str(tmp_path / "pd"), "--runroot", runroot, "--storage-driver", "vfs"]
    try:
        for src in (archive, out, oci_tar):
            r = subprocess.run([*podman, "load", "-i", str(src)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
        r = subprocess.run([*podman, "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True)
        assert "localhost/app:1" in r.stdout.split(), r.stdout
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    r = um("image", "--root", tmp_path / "store2", "import", f"docker-archive:{archive}")
    assert r.returncode == 0 and r.stdout.startswith("app:1 "), r.stdout + r.stderr


def test_commit_unchanged_and_twice(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "c", mnt):
        pass
    assert um("diff", "--root", store, "c").stdout == ""
    assert um("commit", "--root", store, "c", "--tag", "same:1").returncode == 0
    with image_mount(store, "base", "c", mnt):
        (mnt / "one").write_text("1\n")
    assert um("commit", "--root", store, "c", "--tag", "same:2").returncode == 0
    layers = [
        len(json.loads(um("image", "--root", store, "inspect", t).stdout)["Layers"]) for t in ("same:1", "same:2")
    ]
    assert layers == [4, 4]  # each commit adds one layer to the container's image
    out = tmp_path / "o"
    assert um("image", "--root", store, "save", "same:1", f"oci:{out}:x").returncode == 0
    desc = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:x"], capture_output=True, check=True).stdout)
    with tarfile.open(out / "blobs" / "sha256" / desc["Layers"][-1][7:]) as t:
        assert t.getnames() == []  # an unchanged container commits an empty layer
    # committing twice: the second commit's image has both layers
    with image_mount(store, "same:2", "c2", mnt):
        (mnt / "two").write_text("2\n")
    assert um("commit", "--root", store, "c2", "--tag", "same:3").returncode == 0
    info = json.loads(um("image", "--root", store, "inspect", "same:3").stdout)
    assert len(info["Layers"]) == 5
    with image_mount(store, "same:3", "c3", mnt):
        assert (mnt / "one").read_text() == "1\n" and (mnt / "two").read_text() == "2\n"


def test_export_is_the_mounted_tree(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "c", mnt):
        change_things(mnt)
        seen = view(mnt)
        r = um("export", "--root", store, "c", tmp_path / "c.tar")
        assert r.returncode == 0, r.stderr
    # umoci unpacks the tar as the one layer of an image (GNU tar would drop the ACL xattrs)
    sh("umoci init --layout e && umoci new --image e:x && umoci raw add-layer --image e:x c.tar", tmp_path)
    sh("umoci unpack --image e:x out", tmp_path)
    assert view(tmp_path / "out" / "rootfs") == seen
    with tarfile.open(tmp_path / "c.tar") as t:
        assert not [n for n in t.getnames() if ".wh." in n]


def test_export_of_a_mounted_container_has_writes_still_in_the_kernels_cache(image: Path, tmp_path: Path) -> None:
    """With the writeback cache a write may sit in the kernel; export syncs the mount before it reads."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "c", mnt):
        with open(mnt / "open.bin", "wb") as f:
            f.write(b"w" * 300_000)
            f.flush()  # to the kernel; the file stays open, nothing has asked for it to be written back
            # in-process, so that the export starts before the kernel's own writeback (within a second)
            assert containers.export(str(store), "c", str(tmp_path / "c.tar")) == 0
        with tarfile.open(tmp_path / "c.tar") as t:
            member = t.extractfile("open.bin")
            assert member is not None and member.read() == b"w" * 300_000


def test_container_ls_lock_rm_prune(image: Path, tmp_path: Path) -> None:
    store, mnt, other = tmp_path / "store", tmp_path / "mnt", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "web", mnt):
        (mnt / "payload").write_bytes(b"x" * 100_000)
        r = um("mount", "--root", store, "--image", "base", "--name", "web", other)
        assert r.returncode != 0 and "already mounted at" in r.stderr and not is_mounted(other)
        rows = json.loads(um("container", "--root", store, "ls", "--format", "json").stdout)
        assert [(c["Name"], c["Image"], c["MountedAt"]) for c in rows] == [("web", "base:latest", str(mnt))]
        assert rows[0]["Size"] >= 100_000
        assert "web" in um("container", "--root", store, "ls").stdout
        r = um("container", "--root", store, "rm", "web")
        assert r.returncode != 0 and "is mounted at" in r.stderr and len(r.stderr.splitlines()) == 1
        r = um("image", "--root", store, "rm", "base")
        assert r.returncode != 0 and "used by container" in r.stderr
        r = um("container", "--root", store, "rm", "-f", "web")
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
    assert not (store / "containers" / "web").exists()
    assert json.loads(um("container", "--root", store, "ls", "--format", "json").stdout) == []
    with image_mount(store, "base", "keep", mnt):
        with image_mount(store, "base", "old", other):
            pass
        r = um("container", "--root", store, "prune")
        assert r.stdout.split() == ["old"]
        info = json.loads(um("container", "--root", store, "inspect", "keep").stdout)
        assert info["MountedAt"] == str(mnt)
    r = um("container", "--root", store, "inspect", "nope")
    assert r.returncode != 0 and r.stderr.strip() == "unionmount: no container 'nope' (see 'unionmount container ls')"
    assert um("diff", "--root", store, "nope").returncode != 0


WRITER = """
import os, sys
mnt = sys.argv[1]
for i in range(100000):
    with open(f"{mnt}/w/f{i}", "wb") as f:
        f.write(str(i).encode() * 1000)
        f.flush()
        os.fsync(f.fileno())
    print(i, flush=True)
"""


def test_sigkill_during_writes(image: Path, tmp_path: Path) -> None:
    """fsync'ed files survive a SIGKILL of the daemon; after remount nothing half-copied shows and diff is right."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    assert um("mount", "--root", store, "--image", "base", "--name", "k", mnt).returncode == 0
    try:
        (mnt / "w").mkdir()
        writer = subprocess.Popen(
            ["python3", "-c", WRITER, str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        appender = subprocess.Popen(["bash", "-c", f"while :; do printf x >> {mnt}/d/sparse; done"])
        assert writer.stdout is not None
        done = [writer.stdout.readline() for _ in range(30)]
        os.kill(daemon_pid(mnt), signal.SIGKILL)
        time.sleep(0.2)
        writer.kill()
        appender.kill()
        rest = writer.stdout.read()
        synced = int((done + rest.splitlines())[-1])
        writer.wait()
        appender.wait()
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)
    with image_mount(store, "base", "k", mnt):
        for i in range(synced + 1):
            assert (mnt / "w" / f"f{i}").read_bytes() == str(i).encode() * 1000
        data = (mnt / "d" / "sparse").read_bytes()
        unit = 5 * 2**20 + 5  # the image's file, then the x's appended before the kill: never a partial copy
        assert data[:unit] == (image / "ref" / "rootfs" / "d" / "sparse").read_bytes()
        assert data[unit:] == b"x" * (len(data) - unit)
        lines = um("diff", "--root", store, "k").stdout.splitlines()
    assert "A /w" in lines and "A /w/f0" in lines and "C /d/sparse" in lines
    assert not [ln for ln in lines if "work" in ln or ".wh." in ln]


def test_diff_of_a_killed_container_checks_its_unsettled_copy_ups(image: Path, tmp_path: Path, ext4: Path) -> None:
    """A copy-up not yet settled when the daemon dies is checked by ``diff`` (as by the next mount): unmarked."""
    store, mnt = ext4 / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    assert um("mount", "--root", store, "--image", "base", "--name", "s", "-o", "settle=10000", mnt).returncode == 0
    try:
        with open(mnt / "d" / "sparse", "ab") as f:
            f.write(b"tail")
        os.kill(daemon_pid(mnt), signal.SIGKILL)
    finally:
        force_unmount(mnt)
    info = json.loads(um("container", "inspect", "--root", store, "s").stdout)
    info = info[0] if isinstance(info, list) else info
    upper, work = Path(info["UpperDir"]), Path(info["WorkDir"])
    assert (work / "unsettled").exists()
    assert os.getxattr(upper / "d" / "sparse", "trusted.unionmount.unsettled")
    lines = um("diff", "--root", store, "s").stdout.splitlines()
    assert "C /d/sparse" in lines
    assert not (work / "unsettled").exists()
    with pytest.raises(OSError):
        os.getxattr(upper / "d" / "sparse", "trusted.unionmount.unsettled")
    data = (upper / "d" / "sparse").read_bytes()
    assert data[:-4] == (image / "ref" / "rootfs" / "d" / "sparse").read_bytes() and data[-4:] == b"tail"


@pytest.mark.parametrize("bad", [("diff",), ("commit", "c"), ("export",)])
def test_container_commands_need_a_container(bad: tuple[str, ...], tmp_path: Path) -> None:
    args = [bad[0], "--root", str(tmp_path / "s"), *bad[1:]]
    if bad[0] == "commit":
        args += ["--tag", "x:1"]
    elif bad[0] == "export":
        args += ["c", str(tmp_path / "o.tar")]
    else:
        args += ["c"]
    r = um(*args)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
