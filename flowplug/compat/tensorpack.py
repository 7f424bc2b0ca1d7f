"""tensorpack's parallel dataflows, with their signatures, over flowplug's Runner and ParallelMap.

Change ``from tensorpack.dataflow import MultiProcessRunnerZMQ, MultiProcessMapData`` into
``from flowplug.compat.tensorpack import ...`` and the pipeline runs unchanged: tensorpack
DataFlows are accepted as they are (``__iter__``, ``__len__``, ``reset_state``). The
semantics are tensorpack's documented ones:

- the runners: ``reset_state()`` once (it starts the workers), one iteration yields
  ``len(ds)`` datapoints, every worker runs its own copy of ``ds`` (with ``num_proc=1``
  the order is kept), and iterating from two places at once is an error;
- the maps: ``map_func`` runs in the workers, ``ds`` is read in the consumer, a ``map_func``
  returning None drops the datapoint, ``len()`` is ``len(ds)``; ``strict=True`` yields
  exactly the mapped set of one pass per iteration (in any order), ``strict=False`` an
  endless stream over repeated passes.

Each class is a thin subclass of :class:`flowplug.Runner` or :class:`flowplug.ParallelMap`,
so what differs is better: errors in workers are raised in the consumer with their
traceback (as instances of their own type too), dead workers are noticed, nothing leaks.

When tensorpack is installed, every class here is a (virtual) subclass of
``tensorpack.dataflow.DataFlow``, so tensorpack's consumers that check it
(``LMDBSerializer.save``, ``QueueInput``, ``InferenceRunner``...) accept them, and
they have tensorpack's old method names ``size()`` and ``get_data()``. Without tensorpack,
nothing here imports it.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Any

from ..dataflow import DataFlow
from ..errors import UnknownLength
from ..parallel import ParallelMap
from ..runner import Runner, _length

__all__ = [
    "MultiProcessMapAndBatchData",
    "MultiProcessMapAndBatchDataZMQ",
    "MultiProcessMapData",
    "MultiProcessMapDataZMQ",
    "MultiProcessPrefetchData",
    "MultiProcessRunner",
    "MultiProcessRunnerZMQ",
    "MultiThreadMapData",
    "MultiThreadPrefetchData",
    "MultiThreadRunner",
    "PlasmaGetData",
    "PlasmaPutData",
    "PrefetchData",
    "PrefetchDataZMQ",
]


class _TensorpackNames:
    """tensorpack's old method names, which scripts still call (tensorpack 0.11 has them)."""

    def size(self) -> int:
        """``len(self)``: the old name."""
        return len(self)  # type: ignore[arg-type]

    def get_data(self) -> Iterator[Any]:
        """``iter(self)``: the old name."""
        return iter(self)  # type: ignore[call-overload]


class MultiProcessRunner(_TensorpackNames, Runner):
    """Run ``ds`` in ``num_proc`` processes, collected through a multiprocessing.Queue.

    :param ds: the dataflow to run.
    :param num_prefetch: size of the queue that holds prefetched datapoints.
    :param num_proc: number of processes.
    """

    def __init__(self, ds: Any, num_prefetch: int, num_proc: int):
        super().__init__(
            ds, transport="queue", num_workers=num_proc, capacity=num_prefetch, mode="replicate"
        )
        self.ds = ds


class MultiProcessRunnerZMQ(_TensorpackNames, Runner):
    """Run ``ds`` in ``num_proc`` processes, collected through a ZeroMQ ipc pipe.

    :param ds: the dataflow to run.
    :param num_proc: number of processes.
    :param hwm: the zmq high-water mark (queue size) on both sides.
    """

    def __init__(self, ds: Any, num_proc: int = 1, hwm: int = 50):
        super().__init__(ds, transport="zmq", num_workers=num_proc, capacity=hwm, mode="replicate")
        self.ds = ds


class MultiThreadRunner(_TensorpackNames, Runner):
    """Run one dataflow per thread, each made by ``get_df()``, collected through a queue.

    :param get_df: a callable returning a new DataFlow; called once per thread.
    :param num_prefetch: size of the queue.
    :param num_thread: number of threads.
    """

    def __init__(self, get_df: Callable[[], Any], num_prefetch: int, num_thread: int):
        if not callable(get_df):
            raise TypeError(
                f"MultiThreadRunner needs get_df, a callable returning a DataFlow, "
                f"got {type(get_df).__name__}; pass e.g. lambda: MyDataFlow()"
            )
        # tensorpack makes the dataflows here, so len() works before reset_state().
        dfs = [get_df() for _ in range(num_thread)]
        handed_out = iter(dfs)
        super().__init__(
            lambda: next(handed_out),
            transport="thread",
            num_workers=num_thread,
            capacity=num_prefetch,
            mode="replicate",
        )
        self.get_df = get_df
        self._size = _length(dfs[0])


