"""Runtime statistics of a runner: ``runner.stats()`` (docs/bottleneck.md).

What is counted costs almost nothing on the hot path: the consumer adds one to a counter
per datapoint, and times only the waits it has to make anyway (a receive that found
nothing); a worker in shard mode publishes its count every few milliseconds and times its
waits for a credit or for the next epoch. A transport adds counters of its own through
:meth:`flowplug.Transport.counters`.
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
import threading
import time
from dataclasses import dataclass
from typing import Any

#: seconds of the "recent" rate (:attr:`RunnerStats.recent_items_per_s`).
RECENT = 5.0
#: the consumer waiting in ``next()`` for at least this fraction of the time means the
#: pipeline is input-bound.
INPUT_BOUND = 0.2
#: seconds between two calls of the ``flowplug_runner_stats`` hook while a runner runs.
HOOK_INTERVAL = 10.0

INPUT_BOUND_VERDICT = "input-bound: the consumer waits on the workers"
CONSUMER_BOUND_VERDICT = "consumer-bound: the workers wait on the consumer"
NO_VERDICT = "no verdict yet: too little delivered"
#: seconds of delivery (after the first datapoint) needed for a verdict.
MIN_ACTIVE = 0.05


@dataclass(frozen=True)
class WorkerStats:
    """One worker's numbers (forked or thread workers the Runner starts, every mode)."""

    #: the worker's index.
    id: int
    #: datapoints it produced (sent), over all epochs; a map's worker: tasks it answered.
    produced: int
    #: seconds it waited on the consumer, the wait it is in included: replicate mode, for
    #: room (a credit); shard mode, for a credit or for the consumer to start an epoch; a
    #: map's worker, for a task.
    blocked_s: float


@dataclass(frozen=True)
class RunnerStats:
    """What :meth:`flowplug.Runner.stats` returns; :meth:`as_dict` gives plain types.

    Example::

        s = runner.stats()
        print(s.verdict, f"{s.items_per_s:.0f} items/s")
    """

    #: the transport's name.
    transport: str
    #: ``"replicate"``, ``"shard"`` or ``"map"``.
    mode: str
    #: seconds since the workers started.
    elapsed_s: float
    #: of which the consumer waited for the first datapoint (the workers' start).
    startup_s: float
    #: datapoints the consumer received (yielded).
    delivered: int
    #: bytes the transport received, when it counts them (``"bytes_received"``); else None.
    bytes_delivered: int | None
    #: ``delivered / elapsed_s``.
    items_per_s: float
    #: items/s over about the last :data:`RECENT` seconds (over the run until then).
    recent_items_per_s: float
    #: seconds the consumer spent in ``next()`` waiting for a datapoint, after the first.
    consumer_blocked_s: float
    #: ``consumer_blocked_s / (elapsed_s - startup_s)``: what the verdict is made of.
    consumer_blocked_fraction: float
    #: per worker (forked or thread workers the Runner starts), else None.
    workers: tuple[WorkerStats, ...] | None
    #: what the transport counts (:meth:`flowplug.Transport.counters`), e.g. shm's copies.
    transport_counters: dict[str, float]
    #: :data:`INPUT_BOUND_VERDICT`, :data:`CONSUMER_BOUND_VERDICT` or :data:`NO_VERDICT`.
    verdict: str

    @property
    def input_bound(self) -> bool:
        """True when the consumer waits on the workers."""
        return self.verdict == INPUT_BOUND_VERDICT

    def as_dict(self) -> dict[str, Any]:
        """The same numbers as a dict of plain types (JSON-serializable)."""
        out = dataclasses.asdict(self)
        if self.workers is not None:
            out["workers"] = [dataclasses.asdict(w) for w in self.workers]
        return out

    def summary(self) -> str:
        """One line: the verdict and the numbers behind it."""
        return (
            f"{self.verdict} (the consumer waited in next() {self.consumer_blocked_fraction:.0%}"
            f" of {self.elapsed_s - self.startup_s:.1f} s after the first datapoint; "
            f"{self.delivered} datapoints, {self.items_per_s:.0f} items/s)"
        )


