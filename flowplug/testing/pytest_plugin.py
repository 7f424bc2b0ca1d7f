"""pytest fixtures for transport authors: ``pytest -p flowplug.testing.pytest_plugin``."""

from __future__ import annotations

import pytest

from .leaks import check_leaks


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a child process, thread, fd or /dev/shm entry behind."""
    with check_leaks():
        yield
