"""Workers put datapoints in a shared-memory store; only object ids cross a zmq socket.

The consumer owns one :class:`flowplug.shm.ObjectStore`; each worker attaches to it, writes
every datapoint's buffers into it (pickle protocol 5, all buffers out of band) and sends the
16-byte object id over a ZeroMQ PUSH/PULL socket. The consumer rebuilds the datapoint on
views of the store, so a 5 MB batch is copied once (into the store) and never again; an
array from ``fp.shm.empty()`` is not copied at all. Small datapoints with no buffers (ints,
strings, error reports) travel inline on the socket.

Every message is ``token + kind + payload`` in one frame, except a copy (below), whose
pickle stream and buffers follow as frames of their own. The token is private to the run,
so bytes from a stranger who connects to the socket are dropped, never unpickled. Each
worker says hello once it has attached; when all have, the consumer unlinks the store's
file, so even a SIGKILL of the consumer leaves nothing in ``/dev/shm``.

A full store makes a worker wait for room, except while the consumer waits too (for a
datapoint, or to send a task): then the memory is held by the consumer itself (views it
keeps, later items an ordered epoch holds back, tasks not yet answered) and will not be
freed until a datapoint arrives, so the worker sends this datapoint as a *copy* through
the socket instead (:meth:`flowplug.shm.ObjectStore.waiting`). A full store never
deadlocks; what it costs is copies, until the consumer drops views again.

Tasks (:class:`flowplug.ParallelMap`) go the other way the same way: the consumer puts a
large task into the store and sends its id over a second PUSH/PULL pair; the worker takes
it, and gets views. Tasks use at most half of the store (:data:`TASK_SHARE`), so results
always find room unless the consumer holds it; beyond that, and for small tasks, a task
travels as a copy.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

import flowplug

logger = logging.getLogger("flowplug.shm")
from flowplug.shm import DEFAULT_SIZE, ObjectID, ObjectStore, dumps, use_store

#: how long a closing worker keeps trying to deliver what it has sent (ms).
_LINGER_MS = 5000
#: a datapoint without buffers whose pickle is at most this long travels inline; so does a
#: task of at most this many bytes, buffers included.
INLINE_MAX = 64 * 1024
#: tasks go into the store only while it stays at most this full: the rest is for results.
TASK_SHARE = 0.5
# kinds: hello, object id, one-frame pickle, copy (pickle stream and buffers as frames).
_HELLO, _OBJECT, _INLINE, _COPY = b"H", b"O", b"I", b"C"
_TOKEN_LEN = 16


def _discard_rest(sock: zmq.Socket) -> None:
    """Read and drop the remaining frames of a message whose first frame was read."""
    while sock.rcvmore:
        sock.recv(copy=False)


def _load_copy(sock: zmq.Socket) -> Any:
    """Rebuild a copy whose first frame was read: its arrays are views of the frames."""
    frames = sock.recv_multipart(copy=False)
    return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])


class ShmSender(flowplug.Sender):
    def __init__(self, store_name: str, address: str, token: bytes, hwm: int):
        try:
            self.store = ObjectStore.attach(store_name)
        except flowplug.StateError as exc:
            raise flowplug.TransportClosed(str(exc)) from exc
        self._sockets = flowplug.ZmqSockets()
        self._sock = self._sockets.connect(zmq.PUSH, address, hwm=hwm, linger_ms=_LINGER_MS)
        self._send = self._sock.send
        self._put = self.store.put_frames
        self._object = token + _OBJECT
        self._inline = token + _INLINE
        self._copy = token + _COPY
        # fp.shm.empty() in this worker allocates in the transport's store.
        self._using = use_store(self.store)
        self._using.__enter__()
        self._send(token + _HELLO)

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        if len(frames) == 1 and len(frames[0]) <= INLINE_MAX:
            self._send(self._inline + frames[0])
            return
        try:
            oid = self._put(frames, give_way=True)
        except flowplug.StoreFull:
            # The consumer waits while it holds the memory: waiting for room would never
            # end, so this one goes as a copy (zmq copies the frames before returning).
            self._sock.send_multipart([self._copy, *frames])
            return
        except flowplug.StateError as exc:  # the consumer closed the store
            raise flowplug.TransportClosed(str(exc)) from exc
        self._send(self._object + oid.binary())

    def close(self) -> None:
        self._using.__exit__(None, None, None)
        self._sockets.close()
        self.store.close()


class ShmEndpoint(flowplug.Endpoint):
    def __init__(self, store_name: str, address: str, token: bytes, hwm: int):
        self.store_name = store_name
        self.address = address
        self.token = token
        self.hwm = hwm
        #: (pid, store) of the sender connected in this process; its task receiver shares it.
        self._attached: tuple[int, ObjectStore] | None = None

    def connect(self, worker_id: int) -> ShmSender:
        sender = ShmSender(self.store_name, self.address, self.token, self.hwm)
        self._attached = (os.getpid(), sender.store)
        return sender

    def attached(self) -> ObjectStore | None:
        """The store this process's sender attached, while it is open."""
        if self._attached is None or self._attached[0] != os.getpid():
            return None
        store = self._attached[1]
        return None if store.closed else store


