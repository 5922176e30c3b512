"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from .images import build_image


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-layer OCI image made with umoci from host files (see :func:`tests.images.build_image`)."""
    return build_image(tmp_path_factory.mktemp("image"))
