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
load average, how much of the machine was idle and stolen (by the hypervisor, from
``/proc/stat``) while the row ran, and the machine's memcpy speed right after it (GB/s
copying 1.2 MB into 16 slots in turn: on a shared host it halves and doubles within
minutes, and the large rows follow it). ``--child`` is the per-run part (one row in this process).

``--versus SYSTEM`` runs each row next to ``SYSTEM`` on the same payload and workers (e.g.
``fp-shm:large:2`` and ``shm-ring:large:2``), the two in turn, the row first in odd
rounds, and prints the median of the per-round ratios (row / SYSTEM): two runs a second
apart see nearly the same machine, so their ratio holds when the rates themselves swing::

    python3 benchmarks/shm_ab.py --versus shm-ring --rounds 5 \\
        fp-shm:large:1 fp-shm:large:2 fp-shm:xl:1 fp-shm:xl:2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

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


def _machine_ticks() -> list[int]:
    """The machine's CPU time so far, in ticks: [all, idle + iowait, steal] (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user)
    return [sum(ticks[:8]), ticks[3] + ticks[4], ticks[7]]


def _memcpy_gbs() -> float:
    """This machine's memory speed now: GB/s copying 1.2 MB into 16 slots in turn (20 MB,
    the raw ring's pattern), the best of 3 passes. On a shared host it changes by 2x
    within minutes (the other guests' traffic), and the large rows with it."""
    import mmap

    import numpy as np

    n = 1_204_224
    src = np.ones(n, np.uint8)
    mm = mmap.mmap(-1, 16 * (n + 4096))
    view = np.frombuffer(mm, np.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(16):
            at = i * (n + 4096)
            view[at : at + n] = src
        best = min(best, time.perf_counter() - start)
    del view
    mm.close()
    return 16 * n / best / 1e9


def child(system: str, payload: str, workers: int, seconds: float) -> None:
    from flowplug.bench.systems import open_stream

    with open_stream(system, payload, workers) as items:
        step = items.__next__
        warm_up(step)
        before = _workers_cpu(os.getpid())
        own = resource.getrusage(resource.RUSAGE_SELF)
        machine = _machine_ticks()
        n, elapsed = count_steps(step, seconds)
        machine = [b - a for a, b in zip(machine, _machine_ticks(), strict=True)]
        own_end = resource.getrusage(resource.RUSAGE_SELF)
        after = _workers_cpu(os.getpid())
    consumer = own_end.ru_utime + own_end.ru_stime - own.ru_utime - own.ru_stime
    work = sum(after[p] - before[p] for p in after if p in before)
    result = {
        "rate": n / elapsed,
        "consumer_us": consumer / n * 1e6,
        "workers_us": work / n * 1e6,
        "load": os.getloadavg()[0],
        # of all the machine's cores, the share left idle and the share the hypervisor took
        "idle": machine[1] / max(machine[0], 1),
        "steal": machine[2] / max(machine[0], 1),
        "memcpy_gbs": _memcpy_gbs(),
    }
    print("SHM-AB", json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", help="system:payload:workers")
    ap.add_argument("--base", help="the base tree (a checkout or an archive of it)")
    ap.add_argument("--new", default=".", help="the new tree (default: here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--versus", help="a system each row also runs as, for ratios (e.g. shm-ring)")
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
            runs = [row]
            if args.versus:  # the row's system first in odd rounds, the other in even ones
                runs = [row, f"{args.versus}:{payload}:{workers}"][:: 1 if k % 2 == 0 else -1]
            for tree in order if k % 2 == 0 else order[::-1]:
                for run in runs:
                    r = _run(trees[tree], run, args.seconds)
                    if r is None:
                        print(f"{tree:4} {run}: failed", flush=True)
                        continue
                    r["round"] = k
                    results.setdefault((tree, run), []).append(r)
                    print(f"{tree:4} {run:22} {_fmt(r)}  load {r['load']:.1f}", flush=True)
    print(f"\nmedians (load average at the end: {os.getloadavg()})")
    for row in args.rows:
        system, payload, workers = row.split(":")
        shown = [row] + ([f"{args.versus}:{payload}:{workers}"] if args.versus else [])
        for tree in order:
            for run in shown:
                rs = results.get((tree, run), [])
                if rs:
                    print(f"{tree:4} {run:22} {_fmt(_medians(rs))}  (n={len(rs)})")
            if args.versus:
                mine = {r["round"]: r["rate"] for r in results.get((tree, row), [])}
                other = {r["round"]: r["rate"] for r in results.get((tree, shown[1]), [])}
                ratios = [mine[k] / other[k] for k in sorted(mine) if other.get(k)]
                if ratios:
                    each = " ".join(f"{x:.2f}" for x in ratios)
                    print(
                        f"{tree:4} {row} / {args.versus}: median {statistics.median(ratios):.2f}x "
                        f"(rounds: {each})"
                    )


def _run(path: str, row: str, seconds: float) -> dict | None:
    """One row in a fresh process with the tree at ``path`` first on PYTHONPATH."""
    system, payload, workers = row.split(":")
    env = dict(os.environ, PYTHONPATH=f"{path}:{path}/plugins")
    argv = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--child"]
    argv += [system, payload, workers, str(seconds)]
    out = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd="/tmp", timeout=300
    ).stdout
    lines = [x for x in out.splitlines() if x.startswith("SHM-AB ")]
    return json.loads(lines[0].split(" ", 1)[1]) if lines else None


def _medians(rs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "round"}


def _fmt(r: dict) -> str:
    return (
        f"{r['rate']:>10,.0f}/s  consumer {r['consumer_us']:7.1f} us  workers "
        f"{r['workers_us']:7.1f} us  idle {r['idle']:4.0%}  steal {r['steal']:4.0%}  "
        f"memcpy {r['memcpy_gbs']:4.1f} GB/s"
    )


if __name__ == "__main__":
    main()
