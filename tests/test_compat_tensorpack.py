"""tensorpack's documented usage, run through flowplug.compat.tensorpack."""

import itertools
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
import tensorpack.dataflow as td  # in the test extra; works without TensorFlow
from tensorpack.dataflow import imgaug  # needs opencv-python-headless, also in the extra

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


# ---------------------------------------------------------------------------- parallel maps
# Real tensorpack 0.11 dataflows (in the test extra; tensorpack.dataflow imports without
# TensorFlow, its imgaug needs opencv-python-headless, also in the extra).

MAPS = {
    "MultiProcessMapData": lambda ds, fn, **kw: tp.MultiProcessMapData(ds, 2, fn, **kw),
    "MultiProcessMapDataZMQ": lambda ds, fn, **kw: tp.MultiProcessMapDataZMQ(ds, 2, fn, **kw),
    "MultiThreadMapData": lambda ds, fn, **kw: tp.MultiThreadMapData(ds, 3, fn, **kw),
}


def double_or_drop_sevens(dp):
    return None if dp[0] % 7 == 0 else [dp[0] * 2]


def identity(dp):
    return dp


@pytest.mark.parametrize("name", MAPS)
def test_strict_map_yields_the_mapped_set_of_each_pass(name, no_leaks):
    ds = td.DataFromList([[i] for i in range(30)], shuffle=True)
    mapped = MAPS[name](ds, double_or_drop_sevens, buffer_size=8, strict=True)
    assert isinstance(mapped, td.DataFlow)
    assert len(mapped) == mapped.size() == 30  # tensorpack's len(): len(ds), drops or not
    mapped.reset_state()
    expected = sorted(2 * i for i in range(30) if i % 7)
    for _ in range(2):
        assert sorted(dp[0] for dp in mapped) == expected
    assert sorted(dp[0] for dp in mapped.get_data()) == expected
    mapped.close()


@pytest.mark.parametrize("name", MAPS)
def test_non_strict_map_is_an_endless_stream_over_repeated_passes(name, no_leaks):
    """tensorpack: "a reordering of RepeatedData(MapData(df), -1)"; with a buffer of b,
    the first k results come from the first k + b inputs, plus b more for each time the
    iteration is left and taken up again (what was in flight then is dropped)."""
    ds = td.DataFromList([[i] for i in range(10)], shuffle=False)
    mapped = MAPS[name](ds, identity, buffer_size=4)
    mapped.reset_state()
    got = [dp[0] for _, dp in zip(range(25), mapped, strict=False)]
    got += [dp[0] for _, dp in zip(range(12), mapped, strict=False)]  # iterating again goes on
    assert len(got) == 37
    inputs = Counter(i % 10 for i in range(37 + 4 + 4))
    assert not Counter(got) - inputs
    mapped.close()


def test_buffer_size_larger_than_the_pass_is_cut_in_strict_mode(no_leaks):
    ds = td.DataFromList([[i] for i in range(5)], shuffle=False)
    mapped = tp.MultiThreadMapData(ds, 2, identity, buffer_size=200, strict=True)
    assert mapped.buffer_size == 5  # as tensorpack: min(buffer_size, len(ds))
    mapped.reset_state()
    assert sorted(dp[0] for dp in mapped) == list(range(5))
    mapped.close()


def test_arguments_in_the_wrong_order_are_named():
    ds = td.DataFromList([[1]], shuffle=False)
    with pytest.raises(ValueError, match=r"needs num_proc.*MultiProcessMapDataZMQ\(ds, num_proc"):
        tp.MultiProcessMapData(ds, identity, 2)
    with pytest.raises(TypeError, match="needs map_func"):
        tp.MultiThreadMapData(ds, 2)


def fail_on_13(dp):
    if dp[0] == 13:
        raise ValueError("bad datapoint 13")
    return dp


