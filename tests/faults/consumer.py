"""A consumer process for the fault scenarios that need one to kill, interrupt or read.

    python consumer.py TRANSPORT MODE [--in-thread]

It prints ``READY`` once datapoints flow, then, by MODE:

- ``stream``: keeps consuming until it is killed or interrupted (scenarios 4 and 5);
- ``drop``: breaks out of the loop and exits without ``close()``, the runner still
  referenced by a global (scenario 6: atexit must clean up);
- ``chatty``: consumes 200 datapoints from workers that write heavily to stdout and
  stderr, closes, prints ``DONE`` (scenario 16).

``--in-thread`` starts the runner from a thread that then ends, so the workers have no
parent-death signal and rely on their watchdog.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from faultlib import Chatty, Forever

import flowplug as fp


def main() -> None:
    # Behave like a program in a terminal even when started from a background job, where
    # SIGINT is inherited as ignored and Python would install no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    transport, mode = sys.argv[1], sys.argv[2]
    df = Chatty(64 << 10) if mode == "chatty" else Forever()
    runner = fp.Runner(df, transport=transport, num_workers=2)
    if "--in-thread" in sys.argv:
        starter = threading.Thread(target=runner.reset_state)
        starter.start()
        starter.join()
    it = iter(runner)
    for _ in range(5):
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
    elif mode == "chatty":
        for _ in range(200):
            next(it)
        it.close()
        runner.close()
        print("DONE", flush=True)


if __name__ == "__main__":
    main()
