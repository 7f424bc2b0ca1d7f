"""What runs inside a worker: death signal, worker_info, the send loop, error reports."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from . import _exc
from .errors import TransportClosed, WorkerError
from .transport import Connect

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerInfo:
    """Who am I? Returned by :func:`worker_info` inside a worker."""

    #: this worker's index, ``0 <= id < num_workers``.
    id: int
    #: how many workers the runner has.
    num_workers: int
    #: a seed for this worker: different per worker, fixed by the runner's ``seed``.
    seed: int


@dataclass(frozen=True)
class RemoteFailure:
    """An exception raised inside a worker, as sent to the consumer."""

    worker_id: int
    phase: str  # "reset_state", "iteration" or "map"
    exc_type: str
    message: str
    traceback: str
    #: ParallelMap: the index of the input whose fn raised.
    index: int | None = None
    #: the exception itself: the live object between threads; after pickling, the copy
    #: rebuilt in the consumer, or None when that was impossible (see flowplug._exc).
    original: BaseException | None = None
    #: an error a runner inside this worker passed on: where it was raised, as that
    #: runner described it ("worker 0 in fn on input 7"); empty otherwise.
    origin: str = ""

    @classmethod
    def of(cls, exc: BaseException, worker_id: int, phase: str, index: int | None) -> RemoteFailure:
        """The report of ``exc``; a ``WorkerError`` of a nested runner is passed on as the
        error it reports, so that the consumer's message does not wrap it twice."""
        if isinstance(exc, WorkerError) and exc._origin:
            return cls(
                worker_id,
                phase,
                exc.exc_type,
                exc._remote_message,
                exc.remote_traceback,
                index,
                exc.original,
                exc._origin,
            )
        try:
            message = str(exc)
        except Exception as str_failed:
            message = f"<str() of the exception raised {type(str_failed).__name__}>"
        return cls(
            worker_id,
            phase,
            type(exc).__name__,
            message,
            "".join(traceback.format_exception(exc)),
            index,
            exc,
        )

    def __reduce__(self) -> Any:
        # The exception travels packed (flowplug._exc.pack), so that unpickling the report
        # itself cannot fail in the consumer, whatever the exception's class does.
        packed = _exc.pack(self.original) if self.original is not None else None
        return (
            _rebuild_failure,
            (
                self.worker_id,
                self.phase,
                self.exc_type,
                self.message,
                self.traceback,
                self.index,
                packed,
                self.origin,
            ),
        )


def _rebuild_failure(
    worker_id: int,
    phase: str,
    exc_type: str,
    message: str,
    traceback: str,
    index: int | None,
    packed: bytes | None,
    origin: str,
) -> RemoteFailure:
    return RemoteFailure(
        worker_id, phase, exc_type, message, traceback, index, _exc.unpack(packed), origin
    )


class TaskFailed(Exception):
    """Raised by a ParallelMap worker loop, from the exception of ``fn`` on input ``index``."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


_local = threading.local()
_process_info: WorkerInfo | None = None


def worker_info() -> WorkerInfo | None:
    """Return the :class:`WorkerInfo` of the calling worker, or None in the consumer.

    A dataflow can use it in ``reset_state()`` or ``__iter__`` to shard or seed itself.
    """
    return getattr(_local, "info", None) or _process_info


def run_worker(
    df: Any,
    endpoint: Connect,
    info: WorkerInfo,
    stop: threading.Event | None = None,
    gate: Any = None,
) -> bool:
    """Reset ``df``, then send its datapoints forever (repeating passes) until stopped.

    With a ``gate`` (shard mode, ParallelMap), ``gate.run`` sends instead, obeying the
    consumer's epochs and credits. Exceptions are reported to the consumer as a
    :class:`RemoteFailure`.

    :returns: true when an error was reported.
    """
    _local.info = info
    try:
        sender = endpoint(info.id)
    except Exception:
        traceback.print_exc()
        return False
    phase = "reset_state"
    try:
        df.reset_state()
        phase = "iteration"
        if gate is not None:
            gate.run(df, sender, info, stop)
            return False
        send = sender.send
        while stop is None or not stop.is_set():
            sent = 0
            for dp in df:
                send(dp)
                sent += 1
            if sent == 0:
                raise RuntimeError(
                    f"dataflow {type(df).__name__} yielded no datapoint in a whole pass; "
                    "a runner repeats passes forever, so it would spin"
                )
        return False
    except TransportClosed:
        return False
    except BaseException as exc:  # SystemExit, KeyboardInterrupt in a thread: report them too
        if stop is not None and stop.is_set():
            return False
        index = None
        if isinstance(exc, TaskFailed) and exc.__cause__ is not None:
            index, phase, exc = exc.index, "map", exc.__cause__
        failure = RemoteFailure.of(exc, info.id, phase, index)
        try:
            sender.send(failure)
        except Exception:
            return False
        return True
    finally:
        try:
            sender.close()
        except Exception:
            pass


def process_main(
    df: Any,
    endpoint: Connect,
    info: WorkerInfo,
    parent_pid: int,
    death_signal: bool,
    gate: Any = None,
) -> None:
    """Entry point of a worker process (fork, spawn or forkserver)."""
    global _process_info
    _process_info = info
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    # stop() terminates workers: a SIGTERM handler forked from the parent (the user's, or the
    # one Ray installs in its processes, which prints a stack trace) must not run here.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if death_signal:
        _set_death_signal()
    _start_parent_watchdog(parent_pid)
    # multiprocessing forbids a daemon process to start children, which would make a
    # Runner inside a dataflow fail; the flag means nothing else here (this process
    # leaves through os._exit, and its own workers are bound to it by the death signal
    # and the watchdog).
    multiprocessing.current_process().daemon = False
    _seed_globals(info.seed)
    reported = run_worker(df, endpoint, info, gate=gate)
    sys.stdout.flush()
    sys.stderr.flush()
    if reported:
        # Wait to be stopped: a worker that ends on its own is then always a death, and
        # no exit code (a dataflow may call os._exit(3) too) is taken for "my error
        # report is on its way".
        while True:
            threading.Event().wait()
    os._exit(0)


def _set_death_signal() -> None:
    """Ask Linux to SIGKILL this process when the thread that forked it ends."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread still covers it


def _start_parent_watchdog(consumer_pid: int, interval: float = 0.5) -> None:
    """Exit when the consumer is gone, on every platform (PR_SET_PDEATHSIG's fallback).

    The parent is the consumer under fork and spawn, the forkserver under forkserver; a
    change of parent means it died. The consumer itself is also checked by pid.
    """
    parent = os.getppid()

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        try:
            os.kill(consumer_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    if gone():
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="flowplug-parent-watchdog", daemon=True).start()


def _seed_globals(seed: int) -> None:
    """Give each worker process its own random streams (forked copies share them)."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
