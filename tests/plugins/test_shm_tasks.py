"""The shm transport's task channel under ParallelMap: views both ways, a full store, no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from shm_helpers import in_store, segments

import flowplug as fp

SHAPE = (300, 1000)  # float32: 1.2 MB


@pytest.fixture(autouse=True, scope="module")
def _resource_tracker():
    # spawn starts multiprocessing's tracker daemon once per interpreter; start it before
    # the leak checks so that it does not count as ours.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def numbered(i: int, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    """An array whose every element says which input it is (exact in float32 below 2**24)."""
    return np.full(shape, i, dtype)


# Module-level functions, so that they pickle for spawn.


def negate_in_place(a):
    """Change the input in place and return it: the result is the task's own memory."""
    seen = (in_store(a), a.flags.writeable)
    a *= -1
    return seen, a


def tail(a):
    return a[1:]  # a view of the input: referenced by the result, not copied


def twice_slow_at_multiples_of_7(a):
    if int(a.flat[0]) % 7 == 0:
        time.sleep(0.2)  # while the other worker's later answers pile up in the store
    return a * 2


def where_and_sum(a):
    return in_store(a), float(a.sum())


def kill_at_3(a):
    if int(a.flat[0]) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return a


# ---------------------------------------------------------------------------- views both ways


@pytest.mark.parametrize("ordered", [True, False])
def test_large_arrays_cross_both_ways_exactly_once_as_views(no_leaks, ordered):
    inputs = [numbered(i) for i in range(12)]
    with fp.ParallelMap(
        fp.DataFromList(inputs),
        negate_in_place,
        num_workers=2,
        transport="shm",
        ordered=ordered,
        capacity=8,
        size="64MiB",
    ) as results:
        for epoch in range(3):
            got = []
            for (task_in_store, writable), out in results:
                assert task_in_store and writable  # the worker got a writable view
                assert in_store(out) and out.shape == SHAPE  # and so did the consumer
                got.append(out)
                if epoch == 1 and len(got) == 5:
                    break  # an epoch broken off: the next one is whole again
            if epoch == 1:
                continue
            index = [-int(out.flat[0]) for out in got]
            assert (index if ordered else sorted(index)) == list(range(12))  # each once
            for out in got:
                assert (out == out.flat[0]).all()
            del out, got
    for i, a in enumerate(inputs):  # the task was copied into the store when it was sent
        assert (a == i).all()


def test_a_result_that_is_a_view_of_its_task_is_not_copied(no_leaks):
    inputs = [numbered(i) for i in range(6)]
    with fp.ParallelMap(
        fp.DataFromList(inputs), tail, num_workers=2, transport="shm", size="64MiB"
    ) as results:
        got = list(results)
    assert [int(out[0, 0]) for out in got] == list(range(6))
    for out in got:
        assert in_store(out) and out.shape == (SHAPE[0] - 1, SHAPE[1])


def test_small_tasks_travel_inline_large_ones_through_the_store(no_leaks):
    small = np.arange(1000, dtype=np.int64)  # 8 KB
    large = np.ones(1 << 20, np.uint8)  # 1 MiB
    with fp.ParallelMap(
        fp.DataFromList([small, large]), where_and_sum, transport="shm", size="16MiB"
    ) as results:
        assert list(results) == [(False, float(small.sum())), (True, float(1 << 20))]


def test_a_task_larger_than_half_the_store_travels_as_a_copy(no_leaks):
    big = np.ones(3 << 20, np.uint8)  # 3 MiB in a 4 MiB store
    with fp.ParallelMap(
        fp.DataFromList([big, big]), where_and_sum, transport="shm", size="4MiB"
    ) as results:
        assert list(results) == [(False, float(3 << 20))] * 2


def test_spawned_workers_share_the_store_between_tasks_and_results(no_leaks):
    inputs = [numbered(i) for i in range(6)]
    with fp.ParallelMap(
        fp.DataFromList(inputs),
        negate_in_place,
        num_workers=2,
        transport="shm",
        size="64MiB",
        start_method="spawn",
    ) as results:
        got = list(results)
    assert [seen for seen, _ in got] == [(True, True)] * 6
    assert [int(out.flat[0]) for _, out in got] == [-i for i in range(6)]


# ---------------------------------------------------------------------------- a full store


def test_tasks_and_results_in_a_small_store_never_deadlock(no_leaks):
    """The consumer holds answers back for order while a slow worker owes the next one,
    and tasks sit in the store too: the slow worker's answer finds no room, and the
    consumer cannot free any before it arrives. It arrives as a copy."""
    n = 30
    inputs = [numbered(i, (150_000,), np.float32) for i in range(n)]  # 600 KB each
    with fp.ParallelMap(
        fp.DataFromList(inputs),
        twice_slow_at_multiples_of_7,
        num_workers=2,
        transport="shm",
        capacity=16,  # up to 16 answers of 600 KB held back: far more than 4 MiB
        size="4MiB",
        timeout=30,  # a deadlock fails the test instead of hanging it
    ) as results:
        for _ in range(2):
            got = list(results)
            assert [int(out[0]) for out in got] == [2 * i for i in range(n)]
            for out in got:
                assert (out == out[0]).all()
            copies = sum(not in_store(out) for out in got)
            assert 0 < copies < n  # the store was full at times, and used at others
            del out, got


class SlowFirstShard(fp.DataFlow):
    """600 KB items; worker 0's first item comes late, so worker 1's fill the store."""

    def __init__(self, n: int, start: int = 0, step: int = 1):
        self.n, self.start, self.step = n, start, step

    def __len__(self):
        return len(range(self.start, self.n, self.step))

    def __iter__(self):
        for i in range(self.start, self.n, self.step):
            if i == 0:
                time.sleep(0.3)
            yield numbered(i, (150_000,), np.float32)

    def shard(self, index, count):
        return SlowFirstShard(self.n, index, count)


def test_ordered_shard_mode_in_a_small_store_never_deadlocks(no_leaks):
    with fp.Runner(
        SlowFirstShard(24),
        transport="shm",
        num_workers=2,
        capacity=24,
        mode="shard",
        ordered=True,
        size="4MiB",
        timeout=30,
    ) as runner:
        for _ in range(2):
            got = list(runner)
            assert [int(a[0]) for a in got] == list(range(24))
            assert any(not in_store(a) for a in got)  # the store did fill up
            del got


# ---------------------------------------------------------------------------- no leaks


def test_a_worker_killed_with_tasks_in_flight_leaves_nothing(no_leaks):
    results = fp.ParallelMap(
        fp.DataFromList([numbered(i) for i in range(20)]),
        kill_at_3,
        num_workers=2,
        transport="shm",
        size="64MiB",
    )
    with pytest.raises(fp.WorkerDied, match="SIGKILL"):
        list(results)
    results.close()
    assert segments(os.getpid()) == []


_MAP_CONSUMER = textwrap.dedent(
    """
    import numpy as np
    import flowplug as fp

    def double(a):
        return fp.worker_info().id, a * 2

    inputs = [np.full(1 << 20, i % 100, np.uint8) for i in range(1000)]
    results = fp.ParallelMap(fp.DataFromList(inputs), double, num_workers=2, transport="shm",
                             size="64MiB")
    it = iter(results)
    kept = []
    while len({w for w, _ in kept}) < 2:  # each worker's hello precedes its answers
        kept.append(next(it))
    print("ready", flush=True)
    input()
    """
)


def test_nothing_stays_in_dev_shm_after_a_map_consumer_is_killed(no_leaks):
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAP_CONSUMER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        assert segments(proc.pid) == []  # unlinked once both workers attached
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
    assert segments(proc.pid) == []
