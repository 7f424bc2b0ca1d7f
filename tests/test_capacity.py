"""``capacity`` bounds the datapoints made and not yet delivered, across the workers.

docs/configuration.md: in replicate mode, at most ``max(capacity, num_workers)``
datapoints have been made by the workers' dataflows and not yet returned by ``next()``,
whatever the transport, the batching of small items or the kernel's buffers. Each worker
counts what its dataflow made in shared memory; a slow consumer compares that with what
it received after every ``next()``.
"""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

import flowplug as fp

#: every transport whose workers the Runner starts (processes or threads).
TRANSPORTS = sorted(name for name, cls in fp.available_transports().items() if not cls.runs_workers)


class Counted(fp.DataFlow):
    """Yields ``(worker id, i, payload)`` forever, counting each datapoint in ``made[id]``
    just before it yields it. ``made`` is an anonymous shared mapping: forked workers and
    threads write the consumer's."""

    def __init__(self, made: memoryview, size: int = 0):
        self.made = made
        self.size = size

    def __iter__(self):
        wid = fp.worker_info().id
        payload = np.ones(self.size, np.uint8) if self.size else None
        made = self.made
        i = 0
        while True:
            made[wid] = i + 1
            yield (wid, i, payload)
            i += 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("capacity", "workers", "size"),
    [(4, 4, 0), (6, 2, 0), (5, 3, 1 << 20), (4, 4, 8 << 20), (2, 4, 0), (1, 1, 0)],
    ids=["4-over-4", "6-over-2", "5-over-3-1MiB", "4-over-4-8MiB", "2-over-4", "1-over-1"],
)
def test_capacity_bounds_what_is_made_and_not_yet_delivered(
    no_leaks, transport, capacity, workers, size
):
    cls = fp.get_transport(transport)
    made = memoryview(mmap.mmap(-1, 8 * workers)).cast("q")
    bound = max(capacity, workers)
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    items = 60 if size >= (8 << 20) else 200
    last: dict[int, int] = {}
    worst = 0
    with fp.Runner(
        lambda: Counted(made, size),  # a factory: the mapping is the consumer's, not a copy
        transport=transport,
        num_workers=workers,
        capacity=capacity,
        mode="replicate",
        **kw,
    ) as runner:
        it = iter(runner)
        for received in range(1, items + 1):
            wid, i, payload = next(it)
            worst = max(worst, sum(made) - received)
            # per worker, in order, nothing lost, nothing twice
            assert i == last.get(wid, -1) + 1, (wid, last.get(wid), i)
            last[wid] = i
            if size:
                assert payload.shape == (size,) and payload[-1] == 1
            time.sleep(0.002)  # a slow consumer: the workers fill whatever there is
        time.sleep(0.3)  # the workers, blocked now, may not have gone past the bound
        worst = max(worst, sum(made) - items)
    assert worst <= bound, f"{worst} datapoints made and not yet delivered, bound {bound}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("capacity", "workers"), [(12, 3), (50, 1), (3, 2)])
