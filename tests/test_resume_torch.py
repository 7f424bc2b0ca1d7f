"""flowplug.torch.DataLoader's state_dict() / load_state_dict(): torchdata's
StatefulDataLoader protocol, checked side by side with torchdata's own loader.

torchdata 0.11 is installed next to torch 2.13 with --no-deps (noxfile, tests session).
Its StatefulDataLoader resumes a sampler without state of its own (torch's RandomSampler)
by drawing the pass again from the sampler's generator *as it is in the new process*,
then skipping the batches it had yielded. flowplug saves the generators' states at the
start of the pass and restores them, so it also resumes passes after the first one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch  # in the test extra: a missing torch fails, never skips
from torch.utils.data import Dataset, IterableDataset, RandomSampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader  # --no-deps in the test session

import flowplug as fp
import flowplug.torch as ft

#: torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates (a UserWarning).
TORCHDATA_WARNS = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


class Items(Dataset):
    """Item i is i."""

    def __init__(self, n: int = 14):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class CountTo(IterableDataset):
    """0..n-1, split over the workers by get_worker_info(), as torch's docs show."""

    def __init__(self, n: int = 23):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        per = -(-self.n // info.num_workers)
        return iter(range(info.id * per, min(self.n, (info.id + 1) * per)))


class Passes(IterableDataset):
    """Counts its passes, with state (torchdata's Stateful): pass p yields 100 * p + i."""

    def __init__(self, n: int = 9):
        self.n = n
        self.passes = 0

    def __iter__(self):
        info = get_worker_info()
        wid, count = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(wid, self.n, count):
            yield 100 * self.passes + i
        self.passes += 1

    def state_dict(self):
        return {"passes": self.passes}

    def load_state_dict(self, state):
        self.passes = state["passes"]


def _batches(it) -> list[list[int]]:
    return [b.tolist() for b in it]


def _take(loader, k: int) -> list[list[int]]:
    """Start an epoch and take k batches (fewer if it ends: then it has ended)."""
    out = []
    it = iter(loader)
    for _ in range(k):
        try:
            out.append(next(it).tolist())
        except StopIteration:
            break
    return out


def _sampler_loader(cls, num_workers: int, **kw):
    g = torch.Generator().manual_seed(3)
    ds = Items()
    return cls(
        ds, batch_size=3, sampler=RandomSampler(ds, generator=g), num_workers=num_workers, **kw
    )


def _flowplug(*args, **kw):
    return ft.DataLoader(*args, transport="shm", **kw)


def _roundtrip(state: dict) -> dict:
    """What a checkpoint file gives back: the state through JSON."""
    return json.loads(json.dumps(state))


# ---------------------------------------------------------------------------- side by side


@TORCHDATA_WARNS
@pytest.mark.parametrize(
    ("before", "after"), [(0, 0), (2, 2), (2, 1), (0, 2)], ids=lambda n: f"w{n}"
)
@pytest.mark.parametrize("k", [0, 2, 5, 6], ids=lambda k: f"after{k}")
def test_same_rest_and_next_epoch_as_torchdata(no_leaks, before, after, k):
    """Saved in the first epoch after k batches (0: before the first; 5: all yielded;
    6: the epoch ended), resumed in a new loader with a new generator seeded alike:
    flowplug and torchdata yield the same rest and the same next epoch, and both are
    what the uninterrupted run yields. (One exception, torchdata's: saved after the
    epoch ended without workers, its next epoch is in another order.)"""
    whole = _sampler_loader(torch.utils.data.DataLoader, 0)
    epochs = [_batches(whole) for _ in range(2)]
    rests = {}
    for name, cls in (("torchdata", StatefulDataLoader), ("flowplug", _flowplug)):
        first = _sampler_loader(cls, before)
        seen = _take(first, k)
        state = first.state_dict()
        del first
        if name == "flowplug":
            state = _roundtrip(state)
        # torchdata asserts the same num_workers; flowplug may change it (map-style)
        second = _sampler_loader(cls, after if name == "flowplug" else before)
        second.load_state_dict(state)
        rest, following = _batches(second), _batches(second)
        del second
        if k > len(seen):  # the epoch had ended: the loader runs the next one
            rest, following = [], rest
        rests[name] = (rest, following)
        if name == "torchdata" and k > len(seen) and before == 0:
            assert following != epochs[1]  # the exception above
            continue
        assert seen + rest == epochs[0], name
        assert following == epochs[1], name
    if not (k > 5 and before == 0):
        assert rests["flowplug"] == rests["torchdata"]


@TORCHDATA_WARNS
@pytest.mark.parametrize("num_workers", [0, 2])
def test_later_epochs_resume_where_torchdata_replays_the_first(no_leaks, num_workers):
    """Saved in the second epoch: flowplug resumes that epoch's pass; torchdata draws
    the pass again from the new process's generator, which is where the *first* epoch
    began, so its rest is the rest of the first epoch's order (why flowplug saves the
    generators' states: a training script's checkpoint code works unchanged)."""
    whole = _sampler_loader(torch.utils.data.DataLoader, 0)
    epochs = [_batches(whole) for _ in range(2)]
    for name, cls in (("torchdata", StatefulDataLoader), ("flowplug", _flowplug)):
        first = _sampler_loader(cls, num_workers)
        _batches(first)
        seen = _take(first, 2)
        state = first.state_dict()
        del first
        second = _sampler_loader(cls, num_workers)
        second.load_state_dict(state)
        rest = _batches(second)
        del second
        assert seen == epochs[1][:2]
        if name == "flowplug":
            assert rest == epochs[1][2:]
        else:
            assert rest == epochs[0][2:]


# ---------------------------------------------------------------------------- flowplug's own runs


def _shuffled(num_workers: int, **kw):
    """shuffle=True with a generator: flowplug follows torch's DataLoader order."""
    return _flowplug(
        Items(20),
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
        num_workers=num_workers,
        **kw,
    )


@pytest.mark.parametrize(
    ("before", "after", "options"),
    [
        (2, 2, {}),
        (2, 1, {"in_order": False}),
        (0, 2, {}),
        (2, 0, {}),
        (2, 2, {"persistent_workers": True}),
        (2, 1, {"persistent_workers": True, "in_order": False}),
    ],
    ids=["w2-w2", "w2-w1-unordered", "w0-w2", "w2-w0", "persistent", "persistent-unordered"],
)
@pytest.mark.parametrize(("epoch", "k"), [(0, 0), (0, 3), (1, 7), (1, 8), (2, 1)])
def test_shuffled_resume_reproduces_the_uninterrupted_run(
    no_leaks, before, after, options, epoch, k
):
    """With shuffle=True and a generator, a resumed loader's epochs are those of
    flowplug's own uninterrupted run (whose order is torch's DataLoader's), at any point
    of any epoch (7 batches each; k=8: the epoch had ended), with another num_workers,
    in order or not, persistent or not."""
    # Persistent workers draw base_seed from the generator once, not every epoch (as in
    # torch), so their epochs' orders are not those of new workers per epoch.
    persistent = options.get("persistent_workers", False)
    whole = _shuffled(2 if persistent else 0, persistent_workers=persistent)
    epochs = [_batches(whole) for _ in range(4)]
    del whole
    assert epochs[0] != epochs[1]
    first = _shuffled(before, **options)
    for _ in range(epoch):
        _batches(first)
    seen = _take(first, k)
    state = _roundtrip(first.state_dict())
    del first
    second = _shuffled(after, **options)
    second.load_state_dict(state)
    rest, following = _batches(second), _batches(second)
    del second
    if k > len(seen):  # the epoch had ended: the loader runs the next one
        epoch, seen = epoch + 1, []
    # in_order=False: the same batches, in the order they were ready
    same = sorted if options.get("in_order") is False else list
    assert same(seen + rest) == same(epochs[epoch])
    assert same(following) == same(epochs[epoch + 1])


def test_default_generator_resumes_with_the_programs_rng_restored(no_leaks):
    """shuffle=True without a generator draws from torch's default RNG (seeded by
    torch.manual_seed): the loader saves it for the pass; the program restores its own
    RNG from its checkpoint, as training scripts do, and the next epochs follow."""

    def make(num_workers):
        return _flowplug(Items(20), batch_size=4, shuffle=True, num_workers=num_workers)

    torch.manual_seed(11)
    whole = make(0)
    epochs = [_batches(whole) for _ in range(3)]
    for k in (0, 2):
        torch.manual_seed(11)
        first = make(2)
        _batches(first)
        seen = _take(first, k)
        state, rng = _roundtrip(first.state_dict()), torch.get_rng_state()
        del first
        torch.manual_seed(12345)  # a new process
        second = make(1)
        torch.set_rng_state(rng)
        second.load_state_dict(state)
        assert seen + _batches(second) == epochs[1]
        assert _batches(second) == epochs[2]
        del second


def test_state_before_iterating_after_break_and_after_load(no_leaks):
    """state_dict() before any iteration is a fresh start; after a ``break`` (the
    iterator dropped) it still knows where the consumer stopped, as torchdata's; after
    load_state_dict() and before iterating it is the loaded state."""
    fresh = _shuffled(2)
    start = fresh.state_dict()
    assert start["yielded"] == 0 and start["base_seed"] is None
    for k, _ in enumerate(fresh):
        if k == 2:
            break
    state = fresh.state_dict()
    assert state["yielded"] == 3
    del fresh
    loaded = _shuffled(2)
    loaded.load_state_dict(state)
    assert loaded.state_dict() == state
    loaded.load_state_dict({})  # torchdata: an empty state loads nothing
    assert loaded.state_dict() == state
    assert len(_batches(loaded)) == 4
    del loaded


def test_state_is_small_plain_and_holds_no_batch(no_leaks):
    loader = _flowplug(
        Items(1000), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0),
        num_workers=2, in_order=False,
    )  # fmt: skip
    _take(loader, 40)
    state = loader.state_dict()
    del loader
    text = json.dumps(state)
    # One generator's state (mt19937: 5 KB) in base64, and the received positions.
    assert len(text) < 8000, len(text)
    assert state["yielded"] == 40
    assert not any(isinstance(v, torch.Tensor) for v in state.values())


