"""ZeroMQ PUSH/PULL over ipc://, with pickle protocol 5 and out-of-band buffers.

A message is ``[token, pickle stream, buffer...]`` for one object, or ``[token + header,
blob]`` for a batch of small ones (:class:`flowplug.BatchingSender`). The token is private
to the run, so bytes from a stranger who connects to the socket are dropped, never
unpickled. Received numpy arrays are views of the received frames.

Large buffers are sent without a copy (``copy=False``); ``send()`` returns once zmq has
handed them to the kernel (a ``MessageTracker``), because the worker may refill the same
array as soon as ``send()`` returns. A dataflow that yields a new array each time and never
changes one it has yielded can say so (option ``fresh_arrays``): ``send()`` then returns at
once and zmq keeps the buffers referenced until it is done, as a bare pyzmq loop does.
Small items are copied into batches, so they never wait.
"""

from __future__ import annotations

import collections
import functools
import secrets
from typing import Any

import zmq

import flowplug
from flowplug.ipc import recv_within
from flowplug.serialize import dumps, loads, unpack_batch

#: how long a closing worker keeps trying to deliver what it has sent (ms).
_LINGER_MS = 5000


#: ``zmq.SNDMORE`` as a plain int: pyzmq's ``send_multipart`` combines its flags as enum
#: members, which costs microseconds per frame; frames go out one ``send`` each here.
_MORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class ZmqSender(flowplug.BatchingSender):
    def __init__(
        self,
        address: str,
        token: bytes,
        hwm: int,
        batch: int,
        batch_delay: float,
        fresh_arrays: bool,
        worker_id: int,
    ):
        super().__init__(max_items=batch, max_delay=batch_delay)
        self._wait = not fresh_arrays
        self._sockets = flowplug.ZmqSockets()
        self._sock = self._sockets.connect(zmq.PUSH, address, hwm=hwm, linger_ms=_LINGER_MS)
        self._token = token
        self._send = self._sock.send

    def write_one(self, frames: list[Any]) -> None:
        send = self._send
        send(self._token, _MORE)
        if len(frames) == 1:  # no out-of-band buffer: the stream is ours, zmq may keep it
            send(frames[0], 0, copy=False)
            return
        send(frames[0], _MORE)
        last = len(frames) - 1
        for i in range(1, last):
            send(frames[i], _MORE, copy=False)
        # The buffers are the worker's arrays: send them without a copy, and return only
        # once zmq is done with them, since the worker may refill them right after; unless
        # the dataflow promised fresh arrays (zmq keeps them referenced while it reads).
        # zmq releases a message's frames in order: the last one's tracker covers them all.
        if not self._wait:
            send(frames[last], 0, copy=False)
            return
        send(frames[last], 0, copy=False, track=True).wait()

    def write_batch(self, header: bytes, blob: memoryview) -> None:
        send = self._send
        send(self._token + header, _MORE)
        send(blob, 0)  # copied: the blob is the batch's buffer, which the next batch reuses

    def disconnect(self) -> None:
        self._sockets.close()


class ZmqTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, address: str, token: bytes, worker_id: int):
        self._sockets = flowplug.ZmqSockets()
        # Take one task at a time, so that a busy worker leaves the next to an idle one.
        self._sock = self._sockets.connect(zmq.PULL, address, hwm=1)
        self._token = token

    def recv(self, timeout: float) -> Any:
        frames = recv_within(self._sock, timeout, multipart=True, copy=False)
        if frames is None:
            return flowplug.EMPTY
        if frames[0].bytes != self._token:
            return flowplug.EMPTY
        return loads(frames[1:])

    def close(self) -> None:
        self._sockets.close()


