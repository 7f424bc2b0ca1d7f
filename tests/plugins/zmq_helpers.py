"""Helpers shared by the zmq tests (imported by test_zmq.py and test_zmq_direct.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import flowplug as fp


class Bomb:
    """A stranger's payload: unpickling it fails the test."""

    def __reduce__(self):
        return (pytest.fail, ("a stranger's pickle was loaded",))


def zmq_transport(run_id: str) -> Iterator[Any]:
    """A fixture's body: a zmq transport for one forked worker, closed after the test."""
    t = fp.get_transport("zmq")(capacity=8, num_workers=1, run_id=run_id, start_method="fork")
    yield t
    t.close()
