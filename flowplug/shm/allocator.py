"""The store's allocator: first fit over a sorted list of free extents. Pure.

The state lives in arrays handed in (the segment's shared memory, or ordinary arrays in a
test): four counters and the free extents' offsets and lengths, sorted by offset and
merged with their neighbours on free. The caller serializes every call (the store holds
its mutex); nothing here waits, locks or knows about processes.
"""

from __future__ import annotations

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

    A new area is one extent ``(0, size)``: :meth:`init` writes it. At most
    ``len(off) - 1`` ranges are allocated at once, so a free always has a slot.

    Example::

        ext = Extents.new(1 << 20)
        a = ext.alloc(4096)     # 0
        b = ext.alloc(4096)     # 4096
        ext.free(a, 4096)
    """

    __slots__ = ("hdr", "length", "max_extents", "off")

    def __init__(self, hdr: Any, off: Any, length: Any):
        self.hdr = hdr
        self.off = off
        self.length = length
        self.max_extents = len(off)

    @classmethod
    def new(cls, size: int, max_extents: int = 256) -> Extents:
        """An allocator over ordinary memory (for tests and tools)."""
        words = np.zeros((2, max_extents), np.int64)
        ext = cls(np.zeros(16, np.int64), words[0], words[1])
        ext.init(size)
        return ext

    def init(self, size: int) -> None:
        """Make the whole area of ``size`` bytes one free extent."""
        self.hdr[H_EXTENTS] = 1
        self.off[0] = 0
        self.length[0] = size
        self.hdr[H_BLOCKS] = self.hdr[H_USED] = 0

    @property
    def used(self) -> int:
        return int(self.hdr[H_USED])

    @property
    def frees(self) -> int:
        return int(self.hdr[H_FREES])

    def alloc(self, need: int) -> int | None:
        """The offset of a new range of ``need`` bytes; None when none is free."""
        hdr = self.hdr
        n = int(hdr[H_EXTENTS])
        if n == 0 or hdr[H_BLOCKS] >= self.max_extents - 1:
            return None
        lens = self.length[:n]
        if lens[0] >= need:  # the common case, without a pass over the list
            i = 0
        else:
            fits = np.flatnonzero(lens >= need)  # first fit: lowest address, warm pages
            if fits.size == 0:
                return None
            i = int(fits[0])
        off = int(self.off[i])
        if lens[i] == need:
            self.off[i : n - 1] = self.off[i + 1 : n]
            self.length[i : n - 1] = self.length[i + 1 : n]
            hdr[H_EXTENTS] = n - 1
        else:
            self.off[i] += need
            self.length[i] -= need
        hdr[H_BLOCKS] += 1
        hdr[H_USED] += need
        return off

    def free(self, off: int, size: int) -> None:
        """Return the range ``[off, off + size)``, which :meth:`alloc` gave."""
        hdr = self.hdr
        n = int(hdr[H_EXTENTS])
        eo, el = self.off, self.length
        i = int(np.searchsorted(eo[:n], off))
        prev = i > 0 and eo[i - 1] + el[i - 1] == off
        nxt = i < n and off + size == eo[i]
        if prev and nxt:
            el[i - 1] += size + el[i]
            eo[i : n - 1] = eo[i + 1 : n]
            el[i : n - 1] = el[i + 1 : n]
            hdr[H_EXTENTS] = n - 1
        elif prev:
            el[i - 1] += size
        elif nxt:
            eo[i] = off
            el[i] += size
        else:  # at most one extent more than ranges allocated, which alloc bounds
            eo[i + 1 : n + 1] = eo[i:n].copy()
            el[i + 1 : n + 1] = el[i:n].copy()
            eo[i] = off
            el[i] = size
            hdr[H_EXTENTS] = n + 1
        hdr[H_BLOCKS] -= 1
        hdr[H_USED] -= size
        hdr[H_FREES] += 1

    def extents(self) -> list[tuple[int, int]]:
        """The free extents, ``(offset, length)`` by offset (for tests and tools)."""
        n = int(self.hdr[H_EXTENTS])
        return list(zip(self.off[:n].tolist(), self.length[:n].tolist(), strict=True))
