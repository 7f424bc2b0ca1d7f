"""ParallelMap: apply a function to every datapoint of a dataflow in parallel workers.

The consumer reads the source and sends each datapoint as a task ``(epoch, index, dp)``
through the transport's task channel (:meth:`~flowplug.Transport.send_task`); any free
worker takes it and sends back ``(epoch, index, fn(dp))``. The Runner machinery does the
rest: workers, errors, deaths, timeouts, cleanup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from . import _resume, plugins
from ._gates import Control, MapWork
from .errors import ConfigError, RunnerTimeout, StateError, UnknownLength
from .runner import _MISSING, POLL_INTERVAL, Runner
from .transport import EMPTY, TaskTransport, Transport


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
        super().__init__(
            df,
            transport=transport,
            num_workers=num_workers,
            capacity=capacity,
            start_method=start_method,
            timeout=timeout,
            seed=seed,
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
        self.mode = "map"
        #: tasks sent whose answer has not arrived, over all epochs.
        self._in_flight = 0
        self._progress = _resume.Progress("map")

    # ------------------------------------------------------------------ lifecycle

    def reset_state(self) -> None:
        """Reset the source, then start the workers. Call once.

        :raises flowplug.StateError: called twice, or after ``close()``.
        """
        if self._run is None and not self._closed:
            if not isinstance(self._df, Runner):
                self._df.reset_state()  # a Runner starts when first iterated (or already has)
            if self._progress.states is not None:  # resumed: the source's saved state
                _resume.load_into(self._df, self._progress.states)
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
        progress = self._progress
        k = self._epoch_no
        if self._guard.locked():  # mid-epoch
            received: _resume.Done | None = progress.received(k, self.ordered)
            source = progress.passes.get(k, {}).get(0)
        else:
            k += 1
            received = progress.skip if k == 0 and progress.skip is not None else None
            if self._run is None and k == 0:
                source = progress.states  # not started: what was loaded, or nothing
            else:
                source = self._source_state()
        return progress.to_dict(k, received or _resume.Done(), self.num_workers, source)

    def _source_state(self) -> Any:
        df = self._df
        if isinstance(df, Runner) and df.mode == "replicate":
            return None  # no position to save; resuming re-reads its stream
        return _resume.take_state(df)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (made by :meth:`state_dict`) on a new map built the same
        way, before it starts; the source's state is loaded into it at ``reset_state()``.
        The source must yield the same inputs in the same order on every run.
        """
        if self._run is not None or self._closed:
            raise _resume.refuse_started(type(self).__name__)
        self._progress.load(state, self.num_workers)

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

    # ------------------------------------------------------------------ Runner hooks

    def _dataflows(self) -> list[Any]:
        return [MapWork(self.fn) for _ in range(self.num_workers)]

    def _control(self, transport: Transport) -> Control:
        assert isinstance(transport, TaskTransport)  # checked when the map was built
        return Control(self.num_workers, self.start_method, tasks=transport.open_tasks())

    def _iterate(self) -> Iterator[Any]:
        """One epoch: feed one pass of the source as tasks, yield the answers."""
        run = self._run
        assert run is not None and run.control is not None
        k = self._epoch_no = self._epoch_no + 1
        run.control.start_epoch(k)  # workers skip tasks of earlier epochs
        progress = self._progress
        skip = progress.begin(k)  # after a resume: the inputs the saved run had answered
        progress.passes[k] = {0: self._source_state()}
        got = progress.got.add
        meter = self._meter
        transport = run.transport
        assert isinstance(transport, TaskTransport)
        # Through the run: close() from another thread waits until these return.
        recv = run.recv
        send_task = run.send_task
        workers = run.workers
        cap = self.capacity
        ordered = self.ordered
        drop_none = self.drop_none
        source = iter(self._df)
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
                    not exhausted and self._in_flight < cap and sent - nxt < cap
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
                        held = (k, sent, dp)
                    if not send_task(held, 0.0):
                        break
                    held = None
                    sent += 1
                    self._in_flight += 1
                if ordered:
                    out = buf.pop(nxt, _MISSING)
                    if out is not _MISSING:
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
                if self._in_flight == 0:
                    # Nothing to wait for but the held task (the channel is not ready,
                    # e.g. no worker connected yet): wait on the channel instead.
                    assert held is not None
                    self._push(held, send_task, workers)
                    held = None
                    sent += 1
                    self._in_flight += 1
                    continue
                obj = recv(0.0)
                if type(obj) is not tuple or obj[0] != k or workers.death is not None:
                    obj = self._next_slow(obj)
                    if type(obj) is not tuple:
                        raise StateError(
                            f"a worker sent a {type(obj).__name__} where ParallelMap "
                            "expects answers"
                        )
                    if obj[0] != k:  # an answer to an epoch the user broke out of
                        self._in_flight -= 1
                        continue
                self._in_flight -= 1
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

    def _push(self, task: Any, send_task: Any, workers: Any) -> None:
        """Send ``task``, waiting for room; notices deaths and the timeout meanwhile."""
        started = time.monotonic()
        while not send_task(task, POLL_INTERVAL):
            if workers.death is not None:
                self._next_slow(EMPTY)  # raises WorkerDied, or waits for the error report
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise RunnerTimeout(
                    f"no worker took a task in {self.timeout:g} s on transport "
                    f"{self.transport_name!r}; raise timeout= or check the workers"
                )
