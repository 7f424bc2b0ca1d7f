"""A worker's exception is raised in the consumer as fp.WorkerError *and* as its own type,
with its state and the remote traceback, on every transport, for Runner and ParallelMap;
nested runners pass an error on without wrapping it twice."""

from __future__ import annotations

import pickle
import re
import threading

import pytest

import flowplug as fp
from flowplug import _exc

TRANSPORTS = sorted(fp.available_transports())
TASK_TRANSPORTS = [t for t in TRANSPORTS if fp.get_transport(t).carries_tasks]
PROCESS_TRANSPORTS = [t for t in TRANSPORTS if fp.get_transport(t).crosses_processes]


# Module level, so that they pickle by reference.


class Coded(Exception):
    """An __init__ that pickle cannot call back: ``code`` is a required keyword."""

    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code


class Holding(ValueError):
    """Holds something that cannot be pickled."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()
        self.note = "kept"


class Final(Exception):
    """Refuses subclasses, as a final class does."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError("Final cannot be subclassed")


class Picky(Exception):
    """Its own __new__ accepts only its own class: building the combined type fails."""

    def __new__(cls, *args):
        if cls is not Picky:
            raise TypeError("only Picky")
        return super().__new__(cls, *args)


class Fails(fp.DataFlow):
    """Yields 0, 1, 2, then raises what ``make()`` returns."""

    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 10

    def __iter__(self):
        yield from range(3)
        raise self.make()


def value_error():
    return ValueError("bad record 17")


def key_error():
    return KeyError("no such key")


def not_found():
    return FileNotFoundError(2, "No such file or directory", "/data/x.jpg")


def coded():
    return Coded("quota exceeded", code=429)


def holding():
    return Holding("cannot travel whole")


def raise_value_error_at_5(x):
    if x == 5:
        raise ValueError(f"bad input {x}")
    return x


def raise_coded(x):
    raise Coded(f"input {x}", code=x)


def _run(df_or_map):
    try:
        for _ in df_or_map:
            pass
    finally:
        df_or_map.close()
    raise AssertionError("no error raised")


# ---------------------------------------------------------------------------- matching


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_except_original_type_and_worker_error_both_catch(transport, no_leaks):
    with pytest.raises(ValueError) as info:
        _run(fp.Runner(Fails(value_error), transport=transport, num_workers=1))
    err = info.value
    assert isinstance(err, fp.WorkerError) and isinstance(err, ValueError)
    assert err.exc_type == "ValueError" and err.worker_id == 0 and err.index is None
    assert err.args == ("bad record 17",)  # the original's args, as handlers expect
    assert str(err).startswith("worker 0 raised ValueError while iterating: bad record 17")
    assert "Remote traceback" in str(err) and "bad record 17" in err.remote_traceback
    assert type(err.original) is ValueError and err.original.args == ("bad record 17",)

    with pytest.raises(fp.WorkerError):
        _run(fp.Runner(Fails(value_error), transport=transport, num_workers=1))


@pytest.mark.parametrize("transport", TASK_TRANSPORTS)
def test_parallel_map_errors_match_both_ways(transport, no_leaks):
    items = fp.DataFromList(range(10))
    with pytest.raises(ValueError, match="in fn on input 5: bad input 5") as info:
        _run(fp.ParallelMap(items, raise_value_error_at_5, num_workers=2, transport=transport))
    assert isinstance(info.value, fp.WorkerError) and info.value.index == 5


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_key_error_and_os_error_subclass_keep_their_fields(transport, no_leaks):
    with pytest.raises(KeyError) as info:
        _run(fp.Runner(Fails(key_error), transport=transport, num_workers=1))
    assert isinstance(info.value, LookupError) and info.value.args[0] == "no such key"

    with pytest.raises(FileNotFoundError) as info:
        _run(fp.Runner(Fails(not_found), transport=transport, num_workers=1))
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, fp.WorkerError)
    assert (err.errno, err.strerror, err.filename) == (
        2,
        "No such file or directory",
        "/data/x.jpg",
    )
    assert str(err).startswith("worker 0 raised FileNotFoundError while iterating: [Errno 2]")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_custom_exception_with_required_keyword(transport, no_leaks):
    # pickle.loads would call Coded("quota exceeded") and fail: it is rebuilt without __init__
    with pytest.raises(Coded) as info:
        _run(fp.Runner(Fails(coded), transport=transport, num_workers=1))
    err = info.value
    assert err.code == 429 and err.args == ("quota exceeded",)
    assert isinstance(err.original, Coded) and err.original.code == 429
    if transport in TASK_TRANSPORTS:
        with pytest.raises(Coded) as info:
            _run(fp.ParallelMap(fp.DataFromList([7]), raise_coded, transport=transport))
        assert info.value.code == 7 and info.value.index == 0


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_unpicklable_state_travels_as_repr(transport, no_leaks):
    with pytest.raises(Holding) as info:
        _run(fp.Runner(Fails(holding), transport=transport, num_workers=1))
    err = info.value
    assert err.note == "kept" and err.args == ("cannot travel whole",)
    assert isinstance(err.lock, str) and "unpicklable lock" in err.lock


