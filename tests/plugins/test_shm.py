"""The shm transport under the Runner: views, lifetime, backpressure, errors, no leaks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
from shm_helpers import in_store, segments

import flowplug as fp

pytestmark = pytest.mark.usefixtures("no_leaks")  # flowplug.testing.pytest_plugin


class Numbered(fp.DataFlow):
    """Yield {"w": worker, "i": count, "x": an array filled with a value unique to the item}."""

    def __init__(self, n: int = 2048, dtype=np.int64):
        self.n = n
        self.dtype = dtype

    def __iter__(self):
        info = fp.worker_info()
        i = 0
        while True:
            v = value(info.id, i, self.dtype)
            yield {"w": info.id, "i": i, "x": np.full(self.n, v, self.dtype)}
            i += 1


def value(worker: int, i: int, dtype=np.int64) -> int:
    return (i * 7919 + worker * 104729) % (251 if np.dtype(dtype).itemsize == 1 else 2**31)


class FillInPlace(fp.DataFlow):
    """Allocate with fp.shm.empty, fill, yield; then write once more (never do this!)."""

    def __iter__(self):
        while True:
            arr = fp.shm.empty((1000,), np.int64)
            arr[:] = 1
            yield arr
            # send() has returned: the consumer sees this only if it holds this very memory.
            arr[0] = 2


class SmallThenHuge(fp.DataFlow):
    def __iter__(self):
        for i in range(3):
            yield np.full(100_000, i, np.uint8)
        yield np.zeros(2 << 20, np.uint8)


# ------------------------------------------------------------------ lifetime of views


def test_kept_views_stay_unchanged_while_10000_more_items_flow():
    # 4 MiB holds ~250 items of 16 KiB: the 10,100 items reuse the memory ~40 times over,
    # all around the 100 views the consumer keeps.
    with fp.Runner(Numbered(), transport="shm", num_workers=2, size="4MiB") as runner:
        it = iter(runner)
        kept = [next(it) for _ in range(100)]
        for _ in range(10_000):
            dp = next(it)
            assert dp["x"][0] == value(dp["w"], dp["i"])
        del dp
        it.close()
    for dp in kept:
        assert dp["x"].shape == (2048,)
        assert (dp["x"] == value(dp["w"], dp["i"])).all()


def test_empty_in_a_worker_reaches_the_consumer_without_a_copy():
    with fp.Runner(FillInPlace(), transport="shm", size="16MiB") as runner:
        it = iter(runner)
        got = next(it)
        assert got.shape == (1000,) and (got[1:] == 1).all()
        deadline = time.monotonic() + 10
        while got[0] != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got[0] == 2  # the worker's write after the yield shows: one memory, no copy
        del got
        it.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_start_methods(method):
    with fp.Runner(
        Numbered(300_000, np.uint8), transport="shm", num_workers=2, start_method=method
    ) as runner:
        it = iter(runner)
        for _ in range(20):
            dp = next(it)
            assert (dp["x"] == value(dp["w"], dp["i"], np.uint8)).all()
        del dp
        it.close()


def test_arrow_record_batches_arrive():
    batch = pa.record_batch({"a": pa.array(np.arange(10_000)), "s": pa.array(["x"] * 10_000)})
    with fp.Runner(fp.DataFromList([batch]), transport="shm") as runner:
        (got,) = list(runner)
    assert got.equals(batch)


# ------------------------------------------------------------------ capacity


class Logged(fp.DataFlow):
    """Numbered(300 KB) from one worker, writing the count of each item before yielding it."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        for dp in Numbered(300_000, np.uint8):
            with open(self.path, "w") as f:
                f.write(str(dp["i"]))
            yield dp


