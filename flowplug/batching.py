"""Batching for transports whose messages cost more than their bytes.

Small objects cost more per message than per byte, so a process transport packs them:
its sender subclasses :class:`BatchingSender`, which bounds the latency this adds
(``max_delay``: at the next ``send()``, or from a timer thread when the dataflow stalls).
The consumer side unpacks a batch (:func:`flowplug.serialize.unpack_batch`) into a local
deque and returns its objects one per :meth:`~flowplug.Transport.recv`, so neither the
Runner nor the user sees batches.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from typing import Any

from .serialize import Batch, dumps
from .transport import Sender


class BatchingSender(Sender):
    """A sender that packs small objects into one message, with a bounded added latency.

    ``send(obj)`` serializes ``obj`` (:func:`flowplug.serialize.dumps`). An object of at
    most ``item_max`` bytes is copied into the pending :class:`~flowplug.serialize.Batch`;
    a larger one goes out alone, right after the pending batch (order is kept). The batch
    goes out when it holds ``max_items`` objects or ``max_bytes`` bytes, on :meth:`flush`
    and :meth:`close`, and at the latest ``max_delay`` seconds after its first object: at
    the next ``send()``, or from a timer thread when the dataflow stalls. Subclasses
    implement :meth:`write_one` and :meth:`write_batch`; both are called under a lock, one
    at a time. The receiver rebuilds a batch with :func:`flowplug.serialize.unpack_batch`.

    :param max_items: at most this many objects per batch; 1 turns batching off.
    :param max_bytes: a batch goes out once it holds this many bytes.
    :param item_max: objects larger than this are never batched.
    :param max_delay: seconds an object may wait in a batch.
    """

    def __init__(
        self,
        max_items: int = 64,
        max_bytes: int = 256 * 1024,
        item_max: int = 128 * 1024,
        max_delay: float = 0.002,
    ):
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._item_max = item_max if max_items > 1 else -1
        self._max_delay = max_delay
        self._batch = Batch()
        self._started = 0.0  # when the pending batch got its first object
        self._lock = threading.Lock()
        self._pending = threading.Event()  # set while a batch waits: wakes the timer
        self._closed = False
        self._timer: threading.Thread | None = None

    @abstractmethod
    def write_one(self, frames: list[Any]) -> None:
        """Send one object's frames as one message. ``frames`` may be views of the
        caller's memory: when this returns, the transport must no longer read them."""

    @abstractmethod
    def write_batch(self, header: bytes, blob: bytearray) -> None:
        """Send a batch as one message; the sender never touches ``blob`` again."""

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        size = sum(memoryview(f).nbytes for f in frames) if len(frames) > 1 else len(frames[0])
        with self._lock:
            batch = self._batch
            if size > self._item_max:
                if batch.count:
                    self._write_pending()
                self.write_one(frames)
                return
            if not batch.count:
                self._started = time.monotonic()
                if self._timer is None:
                    self._start_timer()
                self._pending.set()
            batch.add(frames)
            if (
                batch.count >= self._max_items
                or batch.nbytes >= self._max_bytes
                or time.monotonic() - self._started >= self._max_delay
            ):
                self._write_pending()

    def _write_pending(self) -> None:
        self._pending.clear()
        header, blob = self._batch.take()
        self.write_batch(header, blob)

    def flush(self) -> None:
        with self._lock:
            if self._batch.count:
                self._write_pending()

    def close(self) -> None:
        """Flush, stop the timer thread, then :meth:`disconnect`."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._pending.set()
            if self._timer is not None:
                self._timer.join(1.0)
            self.disconnect()

    def disconnect(self) -> None:
        """Close the worker side's medium (sockets, pipes); called once by :meth:`close`."""

    def _start_timer(self) -> None:
        self._timer = threading.Thread(target=self._flush_late, name="flowplug-flush", daemon=True)
        self._timer.start()

    def _flush_late(self) -> None:
        """Timer thread: flush a batch that waited ``max_delay`` (the dataflow stalled)."""
        while True:
            self._pending.wait()
            if self._closed:
                return
            with self._lock:
                due = self._started + self._max_delay - time.monotonic()
                if self._batch.count and due <= 0:
                    try:
                        self._write_pending()
                    except Exception:
                        return  # the consumer is gone; the next send() reports it
                    continue
            time.sleep(max(due, 0.0002))
