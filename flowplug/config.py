"""Runner settings from explicit arguments, environment variables, config files and defaults.

Sources, highest first:

1. explicit arguments: ``Runner(df, num_workers=4, hwm=100)``;
2. environment variables: ``FLOWPLUG_TRANSPORT``, ``FLOWPLUG_NUM_WORKERS``,
   ``FLOWPLUG_CAPACITY``, ``FLOWPLUG_START_METHOD``, ``FLOWPLUG_TIMEOUT``, ``FLOWPLUG_PLUGINS``;
3. ``flowplug.toml`` in the working directory;
4. the ``[tool.flowplug]`` table of ``pyproject.toml`` in the working directory;
5. built-in defaults.

Transport options live in per-transport tables (``[transports.zmq] hwm = 100``) and are
validated against the :class:`~flowplug.Option` declarations of that transport. Nothing bad
is ever ignored: an unknown key, a wrong type or an unusable value raises
:class:`~flowplug.ConfigError` naming where it came from, the key, the value and the choices.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .transport import Option, Transport, option_defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - tomllib is in the standard library from 3.11 on
    import tomli as tomllib

START_METHODS = ("fork", "spawn", "forkserver")
#: the default transport where its store fits (see :func:`default_transport`), and the
#: one used everywhere else.
PREFERRED_TRANSPORT, PORTABLE_TRANSPORT = "shm", "zmq"
#: free bytes a directory needs for the shm transport's default store (``size`` = 1 GiB).
SHM_DEFAULT_ROOM = 1 << 30
#: the config file read from the working directory.
CONFIG_FILE = "flowplug.toml"
#: read for its ``[tool.flowplug]`` table.
PYPROJECT = "pyproject.toml"
#: the source of a value nobody set, and of one given to the Runner or ``from_config``.
DEFAULT = "default"
ARGUMENT = "argument"


@dataclass(frozen=True)
class Settings:
    """The effective settings, as returned by :func:`flowplug.load_config`.

    Example::

        cfg = fp.load_config()
        print(cfg.num_workers, cfg.source("num_workers"))  # 4 environment variable ...
    """

    #: name of the transport; by default :func:`default_transport`'s choice.
    transport: str = field(default_factory=lambda: default_transport())
    #: how many workers.
    num_workers: int = 1
    #: how many datapoints may be buffered between workers and consumer.
    capacity: int = 50
    #: how worker processes start; None means ``"fork"`` for process transports.
    start_method: str | None = None
    #: seconds to wait for one datapoint; None waits forever.
    timeout: float | None = None
    #: entry points to load although ``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD`` is set.
    plugins: tuple[str, ...] = ()
    #: per-transport options from config files, ``{"zmq": {"hwm": 100}}``, validated.
    transports: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: where each value came from, for keys such as ``"num_workers"`` and
    #: ``"transports.zmq.hwm"``; a key that is absent has its default.
    sources: Mapping[str, str] = field(default_factory=dict)
    #: the config files that were read, highest priority first.
    files: tuple[str, ...] = ()

    def source(self, key: str) -> str:
        """Where ``key`` (``"capacity"``, ``"transports.zmq.hwm"``) got its value."""
        return self.sources.get(key, DEFAULT)

    def options_for(
        self, transport: type[Transport], explicit: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The options of ``transport``: its declared defaults, then the config file's
        table, then ``explicit`` (the Runner's keyword arguments), validated.

        :raises flowplug.ConfigError: an explicit option is unknown or of the wrong type.
        """
        merged = option_defaults(transport.options)
        merged.update(self.transports.get(transport.name, {}))
        merged.update(
            validate_options(transport.name, transport.options, explicit or {}, defaults=False)
        )
        return merged


#: environment variable -> setting
ENV_VARS = {
    "FLOWPLUG_TRANSPORT": "transport",
    "FLOWPLUG_NUM_WORKERS": "num_workers",
    "FLOWPLUG_CAPACITY": "capacity",
    "FLOWPLUG_START_METHOD": "start_method",
    "FLOWPLUG_TIMEOUT": "timeout",
    "FLOWPLUG_PLUGINS": "plugins",
}
#: the settings, in the order ``flowplug config`` shows them.
SETTINGS = ("transport", "num_workers", "capacity", "start_method", "timeout", "plugins")
#: the keys a config file may hold at its top level.
FILE_KEYS = (*SETTINGS, "transports")


# ---------------------------------------------------------------------------- reading


def default_transport(where: str = "/dev/shm") -> str:
    """The transport a runner uses when none is set: ``"shm"`` on Linux where ``where``
    has room for its default 1 GiB store, else ``"zmq"``.

    shm is the fastest process transport on every payload measured (docs/performance.md);
    zmq runs anywhere, including a container's 64 MB ``/dev/shm``. Set ``transport`` (or
    ``FLOWPLUG_TRANSPORT``) to choose for yourself.
    """
    if not sys.platform.startswith("linux"):
        return PORTABLE_TRANSPORT
    try:
        st = os.statvfs(where)
    except OSError:
        return PORTABLE_TRANSPORT
    if st.f_bavail * st.f_frsize < SHM_DEFAULT_ROOM:
        return PORTABLE_TRANSPORT
    return PREFERRED_TRANSPORT