def test_a_full_store_makes_workers_wait_and_a_waiting_consumer_gets_copies(tmp_path):
    # 1 MiB holds three 300 KB items: while the consumer keeps three, nothing more fits.
    log = tmp_path / "count"
    with fp.Runner(Logged(str(log)), transport="shm", size="1MiB") as runner:
        it = iter(runner)
        kept = [next(it) for _ in range(3)]
        assert all(in_store(dp["x"]) for dp in kept)
        time.sleep(0.5)
        # The worker waits for room. (Exactly at item 3, unless the consumer, waiting for
        # the first items but slow to wake up, made it send a few copies; sending copies
        # freely it would get ~100 ahead, as many as the socket holds.)
        assert int(log.read_text()) < 20
        # Now the consumer waits too, holding the memory: waiting on would never end, so
        # the worker sends copies, and nothing the consumer holds is overwritten.
        more = [next(it) for _ in range(5)]
        assert [dp["i"] for dp in kept + more] == list(range(8))
        assert not any(in_store(dp["x"]) for dp in more)
        for dp in kept + more:
            assert (dp["x"] == value(0, dp["i"], np.uint8)).all()
        del kept, more, dp
        # Room is back: items come as views of the store again.
        assert any(in_store(next(it)["x"]) for _ in range(200))
        it.close()


def test_a_put_that_gives_way_fails_at_once_while_a_process_waits():
    with fp.shm.ObjectStore("1MiB") as store:
        held = store.take(store.put(np.ones(900_000, np.uint8)))
        frames = fp.shm.dumps(np.ones(300_000, np.uint8))
        with pytest.raises(fp.StoreFull, match=r"within 0\.2 s"):  # nobody waits: it waits
            store.put_frames(frames, timeout=0.2, give_way=True)
        with store.waiting():
            with pytest.raises(fp.StoreFull, match="waits"):  # without a timeout, at once
                store.put_frames(frames, give_way=True)
            with fp.shm.use_store(store):
                fallback = fp.shm.empty(300_000, np.uint8)  # ordinary memory instead
        assert not in_store(fallback)
        del held
        oid = store.put_frames(frames, give_way=True)
        assert oid in store
        with fp.shm.use_store(store):
            assert in_store(fp.shm.empty(300_000, np.uint8))


def test_an_item_larger_than_the_store_fails_clearly_and_keeps_what_was_delivered():
    runner = fp.Runner(SmallThenHuge(), transport="shm", size="1MiB")
    got = []
    with pytest.raises(fp.WorkerError) as info:
        for dp in runner:
            got.append(dp)
    err = info.value
    assert err.exc_type == "DataTooLarge"
    assert "2.0 MiB" in str(err) and "1.0 MiB" in str(err) and "size=" in str(err)
    runner.close()
    assert [int(a[0]) for a in got] == [0, 1, 2]
    for i, arr in enumerate(got):
        assert (arr == i).all()


# ------------------------------------------------------------------ options


def test_size_and_dir_options(tmp_path):
    with fp.Runner(fp.DataFromList([np.arange(10)]), transport="shm", size="2MiB",
                   dir=str(tmp_path), reserve="true") as runner:  # fmt: skip
        (got,) = list(runner)
        assert got.sum() == 45
    del got
    assert os.listdir(tmp_path) == []
    with pytest.raises(fp.ConfigError, match="size"):
        fp.Runner(fp.DataFromList([1]), transport="shm", size="lots")


def test_a_store_larger_than_dev_shm_is_a_clear_error():
    st = os.statvfs(fp.shm.default_dir())
    runner = fp.Runner(
        fp.DataFromList([1]), transport="shm", size=st.f_bavail * st.f_frsize + (1 << 30)
    )
    with pytest.raises(fp.ConfigError, match="is free") as info:
        runner.reset_state()
    assert "size=" in str(info.value) and "dir=" in str(info.value)
    runner.close()


# ------------------------------------------------------------------ no leaks


class Counted(fp.DataFlow):
    """1 MiB items; counts how many each worker has yielded, in memory shared by fork."""

    def __init__(self):
        import mmap

        self.counts = np.frombuffer(mmap.mmap(-1, 8 * 16), np.int64)  # no fd, no file

    def __iter__(self):
        w = fp.worker_info().id
        while True:
            self.counts[w] += 1
            yield np.ones(1 << 20, np.uint8)


