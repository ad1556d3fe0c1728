"""Fixtures for tests/fallback live in fallback_testing.py (importable by name; "conftest" is not unique)."""

from fallback_testing import *  # noqa: F403