def _plus_100(batch):
    return batch + 100


def test_a_pinning_thread_ahead_of_the_consumer_is_not_counted_as_received(no_leaks):
    """The pinning thread takes batches ahead of the consumer; the state counts only
    those the consumer got."""
    first = _shuffled(2, pin_fn=_plus_100)
    seen = [[i - 100 for i in b] for b in _take(first, 3)]
    time.sleep(0.2)  # the thread has taken more meanwhile
    state = first.state_dict()
    del first
    second = _shuffled(1, pin_fn=_plus_100)
    second.load_state_dict(state)
    rest = [[i - 100 for i in b] for b in _batches(second)]
    del second
    assert seen + rest == _batches(_shuffled(0))


def test_an_iterable_dataset_with_a_pinning_thread_has_no_state(no_leaks):
    loader = _flowplug(CountTo(), batch_size=2, num_workers=2, pin_fn=_plus_100)
    _take(loader, 1)
    with pytest.raises(fp.StateError, match="pinning thread"):
        loader.state_dict()
    del loader


# ---------------------------------------------------------------------------- IterableDataset


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("persistent", [False, True], ids=["new-workers", "persistent"])
@pytest.mark.parametrize("dataset", [CountTo, Passes])
@pytest.mark.parametrize(("epoch", "k"), [(0, 0), (0, 3), (1, 2), (1, 99)])
def test_iterable_dataset_resumes_exactly(no_leaks, num_workers, persistent, dataset, epoch, k):
    """Each worker replays its pass (or loads the dataset's own state, for a Stateful
    dataset, and goes on from there) and the batches the consumer had are not sent."""
    if persistent and num_workers == 0:
        persistent = False  # torch refuses persistent_workers without workers

    def make():
        return _flowplug(
            dataset(), batch_size=2, num_workers=num_workers, persistent_workers=persistent
        )

    whole = make()
    epochs = [_batches(whole) for _ in range(3)]
    del whole
    first = make()
    for _ in range(epoch):
        _batches(first)
    seen = _take(first, k)
    state = _roundtrip(first.state_dict())
    del first
    second = make()
    second.load_state_dict(state)
    rest, following = _batches(second), _batches(second)
    del second
    if k > len(seen):  # the epoch had ended: the loader runs the next one
        rest, following = [], rest
    assert seen + rest == epochs[epoch]
    assert following == epochs[epoch + 1]


