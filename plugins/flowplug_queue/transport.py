"""multiprocessing.Queue between worker processes and the consumer.

A datapoint is pickled in the worker's own thread (not in the queue's feeder thread), so
an unpicklable datapoint raises where the Runner can report it instead of being dropped
with a traceback printed by the feeder.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
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


class QueueTransport(flowplug.Transport):
    """A bounded ``multiprocessing.Queue``: portable, works with every start method."""

    name = "queue"

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

    def close(self) -> None:
        q = getattr(self, "_queue", None)
        if q is not None:
            self._queue = self._get = None
            q.cancel_join_thread()
            q.close()
            # The consumer never put, so close() left the pipe open; its fds go with
            # the last reference (the Runner drops the endpoint's on stop).
