"""The consumer's side of workers: groups that start them, notice deaths, stop them.

The Runner starts a :class:`ProcessWorkers` (forked processes) or a :class:`ThreadWorkers`
group; a transport that runs its workers elsewhere (Ray actors) returns a
:class:`WorkerGroup` of its own from :meth:`OwnWorkersTransport.make_workers`. Either way the
Runner starts, watches and stops the group the same way, and a worker that ends on its own
is a :class:`Death` in ``group.death``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, ClassVar

from ._fds import STARTING, ensure_room
from ._gates import Control, ControlSink
from .errors import StateError
from .transport import Connect, Transport
from .worker_loop import RemoteFailure, WorkerInfo, process_main, run_worker

#: held while a worker process starts, by every runner of this process. Between making
#: a worker's pipes and closing the parent's copies of the worker's ends, a fork by
#: another thread (another runner starting) would give that process copies of them:
#: the worker's death would then never close its sentinel (the consumer hung on a dead
#: worker) while the other process lives.
_STARTING = threading.Lock()
#: how long the death watcher waits for a dead worker's exit status to be recorded (see
#: :meth:`ProcessWorkers._exit_status`); it takes microseconds unless other code reaped it.
EXIT_STATUS_WITHIN = 10.0
#: what a death says when its exit status is gone.
_STATUS_TAKEN = (
    "other code of this process collected the status before flowplug could read it: "
    "os.wait(), os.waitpid(-1, ...) or a SIGCHLD handler"
)
#: every worker process started here and not yet stopped (see :func:`_after_fork_in_child`).
_FORKED: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a fork of the consumer (os.fork, a pool): forget the worker processes.

    multiprocessing keeps the processes it started in ``multiprocessing.process._children``,
    and a forked child inherits that set; at the child's exit, multiprocessing's atexit
    handler terminates every daemonic process in it, which would be our workers, which
    belong to the parent. (multiprocessing's own children reset the set when they start;
    a plain os.fork does not.)
    """
    global _STARTING
    # A worker is forked while the lock is held: its own runners need a free one.
    _STARTING = threading.Lock()
    children = getattr(mp.process, "_children", None)
    for proc in list(_FORKED):
        if children is not None:
            children.discard(proc)
    _FORKED.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_report(conn: Any) -> Any:
    """The RemoteFailure a worker wrote to its report pipe, or None (it wrote nothing
    complete: killed while writing)."""
    try:
        return pickle.loads(conn.recv_bytes())
    except Exception:
        return None


@dataclass(frozen=True)
class Death:
    """A worker that ended on its own, as put in :attr:`WorkerGroup.death`."""

    worker_id: int
    pid: int | None
    #: negative for a signal, as in :mod:`multiprocessing`; None when nobody can know
    #: (the process ran on a machine that is gone).
    exitcode: int | None
    #: what else is known, e.g. the node it ran on or the cluster's own words.
    reason: str = ""
    #: the worker's own account of why it ended (a
    #: :class:`flowplug.worker_loop.RemoteFailure`) when it failed in a way it could not
    #: report through the transport (it could not connect, or the transport broke); the
    #: Runner then raises a :class:`~flowplug.WorkerError` from it, not a
    #: :class:`~flowplug.WorkerDied`.
    failure: Any = None

    def describe(self) -> str:
        code = self.exitcode
        if code is None:
            how = "ended with an unknown exit status"
        elif code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        text = f"worker {self.worker_id} (pid {self.pid}) {how}"
        return f"{text} ({self.reason})" if self.reason else text


