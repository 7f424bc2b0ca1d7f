"""zmq's direct connections: large buffers over the worker's own unix socket (direct_min)."""

from __future__ import annotations

import pickle
import socket
import struct
import threading

import numpy as np
import pytest
import zmq
from zmq_helpers import Bomb, zmq_transport

import flowplug as fp
from flowplug.serialize import dumps

MB2 = 2 << 20  # above the default direct_min (1 MiB)


@pytest.fixture
def transport():
    yield from zmq_transport("test-zmqd")


def _in_thread(fn):
    """Run a worker's sends in a thread: a send larger than the kernel's socket buffer
    returns only once the consumer reads it."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported by join()
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join():
        thread.join(30)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    return join


class FakeWorker:
    """A worker's side by hand: its hello, a header through zmq, bytes as the test says."""

    def __init__(self, transport, key=b"k" * 8, token=None):
        self.token = transport._token if token is None else token
        self.key = key
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(transport._direct.address)
        self.sockets = fp.ZmqSockets()
        self.sock = self.sockets.connect(zmq.PUSH, transport.address, hwm=4, linger_ms=1000)

    def hello(self):
        self.conn.sendall(self.token + self.key)

    def header(self, obj):
        frames = dumps(obj)
        data = b"".join(bytes(memoryview(f)) for f in frames[1:])
        sizes = [memoryview(f).nbytes for f in frames[1:]]
        head = self.key + struct.pack(f"<{len(sizes)}Q", *sizes)
        self.sock.send_multipart([self.token + b"D", frames[0], head])
        return data

    def close(self):
        self.conn.close()
        self.sockets.close()


def test_large_datapoints_come_over_the_workers_connection_whole_and_in_order(transport):
    connect = transport.open()
    assert transport._direct is not None

    def work():
        sender = connect(0)
        batch = np.empty(MB2, np.uint8)
        for i in range(6):
            batch[...] = i
            sender.send(batch)
            batch[...] = 255  # send() returned: the worker refills its array
            sender.send({"small": i})
        sender.close()

    join = _in_thread(work)
    got = [transport.recv(10.0) for _ in range(12)]
    join()
    for i in range(6):
        big, small = got[2 * i], got[2 * i + 1]
        assert big.shape == (MB2,) and big.min() == big.max() == i
        assert small == {"small": i}
    assert len(transport._direct.conns) == 1  # they took the direct connection
    assert transport.counters()["bytes_received"] >= 6 * MB2


def test_arrays_of_every_layout_and_several_per_datapoint_arrive_equal(transport):
    connect = transport.open()
    rng = np.random.default_rng(0)
    base = rng.random((600, 700))  # 3.4 MB of float64
    sent = {
        "fortran": np.asfortranarray(base),
        "strided": base[::2, ::3],
        "c": base.astype(np.float32),
        "small": np.arange(10),
    }

    def work():
        sender = connect(0)
        sender.send(sent)
        sender.close()

    join = _in_thread(work)
    got = transport.recv(10.0)
    join()
    assert set(got) == set(sent)
    for name, array in sent.items():
        assert np.array_equal(got[name], array), name
    assert got["fortran"].flags.f_contiguous
    assert len(transport._direct.conns) == 1


def _refill_and_send(connect, count):
    """Worker 0 in a thread: one 2 MiB array, refilled with ``i`` and sent, ``count`` times."""

    def work():
        sender = connect(0)
        batch = np.empty(MB2, np.uint8)
        for i in range(count):
            batch[...] = i
            sender.send(batch)
        sender.close()

    return _in_thread(work)


def test_receive_memory_is_reused_only_once_no_datapoint_refers_to_it(transport):
    connect = transport.open()

    join = _refill_and_send(connect, 12)
    kept = [transport.recv(10.0) for _ in range(4)]
    views = [a[10:20] for a in kept]  # a view keeps the memory as its array does
    del kept[1:]
    got = [transport.recv(10.0) for _ in range(4)]  # into new memory: all is referred to
    pool = transport._direct.pool
    assert len(pool) == 8
    assert [int(a.max()) for a in kept + views + got] == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert [int(a.min()) for a in kept + views + got] == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    del kept, views, got
    for i in range(8, 12):  # now nothing refers to the kept memory: it is reused
        got = transport.recv(10.0)
        assert got.min() == got.max() == i
        del got
    join()
    assert len(pool) == 8


