"""The Runner: runs a dataflow in parallel workers and delivers its datapoints.

It holds the configuration and owns the lifecycle for every transport: starting workers,
the reentrancy guard, errors and deaths, timeouts, and cleanup (close, garbage
collection, interpreter exit). What one epoch yields is its mode's (:mod:`flowplug.modes`).
"""

from __future__ import annotations

import _thread
import copy
import functools
import logging
import os
import secrets
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Generator, Iterator
from typing import Any

from . import _exc, _fds, _resume, plugins
from ._gates import Control
from ._sweep import new_run_id, sweep_stale
from .config import ARGUMENT, DEFAULT
from .errors import (
    ConfigError,
    ReplicateWarning,
    RunnerTimeout,
    StateError,
    UnknownLength,
    WorkerDied,
    WorkerError,
)
from .modes import MODES, POLL_INTERVAL, Feed, Mode, make_mode
from .stats import HookTimer, Meter, RunnerStats
from .transport import EMPTY, Transport
from .worker_groups import OwnWorkersTransport, ProcessWorkers, ThreadWorkers, WorkerGroup
from .worker_loop import RemoteFailure, WorkerInfo

__all__ = ["MODES", "POLL_INTERVAL", "Runner"]

logger = logging.getLogger("flowplug")


#: every started run of this process; a forked child marks them as not its own.
_RUNS: weakref.WeakSet[_Run] = weakref.WeakSet()
#: how long close() waits for a consumer thread to come out of a receive (each lasts
#: POLL_INTERVAL by the transport contract; this only bounds a misbehaving transport).
CLOSE_WAITS_FOR_CONSUMER = 5.0
#: how long reset_state() waits for the workers to connect (Transport.await_connections);
#: after that (a spawned worker importing for long) the run goes on, and iterating waits.
CONNECTS_WITHIN = 60.0


class _Run:
    """What a started runner holds; kept apart from the Runner so gc can finalize it.

    Closing from any thread: the consumer thread marks itself :attr:`inside` (its thread
    id) around every call into the transport and checks :attr:`closing` before it;
    :meth:`shutdown` sets :attr:`closing` first and waits for the consumer to be out
    before it closes the transport. So a transport is never closed under a receive (a
    read of a closed, or reused, fd; a zmq socket used from two threads), and a consumer
    blocked in ``next()`` wakes within one receive with a StateError. Two plain
    attributes, no lock: the GIL orders them, and a lock per datapoint costs more.
    """

    def __init__(
        self,
        transport: Transport,
        workers: WorkerGroup,
        control: Control | None = None,
    ):
        self.transport = transport
        self.workers = workers
        self.control = control
        self.owner_pid = os.getpid()
        self.halted = False
        #: None while open; "closed", or "forked" in a child that inherited this run.
        self.closing: str | None = None
        #: the id of the consumer thread while it is inside the transport, else 0.
        self.inside = 0
        self._stop_lock = threading.Lock()
        _RUNS.add(self)

    def refusal(self) -> StateError:
        """The error for a consumer that finds this run closing."""
        if self.closing == "forked":
            return StateError(
                f"this runner was started by process {self.owner_pid}, and this process "
                f"({os.getpid()}) is a fork of it: its workers and transport are the "
                "parent's, and only the parent may use or close them. Create a new Runner "
                "in this process"
            )
        return StateError(
            "this runner was closed (by close() from another thread, or at exit) while "
            "it was being iterated; create a new Runner"
        )

    def recv(self, timeout: float) -> Any:
        """Receive, as the consumer thread; refused once closing (the slow paths)."""
        self.inside = threading.get_ident()
        try:
            if self.closing is not None:
                raise self.refusal()
            return self.transport.recv(timeout)
        finally:
            self.inside = 0

    def send_task(self, task: Any, timeout: float) -> bool:
        """Send a task, as the consumer thread; refused once closing."""
        self.inside = threading.get_ident()
        try:
            if self.closing is not None:
                raise self.refusal()
            return self.transport.send_task(task, timeout)  # type: ignore[attr-defined]
        finally:
            self.inside = 0

    def halt(self) -> None:
        """Stop the workers but keep the transport open, so that what they sent before
        can still be received. Thread workers are only asked to stop: they end at their
        next send once the transport is closed."""
        with self._stop_lock:
            if self.halted:
                return
            self.halted = True
            if self.workers.woken_by_transport_close:
                self.workers.request_stop()
            else:
                self.workers.stop()

    def shutdown(self) -> None:
        """The shutdown protocol, written once (docs/architecture.md): stop the workers,
        then close the transport, then the control; from close(), gc or atexit.

        In the main thread, a Ctrl-C that comes meanwhile is held back and delivered
        when this returns: raised inside cleanup that gc runs, a KeyboardInterrupt is
        only printed ("Exception ignored in ...") and the program would go on, with the
        cleanup half done.
        """
        if os.getpid() != self.owner_pid:
            return  # a forked child inherited this object; the workers are not its own
        if threading.current_thread() is not threading.main_thread():
            self._shutdown()  # Python raises KeyboardInterrupt in the main thread only
            return
        held: list[int] = []
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        except ValueError:  # signals are not ours to handle here (an embedded interpreter)
            self._shutdown()
            return
        try:
            self._shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)
            if held:
                _redeliver_sigint(previous)

    def _shutdown(self) -> None:
        if self.closing is None:
            self.closing = "closed"
        workers = self.workers
        if workers.woken_by_transport_close:
            workers.request_stop()
            self._wait_for_consumer()
            self.transport.close()  # wakes senders blocked on a full transport
            workers.stop()
        else:
            self.halt()
            self._wait_for_consumer()
            self.transport.close()
        if self.control is not None:
            self.control.close()

    def _wait_for_consumer(self) -> None:
        """Wait until no other thread is inside the transport (one receive at most)."""
        me = threading.get_ident()
        deadline = time.monotonic() + CLOSE_WAITS_FOR_CONSUMER
        while self.inside and self.inside != me and time.monotonic() < deadline:
            time.sleep(0.002)


