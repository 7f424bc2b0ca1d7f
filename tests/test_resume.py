"""state_dict() / load_state_dict(): a new runner built the same way continues exactly
where the consumer stopped (shard mode and ParallelMap), on every transport, with another
num_workers, and after the first process was SIGKILLed right after saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowplug as fp
from flowplug._resume import Done

TRANSPORTS = sorted(fp.available_transports())
SHARD_TRANSPORTS = TRANSPORTS  # every transport the runner starts workers for does shard mode
MAP_TRANSPORTS = sorted(n for n, c in fp.available_transports().items() if c.carries_tasks)
PROPERTY = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def roundtrip(state: dict) -> dict:
    """What a checkpoint file gives back: JSON, with nothing else in it."""
    text = json.dumps(state)
    assert len(text) < 2000, text  # no datapoints inside
    return json.loads(text)


class Shardable(fp.DataFlow):
    """Items ``0..n-1``; ``shard()`` keeps the modulo contract without a full pass."""

    def __init__(self, n: int, start: int = 0, step: int = 1):
        self.n, self.start, self.step = n, start, step

    def __len__(self) -> int:
        return len(range(self.start, self.n, self.step))

    def __iter__(self):
        yield from range(self.start, self.n, self.step)

    def shard(self, index: int, count: int) -> Shardable:
        return Shardable(self.n, index, count)


class EpochShuffle(fp.DataFlow):
    """Every worker makes the same pass, reshuffled each pass: a state of its own (the
    pass number), the same in every worker, so it resumes on another num_workers too."""

    def __init__(self, n: int, seed: int = 7):
        self.n, self.seed, self.passes = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import random

        order = list(range(self.n))
        random.Random(self.seed * 1000 + self.passes).shuffle(order)
        self.passes += 1
        yield from order

    def state_dict(self) -> dict:
        return {"passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.passes = state["passes"]


def make_source(kind: str, n: int):
    if kind == "list":
        return fp.DataFromList(range(n))
    if kind == "shardable":
        return Shardable(n)
    return EpochShuffle(n)


def take(it, count: int) -> list:
    return [next(it) for _ in range(count)]


# ---------------------------------------------------------------------------- shard mode


@PROPERTY
@given(
    transport=st.sampled_from(SHARD_TRANSPORTS),
    kind=st.sampled_from(["list", "shardable", "stateful"]),
    n=st.integers(0, 24),
    workers=st.integers(1, 3),
    workers_after=st.integers(1, 3),
    extra_capacity=st.integers(0, 4),
    ordered=st.booleans(),
    epochs_before=st.integers(0, 1),
    where=st.floats(0, 1),
    between_epochs=st.booleans(),
)
def test_shard_resume_delivers_the_rest_of_the_epoch_exactly_once(
    no_leaks,
    transport,
    kind,
    n,
    workers,
    workers_after,
    extra_capacity,
    ordered,
    epochs_before,
    where,
    between_epochs,
):
    """Saved anywhere in an epoch (before its first item, mid-way, right after its last
    item, or between epochs), a new runner with any num_workers delivers the items not
    received, none twice; then the next epoch, as the first run would have (in order, the
    very same sequence)."""

    def runner(num_workers):
        return fp.Runner(
            make_source(kind, n),
            transport=transport,
            num_workers=num_workers,
            capacity=num_workers + extra_capacity,
            mode="shard",
            ordered=ordered,
            timeout=30,
        )

    first = runner(workers)
    with first:
        for _ in range(epochs_before):
            list(first)
        if between_epochs:
            before: list = []
            state = roundtrip(first.state_dict())
            it = iter(first)
        else:
            it = iter(first)
            before = take(it, round(where * n))
            state = roundtrip(first.state_dict())
        # The first run goes on: what an uninterrupted run delivers.
        whole = before + list(it)
        following = list(first)
    assert state["epoch"] == epochs_before
    second = runner(workers_after)
    second.load_state_dict(state)
    with second:
        after = list(second)
        then = list(second)
    counts = Counter(before + after)
    assert sorted(counts) == list(range(n)) and max(counts.values(), default=1) == 1, (
        before,
        after,
    )
    assert sorted(then) == list(range(n))
    if ordered:
        assert before + after == whole
        assert then == following


@pytest.mark.parametrize("transport", SHARD_TRANSPORTS)
def test_shuffled_list_resumes_in_the_same_order(no_leaks, transport):
    """DataFromList(shuffle=True) keeps its shuffling state (state_dict()): each worker's
    shard reshuffles the same way after a resume, so an ordered run repeats exactly."""
    items = list(range(40))

    def runner(seed):
        df = fp.DataFromList(items, shuffle=True)
        return fp.Runner(
            df, transport=transport, num_workers=2, mode="shard", ordered=True, seed=seed
        )

    with runner(1) as first:
        list(first)
        it = iter(first)
        before = take(it, 13)
        state = roundtrip(first.state_dict())
        rest, following = list(it), list(first)
    assert state["dataflow"] is not None
    second = runner(2)  # another seed: the state decides
    second.load_state_dict(state)
    with second:
        assert list(second) == rest
        assert list(second) == following
    assert sorted(before + rest) == items


def test_per_worker_state_refuses_another_num_workers():
    items = list(range(10))
    with fp.Runner(
        fp.DataFromList(items, shuffle=True), transport="thread", num_workers=2, mode="shard"
    ) as first:
        it = iter(first)
        take(it, 3)
        state = first.state_dict()
        del it
    other = fp.Runner(
        fp.DataFromList(items, shuffle=True), transport="thread", num_workers=3, mode="shard"
    )
    with pytest.raises(fp.ConfigError, match="resume with num_workers=2"):
        other.load_state_dict(state)


def test_state_of_a_new_runner_is_a_fresh_start():
    runner = fp.Runner(fp.DataFromList(range(5)), transport="thread", mode="shard")
    state = runner.state_dict()
    assert state["epoch"] == 0 and state["received"] == {"below": 0}
    again = fp.Runner(fp.DataFromList(range(5)), transport="thread", mode="shard")
    again.load_state_dict(state)
    assert again.state_dict() == state
    with again:
        assert sorted(again) == list(range(5))
    runner.close()


def test_replicate_mode_has_no_state():
    runner = fp.Runner(fp.DataFromList(range(5)), transport="thread")
    with pytest.raises(fp.StateError, match="mode='shard'"):
        runner.state_dict()
    with pytest.raises(fp.StateError, match="mode='shard'"):
        runner.load_state_dict({})


def test_load_after_start_and_foreign_states_are_refused(no_leaks):
    df = fp.DataFromList(range(5))
    with fp.Runner(df, transport="thread", mode="shard") as started:
        state = started.state_dict()
        with pytest.raises(fp.StateError, match="before it starts"):
            started.load_state_dict(state)
    with pytest.raises(ValueError, match="made by state_dict"):
        fp.Runner(df, transport="thread", mode="shard").load_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="version"):
        fp.Runner(df, transport="thread", mode="shard").load_state_dict({**state, "flowplug": 99})
    mapped = fp.ParallelMap(df, abs, transport="thread")
    with pytest.raises(fp.ConfigError, match="saved by a Runner in shard mode"):
        mapped.load_state_dict(state)


def test_received_indices_encode_compactly():
    every_other = Done(10, set(range(12, 100_000, 2)))
    data = json.loads(json.dumps(every_other.to_json()))
    assert len(json.dumps(data)) < 400
    again = Done.from_json(data)
    assert again.below == 10 and again.rest == every_other.rest
    assert Done(0, {0, 1, 2, 5}).to_json()["below"] == 3
    assert 4 not in Done(0, {0, 1, 2, 5}) and 5 in Done(0, {0, 1, 2, 5})


# ---------------------------------------------------------------------------- ParallelMap


def square(x):
    return x * x


@PROPERTY
@given(
    transport=st.sampled_from(MAP_TRANSPORTS),
    n=st.integers(0, 24),
    workers=st.integers(1, 3),
    workers_after=st.integers(1, 3),
    capacity=st.integers(1, 6),
    ordered=st.booleans(),
    where=st.floats(0, 1),
)
def test_map_resume_delivers_the_rest_exactly_once(
    no_leaks, transport, n, workers, workers_after, capacity, ordered, where
):
    def mapped(num_workers):
        return fp.ParallelMap(
            fp.DataFromList(range(n)),
            square,
            num_workers=num_workers,
            transport=transport,
            ordered=ordered,
            capacity=capacity,
            timeout=30,
        )

    with mapped(workers) as first:
        it = iter(first)
        before = take(it, round(where * n))
        state = roundtrip(first.state_dict())
        whole = before + list(it)
    second = mapped(workers_after)
    second.load_state_dict(state)
    with second:
        after = list(second)
        then = list(second)
    expected = [i * i for i in range(n)]
    assert sorted(before + after) == sorted(expected), (before, after)
    assert sorted(then) == sorted(expected)
    if ordered:
        assert before + after == whole == expected


def test_map_of_a_sharded_runner_resumes_through_both(no_leaks):
    """The map's state holds its source's: a Runner in shard mode, ordered."""

    def build():
        source = fp.Runner(
            fp.DataFromList(range(30), shuffle=True),
            transport="thread",
            num_workers=2,
            mode="shard",
            ordered=True,
        )
        return fp.ParallelMap(source, square, num_workers=2, transport="thread")

    with build() as first:
        list(first)
        it = iter(first)
        before = take(it, 11)
        state = roundtrip(first.state_dict())
        rest, following = list(it), list(first)
    second = build()
    second.load_state_dict(state)
    with second:
        assert list(second) == rest
        assert list(second) == following
    assert sorted(before + rest) == [i * i for i in range(30)]


# ---------------------------------------------------------------------------- SIGKILL

TRAINING = textwrap.dedent(
    """
    import json, os, signal, sys
    import flowplug as fp

    transport, state_path, log_path, kill_at = sys.argv[1:5]
    kill_at = int(kill_at)
    runner = fp.Runner(
        fp.DataFromList(range(60)),
        transport=transport,
        num_workers=3 if kill_at >= 0 else 2,
        mode="shard",
        ordered=True,
        timeout=30,
    )
    start = 0
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        runner.load_state_dict(state)
        start = state["epoch"]
    seen = 0
    with runner, open(log_path, "a") as log:
        for epoch in range(start, 3):
            for item in runner:
                log.write(f"{epoch} {item}\\n")
                log.flush()
                tmp = state_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(runner.state_dict(), f)
                os.replace(tmp, state_path)  # the checkpoint is whole or absent
                seen += 1
                if seen == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("transport", [t for t in TRANSPORTS if t != "thread"] + ["thread"])
