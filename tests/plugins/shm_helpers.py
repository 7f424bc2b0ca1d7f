"""Helpers shared by the shm tests (imported by test_shm.py and test_shm_tasks.py)."""

from __future__ import annotations

import mmap
import os

import numpy as np

from flowplug._sweep import default_dir


def segments(pid: int) -> list[str]:
    """The shared-memory entries of process ``pid`` (named after its run ids: fp-<pid>-...)."""
    return [n for n in os.listdir(default_dir()) if n.startswith(f"fp-{pid}-")]


def in_store(arr: np.ndarray) -> bool:
    """True when ``arr`` is a view of a shared-memory store (not a copy in a zmq frame)."""
    base: object = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)
