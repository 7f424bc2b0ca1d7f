"""flowplug.torch.DataLoader next to torch.utils.data.DataLoader.

The behaviour of torch's own DataLoader tests (test/test_dataloader.py in pytorch) that
applies, each run against both loaders (`loader` is parametrized: "torch" and
"flowplug"), so that any difference shows up as a failure of one of the two. Tests that
only flowplug can pass (zero-copy tensors, its error classes) say so.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import os
import random
import threading
import time
import warnings

import numpy as np
import pytest
import torch  # in the test extra (torch==2.13.0): a missing torch fails, never skips
from torch.utils.data import (
    BatchSampler,
    Dataset,
    IterableDataset,
    SequentialSampler,
    SubsetRandomSampler,
    get_worker_info,
)

import flowplug as fp
import flowplug.torch as ft
from flowplug._sweep import default_dir

LOADERS = {
    "torch": torch.utils.data.DataLoader,
    "flowplug": functools.partial(ft.DataLoader, transport="shm"),
}


@pytest.fixture(params=sorted(LOADERS))
def loader(request, no_leaks):
    """A DataLoader class: torch's or flowplug's (on shm); the test leaves nothing behind."""
    return LOADERS[request.param]


# ---------------------------------------------------------------------------- datasets


class Squares(Dataset):
    """Item i is (a float tensor filled with i, i)."""

    def __init__(self, n=25):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), i


class CountTo(IterableDataset):
    """0..n-1, split over the workers by get_worker_info(), as torch's docs show."""

    def __init__(self, n=23):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        per = -(-self.n // info.num_workers)
        return iter(range(info.id * per, min(self.n, (info.id + 1) * per)))


class WhoAmI(Dataset):
    """Item i: (i, worker id, worker seed, pid, what worker_init_fn stored, first draws)."""

    def __init__(self, n=12):
        self.n = n
        self.init_value = -1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = get_worker_info()
        return {
            "index": i,
            "worker": info.id,
            "num_workers": info.num_workers,
            "seed": info.seed,
            "same_dataset": info.dataset is self,
            "pid": os.getpid(),
            "init_value": self.init_value,
            "torch_seed": torch.initial_seed(),
        }


def _record_first_draws(worker_id):
    info = get_worker_info()
    info.dataset.init_value = 100 + worker_id
    info.dataset.first_draws = (
        torch.rand(1).item(),
        random.random(),
        float(np.random.rand()),
    )


class Draws(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        time.sleep(0.05)  # so that both workers get items, whoever is faster to start
        return get_worker_info().id, self.first_draws


class Failing(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == 5:
            raise ValueError(f"bad item {i}")
        return i


class Sleepy(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        time.sleep(3.0)
        return i


class Segfault(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        # pytest enables faulthandler on a copy of its stderr, which a forked worker
        # inherits: without this, the intended crash dumps every thread into the report
        faulthandler.disable()
        ctypes.string_at(0)  # reads address 0: SIGSEGV
        return i


class SlowFirst(Dataset):
    """Item 0 takes long: with in_order=False the others pass it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 0:
            time.sleep(0.5)
        return i


def _indices(batches):
    return [b[1].tolist() for b in batches]


# ---------------------------------------------------------------------------- order, batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sequential(loader, num_workers):
    out = list(loader(Squares(), batch_size=1, num_workers=num_workers))
    assert len(out) == 25
    for i, (x, y) in enumerate(out):
        assert torch.equal(x, torch.full((1, 2, 3), float(i)))
        assert y.tolist() == [i]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batched_and_drop_last(loader, num_workers):
    kept = loader(Squares(), batch_size=4, num_workers=num_workers)
    dropped = loader(Squares(), batch_size=4, drop_last=True, num_workers=num_workers)
    assert len(kept) == 7 and len(dropped) == 6
    assert _indices(kept) == [list(range(i, min(i + 4, 25))) for i in range(0, 25, 4)]
    assert _indices(dropped) == [list(range(i, i + 4)) for i in range(0, 24, 4)]
    x, _ = next(iter(kept))
    assert x.shape == (4, 2, 3) and x.dtype == torch.float32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffle_same_order_as_torch_with_the_same_generator(num_workers, no_leaks):
    def run(cls):
        g = torch.Generator().manual_seed(7)
        dl = cls(Squares(), batch_size=3, shuffle=True, generator=g, num_workers=num_workers)
        return [_indices(dl) for _ in range(2)]  # two epochs: the generator moves on

    theirs = run(torch.utils.data.DataLoader)
    ours = run(LOADERS["flowplug"])
    assert ours == theirs
    assert theirs[0] != theirs[1]
    assert sorted(i for b in theirs[0] for i in b) == list(range(25))


def test_shuffle_follows_torch_manual_seed(no_leaks):
    def run(cls):
        torch.manual_seed(123)
        return _indices(cls(Squares(), batch_size=5, shuffle=True, num_workers=2))

    assert run(LOADERS["flowplug"]) == run(torch.utils.data.DataLoader)


def test_sampler_and_batch_sampler(loader):
    g = torch.Generator().manual_seed(1)
    sampler = SubsetRandomSampler([3, 1, 4, 15, 9, 2, 6], generator=g)
    got = _indices(loader(Squares(), batch_size=2, sampler=sampler, num_workers=2))
    assert sorted(i for b in got for i in b) == [1, 2, 3, 4, 6, 9, 15]
    assert [len(b) for b in got] == [2, 2, 2, 1]

    batches = [[0, 1, 2], [10], [24, 23]]
    assert _indices(loader(Squares(), batch_sampler=batches, num_workers=2)) == batches
    bs = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)
    assert _indices(loader(Squares(), batch_sampler=bs, num_workers=2)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_argument_errors_are_torchs(loader):
    with pytest.raises(ValueError, match="mutually exclusive"):
        loader(Squares(), batch_sampler=[[0]], batch_size=2)
    with pytest.raises(ValueError, match="mutually exclusive with shuffle"):
        loader(Squares(), sampler=[0, 1], shuffle=True)
    with pytest.raises(ValueError, match="persistent_workers option needs num_workers > 0"):
        loader(Squares(), persistent_workers=True)
    with pytest.raises(ValueError, match="expected unspecified shuffle"):
        loader(CountTo(), shuffle=True)


def test_len(loader):
    assert len(loader(Squares(), batch_size=None)) == 25
    assert len(loader(Squares(), batch_size=10)) == 3
    assert len(loader(Squares(), batch_size=10, drop_last=True)) == 2
    assert len(loader(CountTo(23), batch_size=5, num_workers=2)) == 5


def test_no_auto_batching_converts(loader):
    class Arrays(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.full((2,), i, np.int16)

    out = list(loader(Arrays(), batch_size=None, num_workers=2))
    assert [t.tolist() for t in out] == [[0, 0], [1, 1], [2, 2]]
    assert all(type(t) is torch.Tensor and t.dtype == torch.int16 for t in out)


def test_custom_collate_fn(loader):
    out = list(loader(Squares(6), batch_size=4, num_workers=2, collate_fn=_labels_only))
    assert out == [[0, 1, 2, 3], [4, 5]]


def _labels_only(batch):
    return [label for _, label in batch]


def test_dicts_strings_and_numbers_collate_as_in_torch(loader):
    class Records(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"tensor": torch.full((4, 2), float(i)), "inner": {"n": i}, "name": str(i)}

    out = list(loader(Records(), batch_size=2, num_workers=2))
    assert len(out) == 2
    for k, batch in enumerate(out):
        assert set(batch) == {"tensor", "inner", "name"}
        assert batch["tensor"].shape == (2, 4, 2)
        assert batch["tensor"][1, 0, 0].item() == 2 * k + 1
        assert batch["inner"]["n"].tolist() == [2 * k, 2 * k + 1]
        assert batch["name"] == [str(2 * k), str(2 * k + 1)]


def test_workers_end_with_an_abandoned_iterator(loader):
    it = iter(loader(Squares(), batch_size=2, num_workers=2))
    for k, _ in enumerate(it):
        if k == 2:
            break
    del it  # the leak check (no_leaks) sees no worker left


# ---------------------------------------------------------------------------- workers


def test_worker_info_and_worker_init_fn(loader):
    out = list(loader(WhoAmI(), batch_size=None, num_workers=2, worker_init_fn=_record_first_draws))
    assert [d["index"] for d in out] == list(range(12))
    for d in out:
        assert d["num_workers"] == 2 and d["same_dataset"]
        assert d["init_value"] == 100 + d["worker"]
        assert d["torch_seed"] == d["seed"]  # torch's RNG is seeded with the worker's seed
    seeds = {d["worker"]: d["seed"] for d in out}
    pids = {d["worker"]: d["pid"] for d in out}
    assert len(set(seeds.values())) == len(seeds)  # distinct per worker
    assert os.getpid() not in pids.values()
    assert get_worker_info() is None  # in the consumer


def _touch(directory, worker_id):
    (directory / f"init-{worker_id}").write_text(str(os.getpid()))


def test_worker_init_fn_runs_when_each_worker_starts(loader, tmp_path):
    """As in torch, every worker runs worker_init_fn when it starts: also one that gets
    no batch (one batch, two persistent workers, which stay up after the epoch)."""
    dl = loader(Squares(2), batch_size=2, num_workers=2, persistent_workers=True,
                worker_init_fn=functools.partial(_touch, tmp_path))  # fmt: skip
    assert len(list(dl)) == 1
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init-0", "init-1"]
    del dl


def test_seeds_reproducible_and_identical_to_torchs(no_leaks):
    def run(cls):
        torch.manual_seed(2024)
        dl = cls(Draws(), batch_size=None, num_workers=2, worker_init_fn=_record_first_draws)
        return {worker: draws for worker, draws in dl}

    ours, again, theirs = (run(LOADERS["flowplug"]), run(LOADERS["flowplug"]),
                           run(torch.utils.data.DataLoader))  # fmt: skip
    # torch, random and numpy, per worker. flowplug hands a batch to whichever worker is
    # free: on a loaded machine a worker still starting may get none (docs/pytorch.md).
    for run_ in (ours, again):
        assert run_ and all(run_[w] == theirs[w] for w in run_), (run_, theirs)
    assert set(ours) | set(again) == set(theirs) == {0, 1}
    assert theirs[0] != theirs[1]  # distinct per worker, in all three generators
    assert all(a != b for a, b in zip(theirs[0], theirs[1], strict=True))


def test_new_seeds_every_epoch_unless_persistent(loader):
    dl = loader(WhoAmI(4), batch_size=None, num_workers=2)
    first, second = ({d["seed"] for d in dl} for _ in range(2))
    assert first != second
    dl = loader(WhoAmI(4), batch_size=None, num_workers=2, persistent_workers=True)
    first = [(d["seed"], d["pid"]) for d in dl]
    second = [(d["seed"], d["pid"]) for d in dl]
    # the same two processes, seeded once (which of them serves an item may vary)
    assert len({p for _, p in first + second}) <= 2
    assert len({s for s, _ in first + second}) <= 2
    del dl  # persistent workers end with their loader


def test_iterable_dataset_sharded_by_worker_info(loader):
    dl = loader(CountTo(23), batch_size=5, num_workers=2)
    out = [b.tolist() for b in dl]
    # round robin over the workers, as torch's in_order: worker 0 has 0..11, worker 1 12..22
    assert out == [
        [0, 1, 2, 3, 4],
        [12, 13, 14, 15, 16],
        [5, 6, 7, 8, 9],
        [17, 18, 19, 20, 21],
        [10, 11],
        [22],
    ]
    assert [b.tolist() for b in dl] == out  # a second epoch


def test_iterable_dataset_drop_last_and_persistent(loader):
    dl = loader(CountTo(23), batch_size=5, num_workers=2, drop_last=True, persistent_workers=True)
    for _ in range(2):
        assert sorted(i for b in dl for i in b.tolist()) == list(range(10)) + list(range(12, 22))
    del dl


def test_in_order_false_lets_fast_batches_pass(loader):
    ordered = [int(x) for x in loader(SlowFirst(), batch_size=None, num_workers=2)]
    assert ordered == list(range(8))
    # Persistent workers, second epoch: both workers are up before the first task goes
    # out (flowplug hands a task to whichever worker is free, and a worker that starts
    # late gets none of the first few).
    dl = loader(SlowFirst(), batch_size=None, num_workers=2, in_order=False,
                persistent_workers=True)  # fmt: skip
    list(dl)
    loose = [int(x) for x in dl]
    assert sorted(loose) == list(range(8))
    assert loose[0] != 0
    del dl


def test_breaking_out_and_iterating_again(loader):
    dl = loader(Squares(), batch_size=2, num_workers=2, persistent_workers=True)
    for k, _ in enumerate(dl):
        if k == 3:
            break
    assert _indices(dl) == [list(range(i, min(i + 2, 25))) for i in range(0, 25, 2)]
    del dl


# ---------------------------------------------------------------------------- faults


def test_worker_error_raised_with_its_type_and_traceback(loader):
    with pytest.raises(ValueError, match="bad item 5") as info:
        list(loader(Failing(), batch_size=2, num_workers=2))
    assert "__getitem__" in str(info.value)  # the worker's traceback
    if isinstance(info.value, fp.FlowplugError):
        assert isinstance(info.value, fp.WorkerError)


def test_timeout_is_a_runtime_error(loader):
    with pytest.raises(RuntimeError, match="timed out after 1 seconds") as info:
        list(loader(Sleepy(), batch_size=None, num_workers=2, timeout=1))
    if loader is LOADERS["flowplug"]:
        assert isinstance(info.value, fp.RunnerTimeout)


def test_segfault_is_a_runtime_error(loader, capfd):
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid") as info:
        list(loader(Segfault(), batch_size=None, num_workers=2))
    if loader is LOADERS["flowplug"]:
        assert isinstance(info.value, fp.WorkerDied)
        assert info.value.exitcode == -11


# ---------------------------------------------------------------------------- pinning


def test_pin_memory_without_accelerator_warns_and_does_not_pin(loader):
    assert not torch.accelerator.is_available()
    with pytest.warns(UserWarning, match="no accelerator is found"):
        out = list(loader(Squares(4), batch_size=2, num_workers=2, pin_memory=True))
    assert len(out) == 2 and not out[0][0].is_pinned()


def test_pin_fn_runs_in_a_consumer_thread(no_leaks):
    seen = []

    def pin(batch):
        seen.append(threading.current_thread().name)
        x, y = batch
        return x + 1000, y

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no accelerator" warning: pin_fn pins
        dl = ft.DataLoader(Squares(6), batch_size=2, num_workers=2, pin_memory=True, pin_fn=pin)
        out = list(dl)
    assert [x[0, 0, 0].item() for x, _ in out] == [1000.0, 1002.0, 1004.0]
    assert seen == ["flowplug-torch-pin-memory"] * 3
    ours = list(ft.DataLoader(Squares(6), batch_size=2, pin_fn=pin))  # in-process too
    assert [x[0, 0, 0].item() for x, _ in ours] == [1000.0, 1002.0, 1004.0]


# ---------------------------------------------------------------------------- flowplug only


def test_refuses_thread_workers():
    with pytest.raises(fp.ConfigError, match="worker processes"):
        ft.DataLoader(Squares(), num_workers=2, transport="thread")


def test_configured_transport_is_the_default(monkeypatch, no_leaks):
    monkeypatch.setenv("FLOWPLUG_TRANSPORT", "queue")
    dl = ft.DataLoader(Squares(6), batch_size=3, num_workers=2)
    it = iter(dl)
    assert it._runner.transport_name == "queue"
    assert [b[1].tolist() for b in it] == [[0, 1, 2], [3, 4, 5]]


class Tensors(Dataset):
    """Tensors of several dtypes and layouts, made in the worker."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        big = torch.rand((64, 96), generator=g)
        return [
            big,  # contiguous, 24 KiB: out of band on every transport
            big.t(),  # transposed
            big[3:, ::5],  # a strided view with an offset
            torch.arange(10, dtype=torch.int64) * i,  # small: in band
            torch.ones(3, dtype=torch.bfloat16) * i,  # no numpy dtype
            torch.zeros((0, 4)),  # empty
            torch.tensor(i % 2 == 0),  # a 0-d bool
        ]


@pytest.mark.parametrize("transport", ["shm", "zmq", "queue"])
def test_tensors_cross_every_transport_exactly(transport, no_leaks):
    dl = ft.DataLoader(Tensors(), batch_size=None, num_workers=2, transport=transport)
    for i, got in enumerate(dl):
        for sent, came in zip(Tensors()[i], got, strict=True):
            assert type(came) is torch.Tensor
            assert came.dtype == sent.dtype and came.shape == sent.shape
            assert came.stride() == sent.stride()
            assert not came.requires_grad
            assert torch.equal(came, sent)
        got[0].add_(1)  # writable, like any tensor


def _in_shared_memory(tensor) -> bool:
    """True when the tensor's memory is a mapping of a file in the store's directory."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return len(fields) > 5 and fields[5].startswith(default_dir())
    return False


def test_shm_batches_arrive_in_store_memory(no_leaks):
    dl = ft.DataLoader(Squares(64), batch_size=8, num_workers=2, transport="shm")
    batches = list(dl)
    assert all(_in_shared_memory(x) for x, _ in batches)
    assert torch.equal(batches[1][0][0], torch.full((2, 3), 8.0))
    zmq = next(iter(ft.DataLoader(Squares(64), batch_size=8, num_workers=2, transport="zmq")))
    assert not _in_shared_memory(zmq[0])


def test_import_flowplug_imports_neither_torch_nor_jax():
    import subprocess
    import sys

    code = "import sys, flowplug; print(any(m in sys.modules for m in ('torch', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
