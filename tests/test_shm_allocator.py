"""The store's allocator on its own (flowplug.shm.allocator: pure, ordinary memory)."""

from __future__ import annotations

import itertools
import random

import pytest

from flowplug.shm.allocator import Extents


def test_first_fit_takes_the_lowest_address():
    ext = Extents.new(1 << 20)
    assert [ext.alloc(4096) for _ in range(3)] == [0, 4096, 8192]
    assert ext.used == 3 * 4096
    assert ext.extents() == [(3 * 4096, (1 << 20) - 3 * 4096)]


def test_free_merges_with_both_neighbours():
    ext = Extents.new(1 << 16)
    a, b, c = (ext.alloc(1024) for _ in range(3))
    ext.free(a, 1024)
    ext.free(c, 1024)  # merges with the tail
    assert ext.extents() == [(0, 1024), (2048, (1 << 16) - 2048)]
    ext.free(b, 1024)  # merges both sides: one extent again
    assert ext.extents() == [(0, 1 << 16)]
    assert ext.used == 0 and ext.frees == 3


def test_a_hole_is_reused_when_large_enough():
    ext = Extents.new(1 << 16)
    a = ext.alloc(4096)
    ext.alloc(4096)
    ext.free(a, 4096)
    assert ext.alloc(8192) == 8192  # the hole is too small
    assert ext.alloc(4096) == 0  # and now it fits


def test_full_returns_none_and_an_exact_fit_empties_the_list():
    ext = Extents.new(8192)
    assert ext.alloc(8193) is None
    assert ext.alloc(8192) == 0
    assert ext.extents() == [] and ext.alloc(64) is None
    ext.free(0, 8192)
    assert ext.extents() == [(0, 8192)]


def test_blocks_are_bounded_by_the_free_list_capacity():
    ext = Extents.new(1 << 20, max_extents=8)
    got = [ext.alloc(64) for _ in range(8)]
    assert got[-1] is None and None not in got[:-1]  # at most max_extents - 1 alive
    # every other one freed: the list needs one slot per hole, and has it
    for off in got[:-1:2]:
        ext.free(off, 64)
    assert len(ext.extents()) == 4  # three holes, the last one merged with the tail


@pytest.mark.parametrize("seed", range(5))
def test_random_alloc_free_never_overlaps_and_returns_everything(seed):
    rng = random.Random(seed)
    size = 1 << 16
    ext = Extents.new(size, max_extents=64)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) >= 60):
            off = rng.choice(list(live))
            ext.free(off, live.pop(off))
        else:
            n = rng.choice((64, 128, 640, 4096))
            off = ext.alloc(n)
            if off is None:
                continue
            assert 0 <= off and off + n <= size
            for o, m in live.items():
                assert off + n <= o or o + m <= off, "overlap"
            live[off] = n
        free = ext.extents()
        assert sum(n for _, n in free) + sum(live.values()) == size
        assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(free))  # merged
    for off, n in live.items():
        ext.free(off, n)
    assert ext.extents() == [(0, size)] and ext.used == 0
