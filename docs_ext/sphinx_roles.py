"""A Griffe extension for the docs site: Sphinx roles in docstrings become cross-references.

The code's docstrings are Sphinx-style (``:param x:``, ``:class:`~flowplug.Runner```).
mkdocstrings' sphinx parser reads the fields but leaves inline roles as text, so the API
page showed ``:class:`` before every name. This rewrites each role into an autorefs link
(``optional``: a name that is not on the site stays plain code instead of failing the
build). ``~`` shows the last component only, as in Sphinx.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

import griffe

import flowplug

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj):`(~?)([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Once the whole package is loaded, so that every sibling can be found."""
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            self._rewrite(obj)
            todo.extend(m for m in obj.members.values() if not m.is_alias)

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return
        scope = obj if obj.is_class or obj.is_module else obj.parent

        def resolve(name: str) -> str | None:
            """The identifier the site knows ``name`` by; None for a builtin."""
            head = name.split(".")[0]
            if head == "flowplug":
                return name
            if hasattr(builtins, head) or head in ("multiprocessing", "threading", "zmq"):
                return None
            if scope is not None and head in scope.all_members:
                return f"{scope.path}.{name}"  # a sibling: Runner.state_dict
            if head in flowplug.__all__:
                return f"flowplug.{name}"  # documented under its public name
            return f"{obj.module.path}.{name}"

        def link(match: re.Match[str]) -> str:
            written = match.group(2).strip().lstrip(".")
            shown = written.rsplit(".", 1)[-1] if match.group(1) else written
            target = resolve(written)
            if target is None:
                return f"<code>{shown}</code>"
            return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
