"""ParallelMap: fn applied exactly once per input, in order when asked, on every transport
that carries tasks; composes with Runner and with itself; faults as in the Runner."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowplug as fp
from flowplug.plugins import PluginInfo, get_registry

TRANSPORTS = sorted(fp.available_transports())
TASK_TRANSPORTS = [t for t in TRANSPORTS if fp.get_transport(t).carries_tasks]

# Module-level functions, so that they pickle for every start method.


def triple(x):
    return 3 * x


def none_for_odd(x):
    return None if x % 2 else x


def add_one(x):
    return x + 1


def checksum(a):
    return int(a.sum()), a.shape


def fail_at_7(x):
    if x == 7:
        raise KeyError(f"no key {x}")
    return x


def die_at_5(x):
    if x == 5:
        if threading.current_thread() is threading.main_thread():
            os._exit(4)
        sys.exit(4)  # a thread cannot die alone; the worker reports it
    return x


def sleep_at_3(x):
    if x == 3:
        time.sleep(1.5)
    return x


class Passes(fp.DataFlow):
    """0..n-1, counting how often it was iterated (in the consumer)."""

    def __init__(self, n: int, known_length: bool = True):
        self.n = n
        self.known_length = known_length
        self.passes = 0

    def __len__(self):
        if not self.known_length:
            raise fp.UnknownLength("unknown on purpose")
        return self.n

    def __iter__(self):
        self.passes += 1
        yield from range(self.n)


# ---------------------------------------------------------------------------- properties


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    transport=st.sampled_from(TASK_TRANSPORTS),
    n=st.integers(0, 40),
    num_workers=st.integers(1, 3),
    capacity=st.integers(1, 10),
    ordered=st.booleans(),
    drop_none=st.booleans(),
    known_length=st.booleans(),
    breaks=st.lists(st.one_of(st.none(), st.integers(1, 45)), min_size=3, max_size=4),
)
def test_every_input_mapped_exactly_once(
    no_leaks, transport, n, num_workers, capacity, ordered, drop_none, known_length, breaks
):
    """Over several epochs, some broken off early: a complete epoch is fn over the source
    (a multiset, or a sequence when ordered; None dropped when asked), a broken one a
    clean part of it."""
    fn = none_for_odd if drop_none else triple
    want = [fn(i) for i in range(n)]
    if drop_none:
        want = [x for x in want if x is not None]
    with fp.ParallelMap(
        Passes(n, known_length),
        fn,
        num_workers=num_workers,
        transport=transport,
        capacity=capacity,
        ordered=ordered,
        drop_none=drop_none,
    ) as results:
        for stop_after in [*breaks, None]:
            got = []
            for out in results:
                got.append(out)
                if stop_after is not None and len(got) == stop_after:
                    break
            if ordered:
                assert got == want[: len(got)]
            else:
                assert not Counter(got) - Counter(want), f"not in the source: {got}"
            if stop_after is None or stop_after > len(want):
                assert sorted(got, key=repr) == sorted(want, key=repr)


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_large_arrays_round_trip(no_leaks, transport):
    arrays = [np.full((400, 1000), i, dtype=np.float32) for i in range(6)]
    with fp.ParallelMap(
        fp.DataFromList(arrays), checksum, num_workers=2, transport=transport
    ) as results:
        assert list(results) == [(400_000 * i, (400, 1000)) for i in range(6)]


def test_none_is_a_value_unless_dropped(no_leaks):
    with fp.ParallelMap(fp.DataFromList(range(6)), none_for_odd, transport="thread") as m:
        assert list(m) == [0, None, 2, None, 4, None] and len(m) == 6
    with fp.ParallelMap(
        fp.DataFromList(range(6)), none_for_odd, transport="thread", drop_none=True
    ) as m:
        assert list(m) == [0, 2, 4]
        with pytest.raises(fp.UnknownLength):
            len(m)


def test_abandoned_tasks_are_skipped(no_leaks):
    """After a break, the tasks of the abandoned epoch that no worker started are not run."""
    calls = []
    release = threading.Event()

    def held(x):
        calls.append(x)
        if x != 0:
            release.wait(10)  # keep both workers busy until the next epoch has begun
        return x

    with fp.ParallelMap(
        fp.DataFromList(range(10)), held, num_workers=2, transport="thread", capacity=10
    ) as results:
        for _ in results:
            break
        timer = threading.Timer(1.0, release.set)
        timer.start()
        assert list(results) == list(range(10))  # announces epoch 1 before the timer fires
        timer.join()
    # Epoch 0 ran 0 and the tasks the workers held then (1, and maybe 2); the rest were
    # skipped. (Exact counts would depend on thread timing; "not in full" does not.)
    assert calls[0] == 0 and len(calls) - 10 < 10, "the abandoned epoch was computed in full"


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_map_of_a_map(no_leaks, transport):
    inner = fp.ParallelMap(fp.DataFromList(range(20)), triple, num_workers=2, transport=transport)
    with fp.ParallelMap(inner, add_one, num_workers=2, transport=transport) as outer:
        assert list(outer) == [3 * i + 1 for i in range(20)]
        assert list(outer) == [3 * i + 1 for i in range(20)]
    assert "closed" in repr(inner)  # closed with the outer map


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_map_of_a_sharded_runner(no_leaks, transport):
    source = fp.Runner(
        fp.DataFromList(range(25)), transport=transport, num_workers=2, mode="shard", ordered=True
    )
    with fp.ParallelMap(source, triple, num_workers=2, transport=transport) as results:
        for _ in range(2):
            assert list(results) == [3 * i for i in range(25)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_runner_over_a_thread_map(no_leaks, transport):
    def make():  # one map per worker (worker threads cannot share one)
        return fp.ParallelMap(fp.DataFromList(range(12)), triple, num_workers=2, transport="thread")

    with fp.Runner(make, transport=transport, num_workers=2, mode="shard", ordered=True) as runner:
        assert list(runner) == [3 * i for i in range(12)]


def test_process_map_inside_a_worker_process(no_leaks):
    """Nesting works: a worker process may start its own workers (fault scenario 13)."""
    df = fp.ParallelMap(fp.DataFromList(range(3)), triple, transport="zmq")
    with fp.Runner(df, transport="zmq") as runner:
        assert list(runner) == [0, 3, 6]
        assert list(runner) == [0, 3, 6]


class SetUp:
    """A fn with set-up of its own: each worker runs reset_state() once, when it starts."""

    def __init__(self):
        self.calls = []

    def reset_state(self):
        self.calls.append(os.getpid())

    def __call__(self, x):
        return x, tuple(self.calls), os.getpid()


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_fn_reset_state_runs_once_per_worker_before_its_tasks(no_leaks, transport):
    with fp.ParallelMap(fp.DataFromList(range(20)), SetUp(), num_workers=2,
                        transport=transport) as m:  # fmt: skip
        out = list(m)
    assert [x for x, _, _ in out] == list(range(20))
    for _, calls, pid in out:
        if fp.get_transport(transport).crosses_processes:
            assert calls == (pid,)  # this worker's copy, set up once
        else:
            assert calls and set(calls) == {pid}  # worker threads share the one fn


def test_transport_without_tasks_is_a_config_error(no_leaks):
    class NoTasks(fp.get_transport("thread")):
        name = "notasks"
        carries_tasks = False

    get_registry().register(NoTasks, origin=PluginInfo("notasks", "test", "0"))
    with pytest.raises(fp.ConfigError, match=r"'notasks' cannot carry tasks.*thread"):
        fp.ParallelMap(fp.DataFromList([1]), triple, transport="notasks")
    # The same transport still runs a Runner, replicated or sharded.
    with fp.Runner(fp.DataFromList([1, 2]), transport="notasks", mode="shard") as runner:
        assert sorted(runner) == [1, 2]


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="needs a function"):
        fp.ParallelMap(fp.DataFromList([1]), 3, transport="thread")
    with pytest.raises(TypeError, match="the dataflow itself"):
        fp.ParallelMap(lambda: fp.DataFromList([1]), triple, transport="thread")


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_fn_error_names_the_input(no_leaks, transport, ordered):
    results = fp.ParallelMap(
        fp.DataFromList(range(20)), fail_at_7, num_workers=2, transport=transport, ordered=ordered
    )
    with pytest.raises(fp.WorkerError, match=r"KeyError in fn on input 7.*no key 7") as info:
        list(results)
    err = info.value
    assert err.index == 7 and err.exc_type == "KeyError"
    assert "in fail_at_7" in err.remote_traceback
    with pytest.raises(fp.StateError, match="closed"):
        list(results)
    results.close()


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_dead_worker(no_leaks, transport):
    results = fp.ParallelMap(
        fp.DataFromList(range(20)), die_at_5, num_workers=2, transport=transport
    )
    if not fp.get_transport(transport).crosses_processes:
        with pytest.raises(fp.WorkerError, match="SystemExit"):
            list(results)
        results.close()
        return
    start = time.monotonic()
    with pytest.raises(fp.WorkerDied, match="code 4") as info:
        list(results)
    assert time.monotonic() - start < 10 and info.value.exitcode == 4
    results.close()


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_timeout(no_leaks, transport):
    with fp.ParallelMap(
        fp.DataFromList(range(6)), sleep_at_3, transport=transport, timeout=0.3
    ) as results:
        it = iter(results)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(fp.RunnerTimeout, match=r"0\.3"):
            next(it)


@pytest.fixture
def resource_tracker_running():
    """spawn starts multiprocessing's resource tracker on first use, for the life of the
    interpreter: start it before the leak check takes its snapshot."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def test_spawned_workers(resource_tracker_running, no_leaks):
    """Gates, credits and the task endpoint reach workers started by spawn."""
    with fp.ParallelMap(
        fp.DataFromList(range(10)), triple, num_workers=2, transport="zmq", start_method="spawn"
    ) as results:
        assert list(results) == [3 * i for i in range(10)]
    with fp.Runner(
        fp.DataFromList(range(10)),
        transport="zmq",
        num_workers=2,
        start_method="spawn",
        mode="shard",
        ordered=True,
    ) as runner:
        assert list(runner) == list(range(10)) and list(runner) == list(range(10))
