"""Fixtures of the log tests: one harness per storage implementation."""

from __future__ import annotations

import pytest

from tests.log.helpers import Harness


@pytest.fixture(params=["memory", "file"])
def harness(request, tmp_path):
    """Yields a ``Harness`` for MemoryStorage and for FileStorage(tmp_path)."""
    harness = Harness(request.param, str(tmp_path / "data"))
    yield harness
    harness.close()
