"""runner.stats(): counts, the verdict (who waits on whom), per-worker numbers in shard
mode, transport counters; the flowplug_runner_stats hook; logging to "flowplug"."""

from __future__ import annotations

import json
import logging
import mmap
import pickle
import time

import numpy as np
import pytest

import flowplug as fp
import flowplug.stats
from flowplug.plugins import get_registry

TRANSPORTS = sorted(fp.available_transports())


def slow(x):
    time.sleep(0.003)
    return x


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_workers_make_an_input_bound_verdict(no_leaks, transport):
    with fp.Runner(
        fp.DataFromGenerator(lambda: map(slow, range(60)), size=60),
        transport=transport,
        num_workers=1,
        mode="shard",
    ) as runner:
        assert sorted(runner) == list(range(60))
        stats = runner.stats()
    assert stats.delivered == 60
    assert stats.input_bound, stats.summary()
    assert stats.verdict == "input-bound: the consumer waits on the workers"
    assert stats.consumer_blocked_fraction > 0.5
    assert stats.consumer_blocked_s <= stats.elapsed_s - stats.startup_s
    assert stats.transport == transport and stats.mode == "shard"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_slow_consumer_makes_the_workers_wait(no_leaks, transport):
    with fp.Runner(
        fp.DataFromList(range(40)), transport=transport, num_workers=2, capacity=4, mode="shard"
    ) as runner:
        for _ in runner:
            time.sleep(0.005)
        stats = runner.stats()
    assert not stats.input_bound, stats.summary()
    assert stats.verdict == "consumer-bound: the workers wait on the consumer"
    assert [w.id for w in stats.workers] == [0, 1]
    # Each made its 20, and is one epoch ahead at most; both waited for credits.
    assert all(20 <= w.produced <= 40 for w in stats.workers), stats.workers
    assert all(w.blocked_s > 0.02 for w in stats.workers), stats.workers


@pytest.mark.parametrize("transport", ["thread", "zmq"])
def test_map_counts_per_worker_too(no_leaks, transport):
    """A map's workers count the tasks they answered and their waits for a task."""
    with fp.ParallelMap(fp.DataFromList(range(30)), slow, num_workers=2, transport=transport) as m:
        assert len(list(m)) == 30 and len(list(m)) == 30
        stats = m.stats()
    assert stats.delivered == 60 and stats.mode == "map"
    assert [w.id for w in stats.workers] == [0, 1]
    assert sum(w.produced for w in stats.workers) == 60, stats.workers
    assert all(w.blocked_s >= 0 for w in stats.workers)
    # A consumer slower than the workers: they wait for tasks.
    with fp.ParallelMap(fp.DataFromList(range(20)), abs, num_workers=2, transport=transport,
                        capacity=2) as m:  # fmt: skip
        for _ in m:
            time.sleep(0.01)
        stats = m.stats()
    assert sum(w.blocked_s for w in stats.workers) > 0.05, stats.workers


#: transports whose workers the Runner starts (a group the transport runs counts nothing).
STARTED = sorted(n for n, cls in fp.available_transports().items() if not cls.runs_workers)


class Counted(fp.DataFlow):
    """Yields ``(worker id, i)`` forever, counting each datapoint in ``made[id]`` just
    before it yields it (an anonymous shared mapping: forked workers write the consumer's)."""

    def __init__(self, made: memoryview):
        self.made = made

    def __iter__(self):
        wid = fp.worker_info().id
        made = self.made
        i = 0
        while True:
            made[wid] = i + 1
            yield (wid, i)
            i += 1


def _blocked_with(runner, made, workers, deadline=20.0):
    """Wait until every worker's published count is what its dataflow made and its
    blocked time grows between two looks (it is then blocked for room, and its wait is
    counted as it goes: the consumer takes nothing meanwhile); return the later stats."""
    end = time.monotonic() + deadline
    before = runner.stats()
    while True:
        time.sleep(0.01)
        stats = runner.stats()
        if [w.produced for w in stats.workers] == list(made[:workers]) and all(
            b.blocked_s > a.blocked_s for a, b in zip(before.workers, stats.workers, strict=True)
        ):
            return stats
        assert time.monotonic() < end, (stats.workers, list(made[:workers]))
        before = stats


