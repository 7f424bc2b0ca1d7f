"""Start-up of transport ``ray``: the first runner's first datapoint after ``ray.init``.

Usage::

    python3 benchmarks/ray_startup.py [--rounds 7] [--payload dicts] [--workers 2]
                                      [--base DIR]

Each sample is a fresh process that calls ``ray.init(num_cpus=4)`` (which starts idle worker
processes), imports ``ray_bench`` (and so flowplug), then times making the first runner of
``ray_bench.run_flowplug`` until its first datapoint is in hand; and, as the floor, ``W``
bare actors until each answered one call. Rounds alternate flowplug and bare actors (and,
with ``--base``, flowplug from another checkout: ``DIR`` and its plugins go first on the
path of that sample and of its actors), so a change in the machine's load hits them alike.
Compile the trees first and leave PYTHONDONTWRITEBYTECODE unset (as after ``pip install``),
or start-up includes compiling flowplug.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(which: str, payload: str, workers: int) -> None:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    import ray_bench

    t0 = time.perf_counter()
    if which == "bare":

        class Bare:
            def where(self) -> int:
                return os.getpid()

        actors = [ray.remote(num_cpus=1)(Bare).remote() for _ in range(workers)]
        ray.get([a.where.remote() for a in actors])
        print(time.perf_counter() - t0, flush=True)
    else:
        it = ray_bench.run_flowplug(payload, workers)
        next(it)
        print(time.perf_counter() - t0, flush=True)
        it.close()
    ray.shutdown()


def path_of(tree: Path | None) -> str:
    parts = [str(HERE)]
    if tree is not None:
        parts = [str(tree), str(tree / "plugins"), str(tree / "plugins" / "flowplug-ray"), *parts]
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(parts + ([old] if old else []))


def sample(which: str, tree: Path | None, args: argparse.Namespace) -> float:
    env = dict(os.environ, PYTHONPATH=path_of(tree))
    cmd = [sys.executable, __file__, "--child", which, "--payload", args.payload]
    cmd += ["--workers", str(args.workers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--payload", choices=("dicts", "arrays"), default="dicts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--base", type=Path, help="a checkout to compare with (flowplug-base)")
    parser.add_argument("--child", choices=("flowplug", "bare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.payload, args.workers)
        return
    rows = [("flowplug", None)] + ([("flowplug-base", args.base)] if args.base else [])
    rows.append(("bare", None))
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    print(f"start {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        for name, tree in rows:
            t = sample("bare" if name == "bare" else "flowplug", tree, args)
            times[name].append(t)
            print(f"round {r + 1} {name:<14} {t:.3f} s  load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"end {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}")
    for name, ts in times.items():
        print(
            f"{name:<14} median {statistics.median(ts):.3f} s  "
            f"range {min(ts):.3f}-{max(ts):.3f} s  ({len(ts)} runs, W={args.workers})"
        )


if __name__ == "__main__":
    main()
