"""mkdocs hooks: the installed flowplug's version in the site's name and footer."""

from __future__ import annotations

from importlib import metadata
from typing import Any


def on_config(config: Any, **kwargs: Any) -> Any:
    version = metadata.version("flowplug")
    config["site_name"] = f"flowplug {version}"
    config["copyright"] = f"flowplug {version}, Apache-2.0"
    return config
