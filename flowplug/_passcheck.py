"""Shard mode without ``shard()``: make every worker's pass the same, and check that it is.

Such a worker reads the whole pass of the dataflow and keeps every ``n``-th item, which is
exactly once only if every worker's pass yields the same items in the same order. So:

- before each pass, :func:`seed_pass` seeds, identically in every worker, the random
  generators flowplug can reach: Python's and numpy's global ones, and the ``rng`` /
  ``_rng`` attributes of the dataflow and of what it holds (tensorpack's
  ``RNGDataFlow.rng`` and its augmentors' ``rng`` are found this way);
- during the pass, each worker keeps a running digest of the items' fingerprints
  (:func:`fingerprint`, a few microseconds per item: it samples arrays, never hashes them
  whole) and sends, with each item it keeps, the digest before and after that item. The
  consumer checks that item ``i``'s "before" equals item ``i - 1``'s "after", which its
  other owner computed: equal digests mean equal passes up to there. Each worker also
  reports its pass's length and final digest with its end-of-epoch marker.

A fingerprint looks at content: two passes with the same items in the same order but
different random augmentation differ too. That is why the generators are seeded first.
"""

from __future__ import annotations

import functools
import random
import sys
import zlib
from collections.abc import Iterator
from typing import Any

_MASK = (1 << 64) - 1
#: a digest before any item.
START = 0x2545F4914F6CDD1D
#: how many elements of an array, or items of a container, a fingerprint looks at.
_SAMPLES = 64
_ITEMS = 16
_DEPTH = 4
#: bounds of the walk that looks for random generators: containers larger than this are
#: data (a dataset's list of files), not parts of a pipeline.
_WALK_WIDTH = 64
_WALK_OBJECTS = 2000


def mix(a: int, b: int) -> int:
    """Combine two 64-bit values; order matters."""
    return (((a ^ (b & _MASK)) * 0x9E3779B97F4A7C15) + 0x632BE59BD9B4E019) & _MASK


def fingerprint(obj: Any, depth: int = 0) -> int:
    """A cheap value that differs between different datapoints, with high probability.

    Equal in every process for equal datapoints (no ``hash()`` of str, bytes, or of
    objects whose hash is their address): ints, floats, str, bytes, lists, tuples,
    dicts and numpy arrays and scalars are looked at; other objects only by type.
    """
    t = type(obj)
    if t is int or t is bool:
        return hash(obj) & _MASK
    if t is float:
        return hash(obj) & _MASK if obj == obj else 0x7FF8  # hash(nan) is its address
    if t is str:
        return zlib.crc32(obj.encode("utf-8", "surrogatepass"))
    if t is bytes or t is bytearray:
        n = len(obj)
        if n <= 4096:
            return mix(n, zlib.crc32(obj))
        return mix(n, zlib.crc32(obj[:1024] + obj[n // 2 : n // 2 + 1024] + obj[-1024:]))
    if obj is None:
        return 0x4E4F4E45
    if depth < _DEPTH:
        if t is list or t is tuple:
            h = mix(len(obj), 0x4C495354)
            for x in obj[:_ITEMS]:
                h = mix(h, fingerprint(x, depth + 1))
            return h
        if t is dict:
            h = mix(len(obj), 0x44494354)
            for i, (k, v) in enumerate(obj.items()):
                if i == _ITEMS:
                    break
                h = mix(mix(h, fingerprint(k, depth + 1)), fingerprint(v, depth + 1))
            return h
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(obj, numpy.ndarray):
            h = mix(hash(obj.shape), obj.dtype.num)  # a tuple of ints: the same everywhere
            if obj.size and not obj.dtype.hasobject:
                step = max(1, obj.size // _SAMPLES)
                # a strided view (or the flat iterator): never a copy of the whole array
                flat = obj.reshape(-1) if obj.flags.c_contiguous else obj.flat
                h = mix(h, zlib.crc32(flat[step // 2 :: step][:_SAMPLES].tobytes()))
            return h
        if isinstance(obj, numpy.generic) and not isinstance(obj, numpy.object_):
            return zlib.crc32(obj.tobytes())
    return zlib.crc32(t.__qualname__.encode())


def seed_pass(df: Any, seed: int) -> int:
    """Seed the generators a pass of ``df`` may draw from, the same in every worker.

    :returns: how many generators held by ``df`` (not counting the global ones) were seeded.
    """
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed & 0xFFFFFFFF)
    k = 0
    for obj in _walk(df):
        for name in ("rng", "_rng"):
            rng = obj.__dict__.get(name)
            if rng is None:
                continue
            own = mix(seed, k)
            if isinstance(rng, random.Random):
                rng.seed(own)
            elif numpy is not None and isinstance(rng, numpy.random.RandomState):
                rng.seed(own & 0xFFFFFFFF)
            elif numpy is not None and isinstance(rng, numpy.random.Generator):
                setattr(obj, name, numpy.random.default_rng(own))
            else:
                continue
            k += 1
    return k


def _walk(root: Any) -> Iterator[Any]:
    """The objects with a ``__dict__`` reachable from ``root``, in a fixed order.

    Through attributes, small lists, tuples and dicts, bound methods' ``__self__``,
    closures and ``functools.partial``; never into modules, classes or large containers.
    """
    seen: set[int] = set()
    stack = [root]
    count = 0
    while stack and count < _WALK_OBJECTS:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        count += 1
        children: list[Any] = []
        t = type(obj)
        if t is list or t is tuple:
            if len(obj) <= _WALK_WIDTH:
                children = list(obj)
        elif t is dict:
            if len(obj) <= _WALK_WIDTH:
                children = list(obj.values())
        elif isinstance(obj, type) or t.__name__ == "module":
            continue
        else:
            self_ = getattr(obj, "__self__", None)
            if self_ is not None and not isinstance(self_, type) and callable(obj):
                children.append(self_)  # a bound method: the object it is bound to
            closure = getattr(obj, "__closure__", None)
            if isinstance(closure, tuple):
                for cell in closure:
                    try:
                        children.append(cell.cell_contents)
                    except ValueError:
                        pass  # an empty cell
            if isinstance(obj, functools.partial):
                children.extend((obj.func, obj.args, obj.keywords))
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                yield obj
                children.extend(d.values())
        stack.extend(reversed(children))