@pytest.mark.parametrize("transport", STARTED)
def test_replicate_mode_counts_per_worker_what_it_made_and_its_waits(no_leaks, transport):
    made = memoryview(mmap.mmap(-1, 8 * 2)).cast("q")
    cls = fp.get_transport(transport)
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    with fp.Runner(
        lambda: Counted(made), transport=transport, num_workers=2, capacity=6, mode="replicate",
        **kw,
    ) as runner:  # fmt: skip
        it = iter(runner)
        for _ in range(30):  # a slow consumer: the workers fill their credits and wait
            next(it)
            time.sleep(0.003)
        first = _blocked_with(runner, made, 2)
        time.sleep(0.2)
        second = runner.stats()
        # nothing was taken meanwhile: the same counts, and 0.2 s more of blocking each
        # (the wait a worker is in counts as it goes)
        assert [w.produced for w in second.workers] == list(made[:2])
        for a, b in zip(first.workers, second.workers, strict=True):
            assert b.blocked_s - a.blocked_s >= 0.2 - 1e-3, (first.workers, second.workers)
        assert sum(w.produced for w in second.workers) <= 30 + 6  # the capacity bound
        assert second.delivered == 30 and second.mode == "replicate"
        assert not second.input_bound, second.summary()


@pytest.mark.parametrize("transport", STARTED)
def test_replicate_mode_counts_are_published_while_the_workers_run(no_leaks, transport):
    """A consumer that never makes a worker wait still sees its counts grow (published
    every few dozen datapoints), never above what the dataflow made."""
    made = memoryview(mmap.mmap(-1, 8)).cast("q")
    cls = fp.get_transport(transport)
    kw = {"start_method": "fork"} if cls.crosses_processes else {}
    with fp.Runner(
        lambda: Counted(made), transport=transport, num_workers=1, capacity=1000,
        mode="replicate", **kw,
    ) as runner:  # fmt: skip
        it = iter(runner)
        for _ in range(500):
            next(it)
        (worker,) = runner.stats().workers
        assert 500 - 64 <= worker.produced <= made[0], (worker, made[0])


def test_replicate_workers_started_with_spawn_are_not_counted(no_leaks):
    with fp.Runner(
        fp.DataFromList(range(5)), transport="queue", num_workers=2, mode="replicate",
        start_method="spawn",
    ) as runner:  # fmt: skip
        assert len(list(runner)) == 5
        stats = runner.stats()
    assert stats.delivered == 5 and stats.workers is None


@pytest.mark.parametrize("transport", ["zmq", "queue", "shm"])
@pytest.mark.parametrize("size", [256 << 10, 0], ids=["256KiB", "small"])
def test_bytes_delivered_is_what_the_transport_received(no_leaks, transport, size):
    """zmq and queue count the bytes of each message they receive (a batch of small
    datapoints is one message), shm the bytes of each object, batch block or ring slot it
    takes: at least the datapoints' own bytes, at most what the capacity lets arrive
    beyond them (the next epoch's prefetch), each with its framing."""
    items = [np.full(size, i, np.uint8) if size else {"i": i, "name": "x" * 50} for i in range(10)]
    one = len(pickle.dumps(items[0], protocol=5))
    with fp.Runner(
        fp.DataFromList(items), transport=transport, num_workers=2, capacity=4, mode="shard"
    ) as runner:
        assert len(list(runner)) == 10
        got = runner.stats().bytes_delivered
    assert got is not None
    assert 10 * (size or one) <= got <= (10 + 4) * (one + 256), (got, one)


def test_the_thread_transport_counts_no_bytes(no_leaks):
    """Its workers hand over references: no bytes move, none are counted."""
    with fp.Runner(fp.DataFromList(range(3)), transport="thread", mode="shard") as runner:
        list(runner)
        assert runner.stats().bytes_delivered is None


