"""flowplug.shm: the shared-memory object store on its own (no runner)."""

from __future__ import annotations

import errno
import gc
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import weakref

import numpy as np
import pyarrow as pa
import pytest

import flowplug as fp
from flowplug.testing.contract import assert_same, payloads

shm = fp.shm


pytestmark = pytest.mark.usefixtures("no_leaks")  # flowplug.testing.pytest_plugin


@pytest.fixture
def store():
    with shm.ObjectStore("8MiB") as s:
        yield s


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def arrow_payloads() -> list:
    arr = pa.array(np.arange(5000, dtype=np.int64))
    strings = pa.array([f"row {i}" for i in range(3000)])
    batch = pa.record_batch({"x": arr, "f": pa.array(np.linspace(0, 1, 5000))})
    table = pa.table({"s": strings, "n": pa.array(np.arange(3000, dtype=np.int32))})
    return [arr, strings, batch, table]


# ------------------------------------------------------------------ round trips and views


@pytest.mark.parametrize("index", range(len(payloads())))
def test_every_contract_payload_round_trips(store, index):
    want = payloads()[index]
    assert_same(store.take(store.put(want)), want)


@pytest.mark.parametrize("index", range(4))
def test_arrow_round_trips(store, index):
    want = arrow_payloads()[index]
    got = store.take(store.put(want))
    assert type(got) is type(want) and got.equals(want)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float64).reshape(2, 3, 4),
        np.asfortranarray(np.arange(600, dtype=np.int16).reshape(20, 30)),
        np.array(7, dtype=np.uint8),  # 0-d
        np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.ones((4, 4), dtype=np.complex128),
        np.arange(10).astype("<M8[s]"),
        np.arange(30).astype("m8[ms]").reshape(5, 6).T,
        np.arange(100, dtype=np.float32).reshape(10, 10)[::2, 1:7],
    ],
    ids=[
        "c-order",
        "f-order",
        "0-d",
        "structured",
        "complex",
        "datetime",
        "timedelta-F",
        "strided",
    ],
)
def test_numpy_arrays_come_back_as_views_of_the_store(store, array):
    oid = store.put({"nested": (array, [array])})
    a = store.get(oid)["nested"][0]
    b = store.get(oid)["nested"][1][0]
    assert_same(a, array)
    if array.flags.c_contiguous or array.flags.f_contiguous:
        assert a.flags.f_contiguous == array.flags.f_contiguous
    # Two reads sharing memory prove that neither is a copy.
    assert np.shares_memory(a, b)
    assert not a.flags.writeable  # get: shared with other readers
    taken = store.take(oid)["nested"][0]
    assert taken.flags.writeable and address(taken) == address(a)


def test_arrow_data_comes_back_as_views_of_the_store(store):
    table = arrow_payloads()[3]
    oid = store.put(table)
    one, two = store.get(oid), store.get(oid)
    addr = [c.chunks[0].buffers()[-1].address for c in one.columns]
    assert addr == [c.chunks[0].buffers()[-1].address for c in two.columns]
    store.delete(oid)


def test_take_removes_the_object_and_delete_frees_it(store):
    oid = store.put(np.arange(1000))
    assert oid in store
    got = store.take(oid)
    assert oid not in store
    with pytest.raises(fp.ObjectNotFound, match="taken or deleted"):
        store.take(oid)
    with pytest.raises(fp.ObjectNotFound):
        store.delete(oid)
    del got
    assert store.used == 0
    oid = store.put(np.arange(1000))
    store.delete(oid)
    assert oid not in store and store.used == 0
    with pytest.raises(fp.ObjectNotFound):
        store.get(shm.ObjectID(12345, 1))


