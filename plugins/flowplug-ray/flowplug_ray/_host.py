"""What runs on a Ray node: the actor that hosts one flowplug worker.

The actor does not iterate the dataflow itself. It runs the core's
:class:`flowplug.ProcessWorkers` for one worker, so the worker is a process forked by the
same code as on one machine (death signal, parent watchdog, seeds, the send loop
:func:`flowplug.worker_loop.run_worker`), and its exit status is known: a worker killed by
SIGSEGV is reported as such, which Ray alone cannot tell (it sees a closed connection).

The worker sends pickled frames through a pipe; the actor's relay thread queues them, and
the consumer collects them in batches with :meth:`WorkerHost.take`, whose reply Ray puts
into its object store (owned by the consumer, so nothing is borrowed from the actor). The
bounded queue plus the pipe are the backpressure: a worker blocks while the consumer is
behind.

In shard mode the :class:`~flowplug.ProcessWorkers` runs its worker under the core's local
shard gate, and :meth:`WorkerHost.control` applies what the consumer forwards (epoch
notices, credits given back) to that gate's :class:`~flowplug.ControlSink`.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from multiprocessing.connection import Connection, Pipe
from typing import Any

import numpy as np

import flowplug
from flowplug.serialize import dumps

_COUNT = struct.Struct("<I")
#: how long the actor waits for the exit status of a worker whose pipe closed.
_EXIT_WAIT = 5.0


#: a take() reply stops growing past this many bytes.
BATCH_BYTES = 8 * 1024 * 1024


def _size(item: Any) -> int:
    return sum(len(f) for f in item) if isinstance(item, list) else 0


class PipeSender(flowplug.Sender):
    """Worker side: ``[count][stream][buffer]...`` as length-prefixed pipe messages."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._send = conn.send_bytes

    def send(self, obj: Any) -> None:
        frames = dumps(obj)
        try:
            self._send(_COUNT.pack(len(frames)))
            for frame in frames:
                self._send(frame)
        except OSError as exc:  # the actor is gone (killed, or its node lost)
            raise flowplug.TransportClosed(
                f"the Ray actor hosting this worker is gone: {exc}"
            ) from exc

    def close(self) -> None:
        self._conn.close()


class PipeEndpoint(flowplug.Endpoint):
    """The write end of the actor's pipe; inherited by the forked worker."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def connect(self, worker_id: int) -> PipeSender:
        return PipeSender(self.conn)


class WorkerHost:
    """A Ray actor running one flowplug worker process (made remote by the transport).

    :param df: the worker's dataflow.
    :param info: the worker's :class:`flowplug.WorkerInfo`.
    :param buffer: how many datapoints may wait in the object store for the consumer.
    :param credits: shard mode: the worker's credits; None in replicate mode.
    """

    def __init__(self, df: Any, info: flowplug.WorkerInfo, buffer: int, credits: int | None = None):
        import ray  # in the actor process, where Ray is already running

        self._ray = ray
        self._info = info
        self._node = ray.util.get_node_ip_address()
        self._out: queue.Queue = queue.Queue(maxsize=buffer)
        self._read, write = Pipe(duplex=False)
        self._group = flowplug.ProcessWorkers([df], PipeEndpoint(write), [info], "fork")
        self._sink: flowplug.ControlSink | None = None
        if credits is not None:
            (self._sink,) = self._group.control_sinks(credits)
        self._epoch = -1
        self._control_lock = threading.Lock()
        # Started here, on the actor's main thread, so the worker gets the death signal
        # when the actor process ends (ray.kill, a lost node).
        self._group.start()
        write.close()  # the worker holds the only write end: EOF means it ended
        self._pid = self._group.procs[0].pid
        self._relay_thread = threading.Thread(
            target=self._relay, name="flowplug-ray-relay", daemon=True
        )
        self._relay_thread.start()

    def where(self) -> tuple[int, int, str]:
        """Return (actor pid, worker pid, node ip)."""
        return os.getpid(), self._pid, self._node

    def take(self, wait: float, most: int) -> list[Any]:
        """Return the datapoints waiting (and a final :class:`flowplug.Death`), at most
        ``most`` of them or about :data:`BATCH_BYTES`, after waiting up to ``wait`` s for
        the first one.

        The reply is one object in Ray's object store, owned by the consumer, and freed
        when the consumer has dropped every datapoint in it: a small batch keeps a kept
        datapoint from pinning many others.
        """
        try:
            items = [self._out.get(timeout=wait)]
        except queue.Empty:
            return []
        size = _size(items[0])
        while len(items) < most and size < BATCH_BYTES:
            try:
                items.append(self._out.get_nowait())
            except queue.Empty:
                break
            size += _size(items[-1])
        return items

    def control(self, epoch: int, credits: int) -> None:
        """Shard mode: give the worker ``credits`` credits back, then announce ``epoch``.

        Calls may run out of order (the actor has several threads), so this is made not
        to care: credits add up, and an epoch older than one already announced is ignored.
        """
        assert self._sink is not None
        with self._control_lock:
            for _ in range(credits):
                self._sink.release()
            if epoch > self._epoch:
                self._epoch = epoch
                self._sink.start_epoch(epoch)

    def stop(self) -> None:
        self._group.stop()

    def _relay(self) -> None:
        recv = self._read.recv_bytes
        out = self._out.put
        try:
            while True:
                (count,) = _COUNT.unpack(recv())
                stream = recv()
                # Buffers as uint8 arrays: Ray stores arrays out of band, so the consumer
                # rebuilds the datapoint on top of the object store's memory (no copy).
                buffers = [np.frombuffer(recv(), np.uint8) for _ in range(count - 1)]
                out([stream, *buffers])
        except (EOFError, OSError):
            pass  # the worker ended (or the actor is being torn down)
        self._read.close()
        deadline = time.monotonic() + _EXIT_WAIT
        while self._group.death is None and time.monotonic() < deadline:
            time.sleep(0.01)
        death = self._group.death
        out(
            flowplug.Death(
                self._info.id,
                self._pid,
                death.exitcode if death is not None else None,
                f"on Ray node {self._node}",
            )
        )
