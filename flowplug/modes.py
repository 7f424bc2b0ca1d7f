"""What one pass over a Runner's workers means: replicate, shard (and map, in parallel.py).

The :class:`~flowplug.Runner` holds the configuration and the lifecycle (start, errors,
deaths, timeouts, stop); a :class:`Mode` holds the state of its passes (epochs) and turns
what the workers send into the datapoints of one epoch. A Runner has one mode object,
made from the ``mode=`` name (:data:`MODES`), or given as a :class:`Mode` instance: the
extension point :class:`~flowplug.ParallelMap` uses.

Each epoch reads from a :class:`Feed`: the started :class:`Run` (transport, workers,
control), and the Runner's slow path (:attr:`Feed.slow`) for everything that is not a
datapoint. Every call into the transport goes through the run: its ``recv``/``send_task``,
or, on the per-datapoint path, the same steps written out (mark :attr:`Run.inside`, check
:attr:`Run.closing`), so that ``close()`` from another thread never closes the transport
under a receive (flowplug.runner._Run).
"""

from __future__ import annotations

import difflib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from . import _resume
from ._gates import AUTO_CEILING, Control, EpochEnd, Item, auto_shares, replicate_shares
from ._passcheck import START as PASS_START
from .errors import ConfigError, PluginError, ShardMismatch, StateError
from .stats import Meter
from .transport import EMPTY, Transport
from .worker_groups import WorkerGroup
from .worker_loop import RemoteFailure

#: how long one blocking receive waits before the runner checks on its workers.
POLL_INTERVAL = 0.1

#: a value no datapoint is (an empty slot of a reorder buffer).
_NOTHING: Any = object()


class Run(Protocol):
    """A started run, as a mode uses it (the Runner's ``flowplug.runner._Run``)."""

    transport: Transport
    workers: WorkerGroup
    #: the consumer-to-worker control (shard mode, map), or None.
    control: Control | None
    #: the id of the consumer thread while it is inside the transport, else 0.
    inside: int
    #: None while open; else the run is closing, and :meth:`refusal` is the error to raise.
    closing: str | None

    def refusal(self) -> StateError: ...

    def recv(self, timeout: float) -> Any:
        """``transport.recv``, as the consumer thread; refused once closing."""
        ...

    def send_task(self, task: Any, timeout: float) -> bool:
        """``transport.send_task``, as the consumer thread; refused once closing."""
        ...


@dataclass
class Feed:
    """What an epoch reads from: a started run, as its :class:`Mode` sees it."""

    run: Run
    num_workers: int
    capacity: int
    #: the number of datapoints of an epoch in replicate mode, None when unknown.
    size: int | None
    #: the Runner's ``timeout`` (None: wait forever), and its transport's name, for errors.
    timeout: float | None
    transport_name: str
    #: the Runner's slow path: given what ``recv`` returned that is not a plain datapoint
    #: (EMPTY, an error report, or anything while a worker died), it raises the error,
    #: the death or the timeout, or returns the next object received (waiting: the fast
    #: path receives with ``recv(0.0)``, so that a wait is timed in one place).
    slow: Callable[[Any], Any]
    #: what :meth:`flowplug.Runner.stats` reports: an epoch adds to ``meter.delivered``.
    meter: Meter
    #: the Runner's way to fail: it closes the runner and returns the error to raise.
    fail: Callable[[BaseException], BaseException]

    @property
    def workers(self) -> WorkerGroup:
        return self.run.workers

    @property
    def control(self) -> Control | None:
        return self.run.control


