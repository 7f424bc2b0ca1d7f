"""Runner settings: explicit arguments, then environment variables, then defaults.

Transport options are validated against the :class:`~flowplug.Option` declarations of the
chosen transport, so a typo or a wrong type is an error, never silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .transport import Option

START_METHODS = ("fork", "spawn", "forkserver")


@dataclass(frozen=True)
class Settings:
    """The effective runner settings."""

    transport: str = "zmq"
    num_workers: int = 1
    capacity: int = 50
    start_method: str | None = None
    timeout: float | None = None


#: environment variable -> (setting, parser)
ENV_VARS = {
    "FLOWPLUG_TRANSPORT": "transport",
    "FLOWPLUG_NUM_WORKERS": "num_workers",
    "FLOWPLUG_CAPACITY": "capacity",
    "FLOWPLUG_START_METHOD": "start_method",
    "FLOWPLUG_TIMEOUT": "timeout",
}


def resolve_settings(**explicit: Any) -> Settings:
    """Combine explicit arguments (None means "not given"), the environment and defaults."""
    values: dict[str, Any] = {}
    for var, key in ENV_VARS.items():
        raw = os.environ.get(var)
        if raw is not None and raw.strip() != "":
            values[key] = _parse_setting(key, raw.strip(), f"environment variable {var}")
    for key, value in explicit.items():
        if value is not None:
            values[key] = _parse_setting(key, value, f"argument {key}=")
    return Settings(**values)


def _parse_setting(key: str, value: Any, where: str) -> Any:
    if key == "transport":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: transport must be a non-empty name, got {value!r}")
        return value
    if key in ("num_workers", "capacity"):
        number = _to_int(value, where, key)
        if number < 1:
            raise ConfigError(f"{where}: {key} must be at least 1, got {value!r}")
        return number
    if key == "start_method":
        if value not in START_METHODS:
            raise ConfigError(
                f"{where}: start_method {value!r} is not one of {', '.join(START_METHODS)}"
                + _did_you_mean(str(value), START_METHODS)
            )
        return value
    if key == "timeout":
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: timeout must be a number of seconds, got {value!r}"
            ) from None
        if seconds <= 0:
            raise ConfigError(f"{where}: timeout must be positive, got {value!r}")
        return seconds
    raise ConfigError(f"{where}: unknown setting {key!r}")  # pragma: no cover


def _to_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")


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


def validate_options(
    transport: str, declared: tuple[Option, ...], given: Mapping[str, Any], where: str = "option"
) -> dict[str, Any]:
    """Check ``given`` against a transport's declared options and fill in defaults.

    :raises flowplug.ConfigError: an unknown option, or a value of the wrong type.
    """
    by_name = {opt.name: opt for opt in declared}
    result = {opt.name: opt.default for opt in declared}
    for key, value in given.items():
        opt = by_name.get(key)
        if opt is None:
            accepted = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(
                f"{where} {key!r} is not accepted by transport {transport!r} "
                f"(it accepts: {accepted})" + _did_you_mean(key, by_name)
            )
        result[key] = _coerce_option(transport, opt, value, where)
    return result


def _coerce_option(transport: str, opt: Option, value: Any, where: str) -> Any:
    if opt.size:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where} {opt.name!r} of transport {transport!r}: {exc}") from None
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool)):
        return value
    if isinstance(value, str) and opt.type in (int, float):
        try:
            return opt.type(value)
        except ValueError:
            pass
    if isinstance(value, str) and opt.type is bool and value.lower() in ("1", "0", "true", "false"):
        return value.lower() in ("1", "true")
    raise ConfigError(
        f"{where} {opt.name!r} of transport {transport!r} must be {opt.type.__name__}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f". Did you mean {close[0]!r}?" if close else ""
