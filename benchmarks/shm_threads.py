"""Per-thread CPU of a running stream, from /proc (the seventh session's shm rows).

Usage::

    python3 benchmarks/shm_threads.py fp-shm large 2 2
    python3 benchmarks/shm_threads.py shm-ring large 2 2 record -e cpu-clock -g -o ring.data
    python3 benchmarks/shm_threads.py cap8 large 2 2      # fp-shm with capacity=8

Starts the system (``fp-<transport>``, a peer of :mod:`flowplug.bench.systems`, or
``capN``: ``fp-shm`` with ``capacity=N``), warms it up, then counts items for SECONDS and
prints, per thread of the consumer and the workers, µs per item of CPU (and of it in the
kernel), of time on a CPU and waiting for one (``schedstat``), voluntary and involuntary
switches and minor faults per item. Extra arguments run ``perf ARGS -p <workers>`` meanwhile
(or ``py-spy ...``; in either, ``SELF`` / ``KID`` stand for the consumer's / first worker's
pid, and perf then profiles only what its arguments name).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from _timing import count_steps, warm_up

TICK = os.sysconf("SC_CLK_TCK")


def tasks(pid: int) -> dict[tuple[int, int], dict[str, Any]]:
    """Counters of every thread of ``pid``."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{t}"
        try:
            with open(f"{base}/stat") as f:
                st = f.read()
            with open(f"{base}/schedstat") as f:
                sched = f.read().split()
            with open(f"{base}/status") as f:
                status = f.read()
        except FileNotFoundError:
            continue
        fields = st.rsplit(")", 1)[1].split()
        out[(pid, int(t))] = {
            "name": st[st.index("(") + 1 : st.rindex(")")],
            "utime": int(fields[11]) / TICK,
            "stime": int(fields[12]) / TICK,
            "minflt": int(fields[7]),
            "run": int(sched[0]) / 1e9,
            "wait": int(sched[1]) / 1e9,
            "vol": int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0]),
            "nonvol": int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0]),
        }
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@contextlib.contextmanager
def stream(system: str, payload: str, workers: int) -> Iterator[Iterator[Any]]:
    from flowplug.bench.systems import open_stream

    if system.startswith("cap"):
        import flowplug
        from flowplug.bench.payloads import Repeat

        runner = flowplug.Runner(
            Repeat(payload), transport="shm", num_workers=workers, capacity=int(system[3:])
        )
        try:
            yield iter(runner)
        finally:
            runner.close()
    else:
        with open_stream(system, payload, workers) as items:
            yield items


def main() -> None:
    system, payload, workers, seconds = sys.argv[1:5]
    extra = sys.argv[5:]
    me = os.getpid()
    with stream(system, payload, int(workers)) as items:
        step = items.__next__
        warm_up(step)
        kids = children(me)
        tool = None
        if extra:
            if extra[0].endswith("py-spy") or "SELF" in extra or "KID" in extra:
                argv = [a.replace("SELF", str(me)).replace("KID", str(kids[0])) for a in extra]
                if not extra[0].endswith("py-spy"):
                    argv.insert(0, "perf")
            else:
                argv = ["perf", *extra, "-p", ",".join(map(str, kids))]
            tool = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.2)
        before: dict = {}
        for pid in [me, *kids]:
            before.update(tasks(pid))
        n, elapsed = count_steps(step, float(seconds))
        after: dict = {}
        for pid in [me, *kids]:
            after.update(tasks(pid))
        if tool is not None:
            tool.send_signal(2)
            tool.communicate()
    print(f"{system} {payload} w={workers}: {n / elapsed:,.0f}/s  load {os.getloadavg()[0]:.1f}")
    for key in sorted(after):
        if key not in before:
            continue
        d = {k: after[key][k] - before[key][k] for k in after[key] if k != "name"}
        if d["run"] < 0.005 * elapsed and d["vol"] < 10:
            continue  # an idle thread
        who = "cons" if key[0] == me else f"w{kids.index(key[0])}"
        print(
            f"{who:4} {after[key]['name'][:16]:16} cpu {1e6 * (d['utime'] + d['stime']) / n:6.1f} "
            f"(sys {1e6 * d['stime'] / n:5.1f}) run {1e6 * d['run'] / n:6.1f} "
            f"runq-wait {1e6 * d['wait'] / n:6.1f} us/item  vol {d['vol'] / n:.2f} "
            f"invol {d['nonvol'] / n:.2f} minflt {d['minflt'] / n:.2f} /item"
        )


if __name__ == "__main__":
    main()