class Mode(ABC):
    """How a Runner runs its workers and what one epoch of them yields.

    One instance per Runner; it keeps the state that spans epochs. Subclass it to give a
    Runner a new kind of pass (as :class:`~flowplug.ParallelMap` does).
    """

    #: the mode's name, as ``Runner.mode`` shows it.
    name: ClassVar[str]
    #: true when the mode has a position to save: :meth:`state_dict`, :meth:`load_state_dict`.
    resumable: ClassVar[bool] = False

    def check(self, num_workers: int, capacity: int) -> None:
        """Refuse settings this mode cannot run with (:class:`~flowplug.ConfigError`)."""

    def dataflows(self, num_workers: int) -> list[Any] | None:
        """What each worker runs; None: a copy of the Runner's dataflow each."""
        return None

    def max_in_flight(self, capacity: int) -> int:
        """The most datapoints the workers may have made and not yet delivered, across
        them (the transport's ``max_in_flight``): ``capacity`` unless the mode sizes its
        credits itself."""
        return capacity

    def control(
        self, num_workers: int, start_method: str | None, capacity: int, transport: Transport
    ) -> Control | None:
        """The control of workers the Runner starts; None when the mode needs none."""
        return None

    def group_control(
        self, workers: WorkerGroup, num_workers: int, capacity: int, transport_name: str
    ) -> Control | None:
        """The control over a group the transport runs (:class:`~flowplug.OwnWorkersTransport`)."""
        return None

    def prepare(self, dfs: list[Any]) -> list[Any]:
        """What the workers run, given the dataflows they would run; at start."""
        return dfs

    @abstractmethod
    def epoch(self, feed: Feed) -> Iterator[Any]:
        """Yield the datapoints of the next epoch."""

    def state_dict(
        self,
        num_workers: int,
        feed: Feed | None,
        mid: bool,
        closed: Callable[[], bool],
        seed: int,
    ) -> dict[str, Any]:
        """Where the consumer is (docs/checkpoint.md); only when :attr:`resumable`.

        :param feed: the started run, or None before the start.
        :param mid: an epoch's iteration is suspended (between two ``next()``).
        :param closed: whether the runner is closed by now.
        :param seed: the Runner's seed (a mode whose passes depend on it saves it).
        """
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any], num_workers: int) -> int | None:
        """Resume from ``state``, before the start; only when :attr:`resumable`.

        :returns: the seed the saved run had, when the mode saved it (the Runner takes
            it), else None.
        """
        raise NotImplementedError


class ReplicateMode(Mode):
    """Every worker runs its own copy of the dataflow, forever; an epoch is ``len(df)``
    datapoints as they come (or never ends when the length is unknown).

    Over workers the Runner starts, ``capacity`` is a bound across them: each worker has
    its share as credits (:class:`~flowplug._gates.ReplicateGate`), takes one before its
    dataflow makes a datapoint and sends ``(worker id, datapoint)``; the epoch gives it
    back when it yields the datapoint. A group the transport runs keeps its own bound.
    """

    name = "replicate"

    def __init__(self, auto_capacity: bool = False):
        #: ``capacity`` was left unset: the workers size their credits by the datapoints
        #: (flowplug._gates.Auto), ``capacity`` being the least they get.
        self.auto_capacity = auto_capacity

    def max_in_flight(self, capacity: int) -> int:
        return max(capacity, AUTO_CEILING) if self.auto_capacity else capacity

    def control(
        self, num_workers: int, start_method: str | None, capacity: int, transport: Transport
    ) -> Control:
        shares = replicate_shares(capacity, num_workers)
        auto = auto_shares(capacity, num_workers) if self.auto_capacity else None
        return Control(num_workers, start_method, shares=shares, auto=auto)

    def epoch(self, feed: Feed) -> Iterator[Any]:
        if feed.control is not None:
            return self._credited_epoch(feed)
        return self._plain_epoch(feed)

    def _credited_epoch(self, feed: Feed) -> Iterator[Any]:
        """Datapoints come as ``(worker id, datapoint)``; each gives its worker's credit
        back when it is yielded."""
        run = feed.run
        control = feed.control
        assert control is not None
        release = control.release
        # A credit goes back as its datapoint is yielded, unless the worker sleeps for
        # credits (its flag, control.waiting): then they are held back until there are
        # control.refills of them, and all that are held before the consumer waits.
        waiting = control.waiting
        refills = control.refills
        pending = control.pending
        recv = run.transport.recv
        workers = run.workers
        size = feed.size
        meter = feed.meter
        slow = feed.slow
        count = 0
        me = threading.get_ident  # called per receive: a generator may move between threads
        while size is None or count < size:
            run.inside = me()  # see Run: close() from another thread waits for this
            try:
                if run.closing is not None:
                    raise run.refusal()
                obj = recv(0.0)
            finally:
                run.inside = 0
            if type(obj) is not tuple or workers.death is not None:
                if obj is EMPTY:  # about to wait: give back every credit held first
                    control.give_held()
                obj = slow(obj)
            # control.give(w), written out (a call per datapoint costs more)
            w = obj[0]
            held = pending[w]
            if held < 0:
                if refills[w] > 1 and waiting[w](False):
                    pending[w] = 1  # it sleeps: hold this one, and wake it with a refill
                else:
                    release[w]()
            else:
                held += 1
                if held >= refills[w]:
                    give = release[w]
                    for _ in range(held):
                        give()
                    held = -1
                pending[w] = held
            count += 1
            meter.delivered += 1
            yield obj[1]

    def _plain_epoch(self, feed: Feed) -> Iterator[Any]:
        """A group the transport runs (no credits): datapoints come as they are."""
        run = feed.run
        recv = run.transport.recv
        workers = run.workers
        size = feed.size
        meter = feed.meter
        count = 0
        me = threading.get_ident  # called per receive: a generator may move between threads
        while size is None or count < size:
            run.inside = me()  # see Run: close() from another thread waits for this
            try:
                if run.closing is not None:
                    raise run.refusal()
                obj = recv(0.0)
            finally:
                run.inside = 0
            if obj is EMPTY or type(obj) is RemoteFailure or workers.death is not None:
                obj = feed.slow(obj)
            count += 1
            meter.delivered += 1
            yield obj


