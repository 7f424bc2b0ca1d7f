"""Consumer-to-worker control for shard mode and ParallelMap, whatever the transport.

The transport carries data from the workers to the consumer (and, for ParallelMap, tasks
the other way); what the consumer has to tell its workers travels here, owned by the core:

- *epoch notices*: the consumer announces each epoch it starts. A worker may run epoch
  ``e`` once the consumer has started ``e - 1`` (so at most one epoch ahead), and abandons
  epoch ``e`` once the consumer has started a later one (the user broke out early): a
  busy worker looks every few milliseconds, a worker waiting for a credit when it gets
  one. Processes read them from a pipe each, threads from a shared board.
- *credits* (shard mode): a semaphore per worker, ``capacity // num_workers`` strong. A
  worker takes one before sending an item, the consumer gives it back when it yields or
  drops the item. It bounds what is in flight and buffered, reorder buffer included, to
  ``capacity`` items (see docs/sharding.md, "Why the buffer is bounded").

The consumer reaches each worker through a :class:`~flowplug.ControlSink`: here a pipe (or
the board) and the semaphore; for a group that runs its workers elsewhere, whatever its
:meth:`~flowplug.WorkerGroup.control_sinks` returns (which ends at sinks made here, by the
:class:`~flowplug.ProcessWorkers` hosting the worker).

Items travel as :data:`Item` ``(epoch, index, datapoint)``, each worker's pass ends with an
:class:`EpochEnd`; the consumer tells the epochs apart by the tag, so prefetching across
an epoch boundary never mixes them.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any

from ._passcheck import START, fingerprint, mix, seed_pass
from ._resume import PassStart, Resumed, load_into, take_state
from .errors import TransportClosed
from .serialize import not_picklable
from .stats import WorkerCounters
from .transport import EMPTY, TaskReceiver
from .worker_loop import TaskChannelFailed, TaskFailed, WorkerInfo

#: how often a waiting worker thread checks whether the runner stopped.
STOP_CHECK = 0.1
#: a worker under credits sends what its sender batched at least every ``min(BATCH,
#: credits // 2)`` datapoints (and publishes its count then). Half its credits: so that the
#: consumer has a batch to work on while the worker makes the next; with a batch as large
#: as the credits, the worker would send only once out of credits, and the two sides
#: would take turns (at the default capacity, a batching sender holds 64).
BATCH = 64
#: how often (s) a busy worker looks for a newer epoch: a pipe poll per item would cost
#: more than the rest of a small item's trip.
NOTICE_CHECK = 0.005


#: One item of shard mode or of a map, as it travels from a worker: ``(epoch, index,
#: value)`` (a map's tasks travel the same way, with the input as value). A plain tuple on
#: purpose: it is on the per-item path, and a NamedTuple pickles about 8 times slower
#: (its reduce runs in Python); the consumer checks ``type(obj) is Item``.
Item = tuple


@dataclass(frozen=True)
class EpochEnd:
    """Sent by a worker after its last item of ``epoch`` (or when it abandons the epoch)."""

    worker_id: int
    epoch: int
    #: a checked pass (shard mode without ``shard()``): how many items the whole pass had,
    #: and its digest (flowplug._passcheck); -1 when unchecked or abandoned.
    count: int = -1
    digest: int = 0


class _Stopped(TransportClosed):
    """A waiting worker thread saw the stop event."""


# ---------------------------------------------------------------------------- notices


class _PipeNotices:
    """A worker process's view of the epoch notices: the read end of its own pipe."""

    def __init__(self, conn: Any):
        self._conn = conn
        self.latest = -1

    def poll(self) -> int:
        """Return the newest epoch the consumer started, without blocking."""
        conn = self._conn
        while conn.poll():
            self.latest = int.from_bytes(conn.recv_bytes(), "little", signed=True)
        return self.latest

    def wait_for(self, epoch: int, stop: threading.Event | None) -> None:
        """Block until the consumer has started ``epoch`` (SIGTERM ends the wait)."""
        while self.latest < epoch:
            self.latest = int.from_bytes(self._conn.recv_bytes(), "little", signed=True)


