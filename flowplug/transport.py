"""The transport base classes: what a plugin implements to move objects.

A transport only moves objects; the :class:`~flowplug.Runner` owns everything else
(starting workers, errors, deaths, timeouts, cleanup). Its life, driven by the Runner:

1. ``Transport(capacity=..., num_workers=..., run_id=..., start_method=..., **options)``
   in the consumer.
2. ``endpoint = transport.open()`` in the consumer, before any worker starts. The
   endpoint is what a worker needs to connect; it must be picklable when
   :attr:`Transport.crosses_processes` is true (``spawn`` pickles it).
3. ``sender = endpoint.connect(worker_id)`` inside each worker, then ``sender.send(obj)``
   per datapoint and ``sender.close()`` at the end.
4. ``transport.recv(timeout)`` in the consumer returns the next object, or :data:`EMPTY`
   when nothing arrived within ``timeout`` seconds.
5. ``transport.close()`` in the consumer, after the workers are stopped. Idempotent.

Where the workers run is the Runner's choice, by :attr:`Transport.crosses_processes`:
forked processes or threads of the consumer. A transport whose workers must run somewhere
else (Ray actors on a cluster) sets :attr:`Transport.runs_workers` and returns a
:class:`WorkerGroup` from :meth:`Transport.make_workers` (step 2b, after ``open()``). The
Runner then starts, watches and stops that group exactly as its own: the worker loop inside
is still :func:`flowplug.worker.run_worker`, errors still arrive as objects through the
transport, a death is still a :class:`Death` in ``group.death``.

Example, the smallest in-process transport::

    class ListTransport(Transport):
        name = "list"
        crosses_processes = False

        def open(self):
            self.items = collections.deque()
            return ListEndpoint(self.items)

        def recv(self, timeout):
            return self.items.popleft() if self.items else EMPTY
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .worker import WorkerInfo


class _Empty:
    __slots__ = ()

    def __repr__(self) -> str:
        return "flowplug.EMPTY"

    def __reduce__(self) -> str:
        return "EMPTY"


#: Returned by :meth:`Transport.recv` when nothing arrived in time.
EMPTY: Any = _Empty()


@dataclass(frozen=True)
class Option:
    """One option a transport accepts, e.g. ``Option("hwm", int, 50, "zmq high-water mark")``.

    The core validates user values against it; the CLI lists it.
    """

    #: option name, as given to ``Runner(**options)`` and in ``[transports.NAME]``.
    name: str
    #: the expected type; ``int`` also accepts size strings when ``size`` is true.
    type: type
    #: the value used when the user gives none.
    default: Any
    #: one line for ``flowplug transports`` and the docs.
    help: str = ""
    #: true when the value is a byte count that may be given as "512MiB", "2GB"...
    size: bool = field(default=False)


class Sender(ABC):
    """The worker side of a transport: sends objects to the consumer."""

    @abstractmethod
    def send(self, obj: Any) -> None:
        """Send one object, blocking while the transport is full.

        :raises flowplug.TransportClosed: the consumer side is gone.
        :raises Exception: ``obj`` cannot be serialized (the Runner reports it).
        """

    def flush(self) -> None:
        """Push out anything buffered (a transport that batches small items)."""

    def close(self) -> None:
        """Flush and release the worker side. Called once."""
        self.flush()


class Endpoint(ABC):
    """What a worker needs to connect to the consumer; returned by :meth:`Transport.open`."""

    @abstractmethod
    def connect(self, worker_id: int) -> Sender:
        """Connect inside the worker and return its sender."""


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
    :func:`flowplug.worker.run_worker` (or a process running it), so that errors reach the
    consumer as objects through the transport. A group on other machines can fork its
    workers there with :class:`flowplug.ProcessWorkers` (the Ray plugin does, one per
    actor): death signals, seeds and exit statuses then stay the core's.
    """

    #: the first unexpected end of a worker, or None. Read by the Runner after every
    #: receive; set it from any thread (or from the transport's ``recv``).
    death: Death | None = None

    @abstractmethod
    def start(self) -> None:
        """Start every worker. Called once, right after the group is made."""

    @abstractmethod
    def alive(self) -> int:
        """Return how many workers are running."""

    @abstractmethod
    def stop(self, timeout: float = 2.0) -> None:
        """Stop every worker, forcibly after ``timeout`` s; called before
        :meth:`Transport.close`. Must not raise, and must not hang on a worker that is gone."""


class Transport(ABC):
    """Moves objects from workers to one consumer. Subclass it in a plugin.

    :param capacity: how many objects may be in flight (buffered) at once.
    :param num_workers: how many workers will connect.
    :param run_id: a name unique to this run (pid and random part), for pipes and segments.
    :param start_method: how worker processes start (``"fork"``, ``"spawn"``,
        ``"forkserver"``); None for transports whose workers are threads.
    :param options: the transport's own options, declared in :attr:`options`.
    """

    #: registered name, short and lower-case (``"zmq"``).
    name: ClassVar[str]
    #: true when workers are processes; false when they are threads of the consumer.
    crosses_processes: ClassVar[bool] = True
    #: true when the consumer receives views of shared memory rather than copies.
    zero_copy: ClassVar[bool] = False
    #: true when the transport runs the workers itself (:meth:`make_workers`) instead of
    #: the Runner forking processes or starting threads; ``start_method`` is then unused.
    runs_workers: ClassVar[bool] = False
    #: the options this transport accepts.
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(
        self,
        *,
        capacity: int,
        num_workers: int,
        run_id: str,
        start_method: str | None = None,
        **options: Any,
    ):
        self.capacity = capacity
        self.num_workers = num_workers
        self.run_id = run_id
        self.start_method = start_method
        self.settings = options

    @abstractmethod
    def open(self) -> Endpoint:
        """Create the medium in the consumer and return the workers' endpoint."""

    @abstractmethod
    def recv(self, timeout: float) -> Any:
        """Return the next object, or :data:`EMPTY` after ``timeout`` seconds."""

    def make_workers(
        self, dfs: Sequence[Any], endpoint: Endpoint, infos: Sequence[WorkerInfo]
    ) -> WorkerGroup:
        """Return the (not yet started) workers of this run; only when :attr:`runs_workers`.

        Called once, after :meth:`open`, with what it returned as ``endpoint``. Worker
        ``i`` runs ``dfs[i]`` with ``infos[i]`` through :func:`flowplug.worker.run_worker`,
        sending through ``endpoint`` or a medium of the group's own that ends in
        :meth:`recv`. The Runner calls ``start()`` next, and ``stop()`` before :meth:`close`.
        """
        raise NotImplementedError(f"transport {self.name!r} does not run its own workers")

    def close(self) -> None:
        """Release everything the transport holds. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