def test_a_batch_block_is_trimmed_when_sealed_and_freed_with_its_last_view(store):
    off, tag, at = store.open_batch(64 * 1024)
    mm = store.channel_area()[0]
    mm[at : at + 5] = b"hello"
    big = store.used
    store.seal_batch(off, tag, 5, 1, 0)
    assert store.used < big  # the unused tail went back at once
    view, count, index = store.take_batch(off, tag)
    assert (bytes(view[:5]), count, index) == (b"hello", 1, 0)
    with pytest.raises(fp.ObjectNotFound):
        store.take_batch(off, tag)  # taken once
    with pytest.raises(fp.ObjectNotFound):
        store.take(fp.shm.ObjectID(off, tag))  # a batch is no object
    part = view[1:3]
    del view
    gc.collect()
    assert store.used > 0  # a view made from it keeps the block
    del part
    gc.collect()
    assert store.used == 0


def test_object_id_is_small_and_round_trips():
    oid = shm.ObjectID(4096, 77)
    assert len(oid.binary()) == 16
    assert shm.ObjectID.from_binary(oid.binary()) == oid
    assert hash(oid) == hash(shm.ObjectID(4096, 77))


# ------------------------------------------------------------------ lifetime


def test_a_view_keeps_its_memory_until_the_last_reference_goes(store):
    oid = store.put({"a": np.arange(100_000, dtype=np.int64)})
    dp = store.take(oid)
    used = store.used
    assert used > 800_000
    derived = dp["a"][10:20].reshape(2, 5)  # a view of the view
    del dp
    gc.collect()
    assert store.used == used
    assert derived[0, 0] == 10
    del derived
    assert store.used == 0


def test_a_view_keeps_a_dropped_store_until_it_dies_and_then_frees_its_memory():
    """The store object lives while a view of it does, whatever else lets go of it: the
    view's death must reach the store (its memory goes back, and the store, now
    unreferenced, closes and removes its file)."""
    s = shm.ObjectStore("4MiB")
    other = shm.ObjectStore.attach(s.name)
    name = s.name
    view = s.take(s.put(np.arange(100_000, dtype=np.int64)))
    assert other.used > 800_000
    store_ref = weakref.ref(s)
    del s
    gc.collect()
    assert store_ref() is not None  # held for the view
    assert view[-1] == 99_999
    del view
    gc.collect()
    assert store_ref() is None
    assert other.used == 0  # the view's memory came back before the store went
    other.close()
    assert not os.path.exists(name)


def test_an_arrow_column_keeps_its_memory(store):
    table = arrow_payloads()[3]
    got = store.take(store.put(table))
    column = got.column("n")
    del got
    gc.collect()
    assert store.used > 0
    assert column.to_pylist()[:3] == [0, 1, 2]
    del column
    assert store.used == 0


def test_memory_is_reused_around_held_views_without_touching_them(store):
    rng = random.Random(0)
    kept = []
    for i in range(2000):
        n = rng.randrange(1, 20_000)
        got = store.take(store.put(np.full(n, i % 251, dtype=np.uint8)))
        if i % 20 == 0:
            kept.append((i, got))
    assert store.used < store.size  # memory was reused: 2000 items would not fit
    for i, arr in kept:
        assert (arr == i % 251).all()
    del kept, got, arr
    assert store.used == 0


def test_free_list_coalesces_back_to_one_extent(store):
    rng = random.Random(1)
    live = {}
    for step in range(3000):
        if live and (rng.random() < 0.5 or len(live) > 40):
            key = rng.choice(list(live))
            oid = live.pop(key)
            if rng.random() < 0.5:
                store.delete(oid)
            else:
                store.take(oid)
        else:
            live[step] = store.put(np.zeros(rng.randrange(1, 50_000), np.uint8))
    for oid in live.values():
        store.delete(oid)
    assert store.used == 0
    # The whole store is one free extent again: the largest object that fits, fits at once.
    biggest = store.size - 64 * 3 - 64
    store.delete(store.put(np.zeros(biggest, np.uint8), timeout=0))


# ------------------------------------------------------------------ capacity


def test_an_object_larger_than_the_store_is_a_clear_error(store):
    with pytest.raises(fp.DataTooLarge) as info:
        store.put(np.zeros(9 << 20, np.uint8))
    msg = str(info.value)
    assert "9.0 MiB" in msg and "8.0 MiB" in msg and "size=" in msg
    assert store.used == 0