class WorkerGroup(ABC):
    """The workers of one run: started, watched and stopped by the Runner.

    The Runner uses its own groups (processes it forks, or threads) unless the transport
    sets :attr:`Transport.runs_workers`. Each worker must run
    :func:`flowplug.worker_loop.run_worker` (or a process running it), so that errors reach the
    consumer as objects through the transport. A group on other machines can fork its
    workers there with :class:`flowplug.ProcessWorkers` (the Ray plugin does, one per
    actor): death signals, seeds and exit statuses then stay the core's.

    Shard mode needs the group to carry the consumer's control to its workers
    (:meth:`control_sinks`); a group that cannot runs replicate mode only.
    """

    #: the first unexpected end of a worker, or None. Read by the Runner after every
    #: receive; set it from any thread (or from the transport's ``recv``).
    death: Death | None = None
    #: true when workers cannot be killed and stop only when they notice it (threads):
    #: the Runner then calls :meth:`request_stop`, closes the transport (which wakes the
    #: workers blocked in ``send``), and only then :meth:`stop`. False: :meth:`stop`
    #: ends the workers on its own, and the transport is closed after it.
    woken_by_transport_close: ClassVar[bool] = False

    @abstractmethod
    def start(self) -> None:
        """Start every worker. Called once, right after the group is made."""

    @abstractmethod
    def alive(self) -> int:
        """Return how many workers are running."""

    def request_stop(self) -> None:
        """Ask the workers to stop, without waiting (see :attr:`woken_by_transport_close`)."""

    @abstractmethod
    def stop(self, timeout: float = 2.0) -> None:
        """Stop every worker, forcibly after ``timeout`` s; called before
        :meth:`Transport.close`. Must not raise, and must not hang on a worker that is gone."""

    def control_sinks(self, credits: int) -> Sequence[ControlSink] | None:
        """Run the workers in shard mode; return one :class:`ControlSink` per worker.

        Called at most once, by a Runner in shard mode, before :meth:`start`. Worker ``i``
        must then run its dataflow under a shard gate whose epoch notices and
        ``credits`` credits are driven by the ``i``-th sink. A remote group gets such a
        gate by hosting a :class:`flowplug.ProcessWorkers` per machine (or per worker),
        asking it for its sinks with the same ``credits``, and forwarding the consumer's
        calls to them. The default, None, says the group cannot: the Runner then refuses
        ``mode="shard"`` with a :class:`~flowplug.ConfigError`.

        :param credits: how many items each worker may have sent and not yet released.
        """
        return None


class OwnWorkersTransport(Transport):
    """A transport that runs the workers itself (Ray actors on a cluster) instead of the
    Runner forking processes or starting threads. Subclass it instead of
    :class:`~flowplug.Transport`.

    The Runner then starts, watches and stops the :class:`WorkerGroup` that
    :meth:`make_workers` returns exactly as its own: the worker loop inside is still
    :func:`flowplug.worker_loop.run_worker`, errors still arrive as objects through the
    transport, a death is still a :class:`Death` in ``group.death``. For shard mode the
    group also carries the consumer's control to its workers
    (:meth:`WorkerGroup.control_sinks`); a group that does not runs replicate mode only.
    """

    runs_workers = True

    @abstractmethod
    def make_workers(
        self, dfs: Sequence[Any], endpoint: Connect, infos: Sequence[WorkerInfo]
    ) -> WorkerGroup:
        """Return the (not yet started) workers of this run.

        Called once, after :meth:`~flowplug.Transport.open`, with what it returned as
        ``endpoint``. Worker ``i`` runs ``dfs[i]`` with ``infos[i]`` through
        :func:`flowplug.worker_loop.run_worker`, sending through ``endpoint`` or a medium
        of the group's own that ends in :meth:`~flowplug.Transport.recv`. The Runner calls
        ``start()`` next, and ``stop()`` before :meth:`~flowplug.Transport.close`.
        """


