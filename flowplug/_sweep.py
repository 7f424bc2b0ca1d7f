"""Run ids, and the one sweep of ``/dev/shm`` entries whose owner is gone.

Every entry flowplug keeps in ``/dev/shm`` (a shared-memory store, any segment of a
transport that declares ``uses_shared_memory``) is named after a run id:
``fp-<owner pid>-<8 hex>``, optionally followed by ``-<suffix>`` (letters, digits, ``_``
and ``-``; a name with a dot is never swept, so an entry can be built under ``<name>.new``
and renamed once it is ready). A consumer killed by SIGKILL cannot unlink its entries; the
next Runner of a shared-memory transport, every new store and ``flowplug doctor --clean``
remove those whose owner is gone.

An entry is stale when no process with its owner's pid exists here *and* no process holds
a byte-range lock (``fcntl``) on it. A live owner in another pid namespace that shares
``/dev/shm`` (a container started with ``--ipc=host``) keeps its entries locked (the
store's owner and every process attached to it do), so the sweep spares them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import struct
import tempfile
from dataclasses import dataclass

SHM_DIR = "/dev/shm"

_ENTRY = re.compile(r"fp-(\d+)-[0-9a-f]{8}(?:-[0-9A-Za-z_-]+)?")

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding to 32 bytes).
_FLOCK = struct.Struct("hhqqi4x")
# Open-file-description locks (Linux >= 3.15): the kernel drops them when the last fd of
# the open file goes, a process's death included; elsewhere, per-process POSIX locks.
_OFD = hasattr(fcntl, "F_OFD_SETLKW")
_SETLKW = fcntl.F_OFD_SETLKW if _OFD else fcntl.F_SETLKW
_SETLK = fcntl.F_OFD_SETLK if _OFD else fcntl.F_SETLK
_GETLK = fcntl.F_OFD_GETLK if _OFD else fcntl.F_GETLK


def new_run_id() -> str:
    """A name unique to one run: ``fp-<this pid>-<8 random hex digits>``."""
    return f"fp-{os.getpid()}-{secrets.token_hex(4)}"


def default_dir() -> str:
    """Where shared memory lives: ``/dev/shm``, else the temp directory."""
    return SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()


def lock_byte(fd: int, byte: int, kind: int, wait: bool = True) -> bool:
    """Set (``F_RDLCK``/``F_WRLCK``) or clear (``F_UNLCK``) the lock on one byte of ``fd``'s
    file; false when ``wait`` is false and another holds it."""
    try:
        fcntl.fcntl(fd, _SETLKW if wait else _SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def locked_by_others(fd: int, start: int = 0, length: int = 0) -> bool:
    """True when another process (or open file) holds a lock on a byte of ``fd``'s file in
    ``[start, start + length)``; a length of 0 means to the end of the file."""
    got = fcntl.fcntl(fd, _GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


@dataclass(frozen=True)
class StaleEntry:
    """An entry left behind by a process that died without removing it."""

    #: the entry's path.
    path: str
    #: the pid of its dead owner.
    pid: int
    #: the bytes it really holds (allocated blocks, not its length).
    size: int


def stale_entries(directory: str | None = None) -> list[StaleEntry]:
    """The entries of ``directory`` (:func:`default_dir` when None) whose owner is gone."""
    where = directory or default_dir()
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return []
    found = []
    for name in names:
        m = _ENTRY.fullmatch(name)
        if m is None or _exists(int(m.group(1))):
            continue
        path = os.path.join(where, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, or not ours (a directory, another user's file)
        try:
            if not locked_by_others(fd):
                found.append(StaleEntry(path, int(m.group(1)), os.fstat(fd).st_blocks * 512))
        except OSError:
            pass
        finally:
            os.close(fd)
    return found


def sweep_stale(directory: str | None = None) -> list[str]:
    """Unlink the :func:`stale_entries` of ``directory`` (:func:`default_dir` when None).

    :returns: the paths removed.
    """
    removed = []
    for entry in stale_entries(directory):
        try:
            os.unlink(entry.path)
        except OSError:
            continue  # another sweeper was first
        removed.append(entry.path)
    if removed:
        logging.getLogger("flowplug").info(
            "removed %d stale shared-memory entr%s of killed runs: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            ", ".join(removed),
        )
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
