"""zmq against the bare pyzmq loop, A/B of flowplug trees (issue 14's zmq target).

Usage::

    git -C /work/main archive REV | tar -x -C /tmp/base
    python3 benchmarks/zmq_ab.py --base /tmp/base --new . --rounds 5 --seconds 1.5 \\
        small:1 medium:1 large:2

A row is ``payload:workers``. Each round runs, per row, flowplug zmq from every tree and
the bare pyzmq loop (``flowplug.bench.systems._pyzmq``: pickle 5, ``copy=False``, no
framing), each in a fresh process (``benchmarks/shm_ab.py --child``), in an order that
rotates from round to round, so that a change in the machine's load hits all alike.
Printed per run and as medians: items/s, the consumer's and the workers' CPU per item, the
load average, the cores each side keeps busy (its CPU per item x items/s: the side near
its limit is the bound one); and per tree the median over rounds of zmq / pyzmq *of the
same round* (the ratio the target is about: less noisy than a ratio of medians at a
changing load).

``--transport queue`` compares another transport's trees the same way (still against
pyzmq). ``--variant NAME=TREE[,VAR=VALUE...]`` adds a tree under a name, with environment
variables for its runs (e.g. a flowplug.toml directory: ``FLOWPLUG_CONFIG``-style switches
of an experiment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(
    tree: str, env_extra: dict[str, str], system: str, payload: str, workers: str, seconds: float
) -> dict | None:
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree}/plugins", **env_extra)
    argv = [sys.executable, "-W", "ignore", os.path.join(HERE, "shm_ab.py"), "--child"]
    argv += [system, payload, workers, str(seconds)]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, env=env, cwd="/tmp", timeout=300
        ).stdout
    except subprocess.TimeoutExpired:
        return None
    lines = [x for x in out.splitlines() if x.startswith("SHM-AB ")]
    return json.loads(lines[0].split(" ", 1)[1]) if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="payload:workers")
    ap.add_argument("--base", help="the base tree (an archive of a commit)")
    ap.add_argument("--new", default=".", help="the new tree (default: here)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=TREE[,VAR=VALUE...]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--transport", default="zmq", help="the flowplug transport (default zmq)")
    args = ap.parse_args()
    variants: dict[str, tuple[str, dict[str, str]]] = {}
    if args.base:
        variants["base"] = (os.path.abspath(args.base), {})
    variants["new"] = (os.path.abspath(args.new), {})
    for spec in args.variant:
        name, rest = spec.split("=", 1)
        tree, *envs = rest.split(",")
        variants[name] = (os.path.abspath(tree), dict(e.split("=", 1) for e in envs))
    runs = [(name, f"fp-{args.transport}") for name in variants] + [("new", "pyzmq")]
    results: dict[tuple[str, str], list[dict]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    for k in range(args.rounds):
        for row in args.rows:
            payload, workers = row.split(":")
            shift = k % len(runs)
            got: dict[str, dict] = {}
            for name, system in runs[shift:] + runs[:shift]:
                tree, env = variants[name]
                label = "pyzmq" if system == "pyzmq" else name
                r = run(tree, env, system, payload, workers, args.seconds)
                if r is None:
                    print(f"{label:8} {row:10} failed", flush=True)
                    continue
                got[label] = r
                results.setdefault((label, row), []).append(r)
                print(
                    f"{label:8} {row:10} {r['rate']:>10,.0f}/s  consumer "
                    f"{r['consumer_us']:7.1f} us  workers {r['workers_us']:7.1f} us  "
                    f"load {r['load']:.1f}",
                    flush=True,
                )
            for name in variants:
                if name in got and "pyzmq" in got:
                    ratios.setdefault((name, row), []).append(
                        got[name]["rate"] / got["pyzmq"]["rate"]
                    )
    print(f"\nmedians (load average at the end: {os.getloadavg()})")
    for row in args.rows:
        for label in [*variants, "pyzmq"]:
            rs = results.get((label, row), [])
            if not rs:
                continue

            def med(key: str, rs: list[dict] = rs) -> float:
                return statistics.median(r[key] for r in rs)

            ratio = ratios.get((label, row))
            said = (
                ""
                if not ratio
                else (
                    f"  x{statistics.median(ratio):.2f} pyzmq ({min(ratio):.2f}-{max(ratio):.2f})"
                )
            )
            # cores kept busy (CPU per item x items/s): a side near 1.0 (the consumer) or
            # near its worker count is the bound one; both together near the machine's
            # cores: it is short of CPU, and other load moves the row.
            busy_c = statistics.median(r["consumer_us"] * r["rate"] / 1e6 for r in rs)
            busy_w = statistics.median(r["workers_us"] * r["rate"] / 1e6 for r in rs)
            print(
                f"{label:8} {row:10} {med('rate'):>10,.0f}/s  consumer "
                f"{med('consumer_us'):7.1f} us  workers {med('workers_us'):7.1f} us  "
                f"busy {busy_c:.2f}+{busy_w:.2f} cores  (n={len(rs)}){said}"
            )


if __name__ == "__main__":
    main()
