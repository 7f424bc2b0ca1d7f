"""The store's allocator: first fit over a sorted list of free extents. Pure.

The state lives in arrays handed in (the segment's shared memory, or ordinary arrays in a
test): four counters and the free extents' offsets and lengths, sorted by offset and
merged with their neighbours on free. The caller serializes every call (the store holds
its mutex); nothing here waits, locks or knows about processes.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from .segment import H_BLOCKS, H_EXTENTS, H_FREES, H_USED


class Extents:
    """Allocate and free ranges of a data area of ``size`` bytes.

    :param hdr: int64 array with the counters at ``H_EXTENTS`` (free extents),
        ``H_BLOCKS`` (ranges allocated), ``H_USED`` (bytes allocated) and ``H_FREES``
        (frees so far, so a waiter can see that something was freed).
    :param off: int64 array: the free extents' offsets, ``len(off)`` the most extents.
    :param length: int64 array of the same length: the free extents' lengths.

    Any int64 buffers will do (numpy arrays, memoryviews). Every call reads and writes
    them through memoryviews: an element costs ~0.1 us that way against ~0.3-2 us as a
    numpy scalar (measured), and the store's mutex is held for the whole call.

    A new area is one extent ``(0, size)``: :meth:`init` writes it. At most
    ``len(off) - 1`` ranges are allocated at once, so a free always has a slot.

    Example::

        ext = Extents.new(1 << 20)
        a = ext.alloc(4096)     # 0
        b = ext.alloc(4096)     # 4096
        ext.free(a, 4096)
    """

    __slots__ = ("_h", "_l", "_o", "hdr", "length", "max_extents", "off")

    def __init__(self, hdr: Any, off: Any, length: Any):
        self._h = _words(hdr)
        self._o = _words(off)
        self._l = _words(length)
        #: the same memory as numpy arrays (for the rare search over many extents).
        self.hdr = np.asarray(self._h)
        self.off = np.asarray(self._o)
        self.length = np.asarray(self._l)
        self.max_extents = len(self._o)

    @classmethod
    def new(cls, size: int, max_extents: int = 256) -> Extents:
        """An allocator over ordinary memory (for tests and tools)."""
        words = np.zeros((2, max_extents), np.int64)
        ext = cls(np.zeros(16, np.int64), words[0], words[1])
        ext.init(size)
        return ext

    def init(self, size: int) -> None:
        """Make the whole area of ``size`` bytes one free extent."""
        h = self._h
        h[H_EXTENTS] = 1
        self._o[0] = 0
        self._l[0] = size
        h[H_BLOCKS] = h[H_USED] = 0

    @property
    def used(self) -> int:
        return self._h[H_USED]

    @property
    def frees(self) -> int:
        return self._h[H_FREES]

    def alloc(self, need: int) -> int | None:
        """The offset of a new range of ``need`` bytes; None when none is free."""
        h = self._h
        n = h[H_EXTENTS]
        if n == 0 or h[H_BLOCKS] >= self.max_extents - 1:
            return None
        eo, el = self._o, self._l
        if el[0] >= need:  # the common case, without a pass over the list
            i = 0
        else:
            fits = np.flatnonzero(self.length[:n] >= need)  # first fit: lowest address
            if fits.size == 0:
                return None
            i = int(fits[0])
        off = eo[i]
        if el[i] == need:
            eo[i : n - 1] = eo[i + 1 : n]
            el[i : n - 1] = el[i + 1 : n]
            h[H_EXTENTS] = n - 1
        else:
            eo[i] = off + need
            el[i] -= need
        h[H_BLOCKS] += 1
        h[H_USED] += need
        return off

    def free(self, off: int, size: int) -> None:
        """Return the range ``[off, off + size)``, which :meth:`alloc` gave."""
        h = self._h
        n = h[H_EXTENTS]
        eo, el = self._o, self._l
        i = bisect.bisect_left(eo, off, 0, n)
        prev = i > 0 and eo[i - 1] + el[i - 1] == off
        nxt = i < n and off + size == eo[i]
        if prev and nxt:
            el[i - 1] += size + el[i]
            eo[i : n - 1] = eo[i + 1 : n]
            el[i : n - 1] = el[i + 1 : n]
            h[H_EXTENTS] = n - 1
        elif prev:
            el[i - 1] += size
        elif nxt:
            eo[i] = off
            el[i] += size
        else:  # at most one extent more than ranges allocated, which alloc bounds
            eo[i + 1 : n + 1] = eo[i:n]
            el[i + 1 : n + 1] = el[i:n]
            eo[i] = off
            el[i] = size
            h[H_EXTENTS] = n + 1
        h[H_BLOCKS] -= 1
        h[H_USED] -= size
        h[H_FREES] += 1

    def trim(self, off: int, size: int, keep: int) -> None:
        """Shrink the range ``[off, off + size)`` to its first ``keep`` bytes; the rest is free."""
        if keep >= size:
            return
        self.free(off + keep, size - keep)
        self._h[H_BLOCKS] += 1  # the range itself stays allocated

    def extents(self) -> list[tuple[int, int]]:
        """The free extents, ``(offset, length)`` by offset (for tests and tools)."""
        n = self._h[H_EXTENTS]
        return list(zip(self._o[:n].tolist(), self._l[:n].tolist(), strict=True))


def _words(buf: Any) -> memoryview:
    """``buf`` (int64 memory) as a memoryview of int64 items."""
    mv = memoryview(buf)
    return mv if mv.format == "q" else mv.cast("B").cast("q")
