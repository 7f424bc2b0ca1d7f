"""Workers as Ray actors, datapoints through Ray's object store.

Each worker is a :class:`WorkerHost` actor placed by Ray (``num_cpus``, ``resources``,
``runtime_env``), which forks the worker process with the core's
:class:`flowplug.ProcessWorkers` and hands its datapoints on through a shared ring (see
:mod:`flowplug_ray._host`). The consumer keeps :data:`IN_FLIGHT` calls of
:meth:`~flowplug_ray._host.Host.take` in flight per actor (the first ones submitted with the
actor itself) and submits the next one as soon as a reply arrives; each reply is one buffer
holding several datapoints in the core's batch layout (one object in the store, owned by the
consumer), unpacked by :func:`flowplug.serialize.unpack_batch` (a batch of small plain
datapoints is one entry, a pickled list): numpy arrays arrive as read-only views of the
object store.

What is in flight per worker is bounded: its ring holds at most ``ceil(capacity /
num_workers)`` messages (a message is one datapoint, or a batch of small ones, like zmq's
high-water mark) and 32 MiB, and each reply at most half as many messages and 16 MiB (or
one message, when that is larger).

The Runner still owns the semantics: this module only reports what Ray tells (an actor that
died, a worker process that ended) as a :class:`flowplug.Death` in the worker group, and the
Runner turns it into :class:`flowplug.WorkerDied`, exactly as for local processes.

Ray is imported when a runner opens the transport, never when the plugin is loaded.
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import flowplug
from flowplug.serialize import unpack_batch

#: how long one take() call waits on the actor before returning empty-handed (s).
_TAKE_WAIT = 1.0
#: take() calls in flight per actor.
IN_FLIGHT = 2
#: how long close() waits for killed actors to be reported dead (s).
_KILL_WAIT = 5.0
#: the consumer takes an actor's datapoints this many at a time, the actors in turn (a
#: reply may hold thousands): one worker's error report never waits behind more than this
#: many of each other worker's datapoints once its reply is in.
CHUNK = 64
#: while some actors' datapoints are queued here, look for the replies of the others at
#: most this often (s), without waiting (a look costs ~70 us: ray.wait).
POLL = 0.005


def _said(exc: BaseException) -> str:
    """What Ray says in ``exc``, without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the distribution depends on ray
        raise flowplug.ConfigError(
            f"transport 'ray' needs the ray package, which failed to import: {exc}. "
            "Install it with: python3 -m pip install flowplug-ray"
        ) from exc
    return ray


class RayEndpoint(flowplug.Endpoint):
    """Stands for the actors' pipes: a worker connects inside its actor, never here."""

    def connect(self, worker_id: int) -> flowplug.Sender:
        raise flowplug.StateError(
            "transport 'ray' connects each worker inside its Ray actor; its endpoint is not "
            "for the Runner's own processes or threads"
        )


class WorkerHost:
    """The Ray actor of one worker: makes a :class:`flowplug_ray._host.Host` in the actor
    process and passes each call on to it.

    A shell, for start-up: the consumer imports only this module, never ``_host`` (the ring,
    the sender, numpy), and Ray, which hashes the disassembled code of an actor class the
    first time it exports it from the consumer, has five short methods to read instead of
    the whole host (~7 ms).
    """

    def __init__(self, df: Any, info: Any, buffer: int, credits: int | None = None):
        from ._host import Host  # in the actor process

        self._host = Host(df, info, buffer, credits)

    def where(self) -> tuple[int, int, str]:
        return self._host.where()

    def take(self, wait: float, most: int) -> tuple[bytes, Any, flowplug.Death | None]:
        return self._host.take(wait, most)

    def control(self, epoch: int, credits: int) -> None:
        self._host.control(epoch, credits)

    def stop(self) -> None:
        self._host.stop()


class _Slot:
    """The consumer's view of one worker actor."""

    __slots__ = ("actor", "actor_pid", "at", "dead", "id", "node", "pending", "pid", "replies")

    def __init__(self, worker_id: int, actor: Any):
        self.id = worker_id
        self.actor = actor
        self.actor_pid: int | None = None
        self.pid: int | None = None
        self.node = "?"
        self.pending: collections.deque = collections.deque()  # take() calls, oldest first
        #: replies received, unpacked, not yet handed out (lists of datapoints), oldest
        #: first; ``at``: how many of the first are handed out.
        self.replies: collections.deque = collections.deque()
        self.at = 0
        self.dead = False


