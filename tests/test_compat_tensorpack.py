"""tensorpack's documented usage, run through flowplug.compat.tensorpack."""

import itertools
import threading

import numpy as np
import pytest

import flowplug as fp
from flowplug.compat import tensorpack as tp


class Counts(fp.DataFlow):
    """tensorpack's parallel.py __main__ example: FixedSizeData(DataFromGenerator(count()), 100)."""

    def __len__(self):
        return 100

    def __iter__(self):
        yield from itertools.islice(itertools.count(), 100)


def test_parallel_module_main_example(no_leaks):
    x = tp.MultiProcessRunnerZMQ(Counts(), 2)
    x.reset_state()
    got = [dp for _, dp in zip(range(100), x, strict=False)]
    assert len(got) == 100 and set(got) <= set(range(100))
    # two independent copies of the flow: each value comes from one of them, at most twice
    assert max(got.count(v) for v in set(got)) <= 2
    x.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: tp.MultiProcessRunner(ds, num_prefetch=10, num_proc=1),
        lambda ds: tp.MultiProcessRunnerZMQ(ds, num_proc=1, hwm=10),
        lambda ds: tp.MultiThreadRunner(lambda: ds, num_prefetch=10, num_thread=1),
    ],
    ids=["MultiProcessRunner", "MultiProcessRunnerZMQ", "MultiThreadRunner"],
)
def test_epoch_size_order_and_reset_once(make, no_leaks):
    runner = make(Counts())
    assert len(runner) == 100
    runner.reset_state()
    with pytest.raises(fp.StateError, match="twice"):
        runner.reset_state()
    assert list(runner) == list(range(100))
    assert list(runner) == list(range(100))
    runner.close()


def test_reentrancy_guard(no_leaks):
    runner = tp.MultiProcessRunnerZMQ(Counts(), 1)
    runner.reset_state()
    it = iter(runner)
    next(it)
    with pytest.raises(fp.StateError):
        next(iter(runner))
    it.close()
    runner.close()


def test_thread_runner_calls_get_df_once_per_thread(no_leaks):
    made = []

    def get_df():
        made.append(threading.get_ident())
        return Counts()

    runner = tp.MultiThreadRunner(get_df, num_prefetch=5, num_thread=3)
    assert len(made) == 3 and len(runner) == 100
    runner.reset_state()
    assert len(list(runner)) == 100
    runner.close()


def test_old_names_are_the_new_classes():
    assert tp.PrefetchData is tp.MultiProcessRunner
    assert tp.MultiProcessPrefetchData is tp.MultiProcessRunner
    assert tp.PrefetchDataZMQ is tp.MultiProcessRunnerZMQ
    assert tp.MultiThreadPrefetchData is tp.MultiThreadRunner


def test_real_tensorpack_dataflows_run_unchanged(no_leaks):
    import tensorpack.dataflow as td  # in the test extra; works without TensorFlow

    ds = td.DataFromList([[np.full((4,), i)] for i in range(20)], shuffle=False)
    ds = td.MapData(ds, lambda dp: [dp[0] * 2])
    ds = td.BatchData(ds, 5)
    runner = tp.MultiProcessRunnerZMQ(ds, num_proc=1)
    runner.reset_state()
    batches = list(runner)
    assert len(batches) == 4
    np.testing.assert_array_equal(batches[0][0][:, 0], [0, 2, 4, 6, 8])
    runner.close()


def test_plasma_put_early_get_late(no_leaks):
    """tensorpack's PlasmaPutData/PlasmaGetData pattern: put in the worker, send only ids,
    get views in the consumer."""
    store = fp.shm.ObjectStore("64MiB")
    arrays = [np.full((256, 256), i, np.float32) for i in range(6)]
    runner = tp.MultiProcessRunnerZMQ(tp.PlasmaPutData(fp.DataFromList(arrays), store.name))
    try:
        got = tp.PlasmaGetData(runner, store)
        got.reset_state()
        ids = []
        for a in got:
            assert a.shape == (256, 256) and a.dtype == np.float32
            ids.append(float(a[0, 0]))
            del a
        assert ids == [float(i) for i in range(6)]
    finally:
        runner.close()
        store.close()
