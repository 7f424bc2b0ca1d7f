"""ParallelMap against tensorpack's MultiProcessMapDataZMQ and torch's DataLoader.

The same CPU-bound function (a few ms of numpy on one core) on 1.2 MB float32 arrays,
every input exactly once per epoch: flowplug ``ordered=True`` and torch's map-style
``DataLoader`` deliver in input order; tensorpack's ``strict=True`` delivers the exact set
but not in order (its docstring says so), like flowplug ``ordered=False``, also measured.
Each epoch's results are checked (as a sequence, or as a multiset for the unordered).

Two ways to parallelize a map, both measured:

- the consumer reads the inputs and ships each one to a worker (flowplug ``ParallelMap``,
  tensorpack ``MultiProcessMapDataZMQ``): every input crosses twice, there and back;
- the workers hold the inputs and only the results cross (torch's map-style
  ``DataLoader``, whose workers index a forked copy of the dataset, and flowplug's
  ``Runner(mode="shard", ordered=True)`` over a dataflow that applies the function).

Each contender runs in a fresh process: start, one warm-up epoch, then ``--epochs`` timed
epochs. The contenders take turns, ``--rounds`` times (a shared machine drifts); the table
shows the median items/s over all timed epochs of a contender (and MB/s of results).
Peers that are not installed are skipped. Install them with::

    pip install --no-deps tensorpack==0.11 msgpack msgpack-numpy psutil tabulate \\
        termcolor tqdm six
    pip install torch==2.13.0

Run: ``python benchmarks/parallel_map.py [--items 200] [--workers 2] [--epochs 3]
[--rounds 3] [--light]``; ``--light`` maps ``a * 2`` instead, so that moving the arrays
is most of the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np

SHAPE = (300, 1000)  # float32: 1.2 MB


#: --light: a one-pass function instead, so that moving the arrays is most of the cost.
LIGHT = False


def work(a: np.ndarray) -> np.ndarray:
    """The CPU-bound function every contender applies."""
    if LIGHT:
        return a * 2
    b = np.sin(a) * np.cos(a) + np.sqrt(a)
    return np.sort(b, axis=1)


def make_inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(SHAPE, dtype=np.float32) for _ in range(n)]


def expected_checksums(inputs: list[np.ndarray]) -> list[float]:
    return [float(work(a)[:, -1].sum()) for a in inputs]


# ---------------------------------------------------------------------------- contenders
# Each returns an object to iterate once per epoch, and a function that closes it.


def flowplug_map(transport: str, ordered: bool = True) -> Callable:
    def make(inputs, workers, capacity):
        import flowplug as fp

        m = fp.ParallelMap(
            fp.DataFromList(inputs),
            work,
            num_workers=workers,
            transport=transport,
            capacity=capacity,
            ordered=ordered,
        )
        m.reset_state()
        return m, m.close

    return make


class _Mapped:
    """A dataflow applying ``work`` to a list (for flowplug's shard mode)."""

    def __init__(self, inputs, start=0, step=1):
        self.inputs, self.start, self.step = inputs, start, step

    def __len__(self):
        return len(range(self.start, len(self.inputs), self.step))

    def __iter__(self):
        for a in self.inputs[self.start :: self.step]:
            yield work(a)

    def reset_state(self):
        pass

    def shard(self, index, count):
        return _Mapped(self.inputs, index, count)


def flowplug_shard(transport: str) -> Callable:
    def make(inputs, workers, capacity):
        import flowplug as fp

        r = fp.Runner(
            _Mapped(inputs),
            transport=transport,
            num_workers=workers,
            capacity=capacity,
            mode="shard",
            ordered=True,
        )
        r.reset_state()
        return r, r.close

    return make


def tensorpack_map(inputs, workers, capacity):
    from tensorpack.dataflow import DataFromList, MultiProcessMapDataZMQ

    df = MultiProcessMapDataZMQ(
        DataFromList(inputs, shuffle=False),
        num_proc=workers,
        map_func=work,
        buffer_size=min(capacity, len(inputs)),
        strict=True,
    )
    df.reset_state()
    return df, lambda: df.__del__()


def torch_loader(inputs, workers, capacity):
    import torch.utils.data as tud

    class Dataset(tud.Dataset):
        def __len__(self):
            return len(inputs)

        def __getitem__(self, i):
            return work(inputs[i])

    loader = tud.DataLoader(
        Dataset(),
        batch_size=None,  # one sample at a time, as the others deliver
        num_workers=workers,
        prefetch_factor=max(2, capacity // workers),
        persistent_workers=True,
    )
    return loader, lambda: None


def serial(inputs, workers, capacity):
    class Serial:
        def __iter__(self):
            return map(work, inputs)

    return Serial(), lambda: None


#: name -> (make, delivers in input order)
CONTENDERS: dict[str, tuple[Callable, bool]] = {
    "no parallelism: `work` in the consumer": (serial, True),
    "flowplug ParallelMap zmq": (flowplug_map("zmq"), True),
    "flowplug ParallelMap queue": (flowplug_map("queue"), True),
    "flowplug ParallelMap thread": (flowplug_map("thread"), True),
    "flowplug ParallelMap shm": (flowplug_map("shm"), True),
    "flowplug ParallelMap zmq, ordered=False": (flowplug_map("zmq", ordered=False), False),
    "flowplug ParallelMap shm, ordered=False": (flowplug_map("shm", ordered=False), False),
    "tensorpack MultiProcessMapDataZMQ strict=True (unordered)": (tensorpack_map, False),
    "flowplug Runner shard zmq (inputs in the workers)": (flowplug_shard("zmq"), True),
    "flowplug Runner shard shm (inputs in the workers)": (flowplug_shard("shm"), True),
    "torch DataLoader map-style (inputs in the workers)": (torch_loader, True),
}
#: what a contender needs; missing means skipped.
NEEDS = {"tensorpack": "tensorpack", "torch": "torch"}


def checksum(out) -> float:
    arr = out.numpy() if hasattr(out, "numpy") else out
    return float(arr[:, -1].sum())


def run_one(name: str, items: int, workers: int, capacity: int, epochs: int) -> dict:
    # Workers are forked from here (the default start method): they see LIGHT too.
    inputs = make_inputs(items)
    want = expected_checksums(inputs)
    start = time.perf_counter()
    make, ordered = CONTENDERS[name]
    flow, close = make(inputs, workers, capacity)
    rates = []
    try:
        for epoch in range(epochs + 1):
            t0 = time.perf_counter()
            got = [checksum(out) for out in _iterate(flow)]
            elapsed = time.perf_counter() - t0
            if (got if ordered else sorted(got)) != (want if ordered else sorted(want)):
                raise AssertionError(f"{name}: wrong results or order in epoch {epoch}")
            if epoch == 0:
                startup = time.perf_counter() - start
            else:
                rates.append(items / elapsed)
    finally:
        close()
    return {"name": name, "epochs": [round(r, 1) for r in rates], "first_epoch_s": startup}


def _iterate(flow) -> Iterable:
    return iter(flow)


def available(name: str) -> bool:
    for key, module in NEEDS.items():
        if key in name.lower():
            try:
                __import__(module)
            except Exception:
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="inputs per epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every contender")
    parser.add_argument("--only", action="append", help="substring of contender names")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--light", action="store_true", help="map a * 2 (one pass) instead: transport-bound"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    global LIGHT
    LIGHT = args.light
    if args.one:  # child: run one contender, print its row as JSON
        row = run_one(args.one, args.items, args.workers, args.capacity, args.epochs)
        print(json.dumps(row))
        return 0

    names = [n for n in CONTENDERS if not args.only or any(o in n for o in args.only)]
    print(
        f"map of {'a * 2' if args.light else 'a few-ms numpy function'} over "
        f"{args.items} float32 arrays of 1.2 MB, "
        f"{args.workers} workers, capacity {args.capacity}; "
        f"median of {args.rounds} x {args.epochs} epochs; {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, numpy {np.__version__}"
    )
    for name in [n for n in names if not available(n)]:
        print(f"  skipped (not installed): {name}")
    names = [n for n in names if available(n)]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--one", name]
            cmd += ["--items", str(args.items), "--workers", str(args.workers)]
            cmd += ["--capacity", str(args.capacity), "--epochs", str(args.epochs)]
            cmd += ["--light"] if args.light else []
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(f"  FAILED: {name}\n{proc.stderr[-2000:]}")
                continue
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for name, done in runs.items():
        if not done:
            continue
        rates = [r for run in done for r in run["epochs"]]
        median = statistics.median(rates)
        rows.append(
            {
                "name": name,
                "items_per_s": median,
                "mb_per_s": median * np.prod(SHAPE) * 4 / 1e6,
                "epochs": rates,
                "first_epoch_s": statistics.median(run["first_epoch_s"] for run in done),
            }
        )
    print("\n| contender | items/s (median) | MB/s of results | start + first epoch (s) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['name']} | {row['items_per_s']:.1f} | {row['mb_per_s']:.0f} | "
            f"{row['first_epoch_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
