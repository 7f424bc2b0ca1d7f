"""The zmq transport, driven by hand: what it does beyond the contract suite."""

import pickle

import numpy as np
import pytest
import zmq
from zmq_helpers import Bomb, zmq_transport

import flowplug as fp


@pytest.fixture
def transport():
    yield from zmq_transport("test-zmq")


def test_bytes_from_a_stranger_are_dropped_never_unpickled(transport):
    connect = transport.open()
    stranger = fp.ZmqSockets()
    try:
        sock = stranger.connect(zmq.PUSH, transport.address, hwm=1, linger_ms=1000)
        sock.send_multipart([b"0" * 16, b"", pickle.dumps(Bomb())])
        assert transport.recv(0.5) is fp.EMPTY
    finally:
        stranger.close()
    sender = connect(0)
    sender.send("ours")
    sender.close()
    assert transport.recv(5.0) == "ours"


def test_large_arrays_arrive_as_views_of_the_received_message(transport):
    connect = transport.open()
    sender = connect(0)
    sent = np.arange(100_000, dtype=np.int64)
    sender.send(sent)
    sent[:] = -1  # send() returned: the worker may refill its array
    sender.close()
    got = transport.recv(5.0)
    assert got[0] == 0 and got[-1] == 99_999
    assert not got.flags.owndata  # rebuilt on top of the frame, not copied out of it


def test_options_come_with_their_defaults_filled_in():
    cls = fp.get_transport("zmq")
    t = cls(capacity=4, num_workers=1, run_id="test-zmq-opts", batch=1)
    declared = {opt.name: opt.default for opt in cls.options}
    assert t.option_values == {**declared, "batch": 1}
    assert declared["hwm"] == 0 and declared["batch"] == 64
    t.close()