@pytest.mark.parametrize("name", MAPS)
def test_map_errors_are_raised_not_hung_and_still_match(name, no_leaks):
    ds = td.DataFromList([[i] for i in range(20)], shuffle=False)
    mapped = MAPS[name](ds, fail_on_13, buffer_size=4, strict=True)
    mapped.reset_state()
    with pytest.raises(ValueError, match="bad datapoint 13") as info:
        list(mapped)
    assert isinstance(info.value, fp.WorkerError)
    mapped.close()


def exit_on_5(dp):
    if dp[0] == 5:
        os._exit(3)
    return dp


@pytest.mark.parametrize("name", ["MultiProcessMapData", "MultiProcessMapAndBatchData"])
def test_a_dead_map_worker_is_reported(name, no_leaks):
    ds = td.DataFromList([[i] for i in range(20)], shuffle=False)
    if name == "MultiProcessMapData":
        mapped = tp.MultiProcessMapData(ds, 2, exit_on_5, buffer_size=4)
    else:
        mapped = tp.MultiProcessMapAndBatchData(ds, 2, exit_on_5, 2, buffer_size=4)
    mapped.reset_state()
    with pytest.raises(fp.WorkerDied, match=r"exit code 3|exitcode 3|code 3"):
        for _ in mapped:
            pass
    mapped.close()


def int_float_array(dp):
    i = dp[0]
    return None if i % 5 == 4 else [i, float(i), np.full((3, 2), i, np.uint8), f"s{i}"]


def test_map_and_batch_stacks_as_batch_data(no_leaks):
    ds = td.DataFromList([[i] for i in range(40)], shuffle=False)
    batched = tp.MultiProcessMapAndBatchData(ds, 2, int_float_array, 4, buffer_size=16)
    assert isinstance(batched, td.DataFlow)
    with pytest.raises(NotImplementedError):  # an endless stream, as in tensorpack
        len(batched)
    batched.reset_state()
    seen = []
    for _, batch in zip(range(12), batched, strict=False):
        ints, _, arrays, _ = batch
        reference = td.BatchData.aggregate_batch([int_float_array([i]) for i in ints])
        for mine, theirs in zip(batch, reference, strict=True):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            np.testing.assert_array_equal(mine, theirs)
        assert arrays.shape == (4, 3, 2)
        seen += list(ints)
    assert len(seen) == 48 and not {i for i in seen if i % 5 == 4}  # Nones dropped
    batched.close()


def test_map_and_batch_with_one_process_is_batch_of_map(no_leaks):
    def build():
        return td.DataFromList([[i, np.float32(i)] for i in range(12)], shuffle=False)

    batched = tp.MultiProcessMapAndBatchDataZMQ(build(), 1, identity, 3, buffer_size=9)
    batched.reset_state()
    mine = [b for _, b in zip(range(8), batched, strict=False)]
    batched.close()
    reference = td.BatchData(td.RepeatedData(td.MapData(build(), identity), -1), 3)
    reference.reset_state()
    for a, b in zip(mine, reference, strict=False):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype


def test_parallel_map_keeps_a_declared_length(no_leaks):
    m = fp.ParallelMap(fp.DataFromList(range(10)), double_or_none, drop_none=True, length=10)
    assert len(m) == 10
    batched = td.BatchData(m, 2, remainder=True)
    assert len(batched) == 5  # tensorpack's trainer takes its steps per epoch from here
    m.close()
    with pytest.raises(fp.UnknownLength, match="length="):
        len(fp.ParallelMap(fp.DataFromList(range(10)), double_or_none, drop_none=True))


def double_or_none(x):
    return None if x == 3 else 2 * x


class Zero(td.DataFlow):
    """tensorpack's parallel_map.py __main__ example: [k] for k < size, slow for k < 10."""

    def __init__(self, size):
        self._size = size

    def __iter__(self):
        for k in range(self._size):
            yield [k]

    def __len__(self):
        return self._size


def slow_below_10(x):
    if x[0] < 10:
        time.sleep(0.2)
    return x


