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

    Where copy-ups are settled behind the open (:mod:`unionfs.union.settle`): this VM's root has no journal.
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


#: modules of the fast tier: no root, no mount, no server (``pytest -m "not mount"``)
FAST = {"test_units", "test_mutex", "test_fast_union", "test_fast_registry", "test_fast_chunked", "test_fast_estargz"}
#: what else a module needs, beyond root and real mounts
NEEDS = {
    "test_registry": "registry",
    "test_chunked": "registry",
    "test_runtime": "runtime",
    "test_plugins": "plugin",
    "test_rootless": "root",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by what it needs, from its module: the fast tier is what carries no ``mount`` mark."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in FAST:
            continue
        item.add_marker(pytest.mark.mount)
        item.add_marker(pytest.mark.root)
        if module in NEEDS:
            item.add_marker(getattr(pytest.mark, NEEDS[module]))