def test_a_full_store_makes_put_wait_until_room_comes_back(store):
    held = store.take(store.put(np.full(5 << 20, 1, np.uint8)))
    with pytest.raises(fp.StoreFull, match="no room"):
        store.put(np.zeros(4 << 20, np.uint8), timeout=0.2)
    got: list = []

    def producer() -> None:
        got.append(store.put(np.full(4 << 20, 2, np.uint8)))

    t = threading.Thread(target=producer)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waiting, not overwriting
    assert (held == 1).all()
    del held
    t.join(5)
    assert not t.is_alive() and len(got) == 1
    assert (store.take(got[0]) == 2).all()


def test_empty_allocates_in_the_store_and_put_does_not_copy_it(store):
    with shm.use_store(store):
        arr = shm.empty((500, 1000), np.float32)
    arr[:] = 3
    used = store.used
    oid = store.put({"x": arr, "half": arr[:250]})
    assert store.used - used < 4096  # only a small record: the 2 MB are not copied
    del arr  # the stored object keeps the memory
    got = store.take(oid)
    assert np.shares_memory(got["x"], got["half"])
    assert (got["x"] == 3).all() and got["x"].shape == (500, 1000)
    del got
    assert store.used == 0


def test_empty_without_a_store_is_numpy_empty():
    assert shm.current_store() is None
    arr = shm.empty((3, 4), np.int16, order="F")
    assert arr.shape == (3, 4) and arr.dtype == np.int16 and arr.flags.f_contiguous


def test_a_taken_view_put_again_is_referenced_not_copied(store):
    first = store.take(store.put(np.arange(200_000, dtype=np.int32)))
    used = store.used
    again = store.take(store.put(first))
    assert store.used - used < 4096
    assert address(again) == address(first)
    del first, again
    assert store.used == 0


# ------------------------------------------------------------------ across processes


def _producer(store: shm.ObjectStore, n: int, conn) -> None:
    ids = [store.put({"i": i, "a": np.full(10_000, i, np.int64)}) for i in range(n)]
    conn.send(ids)
    conn.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_another_process_puts_and_this_one_takes(store, method):
    ctx = mp.get_context(method)
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(store, 5, there))
    proc.start()
    ids = here.recv()
    proc.join(10)
    here.close()
    there.close()
    assert proc.exitcode == 0
    for i, oid in enumerate(ids):
        dp = store.take(oid)
        assert dp["i"] == i and (dp["a"] == i).all()
    del dp
    assert store.used == 0


def test_close_with_live_views_keeps_them_valid_and_removes_the_file():
    s = shm.ObjectStore("4MiB")
    view = s.take(s.put(np.arange(100_000, dtype=np.int64)))
    s.close()
    assert not os.path.exists(s.name)
    assert view.sum() == 100_000 * 99_999 // 2
    with pytest.raises(fp.StateError, match="closed"):
        s.put(1)
    with pytest.raises(fp.StateError, match="no shared-memory store"):
        shm.ObjectStore.attach(s.name)
    del view  # the mapping (and its fd) go with the last view: the leak check verifies


def test_a_file_backed_store_in_another_directory(tmp_path):
    with shm.ObjectStore("2MiB", dir=str(tmp_path)) as s:
        assert os.path.dirname(s.name) == str(tmp_path)
        got = s.take(s.put(np.arange(1000)))
        assert got.sum() == 499_500
        del got
    assert os.listdir(tmp_path) == []


def test_reserve_allocates_the_whole_store_up_front(tmp_path):
    with shm.ObjectStore("4MiB", dir=str(tmp_path)) as lazy:
        assert os.stat(lazy.name).st_blocks * 512 < 1 << 20
    with shm.ObjectStore("4MiB", dir=str(tmp_path), reserve=True) as reserved:
        assert os.stat(reserved.name).st_blocks * 512 >= 4 << 20
        assert reserved.take(reserved.put(np.arange(10))).sum() == 45


