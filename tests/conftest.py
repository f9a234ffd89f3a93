"""Test-wide settings: accel's cache folder lives in a temporary folder, never in the user's home."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _accel_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("ACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("accel-cache")))
    yield
    patch.undo()
