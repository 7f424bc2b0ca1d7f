"""PyTorch's DataLoader on flowplug: switch a training loop by changing one import.

::

    from flowplug.torch import DataLoader     # was: from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=4, transport="shm")

:class:`DataLoader` *is* a ``torch.utils.data.DataLoader`` (a subclass): its constructor,
argument checks, samplers, ``len()`` and the order of random draws are torch's own, so
the same ``generator`` (or ``torch.manual_seed``) gives the same indices in the same
order. What differs is how batches reach the consumer when ``num_workers > 0``:

- a map-style dataset: the sampler (or batch sampler) runs in the consumer and each batch
  of indices is a task of a :class:`flowplug.ParallelMap`: a worker fetches the items and
  collates the batch, which travels through the flowplug transport (``transport=``,
  default: the configured one, so ``flowplug.toml`` and ``FLOWPLUG_TRANSPORT`` apply).
  ``in_order=True`` yields in sampler order; ``prefetch_factor * num_workers`` batches are
  in flight at most.
- an ``IterableDataset``: each worker iterates its own copy (a :class:`flowplug.Runner` in
  shard mode); with ``in_order=True`` batches come round robin over the workers, as torch's.

Inside a worker, ``torch.utils.data.get_worker_info()`` returns torch's own ``WorkerInfo``
(``id``, ``num_workers``, ``seed``, ``dataset``); each worker seeds ``torch``, ``random``
and ``numpy`` exactly as torch's workers do from a ``base_seed`` drawn once per iterator,
then calls ``worker_init_fn(worker_id)``. With the default ``collate_fn`` and the ``shm``
transport, a batch of tensors is written straight into the shared-memory store and the
consumer gets tensors whose storage is that memory: no copy after collation.

Errors: an exception in a worker is raised as :class:`flowplug.WorkerError` carrying the
worker's traceback (and, where the core can, also an instance of the original type);
a timeout raises :class:`DataLoaderTimeout` and a dead worker :class:`DataLoaderWorkerDied`,
both ``RuntimeError`` as in torch and flowplug's own classes as well.

This module imports torch; ``import flowplug`` never does.
"""

from __future__ import annotations

import functools
import os
import queue
import random
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch.utils.data._utils import collate as _collate
from torch.utils.data._utils import pin_memory as _pin_memory
from torch.utils.data._utils import worker as _torch_worker
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind

import flowplug as fp

__all__ = [
    "DataLoader",
    "DataLoaderTimeout",
    "DataLoaderWorkerDied",
    "default_collate",
    "default_convert",
    "get_worker_info",
]

#: torch's own, re-exported so that ``from flowplug.torch import ...`` covers a loop's imports.
default_collate = torch.utils.data.default_collate
default_convert = torch.utils.data.default_convert
get_worker_info = torch.utils.data.get_worker_info

#: how long a pinning thread waits on a full queue before it looks at its stop flag (s).
_PIN_POLL = 0.1


class DataLoaderTimeout(fp.RunnerTimeout, RuntimeError):
    """No batch arrived within the loader's ``timeout``: a ``RuntimeError`` as in torch,
    and a :class:`flowplug.RunnerTimeout` (so also a ``TimeoutError``)."""


