"""tensorpack's parallel runners, with their signatures, over the one flowplug Runner.

Change ``from tensorpack.dataflow import MultiProcessRunnerZMQ`` into
``from flowplug.compat.tensorpack import MultiProcessRunnerZMQ`` and the pipeline runs
unchanged: tensorpack DataFlows are accepted as they are (``__iter__``, ``__len__``,
``reset_state``). The semantics are tensorpack's documented ones: ``reset_state()`` once
(it starts the workers), one iteration yields ``len(ds)`` datapoints, every worker runs
its own copy of ``ds`` (with ``num_proc=1`` the order is kept), and iterating from two
places at once is an error. What differs is better: errors in workers are raised in the
consumer with their traceback, dead workers are noticed, and nothing is leaked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..dataflow import DataFlow
from ..runner import Runner, _length

__all__ = [
    "MultiProcessPrefetchData",
    "MultiProcessRunner",
    "MultiProcessRunnerZMQ",
    "MultiThreadPrefetchData",
    "MultiThreadRunner",
    "PlasmaGetData",
    "PlasmaPutData",
    "PrefetchData",
    "PrefetchDataZMQ",
]


class MultiProcessRunner(Runner):
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


class MultiProcessRunnerZMQ(Runner):
    """Run ``ds`` in ``num_proc`` processes, collected through a ZeroMQ ipc pipe.

    :param ds: the dataflow to run.
    :param num_proc: number of processes.
    :param hwm: the zmq high-water mark (queue size) on both sides.
    """

    def __init__(self, ds: Any, num_proc: int = 1, hwm: int = 50):
        super().__init__(ds, transport="zmq", num_workers=num_proc, capacity=hwm, mode="replicate")
        self.ds = ds


class MultiThreadRunner(Runner):
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


class PlasmaPutData(DataFlow):
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


class PlasmaGetData(DataFlow):
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


# tensorpack's old names
PrefetchData = MultiProcessRunner
MultiProcessPrefetchData = MultiProcessRunner
PrefetchDataZMQ = MultiProcessRunnerZMQ
MultiThreadPrefetchData = MultiThreadRunner