#: how long after a cleanup a Ctrl-C held back during it is delivered.
REDELIVER_AFTER = 0.02


def _redeliver_sigint(handler: Any) -> None:
    """Deliver a Ctrl-C held back during cleanup to ``handler``, in the program's code.

    Not from here: an interrupt raised in this frame would be lost again when gc runs
    the cleanup. A short timer thread sends it, so that it lands after this returns
    (Python runs signal handlers in the main thread, at its next check).
    """
    if callable(handler):
        deliver: Any = _thread.interrupt_main
    elif handler == signal.SIG_DFL:
        deliver = functools.partial(os.kill, os.getpid())  # the default action: exit
    else:
        return  # SIG_IGN, or a handler not set from Python: nothing to deliver
    timer = threading.Timer(REDELIVER_AFTER, deliver, (signal.SIGINT,))
    timer.name = "flowplug-ctrl-c"
    timer.daemon = True
    try:
        timer.start()
    except RuntimeError:
        pass  # the interpreter is shutting down: the program is ending anyway


def _after_fork_in_child() -> None:
    """A fork of the consumer (os.fork, a multiprocessing pool, a worker of ours) holds
    copies of every run: mark them as not its own, so that using one is a StateError and
    closing one (explicitly, by gc or at exit) touches nothing of the parent's."""
    for run in list(_RUNS):
        run.closing = "forked"
        run.inside = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


