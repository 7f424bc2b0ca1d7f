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
    "shm-ring": System("raw shm ring (16 slots, 2 pipes)", "limit"),
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


#: what each system imports: :func:`preload` imports it before its startup is timed.
IMPORTS = {
    "tp-queue": ("tensorpack.dataflow",),
    "tp-zmq": ("tensorpack.dataflow",),
    "tp-thread": ("tensorpack.dataflow",),
    "torch": ("torch.utils.data",),
    "pyzmq": ("zmq",),
    "shm-ring": ("mmap",),
}


def preload(key: str) -> None:
    """Import what system ``key`` needs, so that its startup counts no imports (flowplug's
    plugins are not imported here: loading them is part of its first Runner's startup)."""
    for module in ("flowplug.runner",) if key.startswith("fp-") else IMPORTS[key]:
        importlib.import_module(module)


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
        "shm-ring": _shm_ring,
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
    it: Any = iter(loader)  # torch's multiprocessing iterator (_shutdown_workers below)
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
            yield loads(frames[0], buffers=frames[1:])  # type: ignore[arg-type]  # Frames are buffers

    try:
        yield items()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
        sock.close(0)
        ctx.term()


# The raw shared-memory ring: what the same machine does with shared memory and nothing
# else. One anonymous shared mapping of SLOTS slots, each as large as the payload's pickle;
# free slot numbers go to the workers through one pipe, filled ones to the consumer through
# another (one byte each: pipe writes of one byte are atomic, so workers share both). A
# worker pickles (protocol 5) into its slot: the stream copied, every buffer copied once
# (one memcpy of the data). The consumer rebuilds the object on views of the slot, valid
# until it asks for the next item, when the slot goes back. No framing, no error handling,
# no liveness checks, no reference counts: a floor, not a transport.

SHM_RING_SLOTS = 16


def _ring_frames(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    return pickle.dumps(obj, protocol=5, buffer_callback=buffers.append), buffers


def _ring_slot_size(obj: Any) -> int:
    stream, buffers = _ring_frames(obj)
    return 64 + len(stream) + sum(memoryview(b).nbytes + 64 for b in buffers)


def _shm_ring_worker(mm: Any, slot: int, free_r: int, full_w: int, payload: str) -> None:
    import struct

    obj = make(payload)
    while True:
        (i,) = os.read(free_r, 1)
        stream, buffers = _ring_frames(obj)
        at = i * slot
        pos = at + 16 + 8 * len(buffers)
        struct.pack_into("<qq", mm, at, len(stream), len(buffers))
        mm[pos : pos + len(stream)] = stream
        pos += len(stream)
        for k, buf in enumerate(buffers):
            raw = memoryview(buf).cast("B")
            pos = (pos + 63) & ~63
            struct.pack_into("<q", mm, at + 16 + 8 * k, raw.nbytes)
            mm[pos : pos + raw.nbytes] = raw
            pos += raw.nbytes
        os.write(full_w, bytes((i,)))


@contextmanager
def _shm_ring(payload: str, workers: int) -> Iterator[Iterator[Any]]:
    """One shared-memory block of 16 slots, slot numbers over two os.pipe()s."""
    import mmap
    import struct

    slot = (_ring_slot_size(make(payload)) + 4095) & ~4095
    mm = mmap.mmap(-1, slot * SHM_RING_SLOTS)
    free_r, free_w = os.pipe()
    full_r, full_w = os.pipe()
    os.write(free_w, bytes(range(SHM_RING_SLOTS)))
    fork = mp.get_context("fork")
    procs = [
        fork.Process(target=_shm_ring_worker, args=(mm, slot, free_r, full_w, payload), daemon=True)
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    view = memoryview(mm)

    def items() -> Iterator[Any]:
        ready = b""
        held = -1
        while True:
            if not ready:
                ready = os.read(full_r, SHM_RING_SLOTS)
            i, ready = ready[0], ready[1:]
            if held >= 0:
                os.write(free_w, bytes((held,)))  # the previous item's views are done
            at = i * slot
            n_stream, n_bufs = struct.unpack_from("<qq", mm, at)
            pos = at + 16 + 8 * n_bufs
            stream = view[pos : pos + n_stream]
            pos += n_stream
            buffers = []
            for k in range(n_bufs):
                (n,) = struct.unpack_from("<q", mm, at + 16 + 8 * k)
                pos = (pos + 63) & ~63
                buffers.append(view[pos : pos + n])
                pos += n
            held = i
            yield pickle.loads(stream, buffers=buffers)

    try:
        yield items()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
        for fd in (free_r, free_w, full_r, full_w):
            os.close(fd)
