"""flowplug.torch.DataLoader vs torch.utils.data.DataLoader on the same map-style datasets.

    python benchmarks/torch_loader.py [--rounds 3] [--json out.json]

Cases (issue 15): 1.2 MB uint8 images and 4.8 MB float32 arrays read from memory, the images
again as a fresh copy per item, and a CPU-bound dataset (about 2 ms of decode-like work per
item: zlib), each with batch_size 8 and 32; num_workers=2 and the default collate everywhere.
Both loaders use persistent workers; one warm-up epoch, then
each round times one epoch of each contender in turn (the order alternates), so both see
the same machine load. Reported: median items/s, the ratio flowplug / torch per round
(median), and the consumer process's CPU time per batch (all its threads: torch's
result-queue thread, flowplug's sockets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

import flowplug.torch as ft


class Arrays(Dataset):
    """``n`` items, each one of a few precomputed arrays: as read from memory (a memmap,
    a cache), or with ``fresh`` a new copy per item (as decoded from a file)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: str, fresh: bool = False):
        rng = np.random.default_rng(0)
        self.n = n
        self.fresh = fresh
        if np.dtype(dtype).kind == "u":
            self.pool = [rng.integers(0, 255, shape, dtype=dtype) for _ in range(4)]
        else:
            self.pool = [rng.random(shape, dtype=dtype) for _ in range(4)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        item = self.pool[i % 4]
        return (item.copy() if self.fresh else item), i


class Decode(Dataset):
    """CPU-bound: each item decompresses a zlib blob (about 2 ms) into a 224x224x3 image."""

    def __init__(self, n: int, level_ms: float = 2.0):
        rng = np.random.default_rng(0)
        image = rng.integers(0, 16, (224, 224, 3), dtype=np.uint8)  # compressible
        raw = image.tobytes()
        self.n = n
        self.shape = image.shape
        # repeat the decompression until one item costs about level_ms
        self.blob = zlib.compress(raw, 6)
        started = time.perf_counter()
        for _ in range(20):
            zlib.decompress(self.blob)
        one = (time.perf_counter() - started) / 20
        self.repeat = max(1, round(level_ms / 1000 / one))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        for _ in range(self.repeat):
            raw = zlib.decompress(self.blob)
        return np.frombuffer(bytearray(raw), np.uint8).reshape(self.shape), i


def epoch(loader) -> tuple[float, float, int]:
    """(seconds, consumer CPU seconds, batches) of one epoch."""
    cpu = time.process_time()
    started = time.perf_counter()
    batches = 0
    for x, _ in loader:
        assert x.shape[0] > 0
        batches += 1
    return time.perf_counter() - started, time.process_time() - cpu, batches


def run_case(name: str, dataset: Dataset, batch_size: int, rounds: int) -> dict:
    loaders = {
        "torch": torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=2, persistent_workers=True
        ),
        "flowplug shm": ft.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=2,
            persistent_workers=True,
            transport="shm",
        ),
    }
    for loader in loaders.values():
        epoch(loader)  # warm-up: workers started, memory touched
    rate: dict[str, list[float]] = {k: [] for k in loaders}
    cpu: dict[str, list[float]] = {k: [] for k in loaders}
    ratios = []
    for r in range(rounds):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
        this = {}
        for key in order:
            seconds, used, batches = epoch(loaders[key])
            this[key] = len(dataset) / seconds
            rate[key].append(this[key])
            cpu[key].append(used / batches * 1000)
        ratios.append(this["flowplug shm"] / this["torch"])
    loaders.clear()  # both loaders stop their persistent workers when collected
    out = {
        "case": name,
        "batch_size": batch_size,
        "items/s": {k: statistics.median(v) for k, v in rate.items()},
        "consumer ms CPU/batch": {k: statistics.median(v) for k, v in cpu.items()},
        "ratio flowplug/torch": statistics.median(ratios),
    }
    print(
        f"{name:28} bs={batch_size:<3} torch {out['items/s']['torch']:8.0f} items/s "
        f"({out['consumer ms CPU/batch']['torch']:6.2f} ms CPU/batch)  flowplug shm "
        f"{out['items/s']['flowplug shm']:8.0f} items/s "
        f"({out['consumer ms CPU/batch']['flowplug shm']:6.2f} ms CPU/batch)  "
        f"ratio {out['ratio flowplug/torch']:5.2f}x",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=256, help="items per epoch (1.2 MB case)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, load average {os.getloadavg()}", flush=True)
    results = []
    for batch_size in (8, 32):
        # At least 8 batches per epoch, so that a round measures the steady state and not
        # the start of an epoch (4.8 MB x 32 would otherwise be 2 batches).
        items = max(args.items, 8 * batch_size)
        images = Arrays(items, (640, 640, 3), "uint8")  # 1.2 MB
        results.append(run_case("uint8 images 1.2 MB", images, batch_size, args.rounds))
        arrays = Arrays(max(items // 4, 8 * batch_size), (1200, 1000), "float32")  # 4.8 MB
        results.append(run_case("float32 arrays 4.8 MB", arrays, batch_size, args.rounds))
        fresh = Arrays(items, (640, 640, 3), "uint8", fresh=True)
        results.append(run_case("uint8 1.2 MB, fresh copies", fresh, batch_size, args.rounds))
        decode = Decode(max(items // 2, 8 * batch_size))
        results.append(run_case("CPU-bound, ~2 ms/item", decode, batch_size, args.rounds))
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
