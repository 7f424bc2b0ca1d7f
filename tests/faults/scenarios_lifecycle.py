"""Fault scenarios: cycles, threads, nesting, forks, strangers and shared memory
around a running runner (docs/reliability.md rows 11-17, 25, 26, 30)."""

from __future__ import annotations

import gc
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import zmq
from flows import Blocked, Die, Forever, Nested, RaiseIn, Sized, Tagged
from probes import (
    CLOSE_RETURNS_WITHIN,
    CONSUMER,
    CYCLES,
    caps,
    endless,
    finish,
    listening_sockets,
    measured,
    start_consumer,
    tracebacks,
    wait_ready,
    workers_released,
)

import flowplug as fp
from flowplug.testing.contract import Counting, assert_second_iteration_refused
from flowplug.testing.leaks import SHM_DIR, snapshot


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
        stream = endless(runner)
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


def _take_in_order(stream: Iterator[Any], seen: dict[tuple[str, int], int], count: int) -> None:
    """Take ``count`` datapoints ``(tag, worker, i)`` of :class:`Tagged`: each worker's
    ``i`` counts up by one (nothing lost, nothing twice, nothing of another runner)."""
    for _ in range(count):
        tag, wid, i = next(stream)
        last = seen.get((tag, wid), -1)
        assert i == last + 1, f"runner {tag} worker {wid}: {i} after {last}"
        seen[(tag, wid)] = i


def _take_until_each_went_on(
    stream: Iterator[Any],
    seen: dict[tuple[str, int], int],
    tag: str,
    since: dict[tuple[str, int], int],
    limit: int = 50_000,
) -> None:
    """Take datapoints of runner ``tag`` in order until both its workers delivered more
    than they had in ``since`` (or ``limit`` were taken). Not a fixed count: a transport
    may deliver many datapoints of one worker in a row (a Ray reply carries hundreds)."""

    for _ in range(limit):
        if _went_on(seen, since, tag):
            return
        _take_in_order(stream, seen, 1)


def _went_on(
    seen: dict[tuple[str, int], int], since: dict[tuple[str, int], int], tags: str
) -> bool:
    """Both workers of each runner in ``tags`` delivered more than they had in ``since``."""
    return all(seen.get((t, w), -1) > since.get((t, w), -1) for t in tags for w in (0, 1))


def scenario_several_runners(transport: str, how: str = "raises", threads: bool = False) -> int:
    """30. Three runners at once; the middle one fails (``how``: a worker raises, or
    dies): it alone raises (WorkerError, WorkerDied; a thread's death is a WorkerError)
    and refuses to go on; the other two keep delivering their own datapoints, every
    worker's in order, and close normally. ``threads``: the healthy two are iterated by
    threads of their own while the main thread meets the failure."""
    before = snapshot()
    dies = how == "dies"
    processes = caps(transport).crosses_processes
    bad_df: fp.DataFlow = Die("sigkill" if processes else "sysexit", k=5) if dies else RaiseIn(1, 5)
    expect = fp.WorkerDied if dies and processes else fp.WorkerError
    runners = [
        fp.Runner(Tagged("a"), transport=transport, num_workers=2, mode="replicate"),
        fp.Runner(bad_df, transport=transport, num_workers=1 if dies else 2, mode="replicate"),
        fp.Runner(Tagged("b"), transport=transport, num_workers=2, mode="replicate"),
    ]
    good = [endless(runners[0]), endless(runners[2])]
    bad = endless(runners[1])
    seen: dict[tuple[str, int], int] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def consume(stream: Iterator[Any]) -> None:
        try:
            while not stop.is_set():
                _take_in_order(stream, seen, 1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    consumers = [threading.Thread(target=consume, args=(s,)) for s in good] if threads else []
    try:
        for t in consumers:
            t.start()
        failed: BaseException | None = None
        for _ in range(100_000):
            if not threads:
                for stream in good:
                    _take_in_order(stream, seen, 1)
            try:
                next(bad)
            except expect as exc:
                failed = exc
                break
        assert failed is not None, f"no {expect.__name__} from the failing runner"
        if expect is fp.WorkerDied:
            assert failed.exitcode == -signal.SIGKILL, failed
        else:
            assert failed.exc_type in ("ValueError", "SystemExit"), failed
        at_failure = dict(seen)
        if threads:
            # Until each healthy worker went on, not a fixed while: a worker may start
            # late (a Ray actor takes seconds on a busy machine) or deliver in long runs.
            deadline = time.monotonic() + 60
            while not _went_on(seen, at_failure, "ab") and time.monotonic() < deadline:
                if errors:
                    break
                time.sleep(0.02)
        else:
            for stream, tag in zip(good, "ab", strict=True):
                _take_in_order(stream, seen, 200)
                _take_until_each_went_on(stream, seen, tag, at_failure)
        stop.set()
        for t in consumers:
            t.join(30)
        assert not errors, errors
        for tag in "ab":  # every worker of the healthy runners went on after the failure
            for wid in (0, 1):
                assert seen.get((tag, wid), -1) > at_failure.get((tag, wid), -1), (
                    tag,
                    wid,
                    at_failure,
                    seen,
                )
        try:
            next(iter(runners[1]))
            raise AssertionError("the failed runner must refuse to iterate")
        except fp.StateError:
            pass
    finally:
        stop.set()
        for t in consumers:
            t.join(30)
        for runner in runners:
            runner.close()
    left = workers_released(before)
    assert not left, left
    return 1
