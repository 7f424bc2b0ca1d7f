"""The plugin contract: what a transport implements to move objects.

A transport only moves objects; the :class:`~flowplug.Runner` owns everything else
(starting workers, errors, deaths, timeouts, cleanup). A transport implements three
methods, which the Runner calls in this order:

1. ``connect = transport.open()`` in the consumer, before any worker starts. ``connect``
   is a callable (picklable when :attr:`Transport.crosses_processes`: ``spawn`` pickles
   it), e.g. ``functools.partial(MySender, address)``.
2. ``sender = connect(worker_id)`` inside each worker, then ``sender.send(obj)`` per
   datapoint and ``sender.close()`` at the end (a :class:`Sender`).
3. ``transport.recv(timeout)`` in the consumer: the next object, or :data:`EMPTY` after
   ``timeout`` seconds; ``transport.close()`` once the workers are stopped (idempotent).

Objects of one sender arrive in the order they were sent; objects of different senders
may interleave. An object returned by ``recv`` stays valid while it is referenced.

Optional parts are base classes to opt into, checked when the transport is registered:
:class:`TaskTransport` also carries tasks to the workers (:class:`~flowplug.ParallelMap`),
:class:`~flowplug.OwnWorkersTransport` runs the workers itself (Ray). Helpers:
:mod:`flowplug.batching` (pack small objects), :mod:`flowplug.ipc` (zmq sockets),
:mod:`flowplug.pipes` (messages over pipes). docs/plugins.md walks through a transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple


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


class OpenFiles(NamedTuple):
    """How many file descriptors a transport holds open, at most: the Runner checks them,
    with its own, against ``RLIMIT_NOFILE`` before it starts a run (see
    :attr:`Transport.open_files`). Count what the transport's code opens (sockets, pipes,
    a zmq context's own, the files of a shared-memory store), in the state where it holds
    the most; measure it (``/proc/self/fd`` in the consumer and in a worker).
    """

    #: in the consumer, whatever the number of workers (a zmq context and its socket).
    consumer: int = 0
    #: in the consumer, for each worker (a pipe per worker, a connection it accepted).
    per_worker: int = 0
    #: in each worker process, opened there (its sender's zmq context and socket); what
    #: a forked worker inherits from the consumer is counted by the Runner.
    worker: int = 0


def option_defaults(options: Sequence[Option]) -> dict[str, Any]:
    """Return ``{name: default}`` of declared options: the one place defaults are read."""
    return {opt.name: opt.default for opt in options}


class Sender(ABC):
    """The worker side of a transport: sends objects to the consumer."""

    @abstractmethod
    def send(self, obj: Any) -> None:
        """Send one object, blocking while the transport is full.

        :raises flowplug.TransportClosed: the consumer side is gone.
        :raises Exception: ``obj`` cannot be serialized (the Runner reports it).
        """

    def flush(self) -> None:
        """Push out anything buffered (a transport that batches small items).

        Shard mode and ParallelMap call it before a worker waits (for a credit, the next
        epoch or a task) and after each epoch-end marker: the consumer may be waiting for
        exactly what is held here.
        """

    def close(self) -> None:
        """Flush and close the worker side. Called once."""
        self.flush()


#: What :meth:`Transport.open` returns: called in each worker with its id, it returns
#: that worker's :class:`Sender`.
Connect = Callable[[int], Sender]


class Endpoint(ABC):
    """An optional base for what :meth:`Transport.open` returns: a class with a
    :meth:`connect` method; calling the endpoint connects. A plain function or a
    ``functools.partial`` does as well."""

    @abstractmethod
    def connect(self, worker_id: int) -> Sender:
        """Connect inside the worker and return its sender."""

    def __call__(self, worker_id: int) -> Sender:
        return self.connect(worker_id)


class Transport(ABC):
    """Moves objects from workers to one consumer. Subclass it in a plugin.

    Example, a whole transport whose workers are threads (no bound on what is in
    flight: see the ``thread`` transport for one with it)::

        class ListTransport(flowplug.Transport):
            name = "list"
            crosses_processes = False

            def open(self):
                self.items = collections.deque()
                return functools.partial(ListSender, self.items)

            def recv(self, timeout):
                return self.items.popleft() if self.items else flowplug.EMPTY

    where ``ListSender(items, worker_id)`` is a :class:`Sender` whose ``send`` appends.

    :param capacity: how many objects may be in flight (buffered) at once.
    :param max_in_flight: how many datapoints the Runner's credits may let be in flight
        at once, when that is more than ``capacity``: with ``capacity`` left unset,
        replicate mode sizes the credits by the datapoints' bytes, between ``capacity``
        and 1,024 (docs/configuration.md). The credits bound the datapoints then; a
        transport that counts datapoints itself (not messages or batches) may size its
        buffers for this instead of ``capacity``, so that it never holds back what the
        credits allow. Default (None): ``capacity``.
    :param num_workers: how many workers will connect.
    :param run_id: a name unique to this run (pid and random part), for pipes and segments.
    :param start_method: how worker processes start (``"fork"``, ``"spawn"``,
        ``"forkserver"``); None for transports whose workers are threads.
    :param options: the values of the transport's declared :attr:`options`.
    """

    #: registered name, short and lower-case (``"zmq"``).
    name: ClassVar[str]
    #: true when workers are processes; false when they are threads of the consumer.
    crosses_processes: ClassVar[bool] = True
    #: true when the consumer receives views of shared memory rather than copies.
    zero_copy: ClassVar[bool] = False
    #: true for a :class:`TaskTransport`: it also carries tasks to the workers, which
    #: :class:`~flowplug.ParallelMap` needs. Set by subclassing, never by hand.
    carries_tasks: ClassVar[bool] = False
    #: true for an :class:`~flowplug.OwnWorkersTransport`: it runs the workers itself
    #: instead of the Runner; ``start_method`` is then unused. Set by subclassing.
    runs_workers: ClassVar[bool] = False
    #: true when the transport keeps data in ``/dev/shm``. Each entry is named
    #: ``<run_id>`` or ``<run_id>-<suffix>`` (the run id is ``fp-<owner pid>-<8 hex>``; the
    #: suffix has letters, digits, ``_`` and ``-``), and the process that made it holds a
    #: byte-range lock (``fcntl``) on it while it lives. Before such a transport opens, the
    #: Runner unlinks the entries whose owner pid does not exist here and that nobody holds
    #: a lock on (a consumer killed by SIGKILL cannot clean up; the lock spares a live
    #: owner in another pid namespace); ``flowplug doctor --clean`` does the same, and so
    #: does every new :class:`flowplug.shm.ObjectStore`. It must check at ``open()`` that
    #: the space it needs is there, naming ``/dev/shm`` and its size option when it is not.
    uses_shared_memory: ClassVar[bool] = False
    #: name of the size option (an :class:`Option` with ``size=True``) that bounds how
    #: large one datapoint may be, or None when there is no byte limit. A sender raises
    #: :class:`~flowplug.DataTooLarge` naming the sizes and this option for a larger one,
    #: before anything of it is sent.
    size_limit_option: ClassVar[str | None] = None
    #: the options this transport accepts.
    options: ClassVar[tuple[Option, ...]] = ()
    #: the file descriptors the transport opens (:class:`OpenFiles`), for the Runner's check
    #: of ``RLIMIT_NOFILE`` before it starts the workers: a run that would run out is a
    #: :class:`~flowplug.ConfigError` naming the limit, not a worker that cannot connect
    #: (or libzmq aborting the process). The default fits a transport with one zmq
    #: context on each side; a run whose count is too low fails like an unchecked one.
    open_files: ClassVar[OpenFiles] = OpenFiles(consumer=8, per_worker=2, worker=8)

    def __init__(
        self,
        *,
        capacity: int,
        num_workers: int,
        run_id: str,
        start_method: str | None = None,
        max_in_flight: int | None = None,
        **options: Any,
    ):
        self.capacity = capacity
        self.max_in_flight = capacity if max_in_flight is None else max(capacity, max_in_flight)
        self.num_workers = num_workers
        self.run_id = run_id
        self.start_method = start_method
        #: the values of the declared :attr:`options`: their defaults, overridden by what
        #: the user gave (validated by the Runner). Read ``self.option_values["hwm"]``;
        #: never repeat a default here.
        self.option_values: Mapping[str, Any] = {**option_defaults(self.options), **options}

    @abstractmethod
    def open(self) -> Connect:
        """Create the medium in the consumer; return what a worker calls with its id to
        get its :class:`Sender` (picklable when :attr:`crosses_processes`)."""

    @abstractmethod
    def recv(self, timeout: float) -> Any:
        """Return the next object, or :data:`EMPTY` after ``timeout`` seconds."""

    def await_connections(self, keep_waiting: Callable[[], bool]) -> None:
        """Wait until every worker is connected (optional); called once by the Runner
        right after it started the workers, before the program goes on.

        For a consumer that *accepts* its workers' connections (a listening socket): each
        accept takes a file descriptor, and running out of them then is the worst place
        (libzmq aborts the whole process when its ipc listener cannot accept). The
        Runner counted those fds before it started; waiting here makes the accepts happen
        before any other code of the consumer's thread can open files. Wait in steps of
        at most 0.1 s, and return as soon as ``keep_waiting()`` is false (a worker died,
        or it took too long); never raise for a worker that did not connect: iterating
        reports it. The default returns at once.
        """

    def counters(self) -> dict[str, float]:
        """What this transport counts, for :meth:`flowplug.Runner.stats` (optional).

        Called in the consumer, now and then (never per datapoint), while the transport
        is open. Counting must cost the hot path (almost) nothing: count the rare events
        (a fallback to copies), or read what the medium already knows (bytes in use).
        ``"bytes_received"`` is shown as the bytes delivered.

        :returns: names to numbers, e.g. ``{"copies_received": 3}``; empty by default.
        """
        return {}

    def close(self) -> None:
        """Release everything the transport holds, the task channel too. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- tasks


