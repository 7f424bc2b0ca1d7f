"""Per-item CPU cost of the hot path, for before/after comparisons of a change.

``small``/``large``: a transport alone (sender.send + transport.recv, no Runner), in one
process: a thread sends, the main thread receives. ``runner``: the consumer's side of a
Runner's epoch (recv, the mode's loop, delivery) over zmq with one worker process, in
replicate and in shard mode; the worker's CPU is not counted. ``loop``: the modes' loops
alone, on a started run faked in memory (no transport, no thread: the steadiest row, in
ns). Each row is the minimum over the repeats of process CPU time per item, which holds
up better than wall time on a busy machine. To compare two trees, run it alternately
with PYTHONPATH=TREE:TREE/plugins:

    python benchmarks/hot_path.py [small] [large] [runner] [loop]
"""

import json
import sys
import threading
import time

import numpy as np

import flowplug as fp


def connect_of(t):
    ep = t.open()
    return ep if callable(ep) and not hasattr(ep, "connect") else ep.connect


def row(name, payload, n, repeats=7):
    cls = fp.get_transport(name)
    cap = 4096
    t = cls(capacity=cap, num_workers=1, run_id=f"hot-{name}", start_method="fork")
    connect = connect_of(t)
    sender = connect(0)
    best = float("inf")
    for _ in range(repeats):

        def produce():
            for _ in range(n):
                sender.send(payload)
            sender.flush()

        th = threading.Thread(target=produce)
        start = time.process_time()
        th.start()
        for _ in range(n):
            if t.recv(10.0) is fp.EMPTY:
                raise RuntimeError("lost")
        th.join()
        best = min(best, (time.process_time() - start) / n)
    sender.close()
    t.close()
    return best


class Smalls(fp.DataFlow):
    """``n`` small datapoints per pass."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield {"label": i, "x": 1.5, "name": "item"}


def runner_row(mode, n=20000, repeats=5):
    with fp.Runner(Smalls(n), transport="zmq", num_workers=1, mode=mode) as runner:
        for _ in runner:  # the start, and a first epoch
            pass
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for _ in runner:
                pass
            best = min(best, (time.process_time() - start) / n)
    return best


class _Recv:
    """A transport's recv() over a list, and the rest of a started run (modes.Run)."""

    closing = None
    inside = 0
    halted = False

    def __init__(self, items, control=None):
        self.items = items
        self.i = 0
        self.transport = self
        self.workers = self
        self.death = None
        self.control = control

    def recv(self, timeout):
        i = self.i
        self.i = i + 1
        return self.items[i]


def loop_row(mode, ordered=False, n=50_000, repeats=25, credited=False):
    """The mode's loop alone. Shard mode gives its credits back through the core's real
    control (a semaphore per worker; no worker takes them). ``credited``: replicate mode
    as the Runner runs it over workers it starts, items tagged ``(worker id, dp)``, a
    credit given back per item, the same way."""
    from flowplug._gates import EpochEnd  # private: this row reaches into a Runner

    best = float("inf")
    for _ in range(repeats):
        df = fp.DataFromList(list(range(n)))
        runner = fp.Runner(df, transport="thread", num_workers=1, mode=mode, ordered=ordered)
        if mode == "shard":
            from flowplug._gates import Control

            items = [(0, i, {"x": i}) for i in range(n)] + [EpochEnd(0, 0)]
            # the core's real control for one worker thread (its semaphore, no worker)
            runner._run = _Recv(items, Control(1, None, credits=50))
        elif credited:
            control = runner._mode.control(1, None, 50, None)
            runner._run = _Recv([(0, {"x": i}) for i in range(n)], control)
        else:
            runner._run = _Recv([{"x": i} for i in range(n)])
        runner._size = n
        epoch = runner._iterate()
        start = time.process_time()
        for _ in epoch:
            pass
        best = min(best, (time.process_time() - start) / n)
        runner._run = None  # never started: nothing to close
        runner._closed = True
    return best


class _ListSender:
    def __init__(self):
        self.sent = []
        self.send = self.sent.append

    def flush(self):
        pass


class _Pass:
    """``n`` datapoints, then the stop event is set: the gate ends after one pass."""

    def __init__(self, n, stop):
        self.n = n
        self.stop = stop

    def __iter__(self):
        dp = {"x": 1}
        for _ in range(self.n):
            yield dp
        self.stop.set()


def gate_row(n=50_000, repeats=25):
    """The worker's side of replicate mode alone: the gate's loop (a credit per datapoint)
    around a sender that appends to a list, with credits enough for the whole pass."""
    from flowplug._gates import Control  # private: this row reaches into a worker

    best = float("inf")
    for _ in range(repeats):
        control = Control(1, None, shares=[n + 1])
        gate = control.gates[0]
        stop = threading.Event()
        sender = _ListSender()
        info = fp.WorkerInfo(0, 1, 0)
        start = time.process_time()
        try:
            gate.run(_Pass(n, stop), sender, info, stop)
        except fp.TransportClosed:  # the stop event: the pass is done
            pass
        best = min(best, (time.process_time() - start) / n)
        assert len(sender.sent) == n
    return best


small = {"label": 3, "x": 1.5, "name": "item"}
large = np.zeros(1 << 20, np.uint8)  # 1 MiB
out = {}
which = sys.argv[1:] or ["small", "large", "runner", "loop"]
for name in ("zmq", "queue"):
    if "small" in which:
        out[f"{name} small"] = row(name, small, 8192)
    if "large" in which:
        out[f"{name} large 1MiB"] = row(name, large, 256)
if "runner" in which:
    for mode in ("replicate", "shard"):
        out[f"runner {mode} small"] = runner_row(mode)
if "loop" in which:
    out["loop replicate (ns)"] = loop_row("replicate") * 1e3
    try:
        from flowplug._gates import ReplicateGate  # noqa: F401  (not in trees before credits)
    except ImportError:
        pass
    else:
        out["loop replicate credited (ns)"] = loop_row("replicate", credited=True) * 1e3
        out["gate replicate (ns)"] = gate_row() * 1e3
    out["loop shard (ns)"] = loop_row("shard") * 1e3
    out["loop shard ordered (ns)"] = loop_row("shard", True) * 1e3
print(json.dumps({k: round(v * 1e6, 2) for k, v in out.items()}))  # us per item
