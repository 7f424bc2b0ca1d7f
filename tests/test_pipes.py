"""flowplug.pipes: one message per writev, read back whole however the bytes arrive."""

import os
import threading

import numpy as np

from flowplug.pipes import MessageReader, write_batch, write_frames
from flowplug.serialize import Batch, batch_of_one, dumps, unpack_batch
from flowplug.testing.contract import assert_same


def _pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def test_a_lone_object_is_a_batch_of_one_without_copies():
    arr = np.arange(10_000, dtype=np.float64)
    frames = dumps({"a": arr, "b": 1})
    header, parts, size = batch_of_one(frames)
    assert any(p is frames[1] for p in parts)  # the array's buffer itself, not a copy
    blob = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert len(blob) == size
    (got,) = unpack_batch(header, blob)
    assert_same(got, {"a": arr, "b": 1})


def test_frames_and_batches_round_trip_in_order():
    r, w = _pipe()
    try:
        write_frames(w, dumps(np.full(3000, 7, np.int32)))
        batch = Batch()
        for i in range(5):
            batch.add(dumps(i))
        header, blob = batch.take()
        write_batch(w, header, [blob], len(blob))
        got = []
        for _ in range(2):
            reader = MessageReader()
            assert reader.read(r)
            got += unpack_batch(reader.header, reader.body)
        assert_same(got, [np.full(3000, 7, np.int32), 0, 1, 2, 3, 4])
        assert not MessageReader().read(r)  # empty pipe: no message, no wait
    finally:
        os.close(r)
        os.close(w)


def test_a_message_read_over_many_calls_keeps_its_partial_state():
    """A message larger than the pipe arrives in pieces; the reader returns false until
    it is whole, never blocking (a worker killed mid-write cannot hang the consumer)."""
    r, w = _pipe()
    big = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
    writer = threading.Thread(target=write_frames, args=(w, dumps(big)))
    writer.start()
    reader = MessageReader()
    calls = 0
    try:
        while not reader.read(r):
            calls += 1
            threading.Event().wait(0.001)
        writer.join()
        (got,) = unpack_batch(reader.header, reader.body)
        assert_same(got, big)
        assert calls > 0
    finally:
        os.close(r)
        os.close(w)


def test_the_end_of_a_pipe_is_not_a_message():
    r, w = _pipe()
    os.write(w, b"\x01\x00")  # half of the sizes, then the writer is gone
    os.close(w)
    reader = MessageReader()
    assert not reader.read(r) and reader.eof
    os.close(r)
