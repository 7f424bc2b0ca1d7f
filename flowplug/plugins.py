"""The plugin manager and the transport registry.

Every transport, built-in or third party, comes from a plugin module named by an entry
point in the group ``flowplug``. Plugins load once per process, lazily, the first time the
registry is needed: each plugin module is imported and its registration hook called then.
A hook may name a transport class by its import path (``register("pkg.transport:Cls",
name="x")``) instead of passing the class: the registry knows the name at once (for
"did you mean", conflicts, the listing) and imports the class the first time transport
``x`` is selected or the full list is asked for, so that starting a runner imports only
the transport it uses.

Environment switches (as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``):

- ``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD=1``: load only the entry points listed in
  ``FLOWPLUG_PLUGINS`` (comma-separated entry-point names, built-ins included) or in the
  config file's ``plugins = [...]`` (loaded by :func:`flowplug.load_config`).
- ``FLOWPLUG_BLOCK_PLUGINS=a,b``: never load these entry points.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from types import MappingProxyType
from typing import Any

import pluggy

from . import hookspecs
from .config import ARGUMENT, DEFAULT, PORTABLE_TRANSPORT, Settings, read_settings, validate_options
from .errors import ConfigError, PluginError, TransportNotFound
from .transport import TaskTransport, Transport
from .worker_groups import OwnWorkersTransport

GROUP = "flowplug"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class PluginInfo:
    """Where a plugin came from: its entry point and distribution.

    Given ``dist`` (an :class:`importlib.metadata.Distribution`) instead of the name and
    version, it reads them from the distribution's metadata when first asked for: only
    messages, conflicts and listings need them, and parsing a METADATA file costs about
    a millisecond on the way to a runner's first datapoint.
    """

    __slots__ = ("_dist", "_distribution", "_name", "_version")

    def __init__(
        self,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
        *,
        dist: metadata.Distribution | None = None,
    ):
        self._name = name
        self._distribution = distribution
        self._version = version
        self._dist = dist

    @property
    def name(self) -> str:
        """The entry-point name (also the plugin's name in the plugin manager)."""
        return self._name

    @property
    def distribution(self) -> str:
        """The distribution that declares the entry point, e.g. ``"flowplug"``."""
        if self._distribution is None:
            self._read()
        assert self._distribution is not None
        return self._distribution

    @property
    def version(self) -> str:
        """The distribution's version."""
        if self._version is None:
            self._read()
        assert self._version is not None
        return self._version

    def _read(self) -> None:
        meta = self._dist.metadata if self._dist is not None else None
        # one parse for both (Distribution.version parses the whole file again)
        name = meta["Name"] if meta is not None else None
        version = meta["Version"] if meta is not None else None
        if self._distribution is None:
            self._distribution = name or "unknown"
        if self._version is None:
            self._version = version or "unknown"

    def _key(self) -> tuple[str, str, str]:
        return (self.name, self.distribution, self.version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PluginInfo):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"PluginInfo(name={self.name!r}, distribution={self.distribution!r}, "
            f"version={self.version!r})"
        )


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed to import or failed inside its hook."""

    info: PluginInfo
    error: BaseException

    def describe(self) -> str:
        """One line: which plugin, which distribution, the original error, the way out."""
        return (
            f"plugin {self.info.name!r} from distribution {self.info.distribution} "
            f"{self.info.version} failed: {type(self.error).__name__}: {self.error}. "
            f"Reinstall or upgrade {self.info.distribution}, uninstall it, or skip it "
            f"with FLOWPLUG_BLOCK_PLUGINS={self.info.name}"
        )


class TransportRegistry:
    """The loaded plugins and the transports they registered.

    :attr:`transports` and :attr:`broken` are the complete tables: reading them imports
    every transport declared by import path that was not imported yet. :meth:`get` imports
    only the one it returns.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._transports: dict[str, type[Transport]] = {}
        #: transport name -> "module:Class", declared by a plugin, not imported yet.
        self._declared: dict[str, str] = {}
        #: transport name -> the plugin that registered (or declared) it.
        self.origin: dict[str, PluginInfo] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self._broken: dict[str, BrokenPlugin] = {}
        #: transport name -> the failure of its declared class (import or checks).
        self._failed: dict[str, BrokenPlugin] = {}
        #: names registered by two plugins; selecting one raises this error.
        self.conflicts: dict[str, PluginError] = {}
        #: false when FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD limited loading to named plugins.
        self.autoload = True

    @property
    def transports(self) -> dict[str, type[Transport]]:
        """Every working transport class, by name (imports those not imported yet)."""
        self._import_declared()
        return self._transports

    @property
    def broken(self) -> dict[str, BrokenPlugin]:
        """Every broken plugin, by entry-point name (imports the declared transports first:
        a class that fails to import makes its plugin broken)."""
        self._import_declared()
        return self._broken

    def names(self) -> list[str]:
        """The registered transport names, sorted, without importing any."""
        return sorted(self._transports.keys() | self._declared.keys())

    def load_entry_points(self) -> None:
        """Import every allowed entry point of the group; record failures, never raise."""
        only = None
        if _env_flag("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD"):
            self.autoload = False
            only = _env_list("FLOWPLUG_PLUGINS")
        for ep in _entry_points():
            if only is None or ep.name in only:
                self._load(ep)

    def ensure(self, names: Iterable[str], where: str) -> None:
        """Also load the named entry points (those that autoload being off left out).

        :param where: the config file or variable that named them, for the error.
        :raises flowplug.ConfigError: a name is not an installed entry point.
        """
        known = self.plugins.keys() | self._broken.keys() | self.conflicts.keys()
        missing = [name for name in names if name not in known]
        if not missing:
            return  # the common case, on every Runner(): nothing to scan
        eps = {ep.name: ep for ep in _entry_points()}
        new = []
        for name in missing:
            if name not in eps:
                installed = sorted(eps)
                close = difflib.get_close_matches(name, installed, n=1)
                raise ConfigError(
                    f"{where}: plugins names {name!r}, which no installed distribution "
                    f"declares in the entry-point group {GROUP!r}; installed: "
                    f"{', '.join(installed) or 'none'}"
                    + (f". Did you mean {close[0]!r}?" if close else "")
                )
            if self._load(eps[name]):
                new.append(name)
        if new:
            self.collect(new)

    def _load(self, ep: metadata.EntryPoint) -> bool:
        """Import and register one entry point; true when it is newly loaded."""
        if ep.name in _env_list("FLOWPLUG_BLOCK_PLUGINS"):
            return False
        info = _info(ep)
        if ep.name in self.plugins or ep.name in self._broken:
            first = self.plugins.get(ep.name) or self._broken[ep.name].info
            if first.distribution != info.distribution:
                self.conflicts[ep.name] = PluginError(
                    f"entry point {ep.name!r} of the group {GROUP!r} is declared by two "
                    f"distributions: {first.distribution} {first.version} and "
                    f"{info.distribution} {info.version}; uninstall one"
                )
            return False
        try:
            module = ep.load()
            self.pm.register(module, name=ep.name)
            self.pm.check_pending()  # a hookimpl that matches no hookspec (a typo)
        except (Exception, SystemExit) as exc:
            if self.pm.get_plugin(ep.name) is not None:
                self.pm.unregister(name=ep.name)
            self._broken[ep.name] = BrokenPlugin(info, exc)
            return False
        self.plugins[ep.name] = info
        return True

    def collect(self, names: Iterable[str] | None = None) -> None:
        """Call each plugin's registration hook on its own, so one failure stays its own.

        :param names: only these plugins (just loaded); all when None.
        """
        wanted = None if names is None else set(names)
        for impl in self.pm.hook.flowplug_register_transports.get_hookimpls():
            if wanted is not None and impl.plugin_name not in wanted:
                continue
            info = self.plugins.get(impl.plugin_name) or PluginInfo(
                impl.plugin_name, "unknown", "unknown"
            )
            try:
                impl.function(register=functools.partial(self.register, origin=info))
            except (Exception, SystemExit) as exc:
                self._broken[info.name] = BrokenPlugin(info, exc)

    def register(
        self, transport: type[Transport] | str, *, origin: PluginInfo, name: str | None = None
    ) -> None:
        """Add one transport, checking it where it is registered.

        :param transport: the class, or its import path ``"module:Class"``, imported when
            the transport is first selected; then ``name`` is required.
        :param name: the transport's name (a class's ``name`` attribute, checked when the
            class is imported).
        """
        if isinstance(transport, str):
            if name is None or ":" not in transport:
                raise PluginError(
                    f"{_who(origin)} registered {transport!r}: a transport given by its import "
                    "path is written 'module:Class' and needs its name, as in "
                    "register('my_plugin.transport:MyTransport', name='mine')"
                )
        else:
            self._check_class(transport, origin)
            if name is not None and name != transport.name:
                raise PluginError(
                    f"{_who(origin)} registered {transport.__qualname__} as {name!r}, but its name "
                    f"is {transport.name!r}; drop name= or make them agree"
                )
            name = transport.name
        if not _NAME.match(name):
            raise PluginError(
                f"{_who(origin)} registered {transport!r} with name {name!r}; a transport name is "
                "lower-case letters, digits and '_', starting with a letter"
            )
        if name in self._transports or name in self._declared:
            first = self.origin[name]
            self.conflicts[name] = PluginError(
                f"transport name {name!r} is registered twice: by plugin {first.name!r} "
                f"({first.distribution} {first.version}) and by plugin {origin.name!r} "
                f"({origin.distribution} {origin.version}); uninstall one, or block one "
                "with FLOWPLUG_BLOCK_PLUGINS"
            )
            raise self.conflicts[name]
        if isinstance(transport, str):
            self._declared[name] = transport
        else:
            self._transports[name] = transport
        self.origin[name] = origin

    def _check_class(self, transport: Any, origin: PluginInfo) -> None:
        """Refuse a class that is not a complete, well-named Transport."""
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
        for flag, base, methods in (
            ("carries_tasks", TaskTransport, "open_tasks() and send_task()"),
            ("runs_workers", OwnWorkersTransport, "make_workers()"),
        ):
            if getattr(transport, flag) and not issubclass(transport, base):
                raise PluginError(
                    f"{_who(origin)} registered {transport.__qualname__} with {flag} = True, "
                    "but that part is opted into by subclassing "
                    f"flowplug.{base.__name__} (which declares {methods}), not by the flag; "
                    f"subclass it instead of flowplug.Transport"
                )
        missing = sorted(getattr(transport, "__abstractmethods__", ()))
        if missing:
            raise PluginError(
                f"{_who(origin)} registered {transport.__qualname__}, which does not "
                f"implement {', '.join(m + '()' for m in missing)}; "
                "implement it, or drop the base class that asks for it"
            )
        limit = transport.size_limit_option
        if limit is not None and not any(o.name == limit and o.size for o in transport.options):
            raise PluginError(
                f"plugin {origin.name!r} ({origin.distribution}) registered "
                f"{transport.__qualname__} with size_limit_option={limit!r}, which is not "
                "one of its options declared with size=True"
            )

    def _import(self, name: str) -> type[Transport]:
        """Import the class declared for ``name`` and check it as :meth:`register` would.

        :raises flowplug.PluginError: it fails to import or to pass the checks; its plugin
            is then reported as broken.
        """
        path = self._declared.pop(name)
        origin = self.origin[name]
        try:
            module, _, attr = path.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._check_class(obj, origin)
            if obj.name != name:
                raise PluginError(
                    f"plugin {origin.name!r} ({origin.distribution}) declared transport "
                    f"{name!r} as {path}, whose name is {obj.name!r}; make them agree"
                )
        except (Exception, SystemExit) as exc:
            del self.origin[name]
            broken = BrokenPlugin(origin, exc)
            self._broken.setdefault(origin.name, broken)
            self._failed[name] = broken
            raise PluginError(broken.describe()) from exc
        self._transports[name] = obj
        return obj

    def _import_declared(self) -> None:
        for name in list(self._declared):
            try:
                self._import(name)
            except PluginError:
                pass  # recorded as broken, and raised again when the name is selected

    def check_settings(self, settings: Settings, problems: list[str] | None = None) -> Settings:
        """Load the plugins ``settings`` names, check its transport tables against the
        transports' declared options and that its transport is installed.

        :param problems: the problems found so far (by :func:`~flowplug.config.read_settings`);
            this adds its own and raises them all in one :class:`~flowplug.ConfigError`.
        :returns: ``settings`` with its transport tables validated.
        :raises flowplug.ConfigError: a table names no transport, or holds a bad option.
        :raises flowplug.TransportNotFound: the selected transport is not installed.
        :raises flowplug.PluginError: the selected transport's plugin is broken.
        """
        problems = [] if problems is None else problems
        checked = self._check_settings(settings, problems)
        if problems:
            raise ConfigError.of(problems)
        return checked

    def _check_settings(self, settings: Settings, problems: list[str]) -> Settings:
        if settings.plugins:
            self.ensure(settings.plugins, settings.source("plugins"))
        tables: dict[str, dict[str, Any]] = {}
        for name, options in settings.transports.items():
            if name in self._broken or name in self._failed or name in self.conflicts:
                tables[name] = dict(options)  # selecting it raises the plugin's own error
                continue
            if name not in self._transports and name not in self._declared:
                where = settings.source(f"transports.{name}")
                available = self.names()
                close = difflib.get_close_matches(name, available, n=1)
                problems.append(
                    f"{where}: table [transports.{name}] names no installed transport; "
                    f"available: {', '.join(available)}"
                    + (f". Did you mean {close[0]!r}?" if close else "")
                )
                continue
            try:
                cls = self.get(name)
            except PluginError:
                tables[name] = dict(options)  # selecting it raises the plugin's own error
                continue
            tables[name] = {}
            for key, value in options.items():
                source = settings.source(f"transports.{name}.{key}")
                prefix = "tool.flowplug." if source.endswith("[tool.flowplug]") else ""
                try:
                    tables[name].update(
                        validate_options(
                            name,
                            cls.options,
                            {key: value},
                            f"{source}: [{prefix}transports.{name}]",
                            strict=True,
                            defaults=False,
                        )
                    )
                except ConfigError as exc:
                    problems.extend(exc.problems)
        if settings.source("transport") == DEFAULT and settings.transport not in self.names():
            # the preferred default is blocked or not installed: the portable one
            settings = replace(settings, transport=PORTABLE_TRANSPORT)
        try:
            self.get(settings.transport)
        except TransportNotFound as exc:
            source = settings.source("transport")
            found = exc
            if source not in (DEFAULT, ARGUMENT):
                found = TransportNotFound(exc.name, exc.available, exc.suggestion, where=source)
            if problems:  # said with the others: a bad file may be why
                problems.append(str(found))
                return settings
            if found is exc:
                raise
            raise found from None
        except PluginError as exc:
            source = settings.source("transport")
            if source in (DEFAULT, ARGUMENT):
                raise
            raise PluginError(f"{source}: transport = {settings.transport!r}: {exc}") from exc
        return replace(settings, transports=tables)

    def get(self, name: str) -> type[Transport]:
        """The class of transport ``name``, imported now if it was declared by its path.

        :raises flowplug.PluginError: two plugins register ``name``, or its plugin is broken.
        :raises flowplug.TransportNotFound: no plugin registers ``name``.
        """
        if name in self.conflicts:
            raise self.conflicts[name]
        try:
            return self._transports[name]
        except KeyError:
            pass
        if name in self._declared:
            return self._import(name)
        broken = self._failed.get(name) or self._broken.get(name)
        if broken is not None:
            raise PluginError(broken.describe()) from broken.error
        available = self.names()
        close = difflib.get_close_matches(name, available, n=1)
        raise TransportNotFound(name, available, close[0] if close else None)


