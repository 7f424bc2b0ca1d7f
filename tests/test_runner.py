"""Runner behaviour beyond the transport contract: arguments, start methods, factories."""

import os
import signal
import threading

import numpy as np
import pytest

import flowplug as fp
from flowplug.testing.contract import Counting


class Unpicklable(fp.DataFlow):
    def __init__(self):
        self.lock = threading.Lock()

    def __iter__(self):
        yield 1


def test_unknown_transport_lists_available_and_suggests():
    with pytest.raises(fp.TransportNotFound) as info:
        fp.Runner(Counting(3), transport="zmqq")
    msg = str(info.value)
    assert "'zmqq'" in msg and "Did you mean 'zmq'?" in msg
    for name in fp.available_transports():
        assert name in msg
    assert isinstance(info.value, LookupError)


def test_unknown_option_is_an_error_with_a_suggestion():
    with pytest.raises(fp.ConfigError, match=r"'hmw'.*accepts: .*hwm.*Did you mean 'hwm'"):
        fp.Runner(Counting(3), transport="zmq", hmw=10)


def test_option_of_wrong_type_is_an_error():
    with pytest.raises(fp.ConfigError, match=r"hwm = 'lots'.*'hwm' of transport 'zmq' must be int"):
        fp.Runner(Counting(3), transport="zmq", hwm="lots")


@pytest.mark.parametrize("bad", [{"num_workers": 0}, {"capacity": -1}, {"timeout": 0}])
def test_bad_settings_are_errors(bad):
    with pytest.raises(fp.ConfigError, match=next(iter(bad))):
        fp.Runner(Counting(3), transport="zmq", **bad)


def test_bad_start_method_suggests():
    with pytest.raises(fp.ConfigError, match="Did you mean 'spawn'"):
        fp.Runner(Counting(3), transport="zmq", start_method="spwan")


def test_start_method_makes_no_sense_for_threads():
    with pytest.raises(fp.ConfigError, match="threads"):
        fp.Runner(Counting(3), transport="thread", start_method="spawn")


def test_consumer_sigterm_handler_does_not_run_in_workers(no_leaks, tmp_path):
    """stop() terminates the workers; a SIGTERM handler they inherited by fork must not
    run there (it would also keep them alive until the kill step)."""
    ran = tmp_path / "ran"

    def handler(signum, frame):
        with open(ran, "a") as f:
            f.write(f"{os.getpid()}\n")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with fp.Runner(Counting(10**6), transport="zmq", num_workers=2, mode="replicate") as runner:
            next(iter(runner))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not ran.exists(), ran.read_text()


def test_plain_iterable_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match="DataFromList"):
        fp.Runner([1, 2, 3], transport="zmq")


@pytest.fixture
def mp_helpers_running():
    """spawn and forkserver start long-lived helper processes on first use; start them
    before the leak check takes its snapshot."""
    from multiprocessing import forkserver, resource_tracker

    forkserver.ensure_running()
    resource_tracker.ensure_running()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("transport", ["queue", "zmq"])
def test_other_start_methods(transport, method, mp_helpers_running, no_leaks):
    with fp.Runner(Counting(20), transport=transport, start_method=method) as runner:
        assert list(runner) == list(range(20))


def test_unpicklable_dataflow_under_spawn_names_it(no_leaks):
    runner = fp.Runner(Unpicklable(), transport="zmq", start_method="spawn")
    with pytest.raises(fp.StateError, match=r"pickle the dataflow.*Unpicklable.*lock"):
        runner.reset_state()
    runner.close()


def test_workers_get_different_numpy_streams(no_leaks):
    class Draw(fp.DataFlow):
        def __iter__(self):
            yield (fp.worker_info().id, float(np.random.random()))

    with fp.Runner(Draw(), transport="zmq", num_workers=2) as runner:
        first = {}
        for wid, x in runner:
            first.setdefault(wid, x)
            if len(first) == 2:
                break
    assert first[0] != first[1]


def test_same_seed_same_streams(no_leaks):
    class Draw(fp.DataFlow):
        def __len__(self):
            return 5

        def __iter__(self):
            for _ in range(5):
                yield float(np.random.random())

    runs = []
    for _ in range(2):
        with fp.Runner(Draw(), transport="queue", seed=1234) as runner:
            runs.append(list(runner))
    assert runs[0] == runs[1]


def test_numpy_random_imported_in_the_worker_is_seeded(run_python, tmp_path):
    # numpy imported, numpy.random not (numpy loads it lazily): the worker seeds it when
    # the dataflow first imports it, not at its start, and the stream is the seeded one.
    result = run_python(
        """
        import sys
        import numpy
        import flowplug as fp

        class Draw(fp.DataFlow):
            def __iter__(self):
                loaded = "numpy.random" in sys.modules
                import numpy.random
                hooks = [type(f).__name__ for f in sys.meta_path if "Seed" in type(f).__name__]
                yield loaded, numpy.random.random(), hooks, type(numpy.random.__loader__).__name__

        with fp.Runner(Draw(), transport="queue", seed=1234) as runner:
            loaded, x, hooks, loader = next(iter(runner))
        assert "numpy.random" not in sys.modules  # the test tests the lazy case
        print(loaded, x == numpy.random.RandomState(1234).random_sample(), hooks, loader)
        """,
        None,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "[]", "SourceFileLoader"]


def test_runner_repr_shows_state():
    runner = fp.Runner(Counting(3), transport="thread")
    assert "new" in repr(runner)
    runner.close()
    assert "closed" in repr(runner)
