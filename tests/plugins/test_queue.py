"""The pipe framing (flowplug.pipes) and the queue transport's own edges: writev limits,
and what an error from the pipe means."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from flowplug_queue.transport import QueueSender

import flowplug as fp
from flowplug.pipes import IOV_MAX, write_all


def test_write_all_takes_more_buffers_than_iov_max():
    """One writev() takes at most IOV_MAX buffers (EINVAL beyond): write_all chunks."""
    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(3 * IOV_MAX + 5)]
    expected = b"".join(parts)
    r, w = os.pipe()
    got = bytearray()

    def read() -> None:
        while len(got) < len(expected):
            got.extend(os.read(r, 1 << 16))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        write_all(w, parts)
        reader.join(30)
    finally:
        os.close(w)
        os.close(r)
    assert bytes(got) == expected


class _Conn:
    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


def test_einval_is_an_error_not_a_closed_transport():
    """Only a broken pipe means the consumer is gone. EINVAL (here: an eventfd, which
    takes 8-byte writes only) is the worker's failure and must be reported as one, not
    taken for TransportClosed (which ends the worker as if it had been stopped)."""
    sender = QueueSender([_Conn(os.eventfd(0))], [threading.Semaphore(10)], 1, 0.0, 0)
    try:
        with pytest.raises(OSError) as info:
            sender.send(np.zeros(100_000, np.uint8))
        assert not isinstance(info.value, fp.TransportClosed)
    finally:
        sender.disconnect()


def test_broken_pipe_is_a_closed_transport():
    r, w = os.pipe()
    os.close(r)
    sender = QueueSender([_Conn(w)], [threading.Semaphore(10)], 1, 0.0, 0)
    try:
        with pytest.raises(fp.TransportClosed):
            sender.send(np.zeros(100_000, np.uint8))
    finally:
        sender.disconnect()
