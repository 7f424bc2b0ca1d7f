"""Workers put datapoints in a shared-memory store; their ids cross rings in the same memory.

The consumer owns one :class:`flowplug.shm.ObjectStore` whose control area also holds one
ring per worker (:mod:`flowplug.shm.channel`). A worker writes each datapoint's buffers
into the store (pickle protocol 5, all buffers out of band) and puts the object's id into
its ring; a datapoint whose pickle is small and has no buffers (an int, a short dict, an
error report) goes into the ring slot itself. The consumer rebuilds the datapoint on views
of the store, so a 5 MB batch is copied once (into the store) and never again; an array
from ``fp.shm.empty()`` is not copied at all. While both sides are busy, no entry costs a
system call: the rings' semaphores enter the kernel only to wake a side that sleeps.

``capacity`` bounds the datapoints in flight, counted across workers: the rings' lengths
add up to it (each worker at least one). The store bounds them in bytes (``size``).

The store's file is unlinked before the consumer delivers the first datapoint, so a SIGKILL
of the consumer leaves nothing in ``/dev/shm``: forked workers inherit the mapping and its
fd, so the consumer unlinks the file at once, before it starts them (nothing is left at
any point); spawned ones attach by name and say hello through a semaphore, and the
consumer reads no datapoint until all have.

A full store makes a worker wait for room, except while the consumer waits too (for a
datapoint, or to send a task): then the memory is held by the consumer itself (views it
keeps, later items an ordered epoch holds back, tasks not yet answered) and will not be
freed until a datapoint arrives, so the worker sends this datapoint as a *copy* through a
zmq socket instead (:meth:`flowplug.shm.ObjectStore.waiting`), and a COPY entry in its ring
keeps its place in the order. A full store never deadlocks; what it costs is copies, until
the consumer drops views again. Every zmq message starts with a token private to the run,
so bytes from a stranger who connects to the socket are dropped, never unpickled.

Tasks (:class:`flowplug.ParallelMap`) go the other way through a zmq PUSH/PULL pair: the
consumer puts a large task into the store and sends its id; the worker takes it, and gets
views. Tasks use at most half of the store (:data:`TASK_SHARE`), so results always find
room unless the consumer holds it; beyond that, and for small tasks, a task travels as a
copy.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import secrets
import struct
from typing import Any

import zmq

import flowplug
from flowplug.ipc import recv_within
from flowplug.shm import DEFAULT_SIZE, ObjectID, ObjectStore, dumps, use_store
from flowplug.shm import channel as _channel

logger = logging.getLogger("flowplug.shm")

#: how long a closing worker keeps trying to deliver the copies it has sent (ms).
_LINGER_MS = 5000
#: a task of at most this many bytes, buffers included, travels inline.
INLINE_MAX = 64 * 1024
#: tasks go into the store only while it stays at most this full: the rest is for results.
TASK_SHARE = 0.5
# zmq message kinds: object id (tasks), one-frame pickle (tasks), copy (stream and buffers).
_OBJECT, _INLINE, _COPY = b"O", b"I", b"C"
_TOKEN_LEN = 16
_WORKER = struct.Struct("<H")


def _discard_rest(sock: zmq.Socket) -> None:
    """Read and drop the remaining frames of a message whose first frame was read."""
    while sock.rcvmore:
        sock.recv(copy=False)


def _load_copy(sock: zmq.Socket) -> Any:
    """Rebuild a copy whose first frame was read: its arrays are views of the frames."""
    frames = sock.recv_multipart(copy=False)
    return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])


def ring_lengths(capacity: int, num_workers: int) -> list[int]:
    """Each worker's share of ``capacity`` (at least one entry each)."""
    base, extra = divmod(capacity, num_workers)
    return [max(1, base + (1 if w < extra else 0)) for w in range(num_workers)]


