"""Batching for transports whose messages cost more than their bytes.

Small objects cost more per message than per byte, so a process transport packs them:
its sender subclasses :class:`BatchingSender`, which bounds the latency this adds
(``max_delay``: at the next ``send()``, or from a timer thread when the dataflow stalls).
The consumer side unpacks a batch (:func:`flowplug.serialize.unpack_batch`) into a local
deque and returns its objects one per :meth:`~flowplug.Transport.recv`, so neither the
Runner nor the user sees batches.

A sender that packs its batches its own way (Ray's actor host pickles straight into a
ring) keeps the same latency bound with :class:`LateFlush`, the timer half of
:class:`BatchingSender`.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from .serialize import Batch
from .transport import Sender


class LateFlush:
    """Writes a sender's pending batch once it has waited ``max_delay`` seconds and no
    ``send()`` came to write it (the dataflow stalled): the timer of a batching sender.

    The sender owns the batch and ``lock``. Holding the lock, it calls :meth:`began` when
    a batch gets its first object and :meth:`written` when it writes one; its ``send()``
    writes a batch whose :attr:`since` is ``max_delay`` old. The timer, a daemon thread
    started at the first batch, calls ``write()`` holding the lock when ``pending()`` is
    true and the batch is due; an error there ends the timer (the consumer is gone: the
    next ``send()`` reports it). :meth:`stop` ends it, from the sender's ``close()``.

    While batches keep coming the thread wakes about once per ``max_delay`` (at the due
    time of the batch it saw pending), never once per batch: :meth:`began` wakes it only
    when it went to sleep, which it does after :data:`IDLE_TICKS` looks found nothing
    pending. A wake-up per batch costs the sender's thread more than the batch saves
    (a futex wake, and a switch of the GIL to the timer thread and back).

    :param pending: whether a batch is pending (called holding the lock).
    :param write: writes the pending batch (called holding the lock).
    """

    #: after this many looks (``max_delay`` apart) found no batch, the thread sleeps
    #: until the next :meth:`began`.
    IDLE_TICKS = 8

    def __init__(
        self,
        lock: threading.Lock,
        max_delay: float,
        pending: Callable[[], Any],
        write: Callable[[], None],
        name: str = "flowplug-flush",
    ):
        self.lock = lock
        self.max_delay = max_delay
        self._pending = pending
        self._write = write
        self._name = name
        #: when the pending batch got its first object (``time.monotonic()``).
        self.since = 0.0
        self._wake = threading.Event()  # set to wake the thread from its sleep
        self._asleep = True  # the thread waits on _wake (or is not started yet)
        self._stopped = False
        self._thread: threading.Thread | None = None

    def began(self) -> None:
        """A batch got its first object (holding the lock)."""
        self.since = time.monotonic()
        if self._asleep:  # rare: the first batch, or the first after an idle spell
            self._asleep = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._wake.set()

    def written(self) -> None:
        """The pending batch was written (holding the lock)."""

    def stop(self) -> None:
        """End the thread (after the sender's last flush)."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def _run(self) -> None:
        lock = self.lock
        delay = self.max_delay
        while not self._stopped:  # read after the clear below: stop() sets both
            self._wake.wait()
            idle = 0
            while True:
                if self._stopped:
                    return
                with lock:
                    if self._pending():
                        idle = 0
                        due = self.since + delay - time.monotonic()
                        if due <= 0:
                            try:
                                self._write()
                            except Exception:
                                return  # the consumer is gone; the next send() reports it
                            due = delay
                    elif idle >= self.IDLE_TICKS:
                        # sleep until began() wakes us: cleared under the lock, so a
                        # batch that begins from now on sees _asleep and sets _wake
                        self._asleep = True
                        self._wake.clear()
                        break
                    else:
                        idle += 1
                        due = delay
                time.sleep(max(due, 0.0002))


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
        self._lock = threading.Lock()
        self._late = LateFlush(
            self._lock, max_delay, lambda: self._batch.count, self._write_pending
        )

    @abstractmethod
    def write_one(self, frames: list[Any]) -> None:
        """Send one object's frames as one message. ``frames`` may be views of the
        caller's memory: when this returns, the transport must no longer read them."""

    @abstractmethod
    def write_batch(self, header: bytes, blob: memoryview) -> None:
        """Send a batch as one message. ``blob`` is a view of the batch's buffer, which
        the next batch reuses once this returns: copy it to send it later (a transport
        that keeps a view makes the sender take new memory for every batch)."""

    def send(self, obj: Any) -> None:
        with self._lock:
            batch = self._batch
            began = not batch.count
            alone = batch.dump(obj, self._item_max)  # pickled straight into the batch
            if alone is not None:
                if not began:
                    self._write_pending()
                self.write_one(alone)
                return
            if began:
                self._late.began()
            if (
                batch.count >= self._max_items
                or batch.nbytes >= self._max_bytes
                or time.monotonic() - self._late.since >= self._max_delay
            ):
                self._write_pending()

    def _write_pending(self) -> None:
        self._late.written()
        batch = self._batch
        header, blob = batch.take()
        try:
            self.write_batch(header, blob)
        finally:
            batch.taken(blob)

    def flush(self) -> None:
        with self._lock:
            if self._batch.count:
                self._write_pending()

    def close(self) -> None:
        """Flush, stop the timer thread, then :meth:`disconnect`."""
        try:
            self.flush()
        finally:
            self._late.stop()
            self.disconnect()

    def disconnect(self) -> None:
        """Close the worker side's medium (sockets, pipes); called once by :meth:`close`."""
