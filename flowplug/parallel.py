"""ParallelMap: apply a function to every datapoint of a dataflow in parallel workers.

The consumer reads the source and sends each datapoint as a task, an
:data:`~flowplug._gates.Item` ``(epoch, index, dp)``, through the transport's task channel
(:meth:`~flowplug.TaskTransport.send_task`); any free worker takes it and sends back
``(epoch, index, fn(dp))``. A ParallelMap is a :class:`~flowplug.Runner` with its own
:class:`~flowplug.modes.Mode`, :class:`MapMode`: the Runner does the rest (workers,
errors, deaths, timeouts, cleanup).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from . import _resume, plugins
from ._gates import Control, Item, MapWork
from .errors import ConfigError, RunnerTimeout, StateError, UnknownLength
from .modes import POLL_INTERVAL, Feed, Mode
from .runner import Runner
from .transport import EMPTY, TaskTransport, Transport
from .worker_groups import WorkerGroup

#: a value no answer is (an empty slot of the reorder buffer).
_NOTHING: Any = object()


class ParallelMap(Runner):
    """Apply ``fn`` to every datapoint of ``df`` in ``num_workers`` workers.

    One iteration (an epoch) reads one pass of ``df`` in the consumer and yields
    ``fn(dp)`` exactly once per input: in input order when ``ordered``, as completed
    otherwise (which is what tensorpack's ``strict=True`` gives: the exact set, in any
    order). At most ``capacity`` inputs are in flight or
    waiting to be yielded. Breaking out of an epoch and iterating again starts a clean
    epoch: answers to the abandoned one are dropped, and tasks of it not yet started are
    skipped. The result is a dataflow: it can feed a :class:`Runner` or another map.

    :param df: the source dataflow, read in the consumer (``reset_state()`` is called once,
        by this map's ``reset_state()``). A :class:`Runner` given here is closed with
        the map.
    :param fn: a function of one datapoint; picklable for ``spawn``/``forkserver``.
        Transports that copy (not ``zero_copy``) may give it read-only numpy arrays.
        If it has a ``reset_state()`` method, each worker calls it once when it starts,
        before its first task (set-up: seeds, opening files).
    :param num_workers: how many workers.
    :param transport: the transport's name; it must carry tasks (``carries_tasks``).
    :param ordered: yield in the order of ``df``.
    :param capacity: how many inputs may be in flight or buffered at once.
    :param drop_none: drop the inputs for which ``fn`` returns None (tensorpack
        ``MapData``); otherwise None is a result like any other.
    :param start_method: as for :class:`Runner`.
    :param timeout: seconds to wait for one result before raising
        :class:`~flowplug.RunnerTimeout`.
    :param seed: base of the per-worker seeds.
    :param length: the length that ``len()`` reports, as declared by the user (what
        tensorpack users do with ``FixedSizeData``): for a map with ``drop_none``, whose
        length is otherwise unknown, or a source without one. Not checked against what an
        epoch yields. (Not ``size=``: that is an option of the ``shm`` transport.)
    :param options: the transport's own options.
    :raises flowplug.ConfigError: the transport does not carry tasks.

    Example::

        def decode(path):
            return np.asarray(PIL.Image.open(path))

        with fp.ParallelMap(fp.DataFromList(paths), decode, num_workers=4) as images:
            for image in images:  # in the order of paths
                ...
    """

    def __init__(
        self,
        df: Any,
        fn: Callable[[Any], Any],
        num_workers: int | None = None,
        transport: str | None = None,
        ordered: bool = True,
        capacity: int | None = None,
        drop_none: bool = False,
        start_method: str | None = None,
        timeout: float | None = None,
        seed: int | None = None,
        length: int | None = None,
        **options: Any,
    ):
        if not callable(fn):
            raise TypeError(f"ParallelMap needs a function for fn, got {type(fn).__name__}")
        if not hasattr(df, "__iter__"):
            raise TypeError(
                f"ParallelMap reads df in the consumer, so it needs the dataflow itself "
                f"(with __iter__ and reset_state), got {type(df).__name__}"
            )
        mode = self._map = MapMode(df, fn, ordered, drop_none)
        super().__init__(
            df,
            transport=transport,
            num_workers=num_workers,
            capacity=capacity,
            start_method=start_method,
            timeout=timeout,
            seed=seed,
            mode=mode,
            **options,
        )
        if not self._transport_cls.carries_tasks:
            able = [n for n, c in plugins.available_transports().items() if c.carries_tasks]
            raise ConfigError(
                f"transport {self.transport_name!r} cannot carry tasks to the workers "
                f"(carries_tasks is false), which ParallelMap needs; use one that can: "
                f"{', '.join(able) or 'none installed'}"
            )
        self.fn = fn
        self.ordered = ordered
        self.drop_none = drop_none
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 0
        ):
            raise ConfigError(f"length= is a number of datapoints, got {length!r}")
        #: the length declared with length=, or None.
        self.declared_length = length

    # ------------------------------------------------------------------ lifecycle

    def reset_state(self) -> None:
        """Reset the source, then start the workers. Call once.

        :raises flowplug.StateError: called twice, or after ``close()``.
        """
        if self._run is None and not self._closed:
            if not isinstance(self._df, Runner):
                self._df.reset_state()  # a Runner starts when first iterated (or already has)
            if self._map.progress.states is not None:  # resumed: the source's saved state
                _resume.load_into(self._df, self._map.progress.states)
        super().reset_state()

    def close(self) -> None:
        """Stop the workers, release the transport, and close a Runner given as ``df``."""
        super().close()
        if isinstance(self._df, Runner):
            self._df.close()

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: the epoch, the inputs of it whose results it received,
        and the source's ``state_dict()`` at the start of that epoch (when it has one; a
        :class:`Runner` source in shard mode has). As :meth:`Runner.state_dict`.
        """
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (made by :meth:`state_dict`) on a new map built the same
        way, before it starts; the source's state is loaded into it at ``reset_state()``.
        The source must yield the same inputs in the same order on every run.
        """
        super().load_state_dict(state)

    def __len__(self) -> int:
        if self.declared_length is not None:
            return self.declared_length
        if self.drop_none:
            raise UnknownLength(
                "ParallelMap(drop_none=True) may drop items: no known length; declare the "
                "one to report with length="
            )
        return super().__len__()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._run else "new"
        return (
            f"<ParallelMap fn={getattr(self.fn, '__name__', self.fn)!r} "
            f"transport={self.transport_name!r} num_workers={self.num_workers} {state}>"
        )


class MapMode(Mode):
    """The passes of a :class:`ParallelMap`: each epoch feeds one pass of the source to the
    workers as tasks and yields their answers (in input order when ``ordered``).

    :param source: the dataflow read in the consumer.
    :param fn: the function the workers apply.
    """

    name = "map"
    resumable = True

    def __init__(self, source: Any, fn: Callable[[Any], Any], ordered: bool, drop_none: bool):
        self.source = source
        self.fn = fn
        self.ordered = ordered
        self.drop_none = drop_none
        #: the consumer's epoch: the last one started.
        self.epoch_no = -1
        #: tasks sent whose answer has not arrived, over all epochs.
        self.in_flight = 0
        #: the epoch and the inputs of it answered (state_dict(), load_state_dict()).
        self.progress = _resume.Progress("map")

    def dataflows(self, num_workers: int) -> list[Any]:
        return [MapWork(self.fn) for _ in range(num_workers)]

    def control(
        self, num_workers: int, start_method: str | None, capacity: int, transport: Transport
    ) -> Control:
        assert isinstance(transport, TaskTransport)
        return Control(num_workers, start_method, tasks=transport.open_tasks())

    def group_control(
        self, workers: WorkerGroup, num_workers: int, capacity: int, transport_name: str
    ) -> Control:
        raise ConfigError(
            f"transport {transport_name!r} runs its own workers, and its worker group "
            f"({type(workers).__name__}) cannot carry the per-worker control that "
            "ParallelMap needs (WorkerGroup.control_sinks); use a transport whose workers "
            "the runner starts"
        )

    def epoch(self, feed: Feed) -> Iterator[Any]:
        """One epoch: feed one pass of the source as tasks, yield the answers."""
        control = feed.control
        assert control is not None
        k = self.epoch_no = self.epoch_no + 1
        control.start_epoch(k)  # workers skip tasks of earlier epochs
        progress = self.progress
        skip = progress.begin(k)  # after a resume: the inputs the saved run had answered
        progress.passes[k] = {0: self._source_state()}
        got = progress.got.add
        run = feed.run
        assert isinstance(run.transport, TaskTransport)
        # Through the run: close() from another thread waits until these return.
        recv = run.recv
        send_task = run.send_task
        workers = run.workers
        slow = feed.slow
        meter = feed.meter
        cap = feed.capacity
        ordered = self.ordered
        drop_none = self.drop_none
        source = iter(self.source)
        exhausted = False
        held: Any = None  # a task the channel had no room for
        sent = 0  # tasks of this epoch sent, also the next index
        answered = 0  # answers of this epoch received
        nxt = 0  # ordered: the index to yield next; unordered: answers yielded or dropped
        buf: dict[int, Any] = {}  # ordered: answers that came before their turn
        try:
            while True:
                # Feed. The window sent - nxt <= cap bounds the reorder buffer (ordered).
                while held is not None or (
                    not exhausted and self.in_flight < cap and sent - nxt < cap
                ):
                    if held is None:
                        try:
                            dp = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        if skip is not None and sent in skip:
                            sent += 1  # answered before the resume: not sent again
                            answered += 1
                            if not ordered:
                                nxt += 1
                            continue
                        held = (k, sent, dp)  # an Item
                    if not send_task(held, 0.0):
                        break
                    held = None
                    sent += 1
                    self.in_flight += 1
                if ordered:
                    out = buf.pop(nxt, _NOTHING)
                    if out is not _NOTHING:
                        nxt += 1
                        progress.nxt = nxt
                        if out is not None or not drop_none:
                            meter.delivered += 1
                            yield out
                        continue
                    if skip is not None and nxt < sent and nxt in skip:
                        nxt += 1
                        continue
                if exhausted and answered == sent:
                    return
                if self.in_flight == 0:
                    # Nothing to wait for but the held task (the channel is not ready,
                    # e.g. no worker connected yet): wait on the channel instead.
                    assert held is not None
                    self._push(held, send_task, feed)
                    held = None
                    sent += 1
                    self.in_flight += 1
                    continue
                obj = recv(0.0)
                if type(obj) is not Item or obj[0] != k or workers.death is not None:
                    obj = slow(obj)
                    if type(obj) is not Item:
                        raise StateError(
                            f"a worker sent a {type(obj).__name__} where ParallelMap "
                            "expects answers"
                        )
                    if obj[0] != k:  # an answer to an epoch the user broke out of
                        self.in_flight -= 1
                        continue
                self.in_flight -= 1
                answered += 1
                if not ordered:
                    nxt += 1
                    got(obj[1])
                    out = obj[2]
                    if out is not None or not drop_none:
                        meter.delivered += 1
                        yield out
                elif obj[1] == nxt:
                    nxt += 1
                    progress.nxt = nxt
                    out = obj[2]
                    if out is not None or not drop_none:
                        meter.delivered += 1
                        yield out
                else:
                    buf[obj[1]] = obj[2]
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator (a Runner's epoch) lets go of its guard now

    # ------------------------------------------------------------------ checkpoints

    def state_dict(
        self,
        num_workers: int,
        feed: Feed | None,
        mid: bool,
        closed: Callable[[], bool],
        seed: int,
    ) -> dict[str, Any]:
        progress = self.progress
        k = self.epoch_no
        if mid:
            received: _resume.Done | None = progress.received(k, self.ordered)
            source = progress.passes.get(k, {}).get(0)
        else:
            k += 1
            received = progress.skip if k == 0 and progress.skip is not None else None
            if feed is None and k == 0:
                source = progress.states  # not started: what was loaded, or nothing
            else:
                source = self._source_state()
        return progress.to_dict(k, received or _resume.Done(), num_workers, source)

    def load_state_dict(self, state: dict[str, Any], num_workers: int) -> int | None:
        self.progress.load(state, num_workers)
        return None  # the workers only apply fn: the seed makes no pass

    def _source_state(self) -> Any:
        df = self.source
        if isinstance(df, Runner) and df.mode == "replicate":
            return None  # no position to save; resuming re-reads its stream
        return _resume.take_state(df)

    def _push(self, task: Any, send_task: Any, feed: Feed) -> None:
        """Send ``task``, waiting for room; notices deaths and the timeout meanwhile."""
        started = time.monotonic()
        timeout = feed.timeout
        while not send_task(task, POLL_INTERVAL):
            if feed.workers.death is not None:
                feed.slow(EMPTY)  # raises WorkerDied, or waits for the error report
            if timeout is not None and time.monotonic() - started > timeout:
                raise RunnerTimeout(
                    f"no worker took a task in {timeout:g} s on transport "
                    f"{feed.transport_name!r}; raise timeout= or check the workers"
                )
