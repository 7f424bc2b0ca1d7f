"""A multiprocessing pipe shared by the workers, framed by this transport.

Workers pickle a datapoint in their own thread and write ``[8-byte length][pickle]`` under a
shared lock; a semaphore bounds how many datapoints are in flight (``capacity``), as
``multiprocessing.Queue(maxsize)`` does. The consumer reads the pipe without blocking and
keeps a partly received message between calls, so ``recv(timeout)`` always returns within
its timeout: a worker killed in the middle of a write leaves a message that never
completes, and the Runner, which keeps checking on its workers, reports the death.
(``multiprocessing.Queue.get`` would block for ever in that case, inside a read.)

Only the processes the Runner starts hold the pipe: no other process can connect to it.
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
    def __init__(self, conn: Any, lock: Any, slots: Any):
        self._conn = conn
        self._fd = conn.fileno()
        self._lock = lock
        self._slots = slots

    def send(self, obj: Any) -> None:
        data = dumps_bytes(obj)
        self._slots.acquire()
        with self._lock:
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
    def __init__(self, conn: Any, lock: Any, slots: Any):
        self._conn = conn
        self._lock = lock
        self._slots = slots

    def connect(self, worker_id: int) -> QueueSender:
        return QueueSender(self._conn, self._lock, self._slots)


class QueueTransport(flowplug.Transport):
    """A pipe and two locks from :mod:`multiprocessing`; works with every start method."""

    name = "queue"

    def open(self) -> QueueEndpoint:
        ctx = mp.get_context(self.start_method)
        self._reader, writer = ctx.Pipe(duplex=False)
        self._writer = writer  # closed with the transport: workers forked later need it
        self._fd = self._reader.fileno()
        if sys.platform.startswith("linux"):
            try:
                import fcntl

                fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except (ImportError, AttributeError, OSError):
                pass  # a smaller pipe only costs speed
        os.set_blocking(self._fd, False)
        self._slots = ctx.BoundedSemaphore(self.capacity)
        self._head = bytearray(_HEADER.size)
        self._buf = self._head
        self._view = memoryview(self._head)
        self._pos = 0
        return QueueEndpoint(writer, ctx.Lock(), self._slots)

    def recv(self, timeout: float) -> Any:
        wait_until = None
        while True:
            try:
                n = os.readv(self._fd, [self._view[self._pos :]])
            except BlockingIOError:
                n = -1
            if n > 0:
                self._pos += n
                if self._pos < len(self._view):
                    continue
                if self._buf is self._head:  # the length is in: read the message
                    (size,) = _HEADER.unpack(self._head)
                    self._buf = bytearray(size)
                    self._view = memoryview(self._buf)
                    self._pos = 0
                    continue
                data = self._buf
                self._buf, self._view, self._pos = self._head, memoryview(self._head), 0
                self._slots.release()
                return pickle.loads(data)
            if n == 0:
                raise flowplug.TransportClosed("the queue transport's pipe was closed")
            now = time.monotonic()
            if wait_until is None:
                wait_until = now + timeout
            if now >= wait_until or not select.select([self._fd], [], [], wait_until - now)[0]:
                return flowplug.EMPTY

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            self._reader = None
            reader.close()
            self._writer.close()
            self._buf = self._view = None
