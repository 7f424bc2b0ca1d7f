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

import base64
import copy
import functools
import itertools
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
from flowplug import _resume

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
        #: a state given to load_state_dict(), for the next iterator.
        self._pending_state: dict[str, Any] | None = None
        #: the last iterator (kept, as torchdata's StatefulDataLoader keeps it, so that
        #: state_dict() after a ``break`` still knows where the consumer stopped).
        self._last_iter: _FlowplugLoaderIter | None = None
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
        state, self._pending_state = self._pending_state, None
        self._last_iter = None  # an abandoned iterator's workers stop now, not later
        it = _FlowplugLoaderIter(self, state)
        self._last_iter = it
        return it

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is in the current pass: torchdata's StatefulDataLoader protocol.

        Call it at any point (before the first batch, mid-epoch, after an epoch ended).
        The dict is small and plain (no batch inside): picklable, ``torch.save``-able and
        JSON-serializable when the dataset's own ``state_dict()`` (if any) is. A loader
        built the same way, given it with :meth:`load_state_dict`, yields the batches of
        that pass the consumer had not received, then the following epochs as an
        uninterrupted run would. See docs/checkpoint.md.
        """
        it = self._last_iter
        if it is not None:
            return it.state_dict()
        if self._pending_state is not None:
            return copy.deepcopy(self._pending_state)
        return _new_pass_state(self._dataset_kind, self.num_workers, _Rng.of(self).now(), None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` (made by :meth:`state_dict`): the next ``iter()``
        continues where the saved loader stopped. An empty dict loads nothing (as in
        torchdata). The loader must be built as the saved one was (dataset, sampler,
        batch size); ``num_workers`` may differ for a map-style dataset.

        :raises ValueError: not a state of this class, or of another layout version.
        :raises flowplug.ConfigError: the state does not fit this loader.
        """
        if isinstance(state_dict, dict) and not state_dict:
            return
        _check_state(self, state_dict)
        it, self._last_iter = self._last_iter, None
        self._iterator = None  # torch's persistent iterator: the next iter() makes a new one
        if it is not None:
            it._shutdown()
        self._pending_state = copy.deepcopy(state_dict)


