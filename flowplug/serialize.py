"""Pickle protocol 5 with out-of-band buffers, for transports that send frames.

``dumps(obj)`` returns a list of frames: the pickle stream first, then one frame per large
contiguous buffer (a numpy array's data, an Arrow buffer), which are *not* copied into the
stream. ``loads(frames)`` rebuilds the object on top of the given buffers, so an array
received as one frame is a view of that frame.
"""

from __future__ import annotations

import io
import math
import pickle
import sys
import threading
from array import array
from typing import Any

#: buffers smaller than this are copied into the pickle stream: a frame costs more.
OUT_OF_BAND_MIN = 8 * 1024


class _Pickler(pickle.Pickler):
    """Protocol 5, with numpy arrays reduced faster than numpy does and always out of band.

    numpy pickles datetime/timedelta arrays (no buffer format) and non-contiguous arrays
    into the stream, and its own protocol-5 reduce costs ~10 us per array; here every
    array with a plain dtype becomes ``(buffer, dtype, shape, order)``, its buffer offered
    out of band like any other (non-contiguous ones are made contiguous once).
    """

    def reducer_override(self, obj: Any) -> Any:
        # numpy is loaded when an ndarray exists; `import flowplug` does not load it.
        np = sys.modules.get("numpy")
        if np is None or type(obj) is not np.ndarray:
            return reduce_tensor(obj)  # a torch tensor as its memory (see below)
        dtype = obj.dtype
        if dtype.hasobject or obj.size == 0:
            return NotImplemented
        c = obj.flags.c_contiguous
        order = "F" if obj.flags.f_contiguous and not c else "C"
        if not (c or order == "F"):
            obj = np.ascontiguousarray(obj)
        raw = obj.reshape(-1, order=order).view(np.uint8)
        plain = dtype.names is None and dtype.subdtype is None and dtype.metadata is None
        dt = dtype.str if plain else dtype
        return _rebuild_array, (pickle.PickleBuffer(raw), dt, obj.shape, order)


#: ``(np.frombuffer, np.dtype(s))`` per dtype string ``s`` seen by :func:`_rebuild_array`:
#: numpy parses the string anew on every call otherwise (about half of an array's rebuild,
#: measured). Bounded: strings beyond :data:`_DTYPES_MAX` are not kept.
_DTYPES: dict[str, tuple[Any, Any]] = {}
_DTYPES_MAX = 256


