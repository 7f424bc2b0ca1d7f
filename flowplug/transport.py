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

Objects sent by one sender must arrive in the order they were sent (shard mode's epoch
markers rely on it); objects of different senders may interleave freely. An object
returned by ``recv`` stays valid for as long as it is referenced, whatever is received
after it (shard mode's reorder buffer holds some while it receives others).

Tasks, the other direction (optional). A transport whose :attr:`Transport.carries_tasks`
is true also moves tasks from the consumer to the workers, which
:class:`~flowplug.ParallelMap` needs:

6. ``task_endpoint = transport.open_tasks()`` in the consumer, after ``open()`` and before
   any worker starts; picklable like the endpoint.
7. ``receiver = task_endpoint.connect(worker_id)`` inside each worker, then
   ``receiver.recv(timeout)`` per task (any free worker takes the next task).
8. ``transport.send_task(obj, timeout)`` in the consumer; false when the channel stayed
   full. ``transport.close()`` releases the task channel too.

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

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


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
        """Push out anything buffered (a transport that batches small items).

        Shard mode and ParallelMap call it before a worker waits (for a credit, the next
        epoch or a task) and after each epoch-end marker: the consumer may be waiting for
        exactly what is held here.
        """

    def close(self) -> None:
        """Flush and release the worker side. Called once."""
        self.flush()


class Endpoint(ABC):
    """What a worker needs to connect to the consumer; returned by :meth:`Transport.open`."""

    @abstractmethod
    def connect(self, worker_id: int) -> Sender:
        """Connect inside the worker and return its sender."""


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
        """Release the worker side. Called at most once."""


class TaskEndpoint(ABC):
    """What a worker needs to receive tasks; returned by :meth:`Transport.open_tasks`."""

    @abstractmethod
    def connect(self, worker_id: int) -> TaskReceiver:
        """Connect inside the worker and return its task receiver."""


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
    #: true when the transport also carries tasks from the consumer to the workers
    #: (:meth:`open_tasks`, :meth:`send_task`), which :class:`~flowplug.ParallelMap` needs.
    carries_tasks: ClassVar[bool] = False
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

    def open_tasks(self) -> TaskEndpoint:
        """Create the task channel (consumer to workers) and return the workers' endpoint.

        Optional: only called when :attr:`carries_tasks` is true. The channel holds at
        least ``capacity`` tasks.
        """
        raise NotImplementedError(
            f"transport {self.name!r} does not carry tasks (carries_tasks is false)"
        )

    def send_task(self, obj: Any, timeout: float) -> bool:
        """Send one task to whichever worker takes it first.

        :param timeout: seconds to wait while the channel is full; 0 does not wait.
        :returns: false when the channel stayed full; the task was not sent.
        :raises Exception: ``obj`` cannot be serialized (raised here, in the consumer).
        """
        raise NotImplementedError(
            f"transport {self.name!r} does not carry tasks (carries_tasks is false)"
        )

    def close(self) -> None:
        """Release everything the transport holds, the task channel too. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
