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

Small objects cost more per message than per byte, so a process transport should batch
them: subclass :class:`BatchingSender`, which packs small objects into one message and
bounds the latency this adds (``max_delay``: at the next ``send()``, or from a timer thread
when the dataflow stalls). The consumer side unpacks a batch into a local deque and returns
its objects one per :meth:`Transport.recv`, so neither the Runner nor the user sees batches.

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

Where the workers run is the Runner's choice, by :attr:`Transport.crosses_processes`:
forked processes or threads of the consumer. A transport whose workers must run somewhere
else (Ray actors on a cluster) sets :attr:`Transport.runs_workers` and returns a
:class:`WorkerGroup` from :meth:`Transport.make_workers` (step 2b, after ``open()``). The
Runner then starts, watches and stops that group exactly as its own: the worker loop inside
is still :func:`flowplug.worker.run_worker`, errors still arrive as objects through the
transport, a death is still a :class:`Death` in ``group.death``. For shard mode the group
also carries the consumer's epoch notices and credits to its workers
(:meth:`WorkerGroup.control_sinks`, one :class:`ControlSink` per worker); a group that does
not runs replicate mode only.

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
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .worker import WorkerInfo

from .serialize import Batch, dumps


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


class BatchingSender(Sender):
    """A sender that packs small objects into one message, with a bounded added latency.

    ``send(obj)`` serializes ``obj`` (:func:`flowplug.serialize.dumps`). An object of at
    most ``item_max`` bytes is copied into the pending :class:`~flowplug.serialize.Batch`;
    a larger one goes out alone, right after the pending batch (order is kept). The batch
    goes out when it holds ``max_items`` objects or ``max_bytes`` bytes, on :meth:`flush`
    and :meth:`close`, and at the latest ``max_delay`` seconds after its first object: at
    the next ``send()``, or from a timer thread when the dataflow stalls. Subclasses
    implement :meth:`write_one` and :meth:`write_batch`; both are called under a lock, one
    at a time. The receiver rebuilds a batch with :func:`flowplug.serialize.unpack_batch`.

    :param max_items: at most this many objects per batch; 1 turns batching off.
    :param max_bytes: a batch goes out once it holds this many bytes.
    :param item_max: objects larger than this are never batched.
    :param max_delay: seconds an object may wait in a batch.
    """

    def __init__(
        self,
        max_items: int = 64,
        max_bytes: int = 256 * 1024,
        item_max: int = 128 * 1024,
        max_delay: float = 0.002,
    ):
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._item_max = item_max if max_items > 1 else -1
        self._max_delay = max_delay
        self._batch = Batch()
        self._started = 0.0  # when the pending batch got its first object
        self._lock = threading.Lock()
        self._pending = threading.Event()  # set while a batch waits: wakes the timer
        self._closed = False
        self._timer: threading.Thread | None = None

    @abstractmethod
    def write_one(self, frames: list[Any]) -> None:
        """Send one object's frames as one message. ``frames`` may be views of the
        caller's memory: when this returns, the transport must no longer read them."""

    @abstractmethod
    def write_batch(self, header: bytes, blob: bytearray) -> None:
        """Send a batch as one message; the sender never touches ``blob`` again."""

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        size = sum(memoryview(f).nbytes for f in frames) if len(frames) > 1 else len(frames[0])
        with self._lock:
            batch = self._batch
            if size > self._item_max:
                if batch.count:
                    self._write_pending()
                self.write_one(frames)
                return
            if not batch.count:
                self._started = time.monotonic()
                if self._timer is None:
                    self._start_timer()
                self._pending.set()
            batch.add(frames)
            if (
                batch.count >= self._max_items
                or batch.nbytes >= self._max_bytes
                or time.monotonic() - self._started >= self._max_delay
            ):
                self._write_pending()

    def _write_pending(self) -> None:
        self._pending.clear()
        header, blob = self._batch.take()
        self.write_batch(header, blob)

    def flush(self) -> None:
        with self._lock:
            if self._batch.count:
                self._write_pending()

    def close(self) -> None:
        """Flush, stop the timer thread, then :meth:`release`."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._pending.set()
            if self._timer is not None:
                self._timer.join(1.0)
            self.release()

    def release(self) -> None:
        """Release the worker side (sockets, pipes); called once by :meth:`close`."""

    def _start_timer(self) -> None:
        self._timer = threading.Thread(target=self._flush_late, name="flowplug-flush", daemon=True)
        self._timer.start()

    def _flush_late(self) -> None:
        """Timer thread: flush a batch that waited ``max_delay`` (the dataflow stalled)."""
        while True:
            self._pending.wait()
            if self._closed:
                return
            with self._lock:
                due = self._started + self._max_delay - time.monotonic()
                if self._batch.count and due <= 0:
                    try:
                        self._write_pending()
                    except Exception:
                        return  # the consumer is gone; the next send() reports it
                    continue
            time.sleep(max(due, 0.0002))


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
    #: the worker's own account of why it ended (a :class:`flowplug.worker.RemoteFailure`)
    #: when it failed in a way it could not report through the transport (it could not
    #: connect, or the transport broke); the Runner then raises a
    #: :class:`~flowplug.WorkerError` from it instead of a :class:`~flowplug.WorkerDied`.
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


class ControlSink(ABC):
    """The consumer's line to one worker's shard-mode control: epoch notices and credits.

    In shard mode the consumer announces each epoch it starts and gives a worker a credit
    back for every item of it that it yields or drops (docs/sharding.md). The Runner does
    it through one sink per worker, from its consumer thread only. Workers the Runner
    starts get sinks of the core's own (a pipe and a semaphore per process); a
    :class:`WorkerGroup` that runs its workers elsewhere returns its own from
    :meth:`WorkerGroup.control_sinks`, typically forwarding to the sinks of a
    :class:`flowplug.ProcessWorkers` next to the worker.
    """

    @abstractmethod
    def start_epoch(self, epoch: int) -> None:
        """Tell the worker that the consumer started ``epoch``: it may run ``epoch + 1``,
        and must leave earlier ones. Epochs only grow; an epoch applied after a later one
        (calls reordered on the way) must not move the worker back."""

    @abstractmethod
    def release(self) -> None:
        """Give the worker one credit back. Called once per item, on the consumer's hot
        path: keep it cheap.

        A sink whose every call crosses a network may hold credits back and send several
        at once, but always fewer than the worker's ``credits``: then at least one of them
        is on an item on its way, and an ordered consumer never waits for an item whose
        worker waits for a credit. Send what is held with :meth:`start_epoch` and before
        the consumer waits for data (in :meth:`Transport.recv`), or the worker idles
        meanwhile."""


class WorkerGroup(ABC):
    """The workers of one run: started, watched and stopped by the Runner.

    The Runner uses its own groups (processes it forks, or threads) unless the transport
    sets :attr:`Transport.runs_workers`. Each worker must run
    :func:`flowplug.worker.run_worker` (or a process running it), so that errors reach the
    consumer as objects through the transport. A group on other machines can fork its
    workers there with :class:`flowplug.ProcessWorkers` (the Ray plugin does, one per
    actor): death signals, seeds and exit statuses then stay the core's.

    Shard mode needs the group to carry the consumer's control to its workers
    (:meth:`control_sinks`); a group that cannot runs replicate mode only.
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
        """Release everything the transport holds, the task channel too. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