def test_a_datapoint_cut_off_by_its_workers_death_is_dropped_and_the_next_arrives(transport):
    connect = transport.open()
    fake = FakeWorker(transport)
    fake.hello()
    data = fake.header(np.full(MB2, 7, np.uint8))
    fake.conn.sendall(data[: 64 * 1024])  # (fits the kernel's socket buffer)
    fake.close()  # died half way: the rest never comes
    assert transport.recv(5.0) is fp.EMPTY
    join = _in_thread(lambda: (s := connect(0)).send(np.full(MB2, 3, np.uint8)) or s.close())
    got = transport.recv(10.0)
    join()
    assert got.min() == got.max() == 3


def test_bytes_that_are_late_are_waited_for_only_as_long_as_recv_may_wait(transport):
    transport.open()
    fake = FakeWorker(transport)
    try:
        fake.hello()
        data = fake.header(np.arange(MB2 // 8, dtype=np.int64))
        assert transport.recv(0.2) is fp.EMPTY  # the header came, its bytes did not
        assert transport.recv(0.0) is fp.EMPTY
        join = _in_thread(lambda: fake.conn.sendall(data))
        got = transport.recv(10.0)  # the same datapoint, finished
        join()
        assert got[0] == 0 and got[-1] == MB2 // 8 - 1
    finally:
        fake.close()


def test_strangers_on_the_direct_socket_are_closed_and_never_read(transport):
    connect = transport.open()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connects, says nothing
    silent.connect(transport._direct.address)
    wrong = FakeWorker(transport, key=b"w" * 8, token=b"0" * 16)
    try:
        wrong.hello()
        wrong.conn.sendall(pickle.dumps(Bomb()))
        # its header has the wrong token: dropped; its connection: closed when accepted
        wrong.sock.send_multipart([b"0" * 16 + b"D", pickle.dumps(Bomb()), b"w" * 8])
        assert transport.recv(0.5) is fp.EMPTY

        def work():
            sender = connect(0)
            sender.send(np.full(MB2, 5, np.uint8))
            sender.close()

        join = _in_thread(work)
        got = transport.recv(10.0)
        join()
        assert got.min() == got.max() == 5
        assert list(transport._direct.conns) != [b"w" * 8]
        assert len(transport._direct.conns) == 1
    finally:
        silent.close()
        wrong.close()


def test_direct_min_0_keeps_every_buffer_on_zmq():
    t = fp.get_transport("zmq")(capacity=4, num_workers=1, run_id="test-zmqd0", direct_min=0)
    try:
        connect = t.open()
        assert t._direct is None  # no listening socket either
        sender = connect(0)
        sent = np.full(MB2, 9, np.uint8)
        sender.send(sent)  # through zmq, returning once zmq released the array
        sent[:] = 0
        sender.close()
        got = t.recv(10.0)
        assert got.min() == got.max() == 9
    finally:
        t.close()


class Mixed(fp.DataFlow):
    """Small and large datapoints in turn, one array refilled after each yield."""

    def __len__(self):
        return 40

    def reset_state(self):
        pass

    def __iter__(self):
        w = fp.worker_info().id
        batch = np.empty((8, 224, 224, 3), np.uint8)
        for i in range(20):
            yield (w, 2 * i, None)
            batch[...] = i
            yield (w, 2 * i + 1, batch)


@pytest.mark.parametrize("direct_min", [1 << 20, 0], ids=["direct", "zmq-tracker"])
def test_each_workers_datapoints_keep_their_order_and_arrive_whole(direct_min):
    with fp.Runner(
        Mixed(), transport="zmq", num_workers=2, mode="replicate", direct_min=direct_min
    ) as runner:
        got = list(runner)
    assert len(got) == 40
    for w in (0, 1):
        mine = [(n, a) for who, n, a in got if who == w]
        assert [n for n, _ in mine] == list(range(len(mine)))
        for n, a in mine:
            if n % 2:
                assert a.min() == a.max() == n // 2


def test_a_view_of_a_view_a_memoryview_or_a_tensor_keeps_its_memory_from_reuse(transport):
    connect = transport.open()

    join = _refill_and_send(connect, 6)
    first = transport.recv(10.0)
    kept = [first[1:][::2][:10], memoryview(first[5:9])]  # a view of a view, a memoryview
    del first
    got = [transport.recv(10.0) for _ in range(4)]
    del got  # their memory is free again: the next datapoint may reuse it
    last = transport.recv(10.0)
    join()
    assert last.min() == last.max() == 5
    assert int(kept[0].max()) == 0 and set(bytes(kept[1])) == {0}


def test_a_full_pool_makes_room_by_dropping_free_buffers(transport, monkeypatch):
    from flowplug_zmq import transport as zt

    monkeypatch.setattr(zt, "_POOL_BYTES", 5 * MB2)
    connect = transport.open()
    sizes = [MB2 + 64 * k for k in range(8)] * 2  # more kinds than the pool holds

    def work():
        sender = connect(0)
        for i, n in enumerate(sizes):
            sender.send(np.full(n, i, np.uint8))
        sender.close()

    join = _in_thread(work)
    held = []
    for i, n in enumerate(sizes):
        got = transport.recv(10.0)
        assert got.shape == (n,) and got.min() == got.max() == i
        if i % 4 == 0:
            held.append(got)  # some stay in use while the pool fills
        del got
    join()
    assert transport._direct.pool_bytes <= 5 * MB2
    assert [int(a[0]) for a in held] == list(range(0, len(sizes), 4))


def test_without_unix_sockets_every_buffer_goes_by_zmq(monkeypatch):
    from flowplug_zmq import transport as zt

    def refuse(*args):
        raise PermissionError(1, "not here")

    monkeypatch.setattr(zt, "_Direct", refuse)
    t = fp.get_transport("zmq")(capacity=4, num_workers=1, run_id="test-zmqd1")
    try:
        connect = t.open()
        assert t._direct is None
        join = _in_thread(lambda: (s := connect(0)).send(np.full(MB2, 4, np.uint8)) or s.close())
        got = t.recv(10.0)
        join()
        assert got.min() == got.max() == 4
    finally:
        t.close()


def test_a_send_that_fails_half_way_closes_the_direct_connection(transport):
    connect = transport.open()
    errors = []

    class Cut:  # the worker's connection, interrupted half way through a datapoint
        def __init__(self, conn):
            self.conn = conn

        def send(self, view, flags):
            return self.conn.send(view, flags)

        def sendall(self, view):
            self.conn.sendall(view[: len(view) // 2])
            raise KeyboardInterrupt  # e.g. a signal while the bytes go out

        def close(self):
            self.conn.close()

    def work():
        sender = connect(0)
        sender._conn = Cut(sender._conn)
        try:
            sender.send(np.full(4 * MB2, 1, np.uint8))  # more than the kernel takes at once
        except KeyboardInterrupt:
            errors.append("cut")
        sender.send(np.full(MB2, 2, np.uint8))  # by zmq now
        sender.close()

    join = _in_thread(work)
    got = fp.EMPTY
    for _ in range(5):  # the cut datapoint is dropped (EMPTY), then the next one comes
        got = transport.recv(5.0)
        if got is not fp.EMPTY:
            break
    join()
    assert errors == ["cut"]
    assert got.shape == (MB2,) and got.min() == got.max() == 2
    assert transport._direct.conns == {}  # the cut connection is closed at our end too


def test_a_torch_tensor_keeps_its_memory_from_reuse(transport):
    import torch  # the test extra pins it: this runs wherever the tests do

    connect = transport.open()

    def work():
        sender = connect(0)
        batch = torch.empty(MB2 // 4, dtype=torch.float32)
        for i in range(6):
            batch.fill_(i)
            sender.send(batch)
        sender.close()

    join = _in_thread(work)
    kept = transport.recv(10.0)[3:7]  # a view of the tensor received
    for _ in range(4):  # free as soon as received: their memory is reused
        transport.recv(10.0)
    last = transport.recv(10.0)
    join()
    assert float(last.min()) == float(last.max()) == 5
    assert kept.tolist() == [0.0] * 4
