"""The fault-injection scenarios; docs/reliability.md has the table they check.

Each ``scenario_*`` function injects one kind of fault into a Runner on one transport,
asserts the documented behaviour, and returns how many faults it injected. The pytest
modules next to this file run each scenario once per registered transport; ``soak.py``
runs a random mix for minutes. Only flowplug's public API is used, and the scenarios adapt
to what a transport declares (``crosses_processes``, ``uses_shared_memory``,
``size_limit_option``), never to its name.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import io
import multiprocessing as mp
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

import flowplug as fp
from flowplug.plugins import PluginInfo, get_registry
from flowplug.testing.contract import Counting, Slow, assert_second_iteration_refused
from flowplug.testing.leaks import SHM_DIR, leaked, snapshot

HERE = Path(__file__).resolve().parent
CONSUMER = HERE / "consumer.py"

#: how many create / iterate / close cycles scenario 11 runs (the soak session sets 1000).
CYCLES = int(os.environ.get("FLOWPLUG_FAULT_CYCLES", "100"))
#: generous bounds: they catch hangs, not slowness (the machine is shared and noisy).
DEATH_NOTICED_WITHIN = 10.0
ORPHANS_GONE_WITHIN = 10.0
CLOSE_RETURNS_WITHIN = 15.0

#: timings the scenarios measured, by name (the soak session prints their maximum).
MEASURED: dict[str, list[float]] = {}


def measured(name: str, seconds: float) -> None:
    MEASURED.setdefault(name, []).append(seconds)


def caps(transport: str) -> type[fp.Transport]:
    return fp.get_transport(transport)


# ---------------------------------------------------------------------------- dataflows
# Module-level so that they pickle for the spawn start method.


class Forever(fp.DataFlow):
    """Yield ``(worker id, i)`` forever, optionally with a payload of ``size`` bytes."""

    def __init__(self, size: int = 0, delay: float = 0.0):
        self.size = size
        self.delay = delay

    def __iter__(self) -> Iterator[Any]:
        wid = fp.worker_info().id
        payload = np.zeros(self.size, np.uint8) if self.size else None
        i = 0
        while True:
            if self.delay:
                time.sleep(self.delay)
            yield (wid, i) if payload is None else (wid, i, payload)
            i += 1


class RaiseIn(fp.DataFlow):
    """Worker ``bad`` raises ValueError after ``k`` items; the others yield forever."""

    def __init__(self, bad: int, k: int):
        self.bad = bad
        self.k = k

    def __iter__(self) -> Iterator[Any]:
        wid = fp.worker_info().id
        i = 0
        while True:
            if wid == self.bad and i == self.k:
                raise ValueError(f"injected fault after {self.k} items")
            yield (wid, i)
            i += 1


class FailResetIn(fp.DataFlow):
    """``reset_state()`` raises in worker ``bad`` only."""

    def __init__(self, bad: int):
        self.bad = bad

    def reset_state(self) -> None:
        if fp.worker_info().id == self.bad:
            raise OSError("injected: cannot open shard 7")

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield fp.worker_info().id


class FloodThenFail(fp.DataFlow):
    """Worker 0 yields tiny items forever; worker 1 sleeps ``delay`` s in ``reset_state()``,
    then raises with the time it raised in the message (``time.monotonic()``: one clock
    for every process of the machine)."""

    def __init__(self, delay: float):
        self.delay = delay

    def reset_state(self) -> None:
        if fp.worker_info().id == 1:
            time.sleep(self.delay)
            raise OSError(f"injected at t={time.monotonic():.6f}")

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            yield i
            i += 1


class Die(fp.DataFlow):
    """Yield ``k`` items, then die: ``sigkill``, ``sigsegv`` (ctypes), ``exit3``
    (``os._exit(3)``), ``sysexit`` (``sys.exit(3)``, what a thread can do), or
    ``sigkill_busy`` (SIGKILL from a timer while large datapoints are being sent)."""

    def __init__(self, how: str, k: int = 3):
        self.how = how
        self.k = k

    def __iter__(self) -> Iterator[Any]:
        if self.how == "sigkill_busy":
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            big = np.ones(4 << 20, np.uint8)
            while True:
                yield big
        yield from range(self.k)
        if self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "sigsegv":
            # pytest enables faulthandler on a copy of its stderr, which a forked worker
            # inherits: without this, the intended crash prints a "Fatal Python error"
            # dump into the test report.
            faulthandler.disable()
            ctypes.string_at(0)
        elif self.how == "exit3":
            os._exit(3)
        elif self.how == "sysexit":
            sys.exit(3)
        time.sleep(60)  # pragma: no cover - every branch above ends the worker


class Unpicklable(fp.DataFlow):
    """Yield two good items, then a dict holding something pickle refuses."""

    def __init__(self, kind: str):
        self.kind = kind

    def __iter__(self) -> Iterator[Any]:
        yield 0
        yield 1
        if self.kind == "lambda":
            bad: Any = lambda: 0  # noqa: E731 - the lambda is the point
        elif self.kind == "lock":
            bad = threading.Lock()
        else:
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        yield {"bad": bad}
        while True:
            yield 2


class Sized(fp.DataFlow):
    """Yield ``(i, array)`` with arrays of the given byte sizes, in order, each pass."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[Any]:
        for i, n in enumerate(self.sizes):
            yield i, np.full(n, i % 251, np.uint8)