def read_settings(
    path: str | os.PathLike[str] | None = None,
    _problems: list[str] | None = None,
    **explicit: Any,
) -> Settings:
    """Read and type-check every source, highest first: ``explicit`` (None means "not
    given"), environment variables, config files, defaults.

    Plugins are not loaded here: :func:`flowplug.load_config` also checks the transport
    tables against the installed transports.

    :param path: a config file to read instead of ``./flowplug.toml`` and
        ``./pyproject.toml``; a file named ``pyproject.toml`` is read for its
        ``[tool.flowplug]`` table, any other file from its top level.
    :param _problems: append every problem here (the bad values left out) instead of
        raising; :func:`flowplug.load_config` adds the plugin checks' problems and raises
        them all at once.
    :raises flowplug.ConfigError: a bad key or value; the message names the file or
        variable, the key, the value and the valid choices; every problem, not the first.
    """
    problems: list[str] = [] if _problems is None else _problems
    layers: list[tuple[str, dict[str, Any]]] = []  # (source, {key: parsed value}), highest first
    given = {k: v for k, v in explicit.items() if v is not None}
    for key in sorted(set(given) - set(SETTINGS)):
        problems.append(f"unknown setting {key!r}; valid: {', '.join(SETTINGS)}")
        del given[key]
    arguments: dict[str, Any] = {}
    for key, value in given.items():
        _collect(problems, arguments, key, _parse, key, value, f"argument {key}", "arg")
    layers.append((ARGUMENT, arguments))

    env: dict[str, Any] = {}
    for var, key in ENV_VARS.items():
        raw = os.environ.get(var, "").strip()
        if raw:
            _collect(problems, env, key, _parse, key, raw, f"environment variable {var}", "env")
    # Every variable has its own source, so split the layer per variable.
    layers += [(_env_source(key), {key: value}) for key, value in env.items()]

    tables: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    try:
        files = _config_files(path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        files = []
    for source, prefix, data in files:
        parsed = _parse_file(source, prefix, data, problems)
        table_options = parsed.pop("transports", {})
        layers.append((source, parsed))
        for name, options in table_options.items():
            sources.setdefault(f"transports.{name}", source)
            for key, value in options.items():
                if key not in tables.setdefault(name, {}):
                    tables[name][key] = value
                    sources[f"transports.{name}.{key}"] = source

    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in values:
                values[key] = value
                sources[key] = source
    settings = Settings(
        **values,
        transports=tables,
        sources=sources,
        files=tuple(source for source, _, _ in files),
    )
    if problems and _problems is None:
        raise ConfigError.of(problems)
    return settings


def _collect(
    problems: list[str], into: dict[str, Any], key: str, parse: Any, *args: Any, **kwargs: Any
) -> None:
    """``into[key] = parse(...)``, or the ConfigError's problems appended to ``problems``."""
    try:
        into[key] = parse(*args, **kwargs)
    except ConfigError as exc:
        problems.extend(exc.problems)


def _env_source(key: str) -> str:
    var = next(v for v, k in ENV_VARS.items() if k == key)
    return f"environment variable {var}"


# ---------------------------------------------------------------------------- files


def _config_files(path: str | os.PathLike[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """Return ``(source, table prefix, table)`` for each config file, highest first."""
    if path is not None:
        file = Path(path).resolve()
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        if file.name == PYPROJECT:
            table = _tool_flowplug(file)
            if table is None:
                raise ConfigError(f"{file} has no [tool.flowplug] table")
            return [(f"{file} [tool.flowplug]", "tool.flowplug.", _as_table(table, file))]
        return [(str(file), "", _read_toml(file))]
    found = []
    file = Path.cwd() / CONFIG_FILE
    if file.is_file():
        found.append((str(file), "", _read_toml(file)))
    file = Path.cwd() / PYPROJECT
    if file.is_file():
        table = _tool_flowplug(file)
        if table is not None:
            found.append((f"{file} [tool.flowplug]", "tool.flowplug.", _as_table(table, file)))
    return found


def _tool_flowplug(file: Path) -> Any:
    tool = _read_toml(file).get("tool", {})
    return tool.get("flowplug") if isinstance(tool, dict) else None


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)  # tomli (3.10) may be untyped here
            return data
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None


def _as_table(value: Any, file: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: tool.flowplug must be a table, got {value!r}")
    return value


def _parse_file(
    source: str, prefix: str, data: dict[str, Any], problems: list[str]
) -> dict[str, Any]:
    """The file's valid settings; each bad one is a line in ``problems``."""
    parsed: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FILE_KEYS:
            problems.append(
                f"{source}: unknown key {prefix}{key} = {value!r}; valid keys: "
                f"{', '.join(FILE_KEYS)}" + _did_you_mean(key, FILE_KEYS)
            )
        elif key != "transports":
            _collect(problems, parsed, key, _parse, key, value, f"{source}: {prefix}{key}", "file")
        elif not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
            problems.append(
                f"{source}: {prefix}transports must hold one table per transport, such as "
                f"[{prefix}transports.zmq] with hwm = 100; got {value!r}"
            )
        else:
            parsed["transports"] = value
    return parsed


# ---------------------------------------------------------------------------- values


def _parse(key: str, value: Any, label: str, kind: str) -> Any:
    """Check one setting. ``kind`` is "file" (TOML types must match), "env" (a string) or
    "arg" (a Python value; numeric strings are accepted as before)."""
    strict = kind == "file"

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{label} = {value!r}: {problem}")

    if key == "transport":
        if not isinstance(value, str) or not value:
            raise bad("the transport must be a non-empty name such as 'zmq'")
        return value
    if key in ("num_workers", "capacity"):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif not strict and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        else:
            raise bad(f"{key} must be an integer of at least 1")
        if number < 1:
            raise bad(f"{key} must be an integer of at least 1")
        return number
    if key == "start_method":
        if value not in START_METHODS:
            raise bad(
                f"start_method must be one of {', '.join(START_METHODS)}"
                + _did_you_mean(str(value), START_METHODS)
            )
        return value
    if key == "timeout":
        if isinstance(value, bool) or (strict and not isinstance(value, (int, float))):
            raise bad("timeout must be a positive number of seconds")
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise bad("timeout must be a positive number of seconds") from None
        if not seconds > 0:
            raise bad("timeout must be a positive number of seconds")
        return seconds
    if key == "plugins":
        names = value.split(",") if kind == "env" and isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise bad("plugins must be a list of entry-point names, such as ['zmq', 'pipe']")
        return tuple(n.strip() for n in names if n.strip())
    raise ConfigError(f"{label}: unknown setting")  # pragma: no cover - callers check keys


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: Any) -> int:
    """Parse a byte count: an int, or a string such as ``"512MiB"``, ``"2GB"``, ``"1.5 GiB"``.

    :raises ValueError: the value is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value!r}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        f"not a size: {value!r}; use an integer of bytes or a string like '512MiB' or '2GB'"
    )


def format_size(n: int) -> str:
    """A byte count the way people write it: ``1073741824`` -> ``"1 GiB"``, ``2000000000``
    -> ``"2 GB"``; a count no unit divides stays in bytes (``"1000001 B"``). ``0`` -> ``"0"``.
    :func:`parse_size` reads every result back to ``n``."""
    if n == 0:
        return "0"
    units: tuple[tuple[str, int], ...] = (("TiB", 1024**4), ("TB", 1000**4), ("GiB", 1024**3))
    units += (("GB", 1000**3),)
    units += (("MiB", 1024**2), ("MB", 1000**2), ("KiB", 1024), ("kB", 1000))
    for unit, factor in units:  # the largest unit that divides it
        if n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------- transport options


def validate_options(
    transport: str,
    declared: tuple[Option, ...],
    given: Mapping[str, Any],
    where: str = "option",
    *,
    strict: bool = False,
    defaults: bool = True,
) -> dict[str, Any]:
    """Check ``given`` against a transport's declared options.

    :param where: what to name in an error: ``"option"``, ``"flowplug.toml: [transports.zmq]"``.
    :param strict: values come from a typed file, so ``"100"`` is not an int (sizes still
        accept strings such as ``"2GiB"``).
    :param defaults: also return the declared default of every option not given.
    :raises flowplug.ConfigError: an unknown option, or a value of the wrong type.
    """
    by_name = {opt.name: opt for opt in declared}
    result = {opt.name: opt.default for opt in declared} if defaults else {}
    for key, value in given.items():
        opt = by_name.get(key)
        if opt is None:
            accepted = ", ".join(sorted(by_name)) or "no options"
            raise ConfigError(
                f"{where} {key} = {value!r}: transport {transport!r} has no option {key!r} "
                f"(it accepts: {accepted})"
                + (_BATCHING_HINT if key in ("batch_size", "collate", "collate_fn") else "")
                + _did_you_mean(key, by_name)
            )
        result[key] = _coerce_option(transport, opt, value, where, strict)
    return result


#: what an unknown option that asks for batches gets told: batching is a dataflow's job.
_BATCHING_HINT = (
    ". To batch datapoints in the workers, wrap the dataflow: fp.Batch(df, 32, collate=...)"
)


def _coerce_option(transport: str, opt: Option, value: Any, where: str, strict: bool) -> Any:
    label = f"{where} {opt.name} = {value!r}"
    if opt.size:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool)):
        return value
    if not strict and isinstance(value, str):
        if opt.type in (int, float):
            try:
                return opt.type(value)
            except ValueError:
                pass
        if opt.type is bool and value.lower() in ("1", "0", "true", "false"):
            return value.lower() in ("1", "true")
    raise ConfigError(
        f"{label}: option {opt.name!r} of transport {transport!r} must be "
        f"{opt.type.__name__}, got {type(value).__name__}"
    )


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f". Did you mean {close[0]!r}?" if close else ""