@pytest.mark.parametrize("capacity, workers", [(4, 2), (5, 2), (3, 1)])
def test_capacity_bounds_the_datapoints_in_flight_across_workers(capacity, workers):
    df = Counted()
    with fp.Runner(df, transport="shm", num_workers=workers, capacity=capacity) as runner:
        it = iter(runner)
        kept = [next(it) for _ in range(3)]
        time.sleep(1.0)  # the workers fill whatever room there is
        in_flight = int(df.counts.sum()) - len(kept)
        # each worker also holds the item it is blocked sending, not yet in flight
        assert in_flight <= capacity + workers, (in_flight, capacity)
        it.close()


class CountedSmall(Counted):
    """Small dicts (batched: many per batch block), counted per worker as they are yielded."""

    def __iter__(self):
        w = fp.worker_info().id
        i = 0
        while True:
            self.counts[w] += 1
            yield {"w": w, "i": i}
            i += 1


@pytest.mark.parametrize("capacity, workers", [(20, 1), (21, 2), (64, 2)])
def test_capacity_bounds_batched_datapoints_too(capacity, workers):
    df = CountedSmall()
    with fp.Runner(df, transport="shm", num_workers=workers, capacity=capacity) as runner:
        it = iter(runner)
        kept = [next(it) for _ in range(3)]
        time.sleep(1.0)  # the workers fill whatever room there is
        in_flight = int(df.counts.sum()) - len(kept)
        assert in_flight <= capacity + workers, (in_flight, capacity)
        last = {w: -1 for w in range(workers)}
        for dp in kept + [next(it) for _ in range(5000)]:  # they go on, each worker in order
            assert dp["i"] == last[dp["w"]] + 1
            last[dp["w"]] = dp["i"]
        it.close()


def test_with_capacity_unset_the_ring_never_holds_back_what_the_credits_allow(monkeypatch):
    """The Runner's credits bound the datapoints; a run's ring credits come back after its
    last datapoint, so each ring has a run's room more: a worker never waits on it."""
    import mmap

    from flowplug.shm import channel

    waits = np.frombuffer(mmap.mmap(-1, 8), np.int64)  # anonymous: forked workers share it
    credit = channel.Channels.credit

    def counted(self, ring, alive):
        waits[0] += 1
        return credit(self, ring, alive)

    monkeypatch.setattr(channel.Channels, "credit", counted)
    df = CountedSmall()
    with fp.Runner(df, transport="shm", num_workers=2, start_method="fork") as runner:
        it = iter(runner)
        for _ in range(20_000):  # the consumer the slower side: the workers fill the rings
            next(it)
        assert waits[0] == 0
        it.close()


@pytest.mark.parametrize("kind", ["runs", "batch blocks"])
def test_used_directly_the_transport_bounds_datapoints_by_its_credits(kind):
    """Without a Runner (no credits of its own), a worker never has more than
    ``capacity`` datapoints sent and not yet received, however they are batched: the
    consumer gives a run's credits back once it handed on the last of them, never before
    it handed each on."""
    capacity = 8
    transport = fp.get_transport("shm")(
        capacity=capacity, num_workers=1, run_id="fp-direct", start_method="fork", size="16MiB"
    )

    def make(i):
        return {"i": i} if kind == "runs" else {"i": i, "x": np.full(3000, i)}

    with _forked_worker(transport, make, 300) as sent:
        for received in range(300):
            if received % 7 == 0:
                time.sleep(0.05)  # the worker fills whatever room there is
            assert sent() - received <= capacity, (sent(), received)
            dp = transport.recv(5.0)
            assert dp is not fp.EMPTY and dp["i"] == received