def _entry_points() -> list[metadata.EntryPoint]:
    """The entry points of the group, as ``metadata.entry_points(group=GROUP)`` finds them.

    That call parses the entry points of every installed distribution (torch's console
    scripts...) into objects, then selects; this reads each distribution's
    ``entry_points.txt`` and parses only those that mention the group. Distributions are
    deduplicated as importlib.metadata does: the first found of each normalized name wins.
    """
    found: list[metadata.EntryPoint] = []
    seen: set[str] = set()
    for dist in metadata.distributions():
        key = _normalized_name(dist)
        if key in seen:
            continue
        seen.add(key)
        text = dist.read_text("entry_points.txt")
        if text and GROUP in text:  # a cheap filter; select() decides
            found.extend(dist.entry_points.select(group=GROUP))
    # Sorted, so that which of two clashing plugins registers first is the same everywhere.
    return sorted(found, key=lambda ep: ep.name)


def _normalized_name(dist: metadata.Distribution) -> str:
    # importlib.metadata's own key for its dedup (3.10 to 3.13), read from the directory
    # name where it can; the metadata's Name (parsed) otherwise.
    name = getattr(dist, "_normalized_name", None)
    if isinstance(name, str):
        return name
    return re.sub(r"[-_.]+", "_", str(dist.metadata["Name"] or "")).lower()


