"""What runs inside a worker: death signal, worker_info, the send loop, error reports."""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import pickle
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


class TaskChannelFailed(Exception):
    """Raised by a ParallelMap worker loop that could not connect to the task channel;
    the cause is the exception. Its report cannot go through the transport: the
    consumer, waiting to send the first task, reads no answers yet."""


_local = threading.local()
_process_info: WorkerInfo | None = None


def worker_info() -> WorkerInfo | None:
    """Return the :class:`WorkerInfo` of the calling worker, or None in the consumer.

    A dataflow can use it in ``reset_state()`` or ``__iter__`` to shard or seed itself.
    """
    return getattr(_local, "info", None) or _process_info


#: what :func:`run_worker` returns when its error report went through the transport.
REPORTED = "reported"


def run_worker(
    df: Any,
    endpoint: Connect,
    info: WorkerInfo,
    stop: threading.Event | None = None,
    gate: Any = None,
) -> RemoteFailure | str | None:
    """Reset ``df``, then send its datapoints forever (repeating passes) until stopped.

    With a ``gate`` (shard mode, ParallelMap), ``gate.run`` sends instead, obeying the
    consumer's epochs and credits. Exceptions are reported to the consumer as a
    :class:`RemoteFailure` through the transport; this function never raises.

    :returns: None when stopped (``stop`` set, or the consumer closed the transport
        while stopping); :data:`REPORTED` when an error report went through the
        transport; otherwise the :class:`RemoteFailure` that could *not* be sent (the
        worker could not connect, the transport broke, sending the report failed): the
        caller must get it to the consumer another way (:class:`Death`'s ``failure``).
    """
    _local.info = info
    phase = "connect"
    sender = None
    try:
        sender = endpoint(info.id)
        phase = "reset_state"
        df.reset_state()
        phase = "iteration"
        if gate is not None:
            gate.run(df, sender, info, stop)
            return None
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
        return None
    except BaseException as exc:  # SystemExit, KeyboardInterrupt in a thread: report them too
        if stop is not None and stop.is_set():
            return None
        index = None
        if isinstance(exc, TaskFailed) and exc.__cause__ is not None:
            index, phase, exc = exc.index, "map", exc.__cause__
        unsent = isinstance(exc, TransportClosed)
        if isinstance(exc, TaskChannelFailed) and exc.__cause__ is not None:
            phase, exc, unsent = "connect", exc.__cause__, True
        failure = make_failure(info.id, phase, exc, index)
        if unsent or sender is None:
            # Nothing can go through the transport. A TransportClosed while the runner
            # is not stopping is a failure too: a worker process never learns that the
            # consumer is closing, and the consumer ignores what it says then.
            return failure
        try:
            sender.send(failure)
            sender.flush()
        except BaseException as exc2:  # the transport broke while reporting
            if stop is not None and stop.is_set():
                return None
            return _with_note(failure, f"sending this report failed: {_describe(exc2)}")
        return REPORTED
    finally:
        if sender is not None:
            try:
                sender.close()
            except BaseException:
                pass  # the consumer may be gone; the outcome is decided above


def make_failure(
    worker_id: int, phase: str, exc: BaseException, index: int | None = None
) -> RemoteFailure:
    """Describe ``exc`` as a :class:`RemoteFailure`; never raises."""
    try:
        return RemoteFailure.of(exc, worker_id, phase, index)
    except BaseException as err:  # a __str__ or __repr__ that raises more than Exception
        return RemoteFailure(
            worker_id,
            phase,
            type(exc).__name__,
            _describe(exc, with_type=False),
            f"(the traceback could not be formatted: {_describe(err)})\n",
            index,
        )


def _describe(exc: BaseException, with_type: bool = True) -> str:
    try:
        text = str(exc)
    except BaseException as err:
        text = f"<str() of the {type(exc).__name__} raised {type(err).__name__}>"
    return f"{type(exc).__name__}: {text}" if with_type else text


def _with_note(failure: RemoteFailure, note: str) -> RemoteFailure:
    return dataclasses.replace(failure, traceback=f"{failure.traceback}\n({note})\n")


def process_main(
    df: Any,
    endpoint: Connect,
    info: WorkerInfo,
    parent_pid: int,
    death_signal: bool,
    gate: Any = None,
    report: Any = None,
) -> None:
    """Entry point of a worker process (fork, spawn or forkserver).

    It never returns and never lets an exception out (multiprocessing would print it and
    exit with code 1, which says nothing to the consumer): the process leaves through
    ``os._exit``. A failure that cannot go through the transport is written to
    ``report`` (a pipe the consumer reads when the process ends) and the exit code is 1;
    a worker never exits with 0 on its own.

    :param df: the dataflow, or its pickle (``bytes``) for spawn and forkserver, loaded
        here so that a failure to load it is reported like any other.
    :param report: the write end of this worker's report pipe.
    """
    global _process_info
    _process_info = info
    outcome: Any
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
        # stop() terminates workers: a SIGTERM handler forked from the parent (the user's,
        # or the one Ray installs in its processes, which prints a stack trace) must not
        # run here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        if death_signal:
            _set_death_signal()
        _start_parent_watchdog(parent_pid)
        # multiprocessing forbids a daemon process to start children, which would make a
        # Runner inside a dataflow fail; the flag means nothing else here (this process
        # leaves through os._exit, and its own workers are bound to it by the death
        # signal and the watchdog).
        multiprocessing.current_process().daemon = False
        if isinstance(df, bytes):
            df = pickle.loads(df)
        _seed_globals(info.seed)
    except BaseException as exc:
        outcome = make_failure(info.id, "start", exc)
    else:
        outcome = run_worker(df, endpoint, info, gate=gate)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # the dataflow may have closed or broken them: never mind
        except BaseException:
            pass
    if outcome is REPORTED:
        # Wait to be stopped: a worker that ends on its own is then always a death, and
        # no exit code (a dataflow may call os._exit(3) too) is taken for "my error
        # report is on its way".
        while True:
            try:
                threading.Event().wait()
            except BaseException:
                pass
    if isinstance(outcome, RemoteFailure):
        try:
            report.send_bytes(pickle.dumps(outcome))
        except BaseException:
            pass  # the exit code still says it failed
        os._exit(1)
    os._exit(0)  # stopped: the consumer closed the transport while stopping this worker


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
    """Give each worker process its own random streams (forked copies share them).

    numpy.random is seeded where numpy is imported: now if numpy.random is imported too,
    else right after the worker first imports it, before any use. numpy loads it lazily,
    and importing it here (about 10 ms) delayed every worker's first datapoint, also for
    the dataflows that never draw from it.
    """
    random.seed(seed)
    if "numpy" not in sys.modules:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _SeedNumpyOnImport)]
    module = sys.modules.get("numpy.random")
    if module is not None:
        module.seed(seed % 2**32)
    else:
        sys.meta_path.insert(0, _SeedNumpyOnImport(seed % 2**32))


class _SeedNumpyOnImport:
    """An import hook (in ``sys.meta_path``) that seeds numpy.random once imported."""

    def __init__(self, seed: int):
        self.seed = seed

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "numpy.random":
            return None
        for finder in sys.meta_path:  # the others find it: the import goes on as usual
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _SeedAfterImport(spec.loader, self)
                return spec
        return None


class _SeedAfterImport:
    """The loader of numpy.random, wrapped: executes it, then seeds it, then unhooks."""

    def __init__(self, loader: Any, hook: _SeedNumpyOnImport):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # the module as a plain import leaves it: its own loader
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)
        module.seed(self.hook.seed)
