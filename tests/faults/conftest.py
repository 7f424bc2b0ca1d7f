"""Fixtures of the fault-injection suite: one run per registered transport, leak checks."""

import gc

import pytest

pytest.register_assert_rewrite("faultlib")

import flowplug as fp  # noqa: E402 - after the rewrite hook, as pytest requires
from flowplug.testing.leaks import leaked, snapshot  # noqa: E402


@pytest.fixture(params=sorted(fp.available_transports()))
def transport(request):
    """Every registered transport, by name (shm included once it is installed)."""
    return request.param


@pytest.fixture(autouse=True)
def _no_leaks():
    before = snapshot()
    yield
    gc.collect()
    left = leaked(before)
    assert not left, f"left behind: {left}"