def local_class_error():
    class Local(ValueError):  # its class cannot be pickled: it cannot be rebuilt elsewhere
        pass

    return Local("from a local class")


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_unpicklable_class_gives_plain_worker_error(transport, no_leaks):
    with pytest.raises(fp.WorkerError, match="raised Local while iterating") as info:
        _run(fp.Runner(Fails(local_class_error), transport=transport, num_workers=1))
    err = info.value
    assert type(err) is fp.WorkerError and err.original is None and err.exc_type == "Local"
    assert "from a local class" in str(err) and "from a local class" in err.remote_traceback


def test_between_threads_the_live_exception_is_used(no_leaks):
    with pytest.raises(ValueError) as info:  # even a local class: nothing is pickled
        _run(fp.Runner(Fails(local_class_error), transport="thread", num_workers=1))
    assert type(info.value.original).__name__ == "Local"
    assert info.value.original.__traceback__ is None  # the worker's frames are let go


def system_exit():
    return SystemExit(3)


def test_system_exit_stays_a_plain_worker_error(no_leaks):
    # a worker's SystemExit must not end the consumer
    with pytest.raises(fp.WorkerError, match="SystemExit") as info:
        _run(fp.Runner(Fails(system_exit), transport="thread", num_workers=1))
    assert not isinstance(info.value, SystemExit)
    assert isinstance(info.value.original, SystemExit)


# ---------------------------------------------------------------------------- the combined types


def test_combined_type_is_made_once_per_type():
    assert _exc.combined_type(ValueError) is _exc.combined_type(ValueError)
    cls = _exc.combined_type(KeyError)
    assert issubclass(cls, fp.WorkerError) and issubclass(cls, KeyError)
    assert cls.__name__ == "WorkerError[KeyError]"


@pytest.mark.parametrize(
    "exc_type",
    [Final, Picky, StopIteration, KeyboardInterrupt, SystemExit, fp.WorkerError],
    ids=lambda t: t.__name__,
)
def test_types_that_cannot_be_combined_give_plain_worker_error(exc_type):
    if exc_type is fp.WorkerError:
        original = fp.WorkerError("inner", worker_id=1, exc_type="X", remote_traceback="")
    else:
        original = exc_type("why")
    plain = fp.WorkerError(
        "worker 0 raised ...",
        worker_id=0,
        exc_type=exc_type.__name__,
        remote_traceback="tb",
        original=original,
    )
    err = _exc.combine(original, plain)
    assert type(err) is fp.WorkerError and str(err) == "worker 0 raised ..."
    assert err.original is original


@pytest.mark.parametrize("make", [value_error, not_found, coded, holding, system_exit])
def test_worker_errors_pickle(make):
    original = make()
    original = _exc.unpack(_exc.pack(original))
    plain = fp.WorkerError(
        "worker 2 raised it",
        worker_id=2,
        exc_type=type(original).__name__,
        remote_traceback="Traceback...",
        index=4,
        original=original,
    )
    err = _exc.combine(original, plain)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and str(copy) == str(err) and copy.args == err.args
    assert (copy.worker_id, copy.index, copy.remote_traceback) == (2, 4, "Traceback...")


def test_worker_died_pickles():
    died = fp.WorkerDied("worker 1 died", worker_id=1, pid=42, exitcode=-9)
    copy = pickle.loads(pickle.dumps(died))
    assert (str(copy), copy.worker_id, copy.pid, copy.exitcode) == ("worker 1 died", 1, 42, -9)


# ---------------------------------------------------------------------------- nesting


def map_in_worker():
    # inside a worker process a map runs threads (worker processes have no children)
    return fp.ParallelMap(
        fp.DataFromList(range(10)), raise_value_error_at_5, num_workers=2, transport="thread"
    )


def runner_in_worker():
    return fp.Runner(Fails(value_error), transport="thread", num_workers=1)


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_map_inside_a_runner_does_not_wrap_twice(transport, no_leaks):
    with pytest.raises(ValueError) as info:
        _run(fp.Runner(map_in_worker, transport=transport, num_workers=1))
    err = info.value
    assert re.fullmatch(
        "worker 0 raised ValueError while iterating, passed on from its own worker [01] "
        "in fn on input 5: bad input 5",
        str(err).splitlines()[0],
    )
    assert "WorkerError" not in str(err) and str(err).count("Remote traceback") == 1
    assert "raise ValueError" in err.remote_traceback  # the innermost traceback
    assert type(err.original) is ValueError


@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_runner_inside_a_runner_does_not_wrap_twice(transport, no_leaks):
    with pytest.raises(ValueError) as info:
        _run(fp.Runner(runner_in_worker, transport=transport, num_workers=1))
    first = str(info.value).splitlines()[0]
    assert first == (
        "worker 0 raised ValueError while iterating, passed on from its own worker 0 "
        "while iterating: bad record 17"
    )
    assert "WorkerError" not in str(info.value)
