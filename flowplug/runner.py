"""The Runner: runs a dataflow in parallel workers and delivers its datapoints.

It owns the semantics for every transport: starting workers, the reentrancy guard,
errors and deaths, timeouts, and cleanup (close, garbage collection, interpreter exit).
"""

from __future__ import annotations

import copy
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from . import plugins
from ._workers import ProcessWorkers, ThreadWorkers
from .config import resolve_settings, validate_options
from .errors import (
    ConfigError,
    RunnerTimeout,
    StateError,
    UnknownLength,
    WorkerDied,
    WorkerError,
)
from .transport import EMPTY, Transport, WorkerGroup
from .worker import EXIT_REPORTED, RemoteFailure, WorkerInfo

#: how long one blocking receive waits before the runner checks on its workers.
POLL_INTERVAL = 0.1
#: how long to wait for the report of a worker that exited after an error.
REPORT_GRACE = 2.0


class _Run:
    """What a started runner holds; kept apart from the Runner so gc can finalize it."""

    def __init__(self, transport: Transport, workers: WorkerGroup):
        self.transport = transport
        self.workers = workers
        self.owner_pid = os.getpid()

    def shutdown(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked child inherited this object; the workers are not its own
        workers = self.workers
        if isinstance(workers, ThreadWorkers):
            workers.request_stop()
            self.transport.close()  # wakes senders blocked on a full transport
            workers.stop()
        else:
            workers.stop()
            self.transport.close()


class Runner:
    """Run ``df`` in ``num_workers`` workers and iterate over what they produce.

    Every worker runs its own copy of ``df`` and repeats it forever; with
    ``num_workers=1`` the order of ``df`` is preserved. When ``len(df)`` is known, one
    iteration (an epoch) yields ``len(df)`` datapoints; otherwise it never ends.

    :param df: a dataflow (anything with ``__iter__`` and ``reset_state()``), or a
        zero-argument factory returning one, called once per worker in the consumer.
    :param transport: name of the transport (``"zmq"``, ``"queue"``, ``"thread"``...).
    :param num_workers: how many workers.
    :param capacity: how many datapoints may be buffered between workers and consumer.
    :param start_method: ``"fork"`` (default on Linux), ``"spawn"`` or ``"forkserver"``;
        only for transports whose workers are processes.
    :param timeout: seconds to wait for one datapoint before raising
        :class:`~flowplug.RunnerTimeout`; None waits forever (deaths are still noticed).
    :param seed: base of the per-worker seeds; random when None.
    :param options: the transport's own options (see ``flowplug transports``).

    Example::

        with fp.Runner(fp.DataFromList(items), transport="zmq", num_workers=2) as runner:
            for dp in runner:
                ...
    """

    def __init__(
        self,
        df: Any,
        transport: str | None = None,
        num_workers: int | None = None,
        capacity: int | None = None,
        start_method: str | None = None,
        timeout: float | None = None,
        seed: int | None = None,
        **options: Any,
    ):
        settings = resolve_settings(
            transport=transport,
            num_workers=num_workers,
            capacity=capacity,
            start_method=start_method,
            timeout=timeout,
        )
        cls = plugins.get_transport(settings.transport)
        if (cls.runs_workers or not cls.crosses_processes) and settings.start_method is not None:
            raise ConfigError(
                f"start_method={settings.start_method!r} has no meaning for transport "
                f"{cls.name!r}: "
                + ("it starts its own workers" if cls.runs_workers else "its workers are threads")
                + ". Drop start_method, or choose a transport whose workers the runner forks"
            )
        self.transport_name = cls.name
        self.num_workers = settings.num_workers
        self.capacity = settings.capacity
        forks = cls.crosses_processes and not cls.runs_workers
        self.start_method = settings.start_method or ("fork" if forks else None)
        self.timeout = settings.timeout
        self.seed = secrets.randbits(31) if seed is None else seed
        self._transport_cls = cls
        self._options = validate_options(cls.name, cls.options, options)
        self._df = df
        self._factory = _as_factory(df)
        self._size: int | None = None if self._factory else _length(df)
        self._guard = threading.Lock()
        self._run: _Run | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle

    def reset_state(self) -> None:
        """Start the workers (the fork happens here). Call once.

        :raises flowplug.StateError: called twice, or after ``close()``.
        """
        if self._closed:
            raise StateError("this runner is closed; create a new Runner")
        if self._run is not None:
            raise StateError("reset_state() was called twice; a runner starts once")
        dfs = self._dataflows()
        if self._factory:
            self._size = _length(dfs[0])
        n = self.num_workers
        infos = [WorkerInfo(i, n, (self.seed + i) % 2**31) for i in range(n)]
        transport = self._transport_cls(
            capacity=self.capacity,
            num_workers=n,
            run_id=f"fp-{os.getpid()}-{secrets.token_hex(4)}",
            start_method=self.start_method,
            **self._options,
        )
        endpoint = transport.open()
        try:
            workers: WorkerGroup
            if self._transport_cls.runs_workers:
                workers = transport.make_workers(dfs, endpoint, infos)
            elif self._transport_cls.crosses_processes:
                assert self.start_method is not None
                workers = ProcessWorkers(dfs, endpoint, infos, self.start_method)
            else:
                workers = ThreadWorkers(dfs, endpoint, infos)
            run = _Run(transport, workers)
            self._finalizer = weakref.finalize(self, run.shutdown)
            workers.start()
        except BaseException:
            if self._finalizer is not None:
                self._finalizer()
            else:
                transport.close()
            self._closed = True
            raise
        self._run = run

    def close(self) -> None:
        """Stop every worker and release the transport. Idempotent."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Runner:
        if self._run is None:
            self.reset_state()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        if self._size is None:
            raise UnknownLength("the dataflow has no known length")
        return self._size

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        if not self._guard.acquire(blocking=False):
            raise StateError(
                "this runner is already being iterated (by another thread, or by an "
                "enclosing loop); a runner has one consumer at a time"
            )
        try:
            if self._run is None:
                self.reset_state()
            if self._closed:
                raise StateError(
                    "this runner is closed" + (f" after: {self._failure}" if self._failure else "")
                )
            yield from self._epoch()
        finally:
            self._guard.release()

    def _epoch(self) -> Iterator[Any]:
        run = self._run
        assert run is not None
        recv = run.transport.recv
        workers = run.workers
        size = self._size
        count = 0
        while size is None or count < size:
            obj = recv(POLL_INTERVAL)
            if obj is EMPTY or type(obj) is RemoteFailure or workers.death is not None:
                obj = self._next_slow(obj)
            count += 1
            yield obj

    def _next_slow(self, obj: Any) -> Any:
        """Handle everything that is not a plain datapoint; return the next datapoint."""
        run = self._run
        assert run is not None
        waited = POLL_INTERVAL if obj is EMPTY else 0.0
        started = time.monotonic() - waited
        report_deadline = None
        while True:
            if type(obj) is RemoteFailure:
                raise self._fail(_worker_error(obj))
            death = run.workers.death
            if death is not None:
                if death.exitcode != EXIT_REPORTED:
                    raise self._fail(_worker_died(death))
                # It exited after sending its error report: keep reading until it arrives.
                if report_deadline is None:
                    report_deadline = time.monotonic() + REPORT_GRACE
                elif time.monotonic() > report_deadline:
                    raise self._fail(
                        _worker_died(death, " after an error whose report never arrived")
                    )
            if obj is not EMPTY:
                return obj
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise RunnerTimeout(
                    f"no datapoint arrived in {self.timeout:g} s from "
                    f"{self.num_workers} worker(s) on transport {self.transport_name!r}; "
                    "raise timeout= or check the dataflow"
                )
            obj = run.transport.recv(POLL_INTERVAL)

    def _fail(self, exc: BaseException) -> BaseException:
        """Stop everything; the error is what the consumer sees."""
        self._failure = exc
        self.close()
        return exc

    # ------------------------------------------------------------------ helpers

    def _dataflows(self) -> list[Any]:
        n = self.num_workers
        if self._factory:
            return [self._df() for _ in range(n)]
        if self._transport_cls.crosses_processes or n == 1:
            return [self._df] * n  # each process gets its own copy
        try:
            return [self._df] + [copy.deepcopy(self._df) for _ in range(n - 1)]
        except Exception as exc:
            raise TypeError(
                f"transport {self.transport_name!r} runs workers as threads, which need one "
                f"dataflow each, and copying {type(self._df).__name__} failed: {exc}. "
                "Pass a zero-argument factory instead: Runner(lambda: make_df(), ...)"
            ) from exc

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._run else "new"
        return f"<Runner transport={self.transport_name!r} num_workers={self.num_workers} {state}>"


def _as_factory(df: Any) -> bool:
    if hasattr(df, "__iter__"):
        if not hasattr(df, "reset_state"):
            raise TypeError(
                f"{type(df).__name__} has no reset_state(); wrap plain iterables with "
                "fp.DataFromList(items) or fp.DataFromGenerator(gen)"
            )
        return False
    if callable(df):
        return True
    raise TypeError(
        f"Runner needs a dataflow (with __iter__ and reset_state) or a zero-argument "
        f"factory returning one, got {type(df).__name__}"
    )


def _length(df: Any) -> int | None:
    try:
        return len(df)
    except (NotImplementedError, TypeError):
        return None


def _worker_error(failure: RemoteFailure) -> WorkerError:
    where = "in reset_state()" if failure.phase == "reset_state" else "while iterating"
    return WorkerError(
        f"worker {failure.worker_id} raised {failure.exc_type} {where}: {failure.message}\n"
        f"\nRemote traceback:\n{failure.traceback}",
        worker_id=failure.worker_id,
        exc_type=failure.exc_type,
        remote_traceback=failure.traceback,
    )


def _worker_died(death: Any, why: str = "") -> WorkerDied:
    return WorkerDied(
        f"{death.describe()}{why}; the runner is closed",
        worker_id=death.worker_id,
        pid=death.pid,
        exitcode=death.exitcode,
    )
