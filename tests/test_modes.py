"""flowplug.modes: what one epoch yields, driven by a scripted feed (no workers)."""

from collections import Counter

import pytest

import flowplug as fp
from flowplug._gates import EpochEnd
from flowplug.modes import MODES, Feed, ReplicateMode, ShardMode, make_mode
from flowplug.stats import Meter


class Script:
    """A transport's recv() that returns the given messages, then EMPTY."""

    def __init__(self, messages):
        self.messages = list(messages)

    def recv(self, timeout):
        return self.messages.pop(0) if self.messages else fp.EMPTY


class Run:
    """A started run (flowplug.modes.Run) over a scripted transport."""

    closing = None
    inside = 0

    def __init__(self, transport, workers, control):
        self.transport = transport
        self.workers = workers
        self.control = control

    def recv(self, timeout):
        return self.transport.recv(timeout)


class Control:
    def __init__(self, n):
        self.started = []
        self.credits = Counter()
        self.release = [lambda w=w: self.credits.update([w]) for w in range(n)]
        self.give = lambda w: self.release[w]()  # no worker sleeps here: never held back

    def give_held(self):
        pass

    def start_epoch(self, epoch):
        self.started.append(epoch)


class Workers:
    death = None


def feed(messages, n=2, control=None, size=None):
    def slow(obj):
        if obj is fp.EMPTY:
            raise AssertionError("the script ran out")
        return obj

    def fail(exc):
        return exc

    run = Run(Script(messages), Workers(), control)
    return Feed(run, n, 8, size, None, "script", slow, Meter(), fail)


def test_replicate_yields_size_items_as_they_come_and_counts_them():
    scripted = feed(["a", "b", "c", "d"], size=3)
    assert list(ReplicateMode().epoch(scripted)) == ["a", "b", "c"]
    assert scripted.meter.delivered == 3


def test_shard_ordered_reorders_files_the_next_epoch_and_gives_every_credit_back():
    control = Control(2)
    mode = ShardMode(ordered=True)
    # Worker w sends indexes w, w + 2, ...; each worker's messages in order, interleaved.
    messages = [
        (0, 1, "b"),  # worker 1, ahead of index 0
        (0, 0, "a"),
        (0, 3, "d"),
        (0, 2, "c"),
        EpochEnd(0, 0),
        (1, 0, "next-a"),  # worker 0 prefetching epoch 1
        EpochEnd(1, 0),
    ]
    assert list(mode.epoch(feed(messages, control=control))) == ["a", "b", "c", "d"]
    assert control.started == [0]
    assert control.credits == Counter({0: 2, 1: 2})
    assert mode.ahead == {1: {0: "next-a"}}  # kept for epoch 1, its credit not yet given


def test_shard_unordered_yields_as_it_comes_and_ends_on_every_epoch_end():
    control = Control(2)
    mode = ShardMode(ordered=False)
    messages = [(0, 1, "b"), EpochEnd(1, 0), (0, 0, "a"), EpochEnd(0, 0)]
    assert list(mode.epoch(feed(messages, control=control))) == ["b", "a"]


def test_a_stranger_in_shard_mode_is_an_error():
    mode = ShardMode(ordered=False)
    with pytest.raises(fp.StateError, match="where shard mode expects items"):
        list(mode.epoch(feed(["not an item"], control=Control(2))))


def test_modes_by_name():
    assert MODES == ("replicate", "shard")
    assert isinstance(make_mode("shard", True), ShardMode)
    with pytest.raises(fp.ConfigError, match="Did you mean 'shard'"):
        make_mode("shart", False)
    with pytest.raises(fp.ConfigError, match="ordered=True needs mode='shard'"):
        make_mode("replicate", True)
