"""flowplug.jax.prefetch_to_device on JAX's CPU backend.

The checks run in a child interpreter: once jax is imported, every later fork in the
process warns (JAX is multithreaded), and the test processes fork workers all the time.
"""

import importlib.util
import subprocess
import sys
import textwrap

# jax is in the test extra: a missing jax fails these tests (never skips them). Not
# imported here: that would import jax into this test process.
JAX_MISSING = importlib.util.find_spec("jax") is None

CHECKS = textwrap.dedent(
    """
    import numpy as np
    import jax
    import torch

    import flowplug as fp
    from flowplug.jax import prefetch_to_device

    def items_arrive_as_device_arrays_in_order():
        batches = [{"x": np.full((4, 3), i, np.float32), "y": np.arange(4) + i} for i in range(5)]
        out = list(prefetch_to_device(batches, size=2))
        assert len(out) == 5
        for i, b in enumerate(out):
            assert isinstance(b["x"], jax.Array) and b["x"].devices() == {jax.devices()[0]}
            np.testing.assert_array_equal(np.asarray(b["x"]), batches[i]["x"])
            np.testing.assert_array_equal(np.asarray(b["y"]), batches[i]["y"])

    def reads_exactly_size_items_ahead():
        pulled = []

        def source():
            for i in range(6):
                pulled.append(i)
                yield np.array([i])

        it = prefetch_to_device(source(), size=3)
        assert int(next(it)[0]) == 0
        assert pulled == [0, 1, 2, 3], pulled  # the one yielded and 3 ahead
        assert [int(x[0]) for x in it] == [1, 2, 3, 4, 5]

    def torch_tensors_and_a_thread_runner():
        out = list(prefetch_to_device([(torch.arange(3), torch.ones(2, 2))], size=1))
        np.testing.assert_array_equal(np.asarray(out[0][0]), [0, 1, 2])
        df = fp.DataFromList([np.ones(3) * i for i in range(4)])
        with fp.Runner(df, num_workers=2, transport="thread", mode="shard", ordered=True) as r:
            assert [float(x[0]) for x in prefetch_to_device(r)] == [0.0, 1.0, 2.0, 3.0]

    def size_must_be_positive():
        try:
            next(prefetch_to_device([np.ones(1)], size=0))
        except ValueError as exc:
            assert "size >= 1" in str(exc)
        else:
            raise AssertionError("size=0 was accepted")

    for check in (items_arrive_as_device_arrays_in_order, reads_exactly_size_items_ahead,
                  torch_tensors_and_a_thread_runner, size_must_be_positive):
        check()
        print("ok", check.__name__)
    """
)


def test_prefetch_to_device_on_jax_cpu():
    assert not JAX_MISSING, "jax is not installed: pip install -e '.[test]' (the test extra has it)"
    env_code = "import os; os.environ['JAX_PLATFORMS'] = 'cpu'\n" + CHECKS
    out = subprocess.run(
        [sys.executable, "-c", env_code], capture_output=True, text=True, timeout=110
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "ok", "items_arrive_as_device_arrays_in_order",
        "ok", "reads_exactly_size_items_ahead",
        "ok", "torch_tensors_and_a_thread_runner",
        "ok", "size_must_be_positive",
    ]  # fmt: skip