class _ActorSink(flowplug.ControlSink):
    """Shard mode: forwards one worker's control to its actor (:meth:`WorkerHost.control`).

    Credits given back are held and sent ``batch`` at a time, so that a remote call is not
    made per item; the transport's ``recv`` sends what is held before it waits for data
    (:meth:`flush`), and an epoch notice carries it too.
    """

    __slots__ = ("actor", "batch", "held")

    def __init__(self, batch: int):
        self.actor: Any = None  # set when the group starts the actor
        self.batch = batch
        self.held = 0

    def start_epoch(self, epoch: int) -> None:
        # The reply is not needed: an actor that is gone is reported by its take() call.
        self.actor.control.options(concurrency_group="control").remote(epoch, self.held)
        self.held = 0

    def release(self) -> None:
        self.held += 1
        if self.held >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.held:
            self.actor.control.options(concurrency_group="control").remote(-1, self.held)
            self.held = 0


class RayWorkers(flowplug.WorkerGroup):
    """The actors of one run. Deaths are found by the transport's ``recv``, which sees
    every reply from the actors, and recorded here for the Runner."""

    def __init__(self, transport: RayTransport, dfs: Sequence[Any], infos: Sequence[Any]):
        self.death: flowplug.Death | None = None
        self._transport = transport
        self._dfs = list(dfs)
        self._infos = list(infos)
        self.slots: list[_Slot] = []
        self._credits: int | None = None
        #: shard mode: one per worker, in worker order.
        self.sinks: list[_ActorSink] = []

    def control_sinks(self, credits: int) -> list[_ActorSink]:
        """Shard mode: each actor runs its worker under the core's local gate, and these
        forward the consumer's epoch notices and credits to it."""
        self._credits = credits
        # Half the credits per call: the worker gets the first half back while the
        # consumer still works through the second (and never all are held back, which
        # could leave an ordered consumer and a worker waiting for each other).
        self.sinks = [_ActorSink(max(1, credits // 2)) for _ in self._infos]
        return self.sinks

    def flush_control(self) -> None:
        """Send the credits the sinks hold; before the consumer waits for data."""
        for sink in self.sinks:
            sink.flush()

    def start(self) -> None:
        ray = _ray()
        t = self._transport
        values = t.option_values
        host = t.host_class(control=self._credits is not None)
        opts: dict[str, Any] = {
            "num_cpus": values["num_cpus"],
            "max_restarts": 0,
        }
        if values["resources"]:
            opts["resources"] = dict(values["resources"])
        if values["runtime_env"]:
            opts["runtime_env"] = dict(values["runtime_env"])
        for df, info in zip(self._dfs, self._infos, strict=True):
            # Named, so `ray list actors` shows whose they are (and tests can find them).
            name = f"flowplug-{t.run_id}-w{info.id}"
            actor = host.options(name=name, **opts).remote(df, info, t.per_worker, self._credits)
            self.slots.append(_Slot(info.id, actor))
        for sink, slot in zip(self.sinks, self.slots if self.sinks else [], strict=True):
            sink.actor = slot.actor
        self._dfs = []
        refs = [s.actor.where.remote() for s in self.slots]
        # The first take() calls go with where(): an actor runs them in order, right after
        # it started, so the first datapoints are on their way while where() replies.
        for slot in self.slots:
            for _ in range(IN_FLIGHT):
                slot.pending.append(slot.actor.take.remote(_TAKE_WAIT, t.per_reply))
        timeout = values["start_timeout"]
        try:
            placed = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise flowplug.StateError(
                f"Ray placed fewer than {len(self.slots)} worker actors within {timeout:g} s "
                f"(each needs num_cpus={values['num_cpus']:g}"
                + (f", resources={values['resources']}" if values["resources"] else "")
                + f"; the cluster has {ray.available_resources()} free). Lower num_cpus or "
                "num_workers, add nodes, or raise start_timeout"
            ) from None
        except ray.exceptions.RayError as exc:
            raise flowplug.StateError(
                f"a Ray worker actor failed to start: {_said(exc)}. The actors unpickle the "
                "dataflow, so every node must import its module: install it there, or ship "
                "it with runtime_env={'py_modules': [...]} (docs/ray.md)"
            ) from exc
        for slot, (actor_pid, pid, node) in zip(self.slots, placed, strict=True):
            slot.actor_pid, slot.pid, slot.node = actor_pid, pid, node

    def alive(self) -> int:
        return sum(not s.dead for s in self.slots)

    def died(self, slot: _Slot, death: flowplug.Death) -> None:
        slot.dead = True
        if self.death is None:
            self.death = death

    def stop(self, timeout: float = 2.0) -> None:
        """Kill every actor (its worker process gets the death signal) and wait until Ray
        reports them dead, so their processes and objects are gone when close() returns.
        What the consumer received before stays to be handed out (the Runner drains it
        after a death); replies still in flight are lost with their actors."""
        ray = _ray()
        live = [slot for slot in self.slots if slot.actor is not None]
        # Without Ray, ray.shutdown() (at exit, before our finalizer) killed them already.
        if live and ray.is_initialized():
            calls: list[Any] = []
            for slot in live:
                calls.extend(slot.pending)
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:
                    pass  # already gone, or Ray itself was shut down: nothing left to stop
            # A call in flight fails once Ray has the actor dead; new calls would only make
            # Ray dial the dead actors.
            if calls:
                ray.wait(calls, num_returns=len(calls), timeout=_KILL_WAIT)
        for slot in self.slots:
            slot.dead = True
            slot.pending.clear()
            slot.actor = None
        self.slots = [slot for slot in self.slots if slot.replies]
        for sink in self.sinks:
            sink.actor = None
        self.sinks = []


class RayTransport(flowplug.OwnWorkersTransport):
    """Workers as Ray actors anywhere in a cluster; datapoints through Ray's object store.

    Ray starts lazily in :meth:`open`: with ``address`` (``"auto"``, ``"ray://host:10001"``)
    it connects to a cluster, without it starts a local instance; when Ray is already
    initialized in this process, that is used as it is.
    """

    name = "ray"
    crosses_processes = True
    zero_copy = True
    #: Measured in /proc/self/fd of the consumer (Ray 2.60): ``ray.init`` of a local
    #: instance, which ``open()`` makes when Ray is not initialized yet, opens 21 (gRPC's
    #: event fds, its sockets, session files), the first actor call and the first object
    #: from the store 2 more, kept for good; then about one socket per actor, which Ray
    #: keeps for a while after the actor is gone (W=1..8: 1 to 1.4 per actor). The worker
    #: processes run inside the actors, in Ray's worker processes under their own limit, so
    #: nothing of theirs counts here. An upper bound: with Ray already initialized (a
    #: cluster, your own ``ray.init``) the run needs ~21 fewer.
    open_files = flowplug.OpenFiles(consumer=24, per_worker=2, worker=0)
    options = (
        flowplug.Option(
            "address",
            str,
            None,
            "Ray cluster to connect to ('auto', 'ray://head:10001'); none: a local instance",
        ),
        flowplug.Option("num_cpus", float, 1.0, "CPUs Ray reserves for each worker actor"),
        flowplug.Option("resources", dict, None, "custom Ray resources per worker actor"),
        flowplug.Option("runtime_env", dict, None, "Ray runtime_env of the worker actors"),
        flowplug.Option(
            "start_timeout", float, 120.0, "seconds to wait for Ray to place the actors"
        ),
    )

    #: the actor classes, by whether they take control() calls (made once per process).
    _host_classes: ClassVar[dict[bool, Any]] = {}

    def open(self) -> RayEndpoint:
        ray = _ray()
        if not ray.is_initialized():
            address = self.option_values["address"]
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise flowplug.ConfigError(
                    f"cannot start Ray with address={address!r}: {exc}. Check "
                    "[transports.ray] address (or Runner(address=...)), or leave it unset "
                    "for a local instance"
                ) from exc
        self.per_worker = max(1, math.ceil(self.capacity / self.num_workers))
        self.per_reply = max(1, math.ceil(self.per_worker / IN_FLIGHT))
        #: the datapoints being handed out: a chunk of one actor's (see _refill).
        self._ready: collections.deque = collections.deque()
        self._turn = 0  # the actor whose chunk comes next, if it has one
        self._poll_at = 0.0
        self._group: RayWorkers | None = None
        self._pid = os.getpid()
        return RayEndpoint()

    @classmethod
    def host_class(cls, control: bool) -> Any:
        """The actor class, made once per process (``ray.remote`` needs Ray imported).

        :param control: shard mode: the actor takes ``control()`` calls.
        """
        host = cls._host_classes.get(control)
        if host is None:
            if control:
                # control() has a thread of its own: credits must not queue behind a
                # take() that waits for data. take() stays alone in the default group,
                # one at a time, which is what lets it release the ring space of its
                # previous reply.
                host = _ray().remote(concurrency_groups={"control": 1})(WorkerHost)
            else:
                # No concurrency group: take() runs on the actor's main thread, as a plain
                # actor's calls do, without a hand-off to a group's thread per call.
                host = _ray().remote(WorkerHost)
            cls._host_classes[control] = host
        return host

    def make_workers(self, dfs: Sequence[Any], endpoint: Any, infos: Sequence[Any]) -> RayWorkers:
        self._group = RayWorkers(self, dfs, infos)
        return self._group

    def recv(self, timeout: float) -> Any:
        ready = self._ready
        if ready:
            return ready.popleft()
        if self._group is not None:
            self._refill(timeout)
            if ready:
                return ready.popleft()
        return flowplug.EMPTY

    def _refill(self, timeout: float) -> None:
        """Hand out the next :data:`CHUNK` datapoints of the next actor in turn that has
        some; look for replies first: without waiting (at most every :data:`POLL` s) when
        datapoints are queued, else up to ``timeout``.

        Each actor's replies queue on their own, so a worker's error report (or its
        datapoints) is handed out after at most one chunk of each other actor's, however
        many of theirs came in before it; and an actor's replies are fetched only when its
        queue is empty, so what waits here stays bounded by the calls in flight.
        """
        assert self._group is not None
        slots = self._group.slots
        queued = starved = False
        for slot in slots:
            if slot.replies:
                queued = True
            elif not slot.dead:
                starved = True
        if not queued:
            self._fetch(timeout)
        elif starved:
            now = time.monotonic()
            if now >= self._poll_at:
                self._poll_at = now + POLL
                self._fetch(0.0)
        n = len(slots)
        for k in range(n):
            slot = slots[(self._turn + k) % n]
            if slot.replies:
                reply = slot.replies[0]
                at = slot.at
                if at == 0 and len(reply) <= CHUNK:
                    self._ready.extend(reply)
                    slot.replies.popleft()
                else:
                    self._ready.extend(reply[at : at + CHUNK])
                    if at + CHUNK >= len(reply):
                        slot.replies.popleft()
                        slot.at = 0
                    else:
                        slot.at = at + CHUNK
                self._turn = (self._turn + k + 1) % n
                return

    def _fetch(self, timeout: float) -> None:
        """Take the replies of the actors whose queue is empty, waiting up to ``timeout``
        for the first; queue the datapoints they carry, keep IN_FLIGHT calls going per
        actor and record deaths in the group."""
        ray = _ray()
        group = self._group
        assert group is not None
        if timeout:
            # Shard mode: give back the credits held before waiting, or a worker idles.
            group.flush_control()
        by_ref = {}
        for slot in group.slots:
            if slot.dead or slot.replies:
                continue
            while len(slot.pending) < IN_FLIGHT:
                slot.pending.append(slot.actor.take.remote(_TAKE_WAIT, self.per_reply))
            for ref in slot.pending:
                by_ref[ref] = slot
        if not by_ref:
            if timeout:
                time.sleep(timeout)  # every actor is gone and nothing is left
            return
        refs = list(by_ref)
        if timeout:
            ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
            if not ready:
                return
            if rest:  # whatever else is in already, so every worker gets its turn
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
        else:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not ready:
                return
        done = set(ready)
        for slot in group.slots:
            # An actor's replies in call order; each one taken is replaced at once.
            got = []
            while slot.pending and slot.pending[0] in done and not slot.dead:
                got.append(slot.pending.popleft())
                slot.pending.append(slot.actor.take.remote(_TAKE_WAIT, self.per_reply))
            if not got:
                continue
            try:
                replies = ray.get(got)
            except ray.exceptions.RayError as exc:
                slot.pending.clear()
                group.died(slot, self._actor_death(slot, exc))
                continue
            for header, blob, death in replies:
                if blob is not None:
                    slot.replies.append(unpack_batch(header, blob))
                if death is not None:
                    slot.pending.clear()
                    group.died(slot, death)
                    break

    def _actor_death(self, slot: _Slot, exc: BaseException) -> flowplug.Death:
        said = " ".join(_said(exc).split())
        if len(said) > 600:
            said = said[:600] + "..."
        return flowplug.Death(
            slot.id,
            slot.actor_pid,
            None,
            f"its Ray actor on node {slot.node} is gone; Ray says: {type(exc).__name__}: {said}",
        )

    def close(self) -> None:
        # The actors are killed by the group's stop(), which the Runner calls first; what is
        # left here is the consumer's share: refs and received datapoints not yet consumed.
        group = getattr(self, "_group", None)
        if group is not None and os.getpid() == self._pid:
            group.stop()
            group.slots = []  # and the replies they still held
        self._group = None
        ready = getattr(self, "_ready", None)
        if ready is not None:
            ready.clear()
