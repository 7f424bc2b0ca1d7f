"""The timed loop the A/B scripts of this folder share (``shm_ab.py``, ``zmq_threads.py``).

Imported as ``from _timing import ...``: a script run as ``python3 benchmarks/x.py`` has
this folder first on ``sys.path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def warm_up(step: Callable[[], object], seconds: float = 0.5) -> None:
    """Call ``step()`` for ``seconds`` (pools filled, caches warm, workers running)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()


def count_steps(step: Callable[[], object], seconds: float, chunk: int = 20) -> tuple[int, float]:
    """Call ``step()`` in chunks of ``chunk`` until ``seconds`` have passed; return the
    number of calls and the time they took (the clock is read once per chunk)."""
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(chunk):
            step()
        n += chunk
    return n, time.perf_counter() - start
