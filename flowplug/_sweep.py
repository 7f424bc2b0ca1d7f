"""Run ids, and the sweep of /dev/shm entries whose owner no longer exists.

A consumer killed by SIGKILL cannot unlink its shared memory. Every run id carries the
owner's pid (``fp-<pid>-<8 hex>``), so the next Runner of a shared-memory transport finds
such entries and unlinks those whose owner is gone. A live owner's entries are never
touched, whoever it is (parallel tests, other users).
"""

from __future__ import annotations

import os
import re
import secrets

SHM_DIR = "/dev/shm"

_RUN_ID = re.compile(r"fp-(\d+)-[0-9a-f]{8}")


def new_run_id() -> str:
    """A name unique to one run: ``fp-<this pid>-<8 random hex digits>``."""
    return f"fp-{os.getpid()}-{secrets.token_hex(4)}"


def sweep_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlink the entries of ``directory`` named with the run id of a dead process.

    :returns: the names removed.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _RUN_ID.search(name)
        if m is None or _exists(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue  # another sweeper was first, or it is not ours to remove
        removed.append(name)
    return removed


def _exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