class ShmTaskReceiver(flowplug.TaskReceiver):
    def __init__(self, store: ObjectStore, own: bool, address: str, token: bytes):
        self._store = store
        self._own = own  # attached for the receiver alone: close it with the receiver
        self._sockets = flowplug.ZmqSockets()
        # Take one task at a time, so that a busy worker leaves the next to an idle one.
        self._sock = self._sockets.connect(zmq.PULL, address, hwm=1)
        self._token = token

    def recv(self, timeout: float) -> Any:
        sock = self._sock
        try:
            msg = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            if not sock.poll(math.ceil(timeout * 1000)):
                return flowplug.EMPTY
            msg = sock.recv()
        if msg[:_TOKEN_LEN] != self._token:
            _discard_rest(sock)  # not from our consumer: never unpickle a stranger's bytes
            return flowplug.EMPTY
        kind = msg[_TOKEN_LEN : _TOKEN_LEN + 1]
        if kind == _OBJECT:
            try:
                return self._store.take(ObjectID.from_binary(msg[_TOKEN_LEN + 1 :]))
            except flowplug.StateError as exc:  # the consumer closed the store
                raise flowplug.TransportClosed(str(exc)) from exc
        if kind == _INLINE:
            return pickle.loads(memoryview(msg)[_TOKEN_LEN + 1 :])
        if kind == _COPY:
            return _load_copy(sock)
        _discard_rest(sock)
        return flowplug.EMPTY

    def close(self) -> None:
        self._sockets.close()
        if self._own:
            self._store.close()


class ShmTaskEndpoint(flowplug.TaskEndpoint):
    def __init__(self, address: str, token: bytes, data: ShmEndpoint):
        self.address = address
        self.token = token
        # The run's data endpoint (the same object in the worker, whether forked or
        # spawned: one pickle carries both), whose sender has attached the store already.
        self.data = data

    def connect(self, worker_id: int) -> ShmTaskReceiver:
        store = self.data.attached()
        own = store is None
        if store is None:
            # No sender here (not the Runner's order): attach by name, which works until
            # every worker has said hello and the consumer unlinked the store.
            try:
                store = ObjectStore.attach(self.data.store_name)
            except flowplug.StateError as exc:
                raise flowplug.StateError(
                    f"the shm task channel cannot attach the store: {exc}. Connect the "
                    "data endpoint first in the same process (as the Runner does)"
                ) from exc
        return ShmTaskReceiver(store, own, self.address, self.token)