class ShmSender(flowplug.Sender):
    def __init__(self, endpoint: ShmEndpoint, worker_id: int):
        store = endpoint.store
        try:
            if store is None:  # spawned: attach by name (the consumer waits for our hello)
                store = ObjectStore.attach(endpoint.store_name)
            self.store = store
            mm, offset, address = store.channel_area()  # a forked child reopens here
        except flowplug.StateError as exc:
            raise flowplug.TransportClosed(str(exc)) from exc
        self._chan = _channel.Channels(mm, offset, address, endpoint.slots)
        self._ring = worker_id
        self._endpoint = endpoint
        self._sock: zmq.Socket | None = None
        self._put = store.put_frames
        # fp.shm.empty() in this worker allocates in the transport's store.
        self._using = use_store(store)
        self._using.__enter__()
        self._chan.hello(worker_id)

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        chan = self._chan
        if len(frames) == 1 and len(frames[0]) <= _channel.INLINE_MAX:
            chan.put(self._ring, _channel.INLINE, len(frames[0]), 0, frames[0], self._alive)
            return
        try:
            oid = self._put(frames, give_way=True)
        except flowplug.StoreFull:
            # The consumer waits while it holds the memory: waiting for room would never
            # end, so this one goes as a copy (zmq copies the frames before returning).
            self._copy_socket().send_multipart([self._copy_head, *frames])
            chan.put(self._ring, _channel.COPY, 0, 0, None, self._alive)
            return
        except flowplug.StateError as exc:  # the consumer closed the store
            raise flowplug.TransportClosed(str(exc)) from exc
        chan.put(self._ring, _channel.OBJECT, oid.offset, oid.tag, None, self._alive)

    def _alive(self) -> None:
        # called while the ring is full, every 0.5 s
        try:
            self.store.check_owner()
        except flowplug.StateError as exc:
            raise flowplug.TransportClosed(str(exc)) from exc

    def _copy_socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sockets = flowplug.ZmqSockets()
            self._sock = self._sockets.connect(
                zmq.PUSH, self._endpoint.address, hwm=1000, linger_ms=_LINGER_MS
            )
            self._copy_head = self._endpoint.token + _COPY + _WORKER.pack(self._ring)
        return self._sock

    def close(self) -> None:
        self._using.__exit__(None, None, None)
        self._chan = None  # type: ignore[assignment]
        if self._sock is not None:
            self._sockets.close()
        self.store.close()


