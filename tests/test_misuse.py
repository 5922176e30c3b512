"""Bad names and options on the command line: one line on stderr, a non-zero exit, nothing written or left behind."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import msgpack
import pytest

from .images import um
from .mounts import force_unmount, is_mounted
from .tree import store_digest


@pytest.fixture
def store(image: Path, tmp_path: Path) -> Path:
    s = tmp_path / "store"
    assert um("image", "--root", s, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    assert um("volume", "--root", s, "create", "v").returncode == 0
    return s


L300, L600 = "a" * 300, "a" * 600
BAD: list[tuple[list[str], str]] = [
    (["mount", "--image", "base", "--name", L300, "MNT"], "is 300 characters long"),
    (["mount", "--image", "base", "--name", "", "MNT"], "name cannot be empty"),
    (["mount", "--image", "base", "--name=.x", "MNT"], "invalid container name"),
    (["container", "rm", ""], "no container ''"),
    (["container", "inspect", L600], "no container"),
    (["volume", "rm", ""], "no volume ''"),
    (["volume", "inspect", L600], "no volume"),
    (["export", "", "OUT"], "no container ''"),
    (["diff", ""], "no container ''"),
    (["image", "tag", "base", L600], "longer than 255 characters"),
    (["image", "tag", "base", "x:" + L600], "invalid image name"),
    (["image", "tag", "base", ""], "invalid image name ''"),
    (["image", "inspect", L600], "no image"),
    (["image", "rm", L600], "no image"),
    (["image", "rm", ""], "no image"),
    (["volume", "create", L300], "is 300 characters long"),
    (["volume", "create", "a/b"], "invalid volume name"),
    (["mount", "--image", "base", "-v", f"{L300}:/data", "MNT"], "is 300 characters long"),
    (["mount", "--image", "base", "--mount", "type=tmpfs,target=/t,tmpfs-size=abc", "MNT"], "not a size"),
    (["mount", "--image", "base", "--mount", "type=tmpfs,target=/t,tmpfs-mode=99999", "MNT"], "not an octal mode"),
    (["mount", "--image", "base", "--mount", "type=bind,source=/tmp,target=/t,tmpfs-size=1m", "MNT"], "for type=tmpfs"),
    (["mount", "--image", "base", "--uidmap", "4294967295:0:1", "MNT"], "out of range"),
    (["mount", "--image", "base", "--gidmap", "0:4294967295:1", "MNT"], "out of range"),
    (["mount", "--image", "base", "--volumes-from", "nosuch", "MNT"], "no container 'nosuch'"),
    (["mount", "--image", "base", "-v", "fresh:/fresh", "--volumes-from", "nosuch", "MNT"], "no container 'nosuch'"),
    (
        ["mount", "--image", "base", "-v", "fresh:/fresh", "--mount", "type=bind,source=/nonexistent,target=/x", "MNT"],
        "not an existing directory",
    ),  # fmt: skip
    (["image", "import", "oci:IMAGE/img:t", "--tag", ""], "invalid image name ''"),
    (["image", "import", "oci:IMAGE/img:t", "--tag", "UPPER:1"], "invalid image name"),
    (["image", "save", "base", "docker-archive:OUT:Bad:tag:x"], "invalid image name"),
    (["image", "save", "base", "docker-archive:OUT:BAD"], "invalid image name"),
    (["image", "save", "base", "oci:OUT:bad ref"], "not a valid reference name"),
    (["commit", "nosuch", "--tag", ""], "invalid image name ''"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(
    args: list[str], needle: str, store: Path, image: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "out"
    subst = {"MNT": str(mnt), "OUT": str(out)}
    argv = [subst.get(a, a).replace("IMAGE", str(image)).replace("OUT", str(out)) for a in args]
    before = store_digest(store)
    try:
        r = um(argv[0], "--root", store, *argv[1:])
        assert r.returncode != 0, r.stdout
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
    assert store_digest(store) == before  # no half-made container, volume or image is left
    assert not out.exists()


def test_records_from_before_names_were_checked_can_be_listed_checked_and_removed(store: Path) -> None:
    """A 300-character container name written by an older version: ls, prune and rm work; store check reports it."""
    env = lmdb.open(str(store / "meta"), max_dbs=16)
    db = env.open_db(b"containers")
    image_id = json.loads(um("image", "--root", store, "inspect", "base").stdout)["Id"]
    with env.begin(write=True) as txn:
        txn.put(L300.encode(), msgpack.packb({"image": image_id, "created": 0.0}), db=db)
    env.close()
    r = um("container", "--root", store, "ls", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert [c["Name"] for c in json.loads(r.stdout)] == [L300]
    r = um("store", "--root", store, "check")
    assert r.returncode != 0 and "has an invalid name" in r.stdout + r.stderr, r.stdout + r.stderr
    r = um("container", "--root", store, "prune")
    assert r.returncode == 0, r.stderr
    assert json.loads(um("container", "--root", store, "ls", "--format", "json").stdout) == []
    r = um("store", "--root", store, "check")
    assert r.returncode == 0, r.stdout + r.stderr
