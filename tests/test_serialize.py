import pickle
import threading

import numpy as np
import pytest

from flowplug.serialize import (
    ALIGN,
    OUT_OF_BAND_MIN,
    Loader,
    Run,
    dumps,
    dumps_bytes,
    loads,
    unpack_batch,
)


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


def _run_pickles(blob: bytes, count: int) -> list:
    """The objects of a :meth:`Run.take` blob: ``count`` uint16 lengths, then the pickles."""
    lengths = np.frombuffer(blob, np.uint16, count).tolist()
    out, at = [], 2 * count
    for n in lengths:
        out.append(pickle.loads(blob[at : at + n]))
        at += n
    assert at == len(blob)
    return out


def test_a_run_holds_small_pickles_back_to_back_and_returns_the_rest_as_frames():
    """Small plain objects join the run; an object with a buffer (even a tiny array: every
    buffer goes out of band, as in the shm store), a pickle longer than the limit, and an
    unpicklable object leave the run as it was."""
    run = Run(64)
    assert run.dump({"i": 0}) is None
    assert run.dump("x" * 100) is not None  # a pickle of more than 64 bytes: alone
    frames = run.dump({"a": np.arange(3)})
    assert frames is not None and len(frames) == 2  # stream and the array's buffer
    np.testing.assert_array_equal(loads(frames)["a"], np.arange(3))
    with pytest.raises(TypeError, match=r"datapoint of type dict cannot be pickled"):
        run.dump({"lock": threading.Lock()})
    assert run.dump((1, "b")) is None
    assert run.count == 2
    assert _run_pickles(run.take(), 2) == [{"i": 0}, (1, "b")]
    assert run.count == 0

    # the next run starts empty, in the same memory; pop and add move its last pickle
    for i in range(5):
        assert run.dump(i) is None
    last = run.pop()
    assert pickle.loads(last) == 4 and run.count == 4
    run.add(last)
    run.add(pickle.dumps("y", protocol=5))
    assert _run_pickles(run.take(), 6) == [0, 1, 2, 3, 4, "y"]


def test_a_huge_pickle_sent_alone_does_not_keep_its_memory_in_the_run():
    run = Run(64)
    big = "z" * (2 * Run.KEEP_MAX)
    frames = run.dump(big)
    assert frames is not None and pickle.loads(frames[0]) == big
    assert run._out.getbuffer().nbytes < Run.KEEP_MAX  # a new buffer
    assert run.dump(7) is None
    assert _run_pickles(run.take(), 1) == [7]


def test_dumps_bytes_round_trips():
    obj = {"x": np.ones(5), "y": "z"}
    out = pickle.loads(dumps_bytes(obj))
    assert out["y"] == "z"
    np.testing.assert_array_equal(out["x"], obj["x"])


def test_unpack_batch_reads_pickled_list_entries_in_place():
    """An entry ``(0, items, length)`` is one frame holding a pickled list (Ray's actor host
    sends a batch of small plain datapoints so): its objects come out one by one, in their
    place among the batch's other entries; an empty list adds nothing."""
    plain = [{"idx": i, "name": "cat", "box": (1, 2)} for i in range(3)]
    arr = np.arange(OUT_OF_BAND_MIN, dtype=np.float64)
    # ("frames", frames as dumps makes them) or ("list", the objects pickled as one list)
    entries = [
        ("frames", dumps("first")),
        ("list", plain),
        ("frames", dumps({"a": arr})),
        ("list", []),
        ("frames", dumps((None, b"z"))),
    ]
    lengths = [len(entries)]
    blob = bytearray()
    for kind, value in entries:
        if kind == "list":
            frames = [pickle.dumps(value, protocol=5)]
            lengths += [0, len(value), len(frames[0])]
        else:
            frames = value
            lengths += [len(frames), *(memoryview(f).nbytes for f in frames)]
        for frame in frames:
            blob += frame
            blob += bytes(-len(blob) % ALIGN)
    header = np.array(lengths, dtype=np.uint64).tobytes()
    got = unpack_batch(header, blob)
    assert len(got) == 6
    assert got[0] == "first" and got[1:4] == plain and got[5] == (None, b"z")
    np.testing.assert_array_equal(got[4]["a"], arr)
    assert np.shares_memory(got[4]["a"], np.frombuffer(blob, np.uint8))  # a view, no copy


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(OUT_OF_BAND_MIN, dtype=np.float32),  # 1-D: no reshape
        np.arange(OUT_OF_BAND_MIN, dtype=np.int16).reshape(8, -1),
        np.asfortranarray(np.arange(OUT_OF_BAND_MIN, dtype=">i8").reshape(-1, 4)),
        np.array(7.5),  # 0-d
        np.arange(OUT_OF_BAND_MIN).astype("M8[ms]"),
        np.array(["ab", "cde"] * OUT_OF_BAND_MIN, dtype="<U3"),
        np.zeros(OUT_OF_BAND_MIN, dtype=[("x", "<f8"), ("y", "u1", (3,))]),
        np.zeros(OUT_OF_BAND_MIN, dtype=np.dtype("<f4", metadata={"unit": "m"})),
    ],
    ids=["1d", "2d", "fortran-big-endian", "0d", "datetime", "unicode", "structured", "metadata"],
)
def test_arrays_come_back_with_their_dtype_shape_and_layout(arr):
    """The rebuild keeps each dtype string's np.dtype (parsed once): every dtype, shape
    and layout still comes back exactly, twice in a row, and as a view of its frame."""
    for _ in range(2):  # the second time, the dtype comes from the cache
        frames = dumps(arr, out_of_band_min=0)
        buf = bytearray(frames[1])
        out = loads([frames[0], buf])
        assert out.dtype == arr.dtype and out.dtype.metadata == arr.dtype.metadata
        assert out.shape == arr.shape
        assert out.flags.f_contiguous == arr.flags.f_contiguous
        assert out.flags.c_contiguous == arr.flags.c_contiguous
        np.testing.assert_array_equal(out, arr)
        assert np.shares_memory(out, np.frombuffer(buf, np.uint8))


