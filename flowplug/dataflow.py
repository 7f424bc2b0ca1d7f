"""The DataFlow protocol and the basic sources."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from .errors import UnknownLength


@runtime_checkable
class DataFlowLike(Protocol):
    """What a runner accepts: anything iterable with a ``reset_state()``.

    Nobody has to inherit from :class:`DataFlow`; tensorpack dataflows fit as they are.
    """

    def __iter__(self) -> Iterator[Any]: ...

    def reset_state(self) -> None: ...


class DataFlow:
    """Base class of a dataflow: an iterable of datapoints.

    Subclasses implement ``__iter__``; ``__len__`` raises :class:`~flowplug.UnknownLength`
    (a :class:`NotImplementedError`) when the size is unknown; ``reset_state()`` is called
    once, in the process or thread that will iterate, before the first iteration (seed
    random generators there).
    """

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise UnknownLength(f"{type(self).__name__} has no known length")

    def reset_state(self) -> None:
        """Prepare for iteration in this process; called once."""


class DataFromList(DataFlow):
    """Yield the items of a list, in order or shuffled once per pass.

    >>> list(DataFromList([1, 2, 3]))
    [1, 2, 3]
    """

    def __init__(self, items: Iterable[Any], shuffle: bool = False):
        self.items = list(items)
        self.shuffle = shuffle
        # Each pass shuffles with a generator seeded by (seed, pass number), so that the
        # state is two numbers (state_dict()) and a resumed run repeats the same orders.
        self._seed = random.getrandbits(63)
        self._passes = 0

    def __len__(self) -> int:
        return len(self.items)

    def reset_state(self) -> None:
        # In a worker, the random module is seeded from the runner's seed and the worker.
        self._seed = random.getrandbits(63)
        self._passes = 0

    def state_dict(self) -> dict[str, int] | None:
        """The shuffling state (torchdata's ``Stateful`` protocol): what the next pass needs
        to repeat the order it would have had; None without ``shuffle`` (nothing to keep).
        A runner saves it in its checkpoints (docs/checkpoint.md)."""
        return {"seed": self._seed, "passes": self._passes} if self.shuffle else None

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """Continue from a state made by :meth:`state_dict`."""
        if state is None:
            return
        self._seed = int(state["seed"])
        self._passes = int(state["passes"])

    def shard(self, index: int, count: int) -> DataFromList:
        """Return the items at positions ``index, index + count, ...``: one worker's shard
        in a runner's shard mode, taken without a pass over the others.

        With ``shuffle`` the shard shuffles its own items each pass: every item still
        comes once per epoch.
        """
        return DataFromList(self.items[index::count], shuffle=self.shuffle)

    def __iter__(self) -> Iterator[Any]:
        if not self.shuffle:
            yield from self.items
            return
        order = list(range(len(self.items)))
        random.Random(f"{self._seed}:{self._passes}").shuffle(order)
        self._passes += 1
        for i in order:
            yield self.items[i]


class DataFromGenerator(DataFlow):
    """Yield from a generator function or a zero-argument callable returning an iterable.

    Each pass calls ``gen()`` again, so the source can be iterated more than once.

    >>> list(DataFromGenerator(lambda: range(3)))
    [0, 1, 2]
    """

    def __init__(self, gen: Callable[[], Iterable[Any]], size: int | None = None):
        if not callable(gen):
            raise TypeError(
                f"DataFromGenerator needs a generator function or a zero-argument callable, "
                f"got {type(gen).__name__}; wrap an iterable as DataFromGenerator(lambda: it)"
            )
        self.gen = gen
        self.size = size

    def __len__(self) -> int:
        if self.size is None:
            raise UnknownLength("DataFromGenerator has no known length; pass size=")
        return self.size

    def __iter__(self) -> Iterator[Any]:
        yield from self.gen()


class Batch(DataFlow):
    """Group the datapoints of ``df`` into batches of ``size``, optionally collated.

    Wrap the dataflow a Runner runs, and each worker batches (and collates) its own
    datapoints, so that one message carries a whole batch::

        batches = fp.Batch(df, 32, collate=np.stack)
        with fp.Runner(batches, num_workers=4) as runner:
            for batch in runner:  # np.stack of 32 datapoints
                ...

    :param df: the dataflow to batch.
    :param size: datapoints per batch.
    :param collate: a function of the list of datapoints; None yields the lists. In a
        worker of the ``shm`` transport, a collate that writes into an array from
        :func:`flowplug.shm.empty` makes a batch that reaches the consumer uncopied.
    :param remainder: yield the last, smaller batch of a pass (tensorpack's
        ``BatchData(remainder=True)``, torch's ``drop_last=False``); else drop it.
    """

    def __init__(
        self,
        df: Any,
        size: int,
        collate: Callable[[list[Any]], Any] | None = None,
        remainder: bool = True,
    ):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"Batch size must be a positive int, got {size!r}")
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable, got {type(collate).__name__}")
        self.df = df
        self.size = size
        self.collate = collate
        self.remainder = remainder

    def __len__(self) -> int:
        n = len(self.df)
        return -(-n // self.size) if self.remainder else n // self.size

    def reset_state(self) -> None:
        self.df.reset_state()

    def shard(self, index: int, count: int) -> DataFlow:
        """Worker ``index`` of ``count`` in shard mode: the batches at positions ``index,
        index + count, ...`` of a pass, the same batches as without workers; it reads the
        whole pass but collates only its own batches."""
        return _BatchShard(self, index, count)

    def __iter__(self) -> Iterator[Any]:
        collate = self.collate
        size = self.size
        batch: list[Any] = []
        for dp in self.df:
            batch.append(dp)
            if len(batch) == size:
                yield batch if collate is None else collate(batch)
                batch = []
        if batch and self.remainder:
            yield batch if collate is None else collate(batch)


class _BatchShard(DataFlow):
    """One worker's batches of a :class:`Batch` in shard mode (see :meth:`Batch.shard`)."""

    def __init__(self, batch: Batch, index: int, count: int):
        self.batch, self.index, self.count = batch, index, count

    def __iter__(self) -> Iterator[Any]:
        whole = Batch(self.batch.df, self.batch.size, None, self.batch.remainder)
        collate = self.batch.collate
        for items in itertools.islice(whole, self.index, None, self.count):
            yield items if collate is None else collate(items)