class PlasmaPutData(_TensorpackNames, DataFlow):
    """Put each datapoint of ``ds`` in a shared-memory store; yield ``[id bytes]``.

    tensorpack's ``PlasmaPutData`` over :class:`flowplug.shm.PutData` (Plasma left pyarrow).
    ``socket`` was the Plasma store's socket; here it is the :class:`flowplug.shm.ObjectStore`
    or its name, made beforehand in the consumer: ``store = fp.shm.ObjectStore("1GiB")``.
    """

    def __init__(self, ds: Any, socket: Any):
        from .. import shm  # needs numpy; loaded only by users of these two

        self._put = shm.PutData(ds, socket)

    def __len__(self) -> int:
        return len(self._put)

    def reset_state(self) -> None:
        self._put.reset_state()

    def __iter__(self) -> Iterator[list[bytes]]:
        for oid in self._put:
            yield [oid.binary()]


class PlasmaGetData(_TensorpackNames, DataFlow):
    """Take the objects whose ids ``ds`` yields (as ``[id bytes]``) out of the store.

    tensorpack's ``PlasmaGetData`` over :class:`flowplug.shm.GetData`; arrays come back
    as zero-copy views of the store.
    """

    def __init__(self, ds: Any, socket: Any):
        from .. import shm

        self._get = shm.GetData(_FirstField(ds, shm.ObjectID.from_binary), socket)

    def __len__(self) -> int:
        return len(self._get)

    def reset_state(self) -> None:
        self._get.reset_state()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get)


class _FirstField(DataFlow):
    """``convert(dp[0])`` for each datapoint of ``ds``."""

    def __init__(self, ds: Any, convert: Callable[[bytes], Any]):
        self.ds = ds
        self.convert = convert

    def __len__(self) -> int:
        return len(self.ds)

    def reset_state(self) -> None:
        self.ds.reset_state()

    def __iter__(self) -> Iterator[Any]:
        for dp in self.ds:
            yield self.convert(dp[0])


# ---------------------------------------------------------------------------- parallel maps


class _MapData(_TensorpackNames, ParallelMap):
    """What tensorpack's ``_ParallelMapData`` is, over :class:`flowplug.ParallelMap`."""

    _what = "num_proc"

    def __init__(
        self,
        ds: Any,
        num_workers: int | None,
        map_func: Callable[[Any], Any] | None,
        buffer_size: int,
        strict: bool,
        transport: str,
    ):
        name = type(self).__name__
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ValueError(
                f"{name} needs {self._what}, a positive number of workers, got {num_workers!r}; "
                f"the signature is {name}(ds, {self._what}, map_func, buffer_size=200, "
                "strict=False)"
            )
        if not callable(map_func):
            raise TypeError(
                f"{name} needs map_func, a function of one datapoint, got "
                f"{type(map_func).__name__}; the signature is {name}(ds, {self._what}, "
                "map_func, buffer_size=200, strict=False)"
            )
        size = _length(ds)
        if strict and size is not None:
            buffer_size = min(buffer_size, size)  # as tensorpack: never more than one pass
        if buffer_size < 1:
            raise ValueError(f"{name} needs buffer_size >= 1, got {buffer_size}")
        super().__init__(
            ds if strict else _Endless(ds),
            map_func,
            num_workers=num_workers,
            transport=transport,
            ordered=False,  # tensorpack's maps yield as completed
            capacity=buffer_size,
            drop_none=True,
            length=size,  # tensorpack's len() is len(ds), drops or not
        )
        self.ds = ds
        self.map_func = map_func
        self.buffer_size = buffer_size
        self.strict = strict


class MultiProcessMapDataZMQ(_MapData):
    """``map_func`` over the datapoints of ``ds`` in ``num_proc`` processes (ZeroMQ).

    tensorpack's ``MultiProcessMapDataZMQ`` (and ``MultiProcessMapData``), over
    :class:`flowplug.ParallelMap` with the ``zmq`` transport. ``ds`` is read in the consumer;
    results come as they are completed, not in the order of ``ds``.

    :param ds: the dataflow to map.
    :param num_proc: number of worker processes.
    :param map_func: datapoint -> datapoint, or None to drop the datapoint.
    :param buffer_size: how many datapoints may be in flight or buffered.
    :param strict: True: each iteration yields exactly the mapped datapoints of one pass
        of ``ds``, then stops. False: one endless stream over repeated passes of ``ds``,
        which may mix passes (``len()`` is still ``len(ds)``: a number of steps).
    """

    def __init__(
        self,
        ds: Any,
        num_proc: int | None = None,
        map_func: Callable[[Any], Any] | None = None,
        *,
        buffer_size: int = 200,
        strict: bool = False,
    ):
        super().__init__(ds, num_proc, map_func, buffer_size, strict, "zmq")
        self.num_proc = num_proc