def test_reserve_turns_a_full_dev_shm_into_a_clear_error(monkeypatch, tmp_path):
    # statvfs said there was room, but by the time we allocate, another program took it.
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(fp.ConfigError, match=r"no space left to reserve.*size=.*dir="):
        shm.ObjectStore("4MiB", dir=str(tmp_path), reserve=True)
    assert os.listdir(tmp_path) == []


def test_a_store_too_large_for_the_directory_says_how_to_fix_it():
    st = os.statvfs(shm.default_dir())
    too_big = st.f_bavail * st.f_frsize + (1 << 30)

    def ours() -> set[str]:  # tests running in parallel make segments of their own
        return {n for n in os.listdir(shm.default_dir()) if n.startswith(f"fp-{os.getpid()}-")}

    before = ours()
    with pytest.raises(fp.ConfigError) as info:
        shm.ObjectStore(too_big)
    msg = str(info.value)
    assert "is free" in msg and "size=" in msg and "dir=" in msg
    if shm.default_dir() == "/dev/shm":
        assert "--shm-size" in msg
    assert ours() <= before


# ------------------------------------------------------------------ crashes and sweeping

_KILLED_OWNER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import flowplug as fp
    store = fp.shm.ObjectStore("4MiB", dir=sys.argv[1])
    store.put(np.ones(1000))
    print(store.name, flush=True)
    time.sleep(60)
    """
)


def _start_owner(where: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_OWNER, where], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_sweep_removes_the_store_of_a_killed_owner(tmp_path):
    proc, name = _start_owner(str(tmp_path))
    try:
        assert shm.sweep_stale(str(tmp_path)) == []  # the owner lives: left alone
        assert os.path.exists(name)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert os.path.exists(name)  # a SIGKILL runs no cleanup
    assert shm.sweep_stale(str(tmp_path)) == [name]
    assert os.listdir(tmp_path) == []


def test_creating_a_store_sweeps_stale_ones(tmp_path):
    proc, name = _start_owner(str(tmp_path))
    proc.kill()
    proc.wait(10)
    proc.stdout.close()  # type: ignore[union-attr]
    with shm.ObjectStore("1MiB", dir=str(tmp_path)) as s:
        assert os.listdir(tmp_path) == [os.path.basename(s.name)]
    assert not os.path.exists(name)


def test_a_store_is_named_after_its_run_id(tmp_path):
    run_id = f"fp-{os.getpid()}-0123abcd"
    with (
        shm.ObjectStore("1MiB", dir=str(tmp_path), run_id=run_id) as given,
        shm.ObjectStore("1MiB", dir=str(tmp_path)) as own,
    ):
        assert re.fullmatch(rf"{run_id}-[0-9a-f]{{8}}", os.path.basename(given.name))
        name = os.path.basename(own.name)
        assert re.fullmatch(rf"fp-{os.getpid()}-[0-9a-f]{{8}}-[0-9a-f]{{8}}", name)
        assert shm.sweep_stale(str(tmp_path)) == []  # their owner lives


def test_sweep_spares_a_store_still_locked_by_a_live_process(tmp_path):
    # A pid that looks dead here may live in another pid namespace sharing /dev/shm:
    # the owner's lock on the file, not its pid, decides.
    proc, name = _start_owner(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    alias = os.path.join(str(tmp_path), f"fp-{int(dead.stdout)}-abc12345")
    os.rename(name, alias)
    try:
        assert shm.sweep_stale(str(tmp_path)) == []
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert shm.sweep_stale(str(tmp_path)) == [alias]


def test_forked_child_does_not_remove_or_free_the_parents_store(store):
    kept = store.take(store.put(np.arange(50_000)))
    used = store.used

    def child() -> None:
        # Inherited views die here and the child exits normally (running atexit).
        os._exit(0 if store.take(store.put(np.arange(10))).sum() == 45 else 1)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 0
    assert os.path.exists(store.name) and store.used == used
    assert kept[-1] == 49_999


# ------------------------------------------------------------------ dataflow wrappers


class Images(fp.DataFlow):
    def __len__(self) -> int:
        return 6

    def __iter__(self):
        for i in range(6):
            yield {"image": np.full((64, 64, 3), i, np.uint8), "label": i}


@pytest.mark.parametrize(
    ("transport", "method"), [("zmq", "fork"), ("zmq", "spawn"), ("queue", "fork")]
)
def test_put_early_get_late_through_any_transport(store, transport, method):
    # Only the small ids cross the transport; the images are views of the store.
    df = shm.PutData(Images(), store)
    with fp.Runner(
        df, transport=transport, num_workers=2, start_method=method, mode="replicate"
    ) as runner:
        got = list(shm.GetData(runner, store))
        assert len(got) == 6
        for dp in got:
            assert dp["image"].shape == (64, 64, 3) and (dp["image"] == dp["label"]).all()
        assert store.used > 6 * 64 * 64 * 3  # the views hold their memory
    del got, dp


def test_put_data_by_store_name_in_the_same_process(store):
    df = shm.GetData(shm.PutData(Images(), store.name), store.name)
    df.reset_state()
    assert [dp["label"] for dp in df] == list(range(6))
    assert len(df) == 6
    df.store.close()
    df.df.store.close()


# ------------------------------------------------------------------ concurrency


def _racing_producer(store: shm.ObjectStore, q, wid: int, n: int) -> None:
    rng = random.Random(wid)
    for i in range(n):
        k = rng.randrange(1, 60_000)
        fill = (wid * 31 + i) % 251
        if rng.random() < 0.3:
            with shm.use_store(store):
                a = shm.empty(k, np.uint8)
            a[:] = fill
            q.put(store.put({"a": a, "half": a[: k // 2], "fill": fill}))
        else:
            q.put(store.put({"a": np.full(k, fill, np.uint8), "fill": fill}))
    q.put(None)


def test_processes_put_while_threads_take_and_drop_views(store):
    ctx = mp.get_context("fork")
    q = ctx.Queue(64)
    producers = [ctx.Process(target=_racing_producer, args=(store, q, w, 800)) for w in range(3)]
    for p in producers:
        p.start()
    errors: list = []
    kept: list = []
    finished = [0]
    guard = threading.Lock()

    def consumer() -> None:
        rng = random.Random()
        while True:
            oid = q.get()
            if oid is None or oid == "end":
                with guard:
                    finished[0] += oid is None
                    if finished[0] == 3 or oid == "end":
                        q.put("end")
                        return
                continue
            dp = store.take(oid)
            if not (dp["a"] == dp["fill"]).all():
                errors.append(dp["fill"])
            with guard:
                if rng.random() < 0.05:
                    kept.append(dp)
                if len(kept) > 20:
                    kept.pop(0)

    threads = [threading.Thread(target=consumer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in producers:
        p.join(10)
    q.close()
    q.join_thread()
    assert not errors
    assert all((dp["a"] == dp["fill"]).all() for dp in kept)
    kept.clear()
    assert store.used == 0  # every reference came back


def test_take_sole_with_a_loader_and_large_blocks_freed_at_once():
    """take_sole rebuilds through a Loader as pickle would; a dropped view of a large
    block returns its memory at once, while small ones wait for the deferred frees."""
    from flowplug.serialize import Loader

    with shm.ObjectStore("16MiB") as s:
        s.defer_frees(16)
        loads = Loader()
        for i in range(3):  # the second and third by the loader's recipe
            oid = s.put({"x": np.full(1 << 20, i, np.uint8), "n": i})
            got = s.take_sole(oid, loads)
            assert got["n"] == i and got["x"].shape == (1 << 20,) and (got["x"] == i).all()
            assert got["x"].flags.writeable
            assert s.used > 1 << 20
            del got
            assert s.used == 0  # at once: 1 MiB >= FREE_AT_ONCE
        small = s.take_sole(s.put(np.arange(10)), loads)
        del small
        assert s._pending  # a small block's free waits for the next operation
        assert s.used == 0  # which applies it
