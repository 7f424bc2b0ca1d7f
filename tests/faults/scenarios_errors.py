"""Fault scenarios: a worker's error reaches the consumer (docs/reliability.md rows
1, 2, 7, 8, 18-24, 31)."""

from __future__ import annotations

import re
import time
from typing import Any

from flows import (
    BadStr,
    FailResetIn,
    FloodThenFail,
    LoadsOnlyHere,
    ManyBuffers,
    RaiseAfter,
    RaiseIn,
    Sized,
    Unpicklable,
    register_faulty,
)
from probes import caps, drain_until, endless, measured, raised, workers_released

import flowplug as fp
from flowplug.testing.contract import Counting
from flowplug.testing.leaks import snapshot


def scenario_worker_raises(transport: str, k: int = 4, start_method: str | None = None) -> int:
    """1. A worker's dataflow raises after ``k`` items: WorkerError with type, message and
    remote traceback; the other workers are stopped. 31: the same with worker processes
    started by ``start_method`` (spawn, forkserver)."""
    before = snapshot()
    how = {} if start_method is None else {"start_method": start_method}
    runner = fp.Runner(RaiseIn(bad=1, k=k), transport=transport, num_workers=2, **how)
    from_bad = []
    stream = endless(runner)
    try:
        for _ in range(100_000):
            wid, i = next(stream)
            if wid == 1:
                from_bad.append(i)
        raise AssertionError("the injected error never arrived")
    except fp.WorkerError as err:
        assert err.worker_id == 1 and err.exc_type == "ValueError"
        assert f"injected fault after {k} items" in str(err)
        assert "in __iter__" in err.remote_traceback and "ValueError" in err.remote_traceback
        assert "worker 1" in str(err)
    assert from_bad == list(range(k)), from_bad  # nothing after the error, nothing lost
    left = workers_released(before)
    assert not left, f"other workers not stopped: {left}"
    try:
        next(iter(runner))
        raise AssertionError("a failed runner must refuse to iterate")
    except fp.StateError:
        pass
    runner.close()
    return 1


def scenario_reset_fails(transport: str) -> int:
    """2. ``reset_state()`` raises in worker 1 of 2: WorkerError naming worker 1, at the
    start of the run (the other worker's datapoints may come first)."""
    with fp.Runner(FailResetIn(bad=1), transport=transport, num_workers=2) as runner:
        seen = 0
        try:
            for _ in runner:
                seen += 1
                assert seen < 10_000, "the reset_state() failure was never reported"
        except fp.WorkerError as err:
            assert err.worker_id == 1 and err.exc_type == "OSError"
            assert re.search(r"worker 1 .*reset_state\(\).*cannot open shard 7", str(err))
            assert "reset_state" in err.remote_traceback
        else:
            raise AssertionError("no WorkerError")
    return 1


#: scenario 18: the consumer's pace (s per datapoint), and how many of the flooding
#: worker's datapoints may still arrive after the other worker raised.
FAIR_PACE = 0.0002
FAIR_BOUND = 1000


def scenario_fair(transport: str, delay: float = 0.5) -> int:
    """18. Worker 0 floods tiny datapoints while worker 1 raises after ``delay`` s: the
    WorkerError arrives after a bounded number of worker 0's datapoints, however many are
    in flight. The consumer takes its time (:data:`FAIR_PACE`), so the transport is full
    when worker 1 raises: a transport with one shared pipe or queue would deliver all of
    it (capacity messages, up to 64 items each when batched) first, and one with a shared
    capacity bound lets the running worker take every freed slot."""
    received: list[float] = []
    with fp.Runner(FloodThenFail(delay), transport=transport, num_workers=2) as runner:
        clock = time.monotonic
        try:
            for _ in endless(runner):
                received.append(clock())
                if len(received) > 200_000:
                    break
                time.sleep(FAIR_PACE)
        except fp.WorkerError as err:
            arrived = clock()
            assert err.worker_id == 1 and "reset_state()" in str(err), err
            raised = float(re.search(r"injected at t=([\d.]+)", str(err)).group(1))
        else:
            raise AssertionError(f"no WorkerError after {len(received)} datapoints")
    after = sum(t > raised for t in received)
    measured("worker error to WorkerError under a flood", arrived - raised)
    assert after < FAIR_BOUND, (
        f"{after} datapoints of the flooding worker arrived in the {arrived - raised:.2f} s "
        "between the other worker's error and its report"
    )
    assert len(received) - after > 0, "the flooding worker never ran before the error"
    return 1


def scenario_unpicklable(transport: str, kind: str) -> int:
    """7. A datapoint holding a lambda, a lock or a socket: WorkerError naming the type
    when the transport serializes (crosses processes); passed as is between threads."""
    names = {"lambda": "lambda", "lock": "lock", "socket": "socket"}
    with fp.Runner(Unpicklable(kind), transport=transport, num_workers=1) as runner:
        got = []
        if caps(transport).crosses_processes:
            err = raised(fp.WorkerError, got, runner)
            assert err.exc_type == "TypeError" and "dict" in str(err), str(err)
            assert names[kind] in str(err), str(err)
            assert got == [0, 1], got
        else:
            for dp in runner:
                got.append(dp)
                if len(got) == 3:
                    break
            assert got[:2] == [0, 1] and names[kind] in repr(got[2]["bad"]), got
            if kind == "socket":
                got[2]["bad"].close()
    return 1


