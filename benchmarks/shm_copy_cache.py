"""How much a 1.2 MB copy into shared memory costs when the destination is in cache or not.

Usage: ``python3 benchmarks/shm_copy_cache.py [N ...]`` (default 4 16 64). One or two
processes each copy a 1.2 MB array (the ``large`` payload's size) into N rotating
destinations of one shared mapping, as a shm worker does into the store's blocks, for 2 s;
prints the CPU and wall time per copy. N destinations of 1.2 MB are the working set: the
store's blocks in flight and not yet reused, or the raw shm ring's 16 slots.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

import numpy as np

SIZE = 8 * 224 * 224 * 3


def copies(mm: mmap.mmap, n: int, k: int, procs: int) -> None:
    src = np.random.default_rng(k).integers(0, 256, SIZE, dtype=np.uint8)
    view = memoryview(mm)
    for i in range(n * procs):  # every page mapped in this process first
        view[i * SIZE : (i + 1) * SIZE] = src
    cpu, wall, done = time.thread_time(), time.perf_counter(), 0
    while time.perf_counter() - wall < 2:
        i = done % n + k * n
        view[i * SIZE : (i + 1) * SIZE] = src
        done += 1
    cpu_us = (time.thread_time() - cpu) / done * 1e6
    wall_us = (time.perf_counter() - wall) / done * 1e6
    print(f"N={n:3} processes={procs} #{k}: {cpu_us:6.0f} us CPU, {wall_us:6.0f} us wall per copy")


def main() -> None:
    print(f"load average: {os.getloadavg()}", flush=True)
    for n in [int(a) for a in sys.argv[1:]] or [4, 16, 64]:
        for procs in (1, 2):
            mm = mmap.mmap(-1, SIZE * n * procs)
            pids = []
            for k in range(procs):
                pid = os.fork()
                if pid == 0:
                    copies(mm, n, k, procs)
                    sys.stdout.flush()
                    os._exit(0)
                pids.append(pid)
            for pid in pids:
                os.waitpid(pid, 0)
            mm.close()


if __name__ == "__main__":
    main()
