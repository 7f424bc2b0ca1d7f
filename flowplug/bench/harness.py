"""Plan the rows, measure each in a fresh subprocess (once per round), compute the ratios."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from .child import RESULT_TAG
from .payloads import PAYLOADS
from .systems import MEMCPY, PEERS, counterpart, flowplug_system

#: the peers in table order (the raw shm ring is a baseline: what shared memory does with
#: nothing else, the floor issue 14's shm targets are measured against).
PEER_KEYS = ("tp-queue", "tp-zmq", "tp-thread", "torch", "pyzmq", "shm-ring")


@dataclass
class BenchConfig:
    """What to measure and how long. Every row is measured the same way."""

    #: flowplug transports to measure.
    transports: Sequence[str]
    #: peers to measure (keys of :data:`~flowplug.bench.systems.PEERS`).
    peers: Sequence[str] = PEER_KEYS
    payloads: Sequence[str] = tuple(PAYLOADS)
    workers: Sequence[int] = (1,)
    #: measure without (False) and/or with (True) the consumer reading every byte.
    touch: Sequence[bool] = (False,)
    #: seconds of warm-up before the first repeat.
    warmup: float = 0.3
    #: seconds per repeat; a round's rate is the median of its repeats.
    seconds: float = 0.5
    repeats: int = 3
    #: times the whole plan is measured over, each row in a fresh process each time; a
    #: row's rate is the median of its rounds' rates.
    rounds: int = 1
    #: a row that takes longer than this (plus its own run time) is killed and reported.
    row_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)


def plan(config: BenchConfig) -> list[dict[str, Any]]:
    """The rows to measure, in table order: per payload, memcpy first, then the systems."""
    systems = [(f"fp-{t}", flowplug_system(t)) for t in config.transports]
    systems += [(key, PEERS[key]) for key in config.peers]
    rows = []
    for payload in config.payloads:
        rows.append(_row("memcpy", MEMCPY, payload, 1, False))
        for touch in config.touch:
            for workers in config.workers:
                for key, system in systems:
                    rows.append(_row(key, system, payload, workers, touch))
    return rows


def _row(key: str, system: Any, payload: str, workers: int, touch: bool) -> dict[str, Any]:
    return {
        "system": key,
        "label": system.name,
        "kind": system.kind,
        "payload": payload,
        "workers": workers,
        "touch": touch,
        "counterpart": counterpart(key),
    }


#: ``progress(done, total, row, round, rounds)``: ``done`` of ``total`` rows measured in
#: round ``round`` of ``rounds``; ``row`` is the one measured next ({} once all are done).
ProgressFn = Callable[[int, int, dict[str, Any], int, int], None]


def run(config: BenchConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Measure every planned row ``config.rounds`` times over (round 1 measures each row
    once, then round 2...); return ``{"machine", "config", "rows"}`` with ratios."""
    rows = plan(config)
    todo = _installed(rows, config)
    results: list[list[dict[str, Any]]] = [[] for _ in todo]
    for k in range(1, config.rounds + 1):
        for i, (row, done) in enumerate(zip(todo, results, strict=True)):
            if done and done[-1].get("status") != "ok":
                continue  # failed in an earlier round: the row is failed, not measured again
            if progress is not None:
                progress(i, len(todo), row, k, config.rounds)
            done.append(_measure(row, config))
    if progress is not None:
        progress(len(todo), len(todo), {}, config.rounds, config.rounds)
    for row, done in zip(todo, results, strict=True):
        row.update(combine(done, config.rounds))
    add_ratios(rows)
    return {"machine": machine(), "config": asdict(config), "rows": rows}


