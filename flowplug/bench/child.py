"""Measure one row in this (fresh) process: ``python -m flowplug.bench.child SPEC_JSON``.

Prints one line ``RESULT_TAG {json}`` on stdout. Running every row in its own process
keeps fork state, imports (torch) and peak memory from leaking from one row into the next.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import numpy as np

from .payloads import make, nbytes, touch

RESULT_TAG = "FLOWPLUG-BENCH-RESULT"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and all its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    todo = [os.getpid()]
    try:
        while todo:
            pid = todo.pop()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except FileNotFoundError:
                    pass  # a thread that just ended
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None  # not Linux, or a process ended while we looked
    return total / tick


def _own_cpu_seconds() -> float:
    """CPU time (user + system) of this process alone: the consumer and its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_runs(
    step: Any, warmup: float, seconds: float, repeats: int
) -> tuple[list[float], float | None, float]:
    """Call ``step()`` for ``warmup`` seconds, then ``repeats`` times for ``seconds``; return
    the rates (calls per second) of the repeats, the CPU seconds per call they used (all
    processes of the row), and those of the consumer process alone (its threads included).
    The clock is read once per chunk of about 10 ms worth of calls, so reading it costs
    nothing next to a fast transport."""
    clock = time.perf_counter
    start = clock()
    done = 0
    while clock() - start < warmup or done == 0:
        step()
        done += 1
    chunk = max(1, int(done / max(clock() - start, 1e-9) * 0.01))
    rates = []
    calls = 0
    cpu_start = _cpu_seconds()
    own_start = _own_cpu_seconds()
    for _ in range(repeats):
        n = 0
        start = clock()
        while True:
            for _ in range(chunk):
                step()
            n += chunk
            elapsed = clock() - start
            if elapsed >= seconds:
                break
        rates.append(n / elapsed)
        calls += n
    cpu_end = _cpu_seconds()
    own = (_own_cpu_seconds() - own_start) / calls
    per_call = None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) / calls
    return rates, per_call, own


def _measure_memcpy(spec: dict[str, Any]) -> dict[str, Any]:
    size = max(1, nbytes(make(spec["payload"])))
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(src)
    rates, cpu, own = _timed_runs(
        lambda: np.copyto(dst, src), spec["warmup"], spec["seconds"], spec["repeats"]
    )
    return {
        "rates": rates,
        "cpu_s_per_item": cpu,
        "consumer_cpu_s_per_item": own,
        "startup_s": None,
        "nbytes": size,
    }


def _measure_stream(spec: dict[str, Any]) -> dict[str, Any]:
    from .systems import VERDICTS, open_stream, preload

    expected = nbytes(make(spec["payload"]))
    check = touch if spec["touch"] else None
    preload(spec["system"])  # imports are not startup
    gc.collect()
    start = time.perf_counter()
    with open_stream(spec["system"], spec["payload"], spec["workers"]) as items:
        first = next(items)
        if check is not None:
            check(first)
        startup = time.perf_counter() - start
        got = nbytes(first)
        if got != expected:
            raise AssertionError(f"first item has {got} bytes, the payload {expected}")
        del first
        if check is None:
            step = items.__next__
        else:

            def step() -> None:
                check(next(items))

        rates, cpu, own = _timed_runs(step, spec["warmup"], spec["seconds"], spec["repeats"])
    out: dict[str, Any] = {
        "rates": rates,
        "cpu_s_per_item": cpu,
        "consumer_cpu_s_per_item": own,
        "startup_s": startup,
        "nbytes": expected,
    }
    verdict = VERDICTS.get(spec["system"])
    if verdict is not None:
        out["verdict"] = verdict
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the row ``spec`` (system, payload, workers, touch, warmup, seconds, repeats)."""
    try:
        if spec["system"] == "memcpy":
            out = _measure_memcpy(spec)
        else:
            out = _measure_stream(spec)
    except ImportError as exc:
        return {"status": f"not installed: {exc}"}
    except Exception as exc:
        traceback.print_exc()
        return {"status": f"failed: {type(exc).__name__}: {exc}"}
    rate = statistics.median(out["rates"])
    out.update(
        status="ok",
        items_per_s=rate,
        gb_per_s=rate * out["nbytes"] / 1e9,
        peak_rss_mb=_peak_rss_mb(),
    )
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = measure(spec)
    sys.stdout.flush()
    print(RESULT_TAG, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