def _rebuild_array(buf: Any, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    # Per array received, on every transport's consumer: kept to two C calls for the
    # common case (a plain dtype, one dimension).
    # (a np.dtype, structured or with metadata, is never looked up: it may equal a
    # string and carry more than the string says)
    cached = _DTYPES.get(dtype) if type(dtype) is str else None
    if cached is None:
        import numpy as np  # only ever called to rebuild an array, so numpy is there

        cached = (np.frombuffer, np.dtype(dtype))
        if type(dtype) is str and len(_DTYPES) < _DTYPES_MAX:
            _DTYPES[dtype] = cached
    frombuffer, dt = cached
    array = frombuffer(buf, dt)
    if len(shape) == 1:  # the buffer holds exactly the array: frombuffer's shape is it
        return array
    return array.reshape(shape, order=order)  # type: ignore[call-overload]


class _Dumper:
    """A pickler and its buffer, reused: making one per object costs more than pickling."""

    __slots__ = ("buffers", "busy", "min", "out", "pickler")

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.buffers: list[Any] = []
        self.min = OUT_OF_BAND_MIN
        self.busy = False
        self.pickler = _Pickler(self.out, protocol=5, buffer_callback=self.offer)

    def offer(self, buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < self.min:
            return True  # true means: serialize in-band
        self.buffers.append(raw)
        return False


#: each thread's :class:`_Dumper` (attribute ``d``): one look-up per :func:`dumps`, the
#: rest are plain attributes (each attribute of a ``threading.local`` costs a look-up).
_local = threading.local()


def dumps(obj: Any, *, out_of_band_min: int = OUT_OF_BAND_MIN) -> list[Any]:
    """Serialize ``obj`` into ``[stream, buffer, ...]``: the one pickler of flowplug.

    Buffers (a numpy array's data, an Arrow buffer) of at least ``out_of_band_min``
    bytes are not copied: they become frames of their own, views of ``obj``'s memory.
    Numpy arrays of every plain dtype (datetime too) and layout (other strides are made
    contiguous once) take that path, so all of them come back as views of their frame.

    :param out_of_band_min: smaller buffers are copied into the stream (a frame costs
        more); 0 sends every buffer out of band (the shared-memory store does).
    :raises TypeError: ``obj`` holds something that cannot be pickled; the message
        names the datapoint's type and the original error.
    """
    try:
        d = _local.d
    except AttributeError:
        d = _local.d = _Dumper()
    if d.busy:  # dumps() called from inside a pickling (a __reduce__): a fresh pickler
        d = _Dumper()
    d.busy = True
    d.min = out_of_band_min
    out = d.out
    try:
        d.pickler.dump(obj)
        buffers = d.buffers
        frames = [out.getvalue(), *buffers] if buffers else [out.getvalue()]
    except Exception as exc:
        d.pickler = _Pickler(out, protocol=5, buffer_callback=d.offer)  # no half state
        raise not_picklable(obj, exc) from exc
    finally:
        d.pickler.clear_memo()
        out.seek(0)
        out.truncate()
        if d.buffers:
            d.buffers = []
        d.busy = False
    return frames


def dumps_bytes(obj: Any) -> bytes:
    """Serialize ``obj`` into one bytes object (buffers in-band).

    :raises TypeError: as :func:`dumps`.
    """
    try:
        if "torch" in sys.modules:  # tensors as their memory, not torch.save's copy
            out = io.BytesIO()
            _Pickler(out, protocol=5).dump(obj)
            return out.getvalue()
        return pickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise not_picklable(obj, exc) from exc


def not_picklable(obj: Any, exc: Exception) -> TypeError:
    """The TypeError of a datapoint that cannot be pickled, with the pickler's reason."""
    return TypeError(f"datapoint of type {type(obj).__name__} cannot be pickled: {exc}")


def loads(frames: list[Any]) -> Any:
    """Rebuild an object from the frames :func:`dumps` made (any buffer-like frames)."""
    return pickle.loads(frames[0], buffers=frames[1:])


# ---------------------------------------------------------------------------- recipes
# A consumer receives the same kind of datapoint over and over: an array, or ``(worker id,
# array)``, or a dict of arrays and labels. Their pickle streams are byte for byte the same
# (only the buffers differ), and unpickling one costs ~2 us even though it holds nothing
# but the arrays' dtype and shape: most of it the unpickler itself and its look-up of
# _rebuild_array (an import call per array, in CPython 3.11). A Loader remembers, per
# stream, a recipe that rebuilds the datapoint from its buffers without the unpickler.


class _NoRecipe(Exception):
    """The stream holds something a recipe does not rebuild: it is unpickled each time."""


class _Array:
    """What :class:`_Recorder` returns for ``_rebuild_array``: buffer ``index``'s array."""

    __slots__ = ("dtype", "index", "order", "shape")

    def __init__(self, index: int, dtype: str, shape: tuple[int, ...], order: str):
        self.index = index
        self.dtype = dtype
        self.shape = shape
        self.order = order


class _Recorder(pickle.Unpickler):
    """Unpickles a stream whose only global is :func:`_rebuild_array`, with ``buffers``
    stand-ins: each array comes out as an :class:`_Array` naming its buffer."""

    def __init__(self, stream: Any, count: int):
        self.stand_ins = [bytearray() for _ in range(count)]
        super().__init__(io.BytesIO(stream), buffers=self.stand_ins)
        self.arrays: list[_Array] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_rebuild_array":
            return self.array
        raise _NoRecipe(f"{module}.{name}")

    def array(self, buf: Any, dtype: Any, shape: Any, order: Any) -> _Array:
        # by identity: a read-only buffer comes as a memoryview of its stand-in, and is
        # not rebuilt here (pickle makes it read-only; frombuffer would not)
        index = next((i for i, s in enumerate(self.stand_ins) if s is buf), -1)
        if (
            index < 0
            or type(dtype) is not str
            or type(shape) is not tuple
            or any(type(n) is not int for n in shape)
            or order not in ("C", "F")
        ):
            raise _NoRecipe("an array this recipe does not rebuild")
        made = _Array(index, dtype, shape, order)
        self.arrays.append(made)
        return made


#: the opcodes of a stream a recipe may stand for: values, containers, the memo, and
#: globals (which :class:`_Recorder` resolves to arrays only) called with REDUCE; no
#: objects built otherwise (NEWOBJ, BUILD, extension codes, persistent ids, ...).
_PLAIN_OPS = frozenset(
    "PROTO FRAME STOP MARK MEMOIZE BINGET LONG_BINGET GET BINPUT LONG_BINPUT PUT "
    "SHORT_BINUNICODE BINUNICODE BINUNICODE8 SHORT_BINBYTES BINBYTES BINBYTES8 "
    "BININT BININT1 BININT2 LONG1 LONG4 BINFLOAT NONE NEWTRUE NEWFALSE "
    "EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST "
    "EMPTY_DICT SETITEM SETITEMS DICT STACK_GLOBAL REDUCE NEXT_BUFFER".split()
)


def _plain(stream: bytes) -> bool:
    """True when ``stream`` has only :data:`_PLAIN_OPS` (read once per new stream)."""
    try:
        import pickletools  # imported by Loader() already: no file to open here

        return all(op.name in _PLAIN_OPS for op, _, _ in pickletools.genops(stream))
    except Exception:  # not a pickle pickletools can read: unpickled as usual
        return False


#: immutable values a recipe may hand out again and again (exact types only).
_LEAVES = frozenset({int, float, str, bytes, bool, type(None)})


def _recipe(node: Any, seen: set[int], spans: bool = False) -> Any:
    """A function that rebuilds ``node`` (what :class:`_Recorder` made): of the buffers,
    or with ``spans``, of ``(base, spans, at)`` (see :meth:`Loader.from_spans`)."""
    kind = type(node)
    if kind in _LEAVES:
        return (lambda v, s, a: node) if spans else (lambda b: node)
    if id(node) in seen:  # shared or cyclic: the unpickler's memo, which recipes skip
        raise _NoRecipe("an object that appears twice")
    seen.add(id(node))
    if kind is _Array:
        cached = _DTYPES.get(node.dtype)
        if cached is None:
            import numpy as np  # arrays were sent: numpy is there

            cached = (np.frombuffer, np.dtype(node.dtype))
        frombuffer, dt = cached
        i, shape, order = node.index, node.shape, node.order
        if spans:  # one frombuffer on the base: no slice of it in between
            size = dt.itemsize
            at, length = 2 * i, 2 * i + 1
            if len(shape) == 1:
                return lambda v, s, a: frombuffer(v, dt, s[a + length] // size, s[a + at])
            return lambda v, s, a: frombuffer(v, dt, s[a + length] // size, s[a + at]).reshape(
                shape, order=order
            )
        if len(shape) == 1:  # as _rebuild_array: the buffer holds exactly the array
            return lambda b: frombuffer(b[i], dt)
        # frombuffer(...).reshape(shape, order=order) in one call (half the cost), and as
        # strict: a buffer of another size is refused, not cut
        import numpy as np  # imported already: arrays were sent

        ndarray = np.ndarray
        nbytes = dt.itemsize * math.prod(shape)

        def rebuild(b: Any) -> Any:
            buf = b[i]
            n = getattr(buf, "nbytes", None)  # an array or a memoryview: at once
            if n is None:
                n = memoryview(buf).nbytes
            if n != nbytes:  # as pickle: reshape raises
                return frombuffer(buf, dt).reshape(shape, order=order)
            return ndarray(shape, dt, buf, 0, None, order)

        return rebuild
    if kind is tuple or kind is list:
        parts = [_recipe(x, seen, spans) for x in node]
        if kind is tuple and len(parts) == 2:  # (worker id, datapoint): the Runner's tag
            first, second = parts
            if type(node[0]) in _LEAVES:  # the worker id: no call for it
                leaf = node[0]
                if spans:
                    return lambda v, s, a: (leaf, second(v, s, a))
                return lambda b: (leaf, second(b))
            if spans:
                return lambda v, s, a: (first(v, s, a), second(v, s, a))
            return lambda b: (first(b), second(b))
        if spans:
            return lambda v, s, a: kind([f(v, s, a) for f in parts])
        return lambda b: kind([f(b) for f in parts])
    if kind is dict:
        if any(type(k) not in _LEAVES for k in node):
            raise _NoRecipe("a dict key that is not a plain value")
        pairs = [(k, _recipe(v, seen, spans)) for k, v in node.items()]
        if spans:
            return lambda v, s, a: {k: f(v, s, a) for k, f in pairs}
        return lambda b: {k: f(b) for k, f in pairs}
    raise _NoRecipe(f"a {kind.__name__}")


class Loader:
    """``pickle.loads(stream, buffers=buffers)`` for a consumer that receives datapoints
    of the same make again and again, as :func:`dumps` pickled them.

    A datapoint made of numpy arrays (plain dtypes, as :func:`dumps` sends them) in
    tuples, lists and dicts, with ints, floats, strings, bytes, bools and None beside
    them, has the same stream every time; the loader keeps a recipe per stream (up to
    :attr:`RECIPES`) and rebuilds the next such datapoint from its buffers directly:
    ~0.5 us instead of ~2.5 us for an array. The result is what ``pickle.loads`` gives:
    the same values, arrays as views of the buffers, fresh containers each time. Every
    other stream (another global, a shared or read-only object, a stream that changes
    with each datapoint) is unpickled as usual; a loader whose streams keep changing
    stops looking them up. One loader per consumer thread.
    """

    #: streams a loader keeps a recipe (or "no recipe") for.
    RECIPES = 64

    __slots__ = ("_hits", "_misses", "_recipes", "_spans", "on")

    def __init__(self) -> None:
        # Now, not at the first new stream: a running consumer may have no fd to spare.
        import pickletools  # noqa: F401

        self._recipes: dict[bytes, Any] = {}
        #: the same recipes, for :meth:`from_spans`.
        self._spans: dict[bytes, Any] = {}
        self._hits = 0
        self._misses = 0
        #: false once the streams were seen to change all the time (then it only unpickles).
        self.on = True

    def __call__(self, stream: Any, buffers: Any) -> Any:
        if self.on:
            key = stream.tobytes() if type(stream) is memoryview else bytes(stream)
            recipe = self._recipes.get(key)
            if recipe is not None:
                self._hits += 1
                return recipe(buffers)
            if key not in self._recipes:
                return self._first(key, buffers)
        return pickle.loads(stream, buffers=buffers)

    def from_spans(self, stream: memoryview, base: Any, spans: Any, at: int, count: int) -> Any:
        """As ``self(stream, buffers)``, buffer ``i`` being ``base[o : o + n]`` for ``o, n =
        spans[at + 2 * i], spans[at + 2 * i + 1]`` (``i < count``): for a consumer whose
        buffers lie in one block (the ``shm`` store's batch blocks). Arrays made by a
        recipe are views of ``base`` itself (no slice of it in between).

        :param base: a numpy array (``np.frombuffer`` takes it with an offset).
        """
        if self.on:
            recipe = self._spans.get(stream.tobytes())
            if recipe is not None:
                self._hits += 1
                return recipe(base, spans, at)
        ends = spans[at : at + 2 * count]
        return self(stream, [base[o : o + n] for o, n in zip(ends[::2], ends[1::2], strict=True)])

    def span_recipe(self, stream: memoryview) -> Any:
        """The recipe :meth:`from_spans` would use for ``stream``, called as ``recipe(base,
        spans, at)``; None when there is none (yet): then call :meth:`from_spans`. For a
        consumer whose datapoints share one stream (found by its place), looked up once."""
        if not self.on:
            return None
        recipe = self._spans.get(stream.tobytes())
        if recipe is not None:
            self._hits += 1
        return recipe

    def _first(self, key: bytes, buffers: Any) -> Any:
        """A stream not seen before: unpickle it, and keep its recipe if it has one."""
        self._misses += 1
        if self._misses > 4 * self.RECIPES and self._misses > self._hits:
            self.on = False  # each datapoint its own stream (an index inside, ...)
        if len(self._recipes) >= self.RECIPES:
            return pickle.loads(key, buffers=buffers)
        recipe = None
        if b"_rebuild_array" in key and _plain(key):
            try:
                recorder = _Recorder(key, len(buffers))
                node = recorder.load()
                if len({a.index for a in recorder.arrays}) == len(recorder.arrays):
                    recipe = _recipe(node, set())  # (else one buffer in two arrays)
                    self._spans[key] = _recipe(node, set(), spans=True)
            except Exception:  # _NoRecipe; or a broken stream: pickle.loads says why below
                recipe = None
        self._recipes[key] = recipe
        return recipe(buffers) if recipe is not None else pickle.loads(key, buffers=buffers)


# ---------------------------------------------------------------------------- tensors
# torch pickles a tensor's storage in-band (through torch.save into bytes), so a tensor
# would be copied twice on the way and once more when loaded. A plain CPU tensor goes as
# its memory instead: one out-of-band buffer (the span of its storage that its strides
# reach), rebuilt in the consumer as a tensor *on* the received buffer (torch.frombuffer):
# a view of the message, or of the shared-memory store. torch is never imported here: a
# tensor exists only where torch was imported already.


def reduce_tensor(obj: Any) -> Any:
    """A reduce tuple that sends a plain CPU ``torch.Tensor`` as one out-of-band buffer.

    For a pickler's ``reducer_override``: returns ``NotImplemented`` for everything else,
    and for tensors torch must pickle itself (autograd, sparse, quantized, conjugated or
    negated views, other devices, subclasses such as ``nn.Parameter``). The tensor comes
    back with the same dtype, shape, strides and values, ``requires_grad=False``.
    """
    torch = sys.modules.get("torch")
    if torch is None or type(obj) is not torch.Tensor:
        return NotImplemented
    t = obj
    if (
        t.requires_grad
        or t.device.type != "cpu"
        or t.layout is not torch.strided
        or t.is_quantized
        or t.is_conj()
        or t.is_neg()
    ):
        return NotImplemented
    shape = tuple(t.shape)
    stride = t.stride()
    span = 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if span == 0:
        raw: Any = b""
    else:
        flat = t.as_strided((span,), (1,), t.storage_offset())
        raw = pickle.PickleBuffer(flat.view(torch.uint8).numpy())
    return _rebuild_tensor, (raw, str(t.dtype).removeprefix("torch."), shape, stride)


def _rebuild_tensor(buf: Any, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...]) -> Any:
    import torch  # only reached where a tensor was sent: torch is there

    view = memoryview(buf)
    if view.nbytes == 0:
        flat = torch.empty(0, dtype=torch.uint8)
    else:
        if view.readonly:  # bytes: torch has no read-only tensors, so this one is copied
            view = memoryview(bytearray(view))
        flat = torch.frombuffer(view, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).as_strided(shape, stride, 0)


# ---------------------------------------------------------------------------- batches
# A batch packs the frames of several small objects into one buffer, so that a transport
# moves them as one message: [header, blob]. The header is a uint64 array
# ``[n_objects, (n_frames, length, ...) per object]``; each frame starts in the blob at a
# multiple of ALIGN, so arrays rebuilt on top of the blob are aligned.

#: a batch's frames start at multiples of this many bytes in its blob (for a sender that
#: writes the batch layout itself, as Ray's actor host does).
ALIGN = 16
_PADDING = bytes(ALIGN)


class Batch:
    """Accumulates the frames of small objects; :meth:`take` returns ``(header, blob)``.

    :meth:`dump` pickles an object straight into the batch (what a batching sender does
    per object: no stream of its own, no list of frames); :meth:`add` copies frames that
    :func:`dumps` made. The batch writes into one buffer for its whole life, so its memory
    stays mapped and warm: the ``blob`` that :meth:`take` returns is a view of it, valid
    until it is released (:meth:`taken`).
    """

    __slots__ = ("_buffers", "_lengths", "_out", "_pickler", "count")

    def __init__(self) -> None:
        self._lengths: list[int] = [0]
        self._buffers: list[Any] = []
        #: how many objects the batch holds.
        self.count = 0
        self._new()

    def _new(self) -> None:
        self._out = io.BytesIO()
        self._pickler = _Pickler(self._out, protocol=5, buffer_callback=self._offer)

    def _offer(self, buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in the stream, as dumps() does
        self._buffers.append(raw)
        return False

    @property
    def nbytes(self) -> int:
        return self._out.tell()

    def dump(self, obj: Any, item_max: int) -> list[Any] | None:
        """Pickle ``obj`` into the batch, as :func:`dumps` would (same frames, same
        layout as :meth:`add`); or, when its stream and buffers come to more than
        ``item_max`` bytes, leave the batch as it was and return ``obj``'s frames (the
        stream, then views of its buffers: not copied) to be sent alone.

        :raises TypeError: as :func:`dumps`; the batch is left as it was.
        """
        out = self._out
        before = out.tell()
        start = before + (-before % ALIGN)
        if start != before:
            out.write(_PADDING[: start - before])
        buffers = self._buffers
        try:
            self._pickler.dump(obj)
        except Exception as exc:
            self._pickler = _Pickler(out, protocol=5, buffer_callback=self._offer)
            buffers.clear()
            out.seek(before)  # what lies beyond tell() is not part of the batch
            raise not_picklable(obj, exc) from exc
        finally:
            self._pickler.clear_memo()
        length = out.tell() - start
        if not buffers:
            if length <= item_max:
                self._lengths += (1, length)
                self.count += 1
                return None
            out.seek(start)
            frames: list[Any] = [out.read(length)]
        else:
            size = length + sum(b.nbytes for b in buffers)
            if size <= item_max:
                lengths = self._lengths
                lengths += (1 + len(buffers), length)
                for buf in buffers:
                    at = out.tell()
                    if at % ALIGN:
                        out.write(_PADDING[: -at % ALIGN])
                    out.write(buf)
                    lengths.append(buf.nbytes)
                buffers.clear()
                self.count += 1
                return None
            out.seek(start)
            frames = [out.read(length), *buffers]
            buffers.clear()
        out.seek(before)  # not truncate(): that would give the memory back
        return frames

    def add(self, frames: list[Any]) -> None:
        """Copy one object's frames (as :func:`dumps` made them) into the batch."""
        out = self._out
        lengths = self._lengths
        lengths.append(len(frames))
        for frame in frames:
            at = out.tell()
            if at % ALIGN:
                out.write(_PADDING[: -at % ALIGN])
            lengths.append(out.write(frame))
        self.count += 1

    def take(self) -> tuple[bytes, memoryview]:
        """Return ``(header, blob)`` and start a new, empty batch. ``blob`` is a view of
        the batch's buffer: call :meth:`taken` with it once it was sent."""
        lengths = self._lengths
        lengths[0] = self.count
        header = array("Q", lengths).tobytes()
        out = self._out
        blob = out.getbuffer()[: out.tell()]
        out.seek(0)  # not truncate(): that would give the memory back
        self._lengths = [0]
        self.count = 0
        return header, blob

    def taken(self, blob: memoryview) -> None:
        """``blob`` (from :meth:`take`) was sent: its memory is for the next batch, or,
        when the transport still holds a view of it, the batch gets new memory."""
        try:
            blob.release()
            self._out.write(b"")  # raises if another view of the buffer is still alive
        except BufferError:
            self._new()


class Run:
    """Small pickles back to back in one buffer: what the ``shm`` sender sends as one
    ring entry (a *run*).

    :meth:`dump` pickles an object straight after the run's others when its pickle has
    no out-of-band buffer and is at most ``item_max`` bytes; :meth:`take` returns the run
    as one blob: the pickles' lengths (uint16), then the pickles. Per object, that is one
    pickling into memory the run keeps (no stream of its own, no list of frames), where
    :func:`dumps` makes, copies and resets a stream per object (measured: ~0.4 us of
    ~1.1 us per small dict is the pickling). Every buffer goes out of band, as with
    ``dumps(obj, out_of_band_min=0)``, so an array is never copied into a run.
    """

    __slots__ = ("_buffers", "_lengths", "_out", "_pickler", "item_max")

    #: an object pickled to more bytes than this (sent alone) makes the run's buffer
    #: start anew, so that one huge pickle does not keep its memory for the worker's life.
    KEEP_MAX = 1 << 20

    def __init__(self, item_max: int):
        if not 0 < item_max < 1 << 16:
            raise ValueError(f"a run holds pickles of at most 65535 bytes, not {item_max}")
        self.item_max = item_max
        self._lengths = array("H")
        self._buffers: list[Any] = []
        self._new()

    def _new(self) -> None:
        self._out = io.BytesIO()
        self._pickler = _Pickler(self._out, protocol=5, buffer_callback=self._offer)

    def _offer(self, buf: pickle.PickleBuffer) -> bool:
        self._buffers.append(buf.raw())
        return False  # every buffer out of band

    @property
    def count(self) -> int:
        """How many pickles the run holds."""
        return len(self._lengths)

    def dump(self, obj: Any) -> list[Any] | None:
        """Pickle ``obj`` onto the end of the run, as :func:`dumps` would with
        ``out_of_band_min=0``; None when it joined the run. Otherwise (it has out-of-band
        buffers, or its pickle is longer than :attr:`item_max`) the run is left as it
        was and ``obj``'s frames are returned: the stream (copied), then views of its
        buffers.

        :raises TypeError: as :func:`dumps`; the run is left as it was.
        """
        out = self._out
        start = out.tell()
        buffers = self._buffers
        try:
            self._pickler.dump(obj)
        except Exception as exc:
            buffers.clear()
            self._pickler = _Pickler(out, protocol=5, buffer_callback=self._offer)  # no half state
            out.seek(start)
            raise not_picklable(obj, exc) from exc
        finally:
            self._pickler.clear_memo()
        length = out.tell() - start
        if not buffers and length <= self.item_max:
            self._lengths.append(length)
            return None
        out.seek(start)
        frames = [out.read(length), *buffers]
        buffers.clear()
        out.seek(start)  # what lies beyond tell() is not part of the run
        if length > self.KEEP_MAX and not start:
            self._new()
        return frames

    def pop(self) -> bytes:
        """Take the last pickle off the run; :returns: it."""
        length = self._lengths.pop()
        out = self._out
        start = out.tell() - length
        out.seek(start)
        stream = out.read(length)
        out.seek(start)
        return stream

    def add(self, stream: bytes) -> None:
        """Put a pickle (of at most :attr:`item_max` bytes) onto the end of the run."""
        self._out.write(stream)
        self._lengths.append(len(stream))

    def take(self) -> bytes:
        """The run as one blob (``count`` uint16 lengths, then the pickles back to back);
        the run is empty afterwards."""
        out = self._out
        n = out.tell()
        with out.getbuffer() as mv, mv[:n] as body:
            blob = b"".join((self._lengths, body))
        out.seek(0)  # not truncate(): the memory serves the next run
        del self._lengths[:]
        return blob


def batch_of_one(frames: list[Any]) -> tuple[bytes, list[Any], int]:
    """Lay out one object's frames as a batch of one, without copying them.

    For a transport that writes a large object with one gathered write (``writev``) where
    it would write a :class:`Batch`: the receiver rebuilds both with :func:`unpack_batch`.

    :returns: ``(header, parts, size)``: the batch header, the blob as a list of buffers
        (the frames, with padding between them), and the blob's size in bytes.
    """
    lengths = [memoryview(f).nbytes for f in frames]
    parts: list[Any] = []
    size = 0
    for frame, length in zip(frames, lengths, strict=True):
        pad = -size % ALIGN
        if pad:
            parts.append(_PADDING[:pad])
            size += pad
        parts.append(frame)
        size += length
    return array("Q", [1, len(frames), *lengths]).tobytes(), parts, size


def unpack_batch(header: Any, blob: Any) -> list[Any]:
    """Rebuild the objects of a batch (arrays are views of ``blob``).

    ``header`` is the uint64 array ``[entries, entry, ...]`` that :meth:`Batch.take` makes;
    each entry is ``(frames, length, ...)``: one object, its frames at multiples of
    :data:`ALIGN` in ``blob``; or ``(0, items, length)``: one frame holding a pickled
    *list* of ``items`` objects, which come out one by one (a sender that pickles a batch of
    small plain objects at once, as Ray's actor host does: one ``loads`` for all of them).
    """
    lengths = memoryview(header).cast("B").cast("Q").tolist()
    view = memoryview(blob).cast("B")
    loads = pickle.loads
    out: list[Any] = []
    pos = 1
    offset = 0
    for _ in range(lengths[0]):
        n = lengths[pos]
        if n == 1:  # the common case, a small object: one frame, no buffers
            length = lengths[pos + 1]
            out.append(loads(view[offset : offset + length]))
            offset += length + (-length % ALIGN)
            pos += 2
            continue
        if n == 0:  # a pickled list of objects
            length = lengths[pos + 2]
            out.extend(loads(view[offset : offset + length]))
            offset += length + (-length % ALIGN)
            pos += 3
            continue
        frames = []
        for length in lengths[pos + 1 : pos + 1 + n]:
            frames.append(view[offset : offset + length])
            offset += length + (-length % ALIGN)
        pos += n + 1
        out.append(loads(frames[0], buffers=frames[1:]))
    return out