class ShmTransport(flowplug.TaskTransport):
    """A shared-memory object store plus a zmq socket for ids: zero-copy for large arrays.

    The consumer receives numpy and Arrow data as views of the store; their memory is
    reused only once the consumer drops them. A full store makes workers wait, or send
    copies while the consumer waits too. Tasks travel the same way (large ones through
    the store, within half of it), so workers get views of them.
    """

    name = "shm"
    zero_copy = True
    uses_shared_memory = True
    size_limit_option = "size"
    options = (
        flowplug.Option(
            "size",
            int,
            DEFAULT_SIZE,
            "bytes of shared memory for datapoints in flight and views the consumer holds",
            size=True,
        ),
        flowplug.Option(
            "dir",
            str,
            "",
            "directory of the store: '' for /dev/shm; a disk directory for a file-backed store",
        ),
        flowplug.Option(
            "reserve",
            bool,
            False,
            "allocate all of size at start: fail then, never with SIGBUS when /dev/shm fills up",
        ),
    )

    def open(self) -> ShmEndpoint:
        values = self.option_values
        self._store: ObjectStore | None = ObjectStore(
            values["size"],
            dir=values["dir"] or None,
            reserve=values["reserve"],
            run_id=self.run_id,
        )
        self._hellos = 0
        self._copies = 0
        self._token = secrets.token_bytes(_TOKEN_LEN)
        self._sockets = flowplug.ZmqSockets()
        try:
            self._sock, self.address = self._sockets.bind(zmq.PULL, self.run_id, hwm=self.capacity)
        except flowplug.ConfigError:
            self.close()
            raise
        self._recv = self._sock.recv
        self._poll = self._sock.poll
        self._take: Callable[[ObjectID], Any] = self._store.take
        self._waiting = self._store.waiting
        self._endpoint = ShmEndpoint(self._store.name, self.address, self._token, self.capacity)
        return self._endpoint

    def recv(self, timeout: float) -> Any:
        deadline = None
        while True:
            try:
                msg = self._recv(zmq.NOBLOCK)
            except zmq.Again:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                left = deadline - time.monotonic()
                if left <= 0:
                    return flowplug.EMPTY
                with self._waiting():  # workers waiting for room send copies meanwhile
                    ready = self._poll(math.ceil(left * 1000))
                if not ready:
                    return flowplug.EMPTY
                continue
            if msg[:_TOKEN_LEN] != self._token:
                _discard_rest(self._sock)  # not from our workers: never unpickle a stranger's
                continue
            kind = msg[_TOKEN_LEN : _TOKEN_LEN + 1]
            if kind == _OBJECT:
                return self._take(ObjectID.from_binary(msg[_TOKEN_LEN + 1 :]))
            if kind == _INLINE:
                return pickle.loads(memoryview(msg)[_TOKEN_LEN + 1 :])
            if kind == _COPY:
                self._copies += 1
                if self._copies == 1:
                    logger.info(
                        "the shm store (%d bytes) was full: datapoints travel as copies "
                        "until the consumer drops views; raise size= to avoid it",
                        self.settings["size"],
                    )
                return _load_copy(self._sock)
            if kind == _HELLO:
                self._hellos += 1
                if self._hellos == self.num_workers and self._store is not None:
                    self._store.unlink()  # all attached: nothing to leave behind after a crash

    def open_tasks(self) -> ShmTaskEndpoint:
        hwm = max(1, self.capacity // self.num_workers)
        self._task_sock, address = self._sockets.bind(
            zmq.PUSH, self.run_id, hwm=hwm, what="zmq task socket"
        )
        return ShmTaskEndpoint(address, self._token, self._endpoint)

    def send_task(self, obj: Any, timeout: float) -> bool:
        frames = dumps(obj)  # the frames are views of obj: copied below, before returning
        sock = self._task_sock
        if not sock.poll(0, zmq.POLLOUT):
            if timeout <= 0:
                return False
            with self._waiting():  # workers waiting for room send copies meanwhile
                if not sock.poll(math.ceil(timeout * 1000), zmq.POLLOUT):
                    return False
        store = self._store
        assert store is not None
        size = sum(memoryview(f).nbytes for f in frames)
        oid = None
        if size > INLINE_MAX and store.used + size <= store.size * TASK_SHARE:
            try:
                oid = store.put_frames(frames, timeout=0)
            except flowplug.StoreFull:
                pass  # no extent large enough (fragmented): a copy then
        if oid is not None:
            message = [self._token + _OBJECT + oid.binary()]
        elif len(frames) == 1:
            message = [self._token + _INLINE + frames[0]]
        else:
            message = [self._token + _COPY, *frames]
        try:
            sock.send_multipart(message, zmq.NOBLOCK)  # copy=True: obj may change afterwards
        except zmq.Again:  # pragma: no cover - POLLOUT said there was room; we are its only user
            if oid is not None:
                store.delete(oid)
            return False
        return True

    def counters(self) -> dict[str, float]:
        store = self._store
        used = store.used if store is not None and not store.closed else 0
        return {
            "copies_received": self._copies,
            "store_bytes_in_use": used,
            "store_bytes": self.settings["size"],
        }

    def close(self) -> None:
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            sockets.close()
        store = getattr(self, "_store", None)
        if store is not None:
            self._store = None
            store.close()  # a late recv() through _take raises StateError: closed
