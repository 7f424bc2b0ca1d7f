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

How it works, one module per seam: :mod:`.segment` (the file, its layout, its locks,
forks), :mod:`.allocator` (the free list, pure), :mod:`.store` (objects, views and their
reference counts across processes) and :mod:`.dataflow` (:func:`empty`, :class:`PutData`,
:class:`GetData`), plus :mod:`.channel` (the ``shm`` transport's rings). The free list and
the blocks' reference counts change only under the segment's robust mutex (when a process
dies holding it, the next one goes on, so a killed worker never leaves the store locked).

Names are ``<run id>-<random>``, the run id being ``fp-<owner pid>-<random>`` (a
transport's own, or a new one); the owner holds a lock on the file while it lives, so
:func:`sweep_stale` (run whenever a store is created) can remove the files of owners that
were killed, even from another pid namespace sharing ``/dev/shm``. Nothing here uses
``multiprocessing.shared_memory``, so its resource tracker never sees these segments.
"""

from __future__ import annotations

from .dataflow import GetData, PutData, current_store, empty, use_store
from .segment import default_dir, sweep_stale
from .store import DEFAULT_SIZE, ObjectID, ObjectStore, dumps

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