class ShmEndpoint(flowplug.Endpoint):
    def __init__(self, store: ObjectStore, address: str, token: bytes, slots: list[int]):
        #: the consumer's store: forked workers inherit it; pickling (spawn) keeps the name.
        self.store: ObjectStore | None = store
        self.store_name = store.name
        self.address = address
        self.token = token
        self.slots = slots
        #: (pid, store) of the sender connected in this process; its task receiver shares it.
        self._attached: tuple[int, ObjectStore] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["store"] = state["_attached"] = None
        return state

    def connect(self, worker_id: int) -> ShmSender:
        sender = ShmSender(self, worker_id)
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
        msg = recv_within(sock, timeout)
        if msg is None:
            return flowplug.EMPTY
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
        if store is None and self.data.store is not None:
            store = self.data.store  # forked: the consumer's, inherited (reopened on use)
        elif store is None:
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
    # measured (/proc/self/fd): the store's file and a zmq context with its socket for
    # copies (one connection per worker that sends one) in the consumer; a worker opens
    # a zmq context of its own for its first copy (and, spawned, attaches the store);
    # tasks: one more socket in the consumer, a context in each worker.
    open_files = flowplug.OpenFiles(consumer=9, per_worker=1, worker=9)
    task_open_files = flowplug.OpenFiles(consumer=2, per_worker=1, worker=7)
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
        why = _channel.available()
        if why is not None:
            raise flowplug.ConfigError(
                f"transport 'shm' cannot run here: {why}; use transport='zmq' or 'queue'"
            )
        slots = ring_lengths(self.capacity, self.num_workers)
        self._store: ObjectStore | None = ObjectStore(
            self.option_values["size"],
            dir=self.option_values["dir"] or None,
            reserve=self.option_values["reserve"],
            run_id=self.run_id,
            channel_bytes=_channel.layout(self.num_workers, slots),
        )
        self._chan: _channel.Channels | None = _channel.Channels(*self._store.channel_area(), slots)
        self._chan.init()  # before any worker starts
        # Forked workers inherit the mapping and its fd: the name can go now, before they
        # even exist. Spawned ones attach by name: it goes once all of them said hello.
        if self.start_method == "fork":
            self._store.unlink()
            self._unhello: set[int] = set()
        else:
            self._unhello = set(range(self.num_workers))
        self._unlinked = False
        self._next = 0
        self._copies: dict[int, collections.deque] = {}
        self._copy_due: int | None = None  # a COPY entry read whose copy has not come yet
        self._copies_received = 0
        self._token = secrets.token_bytes(_TOKEN_LEN)
        self._sockets = flowplug.ZmqSockets()
        self._sock: zmq.Socket | None = None
        try:
            self._sock, self.address = self._sockets.bind(zmq.PULL, self.run_id, hwm=1000)
        except flowplug.ConfigError:
            self.close()
            raise
        self._take = self._store.take_sole  # ids come through our rings only
        # Dropped views return with the next take (one lock per datapoint, not two); the
        # consumer's wait applies them too, so a worker waiting for room never waits on them.
        self._store.defer_frees(16)
        self._waiting = self._store.waiting
        self._endpoint = ShmEndpoint(self._store, self.address, self._token, slots)
        return self._endpoint

    def recv(self, timeout: float) -> Any:
        chan = self._chan  # held here: the mapping outlives a close() from another thread
        if chan is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        if not self._unlinked and not self._ready(timeout):
            return flowplug.EMPTY
        if self._copy_due is not None:
            return self._copy(self._copy_due, timeout)
        if not chan.wait(0):
            with self._waiting():  # workers waiting for room send copies meanwhile
                if not chan.wait(timeout):
                    return self._closed_check(flowplug.EMPTY)
        if chan.closed:
            raise flowplug.TransportClosed("the shm transport was closed")
        ring, kind, a, b, at = chan.take(self._next)
        self._next = ring + 1 if ring + 1 < self.num_workers else 0
        if kind == _channel.OBJECT:
            chan.release(ring)
            return self._take(ObjectID(a, b))
        if kind == _channel.INLINE:
            obj = pickle.loads(chan.mm[at : at + a])
            chan.release(ring)
            return obj
        chan.release(ring)  # a COPY: it comes through the socket
        return self._copy(ring, timeout)

    def _closed_check(self, value: Any) -> Any:
        if self._sock is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        return value

    def _ready(self, timeout: float) -> bool:
        """Unlink the store once every worker can reach it without its name."""
        if self._unhello:
            assert self._chan is not None  # open until close()
            self._chan.wait_hellos(self._unhello, timeout)
            if self._unhello:
                return False
        store = self._store
        if store is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        store.unlink()  # all attached: nothing to leave behind after a crash
        self._unlinked = True
        return True

    def _copy(self, ring: int, timeout: float) -> Any:
        """The copy that worker ``ring`` sent through the socket, in its ring's order."""
        got = self._copies.get(ring)
        sock = self._sock
        if sock is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        while not got:
            if not sock.poll(math.ceil(timeout * 1000)):
                self._copy_due = ring  # not here yet: the Runner checks for deaths meanwhile
                return flowplug.EMPTY
            msg = sock.recv()
            if msg[:_TOKEN_LEN] != self._token or msg[_TOKEN_LEN : _TOKEN_LEN + 1] != _COPY:
                _discard_rest(sock)  # not from our workers: never unpickle a stranger's bytes
                continue
            (sender,) = _WORKER.unpack_from(msg, _TOKEN_LEN + 1)
            self._copies.setdefault(sender, collections.deque()).append(_load_copy(sock))
            got = self._copies.get(ring)
        self._copy_due = None
        self._copies_received += 1
        if self._copies_received == 1:
            logger.info(
                "the shm store (%d bytes) was full: datapoints travel as copies "
                "until the consumer drops views; raise size= to avoid it",
                self.option_values["size"],
            )
        return got.popleft()

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
            "copies_received": self._copies_received,
            "store_bytes_in_use": used,
            "store_bytes": self.option_values["size"],
        }

    def close(self) -> None:
        chan = getattr(self, "_chan", None)
        if chan is not None:
            self._chan = None  # the mapping goes with the last user of chan
            chan.close()  # wakes a recv() blocked in another thread, and waiting workers
        self._task_sock = self._sock = None
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            sockets.close()
        store = getattr(self, "_store", None)
        if store is not None:
            self._store = None
            store.close()  # a late recv() through _take raises StateError: closed
