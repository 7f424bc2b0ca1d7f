"""flowplug.jax.prefetch_to_device on JAX's CPU backend."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")  # in the test extra: CI runs these

import flowplug as fp  # noqa: E402
from flowplug.jax import prefetch_to_device  # noqa: E402


def test_items_arrive_as_device_arrays_in_order():
    batches = [{"x": np.full((4, 3), i, np.float32), "y": np.arange(4) + i} for i in range(5)]
    out = list(prefetch_to_device(batches, size=2))
    assert len(out) == 5
    for i, b in enumerate(out):
        assert isinstance(b["x"], jax.Array) and b["x"].devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(b["x"]), batches[i]["x"])
        np.testing.assert_array_equal(np.asarray(b["y"]), batches[i]["y"])


def test_reads_exactly_size_items_ahead():
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield np.array([i])

    it = prefetch_to_device(source(), size=3)
    first = next(it)
    assert int(first[0]) == 0
    assert pulled == [0, 1, 2, 3]  # the one yielded and 3 ahead
    assert [int(x[0]) for x in it] == [1, 2, 3, 4, 5]


def test_torch_tensors_and_a_runner():
    torch = pytest.importorskip("torch")
    out = list(prefetch_to_device([(torch.arange(3), torch.ones(2, 2))], size=1))
    np.testing.assert_array_equal(np.asarray(out[0][0]), [0, 1, 2])
    with fp.Runner(fp.DataFromList([np.ones(3) * i for i in range(4)]), num_workers=2,
                   transport="thread", mode="shard", ordered=True) as runner:  # fmt: skip
        got = [float(x[0]) for x in prefetch_to_device(runner)]
    assert got == [0.0, 1.0, 2.0, 3.0]


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size >= 1"):
        next(prefetch_to_device([np.ones(1)], size=0))