#: released by scenario 10 after close() returned, so a stuck worker *thread* can end.
UNBLOCK = threading.Event()


class StuckInC(fp.DataFlow):
    """Yield one item, then ignore SIGTERM and block in C: libc ``pause()`` in a worker
    process; in a worker thread (signals cannot be set there) a lock wait that only
    :data:`UNBLOCK` ends."""

    def __iter__(self) -> Iterator[Any]:
        yield 0
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ctypes.CDLL(None).pause()
        else:
            UNBLOCK.wait()
        while True:
            yield 1


class Nested(fp.DataFlow):
    """Each worker runs its own inner Runner and yields ``(outer id, inner item)``."""

    def __init__(self, transport: str):
        self.transport = transport

    def __iter__(self) -> Iterator[Any]:
        outer = fp.worker_info().id
        inner = fp.Runner(Counting(3), transport=self.transport, num_workers=1)
        try:
            with inner:
                while True:
                    for x in inner:
                        yield outer, x
        finally:
            inner.close()


class Chatty(fp.DataFlow):
    """Write ``nbytes`` to stdout and to stderr per datapoint."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def __iter__(self) -> Iterator[Any]:
        line = "x" * 1023
        i = 0
        while True:
            for _ in range(self.nbytes // 1024):
                print(line)
                print(line, file=sys.stderr)
            yield i
            i += 1


# ---------------------------------------------------------------------------- a limited transport
# No built-in transport (on this branch) declares a byte limit, so the Runner's side of
# scenario 8 is also checked with this small test transport that does.


class _LimitedSender(fp.Sender):
    def __init__(self, q: Any, limit: int):
        self._queue = q
        self._limit = limit

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        if len(data) > self._limit:
            raise fp.DataTooLarge(
                f"datapoint of {len(data)} bytes is larger than max_item_size={self._limit} "
                "bytes; raise the option max_item_size"
            )
        self._queue.put(data)

    def close(self) -> None:
        self._queue.close()
        self._queue.join_thread()


class _LimitedEndpoint(fp.Endpoint):
    def __init__(self, q: Any, limit: int):
        self._queue = q
        self._limit = limit

    def connect(self, worker_id: int) -> _LimitedSender:
        return _LimitedSender(self._queue, self._limit)


class LimitedTransport(fp.Transport):
    """A bounded multiprocessing queue with a byte limit per datapoint (tests only)."""

    name = "limited"
    size_limit_option = "max_item_size"
    options = (fp.Option("max_item_size", int, 1 << 20, "largest datapoint", size=True),)

    def open(self) -> _LimitedEndpoint:
        self._queue = mp.get_context(self.start_method).Queue(self.capacity)
        return _LimitedEndpoint(self._queue, self.option_values["max_item_size"])

    def recv(self, timeout: float) -> Any:
        try:
            return pickle.loads(self._queue.get(timeout=timeout))
        except queue.Empty:
            return fp.EMPTY

    def close(self) -> None:
        q = getattr(self, "_queue", None)
        if q is not None:
            self._queue = None
            q.cancel_join_thread()
            q.close()


def register_limited() -> None:
    """Add :class:`LimitedTransport` to this process's registry (undone by reload_plugins)."""
    registry = get_registry()
    if "limited" not in registry.transports:
        registry.register(LimitedTransport, origin=PluginInfo("limited", "tests", "0"))


# ---------------------------------------------------------------------------- helpers


def workers_released(before: Any, settle: float = 5.0) -> dict[str, list]:
    """What the run left behind (processes, threads, fds, shm), waiting ``settle`` s."""
    gc.collect()
    return leaked(before, settle=settle)


def shm_entries(pid: int) -> list[str]:
    """/dev/shm entries whose name carries a run id of ``pid`` (``fp-<pid>-``)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if f"fp-{pid}-" in n)
    except FileNotFoundError:
        return []


def gone(pids: list[int], within: float) -> list[int]:
    """Wait up to ``within`` s for the processes to end; return those still running."""
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.05)
    return [p for p in alive if _running(p)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_consumer(transport: str, mode: str, *extra: str) -> subprocess.Popen:
    """Start ``consumer.py`` in its own session (so the test can signal its group)."""
    return subprocess.Popen(
        [sys.executable, str(CONSUMER), transport, mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        bufsize=0,  # unbuffered: communicate() must see what readline() did not consume
    )


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[str, str]:
    """Wait for the consumer to end; return its remaining stdout and its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out.decode(errors="replace"), err.decode(errors="replace")


def wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> list[int]:
    """Wait for the consumer's READY line; return its worker processes' pids."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0].startswith(b"READY"):
        proc.kill()
        out, err = finish(proc)
        raise AssertionError(f"consumer did not get ready: {result} {out} {err}")
    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]


def tracebacks(text: str) -> int:
    return text.count("Traceback (most recent call last)")


# ---------------------------------------------------------------------------- scenarios


def scenario_worker_raises(transport: str, k: int = 4) -> int:
    """1. A worker's dataflow raises after ``k`` items: WorkerError with type, message and
    remote traceback; the other workers are stopped."""
    before = snapshot()
    runner = fp.Runner(RaiseIn(bad=1, k=k), transport=transport, num_workers=2)
    from_bad = []
    stream = _stream(runner)
    try:
        for _ in range(100_000):
            wid, i = next(stream)
            if wid == 1:
                from_bad.append(i)
        raise AssertionError("the injected error never arrived")
    except fp.WorkerError as err:
        assert err.worker_id == 1 and err.exc_type == "ValueError"
        assert f"injected fault after {k} items" in str(err)
        assert "in __iter__" in err.remote_traceback and "ValueError" in err.remote_traceback
        assert "worker 1" in str(err)
    assert from_bad == list(range(k)), from_bad  # nothing after the error, nothing lost
    left = workers_released(before)
    assert not left, f"other workers not stopped: {left}"
    try:
        next(iter(runner))
        raise AssertionError("a failed runner must refuse to iterate")
    except fp.StateError:
        pass
    runner.close()
    return 1


def _raised(kind: type[BaseException], got: list[Any], runner: fp.Runner) -> Any:
    """Iterate ``runner`` into ``got`` until it raises ``kind``; return the exception."""
    try:
        for _ in range(100):
            got.extend(runner)
    except kind as exc:
        return exc
    raise AssertionError(f"no {kind.__name__} after {got[:10]}...")


def _stream(runner: fp.Runner) -> Iterator[Any]:
    """The runner's datapoints as one endless stream (epochs chained)."""
    while True:
        yield from runner


def scenario_reset_fails(transport: str) -> int:
    """2. ``reset_state()`` raises in worker 1 of 2: WorkerError naming worker 1, at the
    start of the run (the other worker's datapoints may come first)."""
    with fp.Runner(FailResetIn(bad=1), transport=transport, num_workers=2) as runner:
        seen = 0
        try:
            for _ in runner:
                seen += 1
                assert seen < 10_000, "the reset_state() failure was never reported"
        except fp.WorkerError as err:
            assert err.worker_id == 1 and err.exc_type == "OSError"
            assert re.search(r"worker 1 .*reset_state\(\).*cannot open shard 7", str(err))
            assert "reset_state" in err.remote_traceback
        else:
            raise AssertionError("no WorkerError")
    return 1


#: scenario 18: the consumer's pace (s per datapoint), and how many of the flooding
#: worker's datapoints may still arrive after the other worker raised.
FAIR_PACE = 0.0002
FAIR_BOUND = 1000


def scenario_fair(transport: str, delay: float = 0.5) -> int:
    """18. Worker 0 floods tiny datapoints while worker 1 raises after ``delay`` s: the
    WorkerError arrives after a bounded number of worker 0's datapoints, however many are
    in flight. The consumer takes its time (:data:`FAIR_PACE`), so the transport is full
    when worker 1 raises: a transport with one shared pipe or queue would deliver all of
    it (capacity messages, up to 64 items each when batched) first, and one with a shared
    capacity bound lets the running worker take every freed slot."""
    received: list[float] = []
    with fp.Runner(FloodThenFail(delay), transport=transport, num_workers=2) as runner:
        clock = time.monotonic
        try:
            for _ in _stream(runner):
                received.append(clock())
                if len(received) > 200_000:
                    break
                time.sleep(FAIR_PACE)
        except fp.WorkerError as err:
            arrived = clock()
            assert err.worker_id == 1 and "reset_state()" in str(err), err
            raised = float(re.search(r"injected at t=([\d.]+)", str(err)).group(1))
        else:
            raise AssertionError(f"no WorkerError after {len(received)} datapoints")
    after = sum(t > raised for t in received)
    measured("worker error to WorkerError under a flood", arrived - raised)
    assert after < FAIR_BOUND, (
        f"{after} datapoints of the flooding worker arrived in the {arrived - raised:.2f} s "
        "between the other worker's error and its report"
    )
    assert len(received) - after > 0, "the flooding worker never ran before the error"
    return 1


def scenario_worker_dies(transport: str, how: str) -> int:
    """3. A worker process is killed (SIGKILL, SIGSEGV, ``os._exit(3)``, SIGKILL while
    sending large datapoints): WorkerDied with pid and signal or exit code, quickly.
    A worker thread cannot die silently: ``sys.exit(3)`` in one is a WorkerError."""
    expected = {
        "sigkill": (-signal.SIGKILL, "SIGKILL"),
        "sigkill_busy": (-signal.SIGKILL, "SIGKILL"),
        "sigsegv": (-signal.SIGSEGV, "SIGSEGV"),
        "exit3": (3, "code 3"),
    }
    runner = fp.Runner(Die(how), transport=transport, num_workers=1)
    stream = _stream(runner)
    start = time.monotonic()
    try:
        if how == "sysexit":
            try:
                for _ in range(1000):
                    next(stream)
            except fp.WorkerError as err:
                assert err.exc_type == "SystemExit" and err.worker_id == 0
                return 1
            raise AssertionError("sys.exit() in a worker was not reported")
        try:
            for _ in range(100_000):
                next(stream)
        except fp.WorkerDied as err:
            took = time.monotonic() - start
            measured(f"worker death ({how}) to WorkerDied, from iteration start", took)
            code, word = expected[how]
            assert err.exitcode == code, err.exitcode
            assert err.pid is not None and err.pid != os.getpid() and err.worker_id == 0
            assert str(err.pid) in str(err) and word in str(err), str(err)
            assert "report" not in str(err), str(err)  # a death is never an error report
            assert took < DEATH_NOTICED_WITHIN, f"death noticed after {took:.1f} s"
            return 1
        raise AssertionError("the worker's death was not noticed")
    finally:
        runner.close()


