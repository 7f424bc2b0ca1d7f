"""pytest fixtures for transport authors: ``pytest -p flowplug.testing.pytest_plugin``."""

from __future__ import annotations

import gc

import pytest

from .leaks import leaked, snapshot


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a child process, thread, fd or /dev/shm entry behind."""
    before = snapshot()
    yield
    gc.collect()
    left = leaked(before)
    assert not left, f"left behind: {left}"