class TaskReceiver(ABC):
    """The worker side of a task channel: receives the tasks the consumer sends."""

    @abstractmethod
    def recv(self, timeout: float) -> Any:
        """Return the next task, or :data:`EMPTY` after ``timeout`` seconds.

        Each task goes to exactly one worker.

        :raises flowplug.TransportClosed: the consumer closed the channel (a worker thread
            must notice it to end).
        """

    def close(self) -> None:
        """Close the worker side. Called at most once."""


class TaskEndpoint(ABC):
    """An optional base for what :meth:`TaskTransport.open_tasks` returns (as
    :class:`Endpoint` is for :meth:`Transport.open`); calling it connects."""

    @abstractmethod
    def connect(self, worker_id: int) -> TaskReceiver:
        """Connect inside the worker and return its task receiver."""

    def __call__(self, worker_id: int) -> TaskReceiver:
        return self.connect(worker_id)


class TaskTransport(Transport):
    """A transport that also carries tasks from the consumer to the workers, which
    :class:`~flowplug.ParallelMap` needs. Subclass it instead of :class:`Transport`.

    The Runner calls :meth:`open_tasks` after :meth:`~Transport.open` and before any
    worker starts; each worker calls what it returned with its id and receives tasks from
    the :class:`TaskReceiver` it gets; the consumer sends with :meth:`send_task`.
    :meth:`~Transport.close` closes the task channel too.
    """

    carries_tasks = True
    #: what the task channel opens, on top of :attr:`~Transport.open_files`.
    task_open_files: ClassVar[OpenFiles] = OpenFiles(consumer=4, per_worker=1, worker=8)

    @abstractmethod
    def open_tasks(self) -> Callable[[int], TaskReceiver]:
        """Create the task channel; return what a worker calls with its id to get its
        :class:`TaskReceiver` (picklable like :meth:`~Transport.open`'s). The channel
        holds at least ``capacity`` tasks."""

    @abstractmethod
    def send_task(self, obj: Any, timeout: float) -> bool:
        """Send one task to whichever worker takes it first.

        :param timeout: seconds to wait while the channel is full; 0 does not wait.
        :returns: false when the channel stayed full; the task was not sent.
        :raises Exception: ``obj`` cannot be serialized (raised here, in the consumer).
        """