class ProcessWorkers(WorkerGroup):
    """Worker processes, a watcher thread that notices deaths, and the stop ladder.

    Public as :class:`flowplug.ProcessWorkers` so that a transport running workers
    elsewhere (a Ray actor) can fork them there with this same code.

    :param dfs: one dataflow per worker.
    :param endpoint: what :meth:`Transport.open` returned: each worker calls it with its
        id to get its sender (inherited under fork, pickled otherwise).
    :param infos: one :class:`~flowplug.WorkerInfo` per worker.
    :param start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``.
    """

    def __init__(
        self,
        dfs: Sequence[Any],
        endpoint: Connect,
        infos: Sequence[WorkerInfo],
        start_method: str,
        gates: Sequence[Any] | None = None,
    ):
        self._ctx: Any = mp.get_context(start_method)  # typeshed: a BaseContext has no Process
        #: one gate per worker (shard mode, ParallelMap), or None.
        self._gates = gates
        self._start_method = start_method
        self._dfs = dfs
        self._endpoint = endpoint
        self._infos = infos
        self.procs: list[Any] = []
        #: the first unexpected death, set by the watcher thread; read by the consumer.
        self.death: Death | None = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._watcher: threading.Thread | None = None
        self._control: Control | None = None
        self._stopped = False
        #: per worker, the read end of its report pipe: a failure the worker could not
        #: send through the transport (flowplug.worker.process_main) arrives here.
        self._reports: list[Any] = []

    def control_sinks(self, credits: int) -> list[ControlSink]:
        """Run these workers in shard mode, under local gates; return their sinks.

        For a group that hosts this one next to its workers (a Ray actor): it applies the
        epoch notices and credits the consumer forwards to these sinks. The pipes and
        semaphores behind them are closed by :meth:`stop`.
        """
        if self.procs or self._gates is not None:
            raise StateError("control_sinks() must be called once, before start()")
        self._control = Control(len(self._infos), self._start_method, credits=credits)
        self._gates = self._control.gates
        return self._control.sinks

    def start(self) -> None:
        pickled = None if self._start_method == "fork" else self._pickled_dataflows()
        parent = os.getpid()
        # PR_SET_PDEATHSIG fires when the forking *thread* ends, so it is only safe from the
        # main thread; from others the workers rely on their parent watchdog alone.
        death_signal = threading.current_thread() is threading.main_thread()
        # Block SIGINT and SIGTERM across the fork, so that no worker can see a Ctrl-C, or
        # run a SIGTERM handler inherited from the consumer, before it set its own.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            gates = self._gates or [None] * len(self._infos)
            dfs = pickled or self._dfs
            for df, info, gate in zip(dfs, self._infos, gates, strict=True):
                # multiprocessing leaks a pipe when it runs out of fds half-way through
                # starting a process: refuse before (the Runner checked, unless something
                # else opened files since)
                ensure_room(2 + STARTING, f"to start worker process {info.id}")
                with _STARTING:  # see _STARTING
                    reader, writer = self._ctx.Pipe(duplex=False)
                    self._reports.append(reader)
                    try:
                        proc = self._ctx.Process(
                            target=process_main,
                            args=(df, self._endpoint, info, parent, death_signal, gate, writer),
                            name=f"flowplug-worker-{info.id}",
                            daemon=True,
                        )
                        proc.start()
                    finally:
                        writer.close()  # the worker has its own copy now
                self.procs.append(proc)
                _FORKED.add(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._watcher = threading.Thread(
            target=self._watch, name="flowplug-death-watcher", daemon=True
        )
        self._watcher.start()

    def _pickled_dataflows(self) -> list[bytes]:
        """The dataflows as pickles, for spawn and forkserver: the worker loads its own
        inside :func:`~flowplug.worker.process_main`, so that a failure to load it (a
        module the worker cannot import) is reported as a WorkerError, not as an exit.
        """
        # Only the dataflows: the endpoint may hold multiprocessing objects that pickle
        # only while a process is being spawned, and is the transport's to get right.
        out: list[bytes] = []
        memo: dict[int, bytes] = {}
        for df in self._dfs:
            try:
                if id(df) not in memo:
                    memo[id(df)] = pickle.dumps(df)
            except Exception as exc:
                raise StateError(
                    f"start_method={self._start_method!r} must pickle the dataflow {df!r} "
                    f"to send it to the workers, and that failed: {exc}. Make it picklable "
                    "(or pass a factory whose result is), or use start_method='fork'."
                ) from exc
            out.append(memo[id(df)])
        return out

    def _watch(self) -> None:
        waiting = {p.sentinel: (i, p) for i, p in enumerate(self.procs)}
        reports = {r: i for i, r in enumerate(self._reports)}
        failures: dict[int, Any] = {}
        while waiting:
            ready = wait([*waiting, *reports, self._wake_r])
            if self._wake_r in ready:
                return
            # Reports first: a worker writes its report, then exits.
            for conn in [r for r in ready if r in reports]:
                i = reports.pop(conn)
                failures[i] = _read_report(conn)
            for sentinel in [s for s in ready if s in waiting]:
                i, proc = waiting.pop(sentinel)
                exitcode = self._exit_status(proc)
                report = self._reports[i]
                if i not in failures and report in reports and report.poll():
                    reports.pop(report)
                    failures[i] = _read_report(report)
                if not self._stopping and self.death is None:
                    self.death = Death(
                        self._infos[i].id,
                        proc.pid,
                        exitcode,
                        "" if exitcode is not None else _STATUS_TAKEN,
                        failure=failures.get(i),
                    )

    def _exit_status(self, proc: Any) -> int | None:
        """The exit status of a worker whose sentinel closed, i.e. that has ended.

        Waiting for the process (``join``) is not enough: multiprocessing reaps its
        children from other threads too (``Process.start()`` and ``active_children()``
        poll every child they know, e.g. when another runner starts a worker), and when
        one of them reaps this worker first, our wait finds no child (ECHILD) and returns
        nothing while the other thread has yet to record the status on the same Process.
        So poll (never blocking: the sentinel may close a moment before the status is
        there) until the status is recorded, whoever reaped it. None only when other code
        took it past multiprocessing (``os.wait()``, ``os.waitpid(-1, ...)``, a SIGCHLD
        handler), or when the group is being stopped meanwhile.
        """
        deadline = time.monotonic() + EXIT_STATUS_WITHIN
        pause = 0.001
        while True:
            code = proc.exitcode  # waitpid(WNOHANG), or what another thread recorded
            if code is not None or self._stopping or time.monotonic() > deadline:
                return code
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.procs)

    def stop(self, timeout: float = 2.0) -> None:
        """terminate -> join -> kill, bounded by ``2 * timeout`` in all.

        Workers repeat their dataflow forever, so there is nothing to wait for before
        SIGTERM; a worker that ignores it (or is stuck in C code) gets SIGKILL.
        """
        if self._stopped:
            return
        self._stopped = self._stopping = True
        for proc in self.procs:
            if proc.exitcode is None:
                proc.terminate()
        for grace in (timeout, timeout):
            deadline = time.monotonic() + grace
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
            stuck = [p for p in self.procs if p.exitcode is None]
            if not stuck:
                break
            for proc in stuck:
                proc.kill()
        os.write(self._wake_w, b"x")
        if self._watcher is not None:
            self._watcher.join()
        for proc in self.procs:
            _FORKED.discard(proc)
            if proc.exitcode is not None:
                proc.close()
        for conn in self._reports:
            conn.close()
        self._reports = []
        # Drop what the workers were started with, so the transport's resources can go.
        self.procs = []
        self._dfs = self._endpoint = self._gates = None  # type: ignore[assignment]
        if self._control is not None:
            self._control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class ThreadWorkers(WorkerGroup):
    """Worker threads of the consumer process. Threads cannot die silently: errors are sent."""

    woken_by_transport_close = True

    def __init__(
        self,
        dfs: Sequence[Any],
        endpoint: Connect,
        infos: Sequence[WorkerInfo],
        gates: Sequence[Any] | None = None,
    ):
        self._stop = threading.Event()
        self.death: Death | None = None
        self.threads = [
            threading.Thread(
                target=self._run,
                args=(df, endpoint, info, gate),
                name=f"flowplug-worker-{info.id}",
                daemon=True,
            )
            for df, info, gate in zip(dfs, infos, gates or [None] * len(infos), strict=True)
        ]

    def _run(self, df: Any, endpoint: Connect, info: WorkerInfo, gate: Any) -> None:
        outcome = run_worker(df, endpoint, info, self._stop, gate)
        if isinstance(outcome, RemoteFailure) and self.death is None:
            # It could not go through the transport: a thread "dies" with its report.
            self.death = Death(info.id, None, None, "a thread of the consumer", failure=outcome)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = 3.0) -> None:
        """Ask the threads to stop and join them, ``timeout`` s in all.

        A thread cannot be killed. One still running after that (stuck in C code, a long
        sleep) is left behind with a RuntimeWarning naming it: it is a daemon thread, and
        it ends at its next send, which raises TransportClosed, or with the interpreter.
        """
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            warnings.warn(
                f"worker thread(s) {', '.join(stuck)} did not stop within {timeout:g} s "
                "(blocked in C code or sleeping?). Threads cannot be killed: they are left "
                "running as daemon threads and end at their next send. For workers that "
                "can be killed, use a transport whose workers are processes",
                RuntimeWarning,
                stacklevel=2,
            )
