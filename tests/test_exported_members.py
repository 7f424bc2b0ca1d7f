"""Keep ``flowplug.__all__`` honest (after httpx's tests/test_exported_members.py)."""

import inspect
import types

import flowplug as fp


def test_all_is_sorted_and_unique():
    # Plain code-point order (so "EMPTY" sits between "DataTooLarge" and "Endpoint").
    assert fp.__all__ == sorted(set(fp.__all__))


def test_every_name_in_all_exists():
    missing = [name for name in fp.__all__ if not hasattr(fp, name)]
    assert not missing


def test_every_public_name_is_in_all():
    public = {
        name
        for name, value in vars(fp).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "TYPE_CHECKING"
    }
    assert public - set(fp.__all__) == set()


def test_exported_classes_and_functions_come_from_flowplug():
    for name in fp.__all__:
        value = getattr(fp, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("flowplug."), name
