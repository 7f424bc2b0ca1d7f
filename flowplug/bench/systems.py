"""The systems under test: flowplug's transports, the peers, and the memcpy limit.

Each system opens a *stream*: a context manager that starts its workers on a
:class:`~flowplug.bench.payloads.Repeat` dataflow and yields an iterator over what the
consumer receives. Peers are imported only inside the subprocess that measures them, so
a missing peer costs nothing and is reported as "not installed".
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import pickle
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from .payloads import Repeat, make

#: how many datapoints every system may buffer (flowplug's default capacity, tensorpack's
#: default hwm); torch keeps its own default (prefetch_factor=2 per worker), as users get it.
CAPACITY = 50


@dataclass(frozen=True)
class System:
    """One row kind of the table."""

    #: short name shown in the table, e.g. ``"flowplug zmq"``, ``"tp MultiProcessRunnerZMQ"``.
    name: str
    #: ``"flowplug"``, ``"peer"`` or ``"limit"``.
    kind: str
    #: modules that must import for this system to run (checked in the parent, cheaply).
    requires: tuple[str, ...] = ()
    #: how to install what is missing.
    install: str = ""
    #: true when the workers are threads of the consumer.
    threads: bool = False

    def missing(self) -> str | None:
        """Return what is not installed, or None."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} not installed ({self.install})"
        return None


TP_INSTALL = (
    "pip install --no-deps tensorpack==0.11 && "
    "pip install msgpack msgpack-numpy psutil tabulate termcolor tqdm six"
)
TP_REQUIRES = ("tensorpack", "msgpack", "msgpack_numpy", "tabulate", "termcolor", "six", "tqdm")

PEERS: dict[str, System] = {
    "tp-queue": System("tp MultiProcessRunner", "peer", TP_REQUIRES, TP_INSTALL),
    "tp-zmq": System("tp MultiProcessRunnerZMQ", "peer", TP_REQUIRES, TP_INSTALL),
    "tp-thread": System("tp MultiThreadRunner", "peer", TP_REQUIRES, TP_INSTALL, threads=True),
    "torch": System("torch DataLoader", "peer", ("torch",), "pip install torch==2.13.0"),
    "pyzmq": System("pyzmq PUSH/PULL pickle5", "peer", ("zmq",), "pip install pyzmq"),
}
MEMCPY = System("memcpy (np.copyto, 1 core)", "limit")


def flowplug_system(transport: str) -> System:
    import flowplug

    cls = flowplug.get_transport(transport)
    return System(f"flowplug {transport}", "flowplug", threads=not cls.crosses_processes)


#: the tensorpack runner each built-in transport replaces (the same medium).
COUNTERPARTS = {"queue": "tp-queue", "zmq": "tp-zmq", "thread": "tp-thread"}


def counterpart(key: str) -> str | None:
    """The tensorpack runner a flowplug transport competes with (None for peers).

    A transport not in :data:`COUNTERPARTS` (``shm``, a third party's) faces
    ``MultiThreadRunner`` when its workers are threads, else tensorpack's fastest,
    ``MultiProcessRunnerZMQ``.
    """
    if not key.startswith("fp-"):
        return None
    transport = key[3:]
    if transport in COUNTERPARTS:
        return COUNTERPARTS[transport]
    return "tp-thread" if flowplug_system(transport).threads else "tp-zmq"


# ---------------------------------------------------------------------------- streams


#: the runner's verdict (``runner.stats().summary()``) per flowplug system measured in
#: this process (one row per child process): what ``flowplug bench`` prints below the table.
VERDICTS: dict[str, str] = {}


def open_stream(key: str, payload: str, workers: int) -> AbstractContextManager[Iterator[Any]]:
    """Start system ``key`` (``fp-<transport>`` or a :data:`PEERS` key) on ``payload``."""
    if key.startswith("fp-"):
        return _flowplug(key[3:], payload, workers)
    return {
        "tp-queue": _tp_queue,
        "tp-zmq": _tp_zmq,
        "tp-thread": _tp_thread,
        "torch": _torch,
        "pyzmq": _pyzmq,
    }[key](payload, workers)


@contextmanager
def _flowplug(transport: str, payload: str, workers: int) -> Iterator[Iterator[Any]]:
    import flowplug

    runner = flowplug.Runner(Repeat(payload), transport=transport, num_workers=workers)
    try:
        yield iter(runner)
        VERDICTS[f"fp-{transport}"] = runner.stats().summary()
    finally:
        runner.close()


def _tp_dataflow(payload: str) -> Any:
    from tensorpack.dataflow import DataFlow

    class TPRepeat(DataFlow):  # MultiThreadRunner insists on its own base class
        def __init__(self) -> None:
            self._flow = Repeat(payload)

        def reset_state(self) -> None:
            self._flow.reset_state()

        def __iter__(self) -> Iterator[Any]:
            return iter(self._flow)

    return TPRepeat()


def _tp_close(runner: Any) -> None:
    procs = getattr(runner, "procs", None) or getattr(runner, "_procs", None) or []
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(5)


@contextmanager
def _tp_queue(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    from tensorpack.dataflow import MultiProcessRunner

    runner = MultiProcessRunner(_tp_dataflow(payload), num_prefetch=CAPACITY, num_proc=workers)
    runner.reset_state()
    try:
        yield iter(runner)
    finally:
        _tp_close(runner)


@contextmanager
def _tp_zmq(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    from tensorpack.dataflow import MultiProcessRunnerZMQ

    runner = MultiProcessRunnerZMQ(_tp_dataflow(payload), num_proc=workers, hwm=CAPACITY)
    runner.reset_state()
    try:
        yield iter(runner)
    finally:
        _tp_close(runner)
        runner.socket.close(0)
        runner.context.destroy(0)


@contextmanager
def _tp_thread(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    from tensorpack.dataflow import MultiThreadRunner

    runner = MultiThreadRunner(
        lambda: _tp_dataflow(payload), num_prefetch=CAPACITY, num_thread=workers
    )
    runner.reset_state()
    try:
        yield iter(runner)
    finally:
        for thread in runner.threads:
            thread.stop()
        while not runner.queue.empty():  # unblock a thread waiting on a full queue
            runner.queue.get_nowait()


@contextmanager
def _torch(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    import torch.utils.data

    class TorchRepeat(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[Any]:
            flow = Repeat(payload)
            flow.reset_state()
            return iter(flow)

    loader = torch.utils.data.DataLoader(TorchRepeat(), batch_size=None, num_workers=workers)
    it = iter(loader)
    try:
        yield it
    finally:
        it._shutdown_workers()  # what its __del__ does, but now


def _pyzmq_worker(address: str, payload: str) -> None:
    import zmq

    obj = make(payload)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = CAPACITY
    sock.connect(address)
    while True:
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        sock.send_multipart([stream, *buffers], copy=False)


@contextmanager
def _pyzmq(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    """The floor of what a hand-written pyzmq loop does: no framing, no error handling."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = CAPACITY
    address = f"ipc://@flowplug-bench-{os.getpid()}-{secrets.token_hex(4)}"
    sock.bind(address)
    fork = mp.get_context("fork")
    procs = [
        fork.Process(target=_pyzmq_worker, args=(address, payload), daemon=True)
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()

    def items() -> Iterator[Any]:
        recv = sock.recv_multipart
        loads = pickle.loads
        while True:
            frames = recv(copy=False)
            yield loads(frames[0], buffers=frames[1:])

    try:
        yield items()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
        sock.close(0)
        ctx.term()
