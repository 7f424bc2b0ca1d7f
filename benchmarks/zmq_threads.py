"""Where a zmq row's time goes, thread by thread, on both sides (issue 14's zmq target).

Usage::

    python3 benchmarks/zmq_threads.py --seconds 3 fp-zmq:large:1 pyzmq:large:1

A row is ``system:payload:workers`` (systems of :mod:`flowplug.bench.systems`), run in a
fresh process with this tree (or ``--tree``) first on ``PYTHONPATH``. After a warm-up,
over ``--seconds``, it reads ``/proc/<pid>/task/<tid>/schedstat`` and ``status`` of every
thread of the consumer and of its workers, and prints per item: the thread's time on a
CPU, its time *runnable but waiting for a CPU* (the machine is short of cores), and its
context switches (voluntary: it went to sleep; involuntary: it was preempted). Threads
are named by their ``comm`` (``ZMQbg/IO/0`` is libzmq's I/O thread, ``Thread-N`` pyzmq's
garbage collector).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _timing import count_steps, warm_up

HERE = os.path.dirname(os.path.abspath(__file__))


def _descendants(root: int) -> list[int]:
    out = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def _threads(root: int) -> dict[tuple[int, int], tuple[str, list[int]]]:
    """(pid, tid) -> (comm, [run ns, wait ns, voluntary, involuntary])."""
    out = {}
    for pid in _descendants(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
                with open(f"{base}/schedstat") as f:
                    run, wait, _ = (int(x) for x in f.read().split())
                vol = invol = 0
                with open(f"{base}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol = int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol = int(line.split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            out[(pid, int(tid))] = (comm, [run, wait, vol, invol])
    return out


def child(system: str, payload: str, workers: int, seconds: float) -> None:
    from flowplug.bench.systems import open_stream

    me = os.getpid()
    with open_stream(system, payload, workers) as items:
        step = items.__next__
        warm_up(step)
        before = _threads(me)
        n, elapsed = count_steps(step, seconds)
        after = _threads(me)
    load = os.getloadavg()[0]
    print(f"{system}:{payload}:{workers}  {n / elapsed:,.0f} items/s  load {load:.1f}")
    print(
        f"  {'process':9} {'thread':16} {'cpu us/item':>11} {'waits-for-cpu':>13} "
        f"{'sleeps/item':>11} {'preempted':>9}"
    )
    total = [0.0, 0.0]
    for key, (comm, end) in sorted(after.items()):
        if key not in before:
            continue
        begin = before[key][1]
        d = [e - b for e, b in zip(end, begin, strict=True)]
        if d[0] < 0.001 * n * 1000:  # under 1 ns per item: idle thread
            continue
        side = "consumer" if key[0] == me else f"worker{key[0] % 1000}"
        total[0] += d[0]
        total[1] += d[1]
        print(
            f"  {side:9} {comm:16} {d[0] / n / 1000:11.1f} {d[1] / n / 1000:13.1f} "
            f"{d[2] / n:11.2f} {d[3] / n:9.2f}"
        )
    print(
        f"  {'all':9} {'':16} {total[0] / n / 1000:11.1f} {total[1] / n / 1000:13.1f}"
        f"   (cores busy: {total[0] / elapsed / 1e9:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", help="system:payload:workers")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tree", default=os.path.dirname(HERE), help="flowplug tree (default: this)")
    ap.add_argument("--child", nargs=4, metavar=("SYSTEM", "PAYLOAD", "WORKERS", "SECONDS"))
    args = ap.parse_args()
    if args.child:
        system, payload, workers, seconds = args.child
        child(system, payload, int(workers), float(seconds))
        return
    tree = os.path.abspath(args.tree)
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree}/plugins")
    for row in args.rows:
        argv = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--child"]
        argv += [*row.split(":"), str(args.seconds)]
        subprocess.run(argv, env=env, cwd="/tmp", timeout=300, check=False)


if __name__ == "__main__":
    main()
