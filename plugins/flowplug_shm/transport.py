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
add up to it (each worker at least one). With ``capacity`` left unset the Runner's credits
size themselves by the datapoints (up to 1,024 small ones in flight): the rings are then as
long as that ceiling (``max_in_flight``) plus one run each, and the credits bound the
datapoints. The store bounds them in bytes (``size``).

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
import threading
import time
from array import array
from typing import Any

import zmq

import flowplug
from flowplug.ipc import recv_within
from flowplug.serialize import Loader, Run
from flowplug.shm import DEFAULT_SIZE, ObjectID, ObjectStore, dumps, use_store
from flowplug.shm import channel as _channel

logger = logging.getLogger("flowplug.shm")

#: how long a closing worker keeps trying to deliver the copies it has sent (ms).
_LINGER_MS = 5000
#: a task of at most this many bytes, buffers included, travels inline.
INLINE_MAX = 64 * 1024
#: small datapoints per batch block, at most (and at most half of the worker's ring).
BATCH_ITEMS = 64
#: bytes of a batch block (at most 1/16 of the store).
BATCH_BYTES = 2 * 1024 * 1024
#: larger datapoints (buffers included) go alone (at most 1/4 of a batch block).
BATCH_ITEM_MAX = 128 * 1024
#: seconds the consumer waits before it asks the workers for their open batches (a
#: datapoint waits in a batch longer only while the consumer has others to take).
BATCH_DELAY = 0.002
ALIGN = 64
#: bytes of large datapoints (those sent alone) in flight, all workers together: the
#: blocks written, sent, handed on and written again then stay in the CPU's cache (a copy
#: into a cold 1.2 MB block cost ~1.5x a warm one here). Each worker may have its share
#: of it in flight, and at least 2; datapoints of which fewer than :data:`LARGE_MIN` fit
#: are not bounded (they go to memory anyway).
LARGE_BYTES = 10 * 1024 * 1024
LARGE_MIN = 4
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


def _load_copy(sock: zmq.Socket) -> tuple[Any, int]:
    """Rebuild a copy whose first frame was read: its arrays are views of the frames.

    :returns: the datapoint and the bytes of its frames.
    """
    frames = sock.recv_multipart(copy=False)
    obj = pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])
    return obj, sum(len(f) for f in frames)


def ring_lengths(capacity: int, num_workers: int) -> list[int]:
    """Each worker's share of ``capacity`` (at least one entry each)."""
    base, extra = divmod(capacity, num_workers)
    return [max(1, base + (1 if w < extra else 0)) for w in range(num_workers)]


