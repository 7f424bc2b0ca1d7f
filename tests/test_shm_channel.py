"""The store's segment mutex and the rings of flowplug.shm.channel, across real processes."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

import flowplug as fp
from flowplug.shm import channel as ch


def test_process_shared_semaphores_are_available_here():
    """The channel needs Linux's process-shared semaphores; the project's machines have them."""
    assert ch.available() is None, ch.available()


def _exit_holding_the_mutex(store):
    store._acquire()  # and never release: the process dies holding it
    os._exit(0)


def test_a_process_killed_holding_the_mutex_leaves_the_store_usable():
    with fp.shm.ObjectStore("4MiB") as store:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _exit_holding_the_mutex(store)
        assert os.waitpid(pid, 0)[1] == 0
        start = time.monotonic()
        oid = store.put(np.arange(1000))  # takes the mutex: goes on after the dead holder
        assert store.take(oid)[-1] == 999
        assert time.monotonic() - start < 5


def _rings(slots):
    store = fp.shm.ObjectStore("1MiB", channel_bytes=ch.layout(len(slots), slots))
    chan = ch.Channels(*store.channel_area(), slots)
    chan.init()
    return store, chan


def test_a_forked_producer_is_read_in_order_and_bounded_by_its_ring():
    store, chan = _rings([4, 4])
    with store:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: worker 1 writes 100 entries
            os.close(r)
            mine = ch.Channels(*store.channel_area(), [4, 4])
            for i in range(100):
                data = pickle.dumps(i)
                mine.put(1, ch.INLINE, len(data), 0, data, lambda: None)
                os.write(w, b"x")  # how far the producer got
            os._exit(0)
        os.close(w)
        time.sleep(0.5)
        assert len(os.read(r, 1000)) == 4  # the ring's length: the producer waits
        got = []
        while len(got) < 100:
            assert chan.wait(5)
            ring, kind, a, _, at = chan.take(0)
            assert (ring, kind) == (1, ch.INLINE)
            got.append(pickle.loads(chan.mm[at : at + a]))
            chan.release(ring)
        assert got == list(range(100))
        assert not chan.wait(0.05)  # nothing more: wait times out
        assert os.waitpid(pid, 0)[1] == 0
        os.close(r)
        del chan


def test_closing_the_channel_stops_a_waiting_producer():
    store, chan = _rings([1])
    with store:
        chan.put(0, ch.OBJECT, 0, 0, None, lambda: None)  # the ring is full now
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child waits for room that never comes
            mine = ch.Channels(*store.channel_area(), [1])
            try:
                mine.put(0, ch.OBJECT, 0, 0, None, lambda: None)
            except fp.TransportClosed:
                os._exit(7)
            os._exit(1)
        time.sleep(0.3)
        chan.close()
        assert os.waitpid(pid, 0)[1] >> 8 == 7
        del chan


def test_a_producer_stops_waiting_when_the_consumer_is_gone():
    store, chan = _rings([1])
    with store:
        chan.put(0, ch.OBJECT, 0, 0, None, lambda: None)

        def dead() -> None:
            raise fp.TransportClosed("gone")

        start = time.monotonic()
        with pytest.raises(fp.TransportClosed, match="gone"):
            chan.put(0, ch.OBJECT, 0, 0, None, dead)
        assert time.monotonic() - start < 2
        del chan


def test_runs_of_small_pickles_take_the_slots_they_need_and_wrap_around():
    """A run's pickles lie back to back over as many slots as they need (never more
    than its datapoints); one that reaches the ring's end goes on at its start."""
    store, chan = _rings([5])
    with store:
        mine = ch.Channels(*store.channel_area(), [5])  # the producer's view: its own position
        pos = wraps = 0
        for start in range(12):
            items = [
                {"i": start, "j": j, "pad": "x" * (start * 9 % 150)} for j in range(2 + start % 3)
            ]
            pickles = [pickle.dumps(x, protocol=5) for x in items]
            for _ in items:
                assert mine.try_credit(0)
            blob = b"".join([np.array([len(p) for p in pickles], np.uint16).tobytes(), *pickles])
            mine.push_run(0, blob, len(items))
            used = -(-(32 + len(blob)) // ch.SLOT)
            assert used <= len(items)
            wraps += pos % 5 + used > 5
            pos += used
            assert chan.wait(0)
            ring, kind, a, b, _ = chan.take(0)
            assert (ring, kind, a, b) == (0, ch.RUN, len(items), len(blob))
            assert [pickle.loads(v) for v in chan.run(0, a, b)] == items
            chan.release(0, len(items))
        assert wraps >= 2
        del chan, mine


def test_take_with_look_is_wait_then_take_and_none_when_empty_or_closed():
    """``take(start, look=True)``, the consumer's path, takes what ``wait(0)`` then
    ``take(start)`` would, starting at ring ``start``; None with nothing there, and None
    once the channel is closed even though close() posted the wake."""
    store, chan = _rings([2, 2])
    with store:
        mine = ch.Channels(*store.channel_area(), [2, 2])  # the producers' positions
        assert chan.take(0, look=True) is None
        for ring, value in ((0, 10), (1, 11), (0, 12)):
            mine.put(ring, ch.OBJECT, value, value + 100, None, lambda: None)
        got = []
        start = 1
        while (entry := chan.take(start, look=True)) is not None:
            ring, kind, a, b, _ = entry
            assert kind == ch.OBJECT and b == a + 100
            got.append((ring, a))
            chan.release(ring)
            start = 1 - ring
        assert got == [(1, 11), (0, 10), (0, 12)]
        chan.close()
        assert chan.take(0, look=True) is None
        assert chan.closed
        del chan, mine
