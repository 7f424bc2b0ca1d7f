"""flowplug's ray transport against Ray Data and against hand-written Ray actors, side by side
in one process and one local Ray instance.

Usage::

    python3 benchmarks/ray_bench.py [--seconds 3] [--repeats 3] [--workers 1,2]
                                    [--payloads arrays,dicts] [--variants ...] [--json FILE]

Every variant delivers datapoints to one consumer loop that reads every item, and has
``W`` producers of 1 CPU each:

- ``flowplug``: ``fp.Runner(df, transport="ray", num_workers=W)``;
- ``data-tasks``: Ray Data ``range().map_batches(..., compute=TaskPoolStrategy(size=W))``
  consumed with ``iter_batches``;
- ``data-actors``: the same with ``ActorPoolStrategy(size=W)`` (a callable class);
- ``data-rows``: the ``data-tasks`` pipeline consumed with ``iter_rows``;
- ``actors``: hand-written Ray: ``W`` actors, each reply one buffer holding 8 arrays (or a
  list of 256 small dicts), 2 calls in flight per actor, resubmitted when a reply arrives.

Payloads: ``arrays`` (one 1.2 MB float32 array per item; producers pack a copy of a ready
array, as a real producer writes what it made somewhere) and ``dicts`` (a new 4-key dict
per item). Repeats are interleaved (repeat r of every row before repeat r+1), so a change
in the machine's load hits every row alike. The median items/s and the median start-up
(from making the pipeline to the first item in hand, Ray already initialized) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import flowplug as fp

N = 300_000  # float32: 1.2 MB
ARRAYS_PER_REPLY = 8
DICTS_PER_REPLY = 256


def small(i: int) -> dict[str, Any]:
    return {"idx": i, "label": i % 10, "weight": 0.5, "name": "item"}


# ---------------------------------------------------------------------------- flowplug


class Arrays(fp.DataFlow):
    def reset_state(self) -> None:
        info = fp.worker_info()
        rng = np.random.default_rng(info.seed if info is not None else 0)
        self.arr = rng.standard_normal(N).astype(np.float32)

    def __iter__(self):
        while True:
            yield self.arr


class Dicts(fp.DataFlow):
    def __iter__(self):
        i = 0
        while True:
            yield small(i)
            i += 1


def run_flowplug(payload: str, workers: int) -> Iterator[Any]:
    df = Arrays() if payload == "arrays" else Dicts()
    with fp.Runner(df, transport="ray", num_workers=workers) as runner:
        yield from runner


# ---------------------------------------------------------------------------- Ray Data


def _make_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = np.empty((len(batch["id"]), N), np.float32)
    out[:] = _arr()
    return {"x": out}


def _make_dicts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = batch["id"]
    return {
        "idx": ids,
        "label": ids % 10,
        "weight": np.full(len(ids), 0.5),
        "name": np.full(len(ids), "item"),
    }


#: the source array, made on first use, not on import: every actor of every variant
#: imports this module (to unpickle its class or dataflow), and start-up is measured. A
#: plain dict, not functools.cache: run as a script, Ray Data pickles ``_make_arrays`` by
#: value with the globals it names, and a cache wrapper of ``__main__`` would not unpickle.
_ARRAYS: dict[int, np.ndarray] = {}


def _arr() -> np.ndarray:
    arr = _ARRAYS.get(N)
    if arr is None:
        arr = _ARRAYS[N] = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    return arr


class MakeBatches:
    """The callable class ActorPoolStrategy needs."""

    def __init__(self, payload: str):
        self.fn = _make_arrays if payload == "arrays" else _make_dicts

    def __call__(self, batch):
        return self.fn(batch)


def _dataset(payload: str, workers: int, actors: bool) -> Any:
    import ray.data

    batch = ARRAYS_PER_REPLY if payload == "arrays" else DICTS_PER_REPLY
    ds = ray.data.range(10**8)  # more than any run reads; Ray Data picks the blocks
    if actors:
        return ds.map_batches(
            MakeBatches,
            fn_constructor_args=(payload,),
            batch_size=batch,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
    fn = _make_arrays if payload == "arrays" else _make_dicts
    return ds.map_batches(
        fn, batch_size=batch, compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1
    )


def _iter_batches(ds: Any, payload: str) -> Iterator[Any]:
    key = "x" if payload == "arrays" else "idx"
    size = ARRAYS_PER_REPLY if payload == "arrays" else DICTS_PER_REPLY
    for batch in ds.iter_batches(batch_size=size, batch_format="numpy"):
        yield from batch[key]


def run_data_tasks(payload: str, workers: int) -> Iterator[Any]:
    return _iter_batches(_dataset(payload, workers, actors=False), payload)


def run_data_actors(payload: str, workers: int) -> Iterator[Any]:
    return _iter_batches(_dataset(payload, workers, actors=True), payload)


def run_data_rows(payload: str, workers: int) -> Iterator[Any]:
    key = "x" if payload == "arrays" else "idx"
    for row in _dataset(payload, workers, actors=False).iter_rows():
        yield row[key]


# ---------------------------------------------------------------------------- hand-written


class Producer:
    """One hand-written actor: each call returns one reply of several items."""

    def __init__(self, payload: str):
        self.payload = payload
        self.arr = np.random.default_rng(1).standard_normal(N).astype(np.float32)
        self.i = 0

    def next(self) -> Any:
        if self.payload == "arrays":
            out = np.empty((ARRAYS_PER_REPLY, N), np.float32)
            out[:] = self.arr  # the producer packs what it made into one buffer
            return out
        i = self.i
        self.i += DICTS_PER_REPLY
        return [small(j) for j in range(i, i + DICTS_PER_REPLY)]


def run_actors(payload: str, workers: int) -> Iterator[Any]:
    import ray

    cls = ray.remote(num_cpus=1)(Producer)
    actors = [cls.remote(payload) for _ in range(workers)]
    owner = {}
    try:
        for a in actors:
            for _ in range(2):
                owner[a.next.remote()] = a
        while True:
            ready, _ = ray.wait(list(owner), num_returns=1)
            for ref in ready:
                a = owner.pop(ref)
                owner[a.next.remote()] = a  # resubmit first, then read
                yield from ray.get(ref)
    finally:
        for a in actors:
            ray.kill(a)
        if owner:
            ray.wait(list(owner), num_returns=len(owner), timeout=5)


VARIANTS: dict[str, Callable[[str, int], Iterator[Any]]] = {
    "flowplug": run_flowplug,
    "data-tasks": run_data_tasks,
    "data-actors": run_data_actors,
    "data-rows": run_data_rows,
    "actors": run_actors,
}


def measure(variant: str, payload: str, workers: int, seconds: float) -> dict[str, float]:
    started = time.perf_counter()
    it = VARIANTS[variant](payload, workers)
    try:
        next(it)
        startup = time.perf_counter() - started
        warm = time.perf_counter() + min(1.0, seconds / 3)
        while time.perf_counter() < warm:
            next(it)
        count, t0 = 0, time.perf_counter()
        if payload == "arrays":
            while True:
                for _ in range(64):
                    assert next(it).shape == (N,)
                count += 64
                if time.perf_counter() - t0 >= seconds:
                    break
        else:
            while True:
                for _ in range(4096):
                    next(it)["idx"] if variant in ("flowplug", "actors") else int(next(it))
                count += 4096
                if time.perf_counter() - t0 >= seconds:
                    break
        elapsed = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {"items_per_s": count / elapsed, "startup_s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--payloads", default="arrays,dicts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of ray.init")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    import ray

    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=1024**3,
    )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    variants = args.variants.split(",")
    payloads = args.payloads.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    cases = [(p, w, v) for p in payloads for w in workers for v in variants]
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {c: [] for c in cases}
    load = [os.getloadavg()[0]]
    try:
        for _ in range(args.repeats):
            for case in cases:
                runs[case].append(measure(case[2], case[0], case[1], args.seconds))
                print(".", end="", file=sys.stderr, flush=True)
            load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
    print(file=sys.stderr)
    print(
        f"ray {ray.__version__}, {os.cpu_count()} cores, median of {args.repeats} x "
        f"{args.seconds:g} s; load average {min(load):.2f}-{max(load):.2f}"
    )
    rows = []
    print(
        f"{'payload':<7} {'W':>2} {'variant':<12} {'items/s':>10} "
        f"{'start-up s':>10} {'vs actors':>9}"
    )
    for p in payloads:
        for w in workers:
            base = (
                statistics.median(r["items_per_s"] for r in runs[(p, w, "actors")])
                if (p, w, "actors") in runs
                else None
            )
            for v in variants:
                rate = statistics.median(r["items_per_s"] for r in runs[(p, w, v)])
                startup = statistics.median(r["startup_s"] for r in runs[(p, w, v)])
                ratio = f"{rate / base:9.2f}" if base else ""
                print(f"{p:<7} {w:>2} {v:<12} {rate:10.0f} {startup:10.2f} {ratio}")
                rows.append(
                    {
                        "payload": p,
                        "workers": w,
                        "variant": v,
                        "items_per_s": rate,
                        "startup_s": startup,
                        "runs": runs[(p, w, v)],
                    }
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ray": ray.__version__, "load": load, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
