"""Every exception flowplug raises. All derive from :class:`FlowplugError`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar


class FlowplugError(Exception):
    """Base class of every flowplug error."""


class TransportNotFound(FlowplugError, LookupError):
    """No installed transport has the requested name.

    The message lists the available names and, for a near miss, suggests one.

    :ivar where: the config file or environment variable that named it, if any.
    """

    def __init__(
        self,
        name: str,
        available: list[str],
        suggestion: str | None = None,
        where: str | None = None,
    ):
        self.name = name
        self.available = available
        self.suggestion = suggestion
        self.where = where
        listed = ", ".join(available) if available else "none (is flowplug installed?)"
        msg = f"no transport {name!r}; available: {listed}."
        if where:
            msg = f"{where}: transport = {name!r}: {msg}"
        if suggestion:
            msg += f" Did you mean {suggestion!r}?"
        super().__init__(msg)


class PluginError(FlowplugError):
    """A plugin failed to load, failed inside its hook, or registered something invalid."""


class ConfigError(FlowplugError, ValueError):
    """A setting is unknown, has the wrong type, or a value that cannot be used.

    :ivar problems: every problem found, one line each: a config file with three mistakes
        is reported with all three, not one fix-and-retry round each.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        """One error for ``problems`` (at least one): the message lists them all."""
        if len(problems) == 1:
            return cls(problems[0])
        listed = "\n".join(f"  - {p}" for p in problems)
        return cls(f"{len(problems)} problems in the configuration:\n{listed}", problems)


class StateError(FlowplugError, RuntimeError):
    """An object was used in a state that does not allow it.

    Examples: ``reset_state()`` called twice, a runner iterated from two threads at
    once, or a closed runner iterated.
    """


class WorkerError(FlowplugError):
    """A worker's dataflow (or a map's ``fn``) raised; the message carries the remote traceback.

    Where the original type allows it, the exception raised is also an instance of that
    type, so that existing handlers still match: a worker's ``ValueError`` is caught by
    ``except ValueError`` as well as by ``except fp.WorkerError``. Its ``args`` and
    attributes are the original's (``errno`` of an ``OSError``, a custom exception's
    fields), except where they collide with the attributes below; ``str()`` is flowplug's
    message. Types that are not :class:`Exception` (``SystemExit``, ``KeyboardInterrupt``),
    ``StopIteration`` and types that cannot be subclassed give a plain ``WorkerError``.

    :ivar worker_id: index of the worker that failed.
    :ivar exc_type: name of the original exception type (e.g. ``"ValueError"``).
    :ivar remote_traceback: the formatted traceback from inside the worker.
    :ivar index: for :class:`~flowplug.ParallelMap`, the index of the input whose ``fn``
        raised; None otherwise.
    :ivar original: the original exception, rebuilt in the consumer (pickled across
        processes, without calling its ``__init__`` when that cannot take its own
        ``args``); None when its class cannot be pickled or imported here.
    """

    worker_id: int
    exc_type: str
    remote_traceback: str
    index: int | None
    original: BaseException | None
    _message: str
    _remote_message: str
    _origin: str

    def __init__(
        self,
        message: str,
        *,
        worker_id: int,
        exc_type: str,
        remote_traceback: str,
        index: int | None = None,
        original: BaseException | None = None,
        remote_message: str = "",
        origin: str = "",
    ):
        super().__init__(message)
        self._message = message
        self.worker_id = worker_id
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.index = index
        self.original = original
        #: str() of the original exception, and where it was raised ("worker 0 in fn on
        #: input 7"): what a runner inside a worker passes on, so nesting never wraps twice.
        self._remote_message = remote_message
        self._origin = origin

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> Any:
        # The original exception travels packed by flowplug._exc, which builds on this
        # class (so it is not imported here) and registers its reducer when it is
        # imported, which `import flowplug` always does.
        return WorkerError._reduce(self)

    #: how a WorkerError pickles with its original exception; set by flowplug._exc.
    _reduce: ClassVar[Callable[[WorkerError], Any]]


class WorkerDied(FlowplugError):
    """A worker process ended without reporting an error (a signal, ``os._exit``...).

    :ivar worker_id: index of the worker.
    :ivar pid: its process id.
    :ivar exitcode: its exit code; negative for a signal, as in :mod:`multiprocessing`.
    """

    def __init__(self, message: str, *, worker_id: int, pid: int | None, exitcode: int | None):
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> Any:
        # the keyword-only arguments are not in args: pickle them explicitly
        return (_rebuild_worker_died, (str(self), self.worker_id, self.pid, self.exitcode))


def _rebuild_worker_died(
    message: str, worker_id: int, pid: int | None, exitcode: int | None
) -> WorkerDied:
    return WorkerDied(message, worker_id=worker_id, pid=pid, exitcode=exitcode)


class UnknownLength(FlowplugError, NotImplementedError, TypeError):
    """``len()`` of a runner whose dataflow has no known length.

    A :class:`NotImplementedError`, as tensorpack's ``__len__`` raises, and a
    :class:`TypeError`, so that ``list(runner)`` treats it as "no length hint".
    """


class RunnerTimeout(FlowplugError, TimeoutError):
    """No datapoint arrived within the runner's ``timeout``."""


class ShardMismatch(FlowplugError, RuntimeError):
    """Shard mode: the workers read different passes of a dataflow without ``shard()``.

    Each such worker reads the whole pass and keeps every ``num_workers``-th item, so the
    passes must be equal. The runner checks that they are, and raises this instead of
    delivering an item twice (or leaving one out); the message names the dataflow and the
    fixes. See docs/sharding.md.
    """


class TransportClosed(FlowplugError):
    """The other side of a transport is gone; raised by a sender after ``close()``."""


class DataTooLarge(FlowplugError, ValueError):
    """One datapoint is larger than a transport can ever hold; names the option to raise."""


class StoreFull(FlowplugError, TimeoutError):
    """A shared-memory store had no room for an object within the ``timeout`` of ``put``.

    Room comes back when objects are deleted and the views that the consumer holds on
    them are dropped.
    """


class ObjectNotFound(FlowplugError, LookupError):
    """No object with this id is in the store: it was taken or deleted, or never put."""


class ReplicateWarning(UserWarning):
    """A replicate-mode runner with several workers over a dataflow of known length: every
    worker yields its own copy of the dataflow, so an "epoch" of ``len(df)`` datapoints
    mixes the copies (items repeat, others are missing). Pass ``mode="shard"`` for every
    item once per epoch, or ``mode="replicate"`` explicitly (tensorpack's semantics, for
    infinite or randomised dataflows) and it is not raised; or silence it with
    ``warnings.simplefilter("ignore", fp.ReplicateWarning)``.
    """
