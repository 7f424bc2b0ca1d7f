import pickle
import threading

import numpy as np
import pytest

from flowplug.serialize import OUT_OF_BAND_MIN, dumps, dumps_bytes, loads


def test_large_arrays_travel_out_of_band_and_come_back_as_views():
    arr = np.arange(OUT_OF_BAND_MIN, dtype=np.int32)
    frames = dumps({"a": arr, "small": np.arange(3)})
    assert len(frames) == 2  # the stream and one buffer: the small array stays in-band
    assert len(frames[0]) < arr.nbytes
    buf = bytearray(frames[1])
    out = loads([frames[0], buf])
    np.testing.assert_array_equal(out["a"], arr)
    buf[:4] = b"\xff\xff\xff\xff"
    assert out["a"][0] == -1  # a view of the received buffer, not a copy


def test_fortran_order_survives():
    arr = np.asfortranarray(np.arange(OUT_OF_BAND_MIN * 2, dtype=np.float64).reshape(64, -1))
    out = loads(dumps(arr))
    assert out.flags.f_contiguous
    np.testing.assert_array_equal(out, arr)


def test_unpicklable_names_the_type():
    with pytest.raises(TypeError, match=r"datapoint of type dict cannot be pickled.*lock"):
        dumps({"lock": threading.Lock()})
    with pytest.raises(TypeError, match=r"datapoint of type function"):
        dumps_bytes(lambda: 1)


def test_dumps_bytes_round_trips():
    obj = {"x": np.ones(5), "y": "z"}
    out = pickle.loads(dumps_bytes(obj))
    assert out["y"] == "z"
    np.testing.assert_array_equal(out["x"], obj["x"])
