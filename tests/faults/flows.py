"""The dataflows and small test transports the fault scenarios inject faults with.

Module-level, so that they pickle for the spawn start method.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import flowplug as fp
from flowplug.plugins import PluginInfo, get_registry
from flowplug.testing.contract import Counting


class Forever(fp.DataFlow):
    """Yield ``(worker id, i)`` forever, optionally with a payload of ``size`` bytes."""

    def __init__(self, size: int = 0, delay: float = 0.0):
        self.size = size
        self.delay = delay

    def __iter__(self) -> Iterator[Any]:
        wid = fp.worker_info().id
        payload = np.zeros(self.size, np.uint8) if self.size else None
        i = 0
        while True:
            if self.delay:
                time.sleep(self.delay)
            yield (wid, i) if payload is None else (wid, i, payload)
            i += 1


class Tagged(fp.DataFlow):
    """Yield ``(tag, worker id, i)`` forever: which runner, which worker, which item."""

    def __init__(self, tag: str):
        self.tag = tag

    def __iter__(self) -> Iterator[Any]:
        wid = fp.worker_info().id
        i = 0
        while True:
            yield (self.tag, wid, i)
            i += 1


class RaiseIn(fp.DataFlow):
    """Worker ``bad`` raises ValueError after ``k`` items; the others yield forever."""

    def __init__(self, bad: int, k: int):
        self.bad = bad
        self.k = k

    def __iter__(self) -> Iterator[Any]:
        wid = fp.worker_info().id
        i = 0
        while True:
            if wid == self.bad and i == self.k:
                raise ValueError(f"injected fault after {self.k} items")
            yield (wid, i)
            i += 1


class FailResetIn(fp.DataFlow):
    """``reset_state()`` raises in worker ``bad`` only."""

    def __init__(self, bad: int):
        self.bad = bad

    def reset_state(self) -> None:
        if fp.worker_info().id == self.bad:
            raise OSError("injected: cannot open shard 7")

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield fp.worker_info().id


class FloodThenFail(fp.DataFlow):
    """Worker 0 yields tiny items forever; worker 1 sleeps ``delay`` s in ``reset_state()``,
    then raises with the time it raised in the message (``time.monotonic()``: one clock
    for every process of the machine)."""

    def __init__(self, delay: float):
        self.delay = delay

    def reset_state(self) -> None:
        if fp.worker_info().id == 1:
            time.sleep(self.delay)
            raise OSError(f"injected at t={time.monotonic():.6f}")

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            yield i
            i += 1


class Die(fp.DataFlow):
    """Yield ``k`` items, then die: ``sigkill``, ``sigsegv`` (ctypes), ``exit3``
    (``os._exit(3)``), ``sysexit`` (``sys.exit(3)``, what a thread can do), or
    ``sigkill_busy`` (SIGKILL from a timer while large datapoints are being sent)."""

    def __init__(self, how: str, k: int = 3):
        self.how = how
        self.k = k

    def __iter__(self) -> Iterator[Any]:
        if self.how == "sigkill_busy":
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            big = np.ones(4 << 20, np.uint8)
            while True:
                yield big
        yield from range(self.k)
        if self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "sigsegv":
            # pytest enables faulthandler on a copy of its stderr, which a forked worker
            # inherits: without this, the intended crash prints a "Fatal Python error"
            # dump into the test report.
            faulthandler.disable()
            ctypes.string_at(0)
        elif self.how == "exit3":
            os._exit(3)
        elif self.how == "sysexit":
            sys.exit(3)
        time.sleep(60)  # pragma: no cover - every branch above ends the worker


class Unpicklable(fp.DataFlow):
    """Yield two good items, then a dict holding something pickle refuses."""

    def __init__(self, kind: str):
        self.kind = kind

    def __iter__(self) -> Iterator[Any]:
        yield 0
        yield 1
        if self.kind == "lambda":
            bad: Any = lambda: 0  # noqa: E731 - the lambda is the point
        elif self.kind == "lock":
            bad = threading.Lock()
        else:
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        yield {"bad": bad}
        while True:
            yield 2


class Sized(fp.DataFlow):
    """Yield ``(i, array)`` with arrays of the given byte sizes, in order, each pass."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[Any]:
        for i, n in enumerate(self.sizes):
            yield i, np.full(n, i % 251, np.uint8)


#: released by scenario 10 after close() returned, so a stuck worker *thread* can end.
UNBLOCK = threading.Event()


class StuckInC(fp.DataFlow):
    """Yield one item, then ignore SIGTERM and block in C: libc ``pause()`` in a worker
    process; in a worker thread (signals cannot be set there) a lock wait that only
    :data:`UNBLOCK` ends."""

    def __iter__(self) -> Iterator[Any]:
        yield 0
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ctypes.CDLL(None).pause()
        else:
            UNBLOCK.wait()
        while True:
            yield 1


class Nested(fp.DataFlow):
    """Each worker runs its own inner Runner and yields ``(outer id, inner item)``."""

    def __init__(self, transport: str):
        self.transport = transport

    def __iter__(self) -> Iterator[Any]:
        outer = fp.worker_info().id
        inner = fp.Runner(Counting(3), transport=self.transport, num_workers=1)
        try:
            with inner:
                while True:
                    for x in inner:
                        yield outer, x
        finally:
            inner.close()


