import pytest

import flowplug as fp


def test_data_from_list_in_order():
    df = fp.DataFromList([3, 1, 2])
    df.reset_state()
    assert len(df) == 3
    assert list(df) == [3, 1, 2]
    assert list(df) == [3, 1, 2]


def test_data_from_list_shuffles_each_pass_without_losing_items():
    df = fp.DataFromList(range(50), shuffle=True)
    df.reset_state()
    passes = [list(df) for _ in range(3)]
    assert all(sorted(p) == list(range(50)) for p in passes)
    assert passes[0] != list(range(50)) or passes[1] != list(range(50))


def test_data_from_generator_function_is_called_each_pass():
    def gen():
        yield from "ab"

    df = fp.DataFromGenerator(gen)
    assert list(df) + list(df) == ["a", "b", "a", "b"]
    with pytest.raises(NotImplementedError):
        len(df)
    assert len(fp.DataFromGenerator(gen, size=2)) == 2


def test_data_from_generator_refuses_an_iterator():
    with pytest.raises(TypeError, match="lambda"):
        fp.DataFromGenerator(iter([1, 2]))


def test_base_dataflow_has_unknown_length():
    with pytest.raises(NotImplementedError):
        len(fp.DataFlow())


def test_duck_typed_dataflows_satisfy_the_protocol():
    class Duck:
        def __iter__(self):
            yield 1

        def reset_state(self):
            pass

    assert isinstance(Duck(), fp.DataFlowLike)
    assert not isinstance([1], fp.DataFlowLike)