def test_killed_right_after_saving_then_resumed_in_a_fresh_process(no_leaks, transport, tmp_path):
    """A training loop that checkpoints after every item is SIGKILLed in epoch 1; a fresh
    process resumes from the file (with another num_workers): over the two processes
    every epoch is seen exactly once, in the order of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    state, log = str(tmp_path / "state.json"), str(tmp_path / "seen.log")

    def run(kill_at: int) -> tuple[int, int, str]:
        proc = subprocess.Popen(
            [sys.executable, str(script), transport, state, log, str(kill_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=120)
        return proc.pid, proc.returncode, err

    pid, code, err = run(60 + 17)
    assert code == -signal.SIGKILL, err
    _, code, err = run(-1)
    assert code == 0, err
    seen: dict[int, list[int]] = {}
    with open(log) as f:
        for line in f:
            epoch, item = map(int, line.split())
            seen.setdefault(epoch, []).append(item)
    assert seen == {epoch: list(range(60)) for epoch in range(3)}, seen
    # A SIGKILL runs no cleanup; the resumed process's start swept what it left.
    left = [e for e in os.listdir("/dev/shm") if f"-{pid}-" in e]
    assert not left, left


# ------------------------------------------- seeded passes (shard mode without shard())

PROCESS_TRANSPORTS = [t for t in TRANSPORTS if fp.get_transport(t).crosses_processes]


class GlobalNumpyShuffle(fp.DataFlow):
    """Shuffles with numpy's global generator, which flowplug seeds per epoch; no state."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import numpy as np

        yield from (int(i) for i in np.random.permutation(self.n))