def test_parallel_map_module_main_example(no_leaks):
    """MultiThreadMapData(Zero(100), 50, f, buffer_size=50, strict=True): one epoch is
    exactly the 100 datapoints, the slow ones do not hold the fast ones back, and it ends."""
    ds = tp.MultiThreadMapData(Zero(100), 50, slow_below_10, buffer_size=50, strict=True)
    ds.reset_state()
    got = []
    for idx, k in enumerate(ds):
        got.append(k[0])
        if idx == 100:
            break
    assert sorted(got) == list(range(100))
    assert set(got[:10]) != set(range(10))  # results come as completed
    ds.close()


# ---------------------------------------------------------------------------- tensorpack's API


def make_every_compat_class():
    ds = td.DataFromList([[i] for i in range(6)], shuffle=False)
    return [
        tp.MultiProcessRunner(ds, 4, 1),
        tp.MultiProcessRunnerZMQ(ds, 1),
        tp.MultiThreadRunner(lambda: td.DataFromList([[1]], shuffle=False), 4, 1),
        tp.MultiProcessMapData(ds, 1, identity),
        tp.MultiProcessMapDataZMQ(ds, 1, identity),
        tp.MultiThreadMapData(ds, 1, identity),
        tp.MultiProcessMapAndBatchData(ds, 1, identity, 2, 4),
        tp.MultiProcessMapAndBatchDataZMQ(ds, 1, identity, 2, 4),
    ]


def test_every_compat_class_is_a_tensorpack_dataflow(no_leaks):
    for df in make_every_compat_class():
        assert isinstance(df, td.DataFlow), type(df).__name__
        assert callable(df.size) and callable(df.get_data)
        df.close()


def test_old_method_names_size_and_get_data(no_leaks):
    runner = tp.MultiProcessRunnerZMQ(td.DataFromList([[i] for i in range(6)], shuffle=False), 1)
    assert runner.size() == 6
    runner.reset_state()
    assert [dp[0] for dp in runner.get_data()] == list(range(6))
    runner.close()


def test_lmdb_serializer_saves_a_compat_runner(tmp_path, monkeypatch, no_leaks):
    import tqdm
    from tensorpack.dataflow import LMDBSerializer

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # its progress bar's thread stays

    images = [[np.full((4, 4), i, np.uint8), i] for i in range(10)]
    runner = tp.MultiProcessRunnerZMQ(td.DataFromList(images, shuffle=False), num_proc=1)
    path = str(tmp_path / "out.lmdb")
    LMDBSerializer.save(runner, path)  # asserts isinstance(df, DataFlow), resets, iterates
    runner.close()
    back = LMDBSerializer.load(path, shuffle=False)
    back.reset_state()
    got = list(back)
    assert [dp[1] for dp in got] == list(range(10))
    np.testing.assert_array_equal(got[3][0], images[3][0])
    back.ds._lmdb.close()  # tensorpack's LMDBData has no close() of its own