def test_iterable_dataset_keeps_its_num_workers():
    saved = ft.DataLoader(CountTo(), batch_size=2, num_workers=2, transport="shm").state_dict()
    other = ft.DataLoader(CountTo(), batch_size=2, num_workers=1, transport="shm")
    with pytest.raises(fp.ConfigError, match="num_workers=2"):
        other.load_state_dict(saved)


# ---------------------------------------------------------------------------- refusals


@TORCHDATA_WARNS
def test_foreign_and_mismatched_states_are_refused():
    ours = _sampler_loader(_flowplug, 0)
    with pytest.raises(ValueError, match=r"flowplug\.torch\.DataLoader"):
        ours.load_state_dict(_sampler_loader(StatefulDataLoader, 0).state_dict())
    with pytest.raises(ValueError, match="layout version"):
        ours.load_state_dict({**ours.state_dict(), "flowplug_loader": 99})
    iterable = ft.DataLoader(CountTo(), batch_size=2)
    with pytest.raises(fp.ConfigError, match="map-style"):
        iterable.load_state_dict(ours.state_dict())
    unseeded = _flowplug(Items(), batch_size=3, sampler=RandomSampler(Items()))
    with pytest.raises(fp.ConfigError, match="random generator"):
        unseeded.load_state_dict(ours.state_dict())


