"""The transport contract: what every transport must do under the generic Runner.

Run it on your own transport by subclassing it in a test module and giving the
``transport`` fixture your transport's registered name::

    import pytest
    from flowplug.testing.contract import TransportContract

    class TestMyTransport(TransportContract):
        @pytest.fixture
        def transport(self):
            return "mytransport"

The tests use only flowplug's public API and adapt to the transport's declared
capabilities (``crosses_processes``), never to its name.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

import flowplug as fp

from .leaks import check_leaks

# ---------------------------------------------------------------------------- dataflows
# Module-level so that they pickle for the spawn start method.


class Counting(fp.DataFlow):
    """Yield 0..n-1, tagged with the worker id when ``tag`` is true."""

    def __init__(self, n: int, tag: bool = False):
        self.n = n
        self.tag = tag

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        info = fp.worker_info()
        assert info is not None  # runs in a worker
        for i in range(self.n):
            yield (info.id, i) if self.tag else i


class RaiseAfter(fp.DataFlow):
    """Yield ``k`` items, then raise ValueError."""

    def __init__(self, k: int):
        self.k = k

    def __iter__(self):
        yield from range(self.k)
        raise ValueError(f"boom after {self.k} items")


class FailingReset(fp.DataFlow):
    def reset_state(self) -> None:
        raise RuntimeError("cannot open the data file")

    def __iter__(self):
        yield 1


class DieAfter(fp.DataFlow):
    """Yield ``k`` items, then die without a word: by a signal or ``os._exit``."""

    def __init__(self, k: int, how: str):
        self.k = k
        self.how = how

    def __iter__(self):
        yield from range(self.k)
        if self.how == "exit":
            os._exit(7)
        if self.how == "sysexit":
            sys.exit(7)
        os.kill(os.getpid(), signal.SIGKILL)


class Slow(fp.DataFlow):
    def __init__(self, delay: float):
        self.delay = delay

    def __iter__(self):
        while True:
            time.sleep(self.delay)
            yield 1


class InfoFlow(fp.DataFlow):
    """Yield the worker's (id, num_workers, seed) forever."""

    def __iter__(self):
        info = fp.worker_info()
        assert info is not None  # runs in a worker
        while True:
            yield (info.id, info.num_workers, info.seed)


def identity(x: Any) -> Any:
    return x