class DataLoaderWorkerDied(fp.WorkerDied, RuntimeError):
    """A worker process ended without reporting an error (a signal, ``os._exit``): a
    ``RuntimeError`` as in torch, and a :class:`flowplug.WorkerDied` (``pid``, ``exitcode``)."""


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose workers are flowplug's.

    Every argument of torch's DataLoader keeps its meaning (see its documentation);
    ``num_workers=0`` loads in the consumer as torch does. flowplug adds:

    :param transport: the flowplug transport the batches travel by (``"shm"``, ``"zmq"``,
        ``"queue"``...); None takes the configured default (``FLOWPLUG_TRANSPORT``,
        ``flowplug.toml``). Its workers must be processes.
    :param pin_fn: the function the pinning thread applies to each batch. Default: torch's
        ``pin_memory`` when ``pin_memory=True`` and an accelerator exists; with no
        accelerator, ``pin_memory=True`` warns and pins nothing, as torch does. Given,
        it runs (in a consumer thread, as torch's pinning) whatever ``pin_memory`` says.
    :param transport_options: options of the transport (``size="2GiB"`` for ``shm``...).

    Example::

        loader = DataLoader(dataset, batch_size=32, num_workers=2, transport="shm")
        for images, labels in loader:
            ...
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        transport: str | None = None,
        pin_fn: Callable[[Any], Any] | None = None,
        **transport_options: Any,
    ):
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        if pin_fn is not None and not callable(pin_fn):
            raise TypeError(f"pin_fn must be callable, got {type(pin_fn).__name__}")
        self.transport = transport
        self.transport_options = transport_options
        self.pin_fn = pin_fn
        if num_workers > 0:
            # Resolves the configured transport and checks its options now, not at iter().
            probe = fp.Runner(_NoData(), transport=transport, num_workers=1, **transport_options)
            name = probe.transport_name
            cls = fp.get_transport(name)
            if not cls.crosses_processes:
                raise fp.ConfigError(
                    f"flowplug.torch.DataLoader needs worker processes (each seeds torch's "
                    f"RNG and has its own get_worker_info()), and transport {name!r} runs "
                    "its workers as threads; use transport='shm', 'zmq' or 'queue'"
                )

    def _get_iterator(self) -> _BaseDataLoaderIter:
        return _FlowplugLoaderIter(self)


class _NoData(fp.DataFlow):
    """A stand-in dataflow, to resolve the configured transport without starting anything."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())


# ---------------------------------------------------------------------------- workers


def _start_method(loader: DataLoader) -> str | None:
    ctx = loader.multiprocessing_context  # torch turned a string into a context already
    return None if ctx is None else ctx.get_start_method()


def _init_worker(dataset: Any, base_seed: int, num_workers: int, worker_init_fn: Any) -> int:
    """What torch's worker loop does before it fetches: threads, seeds, worker info, init fn.

    :returns: this worker's id.
    """
    info = fp.worker_info()
    assert info is not None, "called outside a flowplug worker"
    worker_id = info.id
    torch.set_num_threads(1)
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    # numpy's state as torch derives it (a hash of base_seed and worker_id): torch's own
    # function, so that a worker draws the same numbers under either loader.
    np.random.seed(_torch_worker._generate_state(base_seed, worker_id))
    _torch_worker._worker_info = _torch_worker.WorkerInfo(
        id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset
    )
    if worker_init_fn is not None:
        worker_init_fn(worker_id)
    return worker_id


def _collate_tensor_in_store(batch: Any, *, collate_fn_map: Any = None) -> Any:
    """Stack tensors into memory from :func:`flowplug.shm.empty`: the transport's store in
    a worker of ``shm`` (the batch then crosses without a copy), ordinary memory elsewhere.
    """
    elem = batch[0]
    if type(elem) is torch.Tensor and elem.layout is torch.strided and elem.device.type == "cpu":
        try:
            dtype = torch.empty((), dtype=elem.dtype).numpy().dtype
        except TypeError:  # bfloat16 and friends have no numpy dtype
            dtype = None
        if dtype is not None:
            out = torch.from_numpy(fp.shm.empty((len(batch), *elem.shape), dtype))
            return torch.stack(batch, 0, out=out)
    return _collate.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)


def _worker_collate(collate_fn: Any) -> Any:
    """The collate function a worker runs: torch's default one writes into the store."""
    if collate_fn is not _collate.default_collate:
        return collate_fn
    table = dict(_collate.default_collate_fn_map)
    table[torch.Tensor] = _collate_tensor_in_store
    return functools.partial(_collate.collate, collate_fn_map=table)


class _FetchBatch:
    """A map-style worker's function: one task (a batch of indices, or one index with
    ``batch_size=None``) in, the fetched and collated batch out. The worker sets itself
    up (seeds, worker info, ``worker_init_fn``) before its first fetch."""

    def __init__(self, loader: DataLoader, base_seed: int):
        self.dataset = loader.dataset
        self.auto_collation = loader._auto_collation
        self.collate_fn = loader.collate_fn
        self.drop_last = loader.drop_last
        self.base_seed = base_seed
        self.num_workers = loader.num_workers
        self.worker_init_fn = loader.worker_init_fn
        self._fetcher: Any = None
        self._pid = -1

    def __call__(self, index: Any) -> Any:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            _init_worker(self.dataset, self.base_seed, self.num_workers, self.worker_init_fn)
            self._fetcher = _DatasetKind.create_fetcher(
                _DatasetKind.Map,
                self.dataset,
                self.auto_collation,
                _worker_collate(self.collate_fn),
                self.drop_last,
            )
        return self._fetcher.fetch(index)


