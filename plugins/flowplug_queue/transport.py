"""multiprocessing.Queue between worker processes and the consumer.

A datapoint is pickled in the worker's own thread (not in the queue's feeder thread), so
an unpicklable datapoint raises where the Runner can report it instead of being dropped
with a traceback printed by the feeder.

Tasks (consumer to workers) travel through a pipe of their own that the workers read
under a lock, fed by a consumer thread, as a ``multiprocessing.Queue`` does; unlike one,
closing drains the pipe so the feeder never stays blocked on workers that are gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from typing import Any

import flowplug
from flowplug.serialize import dumps_bytes


class QueueSender(flowplug.Sender):
    def __init__(self, q: Any):
        self._queue = q
        self._put = q.put

    def send(self, obj: Any) -> None:
        self._put(dumps_bytes(obj))

    def close(self) -> None:
        # Flush the feeder thread: the worker leaves with os._exit, which would drop
        # whatever is still buffered (such as its last error report).
        self._queue.close()
        self._queue.join_thread()


class QueueEndpoint(flowplug.Endpoint):
    def __init__(self, q: Any):
        self._queue = q

    def connect(self, worker_id: int) -> QueueSender:
        return QueueSender(self._queue)


class QueueTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, reader: Any, lock: Any):
        self._reader = reader
        self._lock = lock

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return flowplug.EMPTY
        try:
            if not self._reader.poll(max(0.0, deadline - time.monotonic())):
                return flowplug.EMPTY
            data = self._reader.recv_bytes()
        finally:
            self._lock.release()
        return pickle.loads(data)


class QueueTaskEndpoint(flowplug.TaskEndpoint):
    def __init__(self, reader: Any, lock: Any):
        self._reader = reader
        self._lock = lock

    def connect(self, worker_id: int) -> QueueTaskReceiver:
        return QueueTaskReceiver(self._reader, self._lock)


class QueueTransport(flowplug.Transport):
    """A bounded ``multiprocessing.Queue``: portable, works with every start method."""

    name = "queue"
    carries_tasks = True

    def open(self) -> QueueEndpoint:
        ctx = mp.get_context(self.start_method)
        self._queue = ctx.Queue(maxsize=self.capacity)
        self._get = self._queue.get
        return QueueEndpoint(self._queue)

    def recv(self, timeout: float) -> Any:
        try:
            data = self._get(timeout=timeout)
        except queue.Empty:
            return flowplug.EMPTY
        return pickle.loads(data)

    def open_tasks(self) -> QueueTaskEndpoint:
        ctx = mp.get_context(self.start_method)
        self._task_reader, self._task_writer = ctx.Pipe(duplex=False)
        # Pickled tasks wait here for the feeder thread, started on the first task (after
        # the workers are forked, so that no fork copies a running thread's locks).
        self._task_buffer: queue.Queue = queue.Queue(maxsize=self.capacity)
        self._task_stop = threading.Event()
        self._feeder: threading.Thread | None = None
        return QueueTaskEndpoint(self._task_reader, ctx.Lock())

    def send_task(self, obj: Any, timeout: float) -> bool:
        data = dumps_bytes(obj)
        if self._feeder is None:
            self._feeder = threading.Thread(
                target=self._feed, name="flowplug-queue-task-feeder", daemon=True
            )
            self._feeder.start()
        try:
            if timeout > 0:
                self._task_buffer.put(data, timeout=timeout)
            else:
                self._task_buffer.put_nowait(data)
        except queue.Full:
            return False
        return True

    def _feed(self) -> None:
        get = self._task_buffer.get
        send = self._task_writer.send_bytes
        while not self._task_stop.is_set():
            try:
                data = get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                send(data)
            except OSError:
                return  # closed under us

    def _close_tasks(self) -> None:
        self._task_stop.set()
        feeder, self._feeder = self._feeder, None
        # The workers are stopped: read the pipe empty ourselves until a feeder blocked on
        # a full pipe has finished its write and seen the stop.
        reader = self._task_reader
        while feeder is not None and feeder.is_alive():
            if reader.poll(0.01):
                os.read(reader.fileno(), 1 << 20)
        self._task_reader.close()
        self._task_writer.close()

    def close(self) -> None:
        if getattr(self, "_task_stop", None) is not None and not self._task_stop.is_set():
            self._close_tasks()
        q = getattr(self, "_queue", None)
        if q is not None:
            self._queue = self._get = None
            q.cancel_join_thread()
            q.close()
            # The consumer never put, so close() left the pipe open; its fds go with
            # the last reference (the Runner drops the endpoint's on stop).
