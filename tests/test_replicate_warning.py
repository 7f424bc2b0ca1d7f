"""A runner that was not told its mode warns once when replicate mode is a likely surprise."""

import warnings

import pytest

import flowplug as fp


def _epoch(**kwargs):
    with fp.Runner(fp.DataFromList(list(range(6))), transport="thread", **kwargs) as runner:
        return list(runner)


def test_several_workers_over_a_known_length_warn_once_and_say_what_to_do():
    with pytest.warns(fp.ReplicateWarning) as record:
        epoch = _epoch(num_workers=2)
    assert len(epoch) == 6  # what replicate mode promises: len(df) datapoints, any mix
    (warning,) = record
    text = str(warning.message)
    assert "Runner(num_workers=2) over a dataflow of 6 items" in text
    assert "mode='shard'" in text and "mode='replicate'" in text
    assert warning.filename == __file__  # points at the user's code, not flowplug's


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_workers": 2, "mode": "replicate"},  # chosen: tensorpack's semantics
        {"num_workers": 2, "mode": "shard"},
        {"num_workers": 1},  # one worker: the order and the items of df
    ],
)
def test_no_warning_when_the_mode_is_given_or_harmless(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epoch = _epoch(**kwargs)
    assert len(epoch) == 6


def test_no_warning_for_a_dataflow_without_length():
    def endless():
        while True:
            yield 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fp.Runner(fp.DataFromGenerator(endless), transport="thread", num_workers=2) as r:
            assert next(iter(r)) == 1


def test_users_can_silence_it():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("ignore", fp.ReplicateWarning)
        _epoch(num_workers=2)
    assert record == []
