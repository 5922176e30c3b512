"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .images import build_image
from .mounts import force_unmount, run


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-layer OCI image made with umoci from host files (see :func:`tests.images.build_image`)."""
    return build_image(tmp_path_factory.mktemp("image"))


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A fresh journaled ext4 on a loop device, mounted at ``tmp_path/ext4`` (the loop goes with the umount).

    Where copy-ups are settled behind the open (:mod:`unionfs.settle`): this VM's root has no journal.
    """
    img, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    run(["truncate", "-s", "128M", str(img)])
    run(["mkfs.ext4", "-q", "-F", "-O", "has_journal", str(img)])
    run(["mount", "-o", "loop", str(img), str(mnt)])
    try:
        yield mnt
    finally:
        force_unmount(mnt)
