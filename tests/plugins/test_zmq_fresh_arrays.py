"""zmq's fresh_arrays option: large arrays sent without waiting for zmq to release them."""

from __future__ import annotations

import numpy as np

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

    def __len__(self):
        return 40

    def __iter__(self):
        batch = np.empty((8, 224, 224, 3), np.uint8)
        for i in range(40):
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