class ShardMode(Mode):
    """One epoch yields every item of one pass of the dataflow exactly once, split over
    the workers, which prefetch the next epoch without mixing them (docs/sharding.md).

    Items arrive as :data:`~flowplug._gates.Item` ``(epoch, index, value)``; each worker
    ends its share of an epoch with an :class:`~flowplug._gates.EpochEnd`. Every item
    yielded or dropped gives its worker a credit back.
    """

    name = "shard"
    resumable = True

    def __init__(self, ordered: bool):
        self.ordered = ordered
        #: the consumer's epoch: the last one started.
        self.epoch_no = -1
        #: per epoch, the items that arrived ahead of it, by index.
        self.ahead: dict[int, dict[int, Any]] = {}
        #: per epoch, the workers that ended it.
        self.ended: dict[int, set[int]] = {}
        #: the epoch and what the consumer received of it (state_dict(), load_state_dict()).
        self.progress = _resume.Progress("shard")
        # Without df.shard() the passes are checked (flowplug._passcheck): the length and
        # digest each worker reported for its whole pass, per epoch.
        self.checked = False
        self.pass_ends: dict[int, dict[int, tuple[int, int]]] = {}
        self.df_name = ""

    def check(self, num_workers: int, capacity: int) -> None:
        if capacity < num_workers:
            raise ConfigError(
                f"mode='shard' needs capacity >= num_workers (every worker holds at least one "
                f"item in flight), got capacity={capacity} for num_workers={num_workers}; "
                "raise capacity or lower num_workers"
            )

    def control(
        self, num_workers: int, start_method: str | None, capacity: int, transport: Transport
    ) -> Control:
        return Control(num_workers, start_method, credits=capacity // num_workers)

    def group_control(
        self, workers: WorkerGroup, num_workers: int, capacity: int, transport_name: str
    ) -> Control:
        sinks = workers.control_sinks(capacity // num_workers)
        if sinks is None:
            raise ConfigError(
                f"transport {transport_name!r} runs its own workers, and its worker group "
                f"({type(workers).__name__}) cannot carry the per-worker control that "
                "mode='shard' needs (WorkerGroup.control_sinks); use mode='replicate', or "
                "a transport whose workers the runner starts"
            )
        if len(sinks) != num_workers:
            raise PluginError(
                f"{type(workers).__name__}.control_sinks() of transport {transport_name!r} "
                f"returned {len(sinks)} sinks for {num_workers} workers, where it must return "
                "one per worker; report it to the plugin's authors"
            )
        return Control(num_workers, None, sinks=sinks)

    def epoch(self, feed: Feed) -> Iterator[Any]:
        control = feed.control
        assert control is not None
        k = self.epoch_no = self.epoch_no + 1
        control.start_epoch(k)  # workers may now run epoch k + 1, and must leave k - 1
        progress = self.progress
        skip = progress.begin(k)  # after a resume: what the saved run had received
        n = feed.num_workers
        release = control.release
        # give(w): a credit back as the datapoint is yielded, held for a refill while the
        # worker sleeps for credits (flowplug._gates.Control.give); give_held() before
        # the consumer waits. The rare paths (old epochs) release at once.
        give = control.give
        give_held = control.give_held
        for old in [e for e in self.ahead if e < k]:  # an epoch the user broke out of
            for index in self.ahead.pop(old):
                release[index % n]()
        for old in [e for e in self.ended if e < k]:
            del self.ended[old]
        for old in [e for e in self.pass_ends if e < k]:
            del self.pass_ends[old]
        # Kept on self, not popped: items left here when the user breaks out are released
        # when the next epoch starts, so no credit is ever lost.
        buf = self.ahead.setdefault(k, {})
        ended = self.ended.setdefault(k, set())
        run = feed.run
        recv = run.transport.recv
        workers = run.workers
        me = threading.get_ident  # called per receive: a generator may move between threads
        slow = feed.slow
        meter = feed.meter
        if self.checked:
            yield from self._checked_epoch(feed, k, buf, ended, skip)
        elif not self.ordered:
            got = progress.got.add
            while len(ended) < n:
                if buf:  # arrived ahead, or while state_dict() waited
                    index, dp = buf.popitem()
                    give(index % n)
                    got(index)
                    meter.delivered += 1
                    yield dp
                    continue
                run.inside = me()  # see Run
                try:
                    if run.closing is not None:
                        raise run.refusal()
                    obj = recv(0.0)
                finally:
                    run.inside = 0
                if type(obj) is not Item or obj[0] != k or workers.death is not None:
                    if obj is EMPTY:  # about to wait: give back what is held for refills
                        give_held()
                    obj = slow(obj)
                    if not self._file(obj, k, release, n):
                        continue
                give(obj[1] % n)
                got(obj[1])
                meter.delivered += 1
                yield obj[2]
        else:
            nxt = 0  # the index to yield next
            while True:
                dp = buf.pop(nxt, _NOTHING)
                if dp is _NOTHING:
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
                    run.inside = me()  # see Run
                    try:
                        if run.closing is not None:
                            raise run.refusal()
                        obj = recv(0.0)
                    finally:
                        run.inside = 0
                    if type(obj) is not Item or obj[0] != k or workers.death is not None:
                        if obj is EMPTY:  # about to wait: give back what is held
                            give_held()
                        obj = slow(obj)
                        if not self._file(obj, k, release, n):
                            continue
                    if obj[1] != nxt:
                        buf[obj[1]] = obj[2]
                        continue
                    dp = obj[2]
                give(nxt % n)
                nxt += 1
                progress.nxt = nxt
                meter.delivered += 1
                yield dp
        del self.ahead[k], self.ended[k]

    def _checked_epoch(
        self, feed: Feed, k: int, buf: dict[int, Any], ended: set[int], skip: Any
    ) -> Iterator[Any]:
        """Epoch ``k`` of shard mode without ``shard()``: every worker reads the whole pass
        and keeps its items. Each item carries the pass's digest before and after it, as
        its worker computed it (flowplug._passcheck): item ``i`` is yielded only once its
        "before" equals item ``i - 1``'s "after", so workers whose passes differ are an
        error, before any duplicate is delivered. In order, whatever ``ordered`` says.
        """
        assert feed.control is not None
        release = feed.control.release
        recv = feed.run.recv  # blocking receives: through the run (see Run)
        workers = feed.workers
        n = feed.num_workers
        progress = self.progress
        meter = feed.meter
        got = None if self.ordered else progress.got.add  # what state_dict() reads
        nxt = 0
        last: int | None = PASS_START  # the digest after item nxt - 1; None: not known
        while True:
            item = buf.pop(nxt, _NOTHING)
            if item is _NOTHING:
                if skip is not None and nxt in skip:  # received before a resume: not sent
                    nxt += 1
                    last = None  # the pair across the gap cannot be compared
                    continue
                if nxt % n in ended:  # the pass of nxt's worker ended before nxt
                    break
                obj = recv(POLL_INTERVAL)
                if type(obj) is not tuple or obj[0] != k or workers.death is not None:
                    obj = feed.slow(obj)
                    if not self._file(obj, k, release, n):
                        continue
                if obj[1] != nxt:
                    buf[obj[1]] = obj[2:]
                    continue
                item = obj[2:]
            dp, before, after = item
            if before != last and last is not None:
                raise feed.fail(self._passes_differ(k, nxt, n))
            last = after
            release[nxt % n]()
            if got is not None:
                got(nxt)
            nxt += 1
            progress.nxt = nxt
            meter.delivered += 1
            yield dp
        while len(ended) < n:  # every pass must have ended here, with the same digest
            obj = feed.slow(recv(POLL_INTERVAL))
            if self._file(obj, k, release, n):
                buf[obj[1]] = obj[2:]
        ends = self.pass_ends.pop(k, {})
        if buf or len(set(ends.values())) > 1:
            counts = ", ".join(f"worker {w}: {c}" for w, (c, _) in sorted(ends.items()))
            raise feed.fail(self._passes_differ(k, nxt, n, f"passes of {counts} items"))

    def _passes_differ(self, k: int, index: int, n: int, detail: str = "") -> ShardMismatch:
        name = self.df_name
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

    def _file(self, obj: Any, k: int, release: list[Callable[[], None]], n: int) -> bool:
        """Put away a message that is not an item of epoch ``k``; true if it is one after all."""
        if type(obj) is Item:
            epoch, index = obj[0], obj[1]
            if epoch == k:
                return True
            if epoch > k:  # a worker prefetching the next epoch
                self.ahead.setdefault(epoch, {})[index] = obj[2] if len(obj) == 3 else obj[2:]
            else:  # left over from an epoch the user broke out of
                release[index % n]()
            return False
        if type(obj) is EpochEnd:
            if obj.epoch >= k:
                self.ended.setdefault(obj.epoch, set()).add(obj.worker_id)
                if obj.count >= 0:
                    self.pass_ends.setdefault(obj.epoch, {})[obj.worker_id] = (
                        obj.count,
                        obj.digest,
                    )
            return False
        if type(obj) is _resume.PassStart:
            if obj.epoch >= k:
                self.progress.passed(obj)
            return False
        raise StateError(
            f"a worker sent a {type(obj).__name__} where shard mode expects items; "
            "is a dataflow sending to the transport itself?"
        )

    # ------------------------------------------------------------------ checkpoints

    def prepare(self, dfs: list[Any]) -> list[Any]:
        self.df_name = type(dfs[0]).__name__
        self.checked = len(dfs) > 1 and not callable(getattr(dfs[0], "shard", None))
        plan = self.progress.plan()
        if plan is None:
            return dfs
        # A resumed runner: its workers get the plan with their dataflow.
        return [_resume.Resumed(df, plan) for df in dfs]

    def state_dict(
        self,
        num_workers: int,
        feed: Feed | None,
        mid: bool,
        closed: Callable[[], bool],
        seed: int,
    ) -> dict[str, Any]:
        """Mid-epoch (an iteration is suspended) it is that epoch; otherwise the next one.
        The dataflow states are those the workers reported at the start of that epoch's
        pass; when some have not arrived yet, this receives until they have, keeping the
        items for the epoch's iteration."""
        progress = self.progress
        k = self.epoch_no
        if not mid:
            k += 1  # the epoch the next iteration runs
        received = (
            progress.received(k, self.ordered)
            if mid
            else (progress.skip if k == 0 and progress.skip is not None else _resume.Done())
        )
        n = num_workers
        if feed is None:  # not started: what was loaded, or a fresh start
            states = progress.states if k == 0 else None
            return progress.to_dict(k, received, n, states, seed)
        assert feed.control is not None
        release = feed.control.release
        feed.control.give_held()  # it waits below: no worker sleeps for a held credit
        passes = progress.passes.setdefault(k, {})
        while len(passes) < n:
            if closed():
                raise StateError(
                    "this runner is closed before its workers reported where epoch "
                    f"{progress.base + k} starts; take state_dict() before closing"
                )
            obj = feed.slow(feed.run.recv(POLL_INTERVAL))
            if self._file(obj, k, release, n):  # an item of epoch k: its iteration yields it
                self.ahead.setdefault(k, {})[obj[1]] = obj[2] if len(obj) == 3 else obj[2:]
        states = [passes[w] for w in range(n)]
        states_ = None if all(s is None for s in states) else states
        return progress.to_dict(k, received, n, states_, seed)

    def load_state_dict(self, state: dict[str, Any], num_workers: int) -> int | None:
        # The run's seed: the passes of a dataflow without shard() are seeded from it
        # and the absolute epoch, so the resumed passes are the saved run's passes.
        self.progress.load(state, num_workers)
        return self.progress.seed


#: the modes a Runner accepts by name.
MODES = ("replicate", "shard")


def make_mode(name: str, ordered: bool, auto_capacity: bool = False) -> Mode:
    """The mode object for ``Runner(mode=name, ordered=ordered)``; ``auto_capacity``:
    ``capacity`` was left unset (replicate mode then sizes the credits by the datapoints).

    :raises flowplug.ConfigError: an unknown name, or ``ordered`` outside shard mode.
    """
    if name not in MODES:
        close = difflib.get_close_matches(str(name), MODES, n=1)
        raise ConfigError(
            f"mode={name!r} is not one of {', '.join(map(repr, MODES))}"
            + (f". Did you mean {close[0]!r}?" if close else "")
        )
    if name == "shard":
        return ShardMode(ordered)
    if ordered:
        raise ConfigError(
            "ordered=True needs mode='shard': replicated workers each run the whole "
            "dataflow, so there is no single order to keep"
        )
    return ReplicateMode(auto_capacity)
