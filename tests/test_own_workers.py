"""A transport that runs its own workers (``runs_workers``): the Runner still owns the rest."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import queue
import threading
from typing import Any, ClassVar

import pytest

import flowplug as fp
from flowplug.plugins import PluginInfo, get_registry
from flowplug.testing.contract import Counting, RaiseAfter
from flowplug.worker_loop import run_worker


class QueueSender(fp.Sender):
    def __init__(self, q: queue.Queue, stop: threading.Event):
        self.q = q
        self.stop = stop

    def send(self, obj: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(obj, timeout=0.05)
                return
            except queue.Full:
                pass
        raise fp.TransportClosed("closed")


class QueueEndpoint(fp.Endpoint):
    def __init__(self, q: queue.Queue, stop: threading.Event):
        self.q = q
        self.stop = stop

    def connect(self, worker_id: int) -> QueueSender:
        return QueueSender(self.q, self.stop)


class ElsewhereWorkers(fp.WorkerGroup):
    """Stands for workers on another machine: threads here, started by the transport."""

    def __init__(self, dfs, endpoint, infos, log):
        self.death = None
        self.stop_event = endpoint.stop
        self.log = log
        self.threads = [
            threading.Thread(target=run_worker, args=(df, endpoint, info, self.stop_event))
            for df, info in zip(dfs, infos, strict=True)
        ]

    def start(self) -> None:
        self.log.append("start")
        for t in self.threads:
            t.start()

    def alive(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def stop(self, timeout: float = 2.0) -> None:
        self.log.append("stop")
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)


class ElsewhereTransport(fp.OwnWorkersTransport):
    name = "elsewhere"
    crosses_processes = False
    #: what happened, in order, for the tests to check.
    log: ClassVar[list[str]] = []
    #: set to make recv() report that worker 0's machine is gone.
    lose_node = False

    def open(self) -> QueueEndpoint:
        self.log.append("open")
        self.q: queue.Queue = queue.Queue(self.capacity)
        self.endpoint = QueueEndpoint(self.q, threading.Event())
        return self.endpoint

    def make_workers(self, dfs, endpoint, infos) -> ElsewhereWorkers:
        assert endpoint is self.endpoint and len(dfs) == len(infos) == self.num_workers
        self.log.append("make_workers")
        self.group = ElsewhereWorkers(dfs, endpoint, infos, self.log)
        return self.group

    def recv(self, timeout: float) -> Any:
        if self.lose_node:
            self.group.death = fp.Death(0, None, None, "its node stopped answering")
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return fp.EMPTY

    def close(self) -> None:
        self.log.append("close")


@pytest.fixture
def elsewhere():
    ElsewhereTransport.log = []
    ElsewhereTransport.lose_node = False
    get_registry().register(ElsewhereTransport, origin=PluginInfo("tests", "tests", "0"))
    return ElsewhereTransport  # the registry is reloaded after each test (conftest)


def test_the_runner_starts_and_stops_the_transports_workers(elsewhere, no_leaks):
    with fp.Runner(
        Counting(10, tag=True), transport="elsewhere", num_workers=2, mode="replicate"
    ) as runner:
        for _ in range(3):
            got = list(runner)
            assert len(got) == 10 and {i for _, i in got} <= set(range(10))
            assert {w for w, _ in got} <= {0, 1}
    assert elsewhere.log == ["open", "make_workers", "start", "stop", "close"]


def test_errors_of_such_workers_are_worker_errors(elsewhere, no_leaks):
    runner = fp.Runner(RaiseAfter(2), transport="elsewhere")
    with pytest.raises(fp.WorkerError, match="boom after 2"):
        for _ in range(5):
            list(runner)
    runner.close()


def test_a_death_the_group_reports_is_worker_died(elsewhere, no_leaks):
    elsewhere.lose_node = True
    with fp.Runner(Counting(10), transport="elsewhere") as runner:
        with pytest.raises(fp.WorkerDied) as info:
            # What was sent before the death is delivered first (it may end an epoch).
            for _ in range(100):
                list(runner)
    err = info.value
    assert err.worker_id == 0 and err.exitcode is None
    assert "unknown exit status (its node stopped answering)" in str(err)
    assert elsewhere.log[-2:] == ["stop", "close"]


def test_start_method_is_refused_for_such_transports(elsewhere):
    with pytest.raises(fp.ConfigError, match="starts its own workers"):
        fp.Runner(Counting(3), transport="elsewhere", start_method="fork")


def test_the_default_transport_does_not_run_workers():
    assert not fp.Transport.runs_workers
    assert fp.OwnWorkersTransport.runs_workers
    zmq = fp.get_transport("zmq")
    assert not zmq.runs_workers and not issubclass(zmq, fp.OwnWorkersTransport)
    assert not hasattr(zmq, "make_workers")


# ---------------------------------------------------------------------------- shard mode


def test_shard_mode_is_refused_when_the_group_cannot_carry_the_control(elsewhere, no_leaks):
    runner = fp.Runner(Counting(10), transport="elsewhere", num_workers=2, mode="shard")
    with pytest.raises(fp.ConfigError, match=r"ElsewhereWorkers\) cannot carry .*mode='shard'"):
        runner.reset_state()
    assert elsewhere.log == ["open", "make_workers", "close"]  # nothing was started
    runner.close()


def test_a_group_returning_the_wrong_number_of_sinks_is_a_plugin_error(elsewhere, monkeypatch):
    monkeypatch.setattr(ElsewhereWorkers, "control_sinks", lambda self, credits: [], raising=False)
    runner = fp.Runner(Counting(10), transport="elsewhere", num_workers=2, mode="shard")
    with pytest.raises(fp.PluginError, match="returned 0 sinks for 2 workers"):
        runner.reset_state()
    runner.close()


class PipeSender(fp.Sender):
    def __init__(self, conn: Any):
        self.conn = conn

    def send(self, obj: Any) -> None:
        self.conn.send(obj)


class PipesEndpoint(fp.Endpoint):
    def __init__(self, writers: list[Any]):
        self.writers = writers

    def connect(self, worker_id: int) -> PipeSender:
        return PipeSender(self.writers[worker_id])


class Forward(fp.ControlSink):
    """Stands for a sink whose calls cross a network: credits go back in batches."""

    def __init__(self, target: fp.ControlSink, batch: int):
        self.target = target
        self.batch = batch
        self.held = 0

    def start_epoch(self, epoch: int) -> None:
        self.flush()
        self.target.start_epoch(epoch)

    def release(self) -> None:
        self.held += 1
        if self.held >= self.batch:
            self.flush()

    def flush(self) -> None:
        for _ in range(self.held):
            self.target.release()
        self.held = 0


class HostedWorkers(fp.WorkerGroup):
    """Stands for one host per worker (a Ray actor): each runs a ProcessWorkers for its
    worker, and the consumer's control reaches it through a :class:`Forward`."""

    def __init__(self, dfs, endpoint, infos):
        self.death = None
        self.hosts = [
            fp.ProcessWorkers([df], endpoint, [info], "fork")
            for df, info in zip(dfs, infos, strict=True)
        ]
        self.sinks: list[Forward] = []

    def control_sinks(self, credits: int) -> list[Forward]:
        self.sinks = [
            Forward(host.control_sinks(credits)[0], max(1, credits // 2)) for host in self.hosts
        ]
        return self.sinks

    def start(self) -> None:
        for host in self.hosts:
            host.start()

    def alive(self) -> int:
        return sum(host.alive() for host in self.hosts)

    def stop(self, timeout: float = 2.0) -> None:
        for host in self.hosts:
            host.stop(timeout)


class HostedTransport(fp.OwnWorkersTransport):
    name = "hosted"

    def open(self) -> PipesEndpoint:
        pipes = [
            multiprocessing.get_context("fork").Pipe(duplex=False) for _ in range(self.num_workers)
        ]
        self.readers = [r for r, _ in pipes]
        self.writers = [w for _, w in pipes]
        return PipesEndpoint(self.writers)

    def make_workers(self, dfs, endpoint, infos) -> HostedWorkers:
        self.group = HostedWorkers(dfs, endpoint, infos)
        return self.group

    def recv(self, timeout: float) -> Any:
        for sink in self.group.sinks:
            sink.flush()  # the consumer is about to wait: send the credits it holds
        ready = multiprocessing.connection.wait(self.readers, timeout)
        return ready[0].recv() if ready else fp.EMPTY

    def close(self) -> None:
        for conn in self.readers + self.writers:
            conn.close()
        self.readers = self.writers = []


@pytest.mark.parametrize("ordered", [False, True])
def test_shard_mode_through_a_group_that_carries_the_control(no_leaks, ordered):
    get_registry().register(HostedTransport, origin=PluginInfo("tests", "tests", "0"))
    items = list(range(60))
    with fp.Runner(
        fp.DataFromList(items),
        transport="hosted",
        num_workers=2,
        capacity=8,
        mode="shard",
        ordered=ordered,
        timeout=30,
    ) as runner:
        for epoch in range(4):
            if epoch == 1:  # broken off early: the next epoch is still whole
                it = iter(runner)
                next(it)
                it.close()
                continue
            got = list(runner)
            assert (got if ordered else sorted(got)) == items
