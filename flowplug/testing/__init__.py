"""Test aids shipped with flowplug so a plugin author can run them on their own transport.

- :mod:`flowplug.testing.contract`: :class:`TransportContract`, the suite every transport passes.
- :mod:`flowplug.testing.leaks`: :func:`snapshot` / :func:`leaked` to find processes,
  threads, file descriptors and ``/dev/shm`` entries left behind.
- ``pytest -p flowplug.testing.pytest_plugin`` adds the ``no_leaks`` fixture.
"""
