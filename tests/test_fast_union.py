"""Fast tier: the union's rules on temporary directories, called directly (no FUSE, no mount), the
override xattr's codec, and the architecture's one rule an import graph cannot see (who prints).
"""

from __future__ import annotations

import ast
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from unionfs.union import override
from unionfs.union.fs import Options, UnionFS
from unionfs.union.inodes import ROOT_INO
from unionfs.union.records import Attrs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def union(tmp_path: Path) -> Iterator[UnionFS]:
    """Two lower layers and an upper one: ``a`` only below, ``b`` in both lowers (top wins), ``c`` only
    above, directory ``d`` merged from both lowers."""
    top, bottom, up, work = (tmp_path / n for n in ("top", "bottom", "up", "work"))
    for d in (top / "d", bottom / "d", up, work):
        d.mkdir(parents=True)
    (top / "a").write_text("a")
    (top / "b").write_text("top b")
    (bottom / "b").write_text("bottom")
    (bottom / "d" / "x").write_text("x")
    (top / "d" / "y").write_text("y")
    (up / "c").write_text("c")
    fs = UnionFS(Options((str(top), str(bottom)), str(up), str(work)))
    trio.run(fs.prepare)
    yield fs
    fs.close()


def _listing(fs: UnionFS, ino: int) -> dict[bytes, Attrs]:
    opened = fs.opendir(ino)
    out: dict[bytes, Attrs] = {}
    fs.readdir(opened.fh, 0, lambda name, a, nxt: out.setdefault(name, a) is a)
    fs.releasedir(opened.fh)
    return out


def test_names_resolve_top_layer_first(union: UnionFS) -> None:
    assert union.lookup(ROOT_INO, b"b").st_size == len("top b")
    assert union.lookup(ROOT_INO, b"c").st_size == 1
    missing = union.lookup(ROOT_INO, b"nothing")
    assert missing.st_ino == 0 and missing.entry_timeout > 0  # a negative entry the kernel may keep
    with pytest.raises(OSError) as e:
        union.lookup(ROOT_INO, b"n" * 256)
    assert e.value.errno == errno.ENAMETOOLONG


def test_directories_merge_each_name_once(union: UnionFS) -> None:
    root = _listing(union, ROOT_INO)
    assert sorted(root) == [b".", b"..", b"a", b"b", b"c", b"d"]
    assert stat.S_ISDIR(root[b"d"].st_mode) and root[b"b"].st_size == len("top b")
    d = union.lookup(ROOT_INO, b"d")
    assert sorted(_listing(union, d.st_ino)) == [b".", b"..", b"x", b"y"]


def test_inode_numbers_are_stable_and_distinct(union: UnionFS) -> None:
    first = {n: a.st_ino for n, a in _listing(union, ROOT_INO).items() if n not in (b".", b"..")}
    assert len(set(first.values())) == len(first)
    assert union.lookup(ROOT_INO, b"a").st_ino == first[b"a"]


def test_an_unlink_hides_a_lower_name(union: UnionFS) -> None:
    trio.run(union.unlink, ROOT_INO, b"b")
    assert union.lookup(ROOT_INO, b"b").st_ino == 0
    assert b"b" not in _listing(union, ROOT_INO)
    assert union.lookup(ROOT_INO, b"a").st_ino != 0


@pytest.mark.parametrize(
    "ov",
    [
        override.Override(1000, 1000, stat.S_IFREG | 0o4755),
        override.Override(0, 5, stat.S_IFDIR | 0o1777),
        override.Override(7, 7, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        override.Override(7, 7, stat.S_IFBLK | 0o660, os.makedev(8, 1)),
        override.Override(3, 4, stat.S_IFLNK | 0o777),
    ],
)
def test_override_xattr_round_trips(ov: override.Override) -> None:
    assert override.decode(ov.encode(), stat.S_IFREG) == ov


def test_override_xattr_as_older_fuse_overlayfs_writes_it() -> None:
    assert override.decode(b"1000:100:0640", stat.S_IFREG | 0o600) == override.Override(1000, 100, stat.S_IFREG | 0o640)
    assert override.decode(b"1:2:0755\0", stat.S_IFDIR) == override.Override(1, 2, stat.S_IFDIR | 0o755)
    for bad in (b"", b"x:y:z", b"1:2", b"1:2:999", b"\xff"):
        assert override.decode(bad, stat.S_IFREG) is None


def test_only_the_command_line_prints() -> None:
    """``print`` and writes to stdout/stderr live in unionfs.cli only: the daemon logs, the store raises."""
    offenders = []
    for path in [*REPO.glob("unionfs/**/*.py"), *REPO.glob("layerstore/*.py")]:
        if path.parts[-2] == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} print")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("write", "writelines")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr in ("stdout", "stderr")
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} sys.{node.value.attr}.{node.attr}")
    assert offenders == []
