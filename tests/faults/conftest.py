"""Fixtures of the fault-injection suite: one run per registered transport, leak checks."""

import pytest

pytest.register_assert_rewrite(
    "faultlib", "flows", "probes", "scenarios_deaths", "scenarios_errors", "scenarios_lifecycle"
)

import flowplug as fp  # noqa: E402 - after the rewrite hook, as pytest requires


@pytest.fixture(params=sorted(fp.available_transports()))
def transport(request):
    """Every registered transport, by name (shm included once it is installed)."""
    return request.param


@pytest.fixture
def _mp_helpers():
    """spawn and forkserver start long-lived helper processes on first use (the
    forkserver, the resource tracker): start them before the leak check's snapshot."""
    from multiprocessing import forkserver, resource_tracker

    forkserver.ensure_running()
    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _no_leaks(_mp_helpers, no_leaks):
    """Every fault test leaves nothing behind (flowplug.testing's ``no_leaks``)."""