def scenario_too_large(transport: str) -> int:
    """8. A datapoint bigger than the transport's limit. A transport that declares a byte
    limit (``size_limit_option``) reports DataTooLarge as a WorkerError naming the sizes
    and the option; one without delivers it. Nothing is delivered twice or lost."""
    cls = caps(transport)
    small, big = 1000, 24 << 20
    if cls.size_limit_option is None:
        # capacity=1: the smallest hwm-bounded buffer, with a 24 MiB datapoint in it.
        sizes = [small, small, big, small, big, small]
        with fp.Runner(Sized(sizes), transport=transport, capacity=1) as runner:
            for _ in range(2):
                got = list(runner)
                assert [i for i, _ in got] == list(range(len(sizes)))
                for i, arr in got:
                    assert arr.nbytes == sizes[i] and arr[0] == arr[-1] == i % 251
        return 0
    limit = 1 << 20
    sizes = [small, small, small, 4 * limit, small]
    options = {cls.size_limit_option: limit}
    with fp.Runner(Sized(sizes), transport=transport, **options) as runner:
        got: list[Any] = []
        err = raised(fp.WorkerError, got, runner)
    # each datapoint before the big one exactly once, then the error
    assert [i for i, _ in got] == [0, 1, 2], got
    assert isinstance(err, fp.WorkerError) and err.exc_type == "DataTooLarge", err
    assert cls.size_limit_option in str(err), str(err)
    assert len(re.findall(r"\d[\d.,]*", str(err).split("\n")[0])) >= 2, str(err)
    return 1


def scenario_report_with_closed_stdio(transport: str) -> int:
    """19. A worker closes its stdout and stderr, yields 40 items and raises, while the
    consumer takes 20 ms per item: all 40 arrive, then the WorkerError with the
    ValueError; never a death, never exit code 0 or 1 instead of the cause."""
    before = snapshot()
    runner = fp.Runner(RaiseAfter(40, close_stdio=True), transport=transport, num_workers=1)
    try:
        got, err = drain_until(fp.WorkerError, runner, pace=0.02)
    finally:
        runner.close()
    assert got == list(range(40)), got
    assert err.exc_type == "ValueError" and "injected after 40" in str(err), str(err)
    assert "in __iter__" in err.remote_traceback, err.remote_traceback
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_broken_str(transport: str) -> int:
    """20. The exception's ``str()`` raises too: still a WorkerError with its type and
    traceback (never a death)."""
    with fp.Runner(RaiseAfter(2, exc=BadStr()), transport=transport, num_workers=1) as runner:
        got, err = drain_until(fp.WorkerError, runner)
    assert got == [0, 1], got
    assert err.exc_type == "BadStr" and "<str() of the" in str(err), str(err)
    assert "BadStr" in err.remote_traceback, err.remote_traceback
    return 1


def scenario_cannot_connect(in_threads: bool) -> int:
    """21. ``connect()`` raises inside the worker: a WorkerError with the original
    exception and traceback, phase "connecting"; a worker process exits with 1, never 0."""
    register_faulty()
    name = "faulty_thread" if in_threads else "faulty"
    before = snapshot()
    runner = fp.Runner(
        Counting(5), transport=name, num_workers=2, fail="connect", timeout=30, mode="replicate"
    )
    try:
        got, err = drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == [], got
    assert err.exc_type == "OSError" and "Too many open files" in str(err), str(err)
    assert "connecting" in str(err) and "in connect" in err.remote_traceback, str(err)
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_report_cannot_be_sent(in_threads: bool) -> int:
    """22. The transport breaks while the worker sends its error report: the datapoints
    it sent before arrive, then a WorkerError with the original error (the report took
    the report pipe), noting why it could not be sent."""
    register_faulty()
    name = "faulty_thread" if in_threads else "faulty"
    runner = fp.Runner(RaiseAfter(7), transport=name, num_workers=1, fail="report", timeout=30)
    try:
        got, err = drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == list(range(7)), got
    assert err.exc_type == "ValueError" and "injected after 7" in str(err), str(err)
    assert "while the worker was reporting" in err.remote_traceback, err.remote_traceback
    return 1


def scenario_dataflow_fails_to_load(transport: str, start_method: str) -> int:
    """23. spawn/forkserver: the dataflow pickles in the consumer but fails to load in
    the worker: a WorkerError with the ImportError and its traceback, not an exit code."""
    cls = caps(transport)
    if not cls.crosses_processes or cls.runs_workers:
        return 0
    runner = fp.Runner(LoadsOnlyHere(), transport=transport, start_method=start_method)
    try:
        got, err = drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == [], got
    assert err.exc_type == "ImportError" and "only_in_the_consumer" in str(err), str(err)
    assert "starting" in str(err) and "__setstate__" in err.remote_traceback, str(err)
    return 1


def scenario_many_buffers(transport: str) -> int:
    """24. A datapoint with more out-of-band buffers than one system call takes
    (IOV_MAX is 1024 on Linux): delivered whole on every transport."""
    for n in (1100, 5000):
        with fp.Runner(ManyBuffers(n), transport=transport, num_workers=1, timeout=60) as runner:
            for _ in range(2):
                (got,) = list(runner)
                assert len(got) == n
                assert all(a.shape == (4096,) and a[0] == a[-1] == i for i, a in enumerate(got))
    return 1
