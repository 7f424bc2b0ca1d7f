"""What runs on a Ray node: the actor that hosts one flowplug worker.

The actor does not iterate the dataflow itself. It runs the core's
:class:`flowplug.ProcessWorkers` for one worker, so the worker is a process forked by the
same code as on one machine (death signal, parent watchdog, seeds, the send loop
:func:`flowplug.worker_loop.run_worker`), and its exit status is known: a worker killed by
SIGSEGV is reported as such, which Ray alone cannot tell (it sees a closed connection).

Between the worker and its actor (one machine, parent and child) the data goes through a
**ring**: an anonymous shared mapping made before the fork, so nothing is named in /dev/shm
and nothing outlives the two processes. The worker's :class:`RingSender` (small datapoints
are packed together, within :mod:`flowplug.batching`'s latency bound) copies each message
(one large datapoint, or a batch of small ones) into the ring, its frames aligned as in
:class:`flowplug.serialize.Batch`, and sends only its header and position through a pipe.
Consecutive messages therefore lie back to back in the ring in the core's batch layout, and
:meth:`Host.take` replies with a contiguous run of them as **one** buffer (a numpy
view of the ring, which Ray copies once into its object store) plus one merged header; the
consumer rebuilds the datapoints with :func:`flowplug.serialize.unpack_batch`, arrays as
views of the object store (a batch of small plain datapoints is one entry, a pickled list:
one ``loads`` for all of them).

The ring is freed in order: the messages of a reply are released when the next ``take()``
starts (calls run one at a time, so Ray has stored the previous reply by then). The worker
blocks while the ring is full, in bytes or in messages (its share of the runner's
``capacity``): that and the consumer's bounded calls in flight are the backpressure.

In shard mode the :class:`~flowplug.ProcessWorkers` runs its worker under the core's local
shard gate, and :meth:`WorkerHost.control` (in its own concurrency group, so it is not
queued behind a waiting ``take()``) applies what the consumer forwards to the gate's
:class:`~flowplug.ControlSink`.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import select
import struct
import threading
import time
from array import array
from multiprocessing.connection import Connection, Pipe
from typing import Any

import numpy as np
import ray

import flowplug
from flowplug.batching import LateFlush
from flowplug.serialize import ALIGN, OUT_OF_BAND_MIN, dumps

#: bytes of the ring between a worker and its actor (an anonymous shared mapping).
RING_BYTES = 32 * 1024 * 1024
#: a reply holds at most this many bytes (or one message, when that is larger). 16 MiB:
#: 13 arrays of 1.2 MB, half as many Ray calls per array as 8 MiB; half the ring, so the
#: worker can fill the other half while a reply waits to be released.
BATCH_BYTES = 16 * 1024 * 1024
#: a reply this small goes as bytes (Ray inlines objects below 100 KiB in its answer).
SMALL_REPLY = 64 * 1024
#: a reply smaller than this waits up to FILL_WAIT for more messages (not an actor's first
#: reply with data: the first datapoint of a run goes at once)...
FLOOR_BYTES = 1024 * 1024
#: ...this long (s): a few ms of latency for far fewer, fuller replies.
FILL_WAIT = 0.010
#: messages larger than this do not go through the ring but through the pipe.
INLINE_MIN = RING_BYTES // 4

#: a batch of small datapoints goes out at this many datapoints...
BATCH_ITEMS = 256
#: ...or this many bytes...
BATCH_MAX = 256 * 1024
#: ...or this long (s) after its first datapoint.
BATCH_DELAY = 0.002
#: datapoints larger than this (pickled) are sent alone.
ITEM_MAX = 64 * 1024

#: leaves of a *plain* datapoint (see :func:`_plain`): immutable, pickled by value.
_SCALARS = frozenset(
    {int, float, bool, complex, type(None), np.float64, np.float32, np.int64, np.int32, np.bool_}
)

_PAD = bytes(ALIGN)
_CTL = 64  # the ring's first bytes: [released position, released messages] (uint64)
_MSG = struct.Struct("<QQ")  # position in the ring (INLINE: in the pipe), length
_INLINE = 2**64 - 1
_COUNT = struct.Struct("<Q")
_LIST = struct.Struct("<QQQQ")  # a message holding one pickled list: [1, 0, items, length]


def _up(n: int) -> int:
    return n + (-n % ALIGN)


def _flat(obj: Any, t: type) -> tuple[Any, int] | None:
    """For a dict, list or tuple of scalars, strings and tuples of those: a shallow copy
    (the tuple itself) and its rough size in bytes; otherwise None."""
    if len(obj) > ITEM_MAX // 16:
        return None  # too large to wait in a batch anyway: do not walk it
    n = 0
    if t is dict:
        for k in obj:
            tk = type(k)
            if tk is str:
                n += len(k)
            elif tk not in _SCALARS:
                return None
        values: Any = obj.values()
    else:
        values = obj
    for v in values:
        tv = type(v)
        if tv in _SCALARS:
            continue
        if tv is str or tv is bytes:
            n += len(v)
        elif tv is tuple:
            for x in v:
                tx = type(x)
                if tx is str or tx is bytes:
                    n += len(x)
                elif tx not in _SCALARS:
                    return None
            n += 8 * len(v)
        else:
            return None
    n += 16 * len(obj)
    return (obj if t is tuple else obj.copy()), n


def _plain(obj: Any) -> tuple[Any, int] | None:
    """A copy of ``obj`` that later changes to ``obj`` cannot reach, and its rough size in
    bytes; None unless ``obj`` is *plain*: a scalar or string, a dict, list or tuple of
    scalars, strings and tuples of those (``{"idx": 3, "name": "cat", "box": (1, 2)}``),
    or a tuple of such (shard mode sends ``(epoch, index, datapoint)``).

    A plain datapoint can wait in a list and be pickled with its batch: one ``dumps`` per
    batch, and one ``loads`` per batch at the consumer (which also shares repeated keys and
    strings between the datapoints of a batch), instead of one each per datapoint. Its
    dicts and lists are copied when it is sent (shallowly: what they hold is immutable),
    so the dataflow may change or reuse them as soon as it has yielded them; one dict or
    list held twice would arrive as two, so such a datapoint is not plain.
    """
    t = type(obj)
    if t in _SCALARS:
        return obj, 16
    if t is str or t is bytes:
        return obj, len(obj)
    if t is dict or t is list:
        return _flat(obj, t)
    if t is not tuple:
        return None
    n = 16 * len(obj)
    parts: list[Any] | None = None
    for i, x in enumerate(obj):
        tx = type(x)
        if tx in _SCALARS:
            continue
        if tx is str or tx is bytes:
            n += len(x)
            continue
        if tx is not dict and tx is not list and tx is not tuple:
            return None
        flat = _flat(x, tx)
        if flat is None:
            return None
        n += flat[1]
        if tx is not tuple:
            if parts is None:
                parts = list(obj)
            elif any(p is x for p in obj[:i]):
                return None  # the same dict or list twice: copies would part them
            parts[i] = flat[0]
    if parts is None:
        return obj, n
    return tuple(parts), n


class RingSender(flowplug.Sender):
    """Worker side: messages into the ring, their headers through the pipe.

    Small datapoints travel in batches, of one of two kinds (a batch of one kind goes out
    before a datapoint of the other is added, so the order holds):

    - *plain* ones (:func:`_plain`: dicts, lists, tuples of scalars and strings, the usual
      small datapoint) are copied shallowly when sent and the batch is pickled as **one
      list**: one ``dumps`` here and one ``loads`` at the consumer per batch;
    - others are pickled when sent (so a dataflow may reuse its objects), into the pending
      batch's stream with one :class:`pickle.Pickler` whose memo is cleared between
      datapoints: each datapoint is one frame, 16-byte aligned, as in
      :class:`flowplug.serialize.Batch`.

    A datapoint with a large buffer (a numpy array of 8 KiB or more) is sent alone, its
    buffers copied once, straight into the ring (:func:`flowplug.serialize.dumps`). A batch
    goes out at :data:`BATCH_ITEMS` datapoints or :data:`BATCH_MAX` bytes, on :meth:`flush`,
    and at the latest :data:`BATCH_DELAY` s after its first datapoint (at the next send, or
    from a timer thread when the dataflow stalls).
    """

    def __init__(self, ring: mmap.mmap, conn: Connection, wake: int, most: int):
        self._ring = memoryview(ring)[_CTL:]
        self._size = len(self._ring)
        self._ctl = np.frombuffer(ring, np.uint64, count=2)
        self._conn = conn
        self._send = conn.send_bytes
        self._wake = wake
        self._most = most  # messages in the ring not yet released by the actor
        self._pos = 0  # bytes written, monotonic (wrap-around gaps included)
        self._msgs = 0
        self._stream = io.BytesIO()
        self._large = False
        self._pickler = pickle.Pickler(self._stream, protocol=5, buffer_callback=self._buffer)
        self._lengths: list[int] = [0]
        self._count = 0  # datapoints in the pending batch of frames
        self._plain: list[Any] = []  # the pending batch of plain datapoints (a list)
        self._plain_bytes = 0
        self._lock = threading.Lock()
        self._late = LateFlush(
            self._lock,
            BATCH_DELAY,
            lambda: self._count or self._plain,
            self._write_pending,
            "flowplug-ray-flush",
        )

    def _buffer(self, buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < OUT_OF_BAND_MIN:
            return True  # in the stream
        self._large = True
        return False

    def send(self, obj: Any) -> None:
        plain = _flat(obj, dict) if type(obj) is dict else _plain(obj)
        if plain is not None and plain[1] <= ITEM_MAX:
            with self._lock:
                if self._count:  # a batch of frames waits: it goes first, in order
                    self._write_batch()
                batch = self._plain
                batch.append(plain[0])
                self._plain_bytes += plain[1]
                if len(batch) == 1:
                    self._late.began()
                elif (
                    len(batch) >= BATCH_ITEMS
                    or self._plain_bytes >= BATCH_MAX
                    or time.monotonic() - self._late.since >= BATCH_DELAY
                ):
                    self._write_plain()
            return
        if type(obj) is np.ndarray and obj.nbytes >= OUT_OF_BAND_MIN:
            frames = dumps(obj)  # a large array goes alone: no need to try the batch
            with self._lock:
                self._write_pending()
                self._write_one(frames)
            return
        stream = self._stream
        with self._lock:
            if self._plain:  # plain datapoints wait: they go first, in order
                self._write_plain()
            start = stream.tell()
            self._large = False
            try:
                self._pickler.dump(obj)
            except Exception:
                stream.seek(start)
                stream.truncate()
                self._pickler.clear_memo()
                dumps(obj)  # raises the core's TypeError naming the datapoint
                raise
            self._pickler.clear_memo()
            end = stream.tell()
            if self._large or end - start > ITEM_MAX:
                stream.seek(start)
                stream.truncate()
                if self._count:
                    self._write_batch()
                self._write_one(dumps(obj))
                return
            stream.write(_PAD[: -end % ALIGN])
            self._lengths += (1, end - start)
            self._count += 1
            if self._count == 1:
                self._late.began()
            elif (
                self._count >= BATCH_ITEMS
                or end >= BATCH_MAX
                or time.monotonic() - self._late.since >= BATCH_DELAY
            ):
                self._write_batch()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        """Send the pending batch, whichever kind it is (holding the lock)."""
        if self._count:
            self._write_batch()
        elif self._plain:
            self._write_plain()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._late.stop()
            self._conn.close()

    def _reserve(self, nbytes: int) -> int:
        """Wait for ``nbytes`` contiguous bytes (and a message slot); return the position."""
        pos = self._pos
        if pos % self._size + nbytes > self._size:
            pos += self._size - pos % self._size  # skip the tail: a message never wraps
        ctl = self._ctl
        while pos + nbytes - int(ctl[0]) > self._size or self._msgs - int(ctl[1]) >= self._most:
            # The actor writes a byte after each release; the timeout covers a byte that
            # came between the check and the wait.
            if select.select([self._wake], [], [], 0.05)[0]:
                os.read(self._wake, 4096)
        return pos

    def _post(self, pos: int, nbytes: int, header: bytes) -> None:
        try:
            self._send(_MSG.pack(pos, nbytes) + header)
        except OSError as exc:  # the actor is gone (killed, or its node lost)
            raise flowplug.TransportClosed(
                f"the Ray actor hosting this worker is gone: {exc}"
            ) from exc
        self._msgs += 1

    def _write_batch(self) -> None:
        """Send the pending batch: its stream is already in the core's batch layout."""
        self._late.written()
        lengths = self._lengths
        lengths[0] = self._count
        header = array("Q", lengths).tobytes()
        blob = self._stream.getbuffer()
        nbytes = len(blob)
        try:
            pos = self._reserve(nbytes)
            at = pos % self._size
            self._ring[at : at + nbytes] = blob
        finally:
            del blob
            self._stream.seek(0)
            self._stream.truncate()
            self._lengths = [0]
            self._count = 0
        self._pos = pos + nbytes
        self._post(pos, nbytes, header)

    def _write_plain(self) -> None:
        """Send the pending plain datapoints as one pickled list (see :func:`_plain`)."""
        self._late.written()
        batch = self._plain
        self._plain = []
        self._plain_bytes = 0
        blob = pickle.dumps(batch, protocol=5)  # scalars, strings, tuples: cannot fail
        nbytes = _up(len(blob))
        header = _LIST.pack(1, 0, len(batch), len(blob))
        if nbytes > INLINE_MIN:
            self._post(_INLINE, nbytes, header)
            self._send(blob + _PAD[: nbytes - len(blob)])
            return
        pos = self._reserve(nbytes)
        at = pos % self._size
        self._ring[at : at + len(blob)] = blob
        self._pos = pos + nbytes
        self._post(pos, nbytes, header)

    def _write_one(self, frames: list[Any]) -> None:
        views = [memoryview(f).cast("B") for f in frames]
        lengths = [len(v) for v in views]
        header = array("Q", [1, len(views), *lengths]).tobytes()
        nbytes = sum(_up(n) for n in lengths)
        if nbytes > INLINE_MIN:
            blob = bytearray(nbytes)
            at = 0
            for v in views:
                blob[at : at + len(v)] = v
                at += _up(len(v))
            self._post(_INLINE, nbytes, header)
            self._send(blob)
            return
        pos = self._reserve(nbytes)
        at = pos % self._size
        ring = self._ring
        for v in views:
            ring[at : at + len(v)] = v
            at += _up(len(v))
        self._pos = pos + nbytes
        self._post(pos, nbytes, header)


