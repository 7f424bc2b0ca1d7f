"""The plugin manager and the transport registry.

Every transport, built-in or third party, comes from a plugin module named by an entry
point in the group ``flowplug``. Plugins load once per process, lazily, the first time the
registry is needed.

Environment switches (as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``):

- ``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD=1``: load only the entry points listed in
  ``FLOWPLUG_PLUGINS`` (comma-separated entry-point names, built-ins included).
- ``FLOWPLUG_BLOCK_PLUGINS=a,b``: never load these entry points.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from types import MappingProxyType

import pluggy

from . import hookspecs
from .errors import PluginError, TransportNotFound
from .transport import Transport

GROUP = "flowplug"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from: its entry point and distribution."""

    #: entry-point name (also the plugin's name in the plugin manager).
    name: str
    #: the distribution that declares the entry point, e.g. ``"flowplug"``.
    distribution: str
    #: the distribution's version.
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed to import or failed inside its hook."""

    info: PluginInfo
    error: BaseException

    def describe(self) -> str:
        return (
            f"plugin {self.info.name!r} from distribution {self.info.distribution} "
            f"{self.info.version} failed: {type(self.error).__name__}: {self.error}"
        )


class TransportRegistry:
    """The loaded plugins and the transports they registered."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.transports: dict[str, type[Transport]] = {}
        #: transport name -> the plugin that registered it.
        self.origin: dict[str, PluginInfo] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.broken: dict[str, BrokenPlugin] = {}
        #: names registered by two plugins; selecting one raises this error.
        self.conflicts: dict[str, PluginError] = {}

    def load_entry_points(self) -> None:
        """Import every allowed entry point of the group; record failures, never raise."""
        only = None
        if _env_flag("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD"):
            only = _env_list("FLOWPLUG_PLUGINS")
        blocked = set(_env_list("FLOWPLUG_BLOCK_PLUGINS"))
        for ep in metadata.entry_points(group=GROUP):
            if ep.name in blocked or (only is not None and ep.name not in only):
                continue
            if ep.name in self.plugins or ep.name in self.broken:
                continue
            dist = ep.dist
            info = PluginInfo(
                ep.name,
                dist.metadata["Name"] if dist else "unknown",
                dist.version if dist else "unknown",
            )
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:
                self.broken[ep.name] = BrokenPlugin(info, exc)
                continue
            self.plugins[ep.name] = info
        self.pm.check_pending()

    def collect(self) -> None:
        """Call each plugin's registration hook on its own, so one failure stays its own."""
        for impl in self.pm.hook.flowplug_register_transports.get_hookimpls():
            info = self.plugins.get(impl.plugin_name) or PluginInfo(
                impl.plugin_name, "unknown", "unknown"
            )
            try:
                impl.function(register=functools.partial(self.register, origin=info))
            except Exception as exc:
                self.broken[info.name] = BrokenPlugin(info, exc)

    def register(self, transport: type[Transport], *, origin: PluginInfo) -> None:
        """Add one transport class, checking it where it is registered."""
        if not (isinstance(transport, type) and issubclass(transport, Transport)):
            raise PluginError(
                f"plugin {origin.name!r} ({origin.distribution}) registered {transport!r}, "
                "which is not a subclass of flowplug.Transport"
            )
        name = getattr(transport, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"plugin {origin.name!r} ({origin.distribution}) registered "
                f"{transport.__qualname__} with name {name!r}; a transport name is "
                "lower-case letters, digits and '_', starting with a letter"
            )
        if name in self.transports:
            first = self.origin[name]
            self.conflicts[name] = PluginError(
                f"transport name {name!r} is registered twice: by plugin {first.name!r} "
                f"({first.distribution} {first.version}) and by plugin {origin.name!r} "
                f"({origin.distribution} {origin.version}); uninstall one, or block one "
                "with FLOWPLUG_BLOCK_PLUGINS"
            )
            raise self.conflicts[name]
        limit = transport.size_limit_option
        if limit is not None and not any(o.name == limit and o.size for o in transport.options):
            raise PluginError(
                f"plugin {origin.name!r} ({origin.distribution}) registered "
                f"{transport.__qualname__} with size_limit_option={limit!r}, which is not "
                "one of its options declared with size=True"
            )
        self.transports[name] = transport
        self.origin[name] = origin

    def get(self, name: str) -> type[Transport]:
        if name in self.conflicts:
            raise self.conflicts[name]
        try:
            return self.transports[name]
        except KeyError:
            pass
        if name in self.broken:
            broken = self.broken[name]
            raise PluginError(broken.describe()) from broken.error
        available = sorted(self.transports)
        close = difflib.get_close_matches(name, available, n=1)
        raise TransportNotFound(name, available, close[0] if close else None)


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


def _env_list(var: str) -> list[str]:
    return [x.strip() for x in os.environ.get(var, "").split(",") if x.strip()]


@functools.lru_cache(maxsize=1)
def get_registry() -> TransportRegistry:
    """Build the plugin manager and registry once per process (eggsample ``host.py`` shape)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry = TransportRegistry(pm)
    registry.load_entry_points()
    registry.collect()
    return registry


def reload_plugins() -> None:
    """Forget the loaded plugins; the next lookup loads them again (tests, notebooks)."""
    get_registry.cache_clear()


def available_transports() -> Mapping[str, type[Transport]]:
    """Return ``{name: TransportClass}`` for every installed, working transport."""
    return MappingProxyType(dict(sorted(get_registry().transports.items())))


def get_transport(name: str) -> type[Transport]:
    """Return the transport class registered as ``name``.

    :raises flowplug.TransportNotFound: no such transport; the message lists the available
        ones and suggests the nearest.
    :raises flowplug.PluginError: the plugin that provides ``name`` failed to load.
    """
    return get_registry().get(name)
