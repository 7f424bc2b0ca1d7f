"""Where the shm consumer's CPU goes, part by part, in a running stream (issue 14).

Usage::

    python3 benchmarks/shm_consumer_parts.py large 2 3     # payload, workers, seconds

Runs a ``transport="shm"`` Runner on the payload (:mod:`flowplug.bench.payloads`) in this
process and wraps four parts of the consumer's path in a clock of this thread's CPU time
(``time.thread_time_ns``): ``ShmTransport.recv`` (everything the transport does, the next
three included), ``ObjectStore.take_sole`` (a large datapoint rebuilt on views of the
store), ``ShmTransport._wait`` (asleep for a datapoint: what waking costs) and
``ObjectStore._view_died`` (a view's memory returned when it is dropped). Prints each per
datapoint, and the thread's total; the rest of the total is the Runner's loop and this
script's. Each wrapped call costs the clock twice (the calibration line says how much: a
system call each on Linux), so the parts read high by that much per call; compare trees
or payloads with one another, not with an unwrapped run.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

import flowplug_shm.transport as shm_transport

import flowplug
from flowplug.bench.payloads import Repeat
from flowplug.shm.store import ObjectStore

clock = time.thread_time_ns
spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def wrap(cls: Any, name: str, label: str) -> None:
    """Replace ``cls.name`` by a version that adds its CPU time to ``spent[label]``."""
    inner = getattr(cls, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += clock() - start
            calls[label] += 1

    setattr(cls, name, timed)


def wrapper_cost() -> float:
    """ns one wrapped call of an empty function costs."""

    class Empty:
        @staticmethod
        def call() -> None:
            pass

    wrap(Empty, "call", "calibration")
    for _ in range(20000):
        Empty.call()
    return spent["calibration"] / calls["calibration"]


def main() -> None:
    payload, workers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    parts = {
        "recv (all of the transport)": (shm_transport.ShmTransport, "recv"),
        "take_sole": (ObjectStore, "take_sole"),
        "wait for a datapoint": (shm_transport.ShmTransport, "_wait"),
        "a dropped view's free": (ObjectStore, "_view_died"),
    }
    for label, (cls, name) in parts.items():
        wrap(cls, name, label)
    runner = flowplug.Runner(Repeat(payload), transport="shm", num_workers=workers)
    try:
        step = iter(runner).__next__
        for _ in range(3000):
            step()
        spent.clear()
        calls.clear()
        count = 0
        started, cpu = time.perf_counter(), clock()
        while time.perf_counter() - started < seconds:
            for _ in range(50):
                step()
            count += 50
        total = clock() - cpu
        rate = count / (time.perf_counter() - started)
    finally:
        runner.close()
    cost = wrapper_cost()
    print(
        f"shm {payload} w={workers}: {rate:,.0f}/s, consumer thread CPU "
        f"{total / count / 1e3:.1f} us per datapoint (a wrapped call: +{cost / 1e3:.2f} us)"
    )
    for label in parts:
        print(
            f"  {label:30s} {spent[label] / count / 1e3:6.2f} us per datapoint, "
            f"{calls[label] / count:.2f} calls"
        )


if __name__ == "__main__":
    main()
