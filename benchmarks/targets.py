"""Check the speed targets (the benchmark issue's, and issue 14's for shm and zmq) against
a ``flowplug bench --json`` file.

Usage: ``python benchmarks/targets.py bench-full.json``. Prints each target as met / not
met / not measured, with the numbers. The exit status is 0 either way: on a shared,
noisy machine a target is a measurement to report, not a test to fail.

A ratio of two rows is the median of their per-round ratios when the file has several
rounds (``flowplug bench --rounds N``; ``--all`` measures 3): each round measured both rows
seconds apart, so a slow minute hits both sides alike. With one round it is the ratio of
the rows' items/s. The first lines say which.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

from flowplug.bench.harness import paired_ratio, round_ratios


def main(path: str) -> None:
    with open(path) as f:
        result = json.load(f)
    print(f"targets ({path}; load average at the start: {result['machine']['load_average']})")
    check(result)


def method(result: dict[str, Any]) -> str:
    """How this file's ratios are computed, in one line."""
    rounds = result.get("config", {}).get("rounds", 1)
    if rounds > 1:
        return (
            f"ratios: median of the {rounds} per-round ratios (both rows measured seconds "
            "apart in each round); items/s: median of the rounds"
        )
    return "ratios: of the rows' items/s (1 round: each row the median of its repeats)"


def per_round(x: dict[str, Any], y: dict[str, Any]) -> str:
    """``; rounds 1.10 1.16 1.24`` (the per-round ratios), or nothing with one round."""
    ratios = round_ratios(x, y)
    return "" if ratios is None else "; rounds " + " ".join(f"{r:.2f}" for r in ratios)


def check(result: dict[str, Any]) -> None:
    """Print every target of the ``flowplug bench --json`` result ``result``."""
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    index = {(r["system"], r["payload"], r["workers"], r["touch"]): r for r in rows}
    print(f"  {method(result)}")

    def ratio(a: str, b: str, payload: str, workers: int, goal: float, name: str) -> None:
        x, y = index.get((a, payload, workers, False)), index.get((b, payload, workers, False))
        if x is None or y is None:
            missing = a if x is None else b
            print(f"  NOT MEASURED  {name}: no row for {missing} {payload} w={workers}")
            return
        value = paired_ratio(x, y)
        verdict = "met" if value >= goal else "NOT MET"
        print(
            f"  {verdict:<12}  {name}: {value:.2f}x (goal {goal:g}x; "
            f"{x['items_per_s']:,.0f} vs {y['items_per_s']:,.0f} items/s{per_round(x, y)})"
        )

    ratio("fp-shm", "tp-zmq", "xl", 1, 3, "xl, 1 worker: shm vs tp MultiProcessRunnerZMQ")
    ratio("fp-shm", "torch", "xl", 1, 4, "xl, 1 worker: shm vs torch DataLoader")
    ratio("fp-shm", "tp-zmq", "large", 2, 4, "large, 2 workers: shm vs tp MultiProcessRunnerZMQ")
    process = [r for r in rows if r["kind"] == "flowplug" and r["counterpart"] != "tp-thread"]
    best = max(
        (r for r in process if (r["payload"], r["workers"], r["touch"]) == ("small", 1, False)),
        key=lambda r: r["items_per_s"],
        default=None,
    )
    if best is None:
        print("  NOT MEASURED  small, 1 worker: no flowplug process transport row")
    else:
        ratio(best["system"], "tp-zmq", "small", 1, 1.5, f"small, 1 worker: best ({best['label']})")

    losses = [r for r in rows if r.get("vs_counterpart") is not None and r["vs_counterpart"] < 1]
    compared = [r for r in rows if r.get("vs_counterpart") is not None]
    verdict = "met" if compared and not losses else "NOT MET" if losses else "NOT MEASURED"
    worst = min(compared, key=lambda r: r["vs_counterpart"], default=None)
    print(
        f"  {verdict:<12}  every transport >= its tensorpack counterpart: {len(compared)} rows"
        + (f", worst {_where(worst)} {worst['vs_counterpart']:.2f}x" if worst else "")
    )
    for r in losses:
        print(f"                  below: {_where(r)} {r['vs_counterpart']:.2f}x")

    bare = [
        (r, index.get(("pyzmq", r["payload"], r["workers"], r["touch"])))
        for r in rows
        if r["system"] == "fp-zmq"
    ]
    pairs = [(r, b, paired_ratio(r, b)) for r, b in bare if b is not None]
    if pairs:
        worst_pair = min(pairs, key=lambda p: p[2])
        verdict = "met" if worst_pair[2] >= 0.9 else "NOT MET"
        r, b, x = worst_pair
        print(
            f"  {verdict:<12}  zmq >= 0.9x bare pyzmq: {len(pairs)} rows, worst "
            f"{_where(r)} {x:.2f}x{per_round(r, b)}"
        )
        for r, b, x in pairs:
            if x < 0.9:
                print(f"                  below: {_where(r)} {x:.2f}x{per_round(r, b)}")
    else:
        print("  NOT MEASURED  zmq >= 0.9x bare pyzmq")

    # Issue 14: shm against the best other process transport and the raw shm ring, and
    # the consumer's CPU per item (views only: touch off), for 1 and 2 workers.
    for w in sorted({r["workers"] for r in rows}):
        others = [
            r
            for r in rows
            if (r["payload"], r["workers"], r["touch"]) == ("small", w, False)
            and r["kind"] == "flowplug"
            and r["system"] != "fp-shm"
            and r["counterpart"] != "tp-thread"
        ]
        best_other = max(others, key=lambda r: r["items_per_s"], default=None)
        if best_other is None:
            print(f"  NOT MEASURED  small w={w}: no other flowplug process transport row")
        else:
            ratio(
                "fp-shm", best_other["system"], "small", w, 0.9, f"small w={w}: shm vs best other"
            )
        for payload, goal in (("medium", 0.5), ("large", 0.8), ("xl", 1.0)):
            ratio("fp-shm", "shm-ring", payload, w, goal, f"{payload} w={w}: shm vs raw shm ring")
        for payload in ("small", "medium"):
            row = index.get(("fp-shm", payload, w, False))
            own = None if row is None else row.get("consumer_cpu_s_per_item")
            if own is None:
                print(f"  NOT MEASURED  {payload} w={w}: shm consumer CPU per item")
                continue
            verdict = "met" if own * 1e6 <= 5 else "NOT MET"
            print(
                f"  {verdict:<12}  {payload} w={w}: shm consumer CPU {own * 1e6:.1f} us/item "
                "(goal <= 5 us)"
            )

    tp_start = [r["startup_s"] for r in rows if r["system"] == "tp-zmq"]
    if tp_start:
        reference = statistics.median(tp_start)
        for system in sorted({r["system"] for r in rows if r["kind"] == "flowplug"}):
            mine = statistics.median(r["startup_s"] for r in rows if r["system"] == system)
            verdict = "met" if mine <= reference else "NOT MET"
            print(
                f"  {verdict:<12}  startup {system}: median {mine * 1000:.0f} ms vs "
                f"tp MultiProcessRunnerZMQ {reference * 1000:.0f} ms"
            )


def _where(row: dict[str, Any]) -> str:
    touch = " touch" if row["touch"] else ""
    return f"{row['label']} {row['payload']} w={row['workers']}{touch}"


if __name__ == "__main__":
    main(sys.argv[1])
