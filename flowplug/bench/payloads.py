"""The benchmark payloads, the consumer's ``touch`` and the dataflow that yields them.

Every system under test gets the same dataflow: it builds its payload once per worker in
``reset_state()`` and yields that object forever, so what is measured is the transport, not
the producer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def _small() -> dict[str, Any]:
    return {"index": 12345, "label": 7, "path": "images/train/" + "x" * 87}


def _medium() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(16 * 1024, dtype=np.float32)


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _dict() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "image": rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8),
        "depth": rng.standard_normal((8, 224, 224), dtype=np.float32),
        "boxes": rng.standard_normal((8, 16, 4), dtype=np.float32),
        "label": np.arange(8, dtype=np.int64),
    }


#: name -> (factory, one-line description)
PAYLOADS: dict[str, tuple[Callable[[], Any], str]] = {
    "small": (_small, "dict: two ints and a 100-char str"),
    "medium": (_medium, "64 KiB float32 array"),
    "large": (lambda: _batch(8), "uint8 batch 8x224x224x3, 1.2 MB"),
    "xl": (lambda: _batch(32), "uint8 batch 32x224x224x3, 4.8 MB"),
    "dict": (_dict, "dict of 4 arrays (uint8 images, float32 depth, boxes, labels), 2.8 MB"),
}


def make(name: str) -> Any:
    """Build the payload ``name`` (one of :data:`PAYLOADS`)."""
    return PAYLOADS[name][0]()


def nbytes(obj: Any) -> int:
    """The payload's size in bytes: array data, string and int contents."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, str):
        return len(obj.encode())
    if hasattr(obj, "numpy"):  # a torch tensor
        return obj.numpy().nbytes
    return 8


def touch(obj: Any) -> int:
    """Read every byte of ``obj`` (what a real consumer does); return a checksum."""
    if isinstance(obj, np.ndarray):
        flat = obj.reshape(-1).view(np.uint8)
        if flat.nbytes % 8 == 0:
            return int(np.bitwise_xor.reduce(flat.view(np.uint64)))
        return int(flat.sum())
    if isinstance(obj, dict):
        return sum(touch(v) for v in obj.values()) & 0xFFFFFFFF
    if isinstance(obj, (list, tuple)):
        return sum(touch(v) for v in obj) & 0xFFFFFFFF
    if isinstance(obj, str):
        return hash(obj) & 0xFFFFFFFF
    if hasattr(obj, "numpy"):  # torch's DataLoader hands out tensors
        return touch(obj.numpy())
    return int(obj) & 0xFFFFFFFF


class Repeat:
    """A dataflow yielding one payload forever (built in ``reset_state``, in the worker).

    It needs no base class: flowplug takes any iterable with ``reset_state()``; the peers'
    adapters wrap it in their own base classes.
    """

    def __init__(self, payload: str):
        self.payload = payload
        self._obj: Any = None

    def reset_state(self) -> None:
        self._obj = make(self.payload)

    def __iter__(self) -> Iterator[Any]:
        if self._obj is None:
            self.reset_state()
        obj = self._obj
        while True:
            yield obj
