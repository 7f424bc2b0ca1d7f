"""File-descriptor headroom: check ``RLIMIT_NOFILE`` before a run opens anything.

A run that runs out of file descriptors half-way fails in the worst places: a worker that
cannot connect, ``os.pipe()`` failing inside ``multiprocessing`` (which then leaks the
pipe it had), and libzmq *aborting the process* when a context cannot create its epoll
fd ("Too many open files (src/epoll.cpp)"). So the Runner adds up what the run will hold
open — the transport's :class:`~flowplug.OpenFiles`, plus the Runner's own, measured
here — and refuses with a :class:`~flowplug.ConfigError` naming the limit before it
opens the transport. :func:`guard_zmq_context` covers what the count cannot (another
thread opening files meanwhile): it refuses to start a zmq context without room for it.
"""

from __future__ import annotations

import errno
import os
import resource
from typing import Any

from .errors import ConfigError
from .transport import OpenFiles

# The Runner's own file descriptors, measured on Linux (CPython 3.10-3.13) with
# /proc/self/fd in the consumer and in its workers.
#: a group of worker processes: the death watcher's wake pipe.
GROUP = 2
#: per worker process, in the consumer: multiprocessing's sentinel pipe ends (it keeps
#: two) and the worker's report pipe.
PER_PROCESS = 3
#: while a worker process starts: the report pipe's write end and multiprocessing's
#: two pipes, until it closes the child's ends.
STARTING = 4
#: per worker, shard mode and ParallelMap: the epoch-notice pipe (both ends stay open).
CONTROL = 2
#: in a worker process, of its own: the ends of the sentinel pipes, the report pipe,
#: ``/dev/null`` as stdin.
IN_WORKER = 4
#: a spawned (or forkserver) worker, whatever the consumer holds: stdio, the Runner's
#: pipes, the resource tracker's, what the interpreter opens while it starts.
SPAWNED = 16
#: what comes and goes meanwhile: a module imported, a log file opened, this count.
SLACK = 4
#: a zmq context's own: its mailbox, the reaper's and the I/O thread's mailbox and epoll;
#: plus one socket (its mailbox and its fd) and room for one accept.
ZMQ_CONTEXT = 5 + 2 + 1


def open_fds(below: int | None = None) -> int | None:
    """How many file descriptors this process has open (numbered below ``below``), or
    None where the system does not say (no ``/proc/self/fd`` nor ``/dev/fd``)."""
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(where)
        except OSError:
            continue
        fds = [int(name) for name in names if name.isdigit()]
        if below is not None:
            fds = [fd for fd in fds if fd < below]
        return max(0, len(fds) - 1)  # listdir's own fd, closed again by now
    return None


def need(
    transport: Any, num_workers: int, mode: str, start_method: str | None
) -> tuple[int, int, str]:
    """What a run needs: file descriptors more in the consumer (a forked worker's included:
    it inherits the consumer's), the count a spawned worker needs in all (0 when none is
    spawned), and how the first number is made up."""
    files: OpenFiles = transport.open_files
    if mode == "map":
        files = OpenFiles(*(a + b for a, b in zip(files, transport.task_open_files, strict=True)))
    n = num_workers
    consumer = files.consumer + files.per_worker * n
    parts = [f"transport {transport.name!r}: {consumer}"]
    processes = transport.crosses_processes and not transport.runs_workers
    spawned = 0
    if processes:
        own = GROUP + PER_PROCESS * n + STARTING + (CONTROL * n if mode != "replicate" else 0)
        parts.append(f"the runner's pipes: {own}")
        consumer += own
        if start_method == "fork":
            parts.append(f"a forked worker's own: {IN_WORKER + files.worker}")
            consumer += IN_WORKER + files.worker
        else:  # what the endpoint carries may hold the consumer's per-worker fds (queue)
            spawned = SPAWNED + files.worker + files.per_worker * n
    consumer += SLACK
    return consumer, spawned, ", ".join(parts)


def check(transport: Any, num_workers: int, mode: str, start_method: str | None) -> None:
    """Refuse a run that would run out of file descriptors, before it opens anything.

    :raises flowplug.ConfigError: naming ``RLIMIT_NOFILE``, the counts, and ``ulimit -n``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    used = open_fds(below=soft)
    if used is None:
        return
    more, spawned, detail = need(transport, num_workers, mode, start_method)
    total = max(used + more, spawned)
    if total <= soft:
        return
    suggest = max(1024, -(-total // 1024) * 1024)
    workers = f"{num_workers} worker{'s' if num_workers != 1 else ''}"
    if spawned > used + more:
        detail += f"; each {start_method} worker needs about {spawned} in all"
    if hard != resource.RLIM_INFINITY and suggest > hard:
        way_out = (
            f"The hard limit is {hard}, below that: ask for a higher one, or use fewer workers"
        )
    else:
        way_out = (
            f"Raise it before starting Python (`ulimit -n {suggest}` in the shell), or in "
            f"the program with resource.setrlimit(resource.RLIMIT_NOFILE, ({suggest}, hard)); "
            "or use fewer workers"
        )
    raise ConfigError(
        f"too few file descriptors for this run: RLIMIT_NOFILE (`ulimit -n`) is {soft}, "
        f"this process has {used} open, and transport {transport.name!r} with {workers} "
        f"needs about {total} ({more} more: {detail}). {way_out}"
    )


def out_of_fds(exc: BaseException) -> ConfigError | None:
    """The error to raise instead of ``exc`` when it (or its cause) says that the process
    ran out of file descriptors (``EMFILE``, ``ENFILE``), naming ``RLIMIT_NOFILE`` and
    the way out; else None. For what fails while a run starts although the check passed:
    files opened meanwhile by other threads, or a count that was off."""
    for err in (exc, exc.__cause__):
        if getattr(err, "errno", None) in (errno.EMFILE, errno.ENFILE):
            break
    else:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = open_fds(below=soft) if soft != resource.RLIM_INFINITY else None
    where = (
        "the system's file table is full (ENFILE)"
        if getattr(err, "errno", None) == errno.ENFILE
        else f"RLIMIT_NOFILE (`ulimit -n`) is {soft} and this process has {used} open"
    )
    return ConfigError(
        f"ran out of file descriptors while starting the run ({err}): {where}. Something "
        "opened files after the runner counted what it needs (another thread?). Raise the "
        "limit (`ulimit -n 4096` in the shell), or close files"
    )


def ensure_room(count: int, what: str) -> None:
    """Refuse to go on without ``count`` free file descriptors, for ``what``.

    :raises flowplug.ConfigError: naming ``RLIMIT_NOFILE`` and ``ulimit -n``.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    used = open_fds(below=soft)
    if used is None or used + count <= soft:
        return
    raise ConfigError(
        f"too few file descriptors {what}: RLIMIT_NOFILE (`ulimit -n`) is {soft} and this "
        f"process has {used} open, where {count} more are needed. Raise the limit "
        "(`ulimit -n 4096` in the shell), or close files"
    )


def guard_zmq_context() -> None:
    """Refuse to start a zmq context without room for its own file descriptors: libzmq
    aborts the whole process when it cannot make them ("Too many open files
    (src/epoll.cpp)").

    :raises flowplug.ConfigError: naming ``RLIMIT_NOFILE`` and ``ulimit -n``.
    """
    ensure_room(ZMQ_CONTEXT, "to start a zmq context (libzmq would abort the process)")