def seeded_source(kind: str, n: int):
    if kind == "tensorpack":
        from tensorpack.dataflow import DataFromList

        return DataFromList([[i] for i in range(n)], shuffle=True)
    return GlobalNumpyShuffle(n)


def as_int(dp) -> int:
    return dp[0] if isinstance(dp, list) else dp


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
@pytest.mark.parametrize("kind", ["tensorpack", "numpy"])
@pytest.mark.parametrize(
    ("workers_before", "workers_after", "ordered"),
    [(2, 2, False), (2, 3, True), (2, 1, True), (2, 1, False), (1, 2, True), (1, 3, False)],
)
def test_seeded_passes_resume_in_the_saved_order(
    no_leaks, transport, kind, workers_before, workers_after, ordered
):
    """Without shard(), every worker's generators are seeded per epoch (one worker's
    too): the seed is the run's seed and the absolute epoch, so a fresh runner resumed
    mid-epoch 1 or at the start of epoch 2, on any num_workers, makes the same passes as
    the saved run. Each epoch is exact, no item twice, and in order it is the
    uninterrupted sequence."""
    n, epochs = 23, 4

    def runner(num_workers, seed=None):
        return fp.Runner(
            seeded_source(kind, n),
            transport=transport,
            num_workers=num_workers,
            mode="shard",
            ordered=ordered,
            seed=seed,
            timeout=60,
        )

    with runner(2, seed=11) as whole_run:  # uninterrupted
        whole = [[as_int(dp) for dp in whole_run] for _ in range(epochs)]
    for e in whole:
        assert sorted(e) == list(range(n))
    assert whole[1] != whole[2]  # really reshuffled per epoch

    for stop_epoch, taken in [(1, 9), (2, 0)]:
        with runner(workers_before, seed=11) as first:
            got = [[as_int(dp) for dp in first] for _ in range(stop_epoch)]
            it = iter(first)
            before = [as_int(next(it)) for _ in range(taken)]
            state = roundtrip(first.state_dict())
            it.close()
        assert state["epoch"] == stop_epoch
        if ordered:
            assert got == whole[:stop_epoch] and before == whole[stop_epoch][:taken]
        second = runner(workers_after)  # no seed given: the saved one is restored
        second.load_state_dict(state)
        with second:
            after = [[as_int(dp) for dp in second] for _ in range(stop_epoch, epochs)]
        counts = Counter(before + after[0])
        assert sorted(counts) == list(range(n)) and max(counts.values()) == 1, (
            stop_epoch,
            before,
            after[0],
        )
        for e in after[1:]:
            assert sorted(e) == list(range(n))
        if ordered:
            assert before + after[0] == whole[stop_epoch], (stop_epoch, before, after[0])
            assert after[1:] == whole[stop_epoch + 1 :]
