"""Shared pytest configuration: markers and the cached real sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.sample_data import default_cache_dir, fetch_archive


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: needs PyPI once to download the 38 MB TotalSegmentator sample (then cached)"
    )


@pytest.fixture(scope="session")
def sample_cache() -> Path:
    """The sample cache (``$TACT_CACHE`` or ``~/.cache/taskadaptivect``) holding the verified archive."""
    cache = default_cache_dir()
    fetch_archive(cache)
    return cache