def _who(origin: PluginInfo) -> str:
    """``plugin 'x' (its-distribution)``, for messages: reads the distribution's name."""
    return f"plugin {origin.name!r} ({origin.distribution})"


def _info(ep: metadata.EntryPoint) -> PluginInfo:
    return PluginInfo(ep.name, dist=ep.dist)  # name and version read when asked for


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
    """Return ``{name: TransportClass}`` for every installed, working transport.

    A name that two plugins register is left out: selecting it raises the error that
    names both.
    """
    registry = get_registry()
    working = {n: c for n, c in registry.transports.items() if n not in registry.conflicts}
    return MappingProxyType(dict(sorted(working.items())))


def get_transport(name: str) -> type[Transport]:
    """Return the transport class registered as ``name``.

    :raises flowplug.TransportNotFound: no such transport; the message lists the available
        ones and suggests the nearest.
    :raises flowplug.PluginError: the plugin that provides ``name`` failed to load.
    """
    return get_registry().get(name)


def load_config(path: str | os.PathLike[str] | None = None, **explicit: Any) -> Settings:
    """Return the effective settings: ``explicit`` arguments over environment variables
    over config files over defaults, checked against the installed transports.

    :param path: a config file to read instead of ``./flowplug.toml`` and
        ``./pyproject.toml``; a file named ``pyproject.toml`` is read for its
        ``[tool.flowplug]`` table, any other file from its top level.
    :param explicit: settings given as arguments (the Runner's); None means "not given".
    :raises flowplug.ConfigError: a bad key or value; the message names the file or
        variable, the key, the value and the valid choices.
    :raises flowplug.TransportNotFound: the selected transport is not installed.
    :raises flowplug.PluginError: the selected transport's plugin is broken.
    """
    problems: list[str] = []  # every problem of every source, raised at once
    settings = read_settings(path, _problems=problems, **explicit)
    return get_registry().check_settings(settings, problems)
