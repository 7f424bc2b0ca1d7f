"""A queue between threads: no serialization, objects are passed by reference.

Each worker thread needs its own dataflow instance: the Runner copies the dataflow per
thread, or calls a factory (``Runner(make_df, transport="thread")``).
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Any

import flowplug

#: how often a sender blocked on a full queue checks whether the consumer closed.
_STOP_CHECK = 0.1


class ThreadSender(flowplug.Sender):
    def __init__(
        self,
        slots: list[threading.Semaphore],
        ready: queue.SimpleQueue,
        closed: threading.Event,
        worker_id: int,
    ):
        self._take_slot = slots[worker_id].acquire
        self._put = ready.put
        self._id = worker_id
        self._is_closed = closed.is_set

    def send(self, obj: Any) -> None:
        # Checked on every send, not only when the queue is full: a slow worker may
        # always find a free slot, and must still stop when the consumer closes.
        while not self._is_closed():
            if self._take_slot(timeout=_STOP_CHECK):
                self._put((self._id, obj))
                return
        raise flowplug.TransportClosed("the consumer closed the thread transport")


class ThreadTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, q: queue.Queue, closed: threading.Event, worker_id: int):
        self._get = q.get
        self._closed = closed

    def recv(self, timeout: float) -> Any:
        if self._closed.is_set():
            raise flowplug.TransportClosed("the consumer closed the thread transport")
        try:
            return self._get(timeout=timeout)
        except queue.Empty:
            return flowplug.EMPTY


class ThreadTransport(flowplug.TaskTransport):
    """Threads, one ``queue.SimpleQueue`` and a semaphore per worker: the fastest choice
    when the dataflow releases the GIL (I/O, numpy, decoding in C) and nothing needs to
    be pickled.

    Each worker may have its share of ``capacity`` in flight (its semaphore), so a running
    thread that keeps refilling the queue ahead of a woken one (the GIL favours it)
    cannot starve another worker, nor hold back its error report.
    """

    name = "thread"
    crosses_processes = False
    open_files = flowplug.OpenFiles()  # queues and semaphores of Python: no file
    task_open_files = flowplug.OpenFiles()
    zero_copy = True

    def open(self) -> functools.partial[ThreadSender]:
        per_worker = max(1, -(-self.capacity // self.num_workers))
        self._slots = [threading.Semaphore(per_worker) for _ in range(self.num_workers)]
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._get = self._ready.get
        return functools.partial(ThreadSender, self._slots, self._ready, self._closed)

    def recv(self, timeout: float) -> Any:
        try:
            worker_id, obj = self._get(timeout=timeout)
        except queue.Empty:
            return flowplug.EMPTY
        self._slots[worker_id].release()
        return obj

    def open_tasks(self) -> functools.partial[ThreadTaskReceiver]:
        self._tasks: queue.Queue = queue.Queue(maxsize=self.capacity)
        return functools.partial(ThreadTaskReceiver, self._tasks, self._closed)

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
