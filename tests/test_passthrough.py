"""Kernel passthrough of file I/O (``FUSE_PASSTHROUGH``, :mod:`unionfs.fuse.handlers`) on real mounts.

As root on this kernel (6.18) the mount asks for it by default. Its rules are checked
here through what the daemon counts: with passthrough the daemon sees no READ or WRITE
of a file the kernel was handed. What a process sees is checked against kernel
overlayfs in ``test_differential`` (every scenario in every I/O mode).
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from .mounts import COMMAND, fresh_dirs, union
from .test_rootless import as_user, home, user_run  # noqa: F401 - the fixture
from .tree import make_lowers


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    l1, l2 = make_lowers(tmp_path / "lowers")
    u, w, m = fresh_dirs(tmp_path, "u", "w", "m")
    return {"l1": l1, "l2": l2, "u": u, "w": w, "m": m}


def _stats(mnt: Path) -> dict:  # type: ignore[type-arg]
    r = subprocess.run([*COMMAND, "stats", str(mnt), "--format", "json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _io(mnt: Path) -> tuple[int, int]:
    ops = _stats(mnt)["ops"]
    return ops.get("read", {}).get("count", 0), ops.get("write", {}).get("count", 0)


def _mount(layers: dict[str, Path], *options: str):  # noqa: ANN202 - a context manager
    extra = ["-o", ",".join(options)] if options else []
    return union(layers["m"], [layers["l1"], layers["l2"]], layers["u"], layers["w"], extra)


def test_upper_files_are_read_and_written_by_the_kernel(layers: dict[str, Path]) -> None:
    data = os.urandom(3 << 20)
    with _mount(layers) as m:
        assert _stats(m)["settings"]["passthrough"] is True
        (m / "new").write_bytes(data)
        with open(m / "a", "r+b") as f:  # a lower file: copied up before the kernel gets it
            f.seek(0, os.SEEK_END)
            f.write(b"appended")
        assert (m / "new").read_bytes() == data
        st, real = os.stat(m / "new"), os.stat(layers["u"] / "new")
        assert (st.st_size, st.st_mtime_ns) == (real.st_size, real.st_mtime_ns) == (len(data), real.st_mtime_ns)
        assert (m / "a").read_bytes().endswith(b"appended")
        assert _io(m) == (0, 0)


def test_passthrough_0_leaves_file_io_to_the_daemon(layers: dict[str, Path]) -> None:
    with _mount(layers, "passthrough=0") as m:
        assert _stats(m)["settings"]["passthrough"] is False
        (m / "new").write_bytes(b"x" * 100_000)
        assert (m / "new").read_bytes() == b"x" * 100_000
        reads, writes = _io(m)
        assert writes > 0


def test_one_file_open_many_times_shares_its_backing_file(layers: dict[str, Path]) -> None:
    """The kernel refuses a second backing file for one inode: every open of it gets the same one."""
    with _mount(layers) as m:
        (m / "f").write_bytes(b"0" * 8192)
        with open(m / "f", "r+b") as w, open(m / "f", "rb") as r, open(m / "f", "r+b") as w2:
            w.write(b"first")
            w.flush()
            assert r.read(5) == b"first"
            with mmap.mmap(w2.fileno(), 8192) as mm:  # a shared mapping of the backing file
                mm[4096:4100] = b"mmap"
                mm.flush()
            r.seek(4096)
            assert r.read(4) == b"mmap"
        assert _io(m) == (0, 0)


def test_a_lower_file_open_for_reading_is_served_until_closed_then_passed_through(layers: dict[str, Path]) -> None:
    """A reader of a lower file follows its copy-up (overlayfs does): the daemon serves that file's I/O
    while the reader is open, and hands the copied-up file to the kernel once every such open is closed."""
    with _mount(layers) as m:
        with open(m / "a", "rb") as reader:
            first = reader.read()
            with open(m / "a", "r+b") as writer:  # open while an ordinary open exists: ordinary too
                writer.write(b"CHANGED")
            reader.seek(0)
            assert reader.read(7) == b"CHANGED"
        before = _io(m)
        with open(m / "a", "r+b") as f:  # every earlier open closed: the upper file goes to the kernel
            assert f.read(7) == b"CHANGED"
            f.write(b"more")
        assert _io(m) == before
        assert len(first) > 0


def test_setuid_files_are_written_through_the_daemon(layers: dict[str, Path]) -> None:
    """The kernel writes a backing file with the daemon's credentials, which keep setuid: such files are not
    handed over, so the daemon drops the bits as the VFS does (compared with overlayfs in test_differential)."""
    with _mount(layers) as m:
        (m / "s").write_bytes(b"#!/bin/sh\n")
        os.chmod(m / "s", 0o4777)
        with open(m / "s", "ab") as f:
            f.write(b"x")
        assert _io(m)[1] == 1


def test_plain_user_cannot_ask_for_passthrough(home: Path) -> None:  # noqa: F811 - the fixture
    assert user_run(home, "mkdir", "l", "mnt").returncode == 0
    r = as_user(home, "mount", "--lower", "l", "-o", "passthrough=1", "mnt")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "passthrough needs root" in r.stderr


def test_passthrough_and_writeback_cache_exclude_each_other(layers: dict[str, Path]) -> None:
    r = subprocess.run(
        [*COMMAND, "mount", "--lower", str(layers["l1"]), "--upper", str(layers["u"]), "--work", str(layers["w"]),
         "-o", "passthrough=1,writeback=1", str(layers["m"])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "exclude each other" in r.stderr and r.stderr.count("\n") == 1
    with _mount(layers, "writeback=1") as m:  # asked for, the cache wins over the default passthrough
        settings = _stats(m)["settings"]
        assert (settings["passthrough"], settings["writeback"]) == (False, True)