def death_modes(transport: str) -> list[str]:
    if caps(transport).crosses_processes:
        return ["sigkill", "sigsegv", "exit3", "sigkill_busy"]
    return ["sysexit"]


def scenario_consumer_killed(transport: str, in_thread: bool = False) -> int:
    """4. The consumer process is SIGKILLed mid-stream: every worker is gone within
    seconds, and no /dev/shm entry of it is left after the next flowplug start."""
    proc = start_consumer(transport, "stream", *(["--in-thread"] if in_thread else []))
    try:
        workers = wait_ready(proc)
        if caps(transport).crosses_processes:
            assert len(workers) >= 2, workers
        proc.kill()
        killed = time.monotonic()
    finally:
        finish(proc)
    alive = gone(workers, ORPHANS_GONE_WITHIN)
    assert not alive, f"workers outlived the consumer: {alive}"
    where = "other thread" if in_thread else "main thread"
    measured(
        f"consumer SIGKILL to all workers gone (started in {where})", time.monotonic() - killed
    )
    # The next start of the transport sweeps what the dead consumer left in /dev/shm.
    with fp.Runner(Counting(2), transport=transport) as runner:
        assert list(runner) == [0, 1]
    stale = shm_entries(proc.pid)
    assert not stale, f"left in /dev/shm by the killed consumer: {stale}"
    return 1


def scenario_consumer_sigint(transport: str) -> int:
    """5. SIGINT to the consumer's process group: one KeyboardInterrupt traceback in the
    consumer, the workers stop, no traceback from a worker."""
    proc = start_consumer(transport, "stream")
    try:
        workers = wait_ready(proc)
        time.sleep(0.2)  # let the workers fill the transport: they are mid-send
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        _, err = finish(proc)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
    assert tracebacks(err) == 1, err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Exception ignored" not in err and "flowplug-worker" not in err, err
    alive = gone(workers, ORPHANS_GONE_WITHIN)
    assert not alive, f"workers outlived the consumer: {alive}"
    return 1


def scenario_dropped(transport: str) -> int:
    """6. The consumer breaks out early and drops the runner without close(): garbage
    collection releases everything; at interpreter exit, atexit does."""
    before = snapshot()
    runner = fp.Runner(Forever(), transport=transport, num_workers=2)
    for i, _ in enumerate(runner):
        if i == 3:
            break
    del runner
    left = workers_released(before)
    assert not left, f"gc did not release: {left}"

    proc = start_consumer(transport, "drop")
    try:
        workers = wait_ready(proc)
    finally:
        out, err = finish(proc)
    assert proc.returncode == 0 and "DONE" in out, (proc.returncode, out, err)
    assert err == "", err
    alive = gone(workers, ORPHANS_GONE_WITHIN)
    assert not alive, f"workers outlived the consumer: {alive}"
    return 2


def scenario_unpicklable(transport: str, kind: str) -> int:
    """7. A datapoint holding a lambda, a lock or a socket: WorkerError naming the type
    when the transport serializes (crosses processes); passed as is between threads."""
    names = {"lambda": "lambda", "lock": "lock", "socket": "socket"}
    with fp.Runner(Unpicklable(kind), transport=transport, num_workers=1) as runner:
        got = []
        if caps(transport).crosses_processes:
            err = _raised(fp.WorkerError, got, runner)
            assert err.exc_type == "TypeError" and "dict" in str(err), str(err)
            assert names[kind] in str(err), str(err)
            assert got == [0, 1], got
        else:
            for dp in runner:
                got.append(dp)
                if len(got) == 3:
                    break
            assert got[:2] == [0, 1] and names[kind] in repr(got[2]["bad"]), got
            if kind == "socket":
                got[2]["bad"].close()
    return 1


def scenario_too_large(transport: str) -> int:
    """8. A datapoint bigger than the transport's limit. A transport that declares a byte
    limit (``size_limit_option``) reports DataTooLarge as a WorkerError naming the sizes
    and the option; one without delivers it. Nothing is delivered twice or lost."""
    cls = caps(transport)
    small, big = 1000, 24 << 20
    if cls.size_limit_option is None:
        # capacity=1: the smallest hwm-bounded buffer, with a 24 MiB datapoint in it.
        sizes = [small, small, big, small, big, small]
        with fp.Runner(Sized(sizes), transport=transport, capacity=1) as runner:
            for _ in range(2):
                got = list(runner)
                assert [i for i, _ in got] == list(range(len(sizes)))
                for i, arr in got:
                    assert arr.nbytes == sizes[i] and arr[0] == arr[-1] == i % 251
        return 0
    limit = 1 << 20
    sizes = [small, small, small, 4 * limit, small]
    options = {cls.size_limit_option: limit}
    with fp.Runner(Sized(sizes), transport=transport, **options) as runner:
        got: list[Any] = []
        err = _raised(fp.WorkerError, got, runner)
    # each datapoint before the big one exactly once, then the error
    assert [i for i, _ in got] == [0, 1, 2], got
    assert isinstance(err, fp.WorkerError) and err.exc_type == "DataTooLarge", err
    assert cls.size_limit_option in str(err), str(err)
    assert len(re.findall(r"\d[\d.,]*", str(err).split("\n")[0])) >= 2, str(err)
    return 1


