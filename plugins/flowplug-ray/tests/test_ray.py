"""What the ray transport adds to the contract: actors, the object store, Ray's options."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from importlib import metadata

import numpy as np
import pytest
import ray

import flowplug as fp
from flowplug.testing.contract import Counting, Slow

# ---------------------------------------------------------------------------- dataflows
# Module-level: the actors import this module to unpickle them (conftest puts it on the
# workers' PYTHONPATH).


class Arrays(fp.DataFlow):
    """Yield ``n`` float64 arrays of ``size`` elements, filled with their index."""

    def __init__(self, n: int, size: int = 300_000):
        self.n = n
        self.size = size

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield np.full(self.size, i, dtype=np.float64)


class CountProduced(fp.DataFlow):
    """Yield 256 KiB arrays forever, writing how many were handed to the sender to a file."""

    def __init__(self, path: str):
        self.path = path

    def __iter__(self):
        i = 0
        while True:
            yield np.zeros(32 * 1024)
            i += 1
            with open(self.path, "w") as f:
                f.write(str(i))


class Env(fp.DataFlow):
    def __iter__(self):
        while True:
            yield os.environ.get("FLOWPLUG_RAY_TEST")


class Whereabouts(fp.DataFlow):
    """Yield (worker pid, parent pid = the actor's process) forever."""

    def __iter__(self):
        while True:
            yield os.getpid(), os.getppid()
            time.sleep(0.01)


class WhoSends(fp.DataFlow):
    """Yield ``(id of the worker that sent it, i)``; in shard mode worker ``w`` of ``k``
    yields the items ``w, w + k, ...`` of each pass (``shard()``: without it the passes
    differ by the worker id they carry, which shard mode refuses as a ShardMismatch)."""

    def __init__(self, n: int, start: int = 0, step: int = 1):
        self.n = n
        self.start = start
        self.step = step

    def __len__(self) -> int:
        return self.n

    def shard(self, index: int, count: int) -> WhoSends:
        return WhoSends(self.n, index, count)

    def __iter__(self):
        me = fp.worker_info()
        for i in range(self.start, self.n, self.step):
            yield (me.id if me is not None else None), i


def mixed(i: int):
    """Datapoint ``i`` of a mix that crosses both kinds of small batches and the
    one-datapoint path: plain (dicts, tuples, lists, strings of scalars), not plain (a
    nested list, a small array, a set, shared sub-objects), and a large array."""
    kind = i % 9
    if kind == 0:
        return {"idx": i, "name": f"n{i}", "box": (i, 1.5, None), "w": np.float32(i)}
    if kind == 1:
        return (i, "t", b"b", True)
    if kind == 2:
        return [i, "l", 2.5]
    if kind == 3:
        return {"idx": i, "nested": [i, [i]]}
    if kind == 4:
        return np.full(7, i, dtype=np.int64)
    if kind == 5:
        shared = [i]
        return {"a": shared, "b": shared}
    if kind == 6:
        return f"s{i}"
    if kind == 7:
        return np.full(4096, i, dtype=np.float64)  # 32 KiB: alone, out of band
    return {i, -i}


class Mixed(fp.DataFlow):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield mixed(i)


class Reused(fp.DataFlow):
    """Yield one dict and one list, changed after every yield (a dataflow may)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return 2 * self.n

    def __iter__(self):
        d = {"idx": -1, "name": "x"}
        row = [0, 0]
        for i in range(self.n):
            d["idx"] = i
            yield d
            d["idx"] = -1  # changed right after the yield: the copy sent must not see it
            row[0] = i
            yield row
            row[0] = -1


class Segfault(fp.DataFlow):
    def __iter__(self):
        yield 1
        # Ray's worker processes enable faulthandler, which the worker forked by the actor
        # inherits: without this, the intended crash writes a "Fatal Python error" dump to
        # the actor's log, which a driver with log_to_driver prints.
        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGSEGV)


def _actors(run: fp.Runner) -> list[str]:
    """Names of the live actors of ``run``'s transport, found through Ray, not the runner."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(n for n in names if n.startswith("flowplug-"))


# ---------------------------------------------------------------------------- delivery


def test_arrays_arrive_read_only_from_the_object_store_and_outlive_close(no_leaks):
    kept = []
    with fp.Runner(Arrays(6), transport="ray", num_workers=1) as runner:
        for arr in runner:
            assert arr.dtype == np.float64 and arr.shape == (300_000,)
            # A view of Ray's shared memory: read-only, no copy was made for us.
            assert not arr.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                arr[0] = 1.0
            kept.append(arr)
    # The runner and its actors are gone; what the consumer holds stays valid.
    assert [int(a[0]) for a in kept] == list(range(6))
    assert all((a == a[0]).all() for a in kept)


def _reply_of(arr: np.ndarray) -> np.ndarray:
    """The reply buffer (in the object store) that a received array is a view of."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview), type(base)
    return base.obj


def test_a_reply_holds_at_most_batch_bytes(no_leaks):
    """A reply grows up to BATCH_BYTES (16 MiB) and no further: with the ring full of
    5 MiB arrays, a reply takes three of them, never four; the rest come in order."""
    from flowplug_ray._host import BATCH_BYTES

    n, size = 12, 5 * 1024 * 1024 // 8
    kept = []
    with fp.Runner(Arrays(n, size), transport="ray", num_workers=1, capacity=16) as runner:
        for arr in runner:
            if not kept:
                time.sleep(1.5)  # the worker fills the ring (6 arrays) meanwhile
            kept.append(arr)
    assert [int(a[0]) for a in kept] == list(range(n))
    sizes = {id(r): r.nbytes for r in map(_reply_of, kept)}.values()
    assert max(sizes) <= BATCH_BYTES
    assert max(sizes) > 2 * size * 8  # replies of several arrays were made


@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_small_datapoints_of_every_kind_arrive_in_order_and_intact(no_leaks, mode):
    """Plain small datapoints travel as pickled lists, others as frames, large ones alone;
    a switch between kinds keeps the order, and every value comes back equal."""
    n = 2000
    with fp.Runner(Mixed(n), transport="ray", num_workers=1, mode=mode) as runner:
        got = list(runner)
    assert len(got) == n
    for i, dp in enumerate(got):
        want = mixed(i)
        if isinstance(want, np.ndarray):
            assert type(dp) is np.ndarray and (dp == want).all(), i
        else:
            assert type(dp) is type(want) and dp == want, i
        if i % 9 == 5:  # one object twice in a datapoint stays one object
            assert dp["a"] is dp["b"]


@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_a_dataflow_may_change_what_it_yielded_right_after(no_leaks, mode):
    n = 3000
    with fp.Runner(Reused(n), transport="ray", num_workers=1, mode=mode) as runner:
        it = iter(runner)
        got = [next(it) for _ in range(2 * n)]
    assert got[0::2] == [{"idx": i, "name": "x"} for i in range(n)]
    assert got[1::2] == [[i, 0] for i in range(n)]


def test_replicate_mode_every_worker_yields_the_whole_dataflow(no_leaks):
    per_worker: dict[int, Counter] = {0: Counter(), 1: Counter()}
    with fp.Runner(
        Counting(5, tag=True), transport="ray", num_workers=2, mode="replicate"
    ) as runner:
        deadline = time.monotonic() + 30
        while min(len(c) for c in per_worker.values()) < 5 and time.monotonic() < deadline:
            for worker, i in runner:
                per_worker[worker][i] += 1
    assert set(per_worker[0]) == set(per_worker[1]) == set(range(5))


def test_backpressure_bounds_what_a_worker_runs_ahead(no_leaks, tmp_path):
    path = str(tmp_path / "produced")
    capacity = 4
    runner = fp.Runner(CountProduced(path), transport="ray", capacity=capacity)
    with runner:
        it = iter(runner)
        for _ in range(3):
            next(it)
        time.sleep(3)  # the consumer stalls; the worker must stall too
        with open(path) as f:
            produced = int(f.read())
        it.close()
    # In flight at most: the actor's buffer, one batch the consumer fetched, one item in the
    # relay and one in the pipe; without backpressure a worker makes hundreds in 3 s.
    assert produced <= 3 + 2 * capacity + 2, produced


# ---------------------------------------------------------------------------- shard mode


@pytest.mark.parametrize(("ordered", "capacity"), [(True, 4), (False, 50)])
def test_shard_mode_exactly_once_over_epochs_with_an_early_break(no_leaks, ordered, capacity):
    """Epoch notices and credits reach the workers inside the actors: each epoch is one
    whole pass, split by worker, whatever the consumer broke off before."""
    n = 150
    want = [(i % 2, i) for i in range(n)]  # item i is worker i % 2's
    with fp.Runner(
        WhoSends(n),
        transport="ray",
        num_workers=2,
        capacity=capacity,
        mode="shard",
        ordered=ordered,
        timeout=60,  # a credit or notice lost on the way: RunnerTimeout, not a hang
    ) as runner:
        for epoch in range(5):
            if epoch in (1, 3):  # break off early: the next epoch must still be whole
                it = iter(runner)
                for _ in range(7 * epoch):
                    next(it)
                it.close()
                continue
            got = list(runner)
            assert (got if ordered else sorted(got, key=lambda p: p[1])) == want


def test_shard_mode_credits_bound_what_a_worker_runs_ahead(no_leaks, tmp_path):
    path = str(tmp_path / "produced")
    capacity = 4  # one worker: 4 credits
    with fp.Runner(CountProduced(path), transport="ray", capacity=capacity, mode="shard") as r:
        it = iter(r)
        for _ in range(3):
            next(it)
        time.sleep(3)  # the consumer stalls; without credits coming back the worker must too
        with open(path) as f:
            produced = int(f.read())
        it.close()
    # Sent and not given back: at most the credits; plus one item waiting for a credit.
    assert produced <= 3 + capacity + 1, produced


# ---------------------------------------------------------------------------- deaths


def test_killed_actor_is_worker_died_not_a_hang(no_leaks):
    runner = fp.Runner(Slow(0.05), transport="ray", num_workers=2)
    with runner:
        it = iter(runner)
        next(it)
        names = _actors(runner)
        assert len(names) == 2
        ray.kill(ray.get_actor(names[1]))
        start = time.monotonic()
        with pytest.raises(fp.WorkerDied, match=r"worker 1 .*Ray actor") as info:
            for _ in range(1000):
                next(it)
        assert time.monotonic() - start < 10
        assert info.value.worker_id == 1 and info.value.exitcode is None
    assert _actors(runner) == []


def test_actor_process_killed_is_worker_died(no_leaks):
    with fp.Runner(Whereabouts(), transport="ray") as runner:
        it = iter(runner)
        pid, actor_pid = next(it)
        assert pid != actor_pid
        os.kill(actor_pid, signal.SIGKILL)  # as the OOM killer or a lost node would
        with pytest.raises(fp.WorkerDied, match=str(actor_pid)):
            for _ in range(1000):
                next(it)


def test_worker_crash_names_the_signal(no_leaks):
    """The actor forks the worker, so a crash is reported with its real exit status,
    which Ray alone does not know."""
    with fp.Runner(Segfault(), transport="ray") as runner:
        with pytest.raises(fp.WorkerDied, match=r"SIGSEGV.*Ray node") as info:
            for _ in range(5):
                list(runner)
    assert info.value.exitcode == -signal.SIGSEGV


def test_close_kills_the_actors_and_their_workers(no_leaks):
    runner = fp.Runner(Whereabouts(), transport="ray", num_workers=2)
    runner.reset_state()
    seen = set()
    for dp in runner:
        seen.add(dp)
        if len({p for p, _ in seen}) == 2:
            break
    assert len(_actors(runner)) == 2
    runner.close()
    assert _actors(runner) == []
    deadline = time.monotonic() + 5
    pids = {p for pair in seen for p in pair}
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.05)
    assert not any(_exists(p) for p in pids)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------- options


def test_runtime_env_and_fractional_cpus_reach_the_actors(no_leaks):
    env = {"env_vars": {"FLOWPLUG_RAY_TEST": "hello"}}
    with fp.Runner(Env(), transport="ray", num_workers=2, num_cpus=0.5, runtime_env=env) as runner:
        it = iter(runner)
        assert {next(it) for _ in range(4)} == {"hello"}


def test_unplaceable_workers_fail_fast_naming_the_resources(no_leaks):
    runner = fp.Runner(
        Counting(3), transport="ray", resources={"flowplug_gpu_node": 1}, start_timeout=1.5
    )
    with pytest.raises(fp.StateError, match=r"flowplug_gpu_node.*start_timeout"):
        runner.reset_state()
    assert _actors(runner) == []


def _refuse_to_unpickle():
    raise RuntimeError("this dataflow cannot be rebuilt here")


class NotRebuildable(fp.DataFlow):
    def __reduce__(self):
        return (_refuse_to_unpickle, ())

    def __iter__(self):
        yield 1


def test_dataflow_the_actor_cannot_unpickle_fails_the_start(no_leaks):
    runner = fp.Runner(NotRebuildable(), transport="ray")
    with pytest.raises(
        fp.StateError, match=r"(?s)failed to start.*cannot be rebuilt.*py_modules"
    ) as info:
        runner.reset_state()
    assert "\x1b[" not in str(info.value)  # Ray's terminal colours are stripped
    runner.close()
    assert _actors(runner) == []


def test_start_method_is_refused():
    with pytest.raises(fp.ConfigError, match="starts its own workers"):
        fp.Runner(Counting(3), transport="ray", start_method="spawn")


def test_option_types_are_checked():
    with pytest.raises(fp.ConfigError, match="num_cpus"):
        fp.Runner(Counting(3), transport="ray", num_cpus="many")


# ---------------------------------------------------------------------------- fds


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_estimate_covers_what_a_run_opens_in_the_consumer(no_leaks):
    """The Runner's RLIMIT_NOFILE check counts open_files; a run must not open more."""
    files = fp.get_transport("ray").open_files
    before = _fds()
    peak = before
    with fp.Runner(
        Counting(10**9), transport="ray", num_workers=3, num_cpus=0.5, mode="replicate"
    ) as runner:
        it = iter(runner)
        for i in range(2000):
            next(it)
            if i % 100 == 0:
                peak = max(peak, _fds())
    assert peak - before <= files.consumer + 3 * files.per_worker


def test_too_few_fds_is_refused_before_ray_starts(tmp_path):
    """With RLIMIT_NOFILE too low for the run, reset_state() raises the Runner's
    ConfigError naming the limit, before the transport starts Ray or any actor."""
    code = textwrap.dedent(
        """
        import os, resource, sys
        import flowplug as fp
        from flowplug.testing.contract import Counting
        used = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
        runner = fp.Runner(Counting(3), transport="ray", num_workers=2, num_cpus=0.5)
        try:
            runner.reset_state()
        except fp.ConfigError as exc:
            print("refused", "RLIMIT_NOFILE" in str(exc) and "ulimit -n" in str(exc))
        runner.close()
        print("ray initialized", "ray" in sys.modules and sys.modules["ray"].is_initialized())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["refused True", "ray initialized False"]


# ---------------------------------------------------------------------------- packaging


def test_flowplug_alone_does_not_require_ray():
    requires = metadata.requires("flowplug") or []
    assert not [r for r in requires if r.split()[0].lower().startswith("ray")]
    assert any(r.startswith("ray") for r in metadata.requires("flowplug-ray") or [])


def test_loading_the_plugin_does_not_import_ray(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import flowplug as fp
        assert "ray" in fp.available_transports()
        assert fp.get_transport("ray").runs_workers
        print("ray" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.strip() == "False"


def test_without_ray_init_a_local_instance_is_started(tmp_path):
    """The transport calls ray.init itself when nobody did (in a fresh process)."""
    code = textwrap.dedent(
        """
        import ray
        import flowplug as fp
        from flowplug.testing.contract import Counting
        assert not ray.is_initialized()
        with fp.Runner(Counting(5), transport="ray", num_cpus=0.5) as runner:
            print(list(runner))
        print(ray.is_initialized())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[0, 1, 2, 3, 4]", "True"]


def test_two_nodes_placement_by_custom_resource_through_address_auto(tmp_path):
    """A two-node cluster on this machine (ray.cluster_utils.Cluster, in a fresh process):
    flowplug joins it with address="auto" as on a real cluster, and resources= puts every
    worker on the node that advertises the resource (told apart by an env var of its own)."""
    (tmp_path / "nodeflow.py").write_text(
        textwrap.dedent(
            """
            import os
            import flowplug as fp

            class NodeName(fp.DataFlow):
                def __iter__(self):
                    while True:
                        yield os.environ.get("FLOWPLUG_TEST_NODE", "head")
            """
        )
    )
    code = textwrap.dedent(
        """
        import ray
        from ray.cluster_utils import Cluster
        import flowplug as fp
        from nodeflow import NodeName

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(
                num_cpus=2, resources={"data_node": 2}, env_vars={"FLOWPLUG_TEST_NODE": "second"}
            )
            with fp.Runner(
                NodeName(), transport="ray", address="auto", num_workers=2,
                resources={"data_node": 1}, num_cpus=0.5,
            ) as runner:
                it = iter(runner)
                print(sorted({next(it) for _ in range(20)}))
            print(len([n for n in ray.nodes() if n["Alive"]]))
        finally:
            ray.shutdown()
            cluster.shutdown()
        """
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    # Ray 2.60's token authentication: the nodes a Cluster starts in-process do not share
    # the driver's token, and every actor is cancelled at once; a test cluster turns it off.
    env["RAY_AUTH_MODE"] = "disabled"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["['second']", "2"]
