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
    """A message that arrives in pieces: the reader returns false until it is whole,
    never blocking (a worker killed mid-write cannot hang the consumer)."""
    big = np.random.default_rng(0).integers(0, 255, 200_000, dtype=np.uint8)
    message = bytearray()
    w_r, w_w = os.pipe()  # the message's bytes, as write_frames writes them

    def collect():
        while chunk := os.read(w_r, 1 << 16):
            message.extend(chunk)

    collector = threading.Thread(target=collect)
    collector.start()
    write_frames(w_w, dumps(big))
    os.close(w_w)
    collector.join()
    os.close(w_r)
    r, w = _pipe()
    reader = MessageReader()
    try:
        for start in range(0, len(message), 10_000):  # the consumer reads between pieces
            assert not reader.read(r)
            os.write(w, message[start : start + 10_000])
        assert reader.read(r)
        (got,) = unpack_batch(reader.header, reader.body)
        assert_same(got, big)
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