class _NoData(fp.DataFlow):
    """A stand-in dataflow, to resolve the configured transport without starting anything."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())


# ---------------------------------------------------------------------------- state

#: the layout version of DataLoader.state_dict(); a state of another version is refused.
STATE_VERSION = 1
#: how deep _Rng looks for samplers wrapped in samplers (``.sampler``).
_SAMPLER_DEPTH = 8


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class _Rng:
    """The random generators a loader's passes draw from: its ``generator`` and those of
    its samplers (a batch sampler's ``.sampler``, and so on), once each, in that order;
    and whether a sampler draws from torch's default generator (``generator=None``).

    A pass is resumed by replaying it: these generators are set back to where they were
    when the pass began, the sampler draws the same indices again, and the batches the
    consumer had received are not fetched (torchdata's StatefulDataLoader also replays
    a sampler that has no state of its own, over the generators as it finds them).
    """

    def __init__(self, generators: list[torch.Generator], uses_default: bool):
        self.generators = generators
        self.uses_default = uses_default

    @classmethod
    def of(cls, loader: Any) -> _Rng:
        found: list[torch.Generator] = []
        uses_default = False

        def add(g: Any) -> None:
            if isinstance(g, torch.Generator) and not any(g is f for f in found):
                found.append(g)

        add(loader.generator)
        sampler = loader._index_sampler
        for _ in range(_SAMPLER_DEPTH):
            if sampler is None:
                break
            g = getattr(sampler, "generator", _MISSING)
            if g is None:
                uses_default = True
            add(g)
            sampler = getattr(sampler, "sampler", None)
        return cls(found, uses_default)

    def now(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set(self, states: list[Any]) -> None:
        for g, state in zip(self.generators, states, strict=True):
            g.set_state(state if isinstance(state, torch.Tensor) else _decode(state))


_MISSING: Any = object()


def _new_pass_state(
    kind: int, num_workers: int, generators: list[torch.Tensor], base_seed: int | None
) -> dict[str, Any]:
    """The state of a pass not begun: nothing received, ``generators`` as given."""
    return {
        "flowplug_loader": STATE_VERSION,
        "dataset_kind": _kind_name(kind),
        "num_workers": num_workers,
        "finished": False,
        "base_seed": base_seed,
        "yielded": 0,
        "received": None,
        "generators": [_encode(t) for t in generators],
        "default_generator": None,
        "workers": None,
        "dataset": None,
    }


def _kind_name(kind: int) -> str:
    return "iterable" if kind == _DatasetKind.Iterable else "map"


def _check_state(loader: DataLoader, state: Any) -> None:
    if not isinstance(state, dict) or "flowplug_loader" not in state:
        raise ValueError(
            "DataLoader.load_state_dict() needs a dict made by state_dict() of a "
            f"flowplug.torch.DataLoader, got {type(state).__name__}"
            + (" without its keys (a state of another loader?)" if isinstance(state, dict) else "")
        )
    if state["flowplug_loader"] != STATE_VERSION:
        raise ValueError(
            f"this loader state has layout version {state['flowplug_loader']!r}, this "
            f"flowplug reads version {STATE_VERSION}; resume with the flowplug that saved it"
        )
    kind = _kind_name(loader._dataset_kind)
    if state["dataset_kind"] != kind:
        raise fp.ConfigError(
            f"this state was saved by a loader over a {state['dataset_kind']}-style dataset, "
            f"and this loader's dataset is {kind}-style; build the loader as it was built"
        )
    rng = _Rng.of(loader)
    saved = len(state["generators"])
    lent = state["default_generator"] is not None
    if saved != len(rng.generators) or (lent and not rng.uses_default):
        raise fp.ConfigError(
            f"this state holds the states of {saved} random generator(s), and this loader "
            f"draws from {len(rng.generators)} (its generator= and its samplers' "
            "generators); build the loader, its sampler and their generators as the saved "
            "one was built"
        )
    if kind == "iterable" and state["num_workers"] != loader.num_workers:
        raise fp.ConfigError(
            f"this state was saved with num_workers={state['num_workers']}, and an "
            "IterableDataset's batches depend on the number of workers (each worker "
            "iterates its own copy, which shards itself by get_worker_info()); resume with "
            f"num_workers={state['num_workers']} (map-style datasets may change it)"
        )


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
    """A map-style worker's function: one task ``(position, indices)`` in (a batch of
    indices, or one index with ``batch_size=None``; its position in the sampler's pass),
    ``(position, batch)`` out, fetched and collated. The worker sets itself up (seeds,
    worker info, ``worker_init_fn``) when it starts, as torch's do: the ParallelMap
    calls :meth:`reset_state` in each worker before its first task."""

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

    def reset_state(self) -> None:
        """Set this worker up: threads, seeds, worker info, ``worker_init_fn``."""
        self._pid = os.getpid()
        _init_worker(self.dataset, self.base_seed, self.num_workers, self.worker_init_fn)
        self._fetcher = _DatasetKind.create_fetcher(
            _DatasetKind.Map,
            self.dataset,
            self.auto_collation,
            _worker_collate(self.collate_fn),
            self.drop_last,
        )

    def __call__(self, task: tuple[int, Any]) -> tuple[int, Any]:
        position, index = task
        if self._pid != os.getpid():  # not set up in this process (no reset_state() call)
            self.reset_state()
        return position, self._fetcher.fetch(index)


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
                task = owner._next_task()
            except StopIteration:
                return
            del owner
            yield task


class _IterableWork(fp.DataFlow):
    """An ``IterableDataset`` in a worker of a shard-mode Runner: each worker iterates its
    own copy, one pass per epoch, batched and collated by torch's fetcher."""

    def __init__(self, loader: DataLoader, base_seed: int):
        self.dataset: Any = loader.dataset  # an IterableDataset, maybe with state_dict()
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


class _StatefulIterableWork(_IterableWork):
    """An ``IterableDataset`` with ``state_dict()`` / ``load_state_dict()`` (torchdata's
    ``Stateful``): its state at the start of each pass travels in the shard-mode
    runner's state, and a resumed worker loads it before it replays the pass."""

    def state_dict(self) -> Any:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.dataset.load_state_dict(state)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


# ---------------------------------------------------------------------------- consumer


class _FlowplugLoaderIter(_BaseDataLoaderIter):
    """One iterator of a :class:`DataLoader` (kept across epochs with persistent workers).

    State, in named places: ``_sampler_iter`` (torch's: where the sampler is),
    ``_num_yielded`` (torch's: batches yielded this pass), ``_base_seed`` (torch's),
    ``_runner`` (the workers: a ParallelMap or a shard-mode Runner; None with
    ``num_workers=0``), ``_epoch`` (this pass's batches from the runner), ``_pinner``.
    For :meth:`state_dict`: ``_pass_rng`` (the generators when this pass began),
    ``_skip`` (positions received before a resume: not fetched again), ``_got`` (the
    positions in the sampler's pass of the batches yielded since), ``_finished``.

    :param state: a loader state to resume from (see :meth:`DataLoader.load_state_dict`).
    """

    _sampler_iter: Any  # torch's; declared for mypy without torch installed (typecheck)

    def __init__(self, loader: DataLoader, state: dict[str, Any] | None = None):
        self._rng = _Rng.of(loader)
        self._resume = state
        if state is not None and state["base_seed"] is None:
            # A pass not begun: the generators as they were before its iterator drew
            # base_seed, so that it draws the same one.
            self._rng.set(state["generators"])
        before = torch.get_rng_state() if state is not None and loader.generator is None else None
        pin_fn = loader.pin_fn
        if pin_fn is not None:
            with warnings.catch_warnings():  # a pin_fn pins, accelerator or not
                warnings.filterwarnings("ignore", message="'pin_memory' argument is set")
                super().__init__(loader)
        else:
            super().__init__(loader)
        if state is not None and state["base_seed"] is not None:
            # The pass's base_seed was drawn by the saved run: the draw just made is not
            # part of it (torch's default generator is the program's; give it back).
            self._base_seed = int(state["base_seed"])
            if before is not None:
                torch.set_rng_state(before)
        if pin_fn is None and self._pin_memory:
            pin_fn = functools.partial(_pin_memory.pin_memory, device=self._pin_memory_device)
        if pin_fn is not None and self._dataset_kind == _DatasetKind.Map and self._num_workers:
            pin_fn = functools.partial(_pin_task, pin_fn)  # the workers' (position, batch)
        self._pin_fn = pin_fn
        self._loader_options = (loader.transport, loader.transport_options)
        self._in_order = loader.in_order
        # torch makes it 2 when not given and num_workers > 0; unused without workers
        self._prefetch_factor: int = loader.prefetch_factor or 2
        self._start = _start_method(loader)
        self._runner: fp.Runner | None = None
        self._epoch: Iterator[Any] | None = None
        self._pinner: _Pinner | None = None
        self._fetcher: Any = None
        self._finished = False
        self._pass_rng: tuple[list[torch.Tensor], torch.Tensor | None] = ([], None)
        self._skip = _resume.Done()
        self._got: set[int] = set()
        self._drawn = 0
        self._dataset_state: Any = None
        iterable = self._dataset_kind == _DatasetKind.Iterable
        if self._num_workers == 0:
            if iterable:
                if state is not None and state["dataset"] is not None:
                    _resume.load_into(self._dataset, state["dataset"])
                self._dataset_state = _resume.take_state(self._dataset)  # at the pass start
            self._fetcher = _DatasetKind.create_fetcher(
                self._dataset_kind, self._dataset, self._auto_collation, self._collate_fn,
                self._drop_last,
            )  # fmt: skip
        else:
            self._runner = self._make_runner(loader)
            if state is not None and state["workers"] is not None:
                self._runner.load_state_dict(state["workers"])
        self._reset(loader, first_iter=True)
        if iterable and self._num_workers == 0 and state is not None:
            # An IterableDataset has no positions to skip to: replay the batches the
            # consumer had received (as torchdata does for a dataset without state).
            for _ in range(int(state["yielded"])):
                try:
                    self._fetcher.fetch(self._next_index())
                except StopIteration:
                    self._finished = True
                    break

    def _make_runner(self, loader: DataLoader) -> fp.Runner:
        transport, options = self._loader_options
        common: dict[str, Any] = dict(
            num_workers=self._num_workers,
            transport=transport,
            capacity=self._prefetch_factor * self._num_workers,
            start_method=self._start,
            timeout=self._timeout or None,
            seed=int(self._base_seed) % 2**31,
            **options,
        )
        if self._dataset_kind == _DatasetKind.Iterable:
            work = _StatefulIterableWork if _is_stateful(loader.dataset) else _IterableWork
            return fp.Runner(
                work(loader, int(self._base_seed)),
                mode="shard",
                ordered=self._in_order,
                **common,
            )
        return fp.ParallelMap(
            _IndexSource(self),
            _FetchBatch(loader, int(self._base_seed)),
            ordered=self._in_order,
            **common,
        )

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        self._stop_epoch()  # before the sampler moves: a pinning thread may still read it
        state, self._resume = self._resume, None
        rng = self._rng
        lent = None
        if state is not None and state["base_seed"] is not None:
            rng.set(state["generators"])  # where they were when the saved pass began
            if state["default_generator"] is not None:
                # A sampler seeds itself from torch's default generator: lend it the saved
                # pass's state for its first draw, then give the program back its own.
                lent = torch.get_rng_state()
                torch.set_rng_state(_decode(state["default_generator"]))
        self._pass_rng = (rng.now(), torch.get_rng_state() if rng.uses_default else None)
        try:
            super()._reset(loader, first_iter)
            if rng.uses_default:
                # Its draw from the default generator happens now, not at the first
                # next(): so a state saved before the first batch already follows it, and
                # the program's draws from that generator come after it, as in a run.
                first = list(itertools.islice(self._sampler_iter, 1))
                self._sampler_iter = itertools.chain(first, self._sampler_iter)
        finally:
            if lent is not None:
                torch.set_rng_state(lent)
        self._finished = False
        self._drawn = 0
        self._got = set()
        self._skip = _resume.Done()
        if state is not None:
            if state["received"] is not None:
                self._skip = _resume.Done.from_json(state["received"])
            self._num_yielded = int(state["yielded"])
        if self._runner is None:
            if self._num_workers == 0:
                return
            self._runner = self._make_runner(loader)  # the last epoch failed: new workers
        self._epoch = iter(self._runner)
        if self._pin_fn is not None:
            self._pinner = _Pinner(self._epoch, self._pin_fn, self._prefetch_factor)

    def _next_task(self) -> tuple[int, Any]:
        """The next batch of indices of a map-style pass and its position in the pass;
        skips those received before a resume (the sampler still draws them)."""
        while True:
            index = self._next_index()  # may raise StopIteration
            position = self._drawn
            self._drawn += 1
            if position not in self._skip:
                return position, index

    def _next_data(self) -> Any:
        if self._finished:
            raise StopIteration  # a resumed pass that had ended
        try:
            if self._num_workers == 0:
                if self._dataset_kind == _DatasetKind.Map:
                    position, index = self._next_task()
                    data = self._fetcher.fetch(index)
                    self._got.add(position)
                else:
                    data = self._fetcher.fetch(self._next_index())
                return data if self._pin_fn is None else self._pin_fn(data)
            if self._pinner is not None:
                data = self._pinner.get()
            elif self._epoch is None:
                raise StopIteration
            else:
                data = next(self._epoch)
            if self._dataset_kind == _DatasetKind.Map:
                position, data = data
                self._got.add(position)
            return data
        except StopIteration:
            self._finished = True
            if self._num_workers == 0:
                raise
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

    def state_dict(self) -> dict[str, Any]:
        """This iterator's pass, as :meth:`DataLoader.state_dict` describes it."""
        iterable = self._dataset_kind == _DatasetKind.Iterable
        keeps = self._persistent_workers and self._num_workers > 0
        if self._finished:
            # The next pass: a new iterator draws its base_seed (unless the workers persist,
            # and with them the seed), the generators go on from where they are.
            seed = int(self._base_seed) if keeps else None
            state = _new_pass_state(self._dataset_kind, self._num_workers, self._rng.now(), seed)
            state["finished"] = True
            if iterable and keeps:
                state["workers"] = self._workers_state()
            elif iterable and self._num_workers == 0:
                state["dataset"] = _resume.take_state(self._dataset)  # the next pass's start
            return state
        generators, default = self._pass_rng
        seed = int(self._base_seed)
        state = _new_pass_state(self._dataset_kind, self._num_workers, generators, seed)
        state["yielded"] = self._num_yielded
        if default is not None:
            state["default_generator"] = _encode(default)
        if not iterable:
            state["received"] = self._skip.union(0, self._got).to_json()
        elif self._num_workers > 0:
            state["workers"] = self._workers_state()
        else:
            state["dataset"] = self._dataset_state
        return state

    def _workers_state(self) -> dict[str, Any]:
        if self._pinner is not None:
            raise fp.StateError(
                "state_dict() of a DataLoader over an IterableDataset with workers and a "
                "pinning thread (pin_memory=True with an accelerator, or pin_fn=) is not "
                "supported: the thread takes batches ahead of the consumer. Pin in the "
                "training loop instead, or use a map-style dataset"
            )
        if self._runner is None:
            raise fp.StateError(
                "the workers of this pass stopped (an error, a timeout, or a dead worker), "
                "so where they were is lost; resume from a state saved before, or start "
                "the next epoch with iter(loader)"
            )
        return self._runner.state_dict()

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


def _pin_task(pin_fn: Callable[[Any], Any], item: tuple[int, Any]) -> tuple[int, Any]:
    """Pin the batch of a map-style answer ``(position, batch)``."""
    return item[0], pin_fn(item[1])


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
