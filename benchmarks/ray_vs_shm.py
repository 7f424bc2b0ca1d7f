"""The cost of going distributed, on one machine: transport "ray" against "zmq" (and "shm"
when it is installed), pushing one 1.2 MB float32 array per datapoint.

Usage::

    python3 benchmarks/ray_vs_shm.py [--seconds 3] [--repeats 5] [--workers 2]
                                     [--transports ray,zmq] [--json FILE]

Each repeat is a fresh runner: its start-up is timed separately (a Ray actor is a new Ray
worker process), then datapoints are counted for ``--seconds`` after a warm-up. Prints the
median items/s and MB/s per transport. Needs flowplug-ray installed for the ray row; starts
a local Ray instance sized to this machine (``ray.init(num_cpus=os.cpu_count())``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

import flowplug as fp

SHAPE = (300_000,)  # float32: 1.2 MB
MB = SHAPE[0] * 4 / 1e6


class Arrays(fp.DataFlow):
    """Yield the same 1.2 MB array forever (the cost measured is the transport's)."""

    def reset_state(self) -> None:
        self.arr = np.random.default_rng(fp.worker_info().seed).standard_normal(SHAPE)
        self.arr = self.arr.astype(np.float32)

    def __iter__(self):
        while True:
            yield self.arr


def measure(transport: str, workers: int, seconds: float) -> dict[str, float]:
    started = time.perf_counter()
    with fp.Runner(Arrays(), transport=transport, num_workers=workers) as runner:
        it = iter(runner)
        next(it)
        startup = time.perf_counter() - started
        warm = time.perf_counter() + min(1.0, seconds / 3)
        while time.perf_counter() < warm:
            next(it)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            dp = next(it)
            assert dp.shape == SHAPE
            count += 1
        elapsed = time.perf_counter() - t0
        it.close()
    return {"items_per_s": count / elapsed, "startup_s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transports", help="comma-separated subset, e.g. ray,zmq")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    available = fp.available_transports()
    wanted = args.transports.split(",") if args.transports else ["zmq", "shm", "ray"]
    names = [n for n in wanted if n in available]
    if "ray" in names:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(
        f"{MB:.1f} MB float32 arrays, {args.workers} workers, median of {args.repeats} x "
        f"{args.seconds:g} s; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs"
    )
    print(f"{'transport':<10} {'items/s':>10} {'MB/s':>10} {'start-up s':>11}")
    rows: list[dict[str, Any]] = []
    for name in names:
        runs = [measure(name, args.workers, args.seconds) for _ in range(args.repeats)]
        rate = statistics.median(r["items_per_s"] for r in runs)
        startup = statistics.median(r["startup_s"] for r in runs)
        rows.append(
            {
                "transport": name,
                "items_per_s": rate,
                "mb_per_s": rate * MB,
                "startup_s": startup,
                "runs": runs,
            }
        )
        print(f"{name:<10} {rate:10.1f} {rate * MB:10.1f} {startup:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workers": args.workers, "mb": MB, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