def scenario_timeout(transport: str) -> int:
    """9. A worker slower than ``timeout``: RunnerTimeout, then close() works."""
    before = snapshot()
    runner = fp.Runner(Slow(1.0), transport=transport, timeout=0.2)
    start = time.monotonic()
    try:
        next(iter(runner))
        raise AssertionError("no RunnerTimeout")
    except fp.RunnerTimeout as err:
        assert "0.2" in str(err) and time.monotonic() - start < DEATH_NOTICED_WITHIN
    try:
        next(iter(runner))  # still usable: it waits (and times out) again
        raise AssertionError("no RunnerTimeout")
    except fp.RunnerTimeout:
        pass
    start = time.monotonic()
    runner.close()
    assert time.monotonic() - start < CLOSE_RETURNS_WITHIN
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_stuck(transport: str) -> int:
    """10. A worker ignores SIGTERM and blocks in C: close() escalates to SIGKILL in
    bounded time. Worker threads cannot be killed: close() returns after a bounded join
    and warns (they are daemon threads)."""
    UNBLOCK.clear()
    runner = fp.Runner(StuckInC(), transport=transport, num_workers=2)
    it = iter(runner)
    next(it)
    next(it)  # both workers have yielded their item and are now stuck
    time.sleep(0.3)
    start = time.monotonic()
    try:
        if caps(transport).crosses_processes:
            runner.close()
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runner.close()
            assert any("did not stop" in str(w.message) for w in caught), caught
    finally:
        took = time.monotonic() - start
        UNBLOCK.set()
        it.close()
    assert took < CLOSE_RETURNS_WITHIN, f"close() took {took:.1f} s"
    measured("close() with stuck workers", took)
    return 2


def scenario_cycles(transport: str, cycles: int = CYCLES) -> int:
    """11. Many create / iterate-a-few / close cycles: nothing leaks, memory stays flat."""
    before = snapshot()
    me = psutil.Process()

    def cycle() -> None:
        with fp.Runner(
            Counting(10**6), transport=transport, num_workers=2, mode="replicate"
        ) as runner:
            it = iter(runner)
            for _ in range(3):
                next(it)
            it.close()

    for _ in range(10):  # warm up: first-use allocations, imports, caches
        cycle()
    gc.collect()
    rss = me.memory_info().rss
    for _ in range(cycles):
        cycle()
    gc.collect()
    grown = me.memory_info().rss - rss
    left = workers_released(before)
    assert not left, f"left behind after {cycles} cycles: {left}"
    # 16 MiB plus 16 KiB per cycle: flat for a run, not for a leak of a buffer per cycle.
    assert grown < (16 << 20) + cycles * (16 << 10), f"RSS grew {grown >> 10} KiB"
    return 0


def scenario_threads(transport: str) -> int:
    """12. A runner started in one thread (which then ends) and iterated in another
    works; two threads iterating one runner: the second gets StateError."""
    holder: list[fp.Runner] = []
    starter = threading.Thread(
        target=lambda: holder.append(fp.Runner(Counting(20), transport=transport).__enter__())
    )
    starter.start()
    starter.join()
    runner = holder[0]
    try:
        time.sleep(0.3)  # the starting thread is gone: its workers must live on
        results: list[Any] = []
        t = threading.Thread(target=lambda: results.append(list(runner)))
        t.start()
        t.join(30)
        assert results == [list(range(20))], results
        assert list(runner) == list(range(20))
        assert_second_iteration_refused(runner)
    finally:
        runner.close()
    return 1


def scenario_nested(transport: str) -> int:
    """13. A Runner inside a worker of another Runner works (never hangs)."""
    with fp.Runner(Nested(transport), transport=transport, num_workers=2, timeout=30) as runner:
        per_worker: dict[int, list[int]] = {0: [], 1: []}
        stream = _stream(runner)
        deadline = time.monotonic() + 60  # one worker may start its inner runner late
        while time.monotonic() < deadline:
            outer, x = next(stream)
            per_worker[outer].append(x)
            if all(len(v) >= 6 for v in per_worker.values()):
                break
    for items in per_worker.values():
        assert len(items) >= 6 and items[:6] == [0, 1, 2, 0, 1, 2], per_worker
    return 1


