"""A worker's exception, carried to the consumer so that it still matches both ways.

In the worker, :func:`pack` turns the exception into bytes that unpickle anywhere the
exception's class can be imported (never raising: None when even the recipe fails). In the
consumer, :func:`unpack` rebuilds it, and :func:`combine` makes the exception the consumer
raises: an instance of :class:`~flowplug.WorkerError` *and* of the original type, carrying
the original's state, where that type allows it (see :func:`combined_type`).

Nothing here runs on the hot path: only when a worker failed.
"""

from __future__ import annotations

import pickle
import threading
import types
from typing import Any

from .errors import WorkerError

#: pickle protocol of the packed exceptions (the transports pickle with 5 as well).
_PROTOCOL = 5

#: attributes of exception objects that are not their state, or are set elsewhere.
_NOT_STATE = frozenset(
    {
        "__dict__",
        "__weakref__",
        "args",
        "__traceback__",
        "__context__",
        "__cause__",
        "__suppress_context__",
        "__class__",
    }
)

# ---------------------------------------------------------------------------- worker side


def pack(exc: BaseException) -> bytes | None:
    """Return bytes that :func:`unpack` turns back into (a copy of) ``exc``, or None.

    First choice: ``exc`` pickled as it is, if it also unpickles here (its ``__init__``
    may not accept what pickle passes it: ``__init__(self, msg, *, code)``). Otherwise a
    recipe: its class by reference, its ``args`` and its attributes, rebuilt without
    calling ``__init__``; what of those cannot be pickled travels as its ``repr()``. None
    when not even the class can be pickled (a class defined inside a function).
    """
    try:
        blob = pickle.dumps(exc, protocol=_PROTOCOL)
        if type(pickle.loads(blob)) is type(exc):
            return blob
    except Exception:
        pass
    try:
        recipe = _Recipe(
            type(exc),
            tuple(_picklable(a) for a in exc.args),
            {k: _picklable(v) for k, v in _state(exc).items()},
        )
        return pickle.dumps(recipe, protocol=_PROTOCOL)
    except Exception:
        return None


def _picklable(value: Any) -> Any:
    try:
        pickle.dumps(value, protocol=_PROTOCOL)
        return value
    except Exception:
        try:
            return f"<unpicklable {type(value).__name__}: {value!r}>"
        except Exception:
            return f"<unpicklable {type(value).__name__}>"


