"""A full upper layer: a write that does not fit fails at write(), whatever the cache mode, as on overlayfs."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .mounts import force_unmount, overlay, run, union


@contextmanager
def small_fs(base: Path, name: str, size: str = "20M") -> Iterator[Path]:
    img, mnt = base / f"{name}.img", base / name
    mnt.mkdir()
    run(["truncate", "-s", size, str(img)])
    run(["mkfs.ext4", "-q", "-F", str(img)])
    run(["mount", "-o", "loop", str(img), str(mnt)])
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def _fill(path: Path) -> tuple[int, int, int | None]:
    """Write 40 MiB to ``path`` in 1 MiB writes: (bytes written, size by stat, errno of the failing write)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    done, err = 0, None
    try:
        for _ in range(40):
            done += os.write(fd, b"x" * (1 << 20))
    except OSError as e:
        err = e.errno
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or e.errno
    return done, os.stat(path).st_size, err


@pytest.mark.parametrize("writeback", ["", "writeback=1", "writeback=0"])
def test_enospc_at_write_as_kernel_overlay(writeback: str, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    with small_fs(tmp_path, "a") as a, small_fs(tmp_path, "b") as b:
        for d in (a, b):
            (d / "u").mkdir()
            (d / "w").mkdir()
        extra = ["-o", writeback] if writeback else []
        with union(tmp_path / "m1", [lower], a / "u", a / "w", extra=extra) as m:
            done, size, err = _fill(m / "big")
            on_disk = os.stat(a / "u" / "big").st_size
        with overlay(tmp_path / "m2", [lower], b / "u", b / "w") as m:
            ref = _fill(m / "big")
    assert ref[2] == errno.ENOSPC and ref[0] < 40 << 20  # the reference fails a write()
    assert err == errno.ENOSPC and done < 40 << 20, "no write() failed"
    assert size == done == on_disk  # what write() said is what stat says and what the disk has