class _Board:
    """The epoch notices of worker threads: one number and a condition."""

    def __init__(self) -> None:
        self.latest = -1
        self._cond = threading.Condition()

    def publish(self, epoch: int) -> None:
        with self._cond:
            self.latest = epoch
            self._cond.notify_all()

    def poll(self) -> int:
        return self.latest

    def wait_for(self, epoch: int, stop: threading.Event | None) -> None:
        with self._cond:
            while self.latest < epoch:
                self._cond.wait(STOP_CHECK)
                if stop is not None and stop.is_set():
                    raise _Stopped("the runner stopped")


def _acquire(sem: Any, stop: threading.Event | None) -> None:
    if stop is None:
        sem.acquire()  # a process: SIGTERM ends the wait
        return
    while not sem.acquire(timeout=STOP_CHECK):
        if stop.is_set():
            raise _Stopped("the runner stopped")


def _sleep_for(credits: Any, waiting: Any, stop: threading.Event | None) -> None:
    """Take a credit, none being free: raise the ``waiting`` flag, so that the consumer
    holds credits back until it can wake this worker with a refill, then sleep."""
    if waiting is None:
        _acquire(credits, stop)
        return
    waiting.release()
    _acquire(credits, stop)
    # Take the flag down, unless the consumer saw it (then it holds credits back for a
    # refill, and the next wait is woken by that).
    waiting.acquire(False)


# ---------------------------------------------------------------------------- worker side


