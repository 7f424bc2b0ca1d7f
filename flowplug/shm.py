"""A shared-memory object store: put an object in one process, get zero-copy views in another.

The successor of the Plasma store that tensorpack's ``PlasmaPutData`` / ``PlasmaGetData``
used (pyarrow removed Plasma). A store is one file in ``/dev/shm`` (or, by option, in any
directory: a file-backed store) that every process maps::

    store = fp.shm.ObjectStore("256MiB")          # the owner creates it
    oid = store.put({"image": np.zeros((224, 224, 3), np.uint8)})   # any process that attached
    dp = store.take(oid)                          # another one: dp["image"] is a view

Objects are pickled with protocol 5 and every buffer (a numpy array's data, an Arrow
buffer) is placed out of band in the store, so numpy arrays and pyarrow arrays, record
batches and tables come back as views of the shared memory, never copied. A view keeps its
memory: the store reuses it only after the last object referring to it is garbage.

How it works: the file holds a control area (a header and the free list, a sorted list of
free extents) and a data area of ``size`` bytes cut into blocks. Every process maps the
whole file. The free list and the blocks' reference counts change only under a byte-range
lock on the file (an open-file-description lock: the kernel drops it when a process dies,
so a killed worker never leaves the store locked). Each block counts its references across
processes: one while an :class:`ObjectID` owns it, one per process that has views of it.

Names are ``<run id>-<random>``, the run id being ``fp-<owner pid>-<random>`` (a
transport's own, or a new one); the owner holds a lock on the file while it lives, so
:func:`sweep_stale` (run whenever a store is created) can remove the files of owners that
were killed, even from another pid namespace sharing ``/dev/shm``. Nothing here uses
``multiprocessing.shared_memory``, so its resource tracker never sees these segments.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import io
import mmap
import os
import pickle
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._sweep import default_dir, locked_by_others, new_run_id, sweep_stale
from ._sweep import lock_byte as _lock
from .config import parse_size
from .dataflow import DataFlow
from .errors import ConfigError, DataTooLarge, ObjectNotFound, StateError, StoreFull
from .serialize import reduce_tensor

__all__ = [
    "DEFAULT_SIZE",
    "GetData",
    "ObjectID",
    "ObjectStore",
    "PutData",
    "current_store",
    "default_dir",
    "dumps",
    "empty",
    "sweep_stale",
    "use_store",
]

#: the size of a store when none is given.
DEFAULT_SIZE = 1 << 30
#: every block and every buffer in it starts at a multiple of this (Arrow wants 64).
ALIGN = 64

_MAGIC = 0x3170_6775_6C70_7766  # "fwplug1p", little-endian
_VERSION = 1
_BLOCK_MAGIC = 0x6B63_6F6C_6270_6766  # "fgpblock"
_RECORD, _RAW = 1, 2  # block kinds: a pickled object, or the memory of one fp.shm.empty() array

# Control area: 16 int64 header words, then the free extents' offsets and lengths.
_HDR_WORDS = 16
(_H_MAGIC, _H_VERSION, _H_OWNER, _H_DATA_OFF, _H_DATA_SIZE, _H_CLOSED, _H_EXTENTS,
 _H_MAX_EXTENTS, _H_BLOCKS, _H_USED, _H_TAG, _H_FREES, _H_WAITING) = range(13)  # fmt: skip

# A block starts with 8 int64: magic, tag, nbytes, refs, stored, kind, nbufs, stream_len;
# a record continues with one (block offset, tag, start, length) per buffer, then the
# pickle stream, then its own buffers.
_BLOCK = struct.Struct("<8q")
_B_MAGIC, _B_REFS, _B_STORED = 0, 3, 4  # the words a block's life changes
_ENTRY = struct.Struct("<4q")
_BLOCK_HEADER = 64
_OID = struct.Struct("<qq")

# Byte-range locks on the file (the bytes' contents play no part). The owner's lock and
# the attachers' locks also tell the sweep (flowplug._sweep) that the store is alive.
_MUTEX, _OWNER_ALIVE, _ATTACHED = 0, 1, 2

#: how long a producer waiting for room sleeps at most between two looks at the store (s).
_MAX_WAIT_STEP = 0.002
#: how often a waiting producer checks that the store's owner is still alive (s).
_OWNER_CHECK = 0.5


class _Pickler(pickle.Pickler):
    """Protocol 5; numpy arrays that numpy would pickle in-band go out of band as bytes."""

    def reducer_override(self, obj: Any) -> Any:
        # numpy pickles datetime/timedelta arrays (no buffer format) and non-contiguous
        # arrays into the stream; as raw bytes they too come back as views of the store.
        if type(obj) is not np.ndarray:
            return reduce_tensor(obj)  # a torch tensor as its memory, so it too is a view
        if obj.dtype.hasobject or obj.size == 0:
            return NotImplemented
        if obj.dtype.kind not in "mM" and (obj.flags.c_contiguous or obj.flags.f_contiguous):
            return NotImplemented  # numpy's own protocol-5 reduce is out of band already
        order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
        if not (obj.flags.c_contiguous or obj.flags.f_contiguous):
            obj = np.ascontiguousarray(obj)
        raw = obj.reshape(-1, order=order).view(np.uint8)
        return _rebuild_array, (pickle.PickleBuffer(raw), obj.dtype, obj.shape, order)


def _rebuild_array(buf: Any, dtype: Any, shape: tuple[int, ...], order: Literal["C", "F"]) -> Any:
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` for a store: ``[stream, buffer, ...]`` with every buffer out of band.

    As :func:`flowplug.serialize.dumps`, except that no buffer is too small to go out of
    band and numpy arrays of every dtype and layout do, so that all of them come back as
    views. :meth:`ObjectStore.put_frames` stores the result.

    :raises TypeError: ``obj`` cannot be pickled; names the datapoint's type.
    """
    buffers: list[Any] = []
    out = io.BytesIO()

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        buffers.append(buf.raw())
        return False

    try:
        _Pickler(out, protocol=5, buffer_callback=out_of_band).dump(obj)
    except Exception as exc:
        raise TypeError(f"datapoint of type {type(obj).__name__} cannot be pickled: {exc}") from exc
    return [out.getvalue(), *buffers]


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _max_extents(size: int) -> int:
    # Bounds the free list, and so the number of blocks alive at once (one less).
    return max(256, min(65536, size // 4096))


def _check_room(where: str, total: int, size: int, dir_given: bool, force: bool = False) -> None:
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
    of = _fmt(st.f_blocks * st.f_frsize)
    if force:
        msg = f"no space left to reserve {_fmt(total)} in {where} ({_fmt(free)} of {of} free). "
    else:
        msg = f"the shared-memory store needs {_fmt(total)} in {where}, but only {_fmt(free)} "
        msg += f"of {of} is free. "
    if where == "/dev/shm" and not dir_given:
        msg += (
            "Docker gives containers a 64 MB /dev/shm: run the container with "
            "--shm-size=2g (or --ipc=host), or "
        )
    msg += (
        f"make the store smaller (option size=, now {_fmt(size)}), or put it in a "
        "directory on disk (option dir='/var/tmp': a file-backed store)"
    )
    raise ConfigError(msg)


def _cleanup(state: list[Any], pid: int) -> None:
    """Remove the store's file (``state[0]``, the owner's only) and close ``state[1]``."""
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


@dataclass(frozen=True)
class ObjectID:
    """The id of an object in an :class:`ObjectStore`: small, hashable and picklable.

    Send it to another process (through any transport) and rebuild the object there with
    :meth:`ObjectStore.take` or :meth:`ObjectStore.get`.
    """

    #: where the object's block starts in the store's data area.
    offset: int
    #: a number unique to this object in its store, so a stale id is never mistaken.
    tag: int

    def binary(self) -> bytes:
        """The id as 16 bytes (as Plasma's ``ObjectID.binary()``)."""
        return _OID.pack(self.offset, self.tag)

    @classmethod
    def from_binary(cls, data: bytes) -> ObjectID:
        """Rebuild an id from :meth:`binary`."""
        return cls(*_OID.unpack(data))


class ObjectStore:
    """A bounded store of objects in shared memory, shared by every process that attaches.

    ``ObjectStore(size)`` creates a store and owns it: it removes the store on
    :meth:`close`, when it is garbage collected and at interpreter exit.
    ``ObjectStore.attach(store.name)`` (or unpickling a store) attaches to it from any
    process. A full store makes :meth:`put` wait until objects are freed.

    :param size: bytes for objects, an int or a string such as ``"1GiB"``.
    :param dir: the directory of the store's file: ``/dev/shm`` (memory) by default; a
        directory on disk gives a file-backed store, when ``/dev/shm`` is too small.
    :param reserve: allocate all of ``size`` now. Memory in ``/dev/shm`` is otherwise taken
        as it is first written, and if other programs fill ``/dev/shm`` meanwhile, the
        writer dies of SIGBUS; reserved, the store fails here or never.
    :param run_id: the run id the file's name starts with (a transport passes its own);
        a new one when None. It names this process as the owner, for the stale sweep.
    :raises flowplug.ConfigError: ``dir`` has not enough free space for ``size``.

    Example::

        with fp.shm.ObjectStore("64MiB") as store:
            oid = store.put(np.arange(10))
            view = store.take(oid)          # a view of the store's memory
    """

    name: str
    size: int

    def __init__(
        self,
        size: int | str = DEFAULT_SIZE,
        *,
        dir: str | None = None,
        reserve: bool = False,
        run_id: str | None = None,
    ):
        size = _align(parse_size(size))
        if size <= 0:
            raise ConfigError(f"a shared-memory store needs a positive size, got {size!r}")
        where = dir or default_dir()
        sweep_stale(where)
        max_extents = _max_extents(size)
        data_off = (((_HDR_WORDS + 2 * max_extents) * 8) + 4095) & ~4095
        total = data_off + size
        _check_room(where, total, size, dir is not None)
        path = os.path.join(where, f"{run_id or new_run_id()}-{secrets.token_hex(4)}")
        # Build it under a name the sweeper ignores; rename once the owner's lock is held.
        temp = path + ".new"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _lock(fd, _OWNER_ALIVE, fcntl.F_WRLCK)
            os.ftruncate(fd, total)
            if reserve:
                try:
                    os.posix_fallocate(fd, 0, total)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    _check_room(where, total, size, dir is not None, force=True)
            mm = mmap.mmap(fd, total)
            hdr = np.frombuffer(mm, np.int64, count=_HDR_WORDS)
            hdr[_H_VERSION] = _VERSION
            hdr[_H_OWNER] = os.getpid()
            hdr[_H_DATA_OFF] = data_off
            hdr[_H_DATA_SIZE] = size
            hdr[_H_EXTENTS] = 1
            hdr[_H_MAX_EXTENTS] = max_extents
            hdr[_H_TAG] = secrets.randbits(40)
            np.frombuffer(mm, np.int64, count=1, offset=(_HDR_WORDS + max_extents) * 8)[0] = size
            hdr[_H_MAGIC] = _MAGIC
            del hdr
            os.rename(temp, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        self._setup(path, fd, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> ObjectStore:
        """Attach to the store whose :attr:`name` is ``name``, from any process.

        :raises flowplug.StateError: there is no such store (its owner closed it, or died).
        """
        try:
            fd = os.open(name, os.O_RDWR)
        except FileNotFoundError:
            raise StateError(
                f"no shared-memory store {name!r}: its owner closed it or died "
                "(or the store was unlinked once every process had attached)"
            ) from None
        try:
            _lock(fd, _ATTACHED, fcntl.F_RDLCK)
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        if len(mm) < _HDR_WORDS * 8 or struct.unpack_from("<q", mm, 0)[0] != _MAGIC:
            mm.close()
            os.close(fd)
            raise ConfigError(f"{name!r} is not a flowplug shared-memory store")
        self = cls.__new__(cls)
        self._setup(name, fd, mm, owner=False)
        return self

    def _setup(self, path: str, fd: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = path
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._pid = os.getpid()
        self._owner = owner
        self._closed = False
        self._hdr = np.frombuffer(mm, np.int64, count=_HDR_WORDS)
        self._data = int(self._hdr[_H_DATA_OFF])
        self.size = int(self._hdr[_H_DATA_SIZE])
        k = int(self._hdr[_H_MAX_EXTENTS])
        self._max_extents = k
        self._ext_off = np.frombuffer(mm, np.int64, count=k, offset=_HDR_WORDS * 8)
        self._ext_len = np.frombuffer(mm, np.int64, count=k, offset=(_HDR_WORDS + k) * 8)
        self._base = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
        self._thread_lock = threading.Lock()
        #: views released while the lock was busy; applied by whoever holds it next.
        self._pending: list[tuple[int, int]] = []
        #: block offset -> (weak reference to this process's view of the block, tag).
        self._local: dict[int, tuple[weakref.ref, int]] = {}
        #: [path the owner still has to remove, fd to close]; shared with the finalizer.
        self._cleanup_state: list[Any] = [path if owner else None, fd]
        self._finalizer = weakref.finalize(self, _cleanup, self._cleanup_state, self._pid)

    # ---------------------------------------------------------------- public API

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def used(self) -> int:
        """Bytes held by blocks (objects stored, and objects whose views are alive)."""
        self._check()
        return int(self._hdr[_H_USED])

    def put(self, obj: Any, *, timeout: float | None = None) -> ObjectID:
        """Store ``obj`` and return its id; waits while the store is full.

        Buffers that already live in this store (arrays from :meth:`empty`, views from
        :meth:`take`) are referenced, not copied.

        :param timeout: seconds to wait for room; None waits as long as it takes.
        :raises flowplug.DataTooLarge: ``obj`` is larger than the whole store.
        :raises flowplug.StoreFull: no room came within ``timeout``.
        :raises flowplug.StateError: the store is closed.
        :raises TypeError: ``obj`` cannot be pickled.
        """
        return self.put_frames(dumps(obj), timeout=timeout)

    def put_frames(
        self, frames: list[Any], *, timeout: float | None = None, give_way: bool = False
    ) -> ObjectID:
        """Store what :func:`dumps` made: ``[stream, buffer, ...]``.

        For a transport that pickles once and decides where the frames go.

        :param give_way: raise :class:`~flowplug.StoreFull` at once, instead of waiting for
            room, while a process announces that it waits (:meth:`waiting`): that process
            holds memory it will not free before it gets an object, so the caller delivers
            this one another way.
        """
        self._check()
        stream, buffers = frames[0], frames[1:]
        entries: list[list[int]] = []  # (block offset or -1 for own, tag, start, length)
        external: list[tuple[int, int]] = []
        pos = _BLOCK_HEADER + _ENTRY.size * len(buffers) + len(stream)
        data_bytes = len(stream)
        for buf in buffers:
            n = memoryview(buf).nbytes
            data_bytes += n
            found = self._locate(buf, n)
            if found is not None:
                entries.append([found[0], found[1], found[2], n])
                external.append(found[:2])
            else:
                pos = _align(pos)
                entries.append([-1, 0, pos, n])
                pos += n
        need = _align(pos)
        if need > self.size:
            raise DataTooLarge(
                f"an object of {_fmt(data_bytes)} ({_fmt(need)} with its header) cannot fit "
                f"in the shared-memory store of {_fmt(self.size)} ({self.name}); make the "
                "store larger: option size= of transport 'shm' (e.g. "
                "Runner(..., transport='shm', size='4GiB')), or ObjectStore(size=...)"
            )
        off, tag = self._allocate(need, _RECORD, timeout, external, give_way)
        mm = self._mm
        assert mm is not None
        at = self._data + off
        for i, (entry, buf) in enumerate(zip(entries, buffers, strict=True)):
            if entry[0] < 0:
                entry[0], entry[1] = off, tag
                if entry[3]:
                    mm[at + entry[2] : at + entry[2] + entry[3]] = buf
            _ENTRY.pack_into(mm, at + _BLOCK_HEADER + i * _ENTRY.size, *entry)
        start = at + _BLOCK_HEADER + _ENTRY.size * len(buffers)
        mm[start : start + len(stream)] = stream
        struct.pack_into("<2q", mm, at + 48, len(buffers), len(stream))
        return ObjectID(off, tag)

    def take(self, oid: ObjectID) -> Any:
        """Return the object and remove it from the store (get and delete in one step).

        Arrays in it are writable views of the store; their memory returns to the store
        once the last of them (and anything made from them) is garbage.

        :raises flowplug.ObjectNotFound: no such object (already taken or deleted).
        """
        return self._load(oid, consume=True)

    def get(self, oid: ObjectID) -> Any:
        """Return the object, leaving it stored (for other readers); views are read-only.

        :raises flowplug.ObjectNotFound: no such object.
        """
        return self._load(oid, consume=False)

    def delete(self, oid: ObjectID) -> None:
        """Remove the object; its memory returns once no view of it is alive anywhere.

        :raises flowplug.ObjectNotFound: no such object.
        """
        self._check()
        self._acquire()
        try:
            at, nbufs, _ = self._stored_record(oid)
            self._write_word(oid.offset, _B_STORED, 0)
            mm = self._mm
            assert mm is not None
            for i in range(nbufs):
                boff, btag, _, _ = _ENTRY.unpack_from(mm, at + _BLOCK_HEADER + i * _ENTRY.size)
                if boff != oid.offset:
                    self._unref(boff, btag)
            self._unref(oid.offset, oid.tag)
        finally:
            self._release()

    def __contains__(self, oid: object) -> bool:
        if not isinstance(oid, ObjectID) or self._closed:
            return False
        self._check()
        self._acquire()
        try:
            self._stored_record(oid)
        except ObjectNotFound:
            return False
        finally:
            self._release()
        return True

    def empty(
        self,
        shape: int | tuple[int, ...],
        dtype: Any = float,
        order: Literal["C", "F"] = "C",
        *,
        give_way: bool = False,
    ) -> Any:
        """A new uninitialized numpy array in the store's memory.

        Fill it in place and :meth:`put` it (or yield it from a dataflow on the ``shm``
        transport): it is referenced, never copied, so a large datapoint is written once.
        Do not write to it after putting it: the reader sees the same memory.

        :param give_way: as for :meth:`put_frames`.
        """
        self._check()
        dtype = np.dtype(dtype)
        dims: tuple[int, ...] = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.empty(dims, dtype, order=order)
        need = _BLOCK_HEADER + _align(nbytes)
        if need > self.size:
            raise DataTooLarge(
                f"an array of {_fmt(nbytes)} cannot fit in the shared-memory store of "
                f"{_fmt(self.size)} ({self.name}); make the store larger (option size=)"
            )
        off, tag = self._allocate(need, _RAW, None, [], give_way)
        self._acquire()
        try:
            block = self._view(off, tag, transfer=True)
        finally:
            self._release()
        return np.ndarray(
            dims, dtype, buffer=block[_BLOCK_HEADER : _BLOCK_HEADER + nbytes], order=order
        )

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Announce, within the ``with`` block, that this process waits and frees nothing.

        The consumer of the ``shm`` transport announces it while it waits for a datapoint
        or for room to send a task. Puts made meanwhile with ``give_way=True`` that find
        the store full raise :class:`~flowplug.StoreFull` at once, instead of waiting for
        memory that this process (its views, the items it holds back for order) would
        only free after it got what it waits for: such a wait would never end.
        """
        self._add_waiting(1)
        try:
            yield
        finally:
            if not self._closed:
                self._add_waiting(-1)

    def _add_waiting(self, n: int) -> None:
        self._check()
        self._acquire()
        try:
            self._hdr[_H_WAITING] += n
        finally:
            self._release()

    def unlink(self) -> None:
        """Remove the store's name now; processes that attached keep working.

        Call it once every process has attached: then nothing is left behind even if
        the owner is killed. Only the owner may; closing does it too.
        """
        state = self._cleanup_state
        if self._owner and os.getpid() == self._pid and state[0] is not None:
            path, state[0] = state[0], None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Detach; the owner also removes the store. Idempotent.

        Views that are still alive stay valid: the memory goes with the last of them.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:
            if self._owner:
                self._hdr[_H_CLOSED] = 1  # producers waiting for room stop waiting
            self.unlink()
        self._hdr = self._ext_off = self._ext_len = None  # type: ignore[assignment]
        self._local.clear()
        self._pending.clear()
        self._finalizer()  # removes the file (owner) and closes the fd
        mm, self._mm = self._mm, None
        try:
            mm.close()  # type: ignore[union-attr]
        except BufferError:
            pass  # live views hold the mapping; it goes with the last of them

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        return (ObjectStore.attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{_fmt(self.size)}"
        return f"<ObjectStore {self.name} {state}{' owner' if self._owner else ''}>"

    # ---------------------------------------------------------------- locking

    def _check(self) -> None:
        if self._closed:
            raise StateError(f"the shared-memory store {self.name} is closed")
        if os.getpid() != self._pid:
            self._after_fork()

    def _after_fork(self) -> None:
        """A forked child inherited this store: it needs its own lock and no parent state."""
        try:  # the name may be unlinked already; /proc reopens the same file regardless
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR)
        except OSError:
            fd = os.open(self.name, os.O_RDWR)
        _lock(fd, _ATTACHED, fcntl.F_RDLCK)
        os.close(self._fd)  # our copy of the parent's; the parent's own stays open
        self._fd = fd
        self._pid = os.getpid()
        self._owner = False
        self._cleanup_state = [None, fd]
        self._finalizer = weakref.finalize(self, _cleanup, self._cleanup_state, self._pid)
        self._thread_lock = threading.Lock()
        self._pending = []
        self._local = {}  # the parent's views are the parent's: their finalizers skip here

    def _acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            _lock(self._fd, _MUTEX, fcntl.F_WRLCK)
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self) -> None:
        try:
            while self._pending:
                self._drop_view(*self._pending.pop())
            _lock(self._fd, _MUTEX, fcntl.F_UNLCK)
        finally:
            self._thread_lock.release()
        if self._pending:
            self._drain()

    def _drain(self) -> None:
        # Whoever holds the thread lock applies pending releases before letting go, so a
        # release that finds the lock taken may leave its entry for the holder.
        while self._pending and not self._closed:
            if not self._thread_lock.acquire(blocking=False):
                return
            try:
                _lock(self._fd, _MUTEX, fcntl.F_WRLCK)
                try:
                    while self._pending:
                        self._drop_view(*self._pending.pop())
                finally:
                    _lock(self._fd, _MUTEX, fcntl.F_UNLCK)
            finally:
                self._thread_lock.release()

    def _view_died(self, off: int, tag: int, pid: int) -> None:
        # Runs when the last reference to a block view goes, in any thread, maybe inside
        # another store operation of this thread (gc): never wait for our own thread lock
        # (the holder applies the release), never raise.
        if pid != os.getpid() or self._closed:
            return
        self._pending.append((off, tag))
        try:
            self._drain()
        except Exception:  # pragma: no cover - a broken store; nothing to free into
            pass

    # ---------------------------------------------------------------- allocator
    # Everything below runs with the lock held.

    def _block(self, off: int) -> tuple[int, ...]:
        return _BLOCK.unpack_from(self._mm, self._data + off)  # type: ignore[arg-type]

    def _write_word(self, off: int, word: int, value: int) -> None:
        struct.pack_into("<q", self._mm, self._data + off + 8 * word, value)  # type: ignore[arg-type]

    def _allocate(
        self,
        need: int,
        kind: int,
        timeout: float | None,
        external: list[tuple[int, int]],
        give_way: bool = False,
    ) -> tuple[int, int]:
        """Reserve ``need`` bytes and reference ``external`` blocks; wait for room, unless
        ``give_way`` and a process :meth:`waiting`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        next_owner_check = time.monotonic() + _OWNER_CHECK
        while True:
            self._check()
            self._acquire()
            try:
                if self._hdr[_H_CLOSED]:
                    raise StateError(f"the shared-memory store {self.name} was closed by its owner")
                got = self._alloc(need, kind)
                if got is not None:
                    for boff, _ in external:
                        refs = self._block(boff)[_B_REFS]
                        self._write_word(boff, _B_REFS, refs + 1)
                    return got
                seen = int(self._hdr[_H_FREES])
            finally:
                self._release()
            # Full: wait until something is freed (a counter in the header changes).
            step = 50e-6
            hdr = self._hdr  # ours even if another thread closes the store meanwhile
            while int(hdr[_H_FREES]) == seen and not hdr[_H_CLOSED] and not self._closed:
                if give_way and hdr[_H_WAITING] > 0:
                    raise StoreFull(
                        f"no room for {_fmt(need)} in the shared-memory store of "
                        f"{_fmt(self.size)} ({_fmt(int(hdr[_H_USED]))} in use) while a "
                        "process that holds memory waits; deliver this object another way"
                    )
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise StoreFull(
                        f"no room for {_fmt(need)} in the shared-memory store of "
                        f"{_fmt(self.size)} ({_fmt(int(hdr[_H_USED]))} in use) within "
                        f"{timeout:g} s; free objects (delete them, drop their views) "
                        "or make the store larger"
                    )
                if not self._owner and now >= next_owner_check:
                    next_owner_check = now + _OWNER_CHECK
                    if not locked_by_others(self._fd, _OWNER_ALIVE, 1):
                        raise StateError(f"the owner of the shared-memory store {self.name} died")
                time.sleep(step if deadline is None else max(0.0, min(step, deadline - now)))
                step = min(step * 2, _MAX_WAIT_STEP)

    def _alloc(self, need: int, kind: int) -> tuple[int, int] | None:
        hdr = self._hdr
        n = int(hdr[_H_EXTENTS])
        if n == 0 or hdr[_H_BLOCKS] >= self._max_extents - 1:
            return None
        lens = self._ext_len[:n]
        fits = np.flatnonzero(lens >= need)  # first fit: lowest address, warm pages
        if fits.size == 0:
            return None
        i = int(fits[0])
        off = int(self._ext_off[i])
        if lens[i] == need:
            self._ext_off[i : n - 1] = self._ext_off[i + 1 : n]
            self._ext_len[i : n - 1] = self._ext_len[i + 1 : n]
            hdr[_H_EXTENTS] = n - 1
        else:
            self._ext_off[i] += need
            self._ext_len[i] -= need
        tag = int(hdr[_H_TAG]) + 1
        hdr[_H_TAG] = tag
        hdr[_H_BLOCKS] += 1
        hdr[_H_USED] += need
        stored = 1 if kind == _RECORD else 0
        _BLOCK.pack_into(self._mm, self._data + off, _BLOCK_MAGIC, tag, need, 1, stored, kind, 0, 0)  # type: ignore[arg-type]
        return off, tag

    def _free(self, off: int, size: int) -> None:
        hdr = self._hdr
        n = int(hdr[_H_EXTENTS])
        eo, el = self._ext_off, self._ext_len
        i = int(np.searchsorted(eo[:n], off))
        prev = i > 0 and eo[i - 1] + el[i - 1] == off
        nxt = i < n and off + size == eo[i]
        if prev and nxt:
            el[i - 1] += size + el[i]
            eo[i : n - 1] = eo[i + 1 : n]
            el[i : n - 1] = el[i + 1 : n]
            hdr[_H_EXTENTS] = n - 1
        elif prev:
            el[i - 1] += size
        elif nxt:
            eo[i] = off
            el[i] += size
        else:  # at most one extent more than blocks alive, which _alloc bounds
            eo[i + 1 : n + 1] = eo[i:n].copy()
            el[i + 1 : n + 1] = el[i:n].copy()
            eo[i] = off
            el[i] = size
            hdr[_H_EXTENTS] = n + 1
        hdr[_H_BLOCKS] -= 1
        hdr[_H_USED] -= size
        hdr[_H_FREES] += 1

    def _unref(self, off: int, tag: int) -> None:
        magic, btag, nbytes, refs, *_ = self._block(off)
        if magic != _BLOCK_MAGIC or btag != tag:
            return  # pragma: no cover - the block went already; nothing to do
        if refs > 1:
            self._write_word(off, _B_REFS, refs - 1)
            return
        self._write_word(off, _B_MAGIC, 0)  # no longer a block: a stale id finds nothing
        self._free(off, nbytes)

    def _drop_view(self, off: int, tag: int) -> None:
        entry = self._local.get(off)
        if entry is not None and entry[1] == tag and entry[0]() is None:
            del self._local[off]
        self._unref(off, tag)

    def _stored_record(self, oid: ObjectID) -> tuple[int, int, int]:
        """Check ``oid`` names a stored object; returns (file position, nbufs, stream_len)."""
        off = oid.offset
        if 0 <= off <= self.size - _BLOCK_HEADER and off % ALIGN == 0:
            magic, tag, _, _, stored, kind, nbufs, stream_len = self._block(off)
            if magic == _BLOCK_MAGIC and tag == oid.tag and stored and kind == _RECORD:
                return self._data + off, nbufs, stream_len
        raise ObjectNotFound(
            f"no object {oid} in the shared-memory store {self.name}: it was taken or "
            "deleted already, or put in another store"
        )

    def _view(self, off: int, tag: int, transfer: bool) -> Any:
        """This process's view of a block, made once; ``transfer``: we bring a reference."""
        entry = self._local.get(off)
        if entry is not None and entry[1] == tag:
            view = entry[0]()
            if view is not None:
                if transfer:
                    self._unref(off, tag)  # the view holds one already
                return view
        magic, btag, nbytes, refs, *_ = self._block(off)
        if magic != _BLOCK_MAGIC or btag != tag:
            raise ObjectNotFound(f"block {off} of {self.name} is gone")  # pragma: no cover
        if not transfer:
            self._write_word(off, _B_REFS, refs + 1)
        mm = self._mm
        assert mm is not None
        view = np.frombuffer(mm, np.uint8, count=nbytes, offset=self._data + off)
        weakref.finalize(view, self._view_died, off, tag, self._pid).atexit = False
        self._local[off] = (weakref.ref(view), tag)
        return view

    def _locate(self, buf: Any, nbytes: int) -> tuple[int, int, int] | None:
        """(block offset, tag, start) of a buffer that lies in a block this process views."""
        if not self._local or nbytes == 0:
            return None
        addr = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
        rel = addr - self._base - self._data
        if rel < 0 or rel + nbytes > self.size:
            return None
        keys = sorted(self._local)
        i = bisect.bisect_right(keys, rel) - 1
        if i < 0:
            return None
        off = keys[i]
        ref, tag = self._local[off]
        view = ref()
        if view is None or rel + nbytes > off + view.nbytes:
            return None
        return off, tag, rel - off

    def _load(self, oid: ObjectID, consume: bool) -> Any:
        self._check()
        buffers = []
        self._acquire()
        try:
            at, nbufs, stream_len = self._stored_record(oid)
            mm = self._mm
            assert mm is not None
            entries = [
                _ENTRY.unpack_from(mm, at + _BLOCK_HEADER + i * _ENTRY.size) for i in range(nbufs)
            ]
            start = at + _BLOCK_HEADER + _ENTRY.size * nbufs
            stream = mm[start : start + stream_len]
            own = False
            for boff, btag, begin, length in entries:
                # Taking hands the record's references to views (the stored one to the view
                # of its own block, one per entry to the other blocks); getting adds new ones.
                is_own = boff == oid.offset
                block = self._view(boff, btag, transfer=consume and not (is_own and own))
                own = own or is_own
                buffers.append(block[begin : begin + length])
            if consume:
                self._write_word(oid.offset, _B_STORED, 0)
                if not own:
                    self._unref(oid.offset, oid.tag)  # nothing refers to the record itself
        finally:
            self._release()
        if not consume:
            buffers = [memoryview(b).toreadonly() for b in buffers]
        return pickle.loads(stream, buffers=buffers)


# -------------------------------------------------------------------- the current store

_current = threading.local()


def current_store() -> ObjectStore | None:
    """The store :func:`empty` allocates in, in this thread; None outside :func:`use_store`."""
    return getattr(_current, "store", None)


@contextmanager
def use_store(store: ObjectStore | None) -> Iterator[ObjectStore | None]:
    """Make ``store`` the current store of this thread within the ``with`` block.

    The ``shm`` transport does it in each worker, so :func:`empty` there allocates in the
    transport's store.
    """
    previous = current_store()
    _current.store = store
    try:
        yield store
    finally:
        _current.store = previous


def empty(shape: int | tuple[int, ...], dtype: Any = float, order: Literal["C", "F"] = "C") -> Any:
    """A new numpy array in the current store's shared memory, or in ordinary memory.

    In a worker of the ``shm`` transport, the array lives in the transport's store: fill
    it and yield it, and it reaches the consumer without a single copy. Anywhere else
    (another transport, no store) it is ``np.empty``, so the same dataflow runs everywhere;
    so it is too when the store is full while the consumer waits (which would otherwise
    wait for this very worker: see :meth:`ObjectStore.waiting`).
    """
    store = current_store()
    if store is None or store.closed:
        return np.empty(shape, dtype, order=order)
    try:
        return store.empty(shape, dtype, order, give_way=True)
    except StoreFull:
        return np.empty(shape, dtype, order=order)


# -------------------------------------------------------------------- dataflow wrappers


class _WithStore(DataFlow):
    """Wraps ``df`` and uses a store, given as one or by name (attached in ``reset_state()``)."""

    def __init__(self, df: Any, store: ObjectStore | str):
        self.df = df
        self.store = store

    def __len__(self) -> int:
        return len(self.df)

    def reset_state(self) -> None:
        self.df.reset_state()
        self._attached()

    def _attached(self) -> ObjectStore:
        if isinstance(self.store, str):
            self.store = ObjectStore.attach(self.store)
        return self.store


class PutData(_WithStore):
    """Put each datapoint of ``df`` in a store and yield its :class:`ObjectID`.

    Tensorpack's ``PlasmaPutData``: put early (in a worker), send only the small ids
    through any runner, and :class:`GetData` the objects back late, as zero-copy views.

    :param df: the dataflow whose datapoints to store.
    :param store: the store, or its :attr:`~ObjectStore.name`; attached in ``reset_state()``.
    :param timeout: seconds a put may wait for room (None: as long as it takes).
    """

    def __init__(self, df: Any, store: ObjectStore | str, timeout: float | None = None):
        super().__init__(df, store)
        self.timeout = timeout

    def __iter__(self) -> Iterator[ObjectID]:
        store = self.store
        if isinstance(store, str):
            raise StateError("PutData: call reset_state() first; it attaches the store")
        for dp in self.df:
            yield store.put(dp, timeout=self.timeout)


class GetData(_WithStore):
    """Take each :class:`ObjectID` that ``df`` yields from a store; yield the object.

    Tensorpack's ``PlasmaGetData``. The objects' arrays are views of the store; each object
    leaves the store as it is taken, and its memory returns once its views are garbage.

    :param df: a dataflow (or runner) yielding ids made by :class:`PutData`.
    :param store: the store, or its name (attached at the latest when iterated).
    """

    def __iter__(self) -> Iterator[Any]:
        store = self._attached()
        for oid in self.df:
            yield store.take(oid)
