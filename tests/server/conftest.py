"""Fixtures for tests/server live in server_testing.py (importable by name; "conftest" is not unique)."""

from server_testing import *  # noqa: F403