class ShardGate:
    """One worker's side of shard mode: sends its shard of each epoch, within its credits."""

    def __init__(
        self,
        notices: Any,
        credits: Any,
        counters: Any = None,
        slot: int = 0,
        waiting: Any = None,
    ):
        self.notices = notices
        self.credits = credits
        #: the flag raised while it sleeps for credits (as ReplicateGate's), or None.
        self.waiting = waiting
        #: shared per-worker numbers (flowplug.stats.WorkerCounters.values), or None; this
        #: gate's are at ``slot``, ``slot + 1``, ``slot + 2`` (WorkerCounters; ``slot`` is
        #: a gate's place in its Control, which
        #: is not the worker's id when a group hosts some workers of a run).
        self.counters = counters
        self.slot = slot

    def run(self, df: Any, sender: Any, info: WorkerInfo, stop: threading.Event | None) -> None:
        """Send this worker's items of epoch 0, 1, 2... until stopped; never returns normally.

        The shard is ``df.shard(id, num_workers)`` when ``df`` defines it, else every
        ``num_workers``-th item of a full pass starting at ``id``. Either way the j-th item
        of the shard gets the index ``id + j * num_workers``.
        """
        w, n = info.id, info.num_workers
        plan = None
        if type(df) is Resumed:  # a resumed runner: see flowplug/_resume.py
            df, plan = df.inner, df.plan
        shard = getattr(df, "shard", None)
        source = shard(w, n) if callable(shard) else None
        target = source if source is not None else df
        if plan is not None and plan.states is not None:
            load_into(target, plan.state_for(w))
        skip = plan.skip if plan is not None else None
        # the absolute number of this worker's epoch 0 (non-zero after a resume): passes
        # are seeded by the run's seed and the absolute epoch, never the restarted count
        base = plan.base if plan is not None else 0
        # Without shard(), every worker reads whole passes: make them equal, and check it.
        checked = source is None and n > 1
        # the runner's seed, the same in every worker (each worker's seed is it + id)
        base_seed = (info.seed - w) % 2**31
        send = sender.send
        # Before any wait, push out what a batching sender holds: the consumer may be
        # waiting for exactly those items before it can give a credit back.
        flush = sender.flush
        notices = self.notices
        credits = self.credits
        try_acquire = credits.acquire
        # Statistics, published every NOTICE_CHECK at most: items sent, seconds waited for
        # room (a credit, or the consumer's next epoch).
        counters = self.counters
        slot = self.slot
        produced = 0
        blocked = 0.0
        epoch = 0
        while stop is None or not stop.is_set():
            waited = monotonic()
            notices.wait_for(epoch - 1, stop)
            blocked += monotonic() - waited
            index = w
            skipped = 0
            end = EpochEnd(w, epoch)
            if notices.poll() <= epoch and checked:
                send(PassStart(w, epoch, take_state(target)))
                flush()
                end, sent, blocked = self._checked_pass(
                    df, sender, info, stop, epoch, base + epoch, base_seed, skip, produced, blocked
                )
                produced += sent
            elif notices.poll() <= epoch:
                # The state this pass starts from: what a resumed run loads (no credit).
                send(PassStart(w, epoch, take_state(target)))
                flush()
                if source is None:
                    # One worker reading whole passes: seeded as the checked passes of
                    # several are, so that a run saved on n workers resumes on 1 and the
                    # other way round with the same passes (flowplug/_resume.py).
                    seed_pass(df, mix(base_seed, base + epoch) & 0x7FFFFFFF)
                items = source if source is not None else itertools.islice(df, w, None, n)
                next_check = monotonic() + NOTICE_CHECK
                for dp in items:
                    if skip is not None and index in skip:  # received before the resume
                        index += n
                        skipped += 1
                        continue
                    if not try_acquire(False):
                        flush()
                        waited = monotonic()
                        if counters is not None:  # blocked from now on (stats)
                            counters[slot + 2] = waited
                        _sleep_for(credits, self.waiting, stop)
                        blocked += monotonic() - waited
                        if counters is not None:
                            counters[slot + 1] = blocked
                            counters[slot + 2] = 0.0
                        next_check = 0.0  # we waited: the consumer may have moved on
                    if monotonic() >= next_check:
                        if counters is not None:
                            counters[slot] = produced + (index - w) // n - skipped
                            counters[slot + 1] = blocked
                        if notices.poll() > epoch:  # the consumer left this epoch
                            credits.release()
                            break
                        next_check = monotonic() + NOTICE_CHECK
                    send((epoch, index, dp))  # an Item
                    index += n
            send(end)
            flush()  # the consumer ends the epoch on this marker
            produced += (index - w) // n - skipped
            if counters is not None:
                counters[slot] = produced
                counters[slot + 1] = blocked
            epoch += 1
            skip = None  # only the first pass of a resumed run skips
        raise _Stopped("the runner stopped")

    def _checked_pass(
        self,
        df: Any,
        sender: Any,
        info: WorkerInfo,
        stop: threading.Event | None,
        epoch: int,
        absolute: int,
        base_seed: int,
        skip: Any,
        produced: int,
        blocked: float,
    ) -> tuple[EpochEnd, int, float]:
        """One whole pass of ``df``, seeded as in every other worker; sends this worker's
        items, each with the pass's digest before and after it (flowplug._passcheck).

        ``epoch`` is the runner's (it tags the items), ``absolute`` the run's: the seed is
        made of ``base_seed`` and ``absolute``, so a resumed run makes the saved passes.

        :returns: the end-of-epoch marker, how many items were sent, the seconds blocked.
        """
        w, n = info.id, info.num_workers
        send = sender.send
        flush = sender.flush
        notices = self.notices
        credits = self.credits
        try_acquire = credits.acquire
        counters = self.counters
        slot = self.slot
        seed_pass(df, mix(base_seed, absolute) & 0x7FFFFFFF)
        digest = START
        position = -1
        sent = 0
        next_check = monotonic() + NOTICE_CHECK
        for position, dp in enumerate(df):
            before = digest
            digest = mix(digest, fingerprint(dp))
            if position % n != w or (skip is not None and position in skip):
                continue  # another worker's item, or one received before a resume
            if not try_acquire(False):
                flush()
                waited = monotonic()
                if counters is not None:  # blocked from now on (stats)
                    counters[slot + 2] = waited
                _sleep_for(credits, self.waiting, stop)
                blocked += monotonic() - waited
                if counters is not None:
                    counters[slot + 1] = blocked
                    counters[slot + 2] = 0.0
                next_check = 0.0
            if monotonic() >= next_check:
                if counters is not None:
                    counters[slot] = produced + sent
                    counters[slot + 1] = blocked
                if notices.poll() > epoch:
                    credits.release()
                    return EpochEnd(w, epoch), sent, blocked  # abandoned: nothing to compare
                next_check = monotonic() + NOTICE_CHECK
            send((epoch, position, dp, before, digest))
            sent += 1
        return EpochEnd(w, epoch, position + 1, digest), sent, blocked


