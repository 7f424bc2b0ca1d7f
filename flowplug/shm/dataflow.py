"""The store in dataflows: :func:`empty` (in the current store), :class:`PutData`,
:class:`GetData`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np

from ..dataflow import DataFlow
from ..errors import StateError, StoreFull
from .store import ObjectID, ObjectStore

# -------------------------------------------------------------------- the current store

_current = threading.local()


def current_store() -> ObjectStore | None:
    """The store :func:`empty` allocates in, in this thread; None outside :func:`use_store`."""
    return getattr(_current, "store", None)


@contextmanager
def use_store(store: ObjectStore | None) -> Iterator[ObjectStore | None]:
    """Make ``store`` the current store of this thread within the ``with`` block.

    The ``shm`` transport does it in each worker, so :func:`empty` there allocates in the
    transport's store.
    """
    previous = current_store()
    _current.store = store
    try:
        yield store
    finally:
        _current.store = previous


def empty(shape: int | tuple[int, ...], dtype: Any = float, order: Literal["C", "F"] = "C") -> Any:
    """A new numpy array in the current store's shared memory, or in ordinary memory.

    In a worker of the ``shm`` transport, the array lives in the transport's store: fill
    it and yield it, and it reaches the consumer without a single copy. Anywhere else
    (another transport, no store) it is ``np.empty``, so the same dataflow runs everywhere;
    so it is too when the store is full while the consumer waits (which would otherwise
    wait for this very worker: see :meth:`ObjectStore.waiting`).
    """
    store = current_store()
    if store is None or store.closed:
        return np.empty(shape, dtype, order=order)
    try:
        return store.empty(shape, dtype, order, give_way=True)
    except StoreFull:
        return np.empty(shape, dtype, order=order)


# -------------------------------------------------------------------- dataflow wrappers


class _WithStore(DataFlow):
    """Wraps ``df`` and uses a store, given as one or by name (attached in ``reset_state()``)."""

    def __init__(self, df: Any, store: ObjectStore | str):
        self.df = df
        self.store = store

    def __len__(self) -> int:
        return len(self.df)

    def reset_state(self) -> None:
        self.df.reset_state()
        self._attached()

    def _attached(self) -> ObjectStore:
        if isinstance(self.store, str):
            self.store = ObjectStore.attach(self.store)
        return self.store


class PutData(_WithStore):
    """Put each datapoint of ``df`` in a store and yield its :class:`ObjectID`.

    Tensorpack's ``PlasmaPutData``: put early (in a worker), send only the small ids
    through any runner, and :class:`GetData` the objects back late, as zero-copy views.

    :param df: the dataflow whose datapoints to store.
    :param store: the store, or its :attr:`~ObjectStore.name`; attached in ``reset_state()``.
    :param timeout: seconds a put may wait for room (None: as long as it takes).
    """

    def __init__(self, df: Any, store: ObjectStore | str, timeout: float | None = None):
        super().__init__(df, store)
        self.timeout = timeout

    def __iter__(self) -> Iterator[ObjectID]:
        store = self.store
        if isinstance(store, str):
            raise StateError("PutData: call reset_state() first; it attaches the store")
        for dp in self.df:
            yield store.put(dp, timeout=self.timeout)


class GetData(_WithStore):
    """Take each :class:`ObjectID` that ``df`` yields from a store; yield the object.

    Tensorpack's ``PlasmaGetData``. The objects' arrays are views of the store; each object
    leaves the store as it is taken, and its memory returns once its views are garbage.

    :param df: a dataflow (or runner) yielding ids made by :class:`PutData`.
    :param store: the store, or its name (attached at the latest when iterated).
    """

    def __iter__(self) -> Iterator[Any]:
        store = self._attached()
        for oid in self.df:
            yield store.take(oid)
