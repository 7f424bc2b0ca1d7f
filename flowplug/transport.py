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
        """Push out anything buffered (a transport that batches small items)."""

    def close(self) -> None:
        """Flush and release the worker side. Called once."""
        self.flush()


class Endpoint(ABC):
    """What a worker needs to connect to the consumer; returned by :meth:`Transport.open`."""

    @abstractmethod
    def connect(self, worker_id: int) -> Sender:
        """Connect inside the worker and return its sender."""


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
    #: true when the transport keeps data in ``/dev/shm``. Its entries must carry the
    #: ``run_id`` in their names (``fp-<owner pid>-<random>``): before such a transport
    #: opens, the Runner unlinks the entries of owners that no longer exist (a consumer
    #: killed by SIGKILL cannot clean up). It must check at ``open()`` that the space it
    #: needs is there, naming ``/dev/shm`` and its size option when it is not.
    uses_shared_memory: ClassVar[bool] = False
    #: name of the size option (an :class:`Option` with ``size=True``) that bounds how
    #: large one datapoint may be, or None when there is no byte limit. A sender raises
    #: :class:`~flowplug.DataTooLarge` naming the sizes and this option for a larger one,
    #: before anything of it is sent.
    size_limit_option: ClassVar[str | None] = None
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

    def close(self) -> None:
        """Release everything the transport holds. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
