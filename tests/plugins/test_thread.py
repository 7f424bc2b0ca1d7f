"""The thread transport: each worker its own dataflow and share of capacity; close wakes."""

import threading

import pytest

import flowplug as fp
from flowplug.testing.contract import Counting


class PerThreadState(fp.DataFlow):
    """Counts its own iterations; sharing one instance between threads would mix counts."""

    def __init__(self):
        self.made_in = None

    def __len__(self):
        return 3

    def reset_state(self):
        self.made_in = threading.get_ident()

    def __iter__(self):
        for i in range(3):
            assert self.made_in == threading.get_ident()
            yield i


class Unpicklable(fp.DataFlow):
    def __init__(self):
        self.lock = threading.Lock()

    def __iter__(self):
        yield 1


def test_thread_workers_get_their_own_copy(no_leaks):
    with fp.Runner(PerThreadState(), transport="thread", num_workers=3, mode="replicate") as runner:
        for _ in range(5):
            assert sorted(runner) == [0, 1, 2]


def test_thread_workers_from_a_factory(no_leaks):
    made = []

    def factory():
        df = PerThreadState()
        made.append(df)
        return df

    with fp.Runner(factory, transport="thread", num_workers=2, mode="replicate") as runner:
        assert len(runner) == 3
        assert len(list(runner)) == 3
    assert len(made) == 2 and made[0] is not made[1]


def test_uncopyable_dataflow_for_threads_suggests_a_factory(no_leaks):
    runner = fp.Runner(Unpicklable(), transport="thread", num_workers=2)
    with pytest.raises(TypeError, match="factory"):
        runner.reset_state()
    runner.close()


def _transport(capacity, num_workers):
    cls = fp.get_transport("thread")
    return cls(capacity=capacity, num_workers=num_workers, run_id="test-thread")


def test_each_worker_has_its_own_share_of_capacity():
    transport = _transport(capacity=4, num_workers=2)
    connect = transport.open()
    first, second = connect(0), connect(1)
    for i in range(2):
        first.send(("first", i))  # its whole share
    done = threading.Event()
    threading.Thread(target=lambda: (second.send(("second", 0)), done.set())).start()
    assert done.wait(5), "a worker's full share blocked another worker"
    assert {transport.recv(1.0) for _ in range(3)} == {("first", 0), ("first", 1), ("second", 0)}
    transport.close()


def test_close_wakes_a_sender_blocked_on_a_full_transport():
    transport = _transport(capacity=1, num_workers=1)
    sender = transport.open()(0)
    sender.send("fills the share")
    raised = []

    def blocked():
        try:
            sender.send("waits for room")
        except fp.TransportClosed as exc:
            raised.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()
    transport.close()
    thread.join(5)
    assert not thread.is_alive() and len(raised) == 1


def test_a_thread_runner_repeats_epochs(no_leaks):
    with fp.Runner(
        Counting(10, tag=True), transport="thread", num_workers=2, mode="replicate"
    ) as runner:
        for _ in range(3):
            got = list(runner)
            assert len(got) == 10 and {w for w, _ in got} <= {0, 1}