def test_without_tensorpack_nothing_imports_it():
    code = (
        "import sys\n"
        "sys.modules['tensorpack'] = None  # as if not installed\n"
        "import flowplug as fp\n"
        "from flowplug.compat import tensorpack as tp\n"
        "m = tp.MultiThreadMapData(fp.DataFromList([1, 2, 3]), 2, lambda x: 2 * x, strict=True)\n"
        "m.reset_state()\n"
        "assert sorted(m) == [2, 4, 6] and m.size() == 3\n"
        "m.close()\n"
        "assert not [n for n in sys.modules if n.startswith('tensorpack.')]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------- real pipelines


def synthetic_images(n, seed=0):
    rng = np.random.RandomState(seed)
    return [[rng.randint(0, 255, (24, 32, 3), np.uint8), i % 4] for i in range(n)]


def augmented(n=16):
    """DataFromList(shuffle) -> imgaug augmentors -> MapData, as ImageNet's train flow."""
    augmentors = [
        imgaug.RandomCrop((16, 16)),
        imgaug.Flip(horiz=True),
        imgaug.Brightness(20, clip=True),
        imgaug.Resize((8, 8)),
    ]
    ds = td.DataFromList(synthetic_images(n), shuffle=True)
    ds = td.AugmentImageComponent(ds, augmentors, copy=False)
    return td.MapData(ds, lambda dp: [dp[0].astype(np.float32) / 255.0, dp[1]])


def check_batches(batches, count, batch_size=4):
    assert len(batches) == count
    for images, labels in batches:
        assert images.shape == (batch_size, 8, 8, 3) and images.dtype == np.float32
        assert labels.shape == (batch_size,) and labels.dtype == np.int32


PIPELINES = {
    "MultiProcessRunner": lambda: tp.MultiProcessRunner(td.BatchData(augmented(), 4), 8, 2),
    "MultiProcessRunnerZMQ": lambda: tp.MultiProcessRunnerZMQ(td.BatchData(augmented(), 4), 2),
    "MultiThreadRunner": lambda: tp.MultiThreadRunner(lambda: td.BatchData(augmented(), 4), 8, 2),
    "MultiProcessMapData": lambda: td.BatchData(
        tp.MultiProcessMapData(augmented(), 2, identity, buffer_size=8, strict=True), 4
    ),
    "MultiThreadMapData": lambda: td.BatchData(
        tp.MultiThreadMapData(augmented(), 2, identity, buffer_size=8, strict=True), 4
    ),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_imagenet_like_pipeline_through_every_compat_class(name, no_leaks):
    df = PIPELINES[name]()
    df.reset_state()
    for _ in range(2):
        check_batches(list(df), 4)
    (df if hasattr(df, "close") else df.ds).close()


def test_map_and_batch_on_the_augmented_pipeline(no_leaks):
    df = tp.MultiProcessMapAndBatchData(augmented(), 2, identity, 4, buffer_size=16)
    df.reset_state()
    check_batches([b for _, b in zip(range(6), df, strict=False)], 6)
    df.close()


PROCESS_TRANSPORTS = [
    t for t in sorted(fp.available_transports()) if fp.get_transport(t).crosses_processes
]


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_tensorpack_pipeline_on_every_process_transport(transport, no_leaks):
    df = td.BatchData(augmented(), 4)  # randomised: each worker streams its own copy
    with fp.Runner(df, transport=transport, num_workers=2, mode="replicate") as runner:
        check_batches(list(runner), 4)
    if fp.get_transport(transport).carries_tasks:
        ds = td.DataFromList(synthetic_images(8), shuffle=True)
        with fp.ParallelMap(ds, crop_and_scale, num_workers=2, transport=transport) as mapped:
            out = list(mapped)
        assert len(out) == 8 and all(dp[0].shape == (16, 16, 3) for dp in out)


def crop_and_scale(dp):
    return [dp[0][:16, :16].astype(np.float32) / 255.0, dp[1]]


# ---------------------------------------------------------------------------- whole scripts
# The dataflows of tensorpack's examples (ImageNetModels/imagenet_utils.py, FasterRCNN/data.py,
# ResNet/cifar10-resnet.py), rebuilt on synthetic data, with only the imports changed.


def jpeg_files(tmp_path, n):
    import cv2

    rng = np.random.RandomState(1)
    files = []
    for i in range(n):
        path = str(tmp_path / f"img{i:03d}.jpg")
        cv2.imwrite(path, rng.randint(0, 255, (40 + i % 7, 48, 3), np.uint8))
        files.append([path, i])
    return files


def test_imagenet_val_dataflow(tmp_path, no_leaks):
    """MultiThreadMapData(strict) reading JPEGs -> BatchData(remainder) -> a runner of 1."""
    import cv2

    aug = imgaug.AugmentorList([imgaug.ResizeShortestEdge(36), imgaug.CenterCrop((32, 32))])

    def mapf(dp):
        fname, cls = dp
        im = cv2.imread(fname, cv2.IMREAD_COLOR)
        return aug.augment(im), cls

    ds = td.DataFromList(jpeg_files(tmp_path, 21), shuffle=False)
    ds = tp.MultiThreadMapData(ds, 4, mapf, buffer_size=2000, strict=True)
    ds = td.BatchData(ds, 5, remainder=True)
    ds = tp.MultiProcessRunnerZMQ(ds, 1)
    assert len(ds) == 5
    ds.reset_state()
    for _ in range(2):
        batches = list(ds)
        labels = sorted(int(c) for _, cls in batches for c in cls)
        assert labels == list(range(21))  # every image once per epoch
        assert all(im.shape[1:] == (32, 32, 3) and im.dtype == np.uint8 for im, _ in batches)
    ds.close()


def test_imagenet_train_dataflow(no_leaks):
    """AugmentImageComponent(fbresnet-like augmentors) -> MultiProcessRunnerZMQ -> BatchData."""
    augmentors = [
        imgaug.GoogleNetRandomCropAndResize(target_shape=24),
        imgaug.ToFloat32(),
        imgaug.RandomOrderAug(
            [
                imgaug.BrightnessScale((0.6, 1.4)),
                imgaug.Contrast((0.6, 1.4), rgb=False),
                imgaug.Saturation(0.4, rgb=False),
            ]
        ),
        imgaug.ToUint8(),
        imgaug.Flip(horiz=True),
    ]
    ds = td.DataFromList(synthetic_images(24), shuffle=True)
    ds = td.AugmentImageComponent(ds, augmentors, copy=False)
    ds = tp.MultiProcessRunnerZMQ(ds, 2)
    ds = td.BatchData(ds, 8, remainder=False)
    assert len(ds) == 3
    ds.reset_state()
    batches = list(ds)
    assert len(batches) == 3
    assert all(b[0].shape == (8, 24, 24, 3) and b[0].dtype == np.uint8 for b in batches)
    ds.ds.close()


def test_faster_rcnn_train_dataflow(no_leaks):
    """DataFromList(roidbs, shuffle) -> MultiProcessMapData(preprocess returning None for
    images without boxes, buffer_size) : an endless stream."""
    roidbs = [{"id": i, "boxes": np.zeros((i % 4, 4), np.float32)} for i in range(20)]

    def preprocess(roidb):
        if len(roidb["boxes"]) == 0:
            return None  # FasterRCNN drops images without boxes
        return {"image": np.full((8, 8, 3), roidb["id"], np.uint8), "gt_boxes": roidb["boxes"]}

    ds = td.DataFromList(roidbs, shuffle=True)
    ds = tp.MultiProcessMapData(ds, 2, preprocess, buffer_size=8)
    assert len(ds) == 20
    ds.reset_state()
    got = [dp for _, dp in zip(range(50), ds, strict=False)]  # beyond one pass: no end
    ids = Counter(int(dp["image"][0, 0, 0]) for dp in got)
    assert len(got) == 50 and not {i for i in ids if i % 4 == 0}
    ds.close()


def test_cifar_dataflow(no_leaks):
    """AugmentImageComponent -> BatchData -> MultiProcessRunner(ds, 3, 2)."""
    augmentors = [
        imgaug.CenterPaste((40, 40)),
        imgaug.RandomCrop((32, 32)),
        imgaug.Flip(horiz=True),
    ]
    rng = np.random.RandomState(0)
    data = [[rng.randint(0, 255, (32, 32, 3), np.uint8), i % 10] for i in range(40)]
    ds = td.AugmentImageComponent(td.DataFromList(data, shuffle=True), augmentors)
    ds = td.BatchData(ds, 8, remainder=False)
    ds = tp.MultiProcessRunner(ds, 3, 2)
    assert ds.size() == 5
    ds.reset_state()
    batches = list(ds.get_data())
    assert len(batches) == 5
    assert all(b[0].shape == (8, 32, 32, 3) and b[1].dtype == np.int32 for b in batches)
    ds.close()
