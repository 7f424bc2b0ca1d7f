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


def _minimal(base, **methods):
    body = {"name": "half", "open": lambda self: None, "recv": lambda self, timeout: fp.EMPTY}
    body.update(methods)
    return type("Half", (base,), body)


def test_a_half_implemented_task_transport_fails_when_it_registers():
    registry = get_registry()
    half = _minimal(fp.TaskTransport, open_tasks=lambda self: None)
    with pytest.raises(fp.PluginError, match=r"Half, which does not implement send_task\(\)"):
        registry.register(half, origin=ORIGIN)
    assert "half" not in fp.available_transports()
    whole = _minimal(
        fp.TaskTransport, open_tasks=lambda self: None, send_task=lambda self, o, t: True
    )
    registry.register(whole, origin=ORIGIN)
    assert fp.get_transport("half").carries_tasks


def test_a_transport_missing_recv_fails_when_it_registers():
    no_recv = type("NoRecv", (fp.Transport,), {"name": "norecv", "open": lambda self: None})
    with pytest.raises(fp.PluginError, match=r"NoRecv, which does not implement recv\(\)"):
        get_registry().register(no_recv, origin=ORIGIN)


@pytest.mark.parametrize(
    ("flag", "base"),
    [("carries_tasks", "TaskTransport"), ("runs_workers", "OwnWorkersTransport")],
)
def test_optional_parts_are_opted_into_by_subclassing_not_by_flag(flag, base):
    flagged = _minimal(fp.Transport, **{flag: True})
    with pytest.raises(fp.PluginError, match=rf"{flag} = True.*subclassing flowplug\.{base}"):
        get_registry().register(flagged, origin=ORIGIN)


def test_a_half_implemented_own_workers_transport_names_make_workers():
    half = _minimal(fp.OwnWorkersTransport)
    with pytest.raises(fp.PluginError, match=r"does not implement make_workers\(\)"):
        get_registry().register(half, origin=ORIGIN)
