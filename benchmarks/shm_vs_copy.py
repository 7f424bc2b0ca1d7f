"""shm against queue and zmq for 4.8 MB uint8 batches, beside single-core memcpy bandwidth.

    python benchmarks/shm_vs_copy.py                 # every transport, 1 and 2 workers
    python benchmarks/shm_vs_copy.py --runs 5 --seconds 3 --transports shm zmq

Each worker yields the same pre-made batch (32x224x224x3 uint8, 4.8 MB) forever, so the
numbers measure moving data, not making it. Two consumers: ``view`` only touches one byte
of each batch (what shm hands over is a view, the other transports' arrays are copies
already), ``read`` copies every batch out into its own buffer (reads every byte, as a
training loop that stages batches for the GPU would). The memcpy line is ``np.copyto``
between two 4.8 MB arrays on one core, measured in the same run; ``memcpy-cold`` copies
into 64 rotating destinations (300 MB), closer to a store whose blocks are not in cache.
Each figure is the median of ``--runs`` runs. Not a test: the machine is shared and noisy.

On a loaded machine the wall-clock rates swing with scheduling; the CPU columns do not:
microseconds of CPU per batch spent by the consumer and by all workers together (psutil),
and ``worker GB/cpu-s``, the bytes a worker moves per second of its own CPU, which is the
figure to hold against memcpy's GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import psutil

import flowplug as fp

SHAPE = (32, 224, 224, 3)
NBYTES = int(np.prod(SHAPE))


class Batches(fp.DataFlow):
    def __init__(self) -> None:
        self.batch = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)

    def __iter__(self):
        batch = self.batch
        while True:
            yield batch


def memcpy_rate(seconds: float, cold: bool) -> float:
    """Batches per second that np.copyto moves on one core."""
    src = np.random.default_rng(1).integers(0, 255, SHAPE, dtype=np.uint8)
    dsts = [np.empty_like(src) for _ in range(64 if cold else 1)]
    for d in dsts:
        np.copyto(d, src)  # fault the pages in
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.copyto(dsts[n % len(dsts)], src)
        n += 1
    return n / (time.perf_counter() - start)


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def transport_rate(
    transport: str, workers: int, seconds: float, read: bool
) -> tuple[float, float, float]:
    """(batches per second received, consumer CPU s per batch, workers' CPU s per batch)."""
    out = np.empty(SHAPE, np.uint8)
    me = psutil.Process()
    with fp.Runner(Batches(), transport=transport, num_workers=workers) as runner:
        it = iter(runner)
        warm = time.perf_counter()
        while time.perf_counter() - warm < min(1.0, seconds / 2):
            next(it)
        kids = me.children(recursive=True)
        n, start = 0, time.perf_counter()
        cpu0, kids0 = time.process_time(), _cpu(kids)
        while time.perf_counter() - start < seconds:
            dp = next(it)
            if read:
                np.copyto(out, dp)
            else:
                assert dp.shape == SHAPE and dp[0, 0, 0, 0] == dp[0, 0, 0, 0]
            del dp
            n += 1
        elapsed = time.perf_counter() - start
        cpu, kids_cpu = time.process_time() - cpu0, _cpu(kids) - kids0
        it.close()
    return n / elapsed, cpu / n, kids_cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--transports", nargs="*", default=["shm", "zmq", "queue"])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    parser.add_argument(
        "--consumers", nargs="*", default=["view", "read"], choices=["view", "read"]
    )
    args = parser.parse_args()

    med = statistics.median
    print(f"batch {SHAPE} uint8 = {NBYTES / 1e6:.2f} MB; median of {args.runs} runs")
    print(
        "| what | items/s | GB/s | vs memcpy | consumer CPU µs/item | workers CPU µs/item "
        "| worker GB/cpu-s | runs (items/s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    memcpy = 0.0
    for cold in (False, True):
        rate = med(memcpy_rate(args.seconds, cold) for _ in range(args.runs))
        memcpy = memcpy or rate
        what = "np.copyto, 1 core" + (" (cold dst)" if cold else "")
        gbs = rate * NBYTES / 1e9
        print(f"| {what} | {rate:.0f} | {gbs:.2f} | {rate / memcpy:.0%} | | {1e6 / rate:.0f} "
              f"| {gbs:.2f} | |")  # fmt: skip
    for consumer in args.consumers:
        for workers in args.workers:
            for name in args.transports:
                runs = [
                    transport_rate(name, workers, args.seconds, consumer == "read")
                    for _ in range(args.runs)
                ]
                rate = med(r[0] for r in runs)
                cons, work = med(r[1] for r in runs), med(r[2] for r in runs)
                spread = ", ".join(f"{r[0]:.0f}" for r in runs)
                print(
                    f"| {name}, {workers} worker(s), consumer {consumer}s | {rate:.0f} "
                    f"| {rate * NBYTES / 1e9:.2f} | {rate / memcpy:.0%} | {cons * 1e6:.0f} "
                    f"| {work * 1e6:.0f} | {NBYTES / work / 1e9:.2f} | {spread} |"
                )


if __name__ == "__main__":
    main()
