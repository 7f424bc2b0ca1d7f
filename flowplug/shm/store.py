"""The object store: objects in shared memory, views of them, reference counts across processes.

Objects are pickled (:func:`flowplug.serialize.dumps` with every buffer out of band) into
blocks of the store's data area; a block starts with 8 int64 words (magic, tag, nbytes,
refs, stored, kind, nbufs, stream_len); a record continues with one (block offset, tag,
start, length) per buffer, then the pickle stream, then its own buffers. Each block counts
its references across processes: one while an :class:`ObjectID` owns it, one per process
that has views of it. Reference counts and the free list (:mod:`.allocator`) change only
under the segment's mutex (:mod:`.segment`).
"""

from __future__ import annotations

import atexit
import bisect
import functools
import mmap
import os
import pickle
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..config import parse_size
from ..errors import ConfigError, DataTooLarge, ObjectNotFound, StateError, StoreFull
from ..serialize import dumps as _dumps
from . import segment
from .allocator import Extents
from .segment import (
    ALIGN,
    H_CLOSED,
    H_DATA_OFF,
    H_DATA_SIZE,
    H_FREES,
    H_MAX_EXTENTS,
    H_OWNER_WAITING,
    H_TAG,
    H_USED,
    H_WAITING,
    HDR_WORDS,
    align,
    fmt,
)

#: the size of a store when none is given.
DEFAULT_SIZE = 1 << 30

_BLOCK_MAGIC = 0x6B63_6F6C_6270_6766  # "fgpblock"
# block kinds: a pickled object, the memory of one fp.shm.empty() array, a transport's batch
_RECORD, _RAW, _BATCH = 1, 2, 3
_BLOCK = struct.Struct("<8q")
_B_MAGIC, _B_REFS, _B_STORED = 0, 3, 4  # the words a block's life changes
_BLOCK_HEAD = struct.Struct("<4q")  # magic, tag, bytes, references
_ndarray, _U8 = np.ndarray, np.dtype(np.uint8)
_ENTRY = struct.Struct("<4q")
_BLOCK_HEADER = 64
_OID = struct.Struct("<qq")
_WORD = struct.Struct("<q")

# Forks of this process so far. A store compares it with the count it saw last, and asks
# for its pid (a system call, ~0.7 us here) only when it changed, not at every operation.
_forks = [0]


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)

