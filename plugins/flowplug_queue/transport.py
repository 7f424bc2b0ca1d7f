"""One multiprocessing pipe per worker, framed by this transport.

A worker pickles a datapoint in its own thread and writes ``[8-byte length][pickle]`` to its
own pipe; a semaphore per worker bounds how many of its datapoints are in flight (together
about ``capacity``, as ``multiprocessing.Queue(maxsize)`` does). The consumer takes complete
messages from the pipes in turn, so a fast worker cannot starve a slow one (nor hold back
its error report); and it reads without blocking, keeping a partly received message between
calls, so ``recv(timeout)`` always returns within its timeout: a worker killed in the
middle of a write leaves a message that never completes, and the Runner, which keeps
checking on its workers, reports the death. (``multiprocessing.Queue.get`` would block for
ever in that case, inside a read, and its one semaphore lets a fast worker starve others.)

Only the processes the Runner starts hold the pipes: no other process can connect to them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import select
import struct
import sys
import time
from typing import Any

import flowplug
from flowplug.serialize import dumps_bytes

_HEADER = struct.Struct("<Q")
#: pipe buffer asked for on Linux (the default is 64 KiB): fewer wake-ups per large item.
_PIPE_SIZE = 1 << 20


class QueueSender(flowplug.Sender):
    def __init__(self, conn: Any, slots: Any):
        self._conn = conn
        self._fd = conn.fileno()
        self._slots = slots

    def send(self, obj: Any) -> None:
        data = dumps_bytes(obj)
        self._slots.acquire()
        _write_all(self._fd, [_HEADER.pack(len(data)), data])

    def close(self) -> None:
        self._conn.close()


def _write_all(fd: int, parts: list[Any]) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


class QueueEndpoint(flowplug.Endpoint):
    def __init__(self, conns: list[Any], slots: list[Any]):
        self._conns = conns
        self._slots = slots

    def connect(self, worker_id: int) -> QueueSender:
        return QueueSender(self._conns[worker_id], self._slots[worker_id])


class _Channel:
    """The consumer's end of one worker's pipe, with its partly read message."""

    def __init__(self, conn: Any, slots: Any):
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        if sys.platform.startswith("linux"):
            try:
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except (ImportError, AttributeError, OSError):
                pass  # a smaller pipe only costs speed
        self.slots = slots
        self.head = bytearray(_HEADER.size)
        self.buf = self.head
        self.view = memoryview(self.head)
        self.pos = 0

    def take(self) -> Any:
        """The next complete message's bytes, or None when none is complete yet."""
        while True:
            try:
                n = os.readv(self.fd, [self.view[self.pos :]])
            except BlockingIOError:
                return None
            if n == 0:
                raise flowplug.TransportClosed("a queue transport pipe was closed")
            self.pos += n
            if self.pos < len(self.view):
                continue
            if self.buf is self.head:  # the length is in: read the message
                (size,) = _HEADER.unpack(self.head)
                self.buf = bytearray(size)
                self.view = memoryview(self.buf)
                self.pos = 0
                continue
            data = self.buf
            self.buf, self.view, self.pos = self.head, memoryview(self.head), 0
            self.slots.release()
            return data


class QueueTransport(flowplug.Transport):
    """A pipe and a semaphore per worker from :mod:`multiprocessing`; every start method."""

    name = "queue"

    def open(self) -> QueueEndpoint:
        ctx = mp.get_context(self.start_method)
        per_worker = max(1, -(-self.capacity // self.num_workers))
        pipes = [ctx.Pipe(duplex=False) for _ in range(self.num_workers)]
        slots = [ctx.BoundedSemaphore(per_worker) for _ in range(self.num_workers)]
        # The write ends stay open here until close(): workers forked later need them.
        self._writers = [w for _, w in pipes]
        self._channels = [_Channel(r, s) for (r, _), s in zip(pipes, slots, strict=True)]
        self._poll = select.poll()
        for ch in self._channels:
            self._poll.register(ch.fd, select.POLLIN)
        self._turn = 0
        return QueueEndpoint(self._writers, slots)

    def recv(self, timeout: float) -> Any:
        channels = self._channels
        n = len(channels)
        wait_until = None
        while True:
            for k in range(n):  # in turn, starting after the last one served
                i = (self._turn + k) % n
                data = channels[i].take()
                if data is not None:
                    self._turn = i + 1
                    return pickle.loads(data)
            now = time.monotonic()
            if wait_until is None:
                wait_until = now + timeout
            if now >= wait_until or not self._poll.poll((wait_until - now) * 1000):
                return flowplug.EMPTY

    def close(self) -> None:
        channels = getattr(self, "_channels", None)
        if channels is not None:
            self._channels = None
            for ch in channels:
                ch.conn.close()
            for w in self._writers:
                w.close()
