"""ZeroMQ PUSH/PULL over ipc://, with pickle protocol 5 and out-of-band buffers.

A message is ``[token, pickle stream, buffer...]`` for one object, or ``[token + header,
blob]`` for a batch of small ones (:class:`flowplug.BatchingSender`). The token is private
to the run, so bytes from a stranger who connects to the socket are dropped, never
unpickled. Received numpy arrays are views of the received frames (or buffers, below).

Large buffers are sent without a copy (``copy=False``); ``send()`` returns once zmq has
handed them to the kernel (a ``MessageTracker``), because the worker may refill the same
array as soon as ``send()`` returns. A dataflow that yields a new array each time and never
changes one it has yielded can say so (option ``fresh_arrays``): ``send()`` then returns at
once and zmq keeps the buffers referenced until it is done, as a bare pyzmq loop does.
Small items are copied into batches, so they never wait.

On Linux a datapoint with at least ``direct_min`` bytes (1 MiB) of such buffers takes
another way (:class:`_Direct`): its buffers go over the worker's own unix stream socket
(``sendall``: it returns once the kernel holds the bytes, so no tracker wait), its header
``[token + "D", stream, key + sizes]`` through zmq, in the same order as everything else of
that worker. The consumer reads the bytes into buffers of its own, reused once nothing
refers to them; the arrays it returns are views of those.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import secrets
import select
import socket
import struct
import sys
import time
import weakref
from typing import Any

import numpy as np
import zmq

import flowplug
from flowplug.ipc import out_of_fds, recv_within
from flowplug.serialize import dumps, loads, unpack_batch

#: how long a closing worker keeps trying to deliver what it has sent (ms).
_LINGER_MS = 5000


#: ``zmq.SNDMORE`` as a plain int: pyzmq's ``send_multipart`` combines its flags as enum
#: members, which costs microseconds per frame; frames go out one ``send`` each here.
_MORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: the kernel send buffer a worker asks for on its direct connection (0: the system's). With
#: room for a whole datapoint, ``sendall`` returns at once and the worker makes the next one
#: while the consumer reads: 1.2 MB, 1 worker went from ~0.8x to ~1.5x the bare pyzmq loop
#: (docs/performance.md, issue 14, seventh session). Linux grants up to twice
#: ``net.core.wmem_max`` (8 MiB where it is 4 MiB; 416 KiB with the usual 208 KiB).
_DIRECT_SNDBUF = 4 << 20
#: a worker's hello on its direct connection: the run's token and the connection's key.
_KEY = 8
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # Linux has both (direct connections)
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_TIMEVAL = struct.Struct("@ll")  # SO_RCVTIMEO's struct timeval
#: the consumer keeps up to this many bytes of receive buffers for reuse.
_POOL_BYTES = 64 << 20


def _direct_supported() -> bool:
    """Direct connections use Linux's abstract unix sockets (no file to clean up)."""
    return sys.platform.startswith("linux")


def _unix_socket(what: str) -> socket.socket:
    """A unix stream socket; out of file descriptors, a ConfigError saying ``what`` failed."""
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        fds = out_of_fds(exc, what)
        if fds is None:
            raise
        raise fds from exc


def _connect(address: str, hello: bytes) -> socket.socket:
    """A worker's direct connection, with its hello said."""
    conn = _unix_socket("open a direct connection to the consumer")
    try:
        if _DIRECT_SNDBUF:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _DIRECT_SNDBUF)
        conn.connect(address)
        conn.sendall(hello)
    except BaseException:
        conn.close()
        raise
    return conn