def test_stats_as_a_dict_and_before_the_start():
    runner = fp.Runner(fp.DataFromList(range(3)), transport="thread", mode="shard")
    stats = runner.stats()
    assert stats.delivered == 0 and stats.verdict == flowplug.stats.NO_VERDICT
    data = json.loads(json.dumps(stats.as_dict()))
    assert data["delivered"] == 0 and data["workers"] is None
    with runner:
        list(runner)
        data = json.loads(json.dumps(runner.stats().as_dict()))
    assert data["delivered"] == 3 and data["workers"][0]["produced"] >= 3
    assert set(data) == {f.name for f in fp.RunnerStats.__dataclass_fields__.values()}


def test_shm_counts_copies_and_store_use(no_leaks):
    with fp.Runner(fp.DataFromList(range(4)), transport="shm", mode="shard") as runner:
        list(runner)
        counters = runner.stats().transport_counters
    assert counters["copies_received"] == 0
    assert (
        counters["store_bytes"] > 0
        and 0 <= counters["store_bytes_in_use"] <= counters["store_bytes"]
    )


# ---------------------------------------------------------------------------- the hook


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[object, fp.RunnerStats]] = []
        self.fail = fail

    @fp.hookimpl
    def flowplug_runner_stats(self, runner, stats):
        self.calls.append((runner, stats))
        if self.fail:
            raise RuntimeError("the exporter is down")


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(flowplug.stats, "HOOK_INTERVAL", 0.05)
    pm = get_registry().pm
    rec = Recorder()
    pm.register(rec)
    try:
        yield rec
    finally:
        pm.unregister(rec)


def test_the_hook_is_called_on_a_timer_and_at_close(no_leaks, recorder):
    with fp.Runner(fp.DataFromList(range(20)), transport="zmq", num_workers=2, mode="shard") as r:
        assert len(list(r)) == 20
        deadline = time.monotonic() + 10
        while not recorder.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorder.calls, "the timer never called the hook"
        timed = len(recorder.calls)
    assert len(recorder.calls) >= timed + 1
    runner, final = recorder.calls[-1]
    assert runner is r and final.delivered == 20
    r.close()
    assert runner is r and len(recorder.calls) == len(recorder.calls)  # close is idempotent


def test_a_failing_hook_is_logged_and_the_runner_goes_on(no_leaks, recorder, caplog):
    recorder.fail = True
    with caplog.at_level(logging.ERROR, logger="flowplug"):
        with fp.Runner(fp.DataFromList(range(10)), transport="thread", mode="shard") as runner:
            deadline = time.monotonic() + 10
            while not recorder.calls and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sorted(runner) == list(range(10))
            recorder.fail = False  # the call at close raises into close(): not this test's
    assert "a flowplug_runner_stats hook raised" in caplog.text


def test_no_timer_thread_without_an_implementation(no_leaks):
    with fp.Runner(fp.DataFromList(range(3)), transport="thread", mode="shard") as runner:
        assert runner._hook_timer is None
        list(runner)


# ---------------------------------------------------------------------------- logging


def test_start_stop_and_a_worker_error_are_logged(no_leaks, caplog):
    def boom():
        yield 1
        raise ValueError("bad record")

    with caplog.at_level(logging.INFO, logger="flowplug"):
        runner = fp.Runner(fp.DataFromGenerator(boom), transport="thread", mode="shard")
        with pytest.raises(fp.WorkerError):
            list(runner)
        runner.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "flowplug"]
    assert (
        messages[0] == "Runner started: transport 'thread', 1 worker(s), mode 'shard', capacity 50"
    )
    assert "worker 0 failed (ValueError); closing" in messages
    assert messages[-1].startswith("Runner stopped: ")


def test_demo_prints_the_verdict(no_leaks, capsys):
    from flowplug import cli

    assert cli.main(["demo", "--transport", "thread", "--seconds", "0.2", "--mb", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("thread ") and "bound: the" in line, line


def test_bench_prints_the_runners_verdict_below_the_table(capsys):
    from flowplug import cli

    assert cli.main(["bench", "--quick", "--peers", "none", "-p", "small", "-t", "thread"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if x.startswith("verdict of flowplug thread, small: ")]
    assert "bound: the" in line or "no verdict yet" in line, line
