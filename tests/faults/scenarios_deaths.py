"""Fault scenarios: a worker or the consumer dies, hangs or is interrupted, and
everything ends cleanly (docs/reliability.md rows 3-6, 9, 10, 27, 28, 31, 32)."""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import threading
import time
import warnings
from typing import Any

from flows import UNBLOCK, Die, Forever, RaiseAfter, StuckInC
from probes import (
    CLOSE_RETURNS_WITHIN,
    DEATH_NOTICED_WITHIN,
    ORPHANS_GONE_WITHIN,
    caps,
    drain_until,
    endless,
    finish,
    gone,
    interrupted_statuses,
    measured,
    shm_entries,
    start_consumer,
    tracebacks,
    wait_ready,
    workers_released,
)

import flowplug as fp
from flowplug.testing.contract import Counting, Slow
from flowplug.testing.leaks import snapshot


def scenario_worker_dies(transport: str, how: str, start_method: str | None = None) -> int:
    """3. A worker process is killed (SIGKILL, SIGSEGV, ``os._exit(3)``, SIGKILL while
    sending large datapoints): WorkerDied with pid and signal or exit code, quickly.
    A worker thread cannot die silently: ``sys.exit(3)`` in one is a WorkerError.
    31: the same with worker processes started by ``start_method`` (spawn, forkserver)."""
    expected = {
        "sigkill": (-signal.SIGKILL, "SIGKILL"),
        "sigkill_busy": (-signal.SIGKILL, "SIGKILL"),
        "sigsegv": (-signal.SIGSEGV, "SIGSEGV"),
        "exit3": (3, "code 3"),
    }
    started = {} if start_method is None else {"start_method": start_method}
    runner = fp.Runner(Die(how), transport=transport, num_workers=1, **started)
    stream = endless(runner)
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
    assert proc.returncode in interrupted_statuses(proc), (proc.returncode, err)
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
    assert proc.returncode in interrupted_statuses(proc), (proc.returncode, err)
    assert "Exception ignored" not in err, err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    alive = gone(workers, ORPHANS_GONE_WITHIN)
    assert not alive, f"workers outlived the consumer: {alive}"
    return 1


def forks(transport: str) -> bool:
    """The Runner starts this transport's workers as processes (start_method applies)."""
    cls = caps(transport)
    return cls.crosses_processes and not cls.runs_workers


def scenario_ended_thread_then_death(transport: str, how: str) -> int:
    """32. A runner started by a thread that then ended (so its worker processes have no
    parent-death signal), iterated by another thread; its worker dies (``how``: a death
    mode of the transport) or raises (``"raises"``): what it sent before arrives (all 7
    items before an error; a killed worker loses what it had not sent yet), then
    WorkerDied (WorkerError), and closing releases everything."""
    before = snapshot()
    df: fp.DataFlow = RaiseAfter(7) if how == "raises" else Die(how, k=7)
    holder: list[fp.Runner] = []
    starter = threading.Thread(
        target=lambda: holder.append(
            fp.Runner(df, transport=transport, num_workers=1, mode="replicate").__enter__()
        )
    )
    starter.start()
    starter.join()
    runner = holder[0]
    expect = fp.WorkerError if how in ("raises", "sysexit") else fp.WorkerDied
    try:
        time.sleep(0.2)  # the starting thread is gone; the worker may be dead already
        result: list[Any] = []
        consumer = threading.Thread(target=lambda: result.append(drain_until(expect, runner)))
        consumer.start()
        consumer.join(60)
        assert result, f"no {expect.__name__} reached the consuming thread"
        got, exc = result[0]
        if how == "raises":  # reported after the data: all of it arrives first
            assert got == list(range(7)), got[:20]
        else:  # a killed worker's unsent batch dies with it: a prefix, in order
            assert got == list(range(len(got))) and len(got) <= 7, got[:20]
        if expect is fp.WorkerDied:
            assert exc.exitcode == -signal.SIGKILL and exc.pid is not None, exc
        else:
            assert exc.worker_id == 0, exc
    finally:
        runner.close()
    left = workers_released(before)
    assert not left, left
    return 1


def scenario_exit_status_taken_first(transport: str, how: str = "sigkill") -> int:
    """33. A worker dies while another thread of the consumer reaps it first through
    multiprocessing (``active_children()``, as ``Process.start()`` does when another
    runner starts a worker) and records its status only a second later: the death still
    names the signal or exit code, never "an unknown exit status".

    Forced, not waited for: ``os.waitpid`` is wrapped so that the other thread takes
    the status first and records it late, and every other caller waits until it did.
    """
    if not forks(transport):
        return 0  # no worker process of the Runner's to reap
    import multiprocessing as mp

    expected = {"sigkill": -signal.SIGKILL, "exit3": 3}[how]
    real_waitpid = os.waitpid
    reaped = threading.Event()
    stop = threading.Event()
    reaper: list[int] = []
    workers: set[int] = set()

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if reaper and threading.get_ident() == reaper[0]:
            got = real_waitpid(pid, options)
            if got[0] == pid and pid in workers:
                reaped.set()
                time.sleep(1.0)  # the status is taken, and recorded only after this
            return got
        if pid in workers and not reaped.is_set():
            reaped.wait(30)  # the other thread comes first
        return real_waitpid(pid, options)

    real_fork = os.fork

    def fork() -> int:  # the worker's pid, before it can die
        pid = real_fork()
        if pid:
            workers.add(pid)
        return pid

    def reap() -> None:
        reaper.append(threading.get_ident())
        while not stop.is_set() and not reaped.is_set():
            mp.active_children()  # polls every child multiprocessing started
            time.sleep(0.001)

    runner = fp.Runner(Die(how, k=3), transport=transport, num_workers=1, mode="replicate")
    thread = threading.Thread(target=reap, name="other-reaper")
    os.waitpid = waitpid
    os.fork = fork
    try:
        thread.start()  # before the worker exists: it may die at once
        runner.reset_state()
        os.fork = real_fork
        assert len(workers) == 1, workers
        _, err = drain_until(fp.WorkerDied, runner)
        assert reaped.is_set(), "the other thread did not reap the worker first"
        assert err.exitcode == expected, str(err)
        assert "unknown" not in str(err), str(err)
        assert err.pid in workers, (err.pid, workers)
    finally:
        stop.set()
        if thread.ident is not None:
            thread.join(30)
        os.waitpid = real_waitpid
        os.fork = real_fork
        runner.close()
    return 1
