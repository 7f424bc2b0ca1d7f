"""Issue 14's shm and zmq targets, side by side in one run (ratios survive a noisy machine).

Usage::

    python3 benchmarks/shm_targets.py [--seconds 1.5] [--rounds 3] [--workers 1 2]
        [--payloads small medium large xl] [--json out.json]

Each round measures every row once, each in a fresh process (``flowplug.bench.child``),
rows interleaved so that a change in the machine's load hits all of them alike; a row's
number is the median of its rounds (each round itself the median of 3 repeats). Rows:
flowplug shm, zmq (default, and ``fresh_arrays=True`` through a ``flowplug.toml``), queue,
the raw shm ring baseline (``shm-ring``: 16 slots, slot numbers over two pipes) and the
bare pyzmq pickle-5 loop. Prints items/s, CPU us per item (all processes of the row) and the
ratios the issue asks for, met or not. The load average is printed: quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SYSTEMS = ["fp-shm", "fp-zmq", "fp-zmq-fresh", "fp-queue", "shm-ring", "pyzmq"]


def run_row(system: str, payload: str, workers: int, seconds: float) -> dict:
    spec = {
        "system": "fp-zmq" if system == "fp-zmq-fresh" else system,
        "payload": payload,
        "workers": workers,
        "touch": False,
        "warmup": 0.3,
        "seconds": seconds,
        "repeats": 3,
    }
    with tempfile.TemporaryDirectory() as cwd:
        if system == "fp-zmq-fresh":  # the option, as a user sets it
            with open(os.path.join(cwd, "flowplug.toml"), "w") as f:
                f.write("[transports.zmq]\nfresh_arrays = true\n")
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-m", "flowplug.bench.child", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=120,
        ).stdout
    for line in out.splitlines():
        if line.startswith("FLOWPLUG-BENCH-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    return {"status": "failed: no result"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--payloads", nargs="+", default=["small", "medium", "large", "xl"])
    ap.add_argument("--systems", nargs="+", default=SYSTEMS)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    rows = [(s, p, w) for p in args.payloads for w in args.workers for s in args.systems]
    rates: dict = {r: [] for r in rows}
    cpus: dict = {r: [] for r in rows}
    for k in range(args.rounds):
        for row in rows:
            res = run_row(*row, seconds=args.seconds)
            if res.get("status") == "ok":
                rates[row].append(res["items_per_s"])
                if res.get("cpu_s_per_item") is not None:
                    cpus[row].append(res["cpu_s_per_item"] * 1e6)
                # each row as it is measured: a run cut short still has its numbers
                cpu_us = cpus[row][-1] if cpus[row] else float("nan")
                print(f"  {row}: {res['items_per_s']:,.0f}/s, {cpu_us:,.1f} us CPU", flush=True)
            else:
                print(f"  {row}: {res.get('status')}", flush=True)
        print(f"round {k + 1} done, load {os.getloadavg()}", flush=True)
    med = {r: statistics.median(v) if v else None for r, v in rates.items()}
    cpu = {r: statistics.median(v) if v else None for r, v in cpus.items()}
    print(f"\n{'system':14} {'payload':8} {'w':>2} {'items/s':>12} {'cpu us/item':>12}")
    for row in rows:
        r, c = med[row], cpu[row]
        print(
            f"{row[0]:14} {row[1]:8} {row[2]:>2} "
            f"{'-' if r is None else f'{r:,.0f}':>12} {'-' if c is None else f'{c:,.1f}':>12}"
        )

    def ratio(a: str, b: str, p: str, w: int, goal: float, what: str) -> None:
        x, y = med.get((a, p, w)), med.get((b, p, w))
        if x is None or y is None:
            print(f"  not measured  {what}")
            return
        print(f"  {'met' if x / y >= goal else 'NOT MET':12}  {what}: {x / y:.2f}x (goal {goal}x)")

    print(f"\ntargets (load average at the end: {os.getloadavg()})")
    for w in args.workers:
        best = max(
            (s for s in ("fp-zmq", "fp-queue") if med.get((s, "small", w))),
            key=lambda s: med[(s, "small", w)],
            default="fp-zmq",
        )
        ratio("fp-shm", best, "small", w, 0.9, f"small w={w}: shm vs best other ({best})")
        for p, goal in (("medium", 0.5), ("large", 0.8), ("xl", 1.0)):
            ratio("fp-shm", "shm-ring", p, w, goal, f"{p} w={w}: shm vs raw shm ring")
        for p in args.payloads:
            ratio("fp-zmq", "pyzmq", p, w, 0.9, f"{p} w={w}: zmq vs bare pyzmq")
            ratio("fp-zmq-fresh", "pyzmq", p, w, 0.9, f"{p} w={w}: zmq fresh_arrays vs bare")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "rows": [
                        {
                            "system": s,
                            "payload": p,
                            "workers": w,
                            "items_per_s": med[(s, p, w)],
                            "cpu_us_per_item": cpu[(s, p, w)],
                            "rounds": rates[(s, p, w)],
                        }
                        for s, p, w in rows
                    ]
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