def _state(exc: BaseException) -> dict[str, Any]:
    """The attributes of ``exc``: its ``__dict__``, slots and C-level fields (errno...)."""
    state: dict[str, Any] = {}
    for klass in reversed(type(exc).__mro__):
        for name, attr in vars(klass).items():
            if name in _NOT_STATE:
                continue
            if isinstance(attr, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                try:
                    state[name] = getattr(exc, name)
                except AttributeError:
                    pass  # an unset slot, or characters_written of an OSError
    state.update(getattr(exc, "__dict__", {}))
    return state


class _Recipe:
    """An exception rebuilt from class, args and attributes, without its ``__init__``."""

    def __init__(self, cls: type, args: tuple[Any, ...], state: dict[str, Any]):
        self.cls = cls
        self.args = args
        self.state = state

    def build(self) -> BaseException:
        exc = self.cls.__new__(self.cls, *self.args)
        exc.args = self.args
        _set_state(exc, self.state)
        return exc


def _set_state(exc: BaseException, state: dict[str, Any]) -> None:
    for name, value in state.items():
        try:
            setattr(exc, name, value)
        except (AttributeError, TypeError):
            pass  # a read-only field: the closest copy is all we promise


# ---------------------------------------------------------------------------- consumer side


def unpack(blob: bytes | None) -> BaseException | None:
    """Rebuild what :func:`pack` made; None when that is impossible here (the class does
    not import in this process, say)."""
    if blob is None:
        return None
    try:
        obj = pickle.loads(blob)
        if isinstance(obj, _Recipe):
            obj = obj.build()
    except Exception:
        return None
    return obj if isinstance(obj, BaseException) else None


_combined: dict[type, type | None] = {}
_combined_lock = threading.Lock()


def combined_type(cls: type) -> type | None:
    """The subclass of both :class:`~flowplug.WorkerError` and ``cls``, made once per type.

    None where the two cannot or must not be combined:

    - ``cls`` is not an :class:`Exception`: a ``SystemExit`` or ``KeyboardInterrupt`` from a
      worker must not end or interrupt the consumer (it stays a plain ``WorkerError``);
    - ``StopIteration`` and ``StopAsyncIteration``, which a generator may not raise (the
      runner is one: Python would turn it into a ``RuntimeError``);
    - ``cls`` is already a ``WorkerError``;
    - the type refuses: final classes, conflicting layouts or metaclasses, an
      ``__init_subclass__`` that raises.
    """
    try:
        return _combined[cls]
    except KeyError:
        pass
    with _combined_lock:
        if cls in _combined:
            return _combined[cls]
        made: type | None = None
        if (
            isinstance(cls, type)
            and issubclass(cls, Exception)
            and not issubclass(cls, (StopIteration, StopAsyncIteration, WorkerError))
        ):
            qualified = cls.__qualname__
            if cls.__module__ not in ("builtins", "__main__"):
                qualified = f"{cls.__module__}.{qualified}"
            name = f"WorkerError[{qualified}]"

            def body(ns: dict[str, Any]) -> None:
                ns["__module__"] = WorkerError.__module__
                ns["__qualname__"] = name
                ns["__doc__"] = (
                    f"A worker's {qualified}, raised in the consumer: an instance of both "
                    f"flowplug.WorkerError and {qualified}."
                )

            try:
                made = types.new_class(name, (WorkerError, cls), {}, body)
            except Exception:
                made = None
        _combined[cls] = made
        return made


def combine(original: BaseException | None, plain: WorkerError) -> WorkerError:
    """The exception the consumer raises for a worker's ``original``, given the
    ``plain`` WorkerError that reports it (``plain.original`` is ``original``).

    An instance of ``WorkerError`` and of ``type(original)`` holding the original's ``args``
    and attributes, with ``plain``'s fields set on top, when :func:`combined_type` allows
    it and building it works; ``plain`` otherwise. Either way ``str()`` is ``plain``'s.
    """
    cls = combined_type(type(original)) if original is not None else None
    if cls is not None:
        assert original is not None
        try:
            err = cls.__new__(cls, *original.args)
            err.args = original.args
            _set_state(err, _state(original))
            # WorkerError's own fields win over attributes of the same name; the
            # original keeps its own (``err.original.index``). Set one by one, as
            # __init__ would (made by __new__, err never ran WorkerError.__init__).
            for name, value in vars(plain).items():
                setattr(err, name, value)
            return err
        except Exception:
            pass  # e.g. a __new__ that wants other arguments: a plain WorkerError then
    return plain


# ---------------------------------------------------------------------------- pickling
# A WorkerError travels (a nested runner's error, passed on) with its original packed.
# Here rather than in errors.py: this module builds on WorkerError, so errors.py cannot
# import it; it registers the reducer on the class instead.


def _reduce_worker_error(err: WorkerError) -> Any:
    return (
        _rebuild_worker_error,
        (
            err._message,
            err.worker_id,
            err.exc_type,
            err.remote_traceback,
            err.index,
            pack(err.original) if err.original is not None else None,
            err._remote_message,
            err._origin,
        ),
    )


def _rebuild_worker_error(
    message: str,
    worker_id: int,
    exc_type: str,
    remote_traceback: str,
    index: int | None,
    packed: bytes | None,
    remote_message: str,
    origin: str,
) -> WorkerError:
    original = unpack(packed)
    plain = WorkerError(
        message,
        worker_id=worker_id,
        exc_type=exc_type,
        remote_traceback=remote_traceback,
        index=index,
        original=original,
        remote_message=remote_message,
        origin=origin,
    )
    return combine(original, plain)


WorkerError._reduce = staticmethod(_reduce_worker_error)