class _IndexSource(fp.DataFlow):
    """The consumer side of a map-style epoch: the loader iterator's sampler, read by the
    ParallelMap. Holds the iterator weakly, so that dropping it shuts the workers down."""

    def __init__(self, owner: _FlowplugLoaderIter):
        self._owner = weakref.ref(owner)

    def __iter__(self) -> Iterator[Any]:
        while True:
            owner = self._owner()
            if owner is None:
                return
            try:
                index = owner._next_index()
            except StopIteration:
                return
            del owner
            yield index


class _IterableWork(fp.DataFlow):
    """An ``IterableDataset`` in a worker of a shard-mode Runner: each worker iterates its
    own copy, one pass per epoch, batched and collated by torch's fetcher."""

    def __init__(self, loader: DataLoader, base_seed: int):
        self.dataset = loader.dataset
        self.auto_collation = loader._auto_collation
        self.collate_fn = loader.collate_fn
        self.drop_last = loader.drop_last
        self.index_sampler = loader._index_sampler
        self.base_seed = base_seed
        self.num_workers = loader.num_workers
        self.worker_init_fn = loader.worker_init_fn

    def reset_state(self) -> None:
        _init_worker(self.dataset, self.base_seed, self.num_workers, self.worker_init_fn)
        self.collate_fn = _worker_collate(self.collate_fn)

    def shard(self, index: int, count: int) -> _IterableWork:
        return self  # the dataset shards itself (get_worker_info()), as under torch

    def __iter__(self) -> Iterator[Any]:
        fetcher = _DatasetKind.create_fetcher(
            _DatasetKind.Iterable, self.dataset, self.auto_collation, self.collate_fn,
            self.drop_last,
        )  # fmt: skip
        for index in self.index_sampler:  # infinite: [None] * batch_size, or None
            try:
                batch = fetcher.fetch(index)
            except StopIteration:
                return
            yield batch


# ---------------------------------------------------------------------------- consumer


