"""queue.Queue between threads: no serialization, objects are passed by reference.

Each worker thread needs its own dataflow instance: the Runner copies the dataflow per
thread, or calls a factory (``Runner(make_df, transport="thread")``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import flowplug

#: how often a sender blocked on a full queue checks whether the consumer closed.
_STOP_CHECK = 0.1


class ThreadSender(flowplug.Sender):
    def __init__(self, q: queue.Queue, closed: threading.Event):
        self._put = q.put
        self._closed = closed

    def send(self, obj: Any) -> None:
        while not self._closed.is_set():
            try:
                self._put(obj, timeout=_STOP_CHECK)
                return
            except queue.Full:
                pass
        raise flowplug.TransportClosed("the consumer closed the thread transport")


class ThreadEndpoint(flowplug.Endpoint):
    def __init__(self, q: queue.Queue, closed: threading.Event):
        self._queue = q
        self._closed = closed

    def connect(self, worker_id: int) -> ThreadSender:
        return ThreadSender(self._queue, self._closed)


class ThreadTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, q: queue.Queue, closed: threading.Event):
        self._get = q.get
        self._closed = closed

    def recv(self, timeout: float) -> Any:
        if self._closed.is_set():
            raise flowplug.TransportClosed("the consumer closed the thread transport")
        try:
            return self._get(timeout=timeout)
        except queue.Empty:
            return flowplug.EMPTY


class ThreadTaskEndpoint(flowplug.TaskEndpoint):
    def __init__(self, q: queue.Queue, closed: threading.Event):
        self._queue = q
        self._closed = closed

    def connect(self, worker_id: int) -> ThreadTaskReceiver:
        return ThreadTaskReceiver(self._queue, self._closed)


class ThreadTransport(flowplug.Transport):
    """Threads and a bounded ``queue.Queue``: the fastest choice when the dataflow
    releases the GIL (I/O, numpy, decoding in C) and nothing needs to be pickled."""

    name = "thread"
    crosses_processes = False
    zero_copy = True
    carries_tasks = True

    def open(self) -> ThreadEndpoint:
        self._queue: queue.Queue = queue.Queue(maxsize=self.capacity)
        self._closed = threading.Event()
        self._get = self._queue.get
        return ThreadEndpoint(self._queue, self._closed)

    def recv(self, timeout: float) -> Any:
        try:
            return self._get(timeout=timeout)
        except queue.Empty:
            return flowplug.EMPTY

    def open_tasks(self) -> ThreadTaskEndpoint:
        self._tasks: queue.Queue = queue.Queue(maxsize=self.capacity)
        return ThreadTaskEndpoint(self._tasks, self._closed)

    def send_task(self, obj: Any, timeout: float) -> bool:
        try:
            if timeout > 0:
                self._tasks.put(obj, timeout=timeout)
            else:
                self._tasks.put_nowait(obj)
        except queue.Full:
            return False
        return True

    def close(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()
