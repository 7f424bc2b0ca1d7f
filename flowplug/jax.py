"""JAX helper: keep the next batches on their way to the device while the step runs.

This module imports jax; ``import flowplug`` never does.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax

__all__ = ["prefetch_to_device"]


def prefetch_to_device(iterable: Iterable[Any], size: int = 2, device: Any = None) -> Iterator[Any]:
    """Yield the items of ``iterable`` as device arrays, ``size`` items ahead.

    Like flax's ``jax_utils.prefetch_to_device``, for one device (or a sharding): every
    array leaf of an item (a batch from a :class:`flowplug.Runner` or a DataLoader:
    numpy arrays, torch CPU tensors through ``numpy()``, nested in dicts, lists, tuples)
    is sent with ``jax.device_put``, which returns at once; the transfer of the next
    ``size`` items overlaps with the work on the current one.

    :param iterable: the batches.
    :param size: how many items to keep in flight ahead of the one yielded (>= 1).
    :param device: a ``jax.Device`` or a ``jax.sharding.Sharding``; default: the first
        device of the default backend.
    :raises ValueError: ``size`` is smaller than 1.

    Example::

        for batch in prefetch_to_device(loader, size=2):
            state = train_step(state, batch)
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"prefetch_to_device needs size >= 1, got {size!r}")
    target = device if device is not None else jax.devices()[0]
    items = iter(iterable)
    ahead: collections.deque[Any] = collections.deque()

    def put(item: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.device_put(_as_array(x), target), item)

    def fill(n: int) -> None:
        for item in itertools.islice(items, n):
            ahead.append(put(item))

    fill(size)
    while ahead:
        item = ahead.popleft()
        fill(1)
        yield item


def _as_array(x: Any) -> Any:
    numpy = getattr(x, "numpy", None)  # a torch tensor: its memory, as a numpy view
    if callable(numpy) and type(x).__module__.startswith("torch"):
        return numpy()
    return x
