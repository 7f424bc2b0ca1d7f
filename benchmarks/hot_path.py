"""Per-item CPU cost of a transport's hot path (sender.send + transport.recv), no Runner.

One process: a thread sends, the main thread receives; the row is the minimum over 7
repeats of process CPU time per item, which holds up better than wall time on a busy
machine. To compare two trees, run it alternately with PYTHONPATH=TREE:TREE/plugins:

    python benchmarks/hot_path.py [small] [large]
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


small = {"label": 3, "x": 1.5, "name": "item"}
large = np.zeros(1 << 20, np.uint8)  # 1 MiB
out = {}
which = sys.argv[1:] or ["small", "large"]
for name in ("zmq", "queue"):
    if "small" in which:
        out[f"{name} small"] = row(name, small, 8192)
    if "large" in which:
        out[f"{name} large 1MiB"] = row(name, large, 256)
print(json.dumps(out))
