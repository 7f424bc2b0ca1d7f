import pytest

pytest_plugins = ["flowplug.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the plugins as installed, whatever an earlier test did."""
    import flowplug as fp

    yield
    fp.reload_plugins()
