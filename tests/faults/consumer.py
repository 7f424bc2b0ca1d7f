"""A consumer process for the fault scenarios that need one to kill, interrupt or read.

    python consumer.py TRANSPORT MODE [--in-thread]

It prints ``READY`` once datapoints flow, then, by MODE:

- ``stream``: keeps consuming until it is killed or interrupted (scenarios 4 and 5);
- ``drop``: breaks out of the loop and exits without ``close()``, the runner still
  referenced by a global (scenario 6: atexit must clean up);
- ``chatty``: consumes 200 datapoints from workers that write heavily to stdout and
  stderr, closes, prints ``DONE`` (scenario 16);
- ``fork-child``: forks; the child tries ``next()`` (prints ``CHILD-STATEERROR fork``),
  closes and exits normally (atexit runs); the parent consumes 1.5 s more and prints
  ``PARENT-OK`` (scenario 26); ``fork-pool``: the same around a fork Pool;
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
    print("READY", flush=True)
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


if __name__ == "__main__":
    main()
