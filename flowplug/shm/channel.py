"""Rings in shared memory: each worker's datapoints reach the consumer without a system call.

A store can carry a channel area (``ObjectStore(..., channels=Channels.layout(n, slots))``):
one single-producer/single-consumer ring per worker, plus three POSIX semaphores per ring
and two for the consumer, all in the store's segment. A ring entry is one slot of
:data:`SLOT` bytes: an object id (the object is in the store), a small pickle inline, or a
marker that a copy follows through another channel.

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
import struct
import sys
import time
from typing import Any

#: bytes per ring entry: 32 of header (kind, two words, padding), the rest a small pickle inline.
SLOT = 256
_HEAD_BYTES = 32
#: the largest pickle that travels inline in a slot.
INLINE_MAX = SLOT - _HEAD_BYTES
_SEM = 64  # room for one sem_t (32 bytes on glibc x86-64 and aarch64), cache-line aligned

# entry kinds
OBJECT, INLINE, COPY = 1, 2, 3

_HEAD = struct.Struct("<qqq")
# A producer whose ring is full sleeps in steps from _MIN_STEP to _MAX_STEP seconds, and
# checks every _CHECK_EVERY seconds that the consumer is alive.
_MIN_STEP, _MAX_STEP, _CHECK_EVERY = 50e-6, 0.002, 0.5
# A consumer that finds no entry polls for this long before it sleeps on the semaphore.
_SPIN_FOR = 0.002


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


def available() -> str | None:
    """None when rings work here; otherwise why not (for an error message)."""
    if _libc is None:
        return f"process-shared POSIX semaphores are not available on {sys.platform}"
    return None


def layout(num_rings: int, slots: list[int]) -> int:
    """Bytes of channel area for ``num_rings`` rings of ``slots[i]`` entries."""
    return 2 * _SEM + sum(3 * _SEM + n * SLOT for n in slots[:num_rings])


class _Ring:
    __slots__ = ("base", "free", "hello", "items", "pos", "slots")

    def __init__(self, items: int, free: int, hello: int, slots: int, base: int):
        self.items, self.free, self.hello = items, free, hello
        self.slots, self.base, self.pos = slots, base, 0


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
        self._pin = memoryview(mm)
        self.address = address
        self._wake = address + offset
        self._closed = address + offset + _SEM  # one int64 word: the consumer closed
        self._closed_at = offset + _SEM
        pos = offset + 2 * _SEM
        self.rings: list[_Ring] = []
        for n in slots:
            a = address + pos
            self.rings.append(_Ring(a, a + _SEM, a + 2 * _SEM, n, pos + 3 * _SEM))
            pos += 3 * _SEM + n * SLOT

    def init(self) -> None:
        """Set every semaphore up (the store's owner, once, before any worker starts)."""
        init = _libc.sem_init
        for sem, value in [(self._wake, 0)] + [
            (s, v) for r in self.rings for s, v in ((r.items, 0), (r.free, r.slots), (r.hello, 0))
        ]:
            if init(sem, 1, value) != 0:  # pragma: no cover - checked by available()
                raise OSError(ctypes.get_errno(), "sem_init failed for a shm ring")

    # ------------------------------------------------------------ both sides

    @property
    def closed(self) -> bool:
        return struct.unpack_from("<q", self.mm, self._closed_at)[0] != 0

    def close(self) -> None:
        """Mark the channel closed and wake everyone who waits on it."""
        struct.pack_into("<q", self.mm, self._closed_at, 1)
        post = _libc.sem_post
        post(self._wake)
        for r in self.rings:
            post(r.free)
            post(r.hello)

    # ------------------------------------------------------------ producer

    def hello(self, ring: int) -> None:
        """Say that worker ``ring`` has attached (the consumer may then unlink the store)."""
        _libc.sem_post(self.rings[ring].hello)

    def put(self, ring: int, kind: int, a: int, b: int, inline: Any, alive: Any) -> None:
        """Write one entry into ``ring``, waiting while it is full.

        :param inline: bytes for an INLINE entry (at most :data:`INLINE_MAX`), else None.
        :param alive: called every 0.5 s while waiting: raises when waiting must stop.
        :raises flowplug.TransportClosed: the consumer closed the channel.
        """
        r = self.rings[ring]
        if _libc.sem_trywait(r.free) != 0:
            self._wait(r.free, alive)
        at = r.base + (r.pos % r.slots) * SLOT
        r.pos += 1
        mm = self.mm
        if inline is not None:
            mm[at + _HEAD_BYTES : at + _HEAD_BYTES + len(inline)] = inline
        _HEAD.pack_into(mm, at, kind, a, b)
        _libc.sem_post(r.items)  # release: the entry and what it names are visible first
        _libc.sem_post(self._wake)

    def _wait(self, sem: int, alive: Any) -> None:
        # The ring is full: the consumer is the slower side. Sleeping on the semaphore
        # would make every release a futex wake (a system call, and a context switch per
        # entry); instead sleep in short steps, so the consumer's releases cost nothing
        # and the ring refills in bursts. Steps grow when the consumer does not read.
        from ..errors import TransportClosed

        trywait = _libc.sem_trywait
        step = _MIN_STEP
        check = time.monotonic() + _CHECK_EVERY
        while True:
            time.sleep(step)
            if trywait(sem) == 0:
                break
            step = min(step * 1.25, _MAX_STEP)
            if time.monotonic() >= check:
                check = time.monotonic() + _CHECK_EVERY
                if self.closed:
                    raise TransportClosed("the consumer closed the shared-memory channel")
                alive()
        if self.closed:
            raise TransportClosed("the consumer closed the shared-memory channel")

    # ------------------------------------------------------------ consumer

    def wait_hellos(self, rings: set[int], timeout: float) -> None:
        """Remove from ``rings`` those whose worker said hello, waiting up to ``timeout``."""
        ts = _Timespec()
        _deadline(ts, timeout)
        for ring in sorted(rings):
            if _libc.sem_timedwait(self.rings[ring].hello, ctypes.byref(ts)) != 0:
                return
            rings.discard(ring)

    def wait(self, timeout: float) -> bool:
        """Take one ``wake`` (one entry is there): at once, or within ``timeout`` seconds.

        While entries come often, the consumer polls in short sleeps, so a producer's post
        never has a sleeper to wake (no system call on its side); after
        :data:`_SPIN_FOR` seconds without an entry it blocks on the semaphore.
        """
        trywait = _libc.sem_trywait
        wake = self._wake
        if trywait(wake) == 0:
            return True
        if timeout <= 0:
            return False
        now = time.monotonic()
        deadline = now + timeout
        poll_until = min(deadline, now + _SPIN_FOR)
        step = _MIN_STEP
        while now < poll_until:
            time.sleep(step)
            if trywait(wake) == 0:
                return True
            step *= 1.25
            now = time.monotonic()
        ts = _Timespec()
        while now < deadline:
            _deadline(ts, deadline - now)
            if _libc.sem_timedwait(wake, ctypes.byref(ts)) == 0:
                return True
            if ctypes.get_errno() != errno.EINTR:
                return False
            now = time.monotonic()
        return False

    def take(self, start: int) -> tuple[int, int, int, int, int]:
        """Take the next entry of the first ring from ``start`` on that has one.

        Call it once per successful :meth:`wait`. :returns: (ring, kind, a, b, position of
        the inline bytes); read those before the next call.
        """
        trywait = _libc.sem_trywait
        rings = self.rings
        n = len(rings)
        i = start
        while True:
            r = rings[i]
            if trywait(r.items) == 0:  # acquire: the entry is visible
                at = r.base + (r.pos % r.slots) * SLOT
                r.pos += 1
                kind, a, b = _HEAD.unpack_from(self.mm, at)
                return i, kind, a, b, at + _HEAD_BYTES
            i = i + 1 if i + 1 < n else 0

    def release(self, ring: int) -> None:
        """The entry taken last from ``ring`` was read: its slot is free again."""
        _libc.sem_post(self.rings[ring].free)


def _deadline(ts: _Timespec, seconds: float) -> None:
    # sem_timedwait takes an absolute CLOCK_REALTIME time.
    t = time.time() + max(0.0, seconds)
    ts.tv_sec = int(t)
    ts.tv_nsec = int((t - int(t)) * 1e9)