class _FlowplugLoaderIter(_BaseDataLoaderIter):
    """One iterator of a :class:`DataLoader` (kept across epochs with persistent workers).

    State, in named places (for state_dict()): ``_sampler_iter`` (torch's: where the
    sampler is), ``_num_yielded`` (torch's: batches yielded this epoch), ``_base_seed``
    (torch's), ``_runner`` (the workers: a ParallelMap or a shard-mode Runner; None with
    ``num_workers=0``), ``_epoch`` (this epoch's batches from the runner), ``_pinner``.
    """

    def __init__(self, loader: DataLoader):
        pin_fn = loader.pin_fn
        if pin_fn is not None:
            with warnings.catch_warnings():  # a pin_fn pins, accelerator or not
                warnings.filterwarnings("ignore", message="'pin_memory' argument is set")
                super().__init__(loader)
        else:
            super().__init__(loader)
        if pin_fn is None and self._pin_memory:
            pin_fn = functools.partial(_pin_memory.pin_memory, device=self._pin_memory_device)
        self._pin_fn = pin_fn
        self._loader_options = (loader.transport, loader.transport_options)
        self._in_order = loader.in_order
        self._prefetch_factor = loader.prefetch_factor
        self._start = _start_method(loader)
        self._runner: fp.Runner | None = None
        self._epoch: Iterator[Any] | None = None
        self._pinner: _Pinner | None = None
        self._fetcher: Any = None
        if self._num_workers == 0:
            self._fetcher = _DatasetKind.create_fetcher(
                self._dataset_kind, self._dataset, self._auto_collation, self._collate_fn,
                self._drop_last,
            )  # fmt: skip
        else:
            self._runner = self._make_runner(loader)
        self._reset(loader, first_iter=True)

    def _make_runner(self, loader: DataLoader) -> fp.Runner:
        transport, options = self._loader_options
        common: dict[str, Any] = dict(
            num_workers=self._num_workers,
            transport=transport,
            capacity=self._prefetch_factor * self._num_workers,
            start_method=self._start,
            timeout=self._timeout or None,
            seed=self._base_seed % 2**31,
            **options,
        )
        if self._dataset_kind == _DatasetKind.Iterable:
            return fp.Runner(
                _IterableWork(loader, self._base_seed),
                mode="shard",
                ordered=self._in_order,
                **common,
            )
        return fp.ParallelMap(
            _IndexSource(self),
            _FetchBatch(loader, self._base_seed),
            ordered=self._in_order,
            **common,
        )

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        super()._reset(loader, first_iter)
        self._stop_epoch()
        if self._runner is None:
            if self._num_workers == 0:
                return
            self._runner = self._make_runner(loader)  # the last epoch failed: new workers
        self._epoch = iter(self._runner)
        if self._pin_fn is not None:
            self._pinner = _Pinner(self._epoch, self._pin_fn, self._prefetch_factor)

    def _next_data(self) -> Any:
        if self._runner is None and self._num_workers == 0:
            data = self._fetcher.fetch(self._next_index())  # may raise StopIteration
            return data if self._pin_fn is None else self._pin_fn(data)
        try:
            if self._pinner is not None:
                return self._pinner.get()
            if self._epoch is None:
                raise StopIteration
            return next(self._epoch)
        except StopIteration:
            if not self._persistent_workers:
                self._shutdown()
            else:
                self._stop_epoch()
            raise
        except fp.RunnerTimeout as exc:
            self._shutdown()
            raise DataLoaderTimeout(
                f"DataLoader timed out after {self._timeout} seconds: {exc}"
            ) from None
        except fp.WorkerDied as exc:
            self._shutdown()
            raise DataLoaderWorkerDied(
                f"DataLoader worker (pid {exc.pid}) exited unexpectedly: {exc}",
                worker_id=exc.worker_id,
                pid=exc.pid,
                exitcode=exc.exitcode,
            ) from None
        except BaseException:
            self._shutdown()  # a worker's error closed the runner: the next epoch restarts
            raise

    def _stop_epoch(self) -> None:
        if self._pinner is not None:
            if not self._pinner.stop() and self._runner is not None:
                # The thread waits for a batch that does not come: closing the runner
                # ends that wait (the next epoch starts new workers).
                self._runner.close()
                self._runner = None
            self._pinner.join()
            self._pinner = None
        if self._epoch is not None:
            close = getattr(self._epoch, "close", None)
            if close is not None:
                close()  # lets go of the runner's guard
            self._epoch = None

    def _shutdown(self) -> None:
        """Stop the pinning thread and the workers. Idempotent."""
        self._stop_epoch()
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:
            pass


class _Pinner:
    """torch's pinning stage: a consumer thread takes batches, pins them, queues them."""

    _DONE: Any = object()

    def __init__(self, epoch: Iterator[Any], pin_fn: Callable[[Any], Any], depth: int):
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_pin_loop,
            args=(epoch, pin_fn, self._queue, self._stop),
            name="flowplug-torch-pin-memory",
            daemon=True,
        )
        self._thread.start()
        self._ended = False

    def get(self) -> Any:
        if self._ended:
            raise StopIteration
        ok, item = self._queue.get()
        if ok:
            return item
        self._ended = True
        if item is _Pinner._DONE:
            raise StopIteration
        raise item

    def stop(self, wait: float = 5.0) -> bool:
        """Ask the thread to stop; true once it has (else it waits inside the runner)."""
        self._stop.set()
        deadline = time.monotonic() + wait
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # make room for a put the thread may be blocked in
                self._queue.get(timeout=_PIN_POLL)
            except queue.Empty:
                pass
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


def _pin_loop(
    epoch: Iterator[Any], pin_fn: Callable[[Any], Any], out: queue.Queue[Any], stop: Any
) -> None:
    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_PIN_POLL)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in epoch:
            if not put((True, pin_fn(batch))):
                return
            if stop.is_set():
                return
            del batch
    except BaseException as exc:
        put((False, exc))
        return
    put((False, _Pinner._DONE))
