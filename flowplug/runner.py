"""The Runner: runs a dataflow in parallel workers and delivers its datapoints.

It owns the semantics for every transport: starting workers, the reentrancy guard,
errors and deaths, timeouts, and cleanup (close, garbage collection, interpreter exit).
"""

from __future__ import annotations

import _thread
import copy
import difflib
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
from ._gates import Control, EpochEnd, replicate_shares
from ._passcheck import START as PASS_START
from ._sweep import new_run_id, sweep_stale
from .config import ARGUMENT
from .errors import (
    ConfigError,
    PluginError,
    ReplicateWarning,
    RunnerTimeout,
    ShardMismatch,
    StateError,
    UnknownLength,
    WorkerDied,
    WorkerError,
)
from .stats import HookTimer, Meter, RunnerStats
from .transport import EMPTY, Transport
from .worker_groups import OwnWorkersTransport, ProcessWorkers, ThreadWorkers, WorkerGroup
from .worker_loop import RemoteFailure, WorkerInfo

#: how long one blocking receive waits before the runner checks on its workers.
POLL_INTERVAL = 0.1

logger = logging.getLogger("flowplug")
#: the Runner's modes.
MODES = ("replicate", "shard")

_MISSING: Any = object()


#: every started run of this process; a forked child marks them as not its own.
_RUNS: weakref.WeakSet[_Run] = weakref.WeakSet()
#: how long close() waits for a consumer thread to come out of a receive (each lasts
#: POLL_INTERVAL by the transport contract; this only bounds a misbehaving transport).
CLOSE_WAITS_FOR_CONSUMER = 5.0


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
            if isinstance(self.workers, ThreadWorkers):
                self.workers.request_stop()
            else:
                self.workers.stop()

    def shutdown(self) -> None:
        """Stop the workers and close the transport; from close(), gc or atexit.

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
        if isinstance(workers, ThreadWorkers):
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
        counted across the workers (each has a share; see docs/configuration.md).
    :param start_method: ``"fork"`` (default on Linux), ``"spawn"`` or ``"forkserver"``;
        only for transports whose workers are processes.
    :param timeout: seconds to wait for one datapoint before raising
        :class:`~flowplug.RunnerTimeout`; None waits forever (deaths are still noticed).
    :param seed: base of the per-worker seeds; random when None.
    :param mode: ``"replicate"`` or ``"shard"``, as above; None (not given) is
        ``"replicate"``.
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
        mode: str | None = None,
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
        self.mode = mode = "replicate" if mode is None else mode
        self.ordered = ordered
        _check_mode(mode, ordered, self.num_workers, self.capacity)
        # Shard mode: the consumer's epoch, and what arrived ahead of it (per epoch: the
        # items by index, the workers that ended it).
        self._epoch_no = -1
        self._ahead: dict[int, dict[int, Any]] = {}
        self._ended: dict[int, set[int]] = {}
        #: the epoch and what the consumer received of it (state_dict(), load_state_dict()).
        self._progress = _resume.Progress("shard")
        # Shard mode without df.shard(): the passes are checked (flowplug._passcheck); the
        # length and digest each worker reported for its whole pass, per epoch.
        self._checked = False
        self._pass_ends: dict[int, dict[int, tuple[int, int]]] = {}
        self._df_name = type(df).__name__
        #: what stats() reports; the loops add to ``delivered`` and ``waited``.
        self._meter = Meter()
        self._hook_timer: HookTimer | None = None
        self._reported_stop = False

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
        dfs = self._dataflows()
        if self._factory:
            self._size = _length(dfs[0])
            self._df_name = type(dfs[0]).__name__
        self._checked = (
            self.mode == "shard"
            and self.num_workers > 1
            and not callable(getattr(dfs[0], "shard", None))
        )
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
        plan = self._progress.plan() if self.mode == "shard" else None
        if plan is not None:  # a resumed runner: its workers get the plan with their dataflow
            dfs = [_resume.Resumed(df, plan) for df in dfs]
        n = self.num_workers
        infos = [WorkerInfo(i, n, (self.seed + i) % 2**31) for i in range(n)]
        # Before anything is opened: running out of fds half-way fails in the worst places.
        _fds.check(self._transport_cls, n, self.mode, self.start_method)
        if self._transport_cls.uses_shared_memory:
            sweep_stale()  # what consumers killed by SIGKILL left behind
        transport = self._transport_cls(
            capacity=self.capacity,
            num_workers=n,
            run_id=new_run_id(),
            start_method=self.start_method,
            **self._options,
        )
        endpoint = transport.open()
        control = None
        try:
            workers: WorkerGroup
            if isinstance(transport, OwnWorkersTransport):
                workers = transport.make_workers(dfs, endpoint, infos)
                control = self._group_control(workers)
            else:
                control = self._control(transport)
                gates = control.gates if control is not None else None
                if self._transport_cls.crosses_processes:
                    assert self.start_method is not None
                    workers = ProcessWorkers(dfs, endpoint, infos, self.start_method, gates)
                else:
                    workers = ThreadWorkers(dfs, endpoint, infos, gates)
            run = _Run(transport, workers, control)
            self._finalizer = weakref.finalize(self, run.shutdown)
            workers.start()
            self._meter.start(control.counters if control is not None else None)
        except BaseException:
            if self._finalizer is not None:
                self._finalizer()
            else:
                transport.close()
                if control is not None:
                    control.close()
            self._closed = True
            raise
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
        if self.mode != "shard":
            raise _resume.refuse_replicate()
        return _resume_shard_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (made by :meth:`state_dict`): call it on a new runner
        built the same way, before it starts. ``num_workers`` may differ, unless each
        worker's shard has a state of its own.

        :raises flowplug.StateError: the runner already started, or replicate mode.
        :raises flowplug.ConfigError: the state does not fit this runner.
        """
        if self.mode != "shard":
            raise _resume.refuse_replicate()
        if self._run is not None or self._closed:
            raise _resume.refuse_started(type(self).__name__)
        self._progress.load(state, self.num_workers)
        if self._progress.seed is not None:
            # The run's seed: the passes of a dataflow without shard() are seeded from it
            # and the absolute epoch, so the resumed passes are the saved run's passes.
            self.seed = self._progress.seed

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
        return self._shard_epoch() if self.mode == "shard" else self._epoch()

    def _epoch(self) -> Iterator[Any]:
        run = self._run
        assert run is not None
        if run.control is not None:
            return self._credited_epoch()
        return self._plain_epoch()

    def _credited_epoch(self) -> Iterator[Any]:
        """Replicate mode over workers the Runner started: each datapoint comes as
        ``(worker id, datapoint)`` and gives its worker a credit back when it is yielded
        (flowplug._gates.ReplicateGate), so that at most ``capacity`` datapoints are made
        and not yet yielded, across the workers."""
        run = self._run
        assert run is not None and run.control is not None
        control = run.control
        release = control.release
        # Credits go back a chunk at a time (flowplug._gates.Control.chunks), and all that
        # are held before the consumer waits: the held ones survive across epochs.
        chunks = control.chunks
        pending = control.pending
        recv = run.transport.recv
        workers = run.workers
        size = self._size
        meter = self._meter
        count = 0
        me = threading.get_ident  # called per receive: a generator may move between threads
        while size is None or count < size:
            run.inside = me()  # see _Run: close() from another thread waits for this
            try:
                if run.closing is not None:
                    raise run.refusal()
                obj = recv(0.0)
            finally:
                run.inside = 0
            if type(obj) is not tuple or workers.death is not None:
                if obj is EMPTY:  # about to wait: give back every credit held first
                    for w, held in enumerate(pending):
                        for _ in range(held):
                            release[w]()
                        pending[w] = 0
                obj = self._next_slow(obj)
            w = obj[0]
            held = pending[w] + 1
            if held == chunks[w]:
                give = release[w]
                for _ in range(held):
                    give()
                held = 0
            pending[w] = held
            count += 1
            meter.delivered += 1
            yield obj[1]

    def _plain_epoch(self) -> Iterator[Any]:
        """Replicate mode over a group the transport runs: no credits (its own bound)."""
        run = self._run
        assert run is not None
        recv = run.transport.recv
        workers = run.workers
        size = self._size
        meter = self._meter
        count = 0
        me = threading.get_ident  # called per receive: a generator may move between threads
        while size is None or count < size:
            run.inside = me()  # see _Run: close() from another thread waits for this
            try:
                if run.closing is not None:
                    raise run.refusal()
                obj = recv(0.0)
            finally:
                run.inside = 0
            if obj is EMPTY or type(obj) is RemoteFailure or workers.death is not None:
                obj = self._next_slow(obj)
            count += 1
            meter.delivered += 1
            yield obj

    def _shard_epoch(self) -> Iterator[Any]:
        """One epoch of shard mode: every item of one pass of ``df`` exactly once."""
        run = self._run
        assert run is not None and run.control is not None
        control = run.control
        k = self._epoch_no = self._epoch_no + 1
        control.start_epoch(k)  # workers may now run epoch k + 1, and must leave k - 1
        progress = self._progress
        skip = progress.begin(k)  # after a resume: what the saved run had received
        n = self.num_workers
        release = control.release
        for old in [e for e in self._ahead if e < k]:  # an epoch the user broke out of
            for index in self._ahead.pop(old):
                release[index % n]()
        for old in [e for e in self._ended if e < k]:
            del self._ended[old]
        for old in [e for e in self._pass_ends if e < k]:
            del self._pass_ends[old]
        # Kept on self, not popped: items left here when the user breaks out are released
        # when the next epoch starts, so no credit is ever lost.
        buf = self._ahead.setdefault(k, {})
        ended = self._ended.setdefault(k, set())
        recv = run.transport.recv
        workers = run.workers
        me = threading.get_ident  # called per receive: a generator may move between threads
        meter = self._meter
        if self._checked:
            yield from self._checked_epoch(k, buf, ended, skip)
        elif not self.ordered:
            got = progress.got.add
            while len(ended) < n:
                if buf:  # arrived ahead, or while state_dict() waited
                    index, dp = buf.popitem()
                    release[index % n]()
                    got(index)
                    meter.delivered += 1
                    yield dp
                    continue
                run.inside = me()  # see _Run
                try:
                    if run.closing is not None:
                        raise run.refusal()
                    obj = recv(0.0)
                finally:
                    run.inside = 0
                if type(obj) is not tuple or obj[0] != k or workers.death is not None:
                    obj = self._next_slow(obj)
                    if not self._file(obj, k):
                        continue
                release[obj[1] % n]()
                got(obj[1])
                meter.delivered += 1
                yield obj[2]
        else:
            nxt = 0  # the index to yield next
            while True:
                dp = buf.pop(nxt, _MISSING)
                if dp is _MISSING:
                    if skip is not None and nxt in skip:  # received before the resume
                        nxt += 1
                        continue
                    if nxt % n in ended:  # its worker has no item at nxt: a short shard
                        if len(ended) == n:
                            if not buf:
                                break
                            nxt = min(buf)
                        else:
                            nxt += 1
                        continue
                    run.inside = me()  # see _Run
                    try:
                        if run.closing is not None:
                            raise run.refusal()
                        obj = recv(0.0)
                    finally:
                        run.inside = 0
                    if type(obj) is not tuple or obj[0] != k or workers.death is not None:
                        obj = self._next_slow(obj)
                        if not self._file(obj, k):
                            continue
                    if obj[1] != nxt:
                        buf[obj[1]] = obj[2]
                        continue
                    dp = obj[2]
                release[nxt % n]()
                nxt += 1
                progress.nxt = nxt
                meter.delivered += 1
                yield dp
        del self._ahead[k], self._ended[k]

    def _checked_epoch(
        self, k: int, buf: dict[int, Any], ended: set[int], skip: Any
    ) -> Iterator[Any]:
        """Epoch ``k`` of shard mode without ``shard()``: every worker reads the whole pass
        and keeps its items. Each item carries the pass's digest before and after it, as
        its worker computed it (flowplug._passcheck): item ``i`` is yielded only once its
        "before" equals item ``i - 1``'s "after", so workers whose passes differ are an
        error, before any duplicate is delivered. In order, whatever ``ordered`` says.
        """
        run = self._run
        assert run is not None and run.control is not None
        release = run.control.release
        recv = run.transport.recv
        workers = run.workers
        n = self.num_workers
        progress = self._progress
        meter = self._meter
        got = None if self.ordered else progress.got.add  # what state_dict() reads
        nxt = 0
        last: int | None = PASS_START  # the digest after item nxt - 1; None: not known
        while True:
            item = buf.pop(nxt, _MISSING)
            if item is _MISSING:
                if skip is not None and nxt in skip:  # received before a resume: not sent
                    nxt += 1
                    last = None  # the pair across the gap cannot be compared
                    continue
                if nxt % n in ended:  # the pass of nxt's worker ended before nxt
                    break
                obj = recv(POLL_INTERVAL)
                if type(obj) is not tuple or obj[0] != k or workers.death is not None:
                    obj = self._next_slow(obj)
                    if not self._file(obj, k):
                        continue
                if obj[1] != nxt:
                    buf[obj[1]] = obj[2:]
                    continue
                item = obj[2:]
            dp, before, after = item
            if before != last and last is not None:
                raise self._fail(self._passes_differ(k, nxt))
            last = after
            release[nxt % n]()
            if got is not None:
                got(nxt)
            nxt += 1
            progress.nxt = nxt
            meter.delivered += 1
            yield dp
        while len(ended) < n:  # every pass must have ended here, with the same digest
            obj = self._next_slow(recv(POLL_INTERVAL))
            if self._file(obj, k):
                buf[obj[1]] = obj[2:]
        ends = self._pass_ends.pop(k, {})
        if buf or len(set(ends.values())) > 1:
            counts = ", ".join(f"worker {w}: {c}" for w, (c, _) in sorted(ends.items()))
            raise self._fail(self._passes_differ(k, nxt, f"passes of {counts} items"))

    def _passes_differ(self, k: int, index: int, detail: str = "") -> ShardMismatch:
        n = self.num_workers
        name = self._df_name
        where = detail or (
            f"worker {index % n}'s pass and worker {(index - 1) % n}'s differ at or before "
            f"item {index}"
        )
        return ShardMismatch(
            f"shard mode: the workers read different passes of {name} in epoch {k} "
            f"({where}). Without a shard() method each of the {n} workers reads the whole "
            f"pass and keeps item i when i % {n} is its number, which is exactly once only "
            "if every pass yields the same items in the same order; flowplug seeds random, "
            "numpy.random and the 'rng' attributes alike in every worker, and "
            f"{name} still differs (another random source, or data that changes?). The "
            "runner is closed, and no item was delivered twice. Fix: give "
            f"{name} a shard(index, count) method (fp.DataFromList has one), or draw its "
            "randomness from those generators, or read it once in the consumer with "
            "fp.ParallelMap(df, fn), or use mode='replicate' where duplicates are fine. "
            "See docs/sharding.md."
        )

    def _file(self, obj: Any, k: int) -> bool:
        """Put away a message that is not an item of epoch ``k``; true if it is one after all."""
        if type(obj) is tuple:
            epoch, index = obj[0], obj[1]
            if epoch == k:
                return True
            if epoch > k:  # a worker prefetching the next epoch
                self._ahead.setdefault(epoch, {})[index] = obj[2] if len(obj) == 3 else obj[2:]
            else:  # left over from an epoch the user broke out of
                run = self._run
                assert run is not None and run.control is not None
                run.control.release[index % self.num_workers]()
            return False
        if type(obj) is EpochEnd:
            if obj.epoch >= k:
                self._ended.setdefault(obj.epoch, set()).add(obj.worker_id)
                if obj.count >= 0:
                    self._pass_ends.setdefault(obj.epoch, {})[obj.worker_id] = (
                        obj.count,
                        obj.digest,
                    )
            return False
        if type(obj) is _resume.PassStart:
            if obj.epoch >= k:
                self._progress.passed(obj)
            return False
        raise StateError(
            f"a worker sent a {type(obj).__name__} where shard mode expects items; "
            "is a dataflow sending to the transport itself?"
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
                    threads = isinstance(run.workers, ThreadWorkers)
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

    def _control(self, transport: Transport) -> Control | None:
        """The consumer-to-worker control of this mode: credits in replicate mode, and
        epoch notices too in shard mode."""
        if self.mode != "shard":
            n = self.num_workers
            return Control(n, self.start_method, shares=replicate_shares(self.capacity, n))
        return Control(
            self.num_workers, self.start_method, credits=self.capacity // self.num_workers
        )

    def _group_control(self, workers: WorkerGroup) -> Control | None:
        """The control of this mode over a group the transport runs; None in replicate mode."""
        if self.mode == "replicate":
            return None
        sinks = None
        if self.mode == "shard":
            sinks = workers.control_sinks(self.capacity // self.num_workers)
        if sinks is None:
            what, instead = ("mode='shard'", "mode='replicate', or ")
            if self.mode != "shard":
                what, instead = "ParallelMap", ""
            raise ConfigError(
                f"transport {self.transport_name!r} runs its own workers, and its worker group "
                f"({type(workers).__name__}) cannot carry the per-worker control that {what} "
                f"needs (WorkerGroup.control_sinks); use {instead}a transport whose workers "
                "the runner starts"
            )
        if len(sinks) != self.num_workers:
            raise PluginError(
                f"{type(workers).__name__}.control_sinks() of transport "
                f"{self.transport_name!r} returned {len(sinks)} sinks for {self.num_workers} "
                "workers, where it must return one per worker; report it to the plugin's authors"
            )
        return Control(self.num_workers, None, sinks=sinks)

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


def _check_mode(mode: str, ordered: bool, num_workers: int, capacity: int) -> None:
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        raise ConfigError(
            f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}"
            + (f". Did you mean {close[0]!r}?" if close else "")
        )
    if ordered and mode != "shard":
        raise ConfigError(
            "ordered=True needs mode='shard': replicated workers each run the whole "
            "dataflow, so there is no single order to keep"
        )
    if mode == "shard" and capacity < num_workers:
        raise ConfigError(
            f"mode='shard' needs capacity >= num_workers (every worker holds at least one "
            f"item in flight), got capacity={capacity} for num_workers={num_workers}; "
            "raise capacity or lower num_workers"
        )


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
    return _exc.combine(
        original,
        f"worker {failure.worker_id} raised {failure.exc_type} {where}{passed}: "
        f"{failure.message}\n\nRemote traceback:\n{failure.traceback}",
        worker_id=failure.worker_id,
        exc_type=failure.exc_type,
        remote_traceback=failure.traceback,
        index=failure.index,
        remote_message=failure.message,
        origin=f"worker {failure.worker_id} {where}{passed}",
    )


def _worker_died(death: Any) -> WorkerDied:
    return WorkerDied(
        f"{death.describe()}; the runner is closed",
        worker_id=death.worker_id,
        pid=death.pid,
        exitcode=death.exitcode,
    )


def _resume_shard_state(runner: Runner) -> dict[str, Any]:
    """The state of a runner in shard mode (see :meth:`Runner.state_dict`).

    Mid-epoch (an iteration is suspended) it is that epoch; otherwise the next one. The
    dataflow states are those the workers reported at the start of that epoch's pass;
    when some have not arrived yet, this receives until they have, keeping the items for
    the epoch's iteration.
    """
    progress = runner._progress
    k = runner._epoch_no
    mid = runner._guard.locked()
    if not mid:
        k += 1  # the epoch the next iteration runs
    received = (
        progress.received(k, runner.ordered)
        if mid
        else (progress.skip if k == 0 and progress.skip is not None else _resume.Done())
    )
    n = runner.num_workers
    run = runner._run
    if run is None:  # not started: what was loaded, or a fresh start
        states = progress.states if k == 0 else None
        return progress.to_dict(k, received, n, states, runner.seed)
    passes = progress.passes.setdefault(k, {})
    while len(passes) < n:
        if runner._closed:
            raise StateError(
                "this runner is closed before its workers reported where epoch "
                f"{progress.base + k} starts; take state_dict() before closing"
            )
        obj = runner._next_slow(run.recv(POLL_INTERVAL))
        if runner._file(obj, k):  # an item of epoch k: its iteration yields it from there
            runner._ahead.setdefault(k, {})[obj[1]] = obj[2] if len(obj) == 3 else obj[2:]
    states = [passes[w] for w in range(n)]
    states_ = None if all(s is None for s in states) else states
    return progress.to_dict(k, received, n, states_, runner.seed)


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
