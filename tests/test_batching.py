"""Small-item batching: the core BatchingSender and the batch format, and what the
Runner shows of it (nothing: order kept, stalled dataflows still deliver)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import flowplug as fp
from flowplug.batching import LateFlush
from flowplug.serialize import Batch, dumps, loads, unpack_batch
from flowplug.testing.contract import assert_same


class Recording(fp.BatchingSender):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.messages: list[list] = []
        self.written = threading.Event()

    def write_one(self, frames):
        self.messages.append([loads([bytes(f) for f in frames])])
        self.written.set()

    def write_batch(self, header, blob):
        self.messages.append(unpack_batch(header, bytes(blob)))
        self.written.set()


def test_batch_round_trips_objects_with_aligned_arrays():
    objs = [1, "x" * 100, {"a": np.arange(5000.0)}, np.arange(3, dtype=np.int8), (None, b"z")]
    batch = Batch()
    for obj in objs:
        batch.add(dumps(obj))
    assert batch.count == len(objs)
    header, blob = batch.take()
    assert batch.count == 0 and batch.nbytes == 0
    got = unpack_batch(header, bytes(blob))
    for g, w in zip(got, objs, strict=True):
        assert_same(g, w)
    assert got[2]["a"].flags.aligned


def test_dump_pickles_into_the_batch_what_dumps_would_send():
    objs = [1, "x" * 100, {"a": np.arange(5000.0)}, (None, b"z")]
    batch = Batch()
    for obj in objs:
        assert batch.dump(obj, 128 * 1024) is None
    header, blob = batch.take()
    got = unpack_batch(header, bytes(blob))
    for g, w in zip(got, objs, strict=True):
        assert_same(g, w)
    assert got[2]["a"].flags.aligned


def test_dump_leaves_the_batch_as_it_was_for_a_large_or_unpicklable_object():
    batch = Batch()
    assert batch.dump("first", 1000) is None
    big = np.arange(10_000, dtype=np.int64)
    frames = batch.dump({"big": big}, 1000)  # over item_max: its frames, for sending alone
    assert frames is not None and len(frames) == 2
    assert_same(loads(frames), {"big": big})
    assert np.shares_memory(np.frombuffer(frames[1], np.int64), big)  # not copied
    with pytest.raises(TypeError, match="datapoint of type function cannot be pickled"):
        batch.dump(lambda: 0, 1000)
    assert batch.dump("last", 1000) is None
    header, blob = batch.take()
    assert unpack_batch(header, bytes(blob)) == ["first", "last"]


def test_a_batch_reuses_its_memory_unless_the_transport_kept_a_view():
    batch = Batch()
    batch.dump("a" * 500, 1000)
    header, blob = batch.take()
    address = np.frombuffer(blob, np.uint8).ctypes.data
    batch.taken(blob)
    batch.dump("b" * 500, 1000)
    header, blob = batch.take()
    assert np.frombuffer(blob, np.uint8).ctypes.data == address  # the same memory again
    kept = memoryview(blob)  # a transport that holds on to the blob
    batch.taken(blob)
    batch.dump("c" * 500, 1000)
    header2, blob2 = batch.take()
    assert unpack_batch(header, kept) == ["b" * 500]  # untouched by the next batch
    assert unpack_batch(header2, blob2) == ["c" * 500]


def test_sender_packs_up_to_max_items_and_keeps_order_around_large_items():
    sender = Recording(max_items=3, max_delay=60)
    big = np.arange(100_000, dtype=np.int64)  # larger than item_max: sent alone
    for obj in [0, 1, 2, 3, big, 4]:
        sender.send(obj)
    sender.close()
    assert [len(m) for m in sender.messages] == [3, 1, 1, 1]
    flat = [x for m in sender.messages for x in m]
    assert flat[:4] == [0, 1, 2, 3] and flat[5] == 4
    np.testing.assert_array_equal(flat[4], big)


def test_sender_flushes_a_waiting_batch_without_another_send():
    sender = Recording(max_items=64, max_delay=0.01)
    sender.send("lonely")
    assert sender.written.wait(10), "the timer never flushed the batch"
    assert sender.messages == [["lonely"]]
    sender.close()


def test_every_batch_is_flushed_in_time_while_the_timer_runs_and_after_it_slept():
    sender = Recording(max_items=64, max_delay=0.01)
    try:
        for word in ["one", "two"]:  # the second begins while the timer still looks
            sender.written.clear()
            sender.send(word)
            assert sender.written.wait(10), f"{word!r} was never flushed"
        time.sleep(LateFlush.IDLE_TICKS * 0.01 + 0.2)  # the timer went to sleep
        sender.written.clear()
        sender.send("three")
        assert sender.written.wait(10), "'three' was never flushed"
        assert sender.messages == [["one"], ["two"], ["three"]]
    finally:
        sender.close()


def test_late_flush_writes_a_due_batch_once_and_ends_on_stop_or_a_failed_write():
    lock = threading.Lock()
    pending = []
    writes = []
    wrote = threading.Event()

    def write():  # as a sender's: under the lock, tells the timer it wrote
        late.written()
        writes.append(list(pending))
        pending.clear()
        wrote.set()
        if len(writes) == 2:
            raise OSError("the consumer is gone")

    late = LateFlush(lock, 0.01, lambda: pending, write, name="test-late-flush")
    with lock:
        pending.append("a")
        late.began()
    assert wrote.wait(10), "the timer never wrote the due batch"
    with lock:
        assert writes == [["a"]]
        wrote.clear()
        pending.append("b")
        late.began()
    assert wrote.wait(10)
    time.sleep(0.05)  # the failed write ended the thread: nothing more is written
    late.stop()
    assert writes == [["a"], ["b"]]
    assert late._thread is not None and not late._thread.is_alive()


def test_batching_off_sends_each_item_alone():
    sender = Recording(max_items=1)
    for i in range(3):
        sender.send(i)
    sender.close()
    assert sender.messages == [[0], [1], [2]]


class StallAfterOne(fp.DataFlow):
    """Yield one small item, then stall: longer than the runner's timeout, far longer than
    a batch may wait. Without the timer flush, "first" would only leave with "later".
    (Short enough that a thread worker ends within close()'s bound for threads.)"""

    def __iter__(self):
        yield "first"
        time.sleep(2.5)
        yield "later"


@pytest.mark.parametrize("transport", sorted(fp.available_transports()))
def test_a_stalled_dataflow_still_delivers(transport):
    with fp.Runner(StallAfterOne(), transport=transport, timeout=2) as runner:
        assert next(iter(runner)) == "first"


class Mixed(fp.DataFlow):
    def __len__(self):
        return 40

    def __iter__(self):
        for i in range(40):
            yield np.full(50_000, i, dtype=np.int32) if i % 7 == 0 else i


@pytest.mark.parametrize("transport", sorted(fp.available_transports()))
def test_one_worker_keeps_order_across_batched_and_large_items(transport):
    with fp.Runner(Mixed(), transport=transport, num_workers=1) as runner:
        got = list(runner)
    assert [int(x[0]) if isinstance(x, np.ndarray) else x for x in got] == list(range(40))