def scenario_fork_after_threads(transport: str) -> int:
    """14. Workers fork while the consumer has busy threads, a zmq context with sockets,
    and another running Runner: they start cleanly and the parent's sockets still work."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    addr = f"inproc://faults-{os.getpid()}-{time.monotonic_ns()}"
    a.bind(addr)
    b.connect(addr)
    stop = threading.Event()
    lock = threading.Lock()

    def busy() -> None:  # holds a lock and the stdout-like buffer most of the time
        sink = io.StringIO()
        while not stop.is_set():
            with lock:
                print("x" * 100, file=sink)
                sink.seek(0)
                sink.truncate()

    threads = [threading.Thread(target=busy) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with fp.Runner(Counting(30), transport=transport, num_workers=2, mode="replicate") as first:
            assert len(list(first)) == 30
            for _ in range(3):
                with fp.Runner(
                    Counting(25, tag=True), transport=transport, num_workers=2, mode="replicate"
                ) as r:
                    for _ in range(2):
                        got = list(r)
                        assert len(got) == 25 and {w for w, _ in got} <= {0, 1}
                assert len(list(first)) == 30
        a.send(b"still here")
        assert b.poll(5000) and b.recv() == b"still here"
    finally:
        stop.set()
        for t in threads:
            t.join()
        a.close(0)
        b.close(0)
        ctx.term()
    return 1


def scenario_shm_tiny(transport: str) -> int:
    """15. For a transport that declares ``uses_shared_memory``: asking for more than
    /dev/shm holds is a clear error at start naming /dev/shm and the option, never a
    Bus error later. For the others: a run creates no /dev/shm entry."""
    cls = caps(transport)
    if cls.uses_shared_memory:
        assert cls.size_limit_option, "a shared-memory transport must declare its size option"
        free = shutil.disk_usage(SHM_DIR).free
        options = {cls.size_limit_option: free * 2 + (1 << 30)}
        runner = fp.Runner(Counting(3), transport=transport, **options)
        try:
            runner.reset_state()
            next(iter(runner))
            raise AssertionError("asking for more shared memory than exists was accepted")
        except fp.FlowplugError as err:
            assert not isinstance(err, (fp.WorkerDied, fp.RunnerTimeout)), err
            assert "/dev/shm" in str(err) and cls.size_limit_option in str(err), str(err)
        finally:
            runner.close()
        return 1
    before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    with fp.Runner(
        Sized([1 << 20] * 4), transport=transport, num_workers=2, mode="replicate"
    ) as runner:
        assert len(list(runner)) == 4
        during = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    mine = [n for n in during - before if str(os.getpid()) in n]
    assert not mine, f"transport {transport!r} uses /dev/shm without declaring it: {mine}"
    return 0


def scenario_chatty(transport: str) -> int:
    """16. Workers write heavily to stdout and stderr (pipes read by a parent): no deadlock."""
    proc = subprocess.run(
        [sys.executable, str(CONSUMER), transport, "chatty"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "DONE" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert len(proc.stdout) > (256 << 10) and len(proc.stderr) > (256 << 10)
    assert tracebacks(proc.stderr) == 0, proc.stderr[-2000:]
    return 1


def listening_sockets(pid: int) -> list[str]:
    """Unix sockets listening under a run id of ``pid`` (abstract ones start with '@')."""
    found = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and int(parts[3], 16) & 0x10000 and f"fp-{pid}-" in parts[7]:
                found.append(parts[7])
    return found


class _Evil:
    """Unpickling this creates a directory: proof that a stranger's bytes were loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


def scenario_garbage(transport: str) -> int:
    """17. Another process connects to the run's endpoint and sends garbage and a hostile
    pickle: ignored; the consumer never unpickles it and delivers exactly its data."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "unpickled")
        evil = pickle.dumps(_Evil(marker), protocol=5)
        with fp.Runner(Counting(50), transport=transport, num_workers=1) as runner:
            assert list(runner) == list(range(50))
            endpoints = listening_sockets(os.getpid())
            if not caps(transport).crosses_processes:
                assert not endpoints, endpoints  # threads: no endpoint exists at all
            code = _ATTACK.format(endpoints=endpoints, evil=evil)
            attacker = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            assert attacker.returncode == 0, attacker.stderr
            for _ in range(3):
                assert list(runner) == list(range(50))
            assert not os.path.exists(marker), "the consumer unpickled a stranger's bytes"
    return max(1, len(endpoints))


# The stranger: for every endpoint, a zmq PUSH peer sends framed garbage (with and
# without a fake token, and the hostile pickle), and a raw socket sends bytes.
_ATTACK = """
import os, socket, zmq
endpoints = {endpoints!r}
evil = {evil!r}
ctx = zmq.Context()
for ep in endpoints:
    name = ep[1:] if ep.startswith("@") else ep
    push = ctx.socket(zmq.PUSH)
    push.linger = 2000
    push.connect(("ipc://@" if ep.startswith("@") else "ipc://") + name)
    for frames in ([evil], [b"x" * 16, evil], [b"", b""], [os.urandom(16), evil, b"junk"]):
        push.send_multipart(frames)
    push.close()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(("\\0" + name) if ep.startswith("@") else name)
    raw.sendall(os.urandom(4096) + evil)
    raw.close()
ctx.term()
"""


# ---------------------------------------------------------------------------- failures that
# cannot go through the transport (issue 13, items 1 and 4)


class _FaultySender(_LimitedSender):
    def __init__(self, q: Any, fail: str, owned: bool):
        super().__init__(q, 1 << 30)
        self._fail = fail
        self._owned = owned

    def send(self, obj: Any) -> None:
        if self._fail == "report" and type(obj).__name__ == "RemoteFailure":
            raise OSError("injected: the transport broke while the worker was reporting")
        super().send(obj)

    def close(self) -> None:
        if self._owned:
            super().close()


class _FaultyEndpoint(fp.Endpoint):
    def __init__(self, q: Any, fail: str, owned: bool):
        self._queue = q
        self._fail = fail
        self._owned = owned

    def connect(self, worker_id: int) -> _FaultySender:
        if self._fail == "connect":
            raise OSError(24, "injected: Too many open files")
        return _FaultySender(self._queue, self._fail, self._owned)


class FaultyTransport(LimitedTransport):
    """A transport that breaks where asked (tests only): ``fail="connect"``, its
    ``connect()`` raises in the worker; ``fail="report"``, its sender refuses the error
    report (datapoints go through)."""

    name = "faulty"
    size_limit_option = None
    options = (fp.Option("fail", str, "connect", "where to break: connect or report"),)

    def open(self) -> _FaultyEndpoint:
        self._queue = mp.get_context(self.start_method).Queue(self.capacity)
        return _FaultyEndpoint(self._queue, self.settings["fail"], owned=True)


class FaultyThreadTransport(FaultyTransport):
    """:class:`FaultyTransport` with worker threads."""

    name = "faulty_thread"
    crosses_processes = False

    def open(self) -> _FaultyEndpoint:
        self._queue = _PickledQueue(self.capacity)
        return _FaultyEndpoint(self._queue, self.settings["fail"], owned=False)

    def close(self) -> None:
        pass


class _PickledQueue(queue.Queue):
    """A queue.Queue with the part of multiprocessing.Queue's API the senders use."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, timeout)


