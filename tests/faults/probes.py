"""What the fault scenarios observe with: leaks, processes, /dev/shm, sockets, the
consumer subprocess (consumer.py), the bounds they allow, and the timings they measure."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

import flowplug as fp
from flowplug.testing.leaks import SHM_DIR, leaked

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
    _READY_NOTES[proc.pid] = result[0].decode().split()[1:]
    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]


#: what each consumer said after READY, by pid ("ray-driver": it imported Ray).
_READY_NOTES: dict[int, list[str]] = {}


def interrupted_statuses(proc: subprocess.Popen) -> tuple[int, ...]:
    """The exit statuses of a consumer that an uncaught KeyboardInterrupt ended: killed by
    SIGINT, as CPython ends such a program. In a process that imported Ray (2.60) also 1:
    Ray's atexit handler imports modules, and CPython then forgets that the program ended
    by KeyboardInterrupt (any program that imports ray exits with 1 after Ctrl-C, flowplug
    or not); the traceback still ends in KeyboardInterrupt."""
    if "ray-driver" in _READY_NOTES.get(proc.pid, []):
        return (-signal.SIGINT, 1)
    return (-signal.SIGINT,)


def tracebacks(text: str) -> int:
    return text.count("Traceback (most recent call last)")


def raised(kind: type[BaseException], got: list[Any], runner: fp.Runner) -> Any:
    """Iterate ``runner`` into ``got`` until it raises ``kind``; return the exception."""
    try:
        for _ in range(100):
            got.extend(runner)
    except kind as exc:
        return exc
    raise AssertionError(f"no {kind.__name__} after {got[:10]}...")


def endless(runner: fp.Runner) -> Iterator[Any]:
    """The runner's datapoints as one endless stream (epochs chained)."""
    while True:
        yield from runner


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


def drain_until(kind: type[BaseException], runner: fp.Runner, pace: float = 0.0) -> tuple:
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
