"""Pickle protocol 5 with out-of-band buffers, for transports that send frames.

``dumps(obj)`` returns a list of frames: the pickle stream first, then one frame per large
contiguous buffer (a numpy array's data, an Arrow buffer), which are *not* copied into the
stream. ``loads(frames)`` rebuilds the object on top of the given buffers, so an array
received as one frame is a view of that frame.
"""

from __future__ import annotations

import pickle
from array import array
from typing import Any

#: buffers smaller than this are copied into the pickle stream: a frame costs more.
OUT_OF_BAND_MIN = 8 * 1024


def dumps(obj: Any) -> list[Any]:
    """Serialize ``obj`` into ``[stream, buffer, ...]``.

    :raises TypeError: ``obj`` holds something that cannot be pickled; the message
        names the datapoint's type and the original error.
    """
    buffers: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # true means: serialize in-band
        buffers.append(raw)
        return False

    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    except Exception as exc:
        raise _not_picklable(obj, exc) from exc
    return [stream, *buffers]


def dumps_bytes(obj: Any) -> bytes:
    """Serialize ``obj`` into one bytes object (buffers in-band).

    :raises TypeError: as :func:`dumps`.
    """
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise _not_picklable(obj, exc) from exc


def _not_picklable(obj: Any, exc: Exception) -> TypeError:
    return TypeError(f"datapoint of type {type(obj).__name__} cannot be pickled: {exc}")


def loads(frames: list[Any]) -> Any:
    """Rebuild an object from the frames :func:`dumps` made (any buffer-like frames)."""
    return pickle.loads(frames[0], buffers=frames[1:])


# ---------------------------------------------------------------------------- batches
# A batch packs the frames of several small objects into one buffer, so that a transport
# moves them as one message: [header, blob]. The header is a uint64 array
# ``[n_objects, (n_frames, length, ...) per object]``; each frame starts in the blob at a
# multiple of _ALIGN, so arrays rebuilt on top of the blob are aligned.

_ALIGN = 16
_PADDING = bytes(_ALIGN)


class Batch:
    """Accumulates the frames of small objects; :meth:`take` returns ``(header, blob)``."""

    __slots__ = ("_blob", "_lengths", "count")

    def __init__(self) -> None:
        self._blob = bytearray()
        self._lengths: list[int] = [0]
        #: how many objects the batch holds.
        self.count = 0

    @property
    def nbytes(self) -> int:
        return len(self._blob)

    def add(self, frames: list[Any]) -> None:
        """Copy one object's frames (as :func:`dumps` made them) into the batch."""
        blob = self._blob
        lengths = self._lengths
        lengths.append(len(frames))
        for frame in frames:
            pad = -len(blob) % _ALIGN
            if pad:
                blob += b"\0" * pad
            start = len(blob)
            blob += frame
            lengths.append(len(blob) - start)
        self.count += 1

    def take(self) -> tuple[bytes, bytearray]:
        """Return ``(header, blob)`` and start a new, empty batch."""
        lengths = self._lengths
        lengths[0] = self.count
        header = array("Q", lengths).tobytes()
        blob = self._blob
        self._blob = bytearray()
        self._lengths = [0]
        self.count = 0
        return header, blob


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
        pad = -size % _ALIGN
        if pad:
            parts.append(_PADDING[:pad])
            size += pad
        parts.append(frame)
        size += length
    return array("Q", [1, len(frames), *lengths]).tobytes(), parts, size


def unpack_batch(header: Any, blob: Any) -> list[Any]:
    """Rebuild the objects of a batch (arrays are views of ``blob``)."""
    lengths = memoryview(header).cast("B").cast("Q")
    view = memoryview(blob)
    out = []
    pos = 1
    offset = 0
    for _ in range(lengths[0]):
        n = lengths[pos]
        pos += 1
        frames = []
        for length in lengths[pos : pos + n]:
            offset += -offset % _ALIGN
            frames.append(view[offset : offset + length])
            offset += length
        pos += n
        out.append(pickle.loads(frames[0], buffers=frames[1:]))
    return out
