"""Bounded multiprocessing pipes between worker processes and the consumer, one per worker.

It keeps ``multiprocessing.Queue``'s semantics (portable, every start method, a bounded
number of messages in flight) but not its costs: a ``multiprocessing.Queue`` pickles in a
feeder thread and copies every datapoint twice on each side. Here the worker pickles
(protocol 5, large buffers out of band) in its own thread and writes the pickle stream and
the buffers straight into the pipe with one ``writev``; the consumer reads a message into
one buffer and rebuilds the datapoint on top of it, so received arrays are (writable)
views of that buffer. Small datapoints are batched (:class:`flowplug.BatchingSender`).

Messages are framed by :mod:`flowplug.pipes` (a lone datapoint is a batch of one).

Fairness: each worker writes to its own pipe, with its own share of ``capacity`` (a
semaphore), and the consumer takes complete messages from the pipes in turn. With one pipe
and one semaphore for all (as ``multiprocessing.Queue``), the running worker takes every
freed slot first, and its queued messages are ahead of anything another worker sends: the
fault soak saw a worker's error report held back behind more than 10,000 datapoints.

The consumer reads without blocking and keeps a partly received message between calls, so
``recv(timeout)`` returns within its timeout even when a worker was killed in the middle
of a write (its message never completes; the Runner reports the death).

Tasks (consumer to workers) travel through a pipe of their own that the workers read
under a lock, fed by a consumer thread, as a ``multiprocessing.Queue`` does; unlike one,
closing drains the pipe so the feeder never stays blocked on workers that are gone.
"""

from __future__ import annotations

import collections
import functools
import multiprocessing as mp
import os
import pickle
import queue
import select
import threading
import time
from typing import Any

import flowplug
from flowplug.pipes import MessageReader, grow_pipe, write_batch, write_frames
from flowplug.serialize import dumps_bytes, unpack_batch


class QueueSender(flowplug.BatchingSender):
    """Writes to its worker's own pipe: no other process writes there, so no lock."""

    def __init__(
        self, conns: list[Any], slots: list[Any], batch: int, batch_delay: float, worker_id: int
    ):
        super().__init__(max_items=batch, max_delay=batch_delay)
        self._conn = conns[worker_id]
        self._fd = self._conn.fileno()
        self._slots = slots[worker_id]

    def write_one(self, frames: list[Any]) -> None:
        self._slots.acquire()
        try:
            write_frames(self._fd, frames)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # Only these mean the reading end is gone. Anything else (EINVAL, ENOMEM...)
            # is this worker's failure, reported with its cause.
            raise flowplug.TransportClosed(f"the consumer closed the queue: {exc}") from exc

    def write_batch(self, header: bytes, blob: memoryview) -> None:
        self._slots.acquire()
        try:
            write_batch(self._fd, header, [blob], len(blob))
        except (BrokenPipeError, ConnectionResetError) as exc:
            # Only these mean the reading end is gone. Anything else (EINVAL, ENOMEM...)
            # is this worker's failure, reported with its cause.
            raise flowplug.TransportClosed(f"the consumer closed the queue: {exc}") from exc

    def disconnect(self) -> None:
        self._conn.close()


class QueueTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, reader: Any, lock: Any, worker_id: int):
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


class _Channel:
    """The consumer's end of one worker's pipe, with the message it is reading."""

    __slots__ = ("conn", "fd", "message", "slots")

    def __init__(self, conn: Any, slots: Any):
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.slots = slots
        self.message = MessageReader()


class QueueTransport(flowplug.TaskTransport):
    """Bounded multiprocessing pipes, one per worker: portable, works with every start method.

    ``capacity`` bounds the messages in flight, each worker having its share; a message is
    one datapoint or a batch of small ones.
    """

    name = "queue"
    # a pipe per worker, both ends kept by the consumer; tasks: one pipe (and a lock,
    # which is a semaphore, not a file)
    open_files = flowplug.OpenFiles(consumer=0, per_worker=2, worker=0)
    task_open_files = flowplug.OpenFiles(consumer=2, per_worker=0, worker=0)
    options = (
        flowplug.Option("batch", int, 64, "pack up to this many small items per message (1: off)"),
        flowplug.Option(
            "batch_delay", float, 0.002, "seconds a small item may wait for its batch to fill"
        ),
    )

    def open(self) -> functools.partial[QueueSender]:
        ctx = mp.get_context(self.start_method)
        share = max(1, -(-self.capacity // self.num_workers))
        pipes = [ctx.Pipe(duplex=False) for _ in range(self.num_workers)]
        slots = [ctx.BoundedSemaphore(share) for _ in range(self.num_workers)]
        # The write ends stay open here until close(): workers started later need them,
        # and so a pipe never reads as ended while the transport is open.
        self._writers = [writer for _, writer in pipes]
        for writer in self._writers:
            grow_pipe(writer.fileno())
        self._channels = [_Channel(r, s) for (r, _), s in zip(pipes, slots, strict=True)]
        self._poller = select.poll()
        for channel in self._channels:
            self._poller.register(channel.fd, select.POLLIN)
        self._turn = 0
        self._bytes = 0  # received from the workers: stats' bytes_delivered
        self._ready: collections.deque[Any] = collections.deque()
        return functools.partial(
            QueueSender,
            self._writers,
            slots,
            max(1, self.option_values["batch"]),
            self.option_values["batch_delay"],
        )

    def recv(self, timeout: float) -> Any:
        ready = self._ready
        if ready:
            return ready.popleft()
        channels = self._channels
        n = len(channels)
        deadline = None
        while True:
            # In turn, starting after the pipe served last: a worker that always has a
            # message waiting cannot keep another's (its error report) waiting behind it.
            turn = self._turn
            for k in range(n):
                i = turn + k
                if i >= n:
                    i -= n
                channel = channels[i]
                message = channel.message
                if message.read(channel.fd):
                    channel.message = MessageReader()
                    channel.slots.release()
                    self._turn = i + 1
                    self._bytes += len(message.header) + len(message.body)  # counters()
                    ready.extend(unpack_batch(message.header, message.body))
                    return ready.popleft()
            if deadline is None:
                deadline = time.monotonic() + timeout
            else:
                timeout = deadline - time.monotonic()
            if timeout <= 0 or not self._poller.poll(timeout * 1000):
                return flowplug.EMPTY  # partial messages stay in their channels

    def open_tasks(self) -> functools.partial[QueueTaskReceiver]:
        ctx = mp.get_context(self.start_method)
        self._task_reader, self._task_writer = ctx.Pipe(duplex=False)
        # Pickled tasks wait here for the feeder thread, started on the first task (after
        # the workers are forked, so that no fork copies a running thread's locks).
        self._task_buffer: queue.Queue = queue.Queue(maxsize=self.capacity)
        self._task_stop = threading.Event()
        self._feeder: threading.Thread | None = None
        return functools.partial(QueueTaskReceiver, self._task_reader, ctx.Lock())

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

    def counters(self) -> dict[str, float]:
        return {"bytes_received": getattr(self, "_bytes", 0)}

    def close(self) -> None:
        if getattr(self, "_task_stop", None) is not None and not self._task_stop.is_set():
            self._close_tasks()
        channels = getattr(self, "_channels", None)
        if channels is not None:
            self._channels = None  # type: ignore[assignment]  # closed: nothing to send on
            for channel in channels:
                channel.conn.close()
            for writer in self._writers:
                writer.close()
