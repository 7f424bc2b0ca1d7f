"""The shared-memory segment of a store: its file, its layout, its locks, and forks.

A segment is one file (in ``/dev/shm``, or in any directory for a file-backed store) that
every process of a run maps whole. It starts with a control area (16 int64 header words,
then the free list of :mod:`.allocator`: the free extents' offsets and lengths, then an
optional area for a transport's channels) and continues, page-aligned, with the data area
the store cuts into blocks.

The store's mutex (free list, reference counts) is a robust, process-shared pthread mutex
in the control area, called through ctypes: taking it free costs one atomic instruction in
user space, no system call. Robust: when its holder dies, the next process to lock it is
told (EOWNERDEAD) and goes on, so a killed process never leaves the segment locked. Where
robust mutexes are missing (not Linux) the mutex is a byte-range lock on the file instead
(byte :data:`MUTEX`), which the kernel drops at death too, at two system calls per lock.

Two more byte-range locks tell :func:`flowplug._sweep.sweep_stale` that the file is in use:

- byte :data:`OWNER_ALIVE`: held by the owner while it lives;
- byte :data:`ATTACHED`: held (shared) by every process that attached.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import struct
import sys
from typing import Any

import numpy as np

from .._sweep import default_dir, locked_by_others, new_run_id, sweep_stale
from .._sweep import lock_byte as _lock
from ..errors import ConfigError, StateError

#: every block and every buffer in it starts at a multiple of this (Arrow wants 64).
ALIGN = 64

MAGIC = 0x3170_6775_6C70_7766  # "fwplug1p", little-endian
VERSION = 2

# Control area: 16 int64 header words and a pthread mutex (64 bytes at MUTEX_AT), then the
# free extents' offsets and lengths, then the channel area (H_EXTRA_OFF, H_EXTRA_SIZE
# bytes; 0 when the store has none).
HDR_WORDS = 24
MUTEX_AT = 16 * 8
(H_MAGIC, H_VERSION, H_OWNER, H_DATA_OFF, H_DATA_SIZE, H_CLOSED, H_EXTENTS, H_MAX_EXTENTS,
 H_BLOCKS, H_USED, H_TAG, H_FREES, H_WAITING, H_EXTRA_OFF, H_EXTRA_SIZE,
 H_OWNER_WAITING) = range(16)  # fmt: skip

# Byte-range locks on the file (the bytes' contents play no part).
MUTEX, OWNER_ALIVE, ATTACHED = 0, 1, 2


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def fmt(n: int) -> str:
    """``n`` bytes for a message: ``1.5 MiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def max_extents(size: int) -> int:
    """The free list's capacity for a data area of ``size`` bytes.

    It bounds the number of blocks alive at once (one less).
    """
    return max(256, min(65536, size // 4096))


def check_room(where: str, total: int, size: int, dir_given: bool, force: bool = False) -> None:
    """Raise a ConfigError that says how to fix it when ``where`` has no room for ``total``.

    :param force: raise even if statvfs reports room (the kernel said ENOSPC anyway).
    """
    try:
        st = os.statvfs(where)
    except OSError as exc:
        raise ConfigError(f"cannot use {where!r} for a shared-memory store: {exc}") from exc
    free = st.f_bavail * st.f_frsize
    if total <= free and not force:
        return
    of = fmt(st.f_blocks * st.f_frsize)
    if force:
        msg = f"no space left to reserve {fmt(total)} in {where} ({fmt(free)} of {of} free). "
    else:
        msg = f"the shared-memory store needs {fmt(total)} in {where}, but only {fmt(free)} "
        msg += f"of {of} is free. "
    if where == "/dev/shm" and not dir_given:
        msg += (
            "Docker gives containers a 64 MB /dev/shm: run the container with "
            "--shm-size=2g (or --ipc=host), or "
        )
    msg += (
        f"make the store smaller (option size=, now {fmt(size)}), or put it in a "
        "directory on disk (option dir='/var/tmp': a file-backed store)"
    )
    raise ConfigError(msg)


def create(
    size: int, *, dir: str | None, reserve: bool, run_id: str | None, extra: int = 0
) -> tuple[str, int, mmap.mmap]:
    """Create, size and map a new segment with a data area of ``size`` bytes.

    :param extra: bytes of channel area in the control area.
    :returns: (path, fd, mapping); the caller owns the file (its owner lock is held).
    :raises flowplug.ConfigError: ``dir`` has not enough free space.
    """
    where = dir or default_dir()
    sweep_stale(where)
    k = max_extents(size)
    extra_off = align((HDR_WORDS + 2 * k) * 8)
    data_off = (extra_off + align(extra) + 4095) & ~4095
    total = data_off + size
    check_room(where, total, size, dir is not None)
    path = os.path.join(where, f"{run_id or new_run_id()}-{secrets.token_hex(4)}")
    # Build it under a name the sweeper ignores; rename once the owner's lock is held.
    temp = path + ".new"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _lock(fd, OWNER_ALIVE, fcntl.F_WRLCK)
        os.ftruncate(fd, total)
        if reserve:
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                check_room(where, total, size, dir is not None, force=True)
        mm = mmap.mmap(fd, total)
        hdr = np.frombuffer(mm, np.int64, count=HDR_WORDS)
        hdr[H_VERSION] = VERSION
        hdr[H_OWNER] = os.getpid()
        hdr[H_DATA_OFF] = data_off
        hdr[H_DATA_SIZE] = size
        hdr[H_EXTENTS] = 1
        hdr[H_MAX_EXTENTS] = k
        hdr[H_TAG] = secrets.randbits(40)
        hdr[H_EXTRA_OFF] = extra_off
        hdr[H_EXTRA_SIZE] = extra
        np.frombuffer(mm, np.int64, count=1, offset=(HDR_WORDS + k) * 8)[0] = size
        if _pthread is not None:
            _init_mutex(_address(mm) + MUTEX_AT)
        hdr[H_MAGIC] = MAGIC
        del hdr
        os.rename(temp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return path, fd, mm


def attach(name: str) -> tuple[int, mmap.mmap]:
    """Open and map the segment ``name``; take this process's attached lock.

    :raises flowplug.StateError: there is no such segment.
    :raises flowplug.ConfigError: the file is not a flowplug store.
    """
    try:
        fd = os.open(name, os.O_RDWR)
    except FileNotFoundError:
        raise StateError(
            f"no shared-memory store {name!r}: its owner closed it or died "
            "(or the store was unlinked once every process had attached)"
        ) from None
    try:
        _lock(fd, ATTACHED, fcntl.F_RDLCK)
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    if len(mm) < HDR_WORDS * 8 or struct.unpack_from("<qq", mm, 0) != (MAGIC, VERSION):
        mm.close()
        os.close(fd)
        raise ConfigError(f"{name!r} is not a flowplug shared-memory store of this version")
    return fd, mm


def reopen_after_fork(fd: int, name: str) -> int:
    """A new fd, with this (forked) process's own attached lock, for the file of ``fd``.

    The inherited fd shares the parent's open file description, and with it the parent's
    locks; the child needs its own. Works after the name was unlinked (through /proc).
    """
    try:
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    except OSError:
        new = os.open(name, os.O_RDWR)
    _lock(new, ATTACHED, fcntl.F_RDLCK)
    return new


def _load_pthread() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        for name in (
            "pthread_mutex_lock",
            "pthread_mutex_unlock",
            "pthread_mutex_consistent",
            "pthread_mutex_trylock",
        ):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_int
        lib.pthread_mutexattr_setrobust.argtypes  # noqa: B018 - present, or AttributeError
    except (OSError, AttributeError):  # pragma: no cover - a libc without robust mutexes
        return None
    return lib


_pthread = _load_pthread()


def _load_fast() -> tuple[Any, Any]:
    # trylock and unlock never block: called without releasing the GIL (PyDLL), they cost
    # a third of a CDLL call, and a process with a second thread (a batching timer) does
    # not hand the GIL over twice per store operation.
    if _pthread is None:
        return None, None
    lib = ctypes.PyDLL(None)
    trylock, unlock = lib.pthread_mutex_trylock, lib.pthread_mutex_unlock
    trylock.restype = unlock.restype = ctypes.c_int
    return trylock, unlock


_trylock, _unlock = _load_fast()
_PTHREAD_PROCESS_SHARED, _PTHREAD_MUTEX_ROBUST = 1, 1


def _address(mm: mmap.mmap) -> int:
    return np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]


def _init_mutex(at: int) -> None:
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t: 4 bytes on glibc, musl
    lib = _pthread
    if (
        lib.pthread_mutexattr_init(attr)
        or lib.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED)
        or lib.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST)
        or lib.pthread_mutex_init(ctypes.c_void_p(at), attr)
    ):  # pragma: no cover - glibc and musl support both attributes
        raise OSError(ctypes.get_errno(), "cannot set up the shared-memory store's mutex")
    lib.pthread_mutexattr_destroy(attr)