#: the view of an object of a block this large that :meth:`ObjectStore.take_sole` took
#: returns its memory at once when dropped, not deferred (:meth:`ObjectStore.defer_frees`):
#: a large block reused soon is still in the cache when the next datapoint is copied into
#: it (16 deferred 1.2 MB blocks are 19 MB).
FREE_AT_ONCE = 512 * 1024
#: how long a producer waiting for room sleeps at most between two looks at the store (s).
_MAX_WAIT_STEP = 0.002
#: how often a waiting producer checks that the store's owner is still alive (s).
_OWNER_CHECK = 0.5


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` for a store: ``[stream, buffer, ...]`` with every buffer out of band.

    :func:`flowplug.serialize.dumps` with no buffer too small to go out of band, so that
    every array comes back as a view. :meth:`ObjectStore.put_frames` stores the result.

    :raises TypeError: ``obj`` cannot be pickled; names the datapoint's type.
    """
    return _dumps(obj, out_of_band_min=0)


# The death of a block view is heard through a weak reference with a callback, kept here
# until it fires (as weakref.finalize keeps its own, at 3-4 times the cost per view,
# measured): the callback holds the store, so the store lives while any view does.
_watched: dict[int, weakref.ref] = {}
_exiting = [False]


def _exit() -> None:
    _exiting[0] = True  # as weakref.finalize(atexit=False): no store work during shutdown


atexit.register(_exit)


def _watch(view: Any, store: ObjectStore, off: int, tag: int, big: bool = False) -> weakref.ref:
    """A weak reference to ``view`` that tells ``store`` when the view dies (``big``: the
    block's memory returns at once, not deferred)."""
    ref = weakref.ref(view, functools.partial(store._view_died, off, tag, store._pid, big))
    _watched[id(ref)] = ref
    return ref


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
    :param channel_bytes: bytes of channel area (:mod:`flowplug.shm.channel`) to reserve
        in the control area, for a transport's rings.
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
        channel_bytes: int = 0,
    ):
        size = align(parse_size(size))
        if size <= 0:
            raise ConfigError(f"a shared-memory store needs a positive size, got {size!r}")
        path, fd, mm = segment.create(
            size, dir=dir, reserve=reserve, run_id=run_id, extra=channel_bytes
        )
        self._setup(path, fd, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> ObjectStore:
        """Attach to the store whose :attr:`name` is ``name``, from any process.

        :raises flowplug.StateError: there is no such store (its owner closed it, or died).
        """
        fd, mm = segment.attach(name)
        self = cls.__new__(cls)
        self._setup(name, fd, mm, owner=False)
        return self

    def _setup(self, path: str, fd: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = path
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._pid = os.getpid()
        self._forks = _forks[0]
        self._owner = owner
        self._closed = False
        #: bytes of the objects :meth:`take_sole` took in this process (pickle stream and
        #: buffers): what a transport reports as received (``runner.stats()``).
        self.bytes_taken = 0
        # The header and the free list as memoryviews of int64: a word read or written
        # costs ~0.1 us that way, ~0.3-2 us as a numpy scalar (measured), under the mutex.
        words = memoryview(mm)
        self._hdr = words[: HDR_WORDS * 8].cast("q")
        self._data = self._hdr[H_DATA_OFF]
        self.size = self._hdr[H_DATA_SIZE]
        k = self._hdr[H_MAX_EXTENTS]
        self._extents = Extents(
            self._hdr,
            words[HDR_WORDS * 8 : (HDR_WORDS + k) * 8].cast("q"),
            words[(HDR_WORDS + k) * 8 : (HDR_WORDS + 2 * k) * 8].cast("q"),
        )
        del words
        self._base = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
        self._mutex = segment.Mutex(fd, self._base)
        self._thread_lock = threading.Lock()
        #: views released while the lock was busy; applied by whoever holds it next.
        self._pending: list[tuple[int, int]] = []
        #: releases wait for the next store operation until this many are pending.
        self._defer = 1
        #: the owner's threads inside :meth:`waiting` (mirrored in H_OWNER_WAITING).
        self._owner_waits = 0
        #: block offset -> (weak reference to this process's view of the block, tag).
        self._local: dict[int, tuple[weakref.ref, int]] = {}
        #: [path the owner still has to remove, fd to close]; shared with the finalizer.
        self._cleanup_state: list[Any] = [path if owner else None, fd]
        self._finalizer = weakref.finalize(self, segment.cleanup, self._cleanup_state, self._pid)

    # ---------------------------------------------------------------- public API

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def used(self) -> int:
        """Bytes held by blocks (objects stored, and objects whose views are alive)."""
        self._check()
        self._drain()
        return int(self._hdr[H_USED])

    def defer_frees(self, count: int) -> None:
        """Let up to ``count`` - 1 dropped views wait for this process's next store operation.

        For a process that calls the store for every object anyway (the ``shm``
        transport's consumer takes each datapoint): the memory of a dropped view then
        returns with the next take, under the same lock, instead of taking the lock once
        more. Every operation applies what waits, :meth:`waiting` and :attr:`used` too.
        A view that :meth:`take_sole` made of a block of at least :data:`FREE_AT_ONCE`
        bytes never waits.
        """
        self._defer = max(1, count)

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
                pos = align(pos)
                entries.append([-1, 0, pos, n])
                pos += n
        need = align(pos)
        if need > self.size:
            raise DataTooLarge(
                f"an object of {fmt(data_bytes)} ({fmt(need)} with its header) cannot fit "
                f"in the shared-memory store of {fmt(self.size)} ({self.name}); make the "
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

    def take_sole(self, oid: ObjectID, loads: Any = None) -> Any:
        """:meth:`take`, for an id that no other process can use.

        For an id that came to this process alone through a private channel (the ``shm``
        transport's rings): no other process can take, get or delete the object, so when
        all its buffers lie in its own block, taking it changes no count another process
        reads, and the store's mutex is not taken. Otherwise it is :meth:`take`.

        :param loads: rebuilds the object from ``(stream, buffers)`` in that common case
            (a :class:`flowplug.serialize.Loader`); ``pickle.loads`` when None.
        :raises flowplug.ObjectNotFound: no such object.
        """
        if self._closed or self._forks != _forks[0]:
            self._check()
        off = oid.offset
        tag = oid.tag
        lock = self._thread_lock
        lock.acquire()
        try:
            mm = self._mm
            assert mm is not None
            at = self._data + off
            head = None
            if 0 <= off <= self.size - _BLOCK_HEADER and off % ALIGN == 0:
                head = _BLOCK.unpack_from(mm, at)
            if head is None or head[0] != _BLOCK_MAGIC or head[1] != tag or head[5] != _RECORD:
                self._stored_record(oid)  # raises ObjectNotFound, naming the id
            _, _, nbytes, _, stored, _, nbufs, stream_len = head  # type: ignore[misc]
            if not stored:
                self._stored_record(oid)
            pos = at + _BLOCK_HEADER
            if nbufs == 1:  # the common case: one array
                entries: Any = (_ENTRY.unpack_from(mm, pos),)
                own = entries[0][0] == off
                self.bytes_taken += stream_len + entries[0][3]
            else:
                entries = [_ENTRY.unpack_from(mm, pos + i * _ENTRY.size) for i in range(nbufs)]
                own = bool(entries) and all(e[0] == off for e in entries)
                self.bytes_taken += stream_len + sum(e[3] for e in entries)
            stream = None  # no own buffer (the record is freed below), or other blocks'
            if own:
                start = pos + _ENTRY.size * nbufs
                stream = mm[start : start + stream_len]
                # A new block: this process has no view of it, so the view takes over the
                # record's reference as it is; no count changes.
                entry = self._local.get(off)
                if entry is not None and entry[1] == tag:
                    block = self._view(off, tag, transfer=True)  # viewed already (a get())
                else:  # as _watch(), written out
                    block = _ndarray((nbytes,), _U8, mm, at)  # frombuffer, at half its cost
                    ref = weakref.ref(
                        block,
                        functools.partial(
                            self._view_died, off, tag, self._pid, nbytes >= FREE_AT_ONCE
                        ),
                    )
                    _watched[id(ref)] = ref
                    self._local[off] = (ref, tag)
                if nbufs == 1:
                    begin, length = entries[0][2:]
                    buffers = [block[begin : begin + length]]
                else:
                    buffers = [block[begin : begin + length] for _, _, begin, length in entries]
                _WORD.pack_into(mm, at + 8 * _B_STORED, 0)
        finally:
            lock.release()
        if stream is None:
            return self._load(oid, consume=True)
        if loads is not None:
            return loads(stream, buffers)
        return pickle.loads(stream, buffers=buffers)

    # ------------------------------------------------------------ batches (transports)
    # A batch block holds several small objects that one producer wrote in place, for a
    # transport that moves one id per batch through a private channel (the ``shm`` rings):
    # one allocation and one free per batch instead of per object. Its layout is the
    # transport's; the store only allocates it, trims it and hands it to the reader.

    def has_views(self) -> bool:
        """True while this process has views of the store (or arrays from :meth:`empty`):
        a buffer of an object may then lie in the store already."""
        return bool(self._local)

    def open_batch(self, nbytes: int, *, give_way: bool = False) -> tuple[int, int, int]:
        """Allocate a batch block with room for ``nbytes``; waits for room like :meth:`put`.

        :returns: (offset, tag, position in the mapping where the caller writes); the
            caller writes at most ``nbytes`` there, then calls :meth:`seal_batch`.
        :raises flowplug.StoreFull: as for :meth:`put_frames` with ``give_way``.
        """
        need = align(_BLOCK_HEADER + nbytes)
        if need > self.size:
            raise StoreFull(f"no room for a batch of {fmt(need)} in {self.name}")
        off, tag = self._allocate(need, _BATCH, None, [], give_way)
        return off, tag, self._data + off + _BLOCK_HEADER

    def seal_batch(self, off: int, tag: int, used: int, count: int, index: int) -> None:
        """Close a batch block opened with :meth:`open_batch`, before its id is sent.

        ``used`` bytes were written; the rest of the block returns to the store now.
        ``count`` and ``index`` (the transport's: how many objects, where their index
        starts) go into the block's header for the reader (:meth:`take_batch`).
        """
        mm = self._mm
        assert mm is not None
        at = self._data + off
        nbytes = _BLOCK.unpack_from(mm, at)[2]
        keep = align(_BLOCK_HEADER + used)
        struct.pack_into("<2q", mm, at + 48, count, index)
        if keep >= nbytes:
            return
        self._acquire()
        try:
            # Nobody else knows this block yet: its size changes before its id is sent.
            self._write_word(off, 2, keep)
            self._extents.trim(off, nbytes, keep)
        finally:
            self._release()

    def take_batch(self, off: int, tag: int) -> tuple[Any, int, int]:
        """The reader's view of a sealed batch block whose id came through a private
        channel (as :meth:`take_sole`: no other process can take it, so no mutex).

        :returns: (view of the block's data, count, index) as given to :meth:`seal_batch`;
            the block returns to the store once the view and every view made from it are
            garbage.
        :raises flowplug.ObjectNotFound: no such batch.
        """
        self._check()
        lock = self._thread_lock
        lock.acquire()
        try:
            if 0 <= off <= self.size - _BLOCK_HEADER and off % ALIGN == 0:
                magic, btag, _, _, stored, kind, count, index = self._block(off)
                if magic == _BLOCK_MAGIC and btag == tag and stored and kind == _BATCH:
                    block = self._view(off, tag, transfer=True)
                    self._write_word(off, _B_STORED, 0)
                    return block[_BLOCK_HEADER:], count, index
        finally:
            lock.release()
        raise ObjectNotFound(
            f"no batch at {off} (tag {tag}) in the shared-memory store {self.name}"
        )

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
        need = _BLOCK_HEADER + align(nbytes)
        if need > self.size:
            raise DataTooLarge(
                f"an array of {fmt(nbytes)} cannot fit in the shared-memory store of "
                f"{fmt(self.size)} ({self.name}); make the store larger (option size=)"
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
        self.begin_waiting()
        try:
            yield
        finally:
            self.end_waiting()

    def begin_waiting(self) -> None:
        """Announce that this process waits, as :meth:`waiting` does on entering its block.

        For a caller that waits often (the ``shm`` transport's consumer, once per empty
        ring): without the context manager's cost. Pair it with :meth:`end_waiting`.
        """
        self._add_waiting(1)

    def end_waiting(self) -> None:
        """End what :meth:`begin_waiting` announced."""
        if not self._closed:
            self._add_waiting(-1)

    def _add_waiting(self, n: int) -> None:
        self._check()
        if self._owner:
            # The owner (the transport's consumer, waiting once per empty ring) says it
            # in a word of its own, with a plain write and no mutex: no other process
            # writes that word, and a producer waiting for room reads it at every look
            # (the write reaches it before that look or at the next one).
            with self._thread_lock:
                self._owner_waits += n
                self._hdr[H_OWNER_WAITING] = 1 if self._owner_waits > 0 else 0
            if n > 0 and self._pending:
                self._drain()  # dropped views return before we wait, not after
            return
        self._acquire()
        try:
            self._hdr[H_WAITING] += n
        finally:
            self._release()

    def check_owner(self) -> None:
        """For a process that waits on the store: raise if waiting can never end.

        :raises flowplug.StateError: the store is closed, its owner closed it, or the
            owner died.
        """
        self._check()
        if self._hdr[H_CLOSED]:
            raise StateError(f"the shared-memory store {self.name} was closed by its owner")
        if not self._owner and not segment.owner_alive(self._fd):
            raise StateError(f"the owner of the shared-memory store {self.name} died")

    def channel_area(self) -> tuple[Any, int, int]:
        """(mapping, offset, address of the mapping) of the channel area, for
        :class:`flowplug.shm.channel.Channels`; the mapping stays valid while referenced."""
        self._check()
        return self._mm, int(self._hdr[segment.H_EXTRA_OFF]), self._base

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
                self._hdr[H_CLOSED] = 1  # producers waiting for room stop waiting
            self.unlink()
        self._hdr = self._extents = None  # type: ignore[assignment]
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
        state = "closed" if self._closed else f"{fmt(self.size)}"
        return f"<ObjectStore {self.name} {state}{' owner' if self._owner else ''}>"

    # ---------------------------------------------------------------- locking

    def _check(self) -> None:
        if self._closed:
            raise StateError(f"the shared-memory store {self.name} is closed")
        if self._forks != _forks[0]:
            self._forks = _forks[0]
            if os.getpid() != self._pid:
                self._after_fork()

    def _after_fork(self) -> None:
        """A forked child inherited this store: it needs its own lock and no parent state."""
        fd = segment.reopen_after_fork(self._fd, self.name)
        os.close(self._fd)  # our copy of the parent's; the parent's own stays open
        self._fd = fd
        self._mutex = segment.Mutex(fd, self._base)
        self._pid = os.getpid()
        self._owner = False
        self._cleanup_state = [None, fd]
        self._finalizer = weakref.finalize(self, segment.cleanup, self._cleanup_state, self._pid)
        self._thread_lock = threading.Lock()
        self._pending = []
        self._local = {}  # the parent's views are the parent's: their finalizers skip here

    def _acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            self._mutex.lock()
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self) -> None:
        try:
            if self._pending:
                self._drop_views()
            self._mutex.unlock()
        finally:
            self._thread_lock.release()
        if self._pending:
            self._drain()

    def _drain(self) -> None:
        # Whoever holds the thread lock applies pending releases before letting go, so a
        # release that finds the lock taken may leave its entry for the holder.
        lock = self._thread_lock
        while self._pending and not self._closed:
            if not lock.acquire(blocking=False):
                return
            try:
                self._mutex.lock()
                try:
                    self._drop_views()
                finally:
                    self._mutex.unlock()
            finally:
                lock.release()

    def _view_died(self, off: int, tag: int, pid: int, big: bool, ref: weakref.ref) -> None:
        # The callback of a view's weak reference (_watch): runs when the last reference
        # to a block view goes, in any thread, maybe inside another store operation of
        # this thread (gc): never wait for our own thread lock (the holder applies the
        # release), never raise.
        _watched.pop(id(ref), None)
        if pid != self._pid or self._forks != _forks[0] or self._closed or _exiting[0]:
            return  # a forked child's copy (the parent's views are the parent's), or exit
        pending = self._pending
        pending.append((off, tag))
        if len(pending) < self._defer and not big:
            return  # applied by this process's next store operation
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
                if self._hdr[H_CLOSED]:
                    raise StateError(f"the shared-memory store {self.name} was closed by its owner")
                got = self._alloc(need, kind)
                if got is not None:
                    for boff, _ in external:
                        refs = self._block(boff)[_B_REFS]
                        self._write_word(boff, _B_REFS, refs + 1)
                    return got
                seen = int(self._hdr[H_FREES])
            finally:
                self._release()
            # Full: wait until something is freed (a counter in the header changes).
            step = 50e-6
            hdr = self._hdr  # ours even if another thread closes the store meanwhile
            while int(hdr[H_FREES]) == seen and not hdr[H_CLOSED] and not self._closed:
                if give_way and (hdr[H_WAITING] > 0 or hdr[H_OWNER_WAITING]):
                    raise StoreFull(
                        f"no room for {fmt(need)} in the shared-memory store of "
                        f"{fmt(self.size)} ({fmt(int(hdr[H_USED]))} in use) while a "
                        "process that holds memory waits; deliver this object another way"
                    )
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise StoreFull(
                        f"no room for {fmt(need)} in the shared-memory store of "
                        f"{fmt(self.size)} ({fmt(int(hdr[H_USED]))} in use) within "
                        f"{timeout:g} s; free objects (delete them, drop their views) "
                        "or make the store larger"
                    )
                if not self._owner and now >= next_owner_check:
                    next_owner_check = now + _OWNER_CHECK
                    if not segment.owner_alive(self._fd):
                        raise StateError(f"the owner of the shared-memory store {self.name} died")
                time.sleep(step if deadline is None else max(0.0, min(step, deadline - now)))
                step = min(step * 2, _MAX_WAIT_STEP)

    def _alloc(self, need: int, kind: int) -> tuple[int, int] | None:
        off = self._extents.alloc(need)
        if off is None:
            return None
        hdr = self._hdr
        tag = int(hdr[H_TAG]) + 1
        hdr[H_TAG] = tag
        stored = 1 if kind != _RAW else 0
        _BLOCK.pack_into(self._mm, self._data + off, _BLOCK_MAGIC, tag, need, 1, stored, kind, 0, 0)  # type: ignore[arg-type]
        return off, tag

    def _unref(self, off: int, tag: int) -> None:
        magic, btag, nbytes, refs, *_ = self._block(off)
        if magic != _BLOCK_MAGIC or btag != tag:
            return  # pragma: no cover - the block went already; nothing to do
        if refs > 1:
            self._write_word(off, _B_REFS, refs - 1)
            return
        self._write_word(off, _B_MAGIC, 0)  # no longer a block: a stale id finds nothing
        self._extents.free(off, nbytes)

    def _drop_views(self) -> None:
        """Apply the pending releases of dead views (:meth:`_unref` of each, written out:
        one a datapoint on the consumer's path)."""
        pending = self._pending
        local = self._local
        mm = self._mm
        data = self._data
        free = self._extents.free
        while pending:
            off, tag = pending.pop()
            entry = local.get(off)
            if entry is not None and entry[1] == tag and entry[0]() is None:
                del local[off]
            at = data + off
            magic, btag, nbytes, refs = _BLOCK_HEAD.unpack_from(mm, at)  # type: ignore[arg-type]
            if magic != _BLOCK_MAGIC or btag != tag:
                continue  # pragma: no cover - the block went already; nothing to do
            if refs > 1:
                _WORD.pack_into(mm, at + 8 * _B_REFS, refs - 1)  # type: ignore[arg-type]
                continue
            _WORD.pack_into(mm, at, 0)  # type: ignore[arg-type]  # no longer a block
            free(off, nbytes)

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
        self._local[off] = (_watch(view, self, off, tag), tag)
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
