"""Runner(mode="shard"): every item exactly once per epoch, in order when asked, on every
transport; epochs never mix, early breaks leave nothing stale, faults behave as in
replicate mode."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowplug as fp
from flowplug.testing.contract import FailingReset

TRANSPORTS = sorted(fp.available_transports())

# Module-level dataflows, so that they pickle for every start method.


class Passes(fp.DataFlow):
    """Yield ``(pass number, i)`` for i < n; the pass number counts this copy's passes,
    so an item of an older epoch is recognisable. ``shard()`` only when ``shardable``."""

    def __init__(self, n: int, known_length: bool = True, start: int = 0, step: int = 1):
        self.n = n
        self.known_length = known_length
        self.start = start
        self.step = step
        self.passes = -1

    def __len__(self) -> int:
        if not self.known_length:
            raise fp.UnknownLength("unknown on purpose")
        return self.n

    def __iter__(self):
        self.passes += 1
        for i in range(self.start, self.n, self.step):
            yield (self.passes, i)


class ShardablePasses(Passes):
    def shard(self, index: int, count: int) -> Passes:
        return Passes(self.n, self.known_length, start=index, step=count)


class Recording(fp.DataFlow):
    """Yield 0..n-1 and append one byte to ``path`` per item produced (O_APPEND is atomic,
    so worker processes can share the file): the file size counts what workers made."""

    def __init__(self, n: int, path: str, start: int = 0, step: int = 1, slow_first: float = 0):
        self.n = n
        self.path = path
        self.start = start
        self.step = step
        self.slow_first = slow_first

    def __len__(self) -> int:
        return self.n

    def shard(self, index: int, count: int) -> Recording:
        return Recording(self.n, self.path, index, count, self.slow_first if index == 0 else 0)

    def __iter__(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            for i in range(self.start, self.n, self.step):
                if i == 0 and self.slow_first:
                    time.sleep(self.slow_first)
                os.write(fd, b"x")
                yield i
        finally:
            os.close(fd)


class NoFullPass(fp.DataFromList):
    """Refuses a full pass in a worker: only its shards may be iterated there."""

    def __iter__(self):
        if fp.worker_info() is not None:
            raise AssertionError("a worker iterated the whole dataflow instead of its shard")
        return super().__iter__()


class RaiseAt(fp.DataFlow):
    def __init__(self, k: int):
        self.k = k

    def __iter__(self):
        for i in range(100):
            if i == self.k:
                raise ValueError(f"boom at {i}")
            yield i


class DieAt(fp.DataFlow):
    """Die without a word at item 7: ``os._exit`` in a process; a thread cannot (it would
    end the consumer), so there ``sys.exit``, which the thread reports."""

    def __iter__(self):
        for i in range(100):
            if i == 7:
                if threading.current_thread() is threading.main_thread():
                    os._exit(9)
                sys.exit(9)
            yield i


class Stuck(fp.DataFlow):
    """One item, then nothing for 1.5 s (short enough for a worker thread to end)."""

    def __iter__(self):
        yield 0
        time.sleep(1.5)
        yield 1


def produced(path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def check_epoch(
    got: list, seen: dict, num_workers: int, n: int, ordered: bool, complete: bool
) -> None:
    """Items of one epoch: each at most once (exactly once when complete), in source order
    when ordered, and fresh: from one pass per worker, later than any pass of that worker
    in an earlier epoch (a worker that skips an abandoned epoch makes no pass for it)."""
    passes: dict[int, set[int]] = {}
    for p, i in got:
        passes.setdefault(i % num_workers, set()).add(p)
    for worker, ps in passes.items():
        assert len(ps) == 1, f"worker {worker} mixed passes {ps}: {got}"
        assert min(ps) > seen.get(worker, -1), f"stale items of worker {worker}: {got}"
        seen[worker] = min(ps)
    values = [i for _, i in got]
    if ordered:
        assert values == list(range(len(values)))
    assert max(Counter(values).values(), default=1) == 1, f"duplicates: {values}"
    assert set(values) <= set(range(n))
    if complete:
        assert len(values) == n


# ---------------------------------------------------------------------------- properties


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    transport=st.sampled_from(TRANSPORTS),
    n=st.integers(0, 40),
    num_workers=st.integers(1, 3),
    extra_capacity=st.integers(0, 10),
    ordered=st.booleans(),
    shardable=st.booleans(),
    known_length=st.booleans(),
    breaks=st.lists(st.one_of(st.none(), st.integers(1, 45)), min_size=3, max_size=4),
)
def test_every_item_exactly_once_per_epoch(
    no_leaks,
    transport,
    n,
    num_workers,
    extra_capacity,
    ordered,
    shardable,
    known_length,
    breaks,
):
    """Over several epochs, some broken off early: a complete epoch is the source's pass
    (as a multiset, or as a sequence when ordered), a broken one a clean part of it, and
    nothing of an earlier epoch ever shows up in a later one."""
    df = (ShardablePasses if shardable else Passes)(n, known_length)
    with fp.Runner(
        df,
        transport=transport,
        num_workers=num_workers,
        capacity=num_workers + extra_capacity,
        mode="shard",
        ordered=ordered,
    ) as runner:
        seen: dict[int, int] = {}
        broken_before = False
        for stop_after in [*breaks, None]:
            got = []
            try:
                for dp in runner:
                    got.append(dp)
                    if stop_after is not None and len(got) == stop_after:
                        break
            except fp.ShardMismatch:
                # Passes' items carry each copy's own pass count. Without shard(), a worker
                # that skipped an abandoned epoch makes passes that differ from the others':
                # the pass check must say so (never deliver them); nothing else may raise it.
                assert not shardable and num_workers > 1 and broken_before, got
                check_epoch(got, seen, num_workers, n, ordered, complete=False)
                return
            complete = stop_after is None or stop_after > n
            check_epoch(got, seen, num_workers, n, ordered, complete)
            broken_before = broken_before or not complete


def test_ordered_reorder_buffer_stays_within_capacity(no_leaks, tmp_path):
    """Worker 0 is slow on item 0; the others may not run ahead of what the consumer
    yielded by more than ``capacity`` items (plus the one each worker holds while it waits
    for a credit)."""
    for transport in TRANSPORTS:
        path = str(tmp_path / f"{transport}.log")
        capacity, workers, n = 6, 3, 60
        df = Recording(n, path, slow_first=0.5)
        with fp.Runner(
            df,
            transport=transport,
            num_workers=workers,
            capacity=capacity,
            mode="shard",
            ordered=True,
        ) as runner:
            worst = 0
            for consumed, i in enumerate(runner):
                assert i == consumed
                worst = max(worst, produced(path) - (consumed + 1))
            time.sleep(0.3)  # prefetching epoch 1 is bounded the same way
            ahead = produced(path) - n
        assert worst <= capacity + workers, (transport, worst)
        assert ahead <= capacity + workers, (transport, ahead)


# ---------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workers_prefetch_the_next_epoch_and_no_further(no_leaks, transport, tmp_path):
    path = str(tmp_path / "log")
    n = 12
    with fp.Runner(
        Recording(n, path), transport=transport, num_workers=2, capacity=30, mode="shard"
    ) as runner:
        assert sorted(runner) == list(range(n))
        deadline = time.monotonic() + 20
        while produced(path) < 2 * n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert produced(path) == 2 * n  # epoch 1 made while nobody iterates
        time.sleep(0.3)
        assert produced(path) == 2 * n  # but not epoch 2: one epoch ahead at most
        assert sorted(runner) == list(range(n))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shard_method_replaces_the_full_pass(no_leaks, transport):
    items = [f"item{i}" for i in range(17)]
    with fp.Runner(
        NoFullPass(items), transport=transport, num_workers=3, mode="shard", ordered=True
    ) as runner:
        assert list(runner) == items
        assert list(runner) == items


class Blocks(fp.DataFromList):
    """Shards of unequal, contiguous blocks: not the modulo split (``sizes`` per worker)."""

    def __init__(self, items, sizes):
        super().__init__(items)
        self.sizes = sizes

    def shard(self, index, count):
        start = sum(self.sizes[:index])
        return fp.DataFromList(self.items[start : start + self.sizes[index]])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_any_split_gives_every_item_once_in_round_robin_order(no_leaks, transport):
    """A shard() that is not the modulo split still gives every item once; ordered, the
    shards take turns, a shard that ran out dropping out of the turns."""
    items = list("abcdefghij")
    sizes = [6, 0, 3, 1]
    with fp.Runner(
        Blocks(items, sizes), transport=transport, num_workers=4, mode="shard", ordered=True
    ) as runner:
        for _ in range(2):
            assert "".join(runner) == "agjbhcidef"
    with fp.Runner(Blocks(items, sizes), transport=transport, num_workers=4, mode="shard") as r:
        assert sorted(r) == items


def test_data_from_list_shards_like_modulo():
    df = fp.DataFromList(range(10))
    assert [list(df.shard(i, 3)) for i in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    shuffled = fp.DataFromList(range(10), shuffle=True)
    assert sorted(shuffled.shard(1, 3)) == [1, 4, 7]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shuffled_list_still_gives_every_item_once(no_leaks, transport):
    with fp.Runner(
        fp.DataFromList(range(50), shuffle=True),
        transport=transport,
        num_workers=2,
        mode="shard",
    ) as runner:
        for _ in range(3):
            assert sorted(runner) == list(range(50))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_more_workers_than_items(no_leaks, transport):
    with fp.Runner(
        fp.DataFromList(["a"]), transport=transport, num_workers=3, mode="shard", ordered=True
    ) as runner:
        for _ in range(3):
            assert list(runner) == ["a"]
    with fp.Runner(fp.DataFromList([]), transport=transport, num_workers=2, mode="shard") as r:
        assert list(r) == [] and list(r) == []


def test_len_is_one_pass():
    runner = fp.Runner(fp.DataFromList(range(7)), transport="thread", mode="shard")
    with runner:
        assert len(runner) == 7 and len(list(runner)) == 7


# ---------------------------------------------------------------------------- settings


def test_mode_and_ordered_are_checked():
    with pytest.raises(fp.ConfigError, match="Did you mean 'shard'"):
        fp.Runner(fp.DataFromList([1]), transport="thread", mode="shards")
    with pytest.raises(fp.ConfigError, match="ordered=True needs mode='shard'"):
        fp.Runner(fp.DataFromList([1]), transport="thread", ordered=True)
    with pytest.raises(fp.ConfigError, match="capacity >= num_workers"):
        fp.Runner(fp.DataFromList([1]), transport="thread", num_workers=4, capacity=3, mode="shard")


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_error_in_shard_mode(no_leaks, transport, ordered):
    runner = fp.Runner(
        RaiseAt(9), transport=transport, num_workers=2, mode="shard", ordered=ordered
    )
    with pytest.raises(fp.WorkerError, match="boom at 9") as info:
        list(runner)
    assert info.value.exc_type == "ValueError" and info.value.index is None
    with pytest.raises(fp.StateError, match="closed"):
        list(runner)
    runner.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reset_state_failure_in_shard_mode(no_leaks, transport):
    with fp.Runner(FailingReset(), transport=transport, mode="shard") as runner:
        with pytest.raises(fp.WorkerError, match=r"worker 0 .*reset_state.*data file"):
            list(runner)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_worker_in_shard_mode(no_leaks, transport):
    runner = fp.Runner(DieAt(), transport=transport, num_workers=2, mode="shard", ordered=True)
    if not fp.get_transport(transport).crosses_processes:
        with pytest.raises(fp.WorkerError, match="SystemExit"):
            list(runner)
        runner.close()
        return
    start = time.monotonic()
    with pytest.raises(fp.WorkerDied, match="code 9") as info:
        list(runner)
    assert time.monotonic() - start < 10
    assert info.value.exitcode == 9
    runner.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_in_shard_mode(no_leaks, transport):
    with fp.Runner(Stuck(), transport=transport, mode="shard", timeout=0.3) as runner:
        it = iter(runner)
        assert next(it) == 0
        with pytest.raises(fp.RunnerTimeout, match=r"0\.3"):
            next(it)


# ---------------------------------------------------------------------------- batching


class BatchingSender(fp.Sender):
    """Holds everything until flush() (or 1000 items): a transport that batches small
    items. Shard mode and ParallelMap must flush before they wait, or they would wait
    for items stuck here."""

    def __init__(self, inner: fp.Sender):
        self.inner = inner
        self.held: list = []

    def send(self, obj):
        self.held.append(obj)
        if len(self.held) >= 1000:
            self.flush()

    def flush(self):
        for obj in self.held:
            self.inner.send(obj)
        self.held.clear()

    def close(self):
        self.flush()
        self.inner.close()


class BatchingEndpoint(fp.Endpoint):
    def __init__(self, inner):
        self.inner = inner

    def connect(self, worker_id: int) -> BatchingSender:
        return BatchingSender(self.inner(worker_id))


@pytest.fixture
def batching_transport():
    from flowplug.plugins import PluginInfo, get_registry

    class BatchingThreads(fp.get_transport("thread")):
        name = "batching"

        def open(self):
            return BatchingEndpoint(super().open())

    get_registry().register(BatchingThreads, origin=PluginInfo("batching", "test", "0"))
    return "batching"


def triple(x):
    return 3 * x


def test_a_batching_sender_is_flushed_before_waiting(no_leaks, batching_transport):
    items = list(range(30))
    with fp.Runner(
        fp.DataFromList(items),
        transport=batching_transport,
        num_workers=2,
        capacity=4,
        mode="shard",
        ordered=True,
        timeout=10,
    ) as runner:
        for _ in range(3):
            assert list(runner) == items
    with fp.ParallelMap(
        fp.DataFromList(items),
        triple,
        num_workers=2,
        transport=batching_transport,
        capacity=3,
        timeout=10,
    ) as results:
        assert list(results) == [3 * i for i in items]
