"""flowplug.ipc: the ipc:// addresses of the zmq and shm transports (and doctor), the
ZmqSockets setup and close sequence, and recv_within."""

import os
import shutil
import sys
import tempfile

import pytest
import zmq

import flowplug as fp
from flowplug.ipc import recv_within

RUN_ID = f"fp-{os.getpid()}-0123abcd"


@pytest.fixture
def pull():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    yield sock
    sock.close(linger=0)
    ctx.term()


@pytest.fixture
def short_dir():
    """A directory with a short path (pytest's tmp_path is too long for a socket path)."""
    path = tempfile.mkdtemp(prefix="fp", dir="/tmp")
    yield path
    shutil.rmtree(path)


def round_trip(pull, address: str) -> None:
    push = pull.context.socket(zmq.PUSH)
    try:
        push.connect(address)
        push.send(b"hello")
        assert pull.poll(5000) and pull.recv() == b"hello"
    finally:
        push.close(linger=0)


def test_on_linux_an_abstract_socket_named_after_the_run(pull, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    address = fp.bind_ipc(pull, RUN_ID)
    assert address.startswith(f"ipc://@flowplug-{RUN_ID}-")
    assert fp.bind_ipc(pull, RUN_ID) != address  # each call binds a new address
    round_trip(pull, address)


def test_elsewhere_a_socket_file_in_the_pipedir(pull, monkeypatch, short_dir):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("FLOWPLUG_PIPEDIR", short_dir)
    address = fp.bind_ipc(pull, RUN_ID)
    path = address.removeprefix("ipc://")
    assert os.path.dirname(path) == short_dir and os.path.exists(path)
    assert os.path.basename(path).startswith(f"flowplug-{RUN_ID}-")
    round_trip(pull, address)


def test_a_path_longer_than_zmq_allows_names_the_way_out(pull, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("FLOWPLUG_PIPEDIR", str(tmp_path / ("d" * 120)))
    with pytest.raises(fp.ConfigError, match="characters") as info:
        fp.bind_ipc(pull, RUN_ID)
    assert "set FLOWPLUG_PIPEDIR to a shorter directory" in str(info.value)


def test_a_failed_bind_names_the_socket_and_the_way_out(pull, monkeypatch, short_dir):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("FLOWPLUG_PIPEDIR", os.path.join(short_dir, "missing"))
    with pytest.raises(fp.ConfigError, match="cannot bind the zmq task socket ipc://") as info:
        fp.bind_ipc(pull, RUN_ID, "zmq task socket")
    assert "FLOWPLUG_PIPEDIR" in str(info.value)


def test_recv_within_returns_what_came_or_none_after_the_timeout():
    sockets = fp.ZmqSockets()
    try:
        pull, address = sockets.bind(zmq.PULL, RUN_ID, hwm=10)
        push = sockets.connect(zmq.PUSH, address, hwm=10)
        assert recv_within(pull, 0.01) is None  # nothing sent: waits, then None
        push.send(b"one")
        assert recv_within(pull, 5.0) == b"one"  # polls until it arrives
        push.send_multipart([b"a", b"b"])
        frames = recv_within(pull, 5.0, multipart=True, copy=False)
        assert [f.bytes for f in frames] == [b"a", b"b"]
        push.send(b"two")
        while (got := recv_within(pull, 0.0)) is None:  # a zero timeout never blocks
            pass
        assert got == b"two"
    finally:
        sockets.close()


def test_a_connect_out_of_file_descriptors_is_a_config_error_naming_the_limit(monkeypatch):
    """zmq's EMFILE when a worker's socket is made (the process ran out of fds after the
    Runner's count) says RLIMIT_NOFILE and the way out, and closes what it had made."""
    import errno

    sockets = fp.ZmqSockets()
    made = sockets.connect(zmq.PUSH, "ipc://@fp-test-unused", hwm=1)

    def no_fd(kind):
        raise zmq.ZMQError(errno.EMFILE)

    monkeypatch.setattr(sockets.ctx, "socket", no_fd)
    with pytest.raises(fp.ConfigError, match=r"RLIMIT_NOFILE.*ulimit -n"):
        sockets.connect(zmq.PUSH, "ipc://@fp-test-unused", hwm=1)
    assert made.closed and sockets.ctx.closed
    other = zmq.ZMQError(errno.EINVAL)
    sockets = fp.ZmqSockets()

    def invalid(kind):
        raise other

    monkeypatch.setattr(sockets.ctx, "socket", invalid)
    with pytest.raises(zmq.ZMQError) as info:  # any other error: as zmq raised it
        sockets.connect(zmq.PUSH, "ipc://@fp-test-unused", hwm=1)
    assert info.value is other and other.__cause__ is None
    sockets.close()
