"""One OS pipe per worker process; the consumer polls them all.

A message on a pipe is an 8-byte big-endian length followed by that many bytes of pickle
(protocol 5, made by :func:`flowplug.serialize.dumps_bytes`). Each pipe has exactly one
writer, so messages never interleave and one worker's order is kept.

The consumer's ends are non-blocking and every pipe has its own partial-message buffer:
``recv`` never waits on a half-written message, so a worker killed mid-send cannot hang the
consumer (the Runner notices the death and raises ``flowplug.WorkerDied``).

Only the public API is used: ``flowplug`` and ``flowplug.serialize``.

This plugin is a from-scratch example of a third party's transport: it writes its own
framing on purpose, to show every step. A real pipe transport would use the core's
:mod:`flowplug.pipes` (one ``writev`` per message, a non-blocking reader), as the built-in
``queue`` transport does.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import sys
import time
from collections import deque
from typing import Any

import flowplug
from flowplug.serialize import dumps_bytes

_HEADER = struct.Struct("!Q")
#: the most bytes read from one pipe per poll round.
_CHUNK = 1 << 20


class PipeSender(flowplug.Sender):
    """Writes length-prefixed pickles into this worker's pipe (blocking while it is full)."""

    def __init__(self, fd: int):
        self._fd = fd

    def send(self, obj: Any) -> None:
        data = dumps_bytes(obj)  # raises TypeError for an unpicklable datapoint
        pending: list[Any] = [_HEADER.pack(len(data)), memoryview(data)]
        try:
            while pending:
                written = os.writev(self._fd, pending)
                pending = _advance(pending, written)
        except BrokenPipeError as exc:
            # Translate at the boundary: the Runner knows TransportClosed, not errno.
            raise flowplug.TransportClosed("the consumer closed the pipe transport") from exc

    def close(self) -> None:
        os.close(self._fd)


class PipeEndpoint(flowplug.Endpoint):
    """The pipes' file descriptors; workers inherit them through ``fork``."""

    def __init__(self, readers: list[int], writers: list[int]):
        self.readers = readers
        self.writers = writers

    def connect(self, worker_id: int) -> PipeSender:
        # Runs in the worker after fork: close the inherited ends it does not use, so that
        # a worker never keeps another pipe (or a reader) alive.
        for fd in self.readers:
            os.close(fd)
        for i, fd in enumerate(self.writers):
            if i != worker_id:
                os.close(fd)
        return PipeSender(self.writers[worker_id])


class _Reader:
    """Reassembles the messages of one pipe from whatever bytes have arrived."""

    def __init__(self) -> None:
        self.header = bytearray()
        self.body: bytearray | None = None
        self.filled = 0

    def feed(self, data: memoryview, out: deque) -> None:
        while data:
            if self.body is None:
                take = _HEADER.size - len(self.header)
                self.header += data[:take]
                data = data[take:]
                if len(self.header) == _HEADER.size:
                    (size,) = _HEADER.unpack(self.header)
                    self.header.clear()
                    self.body, self.filled = bytearray(size), 0
            else:
                take = min(len(data), len(self.body) - self.filled)
                self.body[self.filled : self.filled + take] = data[:take]
                self.filled += take
                data = data[take:]
            if self.body is not None and self.filled == len(self.body):
                out.append(pickle.loads(self.body))
                self.body = None


class PipeTransport(flowplug.Transport):
    """One pipe per worker process: simple, no extra thread, no dependency.

    Workers must start with ``fork``. ``capacity`` is not used: each pipe's kernel buffer
    (the ``pipe_size`` option) bounds what is in flight.
    """

    name = "pipe"
    crosses_processes = True
    zero_copy = False
    options = (
        flowplug.Option(
            "pipe_size",
            int,
            0,
            "kernel buffer of each pipe, e.g. '1MiB' (Linux); 0 keeps the kernel's default",
            size=True,
        ),
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._fds: list[int] = []
        if self.start_method != "fork":
            raise flowplug.ConfigError(
                f"transport 'pipe' hands its pipes to workers by fork; start_method="
                f"{self.start_method!r} cannot inherit them. Use start_method='fork', or a "
                "transport that works with every start method (e.g. 'queue')"
            )

    def open(self) -> PipeEndpoint:
        readers, writers = [], []
        try:
            for _ in range(self.num_workers):
                r, w = os.pipe()
                self._fds += (r, w)
                readers.append(r)
                writers.append(w)
                os.set_blocking(r, False)
                if self.option_values["pipe_size"]:
                    self._set_pipe_size(w, self.option_values["pipe_size"])
        except BaseException:
            self.close()
            raise
        self._poller = select.poll()
        for r in readers:
            self._poller.register(r, select.POLLIN)
        self._readers = {r: _Reader() for r in readers}
        self._ready: deque = deque()
        return PipeEndpoint(readers, writers)

    def recv(self, timeout: float) -> Any:
        ready = self._ready
        deadline = time.monotonic() + timeout
        while not ready:
            left = deadline - time.monotonic()
            events = self._poller.poll(max(0, int(left * 1000)))
            for fd, _ in events:
                self._read(fd)
            if not ready and left <= 0:
                return flowplug.EMPTY
        return ready.popleft()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        if not data:  # every writer is gone; nothing more will come from this pipe
            self._poller.unregister(fd)
            return
        self._readers[fd].feed(memoryview(data), self._ready)

    def _set_pipe_size(self, fd: int, size: int) -> None:
        import fcntl  # POSIX only, and only needed for this option

        if not hasattr(fcntl, "F_SETPIPE_SZ"):
            raise flowplug.ConfigError(
                f"option pipe_size of transport 'pipe' works on Linux only, not {sys.platform}; "
                "remove it from [transports.pipe]"
            )
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        except OSError as exc:
            raise flowplug.ConfigError(
                f"cannot set pipe_size={size} on transport 'pipe': {exc}. The limit for "
                "unprivileged users is /proc/sys/fs/pipe-max-size; use a smaller size"
            ) from exc

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def _advance(buffers: list[Any], written: int) -> list[Any]:
    """Drop ``written`` bytes from the front of ``buffers`` (after a partial writev)."""
    while buffers and written >= len(buffers[0]):
        written -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and written:
        buffers = [memoryview(buffers[0])[written:], *buffers[1:]]
    return buffers