def register_faulty() -> None:
    """Add the faulty test transports to this process's registry."""
    registry = get_registry()
    for cls in (FaultyTransport, FaultyThreadTransport):
        if cls.name not in registry.transports:
            registry.register(cls, origin=PluginInfo(cls.name, "tests", "0"))


class RaiseAfter(fp.DataFlow):
    """Yield ``k`` items, then raise ``exc`` (default: ValueError). With ``close_stdio``
    a worker *process* first closes its stdout and stderr (threads share the
    consumer's, so they leave them alone)."""

    def __init__(self, k: int, close_stdio: bool = False, exc: Any = None):
        self.k = k
        self.close_stdio = close_stdio
        self.exc = exc

    def __iter__(self) -> Iterator[Any]:
        if self.close_stdio and threading.current_thread() is threading.main_thread():
            sys.stdout.close()
            sys.stderr.close()
        yield from range(self.k)
        raise self.exc if self.exc is not None else ValueError(f"injected after {self.k}")


class BadStr(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


class LoadsOnlyHere(fp.DataFlow):
    """Pickles in the consumer, fails to unpickle anywhere else (a module the worker
    cannot import, a version mismatch)."""

    def __init__(self) -> None:
        self.home = os.getpid()

    def __setstate__(self, state: dict) -> None:
        if state["home"] != os.getpid():
            raise ImportError("injected: No module named 'only_in_the_consumer'")
        self.__dict__.update(state)

    def __iter__(self) -> Iterator[Any]:
        yield from range(3)


def _drain_until(kind: type[BaseException], runner: fp.Runner, pace: float = 0.0) -> tuple:
    got: list[Any] = []
    try:
        for _ in range(10_000):
            for dp in runner:
                got.append(dp)
                if pace:
                    time.sleep(pace)
    except kind as exc:
        return got, exc
    raise AssertionError(f"no {kind.__name__}; got {got[:20]}...")


def scenario_report_with_closed_stdio(transport: str) -> int:
    """19. A worker closes its stdout and stderr, yields 40 items and raises, while the
    consumer takes 20 ms per item: all 40 arrive, then the WorkerError with the
    ValueError; never a death, never exit code 0 or 1 instead of the cause."""
    before = snapshot()
    runner = fp.Runner(RaiseAfter(40, close_stdio=True), transport=transport, num_workers=1)
    try:
        got, err = _drain_until(fp.WorkerError, runner, pace=0.02)
    finally:
        runner.close()
    assert got == list(range(40)), got
    assert err.exc_type == "ValueError" and "injected after 40" in str(err), str(err)
    assert "in __iter__" in err.remote_traceback, err.remote_traceback
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_broken_str(transport: str) -> int:
    """20. The exception's ``str()`` raises too: still a WorkerError with its type and
    traceback (never a death)."""
    with fp.Runner(RaiseAfter(2, exc=BadStr()), transport=transport, num_workers=1) as runner:
        got, err = _drain_until(fp.WorkerError, runner)
    assert got == [0, 1], got
    assert err.exc_type == "BadStr" and "<str() of the" in str(err), str(err)
    assert "BadStr" in err.remote_traceback, err.remote_traceback
    return 1


def scenario_cannot_connect(in_threads: bool) -> int:
    """21. ``connect()`` raises inside the worker: a WorkerError with the original
    exception and traceback, phase "connecting"; a worker process exits with 1, never 0."""
    register_faulty()
    name = "faulty_thread" if in_threads else "faulty"
    before = snapshot()
    runner = fp.Runner(
        Counting(5), transport=name, num_workers=2, fail="connect", timeout=30, mode="replicate"
    )
    try:
        got, err = _drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == [], got
    assert err.exc_type == "OSError" and "Too many open files" in str(err), str(err)
    assert "connecting" in str(err) and "in connect" in err.remote_traceback, str(err)
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_report_cannot_be_sent(in_threads: bool) -> int:
    """22. The transport breaks while the worker sends its error report: the datapoints
    it sent before arrive, then a WorkerError with the original error (the report took
    the report pipe), noting why it could not be sent."""
    register_faulty()
    name = "faulty_thread" if in_threads else "faulty"
    runner = fp.Runner(RaiseAfter(7), transport=name, num_workers=1, fail="report", timeout=30)
    try:
        got, err = _drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == list(range(7)), got
    assert err.exc_type == "ValueError" and "injected after 7" in str(err), str(err)
    assert "while the worker was reporting" in err.remote_traceback, err.remote_traceback
    return 1


def scenario_dataflow_fails_to_load(transport: str, start_method: str) -> int:
    """23. spawn/forkserver: the dataflow pickles in the consumer but fails to load in
    the worker: a WorkerError with the ImportError and its traceback, not an exit code."""
    cls = caps(transport)
    if not cls.crosses_processes or cls.runs_workers:
        return 0
    runner = fp.Runner(LoadsOnlyHere(), transport=transport, start_method=start_method)
    try:
        got, err = _drain_until(fp.WorkerError, runner)
    finally:
        runner.close()
    assert got == [], got
    assert err.exc_type == "ImportError" and "only_in_the_consumer" in str(err), str(err)
    assert "starting" in str(err) and "__setstate__" in err.remote_traceback, str(err)
    return 1


class ManyBuffers(fp.DataFlow):
    """One datapoint per pass: a list of ``n`` arrays, each large enough to travel out
    of band (its own frame, its own writev buffer)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        yield [np.full(4096, i, np.int32) for i in range(self.n)]


def scenario_many_buffers(transport: str) -> int:
    """24. A datapoint with more out-of-band buffers than one system call takes
    (IOV_MAX is 1024 on Linux): delivered whole on every transport."""
    for n in (1100, 5000):
        with fp.Runner(ManyBuffers(n), transport=transport, num_workers=1, timeout=60) as runner:
            for _ in range(2):
                (got,) = list(runner)
                assert len(got) == n
                assert all(a.shape == (4096,) and a[0] == a[-1] == i for i, a in enumerate(got))
    return 1


# ---------------------------------------------------------------------------- close() from
# another thread, forks of the consumer (issue 13, items 5 and 2)


class Blocked(fp.DataFlow):
    """Yield one item at once, then one every 2 s: the consumer waits in ``next()``.
    (Not for ever: a worker thread can only stop at a send.)"""

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield 0
            time.sleep(2.0)


def scenario_close_from_another_thread(transport: str, rounds: int = 6) -> int:
    """25. ``close()`` from another thread while the consumer thread is blocked in
    ``next()`` (nothing comes), or busy receiving (data streams): the consumer wakes
    within a receive or two with StateError, never a raw OSError/ZMQError, never a hang;
    iterating again is a StateError; nothing leaks."""
    before = snapshot()
    for r in range(rounds):
        _close_under_a_consumer(transport, r)
    left = workers_released(before)
    assert not left, left
    return rounds


def _close_under_a_consumer(transport: str, r: int) -> None:
    blocked = r % 2 == 0
    df = Blocked() if blocked else Forever(size=64 << 10 if r % 4 == 1 else 0)
    runner = fp.Runner(df, transport=transport, num_workers=2)
    it = iter(runner)
    next(it)
    outcome: list[Any] = []

    def consume() -> None:
        try:
            while True:
                next(it)
        except BaseException as exc:  # what the consumer sees is the point
            outcome.append((type(exc), str(exc), time.monotonic()))

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.3 + 0.05 * r)
    closed_at = time.monotonic()
    runner.close()
    consumer.join(CLOSE_RETURNS_WITHIN)
    assert not consumer.is_alive(), "the consumer thread did not wake after close()"
    ((kind, text, when),) = outcome
    assert issubclass(kind, (fp.StateError, StopIteration)), (kind, text)
    assert "closed" in text, text
    measured("close() from another thread to the consumer's StateError", when - closed_at)
    try:
        next(iter(runner))
        raise AssertionError("a closed runner must refuse to iterate")
    except fp.StateError:
        pass
    it.close()


def scenario_fork_of_the_consumer(transport: str, how: str) -> int:
    """26. The consumer forks (``os.fork`` and the child exits normally, running atexit;
    a multiprocessing fork pool made and closed by other code): the child cannot use
    the runner (StateError naming the fork) and never touches the parent's workers; the
    parent keeps iterating."""
    proc = start_consumer(transport, f"fork-{how}")
    try:
        wait_ready(proc, timeout=60)
    finally:
        out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "PARENT-OK" in out, (out, err)
    if how == "child":
        assert "CHILD-STATEERROR fork" in out, (out, err)
    assert "WorkerDied" not in out + err and tracebacks(err) == 0, err
    return 1


def scenario_segfault_is_quiet(transport: str) -> int:
    """27. The intended SIGSEGV of scenario 3 writes no faulthandler dump, where pytest
    (or the user) enabled faulthandler in the consumer: test output stays readable."""
    if not caps(transport).crosses_processes:
        return 0
    with tempfile.TemporaryFile() as dump:
        was = faulthandler.is_enabled()
        faulthandler.enable(file=dump)
        try:
            assert scenario_worker_dies(transport, "sigsegv") == 1
        finally:
            faulthandler.disable()
            if was:
                faulthandler.enable()
        dump.seek(0)
        text = dump.read().decode(errors="replace")
    assert "Fatal Python error" not in text, text
    return 1


def scenario_ctrl_c_during_gc_cleanup(transport: str) -> int:
    """28. Ctrl-C arrives while garbage collection runs a dropped runner's cleanup (a
    slow one: its workers ignore SIGTERM): the KeyboardInterrupt reaches the program
    after the cleanup, never "Exception ignored" with the program going on; the
    workers are gone."""
    proc = start_consumer(transport, "gc-sigint")
    try:
        workers = wait_ready(proc)
    finally:
        out, err = finish(proc, timeout=60)
    assert "INTERRUPTED" in out and "SWALLOWED" not in out, (out, err)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
    assert "Exception ignored" not in err, err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    alive = gone(workers, ORPHANS_GONE_WITHIN)
    assert not alive, f"workers outlived the consumer: {alive}"
    return 1
