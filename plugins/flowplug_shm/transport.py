"""Workers put datapoints in a shared-memory store; only object ids cross a zmq socket.

The consumer owns one :class:`flowplug.shm.ObjectStore`; each worker attaches to it, writes
every datapoint's buffers into it (pickle protocol 5, all buffers out of band) and sends the
16-byte object id over a ZeroMQ PUSH/PULL socket. The consumer rebuilds the datapoint on
views of the store, so a 5 MB batch is copied once (into the store) and never again; an
array from ``fp.shm.empty()`` is not copied at all. Small datapoints with no buffers (ints,
strings, error reports) travel inline on the socket.

Every message is ``token + kind + payload`` in one frame. The token is private to the run,
so bytes from a stranger who connects to the socket are dropped, never unpickled. Each
worker says hello once it has attached; when all have, the consumer unlinks the store's
file, so even a SIGKILL of the consumer leaves nothing in ``/dev/shm``.
"""

from __future__ import annotations

import math
import pickle
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

import flowplug
from flowplug.shm import DEFAULT_SIZE, ObjectID, ObjectStore, dumps, use_store

#: how long a closing worker keeps trying to deliver what it has sent (ms).
_LINGER_MS = 5000
#: a datapoint without buffers whose pickle is at most this long travels inline.
INLINE_MAX = 64 * 1024
_HELLO, _OBJECT, _INLINE = b"H", b"O", b"I"
_TOKEN_LEN = 16


class ShmSender(flowplug.Sender):
    def __init__(self, store_name: str, address: str, token: bytes, hwm: int):
        try:
            self._store = ObjectStore.attach(store_name)
        except flowplug.StateError as exc:
            raise flowplug.TransportClosed(str(exc)) from exc
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.sndhwm = hwm
        self._sock.linger = _LINGER_MS
        self._sock.connect(address)
        self._send = self._sock.send
        self._object = token + _OBJECT
        self._inline = token + _INLINE
        # fp.shm.empty() in this worker allocates in the transport's store.
        self._using = use_store(self._store)
        self._using.__enter__()
        self._send(token + _HELLO)

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        if len(frames) == 1 and len(frames[0]) <= INLINE_MAX:
            self._send(self._inline + frames[0])
            return
        try:
            oid = self._store.put_frames(frames)
        except flowplug.StateError as exc:  # the consumer closed the store
            raise flowplug.TransportClosed(str(exc)) from exc
        self._send(self._object + oid.binary())

    def close(self) -> None:
        self._using.__exit__(None, None, None)
        self._sock.close()
        self._ctx.term()
        self._store.close()


class ShmEndpoint(flowplug.Endpoint):
    def __init__(self, store_name: str, address: str, token: bytes, hwm: int):
        self.store_name = store_name
        self.address = address
        self.token = token
        self.hwm = hwm

    def connect(self, worker_id: int) -> ShmSender:
        return ShmSender(self.store_name, self.address, self.token, self.hwm)


class ShmTransport(flowplug.Transport):
    """A shared-memory object store plus a zmq socket for ids: zero-copy for large arrays.

    The consumer receives numpy and Arrow data as views of the store; their memory is
    reused only once the consumer drops them. A full store makes workers wait.
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
        self._store: ObjectStore | None = ObjectStore(
            self.settings["size"],
            dir=self.settings["dir"] or None,
            reserve=self.settings["reserve"],
            run_id=self.run_id,
        )
        self._hellos = 0
        self._token = secrets.token_bytes(_TOKEN_LEN)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.PULL)
        self._sock.rcvhwm = self.capacity
        self._sock.linger = 0
        try:
            self.address = flowplug.bind_ipc(self._sock, self.run_id)
        except flowplug.ConfigError:
            self.close()
            raise
        self._recv = self._sock.recv
        self._poll = self._sock.poll
        self._take: Callable[[ObjectID], Any] = self._store.take
        return ShmEndpoint(self._store.name, self.address, self._token, self.capacity)

    def recv(self, timeout: float) -> Any:
        deadline = None
        while True:
            try:
                msg = self._recv(zmq.NOBLOCK)
            except zmq.Again:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                left = deadline - time.monotonic()
                if left <= 0 or not self._poll(math.ceil(left * 1000)):
                    return flowplug.EMPTY
                continue
            if msg[:_TOKEN_LEN] != self._token:
                continue  # not from our workers: never unpickle a stranger's bytes
            kind = msg[_TOKEN_LEN : _TOKEN_LEN + 1]
            if kind == _OBJECT:
                return self._take(ObjectID.from_binary(msg[_TOKEN_LEN + 1 :]))
            if kind == _INLINE:
                return pickle.loads(memoryview(msg)[_TOKEN_LEN + 1 :])
            if kind == _HELLO:
                self._hellos += 1
                if self._hellos == self.num_workers and self._store is not None:
                    self._store.unlink()  # all attached: nothing to leave behind after a crash

    def close(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            self._sock = None
            sock.close(linger=0)
            self._ctx.term()
        store = getattr(self, "_store", None)
        if store is not None:
            self._store = None
            store.close()  # a late recv() through _take raises StateError: closed