class ZmqTransport(flowplug.TaskTransport):
    """ZeroMQ PUSH/PULL over an ipc:// socket: fast for large arrays, no feeder thread.

    Tasks go the other way over a second PUSH/PULL pair (round robin over the workers
    that have room).
    """

    name = "zmq"
    # measured (/proc/self/fd): a context holds 5 fds, a socket 2 (its mailbox and its
    # fd), the consumer's socket one per connected worker, and 2 more while the consumer
    # watches its workers connect (a monitor: ZmqSockets.watch_accepts); the task socket
    # shares the consumer's context, a worker's task receiver has a context of its own.
    open_files = flowplug.OpenFiles(consumer=9, per_worker=1, worker=7)
    task_open_files = flowplug.OpenFiles(consumer=4, per_worker=1, worker=7)
    options = (
        flowplug.Option(
            "hwm", int, 0, "zmq high-water mark on both sides (0: use the runner's capacity)"
        ),
        flowplug.Option("batch", int, 64, "pack up to this many small items per message (1: off)"),
        flowplug.Option(
            "batch_delay", float, 0.002, "seconds a small item may wait for its batch to fill"
        ),
        flowplug.Option(
            "fresh_arrays",
            bool,
            False,
            "the dataflow never changes an array after yielding it: send() does not wait "
            "for zmq to release large buffers",
        ),
    )

    def open(self) -> functools.partial[ZmqSender]:
        values = self.option_values
        hwm = values["hwm"] or self.capacity
        self._token = secrets.token_bytes(16)
        self._sockets = flowplug.ZmqSockets()
        self._sock, self.address = self._sockets.bind(zmq.PULL, self.run_id, hwm=hwm)
        self._sockets.watch_accepts(self._sock)
        self._recv = self._sock.recv_multipart
        self._poll = self._sock.poll
        self._events = self._sock.get
        self._ready: collections.deque[Any] = collections.deque()
        self._bytes = 0  # received from the workers: stats' bytes_delivered
        return functools.partial(
            ZmqSender,
            self.address,
            self._token,
            hwm,
            max(1, values["batch"]),
            values["batch_delay"],
            values["fresh_arrays"],
        )

    def recv(self, timeout: float) -> Any:
        if self._ready:
            return self._ready.popleft()
        # While messages keep coming, zmq handles its commands, among them "this peer has
        # messages now", only every 100 frames: a flooding worker's batches would go ahead
        # of another worker's first message (its error report). Reading EVENTS handles them.
        # Its answer also says whether a message is there: when none is, go straight to the
        # wait (a receive that fails costs ~10 us: pyzmq raises zmq.Again), or to EMPTY.
        if self._events(_EVENTS) & _POLLIN:
            try:
                frames = self._recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                frames = None
        else:
            frames = None
        if frames is None:
            if timeout <= 0 or not self._poll(timeout * 1000):
                return flowplug.EMPTY
            frames = self._recv(copy=False)
        # A message is [token, stream, buffer...] (one object) or [token + header, blob]
        # (a batch); anything else is not from our workers: never unpickle a stranger's bytes.
        head = frames[0].bytes
        token = self._token
        if head == token and len(frames) > 1:
            self._bytes += sum(map(len, frames)) - len(head)  # counters(): per message
            return loads(frames[1:])
        if len(frames) != 2 or head[: len(token)] != token:
            return flowplug.EMPTY
        header = head[len(token) :]
        blob = frames[1].buffer
        self._bytes += len(header) + len(blob)
        ready = self._ready
        ready.extend(unpack_batch(header, blob))
        return ready.popleft()

    def open_tasks(self) -> functools.partial[ZmqTaskReceiver]:
        hwm = max(1, self.capacity // self.num_workers)
        self._task_sock, address = self._sockets.bind(
            zmq.PUSH, self.run_id, hwm=hwm, what="zmq task socket"
        )
        self._sockets.watch_accepts(self._task_sock)
        return functools.partial(ZmqTaskReceiver, address, self._token)

    def await_connections(self, keep_waiting: Any) -> None:
        # every worker connects now, while the fds counted for the accepts are free
        self._sockets.await_accepts(self.num_workers, keep_waiting)

    def send_task(self, obj: Any, timeout: float) -> bool:
        sock = self._task_sock
        # copy=True (the default): the dataflow may refill the same array afterwards.
        message = [self._token, *dumps(obj)]
        try:
            sock.send_multipart(message, zmq.NOBLOCK)
            return True
        except zmq.Again:
            if timeout <= 0 or not sock.poll(timeout * 1000, zmq.POLLOUT):
                return False
        try:
            sock.send_multipart(message, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def counters(self) -> dict[str, float]:
        return {"bytes_received": getattr(self, "_bytes", 0)}

    def close(self) -> None:
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            sockets.close()