# ---------------------------------------------------------------------------- SIGKILL

TRAINING = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from torch.utils.data import Dataset, RandomSampler
    from flowplug.torch import DataLoader

    class Items(Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return i

    state_path, log_path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ds = Items()
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(
        ds, batch_size=4, sampler=RandomSampler(ds, generator=g),
        num_workers=2 if kill_at >= 0 else 1, transport="shm", timeout=60,
    )
    start = 0
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        loader.load_state_dict(saved["loader"])
        start = saved["epoch"]
    seen = 0
    with open(log_path, "a") as log:
        for epoch in range(start, 3):
            for batch in loader:
                log.write(f"{epoch} {' '.join(map(str, batch.tolist()))}\\n")
                log.flush()
                tmp = state_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"epoch": epoch, "loader": loader.state_dict()}, f)
                os.replace(tmp, state_path)  # the checkpoint is whole or absent
                seen += 1
                if seen == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_right_after_saving_then_resumed_in_a_fresh_process(no_leaks, tmp_path):
    """A training script checkpoints the loader after every batch and is SIGKILLed in
    its second epoch; a fresh process (one worker instead of two) resumes from the file:
    over both processes every epoch's batches are exactly those of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    state, log = str(tmp_path / "state.json"), str(tmp_path / "seen.log")

    def run(kill_at: int) -> tuple[int, int, str]:
        proc = subprocess.Popen(
            [sys.executable, str(script), state, log, str(kill_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=120)
        return proc.pid, proc.returncode, err

    pid, code, err = run(8 + 5)  # 8 batches per epoch: killed after the 5th of epoch 1
    assert code == -signal.SIGKILL, err
    _, code, err = run(-1)
    assert code == 0, err
    seen: dict[int, list[list[int]]] = {}
    with open(log) as f:
        for line in f:
            epoch, *items = map(int, line.split())
            seen.setdefault(epoch, []).append(items)
    ds = Items(30)
    whole = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1))
    )
    assert seen == {epoch: _batches(whole) for epoch in range(3)}
    left = [e for e in os.listdir("/dev/shm") if f"-{pid}-" in e]
    assert not left, left