def test_credits_flow_through_bursts_and_pauses(no_leaks, transport, capacity, workers):
    """A consumer that takes bursts of datapoints and pauses in between: workers sleep for
    credits and are woken again (with a refill, or with what is held back when the
    consumer is about to wait), in every interleaving; nothing hangs, nothing is lost
    or repeated, and the bound holds throughout."""
    cls = fp.get_transport(transport)
    made = memoryview(mmap.mmap(-1, 8 * workers)).cast("q")
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    rng = np.random.default_rng(capacity * 10 + workers)
    last: dict[int, int] = {}
    worst = 0
    received = 0
    with fp.Runner(
        lambda: Counted(made),
        transport=transport,
        num_workers=workers,
        capacity=capacity,
        mode="replicate",
        **kw,
    ) as runner:
        it = iter(runner)
        while received < 3000:
            for _ in range(int(rng.integers(1, 2 * capacity + 2))):
                wid, i, _ = next(it)
                received += 1
                assert i == last.get(wid, -1) + 1, (wid, last.get(wid), i)
                last[wid] = i
                worst = max(worst, sum(made) - received)
            if rng.random() < 0.3:
                time.sleep(float(rng.random()) * 0.003)  # the workers fill up and sleep
    assert worst <= max(capacity, workers), worst
    assert sum(last.values()) + len(last) == received


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_shard_credits_flow_through_bursts_and_pauses(no_leaks, transport, ordered):
    """Shard mode gives credits back the same way (held for a refill while a worker
    sleeps): with bursts and pauses, every epoch is still each item exactly once, and
    breaking out of an epoch mid-way loses no credit (the next epochs complete)."""
    cls = fp.get_transport(transport)
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    rng = np.random.default_rng(7)
    with fp.Runner(
        fp.DataFromList(range(300)),
        transport=transport,
        num_workers=3,
        capacity=12,
        mode="shard",
        ordered=ordered,
        **kw,
    ) as runner:
        for epoch in range(4):
            got = []
            for x in runner:
                got.append(x)
                if rng.random() < 0.05:
                    time.sleep(float(rng.random()) * 0.003)
                if epoch == 1 and len(got) == 100:
                    break  # the rest of this epoch is dropped, its credits given back
            if epoch == 1:
                continue
            assert sorted(got) == list(range(300))
            if ordered:
                assert got == list(range(300))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unset_capacity_lets_small_datapoints_run_further_ahead(no_leaks, transport):
    """Left unset, capacity is automatic in replicate mode: small datapoints may be made
    further ahead than the default of 50 (up to flowplug._gates.AUTO_CEILING), large ones
    no further than what fits in AUTO_BUDGET bytes, and never fewer than 50."""
    from flowplug._gates import AUTO_BUDGET, AUTO_CEILING

    cls = fp.get_transport(transport)
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    # zmq and queue bound messages, and batch small datapoints into them: more credits
    # let them run further ahead; shm sizes its rings by max_in_flight (the ceiling).
    # thread bounds datapoints itself, by capacity (50 here: a queue entry each).
    further = 51 if transport in ("zmq", "queue", "shm") else 50
    for size, low, high in [
        (0, further, AUTO_CEILING),  # tiny: further than 50
        (1 << 20, 1, AUTO_BUDGET // (1 << 20)),  # 1 MiB: what fits in the budget
        (8 << 20, 1, 50),  # 8 MiB: the default, no more
    ]:
        made = memoryview(mmap.mmap(-1, 8)).cast("q")
        received = 0
        worst = 0
        with fp.Runner(
            lambda made=made, size=size: Counted(made, size),
            transport=transport,
            mode="replicate",
            **kw,
        ) as runner:
            assert runner.capacity == 50  # what the transports' own bounds use
            it = iter(runner)
            for _ in range(3):  # the worker fills its credits while the consumer sleeps
                time.sleep(0.3)
                for _ in range(20):
                    next(it)
                    received += 1
                    worst = max(worst, made[0] - received)
        assert low <= worst <= high, (size, worst)


def test_a_transport_learns_how_many_datapoints_the_credits_may_let_through(no_leaks, monkeypatch):
    """``max_in_flight``: the automatic ceiling when capacity is left unset (replicate
    mode), else ``capacity`` (a set capacity, shard mode), for a transport that counts
    datapoints itself (shm sizes its rings by it)."""
    from flowplug._gates import AUTO_CEILING

    cls = fp.get_transport("thread")
    seen = []
    real_open = cls.open

    def open_and_note(self):
        seen.append((self.capacity, self.max_in_flight))
        return real_open(self)

    monkeypatch.setattr(cls, "open", open_and_note)
    runs = [
        ({"mode": "replicate"}, (50, AUTO_CEILING)),
        ({"mode": "replicate", "capacity": 8}, (8, 8)),
        ({"mode": "shard"}, (50, 50)),
    ]
    for kwargs, expected in runs:
        df = fp.DataFromList(list(range(10)))
        with fp.Runner(df, transport="thread", num_workers=2, **kwargs) as runner:
            assert next(iter(runner)) in range(10)
        assert seen.pop() == expected, kwargs
    transport = cls(capacity=6, num_workers=1, run_id="fp-1-direct")
    assert transport.max_in_flight == 6  # built by hand: capacity


def test_nbytes_estimates_arrays_buffers_strings_and_containers():
    from flowplug._gates import nbytes

    arr = np.zeros((4, 1000), np.float64)
    assert nbytes(arr) == 32000
    assert nbytes(b"x" * 100) == 100 and nbytes("y" * 50) == 50
    d = {"a": arr, "b": arr[:2]}
    assert 48000 <= nbytes(d) <= 48000 + 1000  # the arrays, and the dict itself
    big = [arr[:1]] * 640  # 640 views of 8000 bytes: sampled (64), scaled to the length
    assert 640 * 8000 <= nbytes(big) <= 640 * 8000 + 10000


def test_auto_credits_move_towards_what_fits_and_never_wait():
    import multiprocessing as mp

    from flowplug._gates import Auto

    sem = mp.get_context("fork").Semaphore(2)  # a worker's 2 credits, the floor
    auto = Auto(floor=2, ceiling=10, budget=1000)
    assert auto.adjust(sem, 2, b"x" * 100) == 10  # 100 bytes: 10 fit, the ceiling
    assert sem.get_value() == 10
    for _ in range(7):  # 7 datapoints out: 3 credits free
        sem.acquire()
    # 500 bytes: 2 fit; only the free ones can be taken out now
    assert auto.adjust(sem, 10, b"x" * 500) == 7 and sem.get_value() == 0
    for _ in range(7):  # the consumer gives them back
        sem.release()
    assert auto.adjust(sem, 7, b"x" * 500) == 2 and sem.get_value() == 2
    # smaller again: the estimate falls by an eighth per call, never below the floor
    assert auto.adjust(sem, 2, b"x" * 10) == 2
    assert auto.size < 500