@contextlib.contextmanager
def _forked_worker(transport, make, count):
    """Worker 0 of ``transport`` in a forked child, sending ``make(i)`` for ``i < count``.
    Yields a function that says how many it has sent so far; at the end closes the
    transport (a worker still waiting for a credit stops) and checks the child's exit."""
    connect = transport.open()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            sender = connect(0)
            for i in range(count):
                sender.send(make(i))
                os.write(w, b"x")  # one byte per datapoint sent
            sender.close()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    sent = [0]

    def sent_so_far():
        try:
            sent[0] += len(os.read(r, 1000))
        except BlockingIOError:
            pass  # nothing sent since the last look
        return sent[0]

    try:
        yield sent_so_far
    finally:
        os.close(r)
        transport.close()
        status = os.waitpid(pid, 0)[1]
    assert status == 0


class Mixed(fp.DataFlow):
    """Each worker yields small dicts, 16 KiB and 300 KB arrays and tiny ints, in turn."""

    def __iter__(self):
        w = fp.worker_info().id
        sizes = [0, 10, 2048, 40_000, 0, 0, 5]
        i = 0
        while True:
            n = sizes[i % len(sizes)]
            if n:
                yield {"w": w, "i": i, "x": np.full(n, value(w, i), np.int64)}
            else:
                yield (w, i)
            i += 1


def test_batched_and_single_datapoints_keep_each_workers_order():
    with fp.Runner(Mixed(), transport="shm", num_workers=2, size="16MiB") as runner:
        it = iter(runner)
        last = {0: -1, 1: -1}
        for _ in range(3000):
            dp = next(it)
            if isinstance(dp, tuple):
                w, i = dp
            else:
                w, i = dp["w"], dp["i"]
                assert (dp["x"] == value(w, i)).all()
            assert i == last[w] + 1
            last[w] = i
        del dp
        it.close()


