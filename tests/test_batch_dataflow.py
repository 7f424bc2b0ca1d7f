"""fp.Batch: batching (and collating) a dataflow in the workers."""

import numpy as np
import pytest

import flowplug as fp


def test_batches_in_order_with_and_without_remainder():
    df = fp.DataFromList(range(7))
    assert list(fp.Batch(df, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(fp.Batch(df, 3)) == 3
    assert list(fp.Batch(df, 3, remainder=False)) == [[0, 1, 2], [3, 4, 5]]
    assert len(fp.Batch(df, 3, remainder=False)) == 2


def test_collate_and_bad_arguments():
    df = fp.DataFromList([np.full(2, i) for i in range(4)])
    out = list(fp.Batch(df, 2, collate=np.stack))
    assert [b.tolist() for b in out] == [[[0, 0], [1, 1]], [[2, 2], [3, 3]]]
    with pytest.raises(ValueError, match="positive int"):
        fp.Batch(df, 0)
    with pytest.raises(TypeError, match="collate must be callable"):
        fp.Batch(df, 2, collate="stack")


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_runner_delivers_each_item_once_in_batches(transport, no_leaks):
    items = [np.full((64, 64), i, np.float32) for i in range(10)]
    batches = fp.Batch(fp.DataFromList(items), 4, collate=np.stack)
    with fp.Runner(batches, transport=transport, num_workers=2, mode="shard") as runner:
        assert len(runner) == 3
        got = list(runner)
    assert sorted(b.shape[0] for b in got) == [2, 4, 4]
    assert sorted(int(a[0, 0]) for b in got for a in b) == list(range(10))


def test_batch_size_as_runner_option_points_to_batch():
    with pytest.raises(fp.ConfigError, match=r"fp\.Batch\(df, 32"):
        fp.Runner(fp.DataFromList(range(3)), transport="zmq", batch_size=32)
