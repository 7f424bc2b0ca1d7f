"""A/B of two flowplug trees, row by row, alternating (what docs/performance.md's shm rows use).

Usage::

    git -C /work/main archive REV | tar -x -C /tmp/base
    python3 benchmarks/shm_ab.py --base /tmp/base --new . --rounds 3 --seconds 1.5 \\
        fp-shm:small:1 fp-shm:large:2 pyzmq:medium:1

A row is ``system:payload:workers`` (systems of :mod:`flowplug.bench.systems`). Each round
runs every row once per tree, each in a fresh process with that tree first on
``PYTHONPATH``, base first in odd rounds and new first in even ones, so that a change in
the machine's load hits both alike. Printed per run and as medians: items/s, the
consumer's CPU per item (its process, all threads) and the workers' (from ``/proc``), the
load average. ``--child`` is the per-run part (one row in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

from _timing import count_steps, warm_up


def _workers_cpu(root: int) -> dict[int, float]:
    """CPU seconds of each descendant process of ``root`` (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if pid != root:
                out[pid] = (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass  # a process or thread that just ended
    return out


def child(system: str, payload: str, workers: int, seconds: float) -> None:
    from flowplug.bench.systems import open_stream

    with open_stream(system, payload, workers) as items:
        step = items.__next__
        warm_up(step)
        before = _workers_cpu(os.getpid())
        own = resource.getrusage(resource.RUSAGE_SELF)
        n, elapsed = count_steps(step, seconds)
        own_end = resource.getrusage(resource.RUSAGE_SELF)
        after = _workers_cpu(os.getpid())
    consumer = own_end.ru_utime + own_end.ru_stime - own.ru_utime - own.ru_stime
    work = sum(after[p] - before[p] for p in after if p in before)
    result = {
        "rate": n / elapsed,
        "consumer_us": consumer / n * 1e6,
        "workers_us": work / n * 1e6,
        "load": os.getloadavg()[0],
    }
    print("SHM-AB", json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", help="system:payload:workers")
    ap.add_argument("--base", help="the base tree (a checkout or an archive of it)")
    ap.add_argument("--new", default=".", help="the new tree (default: here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--child", nargs=4, metavar=("SYSTEM", "PAYLOAD", "WORKERS", "SECONDS"))
    args = ap.parse_args()
    if args.child:
        system, payload, workers, seconds = args.child
        child(system, payload, int(workers), float(seconds))
        return
    trees = {"new": os.path.abspath(args.new)}
    if args.base:
        trees["base"] = os.path.abspath(args.base)
    order = [t for t in ("base", "new") if t in trees]
    results: dict[tuple[str, str], list[dict]] = {}
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    for k in range(args.rounds):
        for row in args.rows:
            system, payload, workers = row.split(":")
            for tree in order if k % 2 == 0 else order[::-1]:
                path = trees[tree]
                env = dict(os.environ, PYTHONPATH=f"{path}:{path}/plugins")
                argv = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--child"]
                argv += [system, payload, workers, str(args.seconds)]
                out = subprocess.run(
                    argv, capture_output=True, text=True, env=env, cwd="/tmp", timeout=300
                ).stdout
                lines = [x for x in out.splitlines() if x.startswith("SHM-AB ")]
                if not lines:
                    print(f"{tree:4} {row}: failed", flush=True)
                    continue
                r = json.loads(lines[0].split(" ", 1)[1])
                results.setdefault((tree, row), []).append(r)
                print(
                    f"{tree:4} {row:20} {r['rate']:>10,.0f}/s  consumer {r['consumer_us']:7.1f} "
                    f"us  workers {r['workers_us']:7.1f} us  load {r['load']:.1f}",
                    flush=True,
                )
    print(f"\nmedians (load average at the end: {os.getloadavg()})")
    for row in args.rows:
        for tree in order:
            rs = results.get((tree, row), [])
            if not rs:
                continue

            def med(key: str, rs: list[dict] = rs) -> float:
                return statistics.median(r[key] for r in rs)

            print(
                f"{tree:4} {row:20} {med('rate'):>10,.0f}/s  consumer {med('consumer_us'):7.1f} "
                f"us  workers {med('workers_us'):7.1f} us  (n={len(rs)})"
            )


if __name__ == "__main__":
    main()
