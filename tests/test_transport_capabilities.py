"""Capabilities a transport declares, checked where it is registered."""

import pytest

import flowplug as fp
from flowplug.plugins import PluginInfo, get_registry

ORIGIN = PluginInfo("capabilities-test", "tests", "0")


def _transport(limit, options):
    class Capped(fp.Transport):
        name = "capped"
        size_limit_option = limit

        def open(self):
            raise NotImplementedError

        def recv(self, timeout):
            return fp.EMPTY

    Capped.options = options
    return Capped


def test_defaults_declare_no_shared_memory_and_no_limit():
    assert fp.Transport.uses_shared_memory is False
    assert fp.Transport.size_limit_option is None
    for cls in fp.available_transports().values():
        assert isinstance(cls.uses_shared_memory, bool)


def test_size_limit_option_must_be_a_declared_size_option():
    registry = get_registry()
    bad = [
        (),
        (fp.Option("store", int, 1024, "not a size option"),),
        (fp.Option("other", int, 1024, "wrong name", size=True),),
    ]
    for options in bad:
        with pytest.raises(fp.PluginError, match=r"size_limit_option='store'.*size=True"):
            registry.register(_transport("store", options), origin=ORIGIN)
    good = _transport("store", (fp.Option("store", int, 1024, "bytes", size=True),))
    registry.register(good, origin=ORIGIN)
    assert fp.get_transport("capped") is good