class Mutex:
    """The store's mutex, seen from one process (the segment mapped at ``address``)."""

    __slots__ = ("_lock", "_ptr", "at", "fd")

    def __init__(self, fd: int, address: int):
        self.fd = fd
        self.at = address + MUTEX_AT
        self._ptr = ctypes.c_void_p(self.at)
        if _pthread is not None:
            self._lock = _pthread.pthread_mutex_lock

    def lock(self) -> None:
        """Take the mutex (waits); goes on after a holder that died."""
        if _pthread is None:
            _lock(self.fd, MUTEX, fcntl.F_WRLCK)
            return
        err = _trylock(self._ptr)  # free: taken without letting the GIL go
        if err == errno.EBUSY:
            err = self._lock(self.at)  # held: wait, with the GIL released
        if err == errno.EOWNERDEAD:
            # Its holder died: what it was changing may be half done (as with a file lock
            # dropped at death); the store's words are each written whole, so go on.
            _pthread.pthread_mutex_consistent(self.at)
        elif err:  # pragma: no cover - EINVAL would mean a corrupt segment
            raise OSError(err, "cannot lock the shared-memory store's mutex")

    def unlock(self) -> None:
        if _pthread is None:
            _lock(self.fd, MUTEX, fcntl.F_UNLCK)
            return
        _unlock(self._ptr)


def owner_alive(fd: int) -> bool:
    """True while the owner of the segment of ``fd`` lives (holds its lock)."""
    return locked_by_others(fd, OWNER_ALIVE, 1)


def cleanup(state: list[Any], pid: int) -> None:
    """Remove the segment's file (``state[0]``, the owner's only) and close ``state[1]``."""
    if os.getpid() != pid:
        return  # a forked child that inherited the store: the file and fd are the parent's
    path, fd = state
    state[:] = [None, -1]
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if fd >= 0:
        os.close(fd)


__all__ = ["ALIGN", "default_dir", "sweep_stale"]
