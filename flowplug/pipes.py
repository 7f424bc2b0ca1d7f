"""Messages over OS pipes, for the transports that use pipes (queue, Ray's actor host).

A message is ``[u64 header words, u64 body bytes, header, body]``, where header and body
are a :class:`flowplug.serialize.Batch` (a lone object is a batch of one,
:func:`flowplug.serialize.batch_of_one`), so the reader rebuilds either with
:func:`flowplug.serialize.unpack_batch`, on top of the one buffer it read the body into.

The writer sends a message with one gathered write (``writev``), never copying an
object's buffers; a pipe has one writer, so messages never interleave. The reader,
:class:`MessageReader`, keeps a partly received message between calls, so a consumer
reading a non-blocking pipe never waits on a half-written message (a worker killed in the
middle of a write cannot hang it).
"""

from __future__ import annotations

import os
from array import array
from typing import Any

from .serialize import batch_of_one

#: the pipe buffer asked for (Linux); fewer wake-ups per large message.
PIPE_SIZE = 1024 * 1024


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Ask for a pipe buffer of ``size`` bytes (capped by the system's limit); best effort."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, limit))
    except (ImportError, AttributeError, OSError, ValueError):
        pass  # not Linux, or not allowed: the default pipe size works, a little slower


def write_frames(fd: int, frames: list[Any]) -> None:
    """Write one object's frames (:func:`flowplug.serialize.dumps`) as one message.

    :raises OSError: the pipe is closed at the other end (``BrokenPipeError``).
    """
    header, parts, size = batch_of_one(frames)
    write_batch(fd, header, parts, size)


def write_batch(fd: int, header: bytes, parts: list[Any], size: int) -> None:
    """Write a batch (``header`` and the blob as ``parts``, ``size`` bytes) as one message.

    :raises OSError: the pipe is closed at the other end (``BrokenPipeError``).
    """
    sizes = array("Q", [len(header) // 8, size]).tobytes()
    write_all(fd, [sizes, header, *parts])


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        value = -1
    return value if value > 0 else 16  # POSIX guarantees at least 16


#: how many buffers one ``writev`` takes (1024 on Linux); more is EINVAL.
IOV_MAX = _iov_max()


def write_all(fd: int, buffers: list[Any]) -> None:
    """Write every byte of ``buffers``, in order, with as few ``writev`` calls as the
    pipe and :data:`IOV_MAX` allow (an object may have thousands of buffers).

    :raises OSError: as ``os.writev``; ``BrokenPipeError`` when the reader is gone.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    views.reverse()  # consumed from the end: pop() is O(1)
    while views:
        n = os.writev(fd, views[: -IOV_MAX - 1 : -1])
        while views and n >= views[-1].nbytes:
            n -= views.pop().nbytes
        if n:
            views[-1] = views[-1][n:]


class MessageReader:
    """Reads one message from a pipe, over as many calls as its bytes take to arrive.

    After :meth:`read` returned true, :attr:`header` and :attr:`body` hold the message;
    use a new reader for the next one.
    """

    __slots__ = ("body", "buf", "eof", "header", "pos", "stage")

    def __init__(self) -> None:
        self.stage = 0  # 0: sizes, 1: header, 2: body
        self.buf = bytearray(16)
        self.pos = 0
        self.header: Any = None
        self.body: Any = None
        #: true once the pipe ended (every writer is gone) before the message was complete.
        self.eof = False

    def read(self, fd: int) -> bool:
        """Read what the pipe has; return true once the message is complete.

        On a non-blocking ``fd`` it returns false when the pipe is empty; on a blocking
        one it waits for the whole message. False with :attr:`eof` set: the pipe ended.
        """
        while True:
            view = memoryview(self.buf)
            while self.pos < len(view):
                try:
                    n = os.readv(fd, [view[self.pos :]])
                except BlockingIOError:
                    return False
                if n == 0:
                    self.eof = True
                    return False
                self.pos += n
            if self.stage == 0:
                words, size = array("Q", self.buf)
                self.stage, self.buf, self.pos = 1, bytearray(words * 8), 0
                self.body = bytearray(size)
            elif self.stage == 1:
                self.header = self.buf
                self.stage, self.buf, self.pos = 2, self.body, 0
            else:
                return True