def _same(a, b):
    """``a`` and ``b`` are equal, type for type and array for array (dtype, shape, layout)."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.flags.f_contiguous == b.flags.f_contiguous
        assert a.flags.writeable == b.flags.writeable
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


ARR = np.arange(OUT_OF_BAND_MIN, dtype=np.float32)


@pytest.mark.parametrize(
    "obj",
    [
        ARR,
        (0, ARR),
        (1, 2, ARR, None),
        [ARR, ARR + 1, "x"],
        {"image": ARR.reshape(16, -1), "label": 3, "w": 0.5, "name": "cat", "b": b"x"},
        (0, {"depth": np.asfortranarray(ARR.reshape(-1, 8)), "flag": True, "n": None}),
        {"nested": {"deeper": [(ARR, 1.5)]}},
    ],
    ids=["array", "tagged", "tuple", "list", "dict", "tagged-dict", "nested"],
)
def test_a_loader_rebuilds_what_pickle_does_from_new_buffers(obj):
    """The second datapoint of the same make comes from the loader's recipe: equal to what
    pickle.loads gives, with its arrays as views of *its* buffers and fresh containers."""
    loader = Loader()
    frames = dumps(obj, out_of_band_min=0)
    outs = []
    for k in range(3):
        bufs = [bytearray(f) for f in frames[1:]]
        out = loader(memoryview(frames[0]), bufs)
        _same(out, pickle.loads(frames[0], buffers=[bytearray(f) for f in frames[1:]]))
        if bufs:  # a view of the buffer it was given: writing there shows in the array
            bufs[0][:4] = b"\x00\x00\x80\x3f" if k else b"\x00\x00\x00\x40"
            first = np.frombuffer(bufs[0], np.uint8)
            assert any(
                np.shares_memory(a, first)
                for a in _arrays(out)  # the first buffer's array, wherever it sits
            )
        outs.append(out)
    assert loader._hits == 2  # the first one recorded the recipe, the other two used it
    if isinstance(obj, (dict, list)):
        assert outs[1] is not outs[2]  # fresh containers each time
        outs[1].clear()
        assert len(outs[2]) == len(obj)


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _arrays(v)


class _Point:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is _Point and other.x == self.x


@pytest.mark.parametrize(
    ("make", "out_of_band_min"),
    [
        (lambda: {"p": _Point(3), "a": ARR}, 0),  # another global: its class
        (lambda: (ARR, ARR), 0),  # one array twice: the unpickler's memo
        (lambda: [ARR, {1, 2}], 0),  # a set
        (lambda: [ARR, 1 + 2j], 0),  # a complex: built by a global
        (lambda: {"a": np.frombuffer(ARR.tobytes(), np.float32)}, 0),  # read-only
        (lambda: {"a": np.arange(4)}, OUT_OF_BAND_MIN),  # an array inside the stream
        (lambda: {"x": 1}, OUT_OF_BAND_MIN),  # no array at all
    ],
    ids=["class", "shared", "set", "complex", "read-only", "in-band", "plain"],
)
def test_a_loader_unpickles_what_it_has_no_recipe_for(make, out_of_band_min):
    loader = Loader()
    for _ in range(3):
        obj = make()
        frames = dumps(obj, out_of_band_min=out_of_band_min)
        out = loader(frames[0], [bytearray(f) for f in frames[1:]])
        _same(out, pickle.loads(frames[0], buffers=[bytearray(f) for f in frames[1:]]))
        if isinstance(obj, tuple):
            assert out[0] is out[1]  # still one object, as pickle makes it
    assert loader._hits == 0


def test_a_loader_whose_streams_keep_changing_stops_looking_them_up():
    loader = Loader()
    seen = 0
    for i in range(5 * Loader.RECIPES):
        frames = dumps((i, ARR), out_of_band_min=0)  # the index changes every stream
        out = loader(frames[0], frames[1:])
        assert out[0] == i
        np.testing.assert_array_equal(out[1], ARR)
        seen += loader.on
    assert not loader.on and len(loader._recipes) == Loader.RECIPES
    assert seen >= 4 * Loader.RECIPES


def test_a_loader_raises_what_pickle_raises_on_a_broken_stream():
    frames = dumps((0, ARR), out_of_band_min=0)
    with pytest.raises(pickle.UnpicklingError):
        Loader()(frames[0][:-3], frames[1:])


def test_a_loader_rebuilds_from_spans_of_one_block_as_from_its_slices():
    """from_spans: the buffers lie in one block, given as (offset, length) pairs; a recipe
    makes the arrays on the block itself, anything else is unpickled from slices."""
    loader = Loader()
    obj = (0, {"image": ARR.reshape(16, -1), "depth": ARR[:1024] + 1, "label": 3})
    frames = dumps(obj, out_of_band_min=0)
    for _ in range(3):
        block = np.zeros(1 << 17, np.uint8)
        spans = [-1, -1]  # what comes before this datapoint's spans
        at = 4096
        for f in frames[1:]:
            block[at : at + len(f)] = np.frombuffer(f, np.uint8)
            spans += [at, len(f)]
            at += (len(f) + 63) & -64
        out = loader.from_spans(memoryview(frames[0]), block, spans, 2, len(frames) - 1)
        _same(out, obj)
        for arr in _arrays(out):
            assert np.shares_memory(arr, block)
        block[4096:4100] = np.frombuffer(np.float32(7).tobytes(), np.uint8)
        assert out[1]["image"][0, 0] == 7  # a view of the block, not a copy
    assert loader._hits == 2
    plain = dumps({"p": _Point(1), "a": ARR}, out_of_band_min=0)
    block = np.frombuffer(bytearray(plain[1]), np.uint8)
    out = loader.from_spans(memoryview(plain[0]), block, [0, len(plain[1])], 0, 1)
    assert out["p"] == _Point(1) and np.shares_memory(out["a"], block)


def test_a_span_recipe_is_there_once_its_stream_was_seen_and_rebuilds_as_from_spans():
    """span_recipe: the recipe from_spans uses, for a consumer that looks it up once per
    stream; None for a stream not seen yet and for one without a recipe."""
    loader = Loader()
    obj = (1, ARR.reshape(16, -1))
    frames = dumps(obj, out_of_band_min=0)
    stream = memoryview(frames[0])
    block = np.zeros(1 << 17, np.uint8)
    block[64 : 64 + len(frames[1])] = np.frombuffer(frames[1], np.uint8)
    spans = [64, len(frames[1])]
    assert loader.span_recipe(stream) is None  # not seen yet: from_spans learns it
    _same(loader.from_spans(stream, block, spans, 0, 1), obj)
    recipe = loader.span_recipe(stream)
    assert recipe is not None
    out = recipe(block, spans, 0)
    _same(out, obj)
    assert np.shares_memory(out[1], block)
    other = dumps({"p": _Point(1), "a": ARR}, out_of_band_min=0)
    loader.from_spans(memoryview(other[0]), block, [0, len(other[1])], 0, 1)
    assert loader.span_recipe(memoryview(other[0])) is None  # no recipe for that make


def test_a_recipe_refuses_a_buffer_of_another_size_as_pickle_does():
    """A recipe builds a multi-dimensional array on its buffer in one call; a buffer
    larger or smaller than the array is refused with pickle's own error, never cut."""
    obj = (0, ARR.reshape(16, -1))
    frames = dumps(obj, out_of_band_min=0)
    loader = Loader()
    loader(frames[0], [bytearray(f) for f in frames[1:]])  # records the recipe
    np.testing.assert_array_equal(
        loader(frames[0], [np.frombuffer(frames[1], np.uint8)])[1], obj[1]
    )
    for wrong in (bytes(frames[1]) + b"\0" * 4, bytes(frames[1])[:-4]):
        with pytest.raises(ValueError) as by_pickle:
            pickle.loads(frames[0], buffers=[wrong])
        with pytest.raises(ValueError) as by_recipe:
            loader(frames[0], [memoryview(wrong)])
        assert str(by_recipe.value) == str(by_pickle.value)
    assert loader._hits == 3