class RingEndpoint(flowplug.Endpoint):
    """What the forked worker inherits: the ring, the pipe's write end, the wake-up fd."""

    def __init__(self, ring: mmap.mmap, conn: Connection, wake: int, most: int):
        self.ring, self.conn, self.wake, self.most = ring, conn, wake, most

    def connect(self, worker_id: int) -> RingSender:
        return RingSender(self.ring, self.conn, self.wake, self.most)


class Host:
    """What a worker's Ray actor (:class:`flowplug_ray.transport.WorkerHost`, which makes
    one in the actor process and passes its calls on) does: run one flowplug worker process.

    :param df: the worker's dataflow.
    :param info: the worker's :class:`flowplug.WorkerInfo`.
    :param buffer: how many messages may wait in the ring (the worker's share of capacity).
    :param credits: shard mode: the worker's credits; None in replicate mode.
    """

    def __init__(self, df: Any, info: flowplug.WorkerInfo, buffer: int, credits: int | None = None):
        self._info = info
        self._node = ray.util.get_node_ip_address()
        self._ring = mmap.mmap(-1, _CTL + RING_BYTES)  # MAP_SHARED: the worker sees it
        self._ctl = np.frombuffer(self._ring, np.uint64, count=2)
        self._view = memoryview(self._ring)[_CTL:]
        self._size = RING_BYTES
        self._read, write = Pipe(duplex=False)
        wake_r, self._wake = os.pipe()
        os.set_blocking(self._wake, False)  # a full pipe already holds enough wake-ups
        endpoint = RingEndpoint(self._ring, write, wake_r, buffer)
        self._group = flowplug.ProcessWorkers([df], endpoint, [info], "fork")
        self._sink: flowplug.ControlSink | None = None
        if credits is not None:
            (self._sink,) = self._group.control_sinks(credits)
        self._epoch = -1
        # Started here, on the actor's main thread, so the worker gets the death signal
        # when the actor process ends (ray.kill, a lost node).
        self._group.start()
        write.close()  # the worker holds the only write end: EOF means it ended
        os.close(wake_r)
        self._pid = self._group.procs[0].pid
        self._carry: tuple[int, int, bytes, Any] | None = None  # read, not yet replied
        self._released = (0, 0)  # (position, messages) to release at the next take()
        self._death: flowplug.Death | None = None
        self._eof = False
        #: no reply with data yet: the first goes as soon as it has a message (start-up).
        self._fresh = True

    def where(self) -> tuple[int, int, str]:
        """Return (actor pid, worker pid, node ip)."""
        return os.getpid(), self._pid, self._node

    def _next(self, timeout: float) -> tuple[int, int, bytes, Any] | None:
        """The next message (position, length, header, inline blob), or None."""
        if self._carry is not None:
            msg, self._carry = self._carry, None
            return msg
        if self._death is not None:
            return None
        if self._eof:
            self._wait_exit(timeout)
            return None
        if not self._read.poll(timeout):
            return None
        try:
            raw = self._read.recv_bytes()
            pos, nbytes = _MSG.unpack_from(raw)
            blob = self._read.recv_bytes() if pos == _INLINE else None
        except (EOFError, OSError):
            # The worker closed its pipe: it ended, or it reported an error and waits to
            # be stopped (its report is on its way to the consumer: that is no death).
            self._eof = True
            self._wait_exit(min(timeout, 0.1))
            return None
        return pos, nbytes, raw[_MSG.size :], blob

    def take(self, wait: float, most: int) -> tuple[bytes, Any, flowplug.Death | None]:
        """Reply with up to ``most`` messages (:data:`BATCH_BYTES` at most) as
        ``(header, blob, death)`` in the layout of :func:`flowplug.serialize.unpack_batch`,
        after waiting up to ``wait`` s for the first; ``death`` is set once the worker ended.

        The blob is a view of the ring, which Ray copies into the object store as it stores
        the reply; the ring space is released at the next call.
        """
        pos, msgs = self._released
        self._ctl[0] = pos
        self._ctl[1] = msgs
        try:
            os.write(self._wake, b"x")
        except BlockingIOError:
            pass  # a full pipe: the worker has wake-ups enough
        except BrokenPipeError:
            pass  # the worker is gone; the pipe's EOF reports it
        first = self._next(wait)
        if first is None:
            return b"", None, self._death
        start, nbytes, header, blob = first
        self._released = (pos, msgs + 1)
        if blob is not None:  # an inline message travels alone
            return header, blob, None
        headers = [header[8:]]
        count = _COUNT.unpack_from(header)[0]
        end = start + nbytes
        deadline = None
        n = 1
        while n < most and end - start < BATCH_BYTES:
            msg = self._next(0)
            if msg is None:
                if end - start >= FLOOR_BYTES or self._death is not None or self._fresh:
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + FILL_WAIT
                elif now >= deadline:
                    break
                msg = self._next(deadline - now)
                if msg is None:
                    continue
            if msg[0] != end or msg[3] is not None or end + msg[1] - start > BATCH_BYTES:
                self._carry = msg  # wrapped around, inline, or too much: the next reply's
                break
            headers.append(msg[2][8:])
            count += _COUNT.unpack_from(msg[2])[0]
            end += msg[1]
            n += 1
        self._released = (end, msgs + n)
        self._fresh = False
        at = start % self._size
        header = _COUNT.pack(count) + b"".join(headers)
        if end - start <= SMALL_REPLY:
            # Ray sends a small reply inside its answer, not through the object store, and
            # serializes bytes without a pickler (a numpy view costs a cloudpickle call).
            return header, self._view[at : at + end - start].tobytes(), None
        data = np.frombuffer(self._ring, np.uint8, count=end - start, offset=_CTL + at)
        return header, data, None

    def control(self, epoch: int, credits: int) -> None:
        """Shard mode: give the worker ``credits`` credits back, then announce ``epoch``.

        Runs in its own concurrency group (one thread), so calls arrive in order while a
        ``take()`` waits; an epoch older than one already announced is ignored anyway.
        """
        assert self._sink is not None
        for _ in range(credits):
            self._sink.release()
        if epoch > self._epoch:
            self._epoch = epoch
            self._sink.start_epoch(epoch)

    def stop(self) -> None:
        self._group.stop()

    def _wait_exit(self, timeout: float) -> None:
        """After EOF: record the worker's death once its exit status is known."""
        deadline = time.monotonic() + timeout
        while True:
            death = self._group.death
            if death is not None:
                self._death = flowplug.Death(
                    self._info.id, self._pid, death.exitcode, f"on Ray node {self._node}"
                )
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
