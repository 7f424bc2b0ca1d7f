"""Start a run, then use up every file descriptor left, then iterate: it must work.

    python fdfill.py TRANSPORT

For each variant (replicate and ParallelMap with forked workers, shard with spawned
ones; thread workers once) it prints ``VARIANT OK`` or ``VARIANT ERR <type>: <message>``,
and ``DONE`` at the end. A process that aborts (libzmq: "Too many open files
(src/ipc_listener.cpp:...)" when its listener cannot accept a worker) prints no more.
The datapoints are 1 MiB arrays that the consumer keeps, and a transport with a byte
limit gets 16 MiB: a shared-memory store fills up and the workers send copies, over
connections of their own.
"""

from __future__ import annotations

import os
import resource
import sys

import numpy as np

import flowplug as fp
from flowplug import _fds, plugins

ITEMS = 40


class Arrays(fp.DataFlow):
    def reset_state(self) -> None:
        pass

    def __len__(self) -> int:
        return ITEMS

    def __iter__(self):
        for i in range(ITEMS):
            yield np.full(1 << 20, i % 251, np.uint8)


def first_byte(a: np.ndarray) -> int:
    return int(a[0])


def run(transport: str, mode: str, start_method: str | None) -> str:
    cls = plugins.get_transport(transport)
    kw: dict = {} if start_method is None else {"start_method": start_method}
    if cls.size_limit_option:
        kw[cls.size_limit_option] = 16 << 20
    if mode == "map":
        runner: fp.Runner = fp.ParallelMap(
            Arrays(), first_byte, transport=transport, num_workers=2, timeout=30, **kw
        )
    else:
        runner = fp.Runner(
            Arrays(), transport=transport, num_workers=2, mode=mode, timeout=30, **kw
        )
    held: list[int] = []
    try:
        with runner:  # started: the workers are connected now
            try:
                while True:  # other code of the program takes every fd left
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            got = list(runner)
            for _ in range(2):  # the next epoch (replicate: the stream goes on)
                got += list(runner)
        assert len(got) == 3 * ITEMS, len(got)
        return "OK"
    except BaseException as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"ERR {type(exc).__name__}: {text}"
    finally:
        for fd in held:
            os.close(fd)


def main() -> None:
    transport = sys.argv[1]
    cls = plugins.get_transport(transport)
    forks = cls.crosses_processes and not cls.runs_workers
    if forks:  # spawn's helper lives on with a pipe of ours: start it first
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = _fds.open_fds(below=soft)
    assert used is not None
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, used + 200), hard))
    variants = (
        [("replicate", "fork"), ("map", "fork"), ("shard", "spawn")]
        if forks
        else [
            ("replicate", None),
            ("map", None),
        ]
    )
    for mode, start_method in variants:
        print(f"{mode}/{start_method} {run(transport, mode, start_method)}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