def payloads() -> list[Any]:
    """Datapoints every transport must deliver exactly."""
    rng = np.random.default_rng(0)
    return [
        0,
        None,
        "text ✓",
        b"\x00bytes\xff" * 100,
        (1, 2.5, "three"),
        [1, [2, [3]]],
        {"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "label": 3},
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.asfortranarray(rng.standard_normal((50, 70)).astype(np.float32)),
        np.array(3.5),
        np.zeros((0, 4), dtype=np.int16),
        rng.integers(0, 2**62, (300, 300), dtype=np.int64),  # 720 KB: out of band
        np.array([True, False]),
        (np.ones(10_000, dtype=np.complex64), {"nested": np.arange(5)}),
    ]


def assert_same(got: Any, want: Any) -> None:
    """Deep equality that also checks numpy dtype, shape and values."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert got == want and type(got) is type(want)


def assert_second_iteration_refused(runner: fp.Runner, timeout: float = 30.0) -> None:
    """Iterate ``runner`` here and check that another thread iterating it at the same time
    gets :class:`~flowplug.StateError`; the first iteration is closed again."""
    outer = iter(runner)
    next(outer)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            next(iter(runner))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=second)
    t.start()
    t.join(timeout)
    try:
        assert len(errors) == 1 and isinstance(errors[0], fp.StateError), errors
    finally:
        outer.close()


# ---------------------------------------------------------------------------- the suite


class TransportContract:
    """Subclass and provide a ``transport`` fixture returning a registered name."""

    @pytest.fixture
    def crosses_processes(self, transport: str) -> bool:
        return fp.get_transport(transport).crosses_processes

    @pytest.fixture(autouse=True)
    def _no_leaks(self):
        with check_leaks():
            yield

    # -- delivery

    def test_one_worker_preserves_order(self, transport):
        with fp.Runner(Counting(100), transport=transport, num_workers=1) as runner:
            assert list(runner) == list(range(100))
            assert list(runner) == list(range(100))  # the next epoch, in order again

    def test_epoch_has_len_items(self, transport):
        with fp.Runner(
            Counting(37), transport=transport, num_workers=3, mode="replicate"
        ) as runner:
            assert len(runner) == 37
            for _ in range(3):
                assert len(list(runner)) == 37

    def test_every_worker_contributes(self, transport):
        seen: Counter = Counter()
        deadline = time.monotonic() + 20
        with fp.Runner(
            Counting(10, tag=True), transport=transport, num_workers=3, mode="replicate"
        ) as runner:
            while len(seen) < 3 and time.monotonic() < deadline:
                seen.update(w for w, _ in runner)
        assert set(seen) == {0, 1, 2}

    def test_worker_info(self, transport):
        assert fp.worker_info() is None
        with fp.Runner(InfoFlow(), transport=transport, num_workers=2, seed=100) as runner:
            got = set()
            for dp in runner:
                got.add(dp)
                if len(got) == 2:
                    break
        assert got == {(0, 2, 100), (1, 2, 101)}

    @pytest.mark.parametrize("index", range(len(payloads())))
    def test_payload_round_trips_exactly(self, transport, index):
        want = payloads()[index]
        with fp.Runner(fp.DataFromList([want]), transport=transport) as runner:
            (got,) = list(runner)
        assert_same(got, want)

    def test_unknown_length_runs_until_closed(self, transport):
        runner = fp.Runner(fp.DataFromGenerator(lambda: iter(range(3))), transport=transport)
        with runner:
            with pytest.raises(NotImplementedError):
                len(runner)
            got = []
            for dp in runner:
                got.append(dp)
                if len(got) == 10:
                    break
        assert got == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]

    # -- errors

    def test_worker_exception_becomes_worker_error(self, transport):
        runner = fp.Runner(RaiseAfter(5), transport=transport, num_workers=2)
        got: list[int] = []
        with pytest.raises(fp.WorkerError) as info:
            for _ in range(10):
                got.extend(runner)
        err = info.value
        assert err.exc_type == "ValueError"
        assert "boom after 5 items" in str(err)
        assert "Traceback" in err.remote_traceback and "in __iter__" in err.remote_traceback
        assert set(got) <= set(range(5))
        with pytest.raises(fp.StateError):
            list(runner)  # a failed runner is closed
        runner.close()

    def test_reset_state_failure_names_the_worker(self, transport):
        with fp.Runner(FailingReset(), transport=transport, num_workers=1) as runner:
            with pytest.raises(fp.WorkerError, match=r"worker 0 .*reset_state.*data file"):
                next(iter(runner))

    def test_dead_worker_is_reported(self, transport, crosses_processes):
        """A process that dies without a word raises WorkerDied, quickly. A thread cannot
        die alone (os._exit would end the consumer): one that calls sys.exit() is reported
        as a WorkerError."""
        if not crosses_processes:
            runner = fp.Runner(DieAfter(3, "sysexit"), transport=transport)
            with pytest.raises(fp.WorkerError, match="SystemExit"):
                for _ in range(5):
                    list(runner)
            runner.close()
            return
        for how in ("exit", "kill"):
            runner = fp.Runner(DieAfter(3, how), transport=transport, num_workers=1)
            start = time.monotonic()
            with pytest.raises(fp.WorkerDied) as info:
                for _ in range(5):
                    list(runner)
            assert time.monotonic() - start < 5
            err = info.value
            assert err.pid is not None and err.worker_id == 0
            assert err.exitcode == (7 if how == "exit" else -signal.SIGKILL)
            assert (str(err.pid) in str(err)) and ("SIGKILL" in str(err) or "code 7" in str(err))
            runner.close()

    def test_timeout(self, transport):
        with fp.Runner(Slow(1.5), transport=transport, timeout=0.3) as runner:
            start = time.monotonic()
            with pytest.raises(fp.RunnerTimeout, match=r"0\.3"):
                next(iter(runner))
            assert time.monotonic() - start < 3
        # closing after a timeout works (the with block did it) and is idempotent
        runner.close()

    # -- guards and lifecycle

    def test_reset_state_twice_is_an_error(self, transport):
        runner = fp.Runner(Counting(3), transport=transport)
        runner.reset_state()
        with pytest.raises(fp.StateError, match="twice"):
            runner.reset_state()
        runner.close()
        runner.close()

    def test_nested_iteration_is_an_error(self, transport):
        with fp.Runner(Counting(5), transport=transport) as runner:
            outer = iter(runner)
            next(outer)
            with pytest.raises(fp.StateError, match="already being iterated"):
                next(iter(runner))
            outer.close()
            assert list(runner)  # usable again once the first loop is gone

    def test_two_threads_iterating_one_runner(self, transport):
        with fp.Runner(Counting(10**6), transport=transport) as runner:
            assert_second_iteration_refused(runner)

    def test_iterating_a_closed_runner_is_an_error(self, transport):
        runner = fp.Runner(Counting(3), transport=transport)
        runner.close()
        with pytest.raises(fp.StateError, match="closed"):
            list(runner)

    def test_iterating_starts_the_runner(self, transport):
        runner = fp.Runner(Counting(4), transport=transport)
        try:
            assert list(runner) == [0, 1, 2, 3]
        finally:
            runner.close()

    def test_dropping_the_runner_releases_everything(self, transport):
        runner = fp.Runner(Counting(10**6), transport=transport, num_workers=2, mode="replicate")
        for i, _ in enumerate(runner):
            if i == 5:
                break
        del runner  # no close(): gc must do it (the leak check verifies)

    def test_start_close_cycles_leave_nothing(self, transport):
        for _ in range(200 if os.environ.get("FLOWPLUG_LONG_TESTS") else 50):
            with fp.Runner(
                Counting(1000), transport=transport, num_workers=2, mode="replicate"
            ) as runner:
                next(iter(runner))

    # -- shard mode and ParallelMap (the task channel)

    @pytest.mark.parametrize("ordered", [False, True])
    def test_shard_mode_delivers_every_item_once(self, transport, ordered):
        items = list(range(41))
        runner = fp.Runner(
            fp.DataFromList(items),
            transport=transport,
            num_workers=3,
            capacity=6,
            mode="shard",
            ordered=ordered,
        )
        with runner:
            for _ in range(2):
                got = list(runner)
                assert (got if ordered else sorted(got)) == items
            it = iter(runner)
            next(it)
            it.close()  # an epoch broken off early leaves nothing behind for the next
            got = list(runner)
            assert (got if ordered else sorted(got)) == items

    def test_parallel_map_carries_every_payload(self, transport):
        if not fp.get_transport(transport).carries_tasks:
            with pytest.raises(fp.ConfigError, match="cannot carry tasks"):
                fp.ParallelMap(fp.DataFromList([1]), identity, transport=transport)
            return
        want = payloads()
        with fp.ParallelMap(
            fp.DataFromList(want), identity, num_workers=2, transport=transport
        ) as results:
            for _ in range(2):
                got = list(results)
                assert len(got) == len(want)
                for g, w in zip(got, want, strict=True):
                    assert_same(g, w)