class Shapes(fp.DataFlow):
    """Arrays of two makes in runs (A A B B B A ...): a batch block holds datapoints that
    share one stream and datapoints that do not."""

    def __iter__(self):
        w = fp.worker_info().id
        i = 0
        while True:
            shape = (4, 3) if (i // 2) % 3 == 0 else (12,)
            yield np.full(shape, value(w, i), np.int64)
            i += 1


def test_datapoints_of_one_make_and_of_another_in_one_block_keep_their_own_shape():
    with fp.Runner(Shapes(), transport="shm", num_workers=1) as runner:
        it = iter(runner)
        for i in range(2000):
            dp = next(it)
            assert dp.shape == ((4, 3) if (i // 2) % 3 == 0 else (12,))
            assert (dp == value(0, i)).all()
        del dp
        it.close()


class Stalls(fp.DataFlow):
    """Three small datapoints, then a long wait."""

    def __iter__(self):
        yield from range(3)
        time.sleep(60)


def test_a_batch_goes_out_when_the_dataflow_stalls():
    with fp.Runner(Stalls(), transport="shm") as runner:
        it = iter(runner)
        start = time.monotonic()
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        assert time.monotonic() - start < 5  # not after the stall: the timer sent them
        it.close()


def test_the_store_is_unlinked_once_every_worker_attached():
    with fp.Runner(Numbered(), transport="shm", num_workers=3) as runner:
        it = iter(runner)
        seen = set()
        while len(seen) < 3:
            seen.add(next(it)["w"])  # each worker's hello precedes its items
        assert segments(os.getpid()) == []
        assert next(it)["x"].shape == (2048,)  # and the run goes on
        it.close()


_CONSUMER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import flowplug as fp

    class Big(fp.DataFlow):
        def __iter__(self):
            while True:
                yield fp.worker_info().id, np.ones(1 << 20, np.uint8)

    if __name__ == "__main__":
        method = sys.argv[2]
        runner = fp.Runner(
            Big(), transport="shm", num_workers=2, size="64MiB", start_method=method
        )
        runner.reset_state()
        if sys.argv[1] == "iterate":
            it = iter(runner)
            kept = []
            while len({w for w, _ in kept}) < 2:  # each worker's hello precedes its items
                kept.append(next(it))
        print("ready", flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("iterate", ["iterate", "start-only"])
def test_nothing_stays_in_dev_shm_after_the_consumer_is_killed(iterate, method, tmp_path):
    script = tmp_path / "consumer.py"  # a file: spawned workers import the dataflow from it
    script.write_text(_CONSUMER)
    proc = subprocess.Popen(
        [sys.executable, str(script), iterate, method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        if iterate == "iterate" or method == "fork":
            # fork: unlinked before the workers start; spawn: once both said hello, before
            # the first datapoint is delivered
            assert segments(proc.pid) == []
        else:
            assert len(segments(proc.pid)) == 1  # spawned workers still need its name
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
    # A store nobody unlinked is removed by the next flowplug process once its owner and
    # the owner's workers (which die with it) are gone.
    deadline = time.monotonic() + 10
    while segments(proc.pid) and time.monotonic() < deadline:
        fp.shm.sweep_stale()
        time.sleep(0.05)
    assert segments(proc.pid) == []


_EXITING = textwrap.dedent(
    """
    import numpy as np
    import flowplug as fp

    runner = fp.Runner(
        fp.DataFromList([np.ones(1000)]), transport="shm", num_workers=2, start_method="spawn"
    )
    runner.reset_state()  # the workers' hellos are never read: the store keeps its name
    store = fp.shm.ObjectStore("1MiB")
    view = store.take(store.put(np.ones(1000)))
    import os
    print(len([n for n in os.listdir("/dev/shm") if f"-{os.getpid()}-" in n]), flush=True)
    # no close(): interpreter exit must remove both stores
    """
)


def test_interpreter_exit_removes_every_store():
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXITING], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "2"  # both stores existed while it ran
    assert segments(proc.pid) == []


_TRACKED = textwrap.dedent(
    """
    import numpy as np
    import flowplug as fp

    if __name__ == "__main__":
        df = fp.DataFromList([np.ones(100_000)] * 4)
        for method in ("fork", "spawn"):
            with fp.Runner(
                df, transport="shm", num_workers=2, start_method=method, mode="replicate"
            ) as r:
                assert len(list(r)) == 4
        store = fp.shm.ObjectStore("1MiB")
        view = store.take(store.put(np.ones(1000)))
        store.close()
    """
)


def test_no_resource_tracker_warnings(tmp_path):
    script = tmp_path / "consumer.py"
    script.write_text(_TRACKED)
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr
    assert done.stderr == ""


def test_large_datapoints_in_flight_are_bounded_by_bytes_then_small_ones_run_freely():
    """A worker keeps its share of LARGE_BYTES of large datapoints in flight (not all of
    its ring's credits); small datapoints after them get the whole ring again."""
    from flowplug_shm import transport as shm_transport

    capacity = 40
    transport = fp.get_transport("shm")(
        capacity=capacity, num_workers=1, run_id="fp-bound", start_method="fork", size="64MiB"
    )
    size = 1 << 20
    keep = shm_transport.LARGE_BYTES // (size + 200)  # the stream's bytes too

    def make(i):  # 60 large datapoints, then 300 small ones
        return {"i": i, "x": np.full(size, i % 256, np.uint8)} if i < 60 else i

    with _forked_worker(transport, make, 360) as sent:
        most = {True: 0, False: 0}  # the most in flight, of large / small datapoints
        for received in range(360):
            if received % 20 == 0:
                time.sleep(0.1)  # the worker fills whatever room there is
            large = received < 60
            most[large] = max(most[large], (min(sent(), 60) if large else sent()) - received)
            dp = transport.recv(5.0)
            if large:
                assert dp["i"] == received and dp["x"][0] == received % 256
                del dp
            else:
                assert dp == received
        assert 2 <= most[True] <= keep, (most, keep)
        assert most[False] > keep, (most, keep)  # the large ones' bound is gone
