"""Shard mode without shard(): every worker's pass is seeded alike and checked, so that a
dataflow whose passes differ between workers is an error, never a duplicate or a loss."""

from __future__ import annotations

import os
import random
from collections import Counter

import numpy as np
import pytest
import tensorpack.dataflow as td  # in the test extra: imports without TensorFlow

import flowplug as fp
from flowplug import _passcheck

TRANSPORTS = sorted(fp.available_transports())
PROCESS_TRANSPORTS = [t for t in TRANSPORTS if fp.get_transport(t).crosses_processes]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_tensorpack_shuffled_list_is_exact(transport, ordered, no_leaks):
    """tensorpack's DataFromList(shuffle=True) shuffles with its RNGDataFlow.rng, seeded per
    process: flowplug seeds it alike in every worker for each epoch, so every item comes
    exactly once, in a new order each epoch."""
    items = list(range(40))
    ds = td.DataFromList(items, shuffle=True)
    with fp.Runner(ds, transport=transport, num_workers=2, mode="shard", ordered=ordered) as r:
        epochs = [list(r) for _ in range(3)]
    for got in epochs:
        assert sorted(got) == items  # each item once: no duplicate, no loss
    assert epochs[0] != epochs[1]  # still shuffled, differently per epoch


class PidShuffled(fp.DataFlow):
    """Shuffles with a generator flowplug cannot see (named neither rng nor _rng)."""

    def __len__(self):
        return 30

    def reset_state(self):
        self.shuffler = random.Random(os.getpid() * 7919 + id(self))

    def __iter__(self):
        order = list(range(30))
        self.shuffler.shuffle(order)
        yield from order


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_passes_that_differ_raise_before_any_duplicate(transport, ordered, no_leaks):
    runner = fp.Runner(
        PidShuffled(), transport=transport, num_workers=3, mode="shard", ordered=ordered
    )
    got = []
    with pytest.raises(fp.ShardMismatch) as info:
        for dp in runner:
            got.append(dp)
    runner.close()
    assert len(got) == len(set(got)) and len(got) < 30
    message = str(info.value)
    assert "PidShuffled" in message and "shard(index, count)" in message
    assert "fp.ParallelMap" in message and "docs/sharding.md" in message
    with pytest.raises(fp.StateError, match="closed"):
        list(runner)


class LongerInWorker1(fp.DataFlow):
    """Worker 1's pass has one item more: a loss (or an extra) only the lengths show."""

    def __iter__(self):
        info = fp.worker_info()
        yield from range(11 if info is not None and info.id == 1 else 10)


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_passes_of_different_lengths_raise_at_the_end_of_the_epoch(transport, no_leaks):
    runner = fp.Runner(LongerInWorker1(), transport=transport, num_workers=2, mode="shard")
    got = []
    with pytest.raises(fp.ShardMismatch, match=r"worker 0: 10, worker 1: 11"):
        for dp in runner:
            got.append(dp)
    runner.close()
    assert got == list(range(10))


class GlobalNumpyAugment(fp.DataFlow):
    """Draws from numpy's global generator, as many augmentations do."""

    def __len__(self):
        return 20

    def __iter__(self):
        for i in range(20):
            yield i, float(np.random.rand())


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_global_generators_are_seeded_alike_per_epoch(transport, no_leaks):
    with fp.Runner(GlobalNumpyAugment(), transport=transport, num_workers=2, mode="shard") as r:
        first, second = list(r), list(r)
    assert sorted(i for i, _ in first) == list(range(20))
    assert sorted(i for i, _ in second) == list(range(20))
    assert dict(first) != dict(second)  # a new draw each epoch


def test_a_dataflow_with_shard_is_not_checked(no_leaks):
    # DataFromList.shard(): each worker reads only its own items; shuffled per worker
    ds = fp.DataFromList(range(30), shuffle=True)
    with fp.Runner(ds, num_workers=3, mode="shard") as r:
        assert not r._mode.checked
        assert Counter(r) == Counter(range(30))


# ---------------------------------------------------------------------------- the parts


def test_fingerprints_are_the_same_in_every_process_and_tell_items_apart():
    image = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
    dp = [image, 3, 1.5, "cat", b"jpeg", {"k": (1, None)}, np.float32(2.0)]
    fp1 = _passcheck.fingerprint(dp)
    assert fp1 == _passcheck.fingerprint(
        [image.copy(), 3, 1.5, "cat", b"jpeg", {"k": (1, None)}, np.float32(2.0)]
    )
    other = image.copy()
    other.reshape(-1)[18 + 36 * 33] += 1  # one of the 64 elements sampled (every 36th)
    assert _passcheck.fingerprint([other, *dp[1:]]) != fp1
    assert _passcheck.fingerprint(image[:, ::2]) != _passcheck.fingerprint(image[:, 1::2])
    assert _passcheck.fingerprint(float("nan")) == _passcheck.fingerprint(float("nan"))


def test_seed_pass_finds_tensorpack_generators():
    from tensorpack.dataflow import imgaug

    augmentors = [imgaug.Flip(horiz=True), imgaug.RandomCrop((4, 4))]
    ds = td.DataFromList([[np.zeros((8, 8, 3), np.uint8)]] * 4, shuffle=True)
    ds = td.MapData(td.AugmentImageComponent(ds, augmentors), lambda dp: dp)
    ds.reset_state()
    # DataFromList.rng and one rng per augmentor, through MapData and the augmentor list
    assert _passcheck.seed_pass(ds, 1) >= 3
    a = [dp[0].tobytes() for dp in ds]
    _passcheck.seed_pass(ds, 1)
    assert [dp[0].tobytes() for dp in ds] == a
