"""A consumer process for the fault scenarios that need one to kill, interrupt or read.

    python consumer.py TRANSPORT MODE [--in-thread]

It prints ``READY`` once datapoints flow, then, by MODE:

- ``stream``: keeps consuming until it is killed or interrupted (scenarios 4 and 5);
- ``drop``: breaks out of the loop and exits without ``close()``, the runner still
  referenced by a global (scenario 6: atexit must clean up);
- ``chatty``: consumes 200 datapoints from workers that write heavily to stdout and
  stderr, closes, prints ``DONE`` (scenario 16);
- ``fork-child``: forks; the child tries ``next()`` (prints ``CHILD-STATEERROR fork``),
  closes and exits normally (atexit runs; a fork of a Ray driver runs every exit handler
  but Ray's, which hangs in a fork, and leaves by ``os._exit``); the parent consumes
  1.5 s more and prints ``PARENT-OK`` (scenario 26); ``fork-pool``: the same around a fork Pool;
- ``gc-sigint``: drops the runner (its workers stuck, so its cleanup is slow) and gets
  SIGINT while gc cleans up: prints ``INTERRUPTED`` and ends by KeyboardInterrupt, or
  ``SWALLOWED`` if the interrupt was lost (scenario 28).

``--in-thread`` starts the runner from a thread that then ends, so the workers have no
parent-death signal and rely on their watchdog.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

from flows import Chatty, Forever, StuckInC

import flowplug as fp


def main() -> None:
    # Behave like a program in a terminal even when started from a background job, where
    # SIGINT is inherited as ignored and Python would install no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    transport, mode = sys.argv[1], sys.argv[2]
    df = Chatty(64 << 10) if mode == "chatty" else StuckInC() if mode == "gc-sigint" else Forever()
    runner = fp.Runner(df, transport=transport, num_workers=2)
    if "--in-thread" in sys.argv:
        starter = threading.Thread(target=runner.reset_state)
        starter.start()
        starter.join()
    it = iter(runner)
    for _ in range(2 if mode == "gc-sigint" else 5):  # StuckInC: one item per worker
        next(it)
    # "ray-driver": this process imported Ray (its transport started or joined a cluster),
    # which changes how the process can end (see _leave_a_fork_of_a_ray_driver, probes.
    # interrupted_statuses).
    print("READY", *(["ray-driver"] if "ray" in sys.modules else []), flush=True)
    if mode == "stream":
        while True:
            next(it)
            time.sleep(0.001)
    elif mode == "drop":
        global kept
        kept = runner  # still referenced at exit: only atexit can release it
        it.close()
        print("DONE", flush=True)
    elif mode.startswith("fork-"):
        # Others' forks: the child must not use or kill what belongs to this process.
        if mode == "fork-child":
            pid = os.fork()
            if pid == 0:
                try:
                    next(it)
                    print("CHILD-READ-THE-PARENTS-DATA", flush=True)
                except fp.StateError as exc:
                    print(
                        "CHILD-STATEERROR", "fork" if "fork" in str(exc) else str(exc), flush=True
                    )
                runner.close()
                if "ray" in sys.modules:
                    _leave_a_fork_of_a_ray_driver()
                sys.exit(0)  # atexit runs: multiprocessing's, flowplug's
            os.waitpid(pid, 0)
        else:
            with mp.get_context("fork").Pool(2) as pool:
                assert pool.map(abs, range(-10, 0)) == list(range(10, 0, -1))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            next(it)
        it.close()
        runner.close()
        print("PARENT-OK", flush=True)
    elif mode == "gc-sigint":
        # Ctrl-C while gc runs the cleanup of a dropped runner (slow: its workers ignore
        # SIGTERM), scenario 28: it must reach this code, not be "ignored" in a finalizer.
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            del it, runner
            gc.collect()
            time.sleep(1.0)
            print("SWALLOWED", flush=True)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            raise
    elif mode == "chatty":
        for _ in range(200):
            next(it)
        it.close()
        runner.close()
        print("DONE", flush=True)


def _leave_a_fork_of_a_ray_driver() -> None:
    """End a fork of a Ray driver as normally as Ray allows: every exit handler but Ray's
    runs (flowplug's, multiprocessing's), then the process leaves through ``os._exit``.

    Ray cannot be shut down from a fork of its driver: gRPC does not survive a fork
    (ray-project/ray#22909), so ``ray.shutdown``, which Ray registers with atexit, hangs in
    the child for good; without it, Ray's C++ teardown at exit crashes (SIGSEGV, Ray 2.60).
    Nothing of flowplug's is involved: a child of any Ray driver does the same.
    """
    import atexit

    import ray

    atexit.unregister(ray.shutdown)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
