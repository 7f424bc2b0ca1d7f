"""Run a small run at every RLIMIT_NOFILE soft limit from just above what is open, upward.

    python fdsweep.py TRANSPORT START_METHOD MODE [--unchecked]

MODE is ``replicate``, ``shard`` or ``map`` (a ParallelMap). For each limit it prints
``LIMIT OUTCOME`` on a line: ``OK`` (30 datapoints came), ``LIMIT <message>`` (a
ConfigError naming RLIMIT_NOFILE and ``ulimit -n``), or ``OTHER <type>: <message>``.
It stops three limits after the first OK. ``--unchecked`` turns the Runner's headroom
check off, as if something else opened files after it: then a run may fail, but only
with such an error (the Runner's, or a worker's as a WorkerError), never an abort or a
hang.
A process that aborts (libzmq's "Too many open files (src/epoll.cpp)") prints nothing more.
"""

from __future__ import annotations

import resource
import sys

import flowplug as fp
from flowplug import _fds

WORKERS = 2


def double(x: int) -> int:
    return 2 * x


def run(transport: str, start_method: str, mode: str, timeout: float = 20) -> None:
    kw = {} if transport == "thread" else {"start_method": start_method}
    df = fp.DataFromList(list(range(100)))
    if mode == "map":
        runner: fp.Runner = fp.ParallelMap(
            df, double, transport=transport, num_workers=WORKERS, timeout=timeout, **kw
        )
    else:
        runner = fp.Runner(
            df, transport=transport, num_workers=WORKERS, mode=mode, timeout=timeout, **kw
        )
    with runner:
        it = iter(runner)
        for _ in range(30):
            next(it)


def main() -> None:
    transport, start_method, mode = sys.argv[1:4]
    timeout = 20.0
    if "--unchecked" in sys.argv:
        _fds.check = lambda *args, **kwargs: None
    if start_method != "fork":  # its helper lives on with a pipe of ours: start it first
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = _fds.open_fds(below=soft)
    assert used is not None
    print("USED", used, flush=True)
    ok = 0
    limit = used + 1
    while ok < 3 and limit < used + 400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            run(transport, start_method, mode, timeout)
            out = "OK"
        except fp.ConfigError as exc:
            text = str(exc)
            ours = "RLIMIT_NOFILE" in text and "ulimit -n" in text
            out = f"LIMIT {text}" if ours else f"OTHER {text}"
        except BaseException as exc:
            out = f"OTHER {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        ok += out == "OK" or ok > 0
        print(limit, out.replace("\n", " "), flush=True)
        limit += 1
    print("DONE", _fds.open_fds(below=soft), flush=True)


if __name__ == "__main__":
    main()
