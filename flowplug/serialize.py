"""Pickle protocol 5 with out-of-band buffers, for transports that send frames.

``dumps(obj)`` returns a list of frames: the pickle stream first, then one frame per large
contiguous buffer (a numpy array's data, an Arrow buffer), which are *not* copied into the
stream. ``loads(frames)`` rebuilds the object on top of the given buffers, so an array
received as one frame is a view of that frame.
"""

from __future__ import annotations

import pickle
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
