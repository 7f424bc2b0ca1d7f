"""zmq's fresh_arrays option: large arrays sent without waiting for zmq to release them."""

from __future__ import annotations

import numpy as np
import pytest

import flowplug as fp


class FreshBatches(fp.DataFlow):
    """A new 1.2 MB array per item, never touched again after it is yielded."""

    def __len__(self):
        return 40

    def __iter__(self):
        for i in range(40):
            yield np.full((8, 224, 224, 3), i % 256, np.uint8)


class Refill(fp.DataFlow):
    """One array, refilled right after each yield (what the default protects)."""

    def __init__(self, shape=(8, 224, 224, 3), n=40):
        self.shape = shape
        self.n = n

    def __len__(self):
        return self.n

    def reset_state(self):
        pass

    def __iter__(self):
        batch = np.empty(self.shape, np.uint8)
        for i in range(self.n):
            batch[...] = i
            yield batch


def test_fresh_arrays_arrive_whole_and_in_order():
    with fp.Runner(FreshBatches(), transport="zmq", fresh_arrays=True) as runner:
        got = [(int(a.min()), int(a.max())) for a in runner]
    assert got == [(i, i) for i in range(40)]


def test_by_default_a_refilled_array_is_never_seen_half_changed():
    with fp.Runner(Refill(), transport="zmq") as runner:
        got = [(int(a.min()), int(a.max())) for a in runner]
    assert got == [(i, i) for i in range(40)]


@pytest.mark.parametrize(
    "shape, n",
    [((8, 224, 224, 3), 60), ((4, 1024, 1024, 3), 8)],  # 1.2 MB; 12.6 MB: many times the
    ids=["1.2MB", "12.6MB"],  # connection's send buffer in the kernel
)
def test_two_workers_refilling_their_arrays_never_deliver_a_mixed_one(shape, n):
    # send() returns only once zmq has written the whole array into the kernel, so a
    # worker's refill right after it never reaches a datapoint on its way: each arrives as
    # it was yielded, never with bytes of the next fill, however many sends it takes.
    with fp.Runner(Refill(shape, n), transport="zmq", num_workers=2, mode="replicate") as runner:
        got = [(int(a.min()), int(a.max())) for a in runner]
    # an epoch is the first n datapoints of both workers' passes, as they come: each one
    # uniform (the fill it was yielded with), each fill from at most the two workers
    assert len(got) == n
    assert all(low == high for low, high in got), got
    assert all(got.count(fill) <= 2 for fill in got)