class Runner:
    """Run ``df`` in ``num_workers`` workers and iterate over what they produce.

    ``mode="replicate"`` (the default): every worker runs its own copy of ``df`` and
    repeats it forever; with ``num_workers=1`` the order of ``df`` is preserved. When
    ``len(df)`` is known, one iteration (an epoch) yields ``len(df)`` datapoints;
    otherwise it never ends. With several workers and a known ``len(df)``, a runner whose
    mode was not given warns once (:class:`~flowplug.ReplicateWarning`) that the
    workers' copies mix: such an "epoch" repeats some items and misses others.

    ``mode="shard"``: one iteration (an epoch) yields every item of one pass of ``df``
    exactly once, split over the workers (item ``i`` goes to worker ``i % num_workers``,
    or ``df.shard(worker, num_workers)`` picks a worker's items), then stops; iterating
    again runs the next epoch on the same workers, which prefetch it without mixing
    epochs. With ``ordered=True`` the items come in the order of ``df``. See
    docs/sharding.md.

    Arguments left as None come from the environment (``FLOWPLUG_NUM_WORKERS``...), then
    ``./flowplug.toml``, then ``[tool.flowplug]`` in ``./pyproject.toml``, then defaults.

    Example::

        with fp.Runner(fp.DataFromList(items), mode="shard", num_workers=2) as runner:
            for dp in runner:
                ...

    :param df: a dataflow (anything with ``__iter__`` and ``reset_state()``), or a
        zero-argument factory returning one, called once per worker in the consumer.
    :param transport: name of the transport (``"zmq"``, ``"queue"``, ``"thread"``...).
    :param num_workers: how many workers.
    :param capacity: how many datapoints may be made by the workers and not yet delivered,
        counted across the workers (each has a share; see docs/configuration.md). Left
        unset, replicate mode sizes it by the datapoints (50 to 1024, by a byte budget).
    :param start_method: ``"fork"`` (default on Linux), ``"spawn"`` or ``"forkserver"``;
        only for transports whose workers are processes.
    :param timeout: seconds to wait for one datapoint before raising
        :class:`~flowplug.RunnerTimeout`; None waits forever (deaths are still noticed).
    :param seed: base of the per-worker seeds; random when None.
    :param mode: ``"replicate"`` or ``"shard"``, as above; None (not given) is
        ``"replicate"``. Or a :class:`~flowplug.modes.Mode` object, the extension point
        for other kinds of passes (:class:`~flowplug.ParallelMap`).
    :param ordered: shard mode only: deliver in the order of ``df``, buffering at most
        ``capacity`` items; otherwise items come as they arrive.
    :param config: a config file to read instead of ``./flowplug.toml`` and
        ``./pyproject.toml`` (see :func:`flowplug.load_config`).
    :param options: the transport's own options (see ``flowplug transports``).
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
        mode: str | Mode | None = None,
        ordered: bool = False,
        *,
        config: str | os.PathLike[str] | None = None,
        **options: Any,
    ):
        settings = plugins.load_config(
            config,
            transport=transport,
            num_workers=num_workers,
            capacity=capacity,
            start_method=start_method,
            timeout=timeout,
        )
        cls = plugins.get_transport(settings.transport)
        start_method = settings.start_method
        forks = cls.crosses_processes and not cls.runs_workers
        if not forks and start_method is not None:
            if settings.source("start_method") == ARGUMENT:
                why = "it starts its own workers" if cls.runs_workers else "its workers are threads"
                raise ConfigError(
                    f"start_method={start_method!r} has no meaning for transport "
                    f"{cls.name!r}: {why}. Drop start_method, or choose a transport whose "
                    "workers the runner forks"
                )
            start_method = None  # a default from the environment or a file: forked workers only
        self.transport_name = cls.name
        self.num_workers = settings.num_workers
        self.capacity = settings.capacity
        self.start_method = start_method or ("fork" if forks else None)
        self.timeout = settings.timeout
        self.seed = secrets.randbits(31) if seed is None else seed
        self._transport_cls = cls
        self._options = settings.options_for(cls, options)
        self._df = df
        self._factory = _as_factory(df)
        self._size: int | None = None if self._factory else _length(df)
        self._guard = threading.Lock()
        self._run: _Run | None = None
        self._closed = False
        self._failure: BaseException | None = None
        #: after a death: how many more objects to take from the transport (None: all).
        self._drain_left: int | None = None
        self._finalizer: weakref.finalize | None = None
        #: the mode was left to its default: a replicate runner then warns (see above).
        self._mode_given = mode is not None
        mode = "replicate" if mode is None else mode
        #: what one epoch means, and the state that spans epochs.
        auto = settings.source("capacity") == DEFAULT  # replicate mode sizes its credits
        self._mode = mode if isinstance(mode, Mode) else make_mode(mode, ordered, auto)
        self._mode.check(self.num_workers, self.capacity)
        self.ordered = ordered
        #: what stats() reports; the loops add to ``delivered`` and ``waited``.
        self._meter = Meter()
        self._hook_timer: HookTimer | None = None
        self._reported_stop = False

    @property
    def mode(self) -> str:
        """The mode's name: ``"replicate"``, ``"shard"`` (or ``"map"`` for a ParallelMap)."""
        return self._mode.name

    @classmethod
    def from_config(
        cls, df: Any, path: str | os.PathLike[str] | None = None, **overrides: Any
    ) -> Runner:
        """Build a runner from a config file (default: ``./flowplug.toml``, then
        ``[tool.flowplug]`` in ``./pyproject.toml``); ``overrides`` are Runner arguments
        and transport options that take precedence over every source.
        """
        return cls(df, config=path, **overrides)

    # ------------------------------------------------------------------ lifecycle

    def reset_state(self) -> None:
        """Start the workers (the fork happens here). Call once.

        :raises flowplug.StateError: called twice, or after ``close()``.
        :raises flowplug.ConfigError: the run would need more file descriptors than
            ``RLIMIT_NOFILE`` leaves (checked before anything is opened).
        """
        if self._closed:
            raise StateError("this runner is closed; create a new Runner")
        if self._run is not None:
            raise StateError("reset_state() was called twice; a runner starts once")
        dfs = self._mode.dataflows(self.num_workers)
        if dfs is None:
            dfs = self._dataflows()
            if self._factory:
                self._size = _length(dfs[0])
        replicate = self.mode == "replicate" and not self._mode_given
        if replicate and self.num_workers > 1 and self._size is not None:
            warnings.warn(
                f"Runner(num_workers={self.num_workers}) over a dataflow of {self._size} "
                "items replicates it: every worker yields its own copy, so an epoch of "
                f"{self._size} datapoints repeats some items and misses others. For every "
                "item once per epoch pass mode='shard'; for independent streams (infinite or "
                "randomised dataflows, tensorpack's semantics) pass mode='replicate'",
                ReplicateWarning,
                stacklevel=3,
            )
        dfs = self._mode.prepare(dfs)
        n = self.num_workers
        infos = [WorkerInfo(i, n, (self.seed + i) % 2**31) for i in range(n)]
        # Before anything is opened: running out of fds half-way fails in the worst places.
        _fds.check(self._transport_cls, n, self.mode, self.start_method)
        if self._transport_cls.uses_shared_memory:
            sweep_stale()  # what consumers killed by SIGKILL left behind
        transport = self._transport_cls(
            capacity=self.capacity,
            max_in_flight=self._mode.max_in_flight(self.capacity),
            num_workers=n,
            run_id=new_run_id(),
            start_method=self.start_method,
            **self._options,
        )
        try:
            endpoint = transport.open()
        except Exception as exc:
            fds = _fds.out_of_fds(exc)
            if fds is None:
                raise
            raise fds from exc
        control = None
        mode = self._mode
        try:
            workers: WorkerGroup
            if isinstance(transport, OwnWorkersTransport):
                workers = transport.make_workers(dfs, endpoint, infos)
                control = mode.group_control(workers, n, self.capacity, self.transport_name)
            else:
                control = mode.control(n, self.start_method, self.capacity, transport)
                gates = control.gates if control is not None else None
                if self._transport_cls.crosses_processes:
                    assert self.start_method is not None
                    workers = ProcessWorkers(dfs, endpoint, infos, self.start_method, gates)
                else:
                    workers = ThreadWorkers(dfs, endpoint, infos, gates)
            run = _Run(transport, workers, control)
            self._finalizer = weakref.finalize(self, run.shutdown)
            workers.start()
            # Before the program goes on: the transport's accepts take the fds counted
            # by the check above, not whatever the program opens next.
            patience = time.monotonic() + min(CONNECTS_WITHIN, self.timeout or CONNECTS_WITHIN)
            transport.await_connections(
                lambda: workers.death is None and time.monotonic() < patience
            )
            self._meter.start(control.counters if control is not None else None)
        except BaseException as exc:
            if self._finalizer is not None:
                self._finalizer()
            else:
                transport.close()
                if control is not None:
                    control.close()
            self._closed = True
            fds = _fds.out_of_fds(exc)
            if fds is None:
                raise
            raise fds from exc
        self._run = run
        logger.info(
            "%s started: transport %r, %d worker(s), mode %r, capacity %d",
            type(self).__name__,
            self.transport_name,
            n,
            self.mode,
            self.capacity,
        )
        if _stats_hook().get_hookimpls():
            self._hook_timer = HookTimer(_reporter(self))

    def stats(self) -> RunnerStats:
        """The numbers of this run so far: delivered, rates, who waits on whom.

        Cheap to call (no datapoint is touched); see docs/bottleneck.md. ``.verdict``
        says whether the consumer waits on the workers (input-bound) or the other way.
        """
        run = self._run
        counters = run.transport.counters() if run is not None else {}
        return self._meter.snapshot(self.transport_name, self.mode, counters)

    def close(self) -> None:
        """Stop every worker and release the transport. Idempotent."""
        self._closed = True
        final = None
        if self._run is not None and not self._reported_stop:
            self._reported_stop = True
            if self._hook_timer is not None:
                self._hook_timer.stop()
            final = self.stats()  # before the transport goes: its counters too
        if self._finalizer is not None:
            self._finalizer()
        if final is not None:
            logger.info("%s stopped: %s", type(self).__name__, final.summary())
            if self._hook_timer is not None:
                _stats_hook()(runner=self, stats=final)

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

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: the epoch, the items of it received, the dataflow's state.

        Call it between two ``next()`` calls (or between epochs). The dict is small (no
        datapoints), picklable and JSON-serializable (if the dataflow's own
        ``state_dict()`` is). A new runner built the same way, given it with
        :meth:`load_state_dict`, delivers the rest of that epoch, then the next ones.
        ``state["epoch"]`` is the epoch to resume at. See docs/checkpoint.md.

        :raises flowplug.StateError: in replicate mode, which has no position to save.
        """
        if not self._mode.resumable:
            raise _resume.refuse_replicate()
        feed = self._feed() if self._run is not None else None
        return self._mode.state_dict(
            self.num_workers, feed, self._guard.locked(), lambda: self._closed, self.seed
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (made by :meth:`state_dict`): call it on a new runner
        built the same way, before it starts. ``num_workers`` may differ, unless each
        worker's shard has a state of its own.

        :raises flowplug.StateError: the runner already started, or replicate mode.
        :raises flowplug.ConfigError: the state does not fit this runner.
        """
        if not self._mode.resumable:
            raise _resume.refuse_replicate()
        if self._run is not None or self._closed:
            raise _resume.refuse_started(type(self).__name__)
        seed = self._mode.load_state_dict(state, self.num_workers)
        if seed is not None:  # the saved run's passes were seeded from it (ShardMode)
            self.seed = seed

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Generator[Any, None, None]:  # a generator: callers may close() it
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
            yield from self._iterate()
        finally:
            self._guard.release()

    def _iterate(self) -> Iterator[Any]:
        return self._mode.epoch(self._feed())

    def _feed(self) -> Feed:
        """What the mode reads an epoch from: this started run."""
        run = self._run
        assert run is not None
        return Feed(
            run,
            self.num_workers,
            self.capacity,
            self._size,
            self.timeout,
            self.transport_name,
            self._next_slow,
            self._meter,
            self._fail,
        )

    def _next_slow(self, obj: Any) -> Any:
        """Handle everything that is not a plain datapoint; return the next datapoint.

        A worker that ended (a :class:`Death`) is reported only once what the workers
        sent before is delivered: the workers are stopped first, so that this is finite,
        and an error report found on the way wins over the death it explains.
        """
        run = self._run
        assert run is not None
        started = time.monotonic()
        waits = obj is EMPTY  # the loops try without waiting: a wait is timed here
        while True:
            if type(obj) is RemoteFailure:
                logger.error("worker %d failed (%s); closing", obj.worker_id, obj.exc_type)
                raise self._fail(_worker_error(obj))
            death = run.workers.death
            if death is not None:
                if not run.halted:
                    logger.error("%s; closing", death.describe())
                    run.halt()
                    # Threads keep sending until the transport closes: take at most what
                    # the transport held when the death was noticed (FIFO), no more.
                    threads = run.workers.woken_by_transport_close
                    self._drain_left = self.capacity + self.num_workers if threads else None
                if obj is EMPTY and self._drain_left != 0:
                    obj = run.recv(POLL_INTERVAL)
                    if obj is not EMPTY:
                        continue  # an error report on the way wins over the death
                if obj is EMPTY or self._drain_left == 0:
                    if death.failure is not None:
                        raise self._fail(_worker_error(death.failure))
                    raise self._fail(_worker_died(death))
                if self._drain_left is not None:
                    self._drain_left -= 1
                return obj
            if obj is not EMPTY:
                if waits:
                    meter = self._meter
                    if meter.delivered:
                        meter.waited += time.monotonic() - started
                    else:  # the workers' start: not a sign of who is slower
                        meter.startup += time.monotonic() - started
                return obj
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise RunnerTimeout(
                    f"no datapoint arrived in {self.timeout:g} s from "
                    f"{self.num_workers} worker(s) on transport {self.transport_name!r}; "
                    "raise timeout= or check the dataflow"
                )
            obj = run.recv(POLL_INTERVAL)

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
    """The exception the consumer raises for a worker's report: a ``WorkerError`` that is
    also of the original type where that type allows it (see flowplug._exc)."""
    if failure.phase == "map":
        where = f"in fn on input {failure.index}"
    elif failure.phase == "reset_state":
        where = "in reset_state()"
    elif failure.phase == "start":
        where = "while starting (before it could run the dataflow)"
    elif failure.phase == "connect":
        where = "while connecting to the transport"
    else:
        where = "while iterating"
    # passed on from a runner inside the worker: say from where, once
    passed = f", passed on from its own {failure.origin}" if failure.origin else ""
    original = failure.original
    if original is not None and original.__traceback__ is not None:
        original.__traceback__ = None  # a live exception of a worker thread: drop its frames
    plain = WorkerError(
        f"worker {failure.worker_id} raised {failure.exc_type} {where}{passed}: "
        f"{failure.message}\n\nRemote traceback:\n{failure.traceback}",
        worker_id=failure.worker_id,
        exc_type=failure.exc_type,
        remote_traceback=failure.traceback,
        index=failure.index,
        original=original,
        remote_message=failure.message,
        origin=f"worker {failure.worker_id} {where}{passed}",
    )
    return _exc.combine(original, plain)


def _worker_died(death: Any) -> WorkerDied:
    return WorkerDied(
        f"{death.describe()}; the runner is closed",
        worker_id=death.worker_id,
        pid=death.pid,
        exitcode=death.exitcode,
    )


def _stats_hook() -> Any:
    return plugins.get_registry().pm.hook.flowplug_runner_stats


def _reporter(runner: Runner) -> Any:
    """What the hook timer calls; holds the runner weakly, so it can still be collected."""
    ref = weakref.ref(runner)

    def report() -> None:
        r = ref()
        if r is None or r._closed:
            return
        try:
            _stats_hook()(runner=r, stats=r.stats())
        except Exception:
            logger.exception("a flowplug_runner_stats hook raised; the runner goes on")

    return report
