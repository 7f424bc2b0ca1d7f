"""Rings in shared memory: each worker's datapoints reach the consumer without a system call.

A store can carry a channel area (``ObjectStore(..., channels=Channels.layout(n, slots))``):
one single-producer/single-consumer ring per worker, plus three POSIX semaphores per ring
and two for the consumer, all in the store's segment. A ring entry is one slot of
:data:`SLOT` bytes: an object id (the object is in the store), a small pickle inline, or a
marker that a copy follows through another channel; or a *run* of small pickles back to
back, over as many slots as they need (never more than its datapoints).

Per entry, the producer (worker ``w``) takes a free slot (``free[w]``), writes the entry,
posts ``items[w]``, then posts ``wake``; the consumer waits on ``wake`` (one post per
entry), finds a ring whose ``items`` it can take, reads the entry, and posts that ring's
``free``. ``free[w]`` starts at the ring's length, so at most that many entries are in
flight per worker (backpressure); the rings' lengths add up to the transport's capacity.

What it costs: glibc semaphores are a word in the shared memory, changed with atomic
instructions in user space; ``sem_post`` enters the kernel (futex wake) only when the
other side sleeps in ``sem_wait``, and ``sem_wait`` only when the count is 0. While both
sides are busy an entry costs five calls through ctypes (~0.3 us each) and no system call.

Memory ordering, honestly: the entry and the data it names are written with plain stores
(numpy, mmap slices), which neither x86-64 nor ARM promise to make visible in order to
another core by themselves (x86-64 keeps stores in order, ARM does not). What orders them
is the semaphore: POSIX lists ``sem_post``/``sem_wait`` among the functions that
synchronize memory (XBD 4.12), and glibc implements them as a release-RMW / acquire-RMW
pair on the semaphore word, which holds across processes mapping the same page. So a
consumer that took ``items[w]`` sees everything worker ``w`` wrote before posting it (and,
through ``wake``, at least one ``items`` post), on x86-64 and ARM alike; the producer that
took ``free[w]`` sees that the consumer finished reading the slot. Nobody reads a counter
written by the other side: each side keeps its own ring position in process memory.

A process killed mid-entry holds nothing: semaphores have no owner. A worker killed after
taking a slot loses that slot (the Runner stops the run on a death anyway). A consumer that
dies leaves workers waiting on ``free``; they wait in steps and stop when the store's owner
is gone (:meth:`Producer.put` checks) or the store is closed.

Linux (glibc, musl) only: elsewhere ``sem_init`` in shared memory is not supported
(macOS returns ENOSYS), and :func:`available` says so.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
import sys
import time
from typing import Any, overload

#: bytes per ring entry: 32 of header (kind, two words, padding), the rest a small pickle inline.
SLOT = 256
_HEAD_BYTES = 32
#: the largest pickle that travels inline in a slot.
INLINE_MAX = SLOT - _HEAD_BYTES
_SEM = 64  # room for one sem_t (32 bytes on glibc x86-64 and aarch64), cache-line aligned

# entry kinds: an object id, a pickle in the slot, a copy through a socket, a batch block
# id, small pickles back to back over as many slots as they need
OBJECT, INLINE, COPY, BATCH, RUN = 1, 2, 3, 4, 5

_HEAD = struct.Struct("<qqq")
# A producer whose ring is full checks every _CHECK_EVERY seconds that the consumer is alive.
_CHECK_EVERY = 0.5


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _load() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = [libc.sem_init, libc.sem_post, libc.sem_trywait, libc.sem_timedwait]
    except (OSError, AttributeError):  # pragma: no cover - a libc without POSIX semaphores
        return None
    for fn in fns:
        fn.argtypes = [ctypes.c_void_p] + ([ctypes.c_int, ctypes.c_uint] if fn is fns[0] else [])
        fn.restype = ctypes.c_int
    libc.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
    return libc


_libc = _load()


def _load_fast() -> tuple[Any, Any]:
    # sem_post and sem_trywait never block: called without releasing the GIL (PyDLL) and
    # with a prebuilt c_void_p, a call costs ~0.25 us instead of ~0.7 (measured).
    if _libc is None:
        return None, None
    lib = ctypes.PyDLL(None)
    post, trywait = lib.sem_post, lib.sem_trywait
    post.restype = trywait.restype = ctypes.c_int
    return post, trywait


_post, _trywait = _load_fast()


def available() -> str | None:
    """None when rings work here; otherwise why not (for an error message)."""
    if _libc is None:
        return f"process-shared POSIX semaphores are not available on {sys.platform}"
    return None


def layout(num_rings: int, slots: list[int]) -> int:
    """Bytes of channel area for ``num_rings`` rings of ``slots[i]`` entries."""
    return 2 * _SEM + sum(4 * _SEM + n * SLOT for n in slots[:num_rings])


class _Ring:
    __slots__ = (
        "base",
        "flush",
        "free",
        "hello",
        "items",
        "pos",
        "run_at",
        "slots",
    )

    def __init__(self, sems: int, slots: int, base: int):
        # the semaphores' addresses, as pointers ready for _post / _trywait
        self.items, self.free, self.hello, self.flush = (
            ctypes.c_void_p(sems + i * _SEM) for i in range(4)
        )
        self.slots, self.base, self.pos = slots, base, 0
        self.run_at = 0  # consumer: where the run that take() returned last starts


class Channels:
    """The rings of a store's channel area, seen from one process.

    :param mm: the store's mapping; :param offset: where the channel area starts in it;
    :param address: the mapping's address in this process; :param slots: each ring's
    length (as given to :func:`layout`).
    """

    def __init__(self, mm: Any, offset: int, address: int, slots: list[int]):
        self.mm = mm
        # An export of the mapping: closing the store cannot unmap it while this object
        # lives (a thread may be inside sem_timedwait on it); it goes with the last user.
        self._pin = self._mv = memoryview(mm)
        self.address = address
        self._wake = ctypes.c_void_p(address + offset)
        self._closed = address + offset + _SEM  # one int64 word: the consumer closed
        self._closed_at = offset + _SEM
        self._closed_word = self._mv[offset + _SEM : offset + _SEM + 8].cast("q")
        pos = offset + 2 * _SEM
        self.rings: list[_Ring] = []
        for n in slots:
            a = address + pos
            self.rings.append(_Ring(a, n, pos + 4 * _SEM))
            pos += 4 * _SEM + n * SLOT

    def init(self) -> None:
        """Set every semaphore up (the store's owner, once, before any worker starts)."""
        init = _libc.sem_init
        for sem, value in [(self._wake, 0)] + [
            (s, v)
            for r in self.rings
            for s, v in ((r.items, 0), (r.free, r.slots), (r.hello, 0), (r.flush, 0))
        ]:
            if init(sem, 1, value) != 0:  # pragma: no cover - checked by available()
                raise OSError(ctypes.get_errno(), "sem_init failed for a shm ring")

    # ------------------------------------------------------------ both sides

    @property
    def closed(self) -> bool:
        return self._closed_word[0] != 0

    def close(self) -> None:
        """Mark the channel closed and wake everyone who waits on it."""
        struct.pack_into("<q", self.mm, self._closed_at, 1)
        post = _post
        post(self._wake)
        for r in self.rings:
            post(r.free)
            post(r.hello)
            post(r.flush)

    # ------------------------------------------------------------ producer

    def hello(self, ring: int) -> None:
        """Say that worker ``ring`` has attached (the consumer may then unlink the store)."""
        _post(self.rings[ring].hello)

    def put(self, ring: int, kind: int, a: int, b: int, inline: Any, alive: Any) -> None:
        """Write one entry into ``ring``, waiting while it is full.

        :param inline: bytes for an INLINE entry (at most :data:`INLINE_MAX`), else None.
        :param alive: called every 0.5 s while waiting: raises when waiting must stop.
        :raises flowplug.TransportClosed: the consumer closed the channel.
        """
        r = self.rings[ring]
        if _trywait(r.free) != 0:
            self._wait(r.free, alive)
        self.push(ring, kind, a, b, inline)

    def try_credit(self, ring: int) -> bool:
        """Take one credit of ``ring`` (room for one datapoint) if there is one, at once."""
        return _trywait(self.rings[ring].free) == 0

    def credit_probe(self, ring: int) -> Any:
        """A callable that takes one credit of ``ring`` if there is one and returns 0, or
        returns non-zero at once (:meth:`try_credit` bound to ``ring``, for a hot loop)."""
        return functools.partial(_trywait, self.rings[ring].free)

    def credit(self, ring: int, alive: Any) -> None:
        """Take one credit of ``ring``, waiting while there is none (as :meth:`put` does).

        A producer that batches takes one credit per datapoint, then sends the batch as
        one entry with :meth:`push`: an entry holds at least one credit until the
        consumer reads it, so a ring as long as its credits never overflows.
        """
        if _trywait(self.rings[ring].free) != 0:
            self._wait(self.rings[ring].free, alive)

    def push_run(self, ring: int, blob: Any, count: int) -> None:
        """Write ``count`` >= 2 small pickles as one entry, a *run*, for datapoints whose
        credits the caller took. ``blob`` holds their lengths (``count`` uint16), then the
        pickles back to back, each of at most :data:`INLINE_MAX` bytes.

        The run takes as many slots as its bytes need (after the entry's header), at most
        ``count``: an entry never takes more slots than it holds credits, so a ring as
        long as its credits never overflows. At the ring's end it goes on at the start.
        """
        r = self.rings[ring]
        n = len(blob)
        used = (_HEAD_BYTES + n + SLOT - 1) // SLOT
        if used > count:  # pragma: no cover - the sender checks every pickle's size
            raise ValueError(f"a run of {count} pickles needs {used} slots")
        first = r.pos % r.slots
        at = r.base + first * SLOT
        mm = self.mm
        room = (r.slots - first) * SLOT - _HEAD_BYTES
        if n <= room:
            mm[at + _HEAD_BYTES : at + _HEAD_BYTES + n] = blob
        else:  # wraps around the ring's end
            view = memoryview(blob)
            mm[at + _HEAD_BYTES : at + _HEAD_BYTES + room] = view[:room]
            mm[r.base : r.base + n - room] = view[room:]
        _HEAD.pack_into(mm, at, RUN, count, n)
        r.pos += used
        _post(r.items)  # release: the run is visible first
        _post(self._wake)

    def push(self, ring: int, kind: int, a: int, b: int, inline: Any = None) -> None:
        """Write one entry into ``ring`` for datapoints whose credits the caller took."""
        r = self.rings[ring]
        at = r.base + (r.pos % r.slots) * SLOT
        r.pos += 1
        mm = self.mm
        if inline is not None:
            mm[at + _HEAD_BYTES : at + _HEAD_BYTES + len(inline)] = inline
        _HEAD.pack_into(mm, at, kind, a, b)
        _post(r.items)  # release: the entry and what it names are visible first
        _post(self._wake)

    def _wait(self, sem: Any, alive: Any) -> None:
        # The ring is out of credits: the consumer is the slower side. Block on the
        # semaphore, so the first credit back wakes us at once (a futex wake on the
        # consumer's side while we sleep; none once we run). Polling in sleeps instead
        # costs nothing on the consumer's side, but a loaded machine stretches each
        # sleep to milliseconds, and the ring runs dry meanwhile (measured).
        from ..errors import TransportClosed

        ts = _Timespec()
        while True:
            _deadline(ts, _CHECK_EVERY)
            if _libc.sem_timedwait(sem, ctypes.byref(ts)) == 0:
                break
            if ctypes.get_errno() == errno.EINTR:
                continue
            if self.closed:
                raise TransportClosed("the consumer closed the shared-memory channel")
            alive()
        if self.closed:
            raise TransportClosed("the consumer closed the shared-memory channel")

    # ------------------------------------------------------------ consumer

    def request_flush(self) -> None:
        """Ask every producer to send what it has batched (the consumer waits)."""
        post = _post
        for r in self.rings:
            post(r.flush)

    def wait_flush(self, ring: int, timeout: float) -> bool:
        """Producer ``ring``'s flusher: wait up to ``timeout`` for a :meth:`request_flush`
        (or a close); True when one came (all that came are taken)."""
        sem = self.rings[ring].flush
        if _trywait(sem) != 0:
            ts = _Timespec()
            _deadline(ts, timeout)
            if _libc.sem_timedwait(sem, ctypes.byref(ts)) != 0:
                return False
        while _trywait(sem) == 0:
            pass  # requests that piled up while we were busy: one flush answers them all
        return True

    def wait_hellos(self, rings: set[int], timeout: float) -> None:
        """Remove from ``rings`` those whose worker said hello, waiting up to ``timeout``."""
        ts = _Timespec()
        _deadline(ts, timeout)
        for ring in sorted(rings):
            if _libc.sem_timedwait(self.rings[ring].hello, ctypes.byref(ts)) != 0:
                return
            rings.discard(ring)

    def wait(self, timeout: float, tried: bool = False) -> bool:
        """Take one ``wake`` (one entry is there): at once, or within ``timeout`` seconds.

        With none there, the consumer blocks on the semaphore at once. (100 more tries
        first, ~25 us, only while a core was spare, were measured and lost: 14.3k ->
        13.0k items/s at 1.2 MB with 1 worker, no gain at 4.8 MB, 64 KiB or small, and
        0.3-17 us more consumer CPU per item; docs/performance.md.)

        :param tried: the caller found none a moment ago (``wait(0)``): do not look
            once more before blocking.
        """
        trywait = _trywait
        wake = self._wake
        if not tried and trywait(wake) == 0:
            return True
        if timeout <= 0:
            return False
        now = time.monotonic()
        deadline = now + timeout
        ts = _Timespec()
        while now < deadline:
            _deadline(ts, deadline - now)
            if _libc.sem_timedwait(wake, ctypes.byref(ts)) == 0:
                return True
            if ctypes.get_errno() != errno.EINTR:
                return False
            now = time.monotonic()
        return False

    @overload
    def take(self, start: int) -> tuple[int, int, int, int, int]: ...
    @overload
    def take(self, start: int, look: bool) -> tuple[int, int, int, int, int] | None: ...

    def take(self, start: int, look: bool = False) -> tuple[int, int, int, int, int] | None:
        """Take the next entry of the first ring from ``start`` on that has one.

        Call it once per successful :meth:`wait`; or with ``look``, instead of ``wait(0)``
        and this (one call, on the consumer's path while entries come faster than it
        takes them), and then None when no entry is there or the channel is closed
        (:attr:`closed` tells which).

        :returns: (ring, kind, a, b, position of the inline bytes); read those before the
            next call.
        """
        trywait = _trywait
        if look and (trywait(self._wake) != 0 or self._closed_word[0]):
            return None
        rings = self.rings
        n = len(rings)
        i = start
        while True:
            r = rings[i]
            if trywait(r.items) == 0:  # acquire: the entry is visible
                at = r.base + (r.pos % r.slots) * SLOT
                kind, a, b = _HEAD.unpack_from(self.mm, at)
                if kind == RUN:  # b bytes after the header: see run()
                    r.run_at = r.pos
                    r.pos += (_HEAD_BYTES + b + SLOT - 1) // SLOT
                else:
                    r.pos += 1
                return i, kind, a, b, at + _HEAD_BYTES
            i = i + 1 if i + 1 < n else 0

    def run(self, ring: int, count: int, nbytes: int) -> list[Any]:
        """The ``count`` pickles of the run that :meth:`take` returned last for ``ring``
        (a RUN entry: ``a`` is ``count``, ``b`` is ``nbytes``), as memoryviews of the
        ring (of a copy, for a run that wraps around the ring's end). Read them before
        the credits go back."""
        r = self.rings[ring]
        first = r.run_at % r.slots
        at = r.base + first * SLOT + _HEAD_BYTES
        room = (r.slots - first) * SLOT - _HEAD_BYTES
        mv = self._mv
        if nbytes <= room:
            blob = mv[at : at + nbytes]
        else:  # rare: once per turn of the ring at most
            blob = memoryview(
                bytes(mv[at : at + room]) + bytes(mv[r.base : r.base + nbytes - room])
            )
        p = 2 * count
        out = []
        for n in blob[:p].cast("H").tolist():
            out.append(blob[p : p + n])
            p += n
        return out

    def release(self, ring: int, count: int = 1) -> None:
        """``count`` datapoints of ``ring`` were handed on: their credits return to the
        producer (one post each: a semaphore counts by one).

        Without batches (one datapoint per entry) that is: the entry taken last from
        ``ring`` was read, its slot is free again.
        """
        sem = self.rings[ring].free
        post = _post
        if count == 1:
            post(sem)
            return
        for _ in range(count):
            post(sem)


def _deadline(ts: _Timespec, seconds: float) -> None:
    # sem_timedwait takes an absolute CLOCK_REALTIME time.
    t = time.time() + max(0.0, seconds)
    ts.tv_sec = int(t)
    ts.tv_nsec = int((t - int(t)) * 1e9)