def _installed(rows: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
    """The rows to measure; the others (a peer not installed) get that as their status."""
    missing = {key: PEERS[key].missing() for key in config.peers}
    todo = []
    for row in rows:
        why = missing.get(row["system"])
        if why:
            row["status"] = f"not installed: {why}"
        else:
            todo.append(row)
    return todo


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def combine(rounds: list[dict[str, Any]], planned: int) -> dict[str, Any]:
    """One row's result from its rounds' (each the child's result for one round).

    A failure in any round fails the row: its status names the round, and ``round_rates``
    keeps the rates of the rounds before it. Otherwise ``round_rates`` holds each round's
    items/s (the median of its repeats), ``items_per_s`` their median, ``rates`` every
    repeat of every round in order; CPU per item and startup are medians over the rounds,
    peak RSS their maximum, the verdict the last round's."""
    last = rounds[-1]
    ok = [r for r in rounds if r.get("status") == "ok"]
    round_rates = [r["items_per_s"] for r in ok]
    if last.get("status") != "ok":
        status = last.get("status", "failed: no result")
        if planned > 1 and status.startswith("failed:"):
            status = f"failed in round {len(rounds)} of {planned}:{status[len('failed:') :]}"
        return {"status": status, "round_rates": round_rates}
    rate = statistics.median(round_rates)
    out = dict(last)
    out.update(
        rates=[x for r in ok for x in r["rates"]],
        round_rates=round_rates,
        items_per_s=rate,
        gb_per_s=rate * last["nbytes"] / 1e9,
        startup_s=_median(r.get("startup_s") for r in ok),
        cpu_s_per_item=_median(r.get("cpu_s_per_item") for r in ok),
        consumer_cpu_s_per_item=_median(r.get("consumer_cpu_s_per_item") for r in ok),
        peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
    )
    return out


def _measure(row: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    spec = {key: row[key] for key in ("system", "payload", "workers", "touch")} | {
        "warmup": config.warmup,
        "seconds": config.seconds,
        "repeats": config.repeats,
    }
    budget = config.row_timeout + config.warmup + config.seconds * config.repeats
    # A new session per row: its workers share its process group, so none can outlive it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowplug.bench.child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=budget)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if timed_out:
        proc.communicate()
        return {"status": f"failed: no result after {budget:.0f} s"}
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"status": f"failed: {last}"}


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float] | None:
    """Row ``a``'s items/s over row ``b``'s, round by round (the two were measured seconds
    apart in each round); None unless both have the same number (> 1) of rounds."""
    ra, rb = a.get("round_rates") or [], b.get("round_rates") or []
    if len(ra) < 2 or len(ra) != len(rb):
        return None
    return [x / y for x, y in zip(ra, rb, strict=True)]


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Row ``a``'s items/s over row ``b``'s: the median of the per-round ratios when both
    were measured in several rounds (a slow minute then hits both sides of a ratio alike),
    else the ratio of their items/s."""
    per_round = round_ratios(a, b)
    if per_round is not None:
        return statistics.median(per_round)
    return float(a["items_per_s"] / b["items_per_s"])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``vs_counterpart`` (items/s over the tensorpack counterpart's, same payload,
    workers and touch) and ``vs_memcpy`` (GB/s over memcpy's on the same payload), both
    by :func:`paired_ratio`."""
    ok = {
        (r["system"], r["payload"], r["workers"], r["touch"]): r
        for r in rows
        if r.get("status") == "ok"
    }
    memcpy = {r["payload"]: r for r in rows if r["system"] == "memcpy" and r.get("status") == "ok"}
    for r in rows:
        r["vs_counterpart"] = r["vs_memcpy"] = None
        if r.get("status") != "ok" or r["system"] == "memcpy":
            continue
        peer = ok.get((r["counterpart"], r["payload"], r["workers"], r["touch"]))
        if peer is not None:
            r["vs_counterpart"] = paired_ratio(r, peer)
        limit = memcpy.get(r["payload"])
        if limit is not None:
            r["vs_memcpy"] = paired_ratio(r, limit) * r["nbytes"] / limit["nbytes"]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import zmq

    import flowplug

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    versions: dict[str, str | None] = {}
    for dist in ("torch", "tensorpack"):  # the peers' versions, without importing them
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "flowplug": flowplug.__version__,
        "numpy": numpy.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        **versions,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
