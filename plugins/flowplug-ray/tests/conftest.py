"""One local Ray instance for the whole session, started before any test's leak snapshot.

The contract suite's leak check counts this process's descendants. A local Ray instance is
a long-lived set of them (GCS, raylet, idle workers), so it must exist *before* the first
snapshot and outlive the last: a session-scoped autouse fixture starts it, warms it up with
one run (Ray opens a few fds and threads on the first actor call, once per process), and
shuts it down at the end. The worker actors of each test are descendants too, so a test that
leaves an actor or its worker process alive still fails the check.

Run these tests in one process (no ``-n``): each xdist worker would start its own Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

#: logical CPUs of the test instance: the contract runs up to 3 workers of 1 CPU each.
#: Logical CPUs are Ray's scheduling tokens, not cores; this box has 2.
NUM_CPUS = 4
OBJECT_STORE = 256 * 1024**2
#: the core's fault scenarios (tests/faults), which test_ray_faults.py runs on Ray.
FAULTS = str(Path(__file__).resolve().parents[3] / "tests" / "faults")

pytest_plugins = ["flowplug.testing.pytest_plugin"]


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    import ray

    import flowplug as fp
    from flowplug.testing.contract import Counting

    # The actors unpickle the dataflows defined in these test modules and in the core's
    # fault scenarios (test_ray_faults.py), so they must be able to import them; Ray's
    # workers inherit the environment of ray.init.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here, FAULTS, *([path] if path else [])])
    ray.init(
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE,
        log_to_driver=False,  # the remote tracebacks reach us as WorkerError anyway
    )
    try:
        # The first actor call, and the first datapoint big enough to live in the object
        # store, each open a socket or mapping in this process that Ray keeps for good.
        big = fp.DataFromList([np.zeros(1 << 18)])
        for df in (Counting(3), big):
            with fp.Runner(df, transport="ray", num_workers=1) as runner:
                list(runner)
        yield
    finally:
        ray.shutdown()
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path
