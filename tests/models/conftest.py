"""Fixtures for tests/models (helpers live in models_testing.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_converted_cache(monkeypatch):
    """Tests in this directory never touch the user's converted-params cache (cache tests opt back in)."""
    monkeypatch.setenv("JAXRT_CONVERTED_CACHE", "0")