class Chatty(fp.DataFlow):
    """Write ``nbytes`` to stdout and to stderr per datapoint."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def __iter__(self) -> Iterator[Any]:
        line = "x" * 1023
        i = 0
        while True:
            for _ in range(self.nbytes // 1024):
                print(line)
                print(line, file=sys.stderr)
            yield i
            i += 1


class _LimitedSender(fp.Sender):
    def __init__(self, q: Any, limit: int):
        self._queue = q
        self._limit = limit

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        if len(data) > self._limit:
            raise fp.DataTooLarge(
                f"datapoint of {len(data)} bytes is larger than max_item_size={self._limit} "
                "bytes; raise the option max_item_size"
            )
        self._queue.put(data)

    def close(self) -> None:
        self._queue.close()
        self._queue.join_thread()


class _LimitedEndpoint(fp.Endpoint):
    def __init__(self, q: Any, limit: int):
        self._queue = q
        self._limit = limit

    def connect(self, worker_id: int) -> _LimitedSender:
        return _LimitedSender(self._queue, self._limit)


class LimitedTransport(fp.Transport):
    """A bounded multiprocessing queue with a byte limit per datapoint (tests only)."""

    name = "limited"
    size_limit_option = "max_item_size"
    options = (fp.Option("max_item_size", int, 1 << 20, "largest datapoint", size=True),)

    def open(self) -> _LimitedEndpoint:
        self._queue = mp.get_context(self.start_method).Queue(self.capacity)
        return _LimitedEndpoint(self._queue, self.option_values["max_item_size"])

    def recv(self, timeout: float) -> Any:
        try:
            return pickle.loads(self._queue.get(timeout=timeout))
        except queue.Empty:
            return fp.EMPTY

    def close(self) -> None:
        q = getattr(self, "_queue", None)
        if q is not None:
            self._queue = None
            q.cancel_join_thread()
            q.close()


def register_limited() -> None:
    """Add :class:`LimitedTransport` to this process's registry (undone by reload_plugins)."""
    registry = get_registry()
    if "limited" not in registry.transports:
        registry.register(LimitedTransport, origin=PluginInfo("limited", "tests", "0"))


class _FaultySender(_LimitedSender):
    def __init__(self, q: Any, fail: str, owned: bool):
        super().__init__(q, 1 << 30)
        self._fail = fail
        self._owned = owned

    def send(self, obj: Any) -> None:
        if self._fail == "report" and type(obj).__name__ == "RemoteFailure":
            raise OSError("injected: the transport broke while the worker was reporting")
        super().send(obj)

    def close(self) -> None:
        if self._owned:
            super().close()


class _FaultyEndpoint(fp.Endpoint):
    def __init__(self, q: Any, fail: str, owned: bool):
        self._queue = q
        self._fail = fail
        self._owned = owned

    def connect(self, worker_id: int) -> _FaultySender:
        if self._fail == "connect":
            raise OSError(24, "injected: Too many open files")
        return _FaultySender(self._queue, self._fail, self._owned)


class FaultyTransport(LimitedTransport):
    """A transport that breaks where asked (tests only): ``fail="connect"``, its
    ``connect()`` raises in the worker; ``fail="report"``, its sender refuses the error
    report (datapoints go through)."""

    name = "faulty"
    size_limit_option = None
    options = (fp.Option("fail", str, "connect", "where to break: connect or report"),)

    def open(self) -> _FaultyEndpoint:
        self._queue = mp.get_context(self.start_method).Queue(self.capacity)
        return _FaultyEndpoint(self._queue, self.option_values["fail"], owned=True)


class FaultyThreadTransport(FaultyTransport):
    """:class:`FaultyTransport` with worker threads."""

    name = "faulty_thread"
    crosses_processes = False

    def open(self) -> _FaultyEndpoint:
        self._queue = _PickledQueue(self.capacity)
        return _FaultyEndpoint(self._queue, self.option_values["fail"], owned=False)

    def close(self) -> None:
        pass


class _PickledQueue(queue.Queue):
    """A queue.Queue with the part of multiprocessing.Queue's API the senders use."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, timeout)


def register_faulty() -> None:
    """Add the faulty test transports to this process's registry."""
    registry = get_registry()
    for cls in (FaultyTransport, FaultyThreadTransport):
        if cls.name not in registry.transports:
            registry.register(cls, origin=PluginInfo(cls.name, "tests", "0"))


class RaiseAfter(fp.DataFlow):
    """Yield ``k`` items, then raise ``exc`` (default: ValueError). With ``close_stdio``
    a worker *process* first closes its stdout and stderr (threads share the
    consumer's, so they leave them alone)."""

    def __init__(self, k: int, close_stdio: bool = False, exc: Any = None):
        self.k = k
        self.close_stdio = close_stdio
        self.exc = exc

    def __iter__(self) -> Iterator[Any]:
        if self.close_stdio and threading.current_thread() is threading.main_thread():
            sys.stdout.close()
            sys.stderr.close()
        yield from range(self.k)
        raise self.exc if self.exc is not None else ValueError(f"injected after {self.k}")


class BadStr(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


class LoadsOnlyHere(fp.DataFlow):
    """Pickles in the consumer, fails to unpickle anywhere else (a module the worker
    cannot import, a version mismatch)."""

    def __init__(self) -> None:
        self.home = os.getpid()

    def __setstate__(self, state: dict) -> None:
        if state["home"] != os.getpid():
            raise ImportError("injected: No module named 'only_in_the_consumer'")
        self.__dict__.update(state)

    def __iter__(self) -> Iterator[Any]:
        yield from range(3)


class ManyBuffers(fp.DataFlow):
    """One datapoint per pass: a list of ``n`` arrays, each large enough to travel out
    of band (its own frame, its own writev buffer)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        yield [np.full(4096, i, np.int32) for i in range(self.n)]


class Blocked(fp.DataFlow):
    """Yield one item at once, then one every 2 s: the consumer waits in ``next()``.
    (Not for ever: a worker thread can only stop at a send.)"""

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield 0
            time.sleep(2.0)
