"""Names of flowplug's shared-memory segments, and the sweep of those whose owner is gone.

A segment is ``/dev/shm/flowplug-<owner pid>-<random>``. A process killed with SIGKILL cannot
unlink its segments; ``flowplug doctor --clean`` removes them once the owner is dead.
Kept tiny so that the shm transport's own ``sweep_stale()`` can replace it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^flowplug-(\d+)-")


@dataclass(frozen=True)
class Segment:
    """One flowplug entry in :data:`SHM_DIR`."""

    path: str
    pid: int
    size: int


def owner_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_segments(shm_dir: str = SHM_DIR) -> list[Segment]:
    """The flowplug segments whose owner process no longer exists, sorted by name."""
    try:
        names = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m is None or owner_alive(int(m.group(1))):
            continue
        path = os.path.join(shm_dir, name)
        try:
            size = os.stat(path).st_blocks * 512  # what it really holds, not its length
        except FileNotFoundError:
            continue  # removed meanwhile
        found.append(Segment(path, int(m.group(1)), size))
    return found


def sweep_stale(shm_dir: str = SHM_DIR) -> list[Segment]:
    """Remove the stale segments; return those removed."""
    removed = []
    for seg in stale_segments(shm_dir):
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            continue
        removed.append(seg)
    return removed
