"""Find what a piece of code left behind: child processes, threads, fds, /dev/shm entries."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SHM_DIR = "/dev/shm"
#: prefixes of the /dev/shm entries flowplug (and multiprocessing) create.
SHM_PREFIXES = ("flowplug", "fp-", "fp_", "psm_")


@dataclass(frozen=True)
class Snapshot:
    children: frozenset[int]
    threads: frozenset[int]
    fds: frozenset[int]
    shm: frozenset[str]


def _children() -> frozenset[int]:
    import psutil  # test-only dependency

    return frozenset(p.pid for p in psutil.Process().children(recursive=True))


def _fds() -> frozenset[int]:
    try:
        return frozenset(int(fd) for fd in os.listdir("/proc/self/fd"))
    except FileNotFoundError:  # not Linux
        return frozenset()


def _shm() -> frozenset[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return frozenset()
    return frozenset(n for n in names if n.startswith(SHM_PREFIXES))


def snapshot() -> Snapshot:
    """Record what exists now."""
    return Snapshot(
        children=_children(),
        threads=frozenset(t.ident for t in threading.enumerate() if t.ident is not None),
        fds=_fds(),
        shm=_shm(),
    )


def leaked(before: Snapshot, settle: float = 5.0, own_shm_only: bool = True) -> dict[str, list]:
    """What exists now and did not in ``before``; waits up to ``settle`` s for it to go.

    :param own_shm_only: count only /dev/shm entries that name this process's pid, so
        parallel test processes do not see each other's segments.
    :returns: ``{"children": [...], "threads": [...], "fds": [...], "shm": [...]}``,
        each empty when nothing leaked.
    """
    deadline = time.monotonic() + settle
    while True:
        now = snapshot()
        shm = now.shm - before.shm
        if own_shm_only:
            shm = frozenset(n for n in shm if f"-{os.getpid()}-" in n)
        found: dict[str, list[Any]] = {
            "children": sorted(now.children - before.children),
            "threads": sorted(
                t.name for t in threading.enumerate() if t.ident in now.threads - before.threads
            ),
            "fds": sorted(now.fds - before.fds),
            "shm": sorted(shm),
        }
        if not any(found.values()) or time.monotonic() > deadline:
            if found["fds"]:
                found["fds"] = [_describe_fd(fd) for fd in found["fds"]]
            return {k: v for k, v in found.items() if v}
        time.sleep(0.05)


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


@contextmanager
def check_leaks(settle: float = 5.0) -> Iterator[None]:
    """Fail with AssertionError if the block leaves anything behind that :func:`leaked` finds.

    multiprocessing's resource tracker, a process it starts once per interpreter (spawn,
    forkserver) and keeps, is started first so that it never counts.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    before = snapshot()
    yield
    gc.collect()
    left = leaked(before, settle=settle)
    assert not left, f"left behind: {left}"