class MultiThreadMapData(_MapData):
    """``map_func`` over the datapoints of ``ds`` in ``num_thread`` threads.

    tensorpack's ``MultiThreadMapData``, over :class:`flowplug.ParallelMap` with the
    ``thread`` transport; arguments as for :class:`MultiProcessMapDataZMQ`. Unlike
    tensorpack's, an exception in ``map_func`` is raised in the consumer instead of
    leaving it waiting forever.
    """

    _what = "num_thread"

    def __init__(
        self,
        ds: Any,
        num_thread: int | None = None,
        map_func: Callable[[Any], Any] | None = None,
        *,
        buffer_size: int = 200,
        strict: bool = False,
    ):
        super().__init__(ds, num_thread, map_func, buffer_size, strict, "thread")
        self.num_thread = num_thread


class MultiProcessMapAndBatchDataZMQ(_TensorpackNames, ParallelMap):
    """``map_func`` over ``ds``, then batches of ``batch_size``, both in the workers.

    tensorpack's ``MultiProcessMapAndBatchDataZMQ`` (and ``MultiProcessMapAndBatchData``),
    over :class:`flowplug.ParallelMap` with the ``zmq`` transport: the consumer reads ``ds``
    (repeated without end) and sends ``batch_size`` datapoints per task; a worker maps them
    and stacks the results as tensorpack's ``BatchData`` does. An endless stream of
    batches, with no ``len()``, as in tensorpack. Datapoints for which ``map_func`` returns
    None are dropped, and batches stay ``batch_size`` long: the few left short are filled
    up in the consumer.

    :param ds: the dataflow to map.
    :param num_proc: number of worker processes.
    :param map_func: datapoint -> datapoint, or None to drop the datapoint.
    :param batch_size: datapoints per batch.
    :param buffer_size: how many (unbatched) datapoints may be in flight or buffered;
        ``batch_size * 10`` by default; must be larger than ``batch_size``.
    """

    def __init__(
        self,
        ds: Any,
        num_proc: int,
        map_func: Callable[[Any], Any],
        batch_size: int,
        buffer_size: int | None = None,
    ):
        name = type(self).__name__
        if not callable(map_func):
            raise TypeError(
                f"{name} needs map_func, a function of one datapoint, got "
                f"{type(map_func).__name__}; the signature is "
                f"{name}(ds, num_proc, map_func, batch_size, buffer_size=None)"
            )
        if buffer_size is None:
            buffer_size = batch_size * 10
        if not 0 < batch_size < buffer_size:
            raise ValueError(
                f"{name} needs 0 < batch_size < buffer_size, got batch_size={batch_size}, "
                f"buffer_size={buffer_size}"
            )
        super().__init__(
            _Chunks(_Endless(ds), batch_size),
            _MapAndBatch(map_func, batch_size),
            num_workers=num_proc,
            transport="zmq",
            ordered=False,
            capacity=max(1, buffer_size // batch_size),
        )
        self.ds = ds
        self.num_proc = num_proc
        self.map_func = map_func
        self.batch_size = batch_size
        self.buffer_size = buffer_size

    def __len__(self) -> int:
        raise UnknownLength(f"{type(self).__name__} is an endless stream of batches: no length")

    def __iter__(self) -> Generator[Any, None, None]:
        size = self.batch_size
        short: list[Any] = []  # mapped datapoints of tasks that lost some to None
        for full, out in super().__iter__():
            if full:
                yield out
                continue
            short.extend(out)
            while len(short) >= size:
                yield aggregate_batch(short[:size])
                del short[:size]


class _Endless(DataFlow):
    """Passes of ``ds`` one after the other, as one stream that each ``__iter__`` continues.

    tensorpack's non-strict maps iterate ``RepeatedData(ds, -1)`` once, from
    ``reset_state()`` on: breaking out and iterating again goes on where it stopped.
    """

    def __init__(self, ds: Any):
        self.ds = ds
        self._stream: Iterator[Any] | None = None

    def reset_state(self) -> None:
        self.ds.reset_state()

    def _passes(self) -> Iterator[Any]:
        while True:
            empty = True
            for dp in self.ds:
                empty = False
                yield dp
            if empty:
                raise RuntimeError(
                    f"dataflow {type(self.ds).__name__} yielded no datapoint in a whole "
                    "pass; an endless stream of its passes would spin"
                )

    def __iter__(self) -> Iterator[Any]:
        if self._stream is None:
            self._stream = self._passes()
        return _Continue(self._stream)


class _Continue:
    """An iterator over a shared stream whose ``close()`` leaves the stream open."""

    def __init__(self, stream: Iterator[Any]):
        self._stream = stream

    def __iter__(self) -> _Continue:
        return self

    def __next__(self) -> Any:
        return next(self._stream)


class _Chunks(DataFlow):
    """Lists of ``size`` consecutive datapoints of ``ds`` (an endless stream)."""

    def __init__(self, ds: Any, size: int):
        self.ds = ds
        self.size = size

    def reset_state(self) -> None:
        self.ds.reset_state()

    def __iter__(self) -> Iterator[list[Any]]:
        chunk: list[Any] = []
        for dp in self.ds:
            chunk.append(dp)
            if len(chunk) == self.size:
                yield chunk
                chunk = []


class _MapAndBatch:
    """A worker's task: map a chunk, drop the Nones, stack it if it is still whole.

    Returns ``(True, batch)``, or ``(False, mapped datapoints)`` for a chunk that lost some.
    """

    def __init__(self, map_func: Callable[[Any], Any], batch_size: int):
        self.map_func = map_func
        self.batch_size = batch_size

    def __call__(self, chunk: list[Any]) -> tuple[bool, Any]:
        fn = self.map_func
        mapped = [out for out in map(fn, chunk) if out is not None]
        if len(mapped) == self.batch_size:
            return True, aggregate_batch(mapped)
        return False, mapped


def aggregate_batch(dps: list[Any]) -> Any:
    """Stack datapoints into one batch, as tensorpack's ``BatchData.aggregate_batch``.

    A datapoint is a list (or tuple) of components, or a dict; each component is stacked
    with numpy: Python ints as int32, floats as float32, bools as bool, str and bytes as
    str, arrays with their own dtype.

    :raises TypeError: a datapoint or a component of a type that cannot be batched.
    """
    first = dps[0]
    if isinstance(first, (list, tuple)):
        return [_stack([dp[k] for dp in dps]) for k in range(len(first))]
    if isinstance(first, dict):
        return {key: _stack([dp[key] for dp in dps]) for key in first}
    raise TypeError(f"a datapoint to batch is a list, tuple or dict, got {type(first).__name__}")


def _stack(values: list[Any]) -> Any:
    import numpy as np  # tensorpack's datapoints are numpy: loaded by the users of batches

    first = values[0]
    dtype: Any
    if type(first) is bool:
        dtype = "bool"
    elif isinstance(first, int):
        dtype = "int32"
    elif type(first) is float:
        dtype = "float32"
    elif isinstance(first, (bytes, str)):
        dtype = "str"
    else:
        try:
            dtype = first.dtype
        except AttributeError:
            raise TypeError(f"cannot batch a component of type {type(first).__name__}") from None
    return np.asarray(values, dtype=dtype)


# ---------------------------------------------------------------------------- names


# tensorpack's aliases
MultiProcessMapData = MultiProcessMapDataZMQ
MultiProcessMapAndBatchData = MultiProcessMapAndBatchDataZMQ

# tensorpack's old names
PrefetchData = MultiProcessRunner
MultiProcessPrefetchData = MultiProcessRunner
PrefetchDataZMQ = MultiProcessRunnerZMQ
MultiThreadPrefetchData = MultiThreadRunner


def _register_as_tensorpack_dataflows() -> None:
    """Make every class here a virtual subclass of ``tensorpack.dataflow.DataFlow``.

    tensorpack's DataFlow is an ABC, so ``register`` makes ``isinstance`` true without
    inheriting from it. Done when this module is imported and tensorpack is installed
    (importing it costs under a second, and tensorpack's users import it anyway), so that
    it holds whatever the order of the imports.
    """
    if importlib.util.find_spec("tensorpack") is None:
        return
    try:
        from tensorpack.dataflow import DataFlow as TensorpackDataFlow
    except Exception as exc:
        warnings.warn(
            f"tensorpack is installed but does not import ({type(exc).__name__}: {exc}); "
            "flowplug.compat.tensorpack works without it, but its classes are not "
            "tensorpack DataFlows, so tensorpack's isinstance checks will reject them",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    for cls in (
        MultiProcessRunner,
        MultiProcessRunnerZMQ,
        MultiThreadRunner,
        MultiProcessMapDataZMQ,
        MultiThreadMapData,
        MultiProcessMapAndBatchDataZMQ,
        PlasmaPutData,
        PlasmaGetData,
    ):
        TensorpackDataFlow.register(cls)


_register_as_tensorpack_dataflows()