class ReplicateGate:
    """One worker's side of replicate mode: its own copy of the dataflow, pass after pass,
    within its credits (its share of ``capacity``).

    A credit is taken *before* the next datapoint is made, so that the datapoints made
    and not yet yielded by the consumer never exceed the credits, the one a worker holds
    while it waits included. Items travel as ``(worker id, datapoint)``: the consumer
    gives the credit back to that worker when it yields the datapoint.

    Out of credits, the worker raises its ``waiting`` flag (a semaphore too) and sleeps
    on ``credits``. The consumer gives credits back one per datapoint, as it yields them,
    so a worker that is running sees them at once; but once it sees the flag, it holds
    them back until it has ``refill`` (half the share) and gives them at once: a sleeping
    worker is woken once per refill, not once per datapoint (which would make it send
    every datapoint alone, as long as the consumer is the slower side).

    With ``auto`` (``capacity`` left unset: :class:`Auto`), the worker sets how many
    credits it has itself, from the size of what it sends: it adds credits to its
    semaphore, or takes free ones out, where it flushes.
    """

    def __init__(
        self,
        credits: Any,
        waiting: Any,
        share: int,
        counters: Any = None,
        slot: int = 0,
        auto: Auto | None = None,
    ):
        self.credits = credits
        self.waiting = waiting
        #: how many credits a sleeping worker is woken with: half the share.
        self.refill = max(1, share // 2)
        #: the credits this worker starts with.
        self.share = share
        #: its bounds when capacity is automatic, else None.
        self.auto = auto
        #: as :attr:`ShardGate.counters`: datapoints sent, seconds waited for a credit.
        self.counters = counters
        self.slot = slot

    def run(self, df: Any, sender: Any, info: WorkerInfo, stop: threading.Event | None) -> None:
        """Send ``(id, datapoint)`` for every datapoint of ``df``, repeating passes, until
        stopped; never returns normally."""
        w = info.id
        send = sender.send
        flush = sender.flush
        credits = self.credits
        try_acquire = credits.acquire
        waiting = self.waiting
        auto = self.auto
        limit = self.share  # the credits in circulation: free, out, or held by the consumer
        every = _every(limit)
        # Statistics: the count is published with each flush (every ``every`` datapoints),
        # before each wait and at the end of a pass; only the waits are timed.
        counters = self.counters if self.counters is not None else [0.0] * 3
        slot = self.slot if self.counters is not None else 0
        produced = 0  # before this pass
        blocked = 0.0
        _acquire(credits, stop)  # for the first datapoint
        left = every
        while stop is None or not stop.is_set():
            sent = 0
            for dp in df:
                try:
                    send((w, dp))
                except TypeError as exc:
                    raise _said_of(dp, (w, dp), exc) from exc.__cause__
                sent += 1
                left -= 1
                if not left:  # the consumer gets these while the next ones are made
                    flush()
                    counters[slot] = produced + sent
                    if auto is not None:
                        limit = auto.adjust(credits, limit, dp)
                        every = _every(limit)
                    left = every
                # a credit for the next one, before it is made
                if not try_acquire(False):
                    # Push out what a batching sender holds first: the consumer may be
                    # waiting for exactly those items before it can give a credit back.
                    flush()
                    counters[slot] = produced + sent
                    started = counters[slot + 2] = monotonic()  # blocked from now on
                    _sleep_for(credits, waiting, stop)
                    blocked += monotonic() - started
                    counters[slot + 1] = blocked
                    counters[slot + 2] = 0.0
            if sent == 0:
                raise RuntimeError(
                    f"dataflow {type(df).__name__} yielded no datapoint in a whole pass; "
                    "a runner repeats passes forever, so it would spin"
                )
            produced += sent
            counters[slot] = produced
        raise _Stopped("the runner stopped")


def _every(limit: int) -> int:
    """How often a worker with ``limit`` credits sends what it batched (see BATCH)."""
    return max(1, min(BATCH, limit // 2))


@dataclass
class Auto:
    """One worker's credits when ``capacity`` is left unset: between ``floor`` and
    ``ceiling``, as many as fit in ``budget`` bytes by the size of its datapoints
    (estimated where it flushes, every few dozen datapoints, by :func:`nbytes`)."""

    floor: int
    ceiling: int
    budget: int
    #: the estimated size of a datapoint (bytes): rises at once, falls by an eighth.
    size: int = 0

    def adjust(self, credits: Any, limit: int, dp: Any) -> int:
        """Move the credits in circulation towards what fits, given the datapoint just
        sent; return the new count. Never waits: credits it cannot take out now (they
        are out on datapoints) it takes at a later call."""
        size = nbytes(dp)
        self.size = size if size >= self.size else self.size - (self.size - size) // 8
        target = min(self.ceiling, max(self.floor, self.budget // max(self.size, 1)))
        while limit < target:
            credits.release()
            limit += 1
        while limit > target and credits.acquire(False):
            limit -= 1
        return limit


def nbytes(obj: Any, depth: int = 0) -> int:
    """An estimate of the memory ``obj`` holds: arrays and buffers by their ``nbytes``,
    strings and bytes by length, dicts, lists and tuples by their first 64 items (scaled
    to their length), four levels down; anything else by ``sys.getsizeof``."""
    size = getattr(obj, "nbytes", None)
    if type(size) is int:
        return size
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if depth < 4 and isinstance(obj, (dict, list, tuple)):
        items = obj.values() if isinstance(obj, dict) else obj
        n = len(obj)
        seen = sum(nbytes(x, depth + 1) for x in itertools.islice(items, 64))
        return sys.getsizeof(obj) + (seen * n // 64 if n > 64 else seen)
    return sys.getsizeof(obj)


def _said_of(dp: Any, sent: Any, exc: TypeError) -> TypeError:
    """The sender's error for ``sent``, the datapoint in its tag, said of ``dp`` itself:
    "datapoint of type dict cannot be pickled", not "of type tuple"."""
    cause = exc.__cause__
    if isinstance(cause, Exception) and str(exc) == str(not_picklable(sent, cause)):
        return not_picklable(dp, cause)
    return exc


#: ``capacity`` left unset, replicate mode: the datapoints made and not yet delivered fit
#: in this many bytes across the workers (by estimate), ...
AUTO_BUDGET = 64 << 20
#: ... and are at most this many, and at least the default ``capacity`` (50).
AUTO_CEILING = 1024


def auto_shares(floor: int, num_workers: int) -> list[Auto]:
    """Each worker's bounds in replicate mode when ``capacity`` is unset: its share of
    ``floor`` (the default capacity), of :data:`AUTO_CEILING` and of :data:`AUTO_BUDGET`."""
    floors = replicate_shares(floor, num_workers)
    ceilings = replicate_shares(max(floor, AUTO_CEILING), num_workers)
    budget = AUTO_BUDGET // num_workers
    return [Auto(f, c, budget) for f, c in zip(floors, ceilings, strict=True)]


def replicate_shares(capacity: int, num_workers: int) -> list[int]:
    """Each worker's credits in replicate mode: ``capacity`` split as evenly as it goes,
    at least one each (so ``num_workers`` when ``capacity`` is smaller)."""
    base, extra = divmod(capacity, num_workers)
    return [max(1, base + (w < extra)) for w in range(num_workers)]


class MapWork:
    """What a ParallelMap worker runs: ``fn``, in the dataflow slot of the worker loop."""

    def __init__(self, fn: Any):
        self.fn = fn

    def reset_state(self) -> None:
        # A function with set-up of its own (flowplug.torch's: seeds, worker_init_fn)
        # does it when the worker starts, before its first task.
        reset = getattr(self.fn, "reset_state", None)
        if callable(reset):
            reset()

    def __repr__(self) -> str:
        return f"the function {self.fn!r}"


class MapGate:
    """One worker's side of a ParallelMap: takes tasks, applies ``fn``, sends results."""

    def __init__(
        self,
        notices: Any,
        tasks: Callable[[int], TaskReceiver],
        counters: Any = None,
        slot: int = 0,
    ):
        self.notices = notices
        self.tasks = tasks
        #: as :attr:`ShardGate.counters`: tasks answered, seconds waited for a task.
        self.counters = counters
        self.slot = slot

    def run(
        self, work: MapWork, sender: Any, info: WorkerInfo, stop: threading.Event | None
    ) -> None:
        """Answer every task ``(epoch, index, dp)`` with ``(epoch, index, fn(dp))``.

        A task of an epoch the consumer has left is answered with ``None`` unseen: the
        consumer counts answers, and drops those of old epochs.

        :raises flowplug.worker_loop.TaskFailed: ``fn`` raised; the cause is its exception.
        """
        try:
            receiver = self.tasks(info.id)
        except BaseException as exc:  # reported past the transport (see TaskChannelFailed)
            raise TaskChannelFailed() from exc
        try:
            recv = receiver.recv
            send = sender.send
            flush = sender.flush
            fn = work.fn
            notices = self.notices
            # Statistics: one store per task (a task costs a receive, fn and a send); the
            # waits for a task (the consumer feeds too slowly) are timed where they happen.
            counters = self.counters
            slot = self.slot
            answered = 0
            waited = 0.0
            while stop is None or not stop.is_set():
                task = recv(0.0)
                if task is EMPTY:
                    flush()  # the consumer may wait for these answers before sending more
                    started = monotonic()
                    task = recv(STOP_CHECK)
                    waited += monotonic() - started
                    if counters is not None:
                        counters[slot + 1] = waited
                    if task is EMPTY:
                        continue
                epoch, index, dp = task
                if notices.poll() > epoch:
                    send((epoch, index, None))  # an Item, answered unseen
                    continue
                try:
                    out = fn(dp)
                except Exception as exc:
                    raise TaskFailed(index) from exc
                send((epoch, index, out))  # an Item
                answered += 1
                if counters is not None:
                    counters[slot] = answered
        finally:
            receiver.close()


# ---------------------------------------------------------------------------- consumer side


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


class _LocalSink(ControlSink):
    """A worker of this machine: its notice pipe (or the threads' board), its semaphore."""

    def __init__(self, writer: Any, board: _Board | None, sem: Any):
        self._writer = writer
        self._board = board
        if sem is not None:
            # The semaphore's own method: nothing in between on the hot path.
            self.release = sem.release  # type: ignore[method-assign]

    def start_epoch(self, epoch: int) -> None:
        if self._board is not None:
            self._board.publish(epoch)
        else:  # 8 bytes into an almost empty pipe: never blocks long
            self._writer.send_bytes(epoch.to_bytes(8, "little", signed=True))

    def release(self) -> None:  # replaced per instance in shard mode
        raise AssertionError("a ParallelMap has no credits")


class Control:
    """The consumer's side: announces epochs and returns credits; owns the local gates.

    :param num_workers: how many workers.
    :param start_method: the workers' start method; None when they are threads.
    :param credits: credits per worker (shard mode); None for a ParallelMap.
    :param tasks: the task endpoint (ParallelMap); None in shard mode.
    :param shares: replicate mode: each worker's credits (:func:`replicate_shares`); no
        epoch notices then, only the semaphores.
    :param auto: replicate mode with ``capacity`` unset: each worker's bounds (the shares
        are then the floors), from :func:`auto_shares`.
    :param sinks: the sinks of a group that carries the control itself
        (:meth:`flowplug.WorkerGroup.control_sinks`); no local gates are made then.
    """

    def __init__(
        self,
        num_workers: int,
        start_method: str | None,
        credits: int | None = None,
        tasks: Callable[[int], TaskReceiver] | None = None,
        sinks: Sequence[ControlSink] | None = None,
        shares: Sequence[int] | None = None,
        auto: Sequence[Auto] | None = None,
    ):
        self._writers: list[Any] = []
        self._readers: list[Any] = []
        self._board: _Board | None = None
        self.gates: list[ShardGate | MapGate | ReplicateGate] = []
        self.waiting: list[Any] = []
        self.refills: list[int] = []
        self.pending: list[int] = []
        #: what the local gates count (runner.stats()); None for a group's own sinks.
        self.counters: WorkerCounters | None = None
        if sinks is not None:
            self.sinks = list(sinks)
            self.release = [s.release for s in self.sinks]
            self.give = self._giver()
            return
        if shares is not None:  # replicate mode: credits only
            # Multiprocessing semaphores for threads too: their acquire and release are C
            # code, 30 times cheaper than threading.Semaphore's (on every datapoint).
            ctx = mp.get_context(start_method)
            sems: list[Any] = [ctx.Semaphore(k) for k in shares]
            flags = [ctx.Semaphore(0) for _ in shares]
            counters = self.counters = WorkerCounters(num_workers, start_method)
            autos = list(auto) if auto is not None else [None] * num_workers
            gates = [
                ReplicateGate(sem, flag, k, counters.values, WorkerCounters.STRIDE * i, a)
                for i, (sem, flag, k, a) in enumerate(zip(sems, flags, shares, autos, strict=True))
            ]
            self.gates = list(gates)
            #: replicate mode: ``waiting[w](False)`` takes worker ``w``'s flag (it sleeps
            #: for credits), ``refills[w]`` how many credits it is woken with, and
            #: ``pending[w]`` how many the consumer holds back for it meanwhile (-1: none,
            #: it is not known to sleep); all are given back before the consumer waits.
            self.waiting = [f.acquire for f in flags]
            self.refills = [g.refill for g in gates]
            self.pending = [-1] * num_workers
            self.sinks = [_LocalSink(None, None, sem) for sem in sems]
            self.release = [sem.release for sem in sems]
            self.give = self._giver()
            return
        notices: list[Any]
        if start_method is not None:
            ctx = mp.get_context(start_method)
            try:
                for _ in range(num_workers):
                    reader, writer = ctx.Pipe(duplex=False)
                    self._readers.append(reader)
                    self._writers.append(writer)
            except BaseException:  # out of fds: the Runner never gets this object to close
                self.close()
                raise
            notices = [_PipeNotices(r) for r in self._readers]
            make_sem: Any = ctx.Semaphore
        else:
            self._board = _Board()
            notices = [self._board] * num_workers
            make_sem = threading.Semaphore
        sems = [make_sem(credits) for _ in range(num_workers)] if credits else [None] * num_workers
        if credits:
            counters = self.counters = WorkerCounters(num_workers, start_method)
            flags = [mp.get_context(start_method).Semaphore(0) for _ in range(num_workers)]
            self.gates = [
                ShardGate(m, s, counters.values, WorkerCounters.STRIDE * i, f)
                for i, (m, s, f) in enumerate(zip(notices, sems, flags, strict=True))
            ]
            self.waiting = [f.acquire for f in flags]
            self.refills = [max(1, credits // 2)] * num_workers
            self.pending = [-1] * num_workers
        else:
            assert tasks is not None
            counters = self.counters = WorkerCounters(num_workers, start_method)
            self.gates = [
                MapGate(m, tasks, counters.values, WorkerCounters.STRIDE * i)
                for i, m in enumerate(notices)
            ]
        writers = self._writers or [None] * num_workers
        #: one per worker, in worker order.
        self.sinks = [_LocalSink(w, self._board, s) for w, s in zip(writers, sems, strict=True)]
        #: ``release[w]()`` gives worker ``w`` one credit back (shard mode).
        self.release = [s.release for s in self.sinks] if credits else []
        self.give = self._giver()

    def _giver(self) -> Callable[[int], None]:
        """``give(w)``: worker ``w``'s credit for a datapoint yielded, as replicate mode's
        loop gives it (ReplicateGate): at once, unless the worker sleeps for credits (its
        flag is up); then held back until there is a refill of them. Without flags (a
        group's sinks) at once."""
        release = self.release
        waiting = self.waiting
        refills = self.refills
        pending = self.pending
        if not waiting:
            return lambda w: release[w]()

        def give(w: int) -> None:
            held = pending[w]
            if held < 0:
                if refills[w] > 1 and waiting[w](False):
                    pending[w] = 1  # it sleeps: hold this one, and wake it with a refill
                else:
                    release[w]()
                return
            held += 1
            if held >= refills[w]:
                one = release[w]
                for _ in range(held):
                    one()
                held = -1
            pending[w] = held

        return give

    def give_held(self) -> None:
        """Give back every credit held for a refill: the consumer is about to wait, and a
        worker that sleeps for them may be what it waits for."""
        pending = self.pending
        release = self.release
        for w, held in enumerate(pending):
            if held > 0:
                one = release[w]
                for _ in range(held):
                    one()
                pending[w] = -1

    def start_epoch(self, epoch: int) -> None:
        """Tell every worker that the consumer started ``epoch``."""
        if self._board is not None:
            self._board.publish(epoch)  # one board for all the threads
            return
        for sink in self.sinks:
            sink.start_epoch(epoch)

    def close(self) -> None:
        """Close the pipes; after the workers are stopped. Idempotent."""
        for conn in self._writers + self._readers:
            conn.close()
        self._writers = []
        self._readers = []
        self.gates = []
        self.sinks = []
