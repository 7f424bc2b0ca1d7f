"""Plan the rows, measure each in a fresh subprocess, and compute the ratios."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
    #: seconds per repeat; a row's rate is the median of its repeats.
    seconds: float = 0.5
    repeats: int = 3
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


def run(
    config: BenchConfig, progress: Callable[[int, int, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Measure every planned row; return ``{"machine", "config", "rows"}`` with ratios."""
    rows = plan(config)
    missing = {key: PEERS[key].missing() for key in config.peers}
    todo = []
    for row in rows:
        why = missing.get(row["system"])
        if why:
            row["status"] = f"not installed: {why}"
        else:
            todo.append(row)
    for i, row in enumerate(todo):
        if progress is not None:
            progress(i, len(todo), row)
        row.update(_measure(row, config))
    if progress is not None:
        progress(len(todo), len(todo), {})
    add_ratios(rows)
    return {"machine": machine(), "config": asdict(config), "rows": rows}


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


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``vs_counterpart`` (items/s over the tensorpack counterpart's, same payload,
    workers and touch) and ``vs_memcpy`` (GB/s over memcpy's on the same payload)."""
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
            r["vs_counterpart"] = r["items_per_s"] / peer["items_per_s"]
        limit = memcpy.get(r["payload"])
        if limit is not None:
            r["vs_memcpy"] = r["gb_per_s"] / limit["gb_per_s"]


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