class ZmqSender(flowplug.BatchingSender):
    def __init__(
        self,
        address: str,
        token: bytes,
        hwm: int,
        batch: int,
        batch_delay: float,
        fresh_arrays: bool,
        direct: str,
        direct_min: int,
        worker_id: int,
    ):
        super().__init__(max_items=batch, max_delay=batch_delay)
        self._wait = not fresh_arrays
        self._sockets = flowplug.ZmqSockets()
        self._sock = self._sockets.connect(zmq.PUSH, address, hwm=hwm, linger_ms=_LINGER_MS)
        self._token = token
        self._send = self._sock.send
        # the direct connection, made now: the consumer accepts it while the Runner waits
        # for its workers (await_connections), while the fds it counted are free
        self._direct_min = direct_min if direct else -1
        self._key = secrets.token_bytes(_KEY)
        self._conn: socket.socket | None = None
        if direct:
            try:
                self._conn = _connect(direct, token + self._key)
            except BaseException:
                self._sockets.close()
                raise

    def _write_direct(self, frames: list[Any], sizes: list[int]) -> None:
        conn = self._conn
        assert conn is not None
        # First what the kernel takes at once (its send buffer), then the header: the
        # consumer mostly finds the bytes there when it learns of them, and reads them in
        # one go. The rest (the buffer was full) follows the header: the consumer reads
        # it as it comes, so sendall() cannot wait on a consumer that waits on it.
        rest: list[memoryview] = []
        for i in range(1, len(frames)):
            raw = getattr(frames[i], "raw", None)  # a PickleBuffer: C or Fortran order
            view = raw() if raw is not None else memoryview(frames[i]).cast("B")
            if not rest:
                try:
                    sent = conn.send(view, _DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent == len(view):
                    continue
                view = view[sent:]
            rest.append(view)
        send = self._send
        send(self._token + b"D", _MORE)
        send(frames[0], _MORE)
        send(self._key + struct.pack(f"<{len(sizes)}Q", *sizes), 0)
        # sendall returns once the kernel holds every byte: the worker may refill its
        # arrays right after, without waiting for anyone
        for view in rest:
            conn.sendall(view)

    def write_one(self, frames: list[Any]) -> None:
        if len(frames) > 1 and self._direct_min >= 0:
            sizes = [memoryview(f).nbytes for f in frames[1:]]
            if sum(sizes) >= self._direct_min:
                try:
                    self._write_direct(frames, sizes)
                except BaseException:
                    # Half a datapoint may be on the connection, or bytes without their
                    # header: close it, so that the consumer drops what is cut off (at
                    # its end) and never reads one datapoint's bytes as the next one's.
                    # Later datapoints go by zmq.
                    self._direct_min = -1
                    if self._conn is not None:
                        self._conn.close()
                    raise
                return
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
        if self._conn is not None:
            self._conn.close()
        self._sockets.close()


class _Direct:
    """The consumer's end of the workers' direct connections (``direct_min``).

    A worker connects when its sender is made and says hello: the run's token and a key
    of its connection. Then, per large datapoint, it sends ``[token + "D", stream, key +
    sizes]`` through zmq and the buffers' bytes through its connection, in order. The
    consumer reads them into buffers of its own (:meth:`_buffer`); a datapoint still
    arriving is finished by the next :meth:`read` (each bounded by its timeout), before
    any other message.
    """

    def __init__(self, run_id: str, token: bytes, backlog: int):
        self.token = token
        self.head = token + b"D"
        self.address = f"\0flowplug-{run_id}-{secrets.token_hex(8)}-direct"
        self.listener = _unix_socket("open the socket for direct connections")
        try:
            self.listener.bind(self.address)
            self.listener.listen(backlog)
            self.listener.setblocking(False)
        except BaseException:
            self.listener.close()
            raise
        self.conns: dict[bytes, socket.socket] = {}
        self.unnamed: list[tuple[socket.socket, bytearray]] = []  # accepted, before hello
        # receive buffers, reused (_buffer): [buffer, weak reference to its lease, lease type]
        self.pool: list[list[Any]] = []
        self.pool_bytes = 0
        # the datapoint being read: connection, key, stream, buffers, index, offset
        self.partial: list[Any] | None = None
        self.rcvtimeo: dict[socket.socket, float] = {}  # SO_RCVTIMEO set per connection

    def begin(self, stream: Any, head: bytes, timeout: float) -> tuple[Any, int]:
        """Start reading a datapoint: ``(it or EMPTY, bytes announced)``."""
        key = head[:_KEY]
        sizes = struct.unpack(f"<{(len(head) - _KEY) // 8}Q", head[_KEY:])
        conn = self.conns.get(key) or self._accept(key)
        if conn is None:  # not a connection of our workers
            return flowplug.EMPTY, 0
        buffers = [self._buffer(n) for n in sizes]
        self.partial = [conn, key, stream, buffers, 0, 0]
        return self.read(timeout), sum(sizes)

    def read(self, timeout: float) -> Any:
        """Read on the datapoint that is arriving: it, or EMPTY when its bytes did not all
        come within ``timeout`` (then the next call goes on where this one stopped)."""
        part = self.partial
        assert part is not None
        conn, key, stream, buffers, i, pos = part
        recv_into = conn.recv_into
        if timeout > 0:  # wait inside the kernel's receive, for all the bytes asked
            deadline = time.monotonic() + timeout
            if self.rcvtimeo.get(conn) != timeout:  # a syscall only when it changes
                sec = int(timeout)
                conn.setsockopt(
                    socket.SOL_SOCKET,
                    socket.SO_RCVTIMEO,
                    _TIMEVAL.pack(sec, int((timeout - sec) * 1e6) or 1),
                )
                self.rcvtimeo[conn] = timeout
            flags = _WAITALL
        else:
            deadline = 0.0
            flags = _DONTWAIT
        while i < len(buffers):
            view = memoryview(buffers[i]).cast("B")
            try:
                n = recv_into(view[pos:], 0, flags)
            except BlockingIOError:  # nothing now, or nothing within SO_RCVTIMEO
                n = -1
            if n == 0:  # the worker is gone mid-datapoint: its death is the Runner's news
                self.partial = None
                del self.conns[key]
                self.rcvtimeo.pop(conn, None)
                conn.close()
                return flowplug.EMPTY
            if n > 0:
                pos += n
                if pos == len(view):
                    i += 1
                    pos = 0
                    continue
            if not flags & _WAITALL or time.monotonic() >= deadline:
                part[4], part[5] = i, pos
                return flowplug.EMPTY
        self.partial = None
        return loads([stream, *buffers])

    def _buffer(self, size: int) -> Any:
        """Memory for ``size`` bytes, lent out as a new ctypes array over a kept buffer
        that no datapoint refers to any more, else over a new one (kept if there is
        room). New memory costs a page fault per page when the kernel writes it (~20% of
        the consumer's time at 1.2 MB); kept memory does not.

        Whatever is rebuilt on the lease (numpy arrays and their views, memoryviews,
        torch tensors) refers to the lease, never to the buffer behind it (numpy stops
        collapsing a view's base at a non-array), so a buffer is free once the weak
        reference to its last lease is dead: no reference counting that depends on the
        interpreter (``sys.getrefcount`` counts differently from Python 3.14 on).
        """
        pool = self.pool
        for entry in pool:
            if entry[1]() is None and entry[0].nbytes == size:
                lease = entry[2].from_buffer(entry[0])
                entry[1] = weakref.ref(lease)
                return lease
        buf: Any = np.empty(size, np.uint8)
        kind = ctypes.c_char * size
        lease = kind.from_buffer(buf)
        if self.pool_bytes + size > _POOL_BYTES:  # make room: drop free buffers
            kept = []
            for entry in pool:
                if self.pool_bytes + size > _POOL_BYTES and entry[1]() is None:
                    self.pool_bytes -= entry[0].nbytes
                else:
                    kept.append(entry)
            pool[:] = kept
        if self.pool_bytes + size <= _POOL_BYTES:
            pool.append([buf, weakref.ref(lease), kind])
            self.pool_bytes += size
        return lease

    def await_workers(self, count: int, keep_waiting: Any) -> None:
        """Accept ``count`` connections with their hellos, or until ``keep_waiting()`` is
        false (asked every 0.1 s at most)."""
        while len(self.conns) < count and keep_waiting():
            self._accept(b"")
            if len(self.conns) >= count:
                return
            poll = select.poll()
            poll.register(self.listener, select.POLLIN)
            for conn, _ in self.unnamed:
                poll.register(conn, select.POLLIN)
            poll.poll(100)

    def _accept(self, key: bytes) -> socket.socket | None:
        """Accept the connections waiting and read their hellos: a worker connects and
        says hello before its first header, so the connection of ``key`` is among them.
        Others may not have said hello yet: they wait in :attr:`unnamed`. A connection
        whose hello lacks the token is closed."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                fds = out_of_fds(exc, "accept a worker's direct connection")
                if fds is None:
                    raise
                raise fds from exc
            self.unnamed.append((conn, bytearray()))  # blocking: each read says how it waits
        size = len(self.token) + _KEY
        waiting = []
        for conn, hello in self.unnamed:
            try:
                got = conn.recv(size - len(hello), _DONTWAIT)
            except BlockingIOError:
                waiting.append((conn, hello))
                continue
            except OSError:
                got = b""
            hello += got
            if got and len(hello) < size:
                waiting.append((conn, hello))
            elif len(hello) == size and hello[: len(self.token)] == self.token:
                self.conns[bytes(hello[len(self.token) :])] = conn
            else:  # gone before its hello, or not one of our workers
                conn.close()
        self.unnamed = waiting
        return self.conns.get(key)

    def close(self) -> None:
        self.partial = None
        self.pool.clear()
        self.pool_bytes = 0
        for conn in [*self.conns.values(), *(c for c, _ in self.unnamed)]:
            conn.close()
        self.conns.clear()
        self.unnamed.clear()
        self.rcvtimeo.clear()
        self.listener.close()


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
    # The direct connections (direct_min): the consumer's listening socket, one accepted
    # connection per worker, the worker's end.
    open_files = flowplug.OpenFiles(consumer=10, per_worker=2, worker=8)
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
        flowplug.Option(
            "direct_min",
            int,
            1 << 20,
            "datapoints with at least this many bytes of large buffers send them over the "
            "worker's own unix socket, not zmq: send() returns once the kernel has them "
            "(0: never; Linux only)",
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
        self._direct: _Direct | None = None
        direct_min = values["direct_min"]
        if direct_min > 0 and not values["fresh_arrays"] and _direct_supported():
            try:
                self._direct = _Direct(self.run_id, self._token, max(128, 2 * self.num_workers))
            except flowplug.ConfigError:
                self._sockets.close()  # open() failed: close() may not run
                raise
            except OSError:  # no unix sockets here (a sandbox): every buffer goes by zmq
                self._direct = None
            except BaseException:
                self._sockets.close()
                raise
        return functools.partial(
            ZmqSender,
            self.address,
            self._token,
            hwm,
            max(1, values["batch"]),
            values["batch_delay"],
            values["fresh_arrays"],
            self._direct.address if self._direct else "",
            direct_min,
        )

    def recv(self, timeout: float) -> Any:
        if self._ready:
            return self._ready.popleft()
        direct = self._direct
        if direct is not None and direct.partial is not None:  # finish what is arriving
            return direct.read(timeout)
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
            if len(frames) == 3 and direct is not None and head == direct.head:
                # [token + "D", stream, key + sizes]: the buffers come over the direct
                # connection of the worker whose key it is
                obj, nbytes = direct.begin(frames[1], frames[2].bytes, timeout)
                self._bytes += len(frames[1]) + nbytes
                return obj
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
        if self._direct is not None:
            self._direct.await_workers(self.num_workers, keep_waiting)

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
        direct = getattr(self, "_direct", None)
        if direct is not None:
            direct.close()
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            sockets.close()