class ShmSender(flowplug.Sender):
    """A worker's side: datapoints into the store, their ids into the worker's ring.

    Small datapoints are batched. Consecutive pickles without buffers of at most
    :data:`~flowplug.shm.channel.INLINE_MAX` bytes each go out as one *run*: one entry
    of the ring that holds them back to back. Other datapoints of at most
    :data:`BATCH_ITEM_MAX` bytes (buffers included) are written one after the other into
    a *batch block* of the store, sent as one entry. A run or block goes out once it holds
    :data:`BATCH_ITEMS` datapoints (or half the ring), when a block is full, when its first
    datapoint waited :data:`BATCH_DELAY` (seen at the next send), when the consumer asks
    (it waited that long: a flusher thread, asleep on a semaphore until then, sends it),
    and before the sender waits for anything (a credit, room, the next epoch:
    :meth:`flush`). Each datapoint takes one credit of the ring and the consumer returns
    one per datapoint it hands on, so ``capacity`` bounds datapoints, batched or not.
    """

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
        self._mm = mm
        self._ring = worker_id
        self._endpoint = endpoint
        self._sock: zmq.Socket | None = None
        self._put = store.put_frames
        # Batching: off when the ring holds fewer than 4 (a batch would hold the ring).
        self._max_items = min(BATCH_ITEMS, endpoint.slots[worker_id] // 2)
        self._block_bytes = min(BATCH_BYTES, store.size // 16)
        self._item_max = min(BATCH_ITEM_MAX, self._block_bytes // 4)
        if self._max_items < 2:
            self._item_max = -1
        self._probe = self._chan.credit_probe(worker_id)  # 0: took a credit
        # Large datapoints: this worker's share of LARGE_BYTES. The ring's credits beyond
        # it are held back (taken and kept) while large datapoints go: _bound().
        self._slots = endpoint.slots[worker_id]
        self._large_bytes = LARGE_BYTES // len(endpoint.slots)
        self._large_size = 0  # the size the bound was set for (0: none)
        self._want = 0  # credits to hold back for it
        self._withheld = 0  # credits held back
        self._block = (0, 0)  # (offset, tag) of the open batch block, while _count
        self._at = 0  # where its data starts in the mapping
        self._end = 0  # its bytes
        self._fill = 0  # bytes written into it
        self._index: list[int] = []  # per datapoint: frames, (start, length) per frame
        self._stream: Any = b""  # the stream of the block's last datapoint with buffers,
        self._stream_at = 0  # and where it was written
        self._count = 0  # datapoints in the open batch block
        # small pickles of the open run (not yet sent), back to back
        self._runs = Run(_channel.INLINE_MAX)
        self._started = 0.0  # when the open run or block got its first datapoint
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None
        self._closed = False
        if self._max_items > 1:  # sends what is batched when the consumer asks for it
            self._timer = threading.Thread(
                target=self._flush_late, name="flowplug-shm-flush", daemon=True
            )
            self._timer.start()
        # fp.shm.empty() in this worker allocates in the transport's store.
        self._using = use_store(store)
        self._using.__enter__()
        # Connect for copies now, not at the first copy: the consumer's zmq listener
        # accepts while the Runner waits for the workers (await_connections), when the
        # fd it takes is free; later, libzmq would abort the consumer without one.
        self._copy_socket()
        self._chan.hello(worker_id)

    def send(self, obj: Any) -> None:
        if self._max_items > 1:
            with self._lock:
                # The smallest (a pickle without buffers, at most INLINE_MAX bytes) join
                # the open run, pickled in place; the rest come back as frames.
                run = self._runs
                frames = run.dump(obj)
                if frames is None:
                    if self._probe() != 0:  # no credit: send the rest, then wait for one
                        stream = run.pop()
                        self._no_credit()
                        run.add(stream)
                    if self._count:
                        self._seal()
                    now = time.monotonic()
                    count = run.count
                    if count == 1:
                        self._started = now
                    elif count >= self._max_items or now - self._started >= BATCH_DELAY:
                        self._publish()
                    return
        else:
            frames = dumps(obj)
        if len(frames) == 1:
            stream = frames[0]
            n = len(stream)
            if n <= self._item_max:  # small, into a batch block; kept short
                with self._lock:
                    if self._probe() != 0:
                        self._no_credit()
                    pos = self._fill
                    if not self._count or pos + 8 * len(self._index) + n + 48 > self._end:
                        if not self._open(n + 48, frames):
                            return
                        pos = 0
                    at = self._at + pos
                    self._mm[at : at + n] = stream
                    self._index += (1, pos, n)
                    self._fill = (pos + n + 15) & -16
                    self._count += 1
                    if (
                        self._count >= self._max_items
                        or time.monotonic() - self._started >= BATCH_DELAY
                    ):
                        self._seal()
                return
            size = n
        else:
            size = len(frames[0]) + sum(f.nbytes for f in frames[1:])
            # arrays of fp.shm.empty() are referenced where they are, never copied
            if size <= self._item_max and self.store.has_views():
                size = -1
        with self._lock:
            if 0 <= size <= self._item_max:
                self._add(frames, size)
                return
            self._send_open()
            if size != self._large_size:
                self._bound(size)
            if self._withheld < self._want:
                self._withhold()
            self._send_one(frames)

    def _publish(self) -> None:
        """Send the open run (its credits were taken; the lock is held)."""
        count = self._runs.count
        blob = self._runs.take()  # the lengths, then the pickles back to back
        if count == 1:
            self._chan.push(self._ring, _channel.INLINE, len(blob) - 2, 0, memoryview(blob)[2:])
            return
        self._chan.push_run(self._ring, blob, count)

    def _send_open(self) -> None:
        """Send the open run or batch block, if any (the lock is held)."""
        if self._runs.count:
            self._publish()
        if self._count:
            self._seal()

    def _no_credit(self) -> None:
        """The ring is out of credits: send what is batched, then wait for one."""
        self._send_open()  # the consumer may need these to give a credit back
        if self._withheld:  # small datapoints now: the large ones' bound goes
            self._large_size = self._want = 0
            self._withheld -= 1  # this one is ours
            self._chan.release(self._ring, self._withheld)
            self._withheld = 0
            return
        self._chan.credit(self._ring, self._alive)

    def _bound(self, size: int) -> None:
        """Large datapoints of ``size`` bytes (the lock is held): hold back the ring's
        credits beyond this worker's share of :data:`LARGE_BYTES` (at least 2), so that
        their blocks stay few and warm."""
        self._large_size = size
        if 0 < size <= LARGE_BYTES // LARGE_MIN:
            self._want = max(0, self._slots - max(2, self._large_bytes // size))
        else:
            self._want = 0
        if self._withheld > self._want:  # larger share now: some credits go back
            self._chan.release(self._ring, self._withheld - self._want)
            self._withheld = self._want

    def _withhold(self) -> None:
        """Take the credits :meth:`_bound` wants held back, those free now (the rest as
        they come back, before the next large datapoint)."""
        probe = self._probe
        while self._withheld < self._want and probe() == 0:
            self._withheld += 1

    def _open(self, need: int, frames: list[Any]) -> bool:
        """Start a batch block with room for ``need`` bytes more than its index (a credit
        is taken). False: no room while the consumer waits, so ``frames`` went alone."""
        self._send_open()
        nbytes = max(self._block_bytes, need + 8 * (1 + 2 * len(frames)))
        try:
            off, tag, at = self.store.open_batch(nbytes, give_way=True)
        except flowplug.StoreFull:
            self._send_one(frames, credited=True)  # alone: the usual way, or a copy
            return False
        except flowplug.StateError as exc:  # the consumer closed the store
            raise flowplug.TransportClosed(str(exc)) from exc
        self._block = (off, tag)
        self._at = at
        self._end = nbytes
        self._fill = 0
        self._started = time.monotonic()
        return True

    def _add(self, frames: list[Any], size: int) -> None:
        if self._probe() != 0:
            self._no_credit()
        # its frames (aligned) and the block's padding at the end
        need = size + ALIGN * len(frames) + 16
        index_bytes = 8 * (len(self._index) + 1 + 2 * len(frames))
        if not self._count or self._fill + index_bytes + need > self._end:
            if not self._open(need, frames):
                return
        at = self._at
        mm = self._mm
        index = self._index
        pos = self._fill
        index.append(len(frames))
        stream = frames[0]
        n = len(stream)
        if self._count and stream == self._stream:
            # The same stream as the block's datapoint before (the same make): its span
            # again, written once; the consumer knows it by the span (_unpack).
            index.append(self._stream_at)
            index.append(n)
        else:
            mm[at + pos : at + pos + n] = stream
            index.append(pos)
            index.append(n)
            self._stream = stream
            self._stream_at = pos
            pos += n
        for frame in frames[1:]:
            n = frame.nbytes
            pos = (pos + ALIGN - 1) & -ALIGN  # arrays start aligned, as in a record
            mm[at + pos : at + pos + n] = frame
            index.append(pos)
            index.append(n)
            pos += n
        self._fill = (pos + 15) & -16
        self._count += 1
        if self._count >= self._max_items or time.monotonic() - self._started >= BATCH_DELAY:
            self._seal()

    def _seal(self) -> None:
        """Send the open batch block through the ring (the lock is held)."""
        off, tag = self._block
        index = self._index
        words = array("q", index).tobytes()
        pos = self._fill
        at = self._at + pos
        self._mm[at : at + len(words)] = words
        count = self._count
        self._index = []
        self._count = 0
        self.store.seal_batch(off, tag, pos + len(words), count, pos)
        self._chan.push(self._ring, _channel.BATCH, off, tag)

    def _send_one(self, frames: list[Any], credited: bool = False) -> None:
        chan = self._chan
        ring = self._ring
        if len(frames) == 1 and len(frames[0]) <= _channel.INLINE_MAX:
            if not credited:
                chan.credit(ring, self._alive)
            chan.push(ring, _channel.INLINE, len(frames[0]), 0, frames[0])
            return
        try:
            oid = self._put(frames, give_way=True)
        except flowplug.StoreFull:
            # The consumer waits while it holds the memory: waiting for room would never
            # end, so this one goes as a copy (zmq copies the frames before returning).
            self._copy_socket().send_multipart([self._copy_head, *frames])
            if not credited:
                chan.credit(ring, self._alive)
            chan.push(ring, _channel.COPY, 0, 0)
            return
        except flowplug.StateError as exc:  # the consumer closed the store
            raise flowplug.TransportClosed(str(exc)) from exc
        if not credited:
            chan.credit(ring, self._alive)
        chan.push(ring, _channel.OBJECT, oid.offset, oid.tag)

    def flush(self) -> None:
        with self._lock:
            self._send_open()

    def _flush_late(self) -> None:
        """Flusher thread: send the open batch when the consumer asks (it waited
        :data:`BATCH_DELAY` for a datapoint). It sleeps on a semaphore in between, so a
        busy sender never shares the GIL with it."""
        chan = self._chan  # pins the mapping while this thread lives
        while not self._closed:
            if not chan.wait_flush(self._ring, 1.0):
                if chan.closed:
                    return  # the consumer closed the channel: nothing to send to
                continue
            if self._closed:
                return
            with self._lock:
                try:
                    self._send_open()
                except Exception:
                    return  # the consumer is gone; the next send() reports it

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
        try:
            self.flush()
        finally:
            self._closed = True
            if self._timer is not None:
                self._chan.request_flush()  # wakes our flusher (and others, harmlessly)
                self._timer.join(1.0)
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
            return _load_copy(sock)[0]
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
    # copies (one connection per worker) in the consumer, 2 more while it watches the
    # workers connect (ZmqSockets.watch_accepts); a worker opens a zmq context of its
    # own for copies when it starts (and, spawned, attaches the store);
    # tasks: one more socket in the consumer, a context in each worker.
    open_files = flowplug.OpenFiles(consumer=11, per_worker=1, worker=9)
    task_open_files = flowplug.OpenFiles(consumer=4, per_worker=1, worker=7)
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
        slots = ring_lengths(self.max_in_flight, self.num_workers)
        if self.max_in_flight > self.capacity:
            # The Runner's credits bound the datapoints (capacity unset). A run's ring
            # credits come back once its last datapoint is handed on, the Runner's as each
            # is: a run more per ring, so that the ring never holds back what the credits
            # allow (a worker asleep on its ring made every credit given back a syscall).
            slots = [n + BATCH_ITEMS for n in slots]
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
        self._held: list[Any] = []  # the rest of a run or batch block, last first
        self._owed = (0, 0)  # its ring, and the credits that go back after its last
        self._copies: dict[int, collections.deque] = {}
        self._copy_due: int | None = None  # a COPY entry read whose copy has not come yet
        self._copies_received = 0
        self._bytes = 0  # batches, inline datapoints and copies received (stats)
        self._loads = Loader()
        self._token = secrets.token_bytes(_TOKEN_LEN)
        self._sockets = flowplug.ZmqSockets()
        self._sock: zmq.Socket | None = None
        try:
            self._sock, self.address = self._sockets.bind(zmq.PULL, self.run_id, hwm=1000)
            self._sockets.watch_accepts(self._sock)
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
        held = self._held
        if held:  # the rest of a run or batch block, one per call
            obj = held.pop()
            if not held:  # its last: the credits of all its datapoints go back now
                self._give_back()
            return obj
        chan = self._chan  # held here: the mapping outlives a close() from another thread
        if chan is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        if not self._unlinked and not self._ready(timeout):
            return flowplug.EMPTY
        if self._copy_due is not None:
            return self._copy(self._copy_due, timeout)
        entry = chan.take(self._next, look=True)
        if entry is None:
            if chan.closed:
                raise flowplug.TransportClosed("the shm transport was closed")
            if timeout <= 0:  # the Runner looks first, then waits with a timeout
                return self._closed_check(flowplug.EMPTY)
            if not self._wait(chan, timeout):
                return self._closed_check(flowplug.EMPTY)
            if chan.closed:
                raise flowplug.TransportClosed("the shm transport was closed")
            entry = chan.take(self._next)
        ring, kind, a, b, at = entry
        self._next = ring + 1 if ring + 1 < self.num_workers else 0
        if kind == _channel.BATCH:
            return self._hold(chan, self._unpack(a, b), ring)
        if kind == _channel.RUN:  # a small pickles, b bytes
            loads = pickle.loads
            held = [loads(v) for v in chan.run(ring, a, b)]
            self._bytes += b
            held.reverse()
            return self._hold(chan, held, ring)
        if kind == _channel.OBJECT:
            chan.release(ring)
            return self._take(ObjectID(a, b), self._loads)
        if kind == _channel.INLINE:
            obj = pickle.loads(chan.mm[at : at + a])
            chan.release(ring)
            self._bytes += a
            return obj
        chan.release(ring)  # a COPY: it comes through the socket
        return self._copy(ring, timeout)

    def _wait(self, chan: _channel.Channels, timeout: float) -> bool:
        """Wait up to ``timeout`` for an entry, none being there a moment ago."""
        store = self._store
        if store is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        store.begin_waiting()  # workers waiting for room send copies meanwhile
        try:
            # After BATCH_DELAY, workers send what they have batched (a stalled
            # dataflow's last datapoints, a slow one's first).
            if chan.wait(min(timeout, BATCH_DELAY), tried=True):
                return True
            chan.request_flush()
            return timeout > BATCH_DELAY and chan.wait(timeout - BATCH_DELAY)
        finally:
            store.end_waiting()

    def _hold(self, chan: _channel.Channels, held: list[Any], ring: int) -> Any:
        """Hand on the first datapoint of a run or block (``held``, last first) and keep
        the rest for the next calls. The credits of its datapoints go back together,
        once the last is handed on (:meth:`_give_back`): one tight loop of posts per run
        instead of a call per datapoint, and never earlier than one by one would."""
        if len(held) > 1:
            self._held = held
            self._owed = (ring, len(held))
            return held.pop()
        chan.release(ring)
        return held.pop()

    def _give_back(self) -> None:
        ring, count = self._owed
        chan = self._chan
        if chan is not None:
            chan.release(ring, count)

    def _unpack(self, off: int, tag: int) -> list[Any]:
        """The datapoints of a batch block, last first (arrays are views of the block)."""
        store = self._store
        if store is None:
            raise flowplug.TransportClosed("the shm transport was closed")
        view, count, index = store.take_batch(off, tag)
        mv = memoryview(view)
        self._bytes += mv.nbytes
        words = mv[index:].cast("q").tolist()
        loads = pickle.loads
        # with arrays: by recipe (flowplug.serialize.Loader), looked up once per stream
        recipe_for = self._loads.span_recipe
        rebuild = self._loads.from_spans
        out = []
        p = 0
        last = -1  # where the stream of the last datapoint with buffers starts
        recipe = None
        for _ in range(count):
            if words[p] == 1:  # a small datapoint without buffers: one frame
                start, n = words[p + 1], words[p + 2]
                out.append(loads(mv[start : start + n]))
                p += 3
                continue
            nf = words[p]
            start = words[p + 1]
            # the stream, then (start, length) of each buffer in the block; a stream
            # the sender wrote once for several datapoints has the same start
            if start != last:
                last = start
                recipe = recipe_for(mv[start : start + words[p + 2]])
            if recipe is not None:
                out.append(recipe(view, words, p + 3))
            else:
                out.append(rebuild(mv[start : start + words[p + 2]], view, words, p + 3, nf - 1))
            p += 1 + 2 * nf
        out.reverse()
        return out

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
            obj, nbytes = _load_copy(sock)
            self._bytes += nbytes
            self._copies.setdefault(sender, collections.deque()).append(obj)
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
        self._sockets.watch_accepts(self._task_sock)
        return ShmTaskEndpoint(address, self._token, self._endpoint)

    def await_connections(self, keep_waiting: Any) -> None:
        # every worker connects now, while the fds counted for the accepts are free
        self._sockets.await_accepts(self.num_workers, keep_waiting)

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
        taken = store.bytes_taken if store is not None else 0
        return {
            "bytes_received": self._bytes + taken,
            "copies_received": self._copies_received,
            "store_bytes_in_use": used,
            "store_bytes": self.option_values["size"],
        }

    def close(self) -> None:
        self._held = []  # a recv() after close() raises, as without held datapoints
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