class WorkerCounters:
    """Per worker: datapoints produced and seconds blocked, written by the workers.

    Worker ``w``'s numbers are ``values[w * STRIDE:]``: what it produced, the seconds it
    was blocked in waits that ended, and when (``time.monotonic()``, one clock for every
    process of the machine) the wait it is in began, or 0: a worker blocked right now
    counts that wait too. A list for worker threads; for forked workers an anonymous
    shared mapping (no file, no fd: nothing to clean up). Workers started with spawn or
    forkserver would need a named segment: they are not counted (``values`` is None).
    """

    #: numbers per worker.
    STRIDE = 3

    def __init__(self, num_workers: int, start_method: str | None):
        self.num_workers = num_workers
        size = self.STRIDE * num_workers
        self.values: Any
        if start_method is None:
            self.values = [0.0] * size
        elif start_method == "fork":
            self.values = memoryview(mmap.mmap(-1, 8 * size)).cast("d")
        else:
            self.values = None

    def read(self) -> tuple[WorkerStats, ...] | None:
        if self.values is None:
            return None
        now = time.monotonic()
        v = list(self.values)
        out = []
        for w in range(self.num_workers):
            produced, blocked, since = v[self.STRIDE * w : self.STRIDE * w + 3]
            if since > 0:
                blocked += max(0.0, now - since)
            out.append(WorkerStats(w, int(produced), round(blocked, 6)))
        return tuple(out)


class Meter:
    """The consumer's counters; :meth:`snapshot` makes a :class:`RunnerStats`.

    ``delivered``, ``waited`` and ``startup`` are plain attributes the runner updates in
    place (``startup``: waiting for the first datapoint).
    """

    __slots__ = ("_lock", "delivered", "samples", "started", "startup", "waited", "workers")

    def __init__(self) -> None:
        self.started: float | None = None
        self.delivered = 0
        self.waited = 0.0
        self.startup = 0.0
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self.workers: WorkerCounters | None = None
        self._lock = threading.Lock()

    def start(self, workers: WorkerCounters | None) -> None:
        self.started = time.monotonic()
        self.workers = workers

    def snapshot(self, transport: str, mode: str, counters: dict[str, float]) -> RunnerStats:
        now = time.monotonic()
        delivered = self.delivered
        elapsed = now - self.started if self.started is not None else 0.0
        rate = delivered / elapsed if elapsed > 0 else 0.0
        with self._lock:  # the hook's timer thread samples too
            samples = self.samples
            while samples and now - samples[0][0] > RECENT:
                samples.popleft()
            recent = rate
            if samples and now - samples[0][0] > 0.5:
                recent = (delivered - samples[0][1]) / (now - samples[0][0])
            samples.append((now, delivered))
        startup = min(self.startup, elapsed)
        active = elapsed - startup
        blocked = min(self.waited, active)
        fraction = blocked / active if active > 0 else 0.0
        if delivered == 0 or active < MIN_ACTIVE:
            verdict = NO_VERDICT
        elif fraction >= INPUT_BOUND:
            verdict = INPUT_BOUND_VERDICT
        else:
            verdict = CONSUMER_BOUND_VERDICT
        received = counters.get("bytes_received")
        return RunnerStats(
            transport=transport,
            mode=mode,
            elapsed_s=round(elapsed, 6),
            startup_s=round(startup, 6),
            delivered=delivered,
            bytes_delivered=int(received) if received is not None else None,
            items_per_s=rate,
            recent_items_per_s=recent,
            consumer_blocked_s=round(blocked, 6),
            consumer_blocked_fraction=fraction,
            workers=self.workers.read() if self.workers is not None else None,
            transport_counters=dict(counters),
            verdict=verdict,
        )


class HookTimer:
    """Calls ``report()`` every :data:`HOOK_INTERVAL` seconds on a thread, until stopped."""

    def __init__(self, report: Any, interval: float | None = None):
        self._report = report
        self._interval = HOOK_INTERVAL if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowplug-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._report()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
