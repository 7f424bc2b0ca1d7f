"""Items/s of small datapoints through a Runner, for comparing two checkouts side by side.

    python benchmarks/stats_overhead.py --tree BEFORE --tree AFTER --rounds 3 [--mode map]
    python benchmarks/stats_overhead.py --strip --tree TREE [--work-us 50] [--mode map]

``--strip`` measures the cost of the statistics alone: it first copies each tree with
the per-datapoint counting taken out (the consumer's ``meter.delivered += 1``, a
replicate worker's count where it flushes, a map worker's per task; the waits are
timed only where the code waits anyway, so they stay), and runs the copy as the
"before" of its tree.

Each (tree, transport, mode) runs in a fresh process with PYTHONPATH set to the tree (and
its plugins/), the trees taking turns; the median of the rounds is printed: items/s, and
the consumer thread's CPU time per item (less sensitive to a busy machine than items/s).
The payload is a small dict, so that the per-item cost of the runner shows; the consumer
does nothing else (the workers are the bottleneck), or spins ``--work-us`` per item (it is).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import flowplug as fp

transport, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
work = float(sys.argv[4]) / 1e6  # the consumer's own work per item (s), spun


def step():
    end = time.perf_counter() + work
    while time.perf_counter() < end:
        pass
item = {"x": 1, "name": "small", "v": [1.0, 2.0, 3.0]}


class Repeat(fp.DataFlow):
    def __len__(self):
        return 100_000

    def __iter__(self):
        for _ in range(100_000):
            yield item


def same(dp):
    return dp


if mode == "map":  # a ParallelMap: the source read in the consumer, items as tasks
    runner = fp.ParallelMap(Repeat(), same, transport=transport, num_workers=2, capacity=64)
else:
    runner = fp.Runner(Repeat(), transport=transport, num_workers=2, mode=mode, capacity=64)
with runner:
    it = iter(runner)
    for _ in range(2000):  # warm-up
        next(it)
    count, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        for _ in range(500):
            try:
                next(it)
                if work:
                    step()
            except StopIteration:  # the next epoch
                it = iter(runner)
                next(it)
        count += 500
    rate = count / (time.perf_counter() - start)
    cpu_us = (time.thread_time() - cpu) / count * 1e6
    it.close()
print(json.dumps({"rate": rate, "cpu_us": cpu_us}))
"""


#: (file, pattern, replacement, how many times it must match) for --strip.
STRIP = [
    ("flowplug/modes.py", r"meter\.delivered \+= 1", "pass", None),
    ("flowplug/parallel.py", r"meter\.delivered \+= 1", "pass", None),
    # a replicate worker publishes its count where it flushes anyway (every few dozen)
    (
        "flowplug/_gates.py",
        r"counters\[slot\] = produced \+ sent\n(\s+)if auto",
        r"pass\n\1if auto",
        1,
    ),
    ("flowplug/_gates.py", r"counters\[slot\] = answered", "pass", 1),
]


def strip(tree: str, into: str) -> str:
    """A copy of ``tree`` (flowplug/ and plugins/) without the per-datapoint counting."""
    out = os.path.join(into, os.path.basename(os.path.normpath(tree)) + "-nostats")
    for part in ("flowplug", "plugins"):
        shutil.copytree(os.path.join(tree, part), os.path.join(out, part))
    for name, pattern, new, times in STRIP:
        path = os.path.join(out, name)
        with open(path) as f:
            text = f.read()
        text, n = re.subn(pattern, new, text)
        if n == 0 or (times is not None and n != times):
            sys.exit(f"--strip: {pattern!r} matched {n} times in {name}; update STRIP")
        with open(path, "w") as f:
            f.write(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="a checkout of flowplug")
    p.add_argument("--transport", action="append", default=None)
    p.add_argument(
        "--mode", action="append", default=None, help="replicate, shard or map (a ParallelMap)"
    )
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="the consumer spins this many us per item (e.g. 50: the workers wait on it)",
    )
    p.add_argument(
        "--strip",
        action="store_true",
        help="compare each tree with a copy of it without the per-datapoint counting",
    )
    args = p.parse_args()
    if args.strip:
        into = tempfile.mkdtemp(prefix="stats-overhead-")
        args.tree = [t for tree in args.tree for t in (strip(tree, into), tree)]
    transports = args.transport or ["zmq", "queue"]
    modes = args.mode or ["replicate", "shard"]
    rates: dict[tuple[str, str, str], list[float]] = {}
    cpus: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for transport in transports:
            for mode in modes:
                for tree in args.tree:
                    tree = os.path.abspath(tree)
                    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree}/plugins")
                    proc = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            CHILD,
                            transport,
                            mode,
                            str(args.seconds),
                            str(args.work_us),
                        ],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if proc.returncode != 0:
                        sys.exit(f"{transport} {mode} {tree} failed:\n{proc.stderr}")
                    out = proc.stdout
                    got = json.loads(out)
                    rates.setdefault((transport, mode, tree), []).append(got["rate"])
                    cpus.setdefault((transport, mode, tree), []).append(got["cpu_us"])
    print(
        f"{'transport':<10} {'mode':<10} "
        + " ".join(f"{os.path.basename(t):>14}" for t in args.tree)
    )
    for transport in transports:
        for mode in modes:
            row = [
                statistics.median(rates[(transport, mode, os.path.abspath(t))]) for t in args.tree
            ]
            ratio = f"  after/before {row[-1] / row[0]:.3f}" if len(row) > 1 else ""
            print(f"{transport:<10} {mode:<10} " + " ".join(f"{r:14.0f}" for r in row) + ratio)
    print("consumer CPU per item (us, median):")
    for transport in transports:
        for mode in modes:
            row = [
                statistics.median(cpus[(transport, mode, os.path.abspath(t))]) for t in args.tree
            ]
            print(f"{transport:<10} {mode:<10} " + " ".join(f"{r:14.2f}" for r in row))
    print(
        "rounds:",
        json.dumps(
            {
                f"{k[0]} {k[1]} {os.path.basename(k[2])}": [round(x) for x in v]
                for k, v in rates.items()
            }
        ),
    )


if __name__ == "__main__":
    main()
