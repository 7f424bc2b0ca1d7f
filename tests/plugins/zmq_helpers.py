"""Helpers shared by the zmq tests (imported by test_zmq.py and test_zmq_direct.py)."""

from __future__ import annotations

import pytest


class Bomb:
    """A stranger's payload: unpickling it fails the test."""

    def __reduce__(self):
        return (pytest.fail, ("a stranger's pickle was loaded",))
