"""The docs stay true: every hook is documented, and every ```python block in README.md and
docs/*.md runs as written (a block whose first line is ``# doc: not run`` is an illustration)."""

import inspect
import re
from pathlib import Path

import pytest

import flowplug as fp
from flowplug import cli, hookspecs
from flowplug.config import ENV_VARS, FILE_KEYS

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: first line of a ```python block that only illustrates and is not run; use sparingly.
SKIP_MARKER = "# doc: not run"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced python block in a markdown text."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def hookspec_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, "flowplug_spec")
    )


def test_there_are_hooks_to_document():
    assert "flowplug_register_transports" in hookspec_names()


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hook_and_its_signature_is_documented(hook):
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"### {hook}({params})" in (DOCS / "plugins.md").read_text()


PAGES = sorted(
    p for p in [DOCS.parent / "README.md", *DOCS.glob("*.md")] if python_blocks(p.read_text())
)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch, no_leaks):
    """The blocks of one page run in order in one namespace, as a reader would type them."""
    monkeypatch.chdir(tmp_path)  # some blocks write config files
    for var in (*ENV_VARS, "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "FLOWPLUG_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    blocks = python_blocks(page.read_text())
    run = [(line, code) for line, code in blocks if not code.startswith(SKIP_MARKER)]
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code in run:
        exec(compile(code, f"{page.name}, block at line {line}", "exec"), namespace)


def test_guides_keep_their_examples():
    for doc in ("plugins.md", "configuration.md", "getting-started.md"):
        assert len(python_blocks((DOCS / doc).read_text())) >= 3, f"{doc} has lost its examples"


def test_python_block_parser():
    text = "x\n```python\na = 1\n```\n```toml\nb = 2\n```\n```python\n# doc: not run\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "# doc: not run\n")]


def test_every_setting_and_variable_is_in_configuration_md():
    text = (DOCS / "configuration.md").read_text()
    for key in FILE_KEYS:
        assert f"`{key}" in text, key
    for var in (*ENV_VARS, "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "FLOWPLUG_BLOCK_PLUGINS"):
        assert f"`{var}" in text, var
    for name, cls in fp.available_transports().items():
        assert f"| `{name}` |" in text, name
        for opt in cls.options:
            assert f"| `{name}` | `{opt.name}` |" in text, (name, opt.name)


def test_every_subcommand_is_in_cli_md():
    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"## `flowplug {name}" in text, name


def test_every_page_is_in_the_site_nav():
    nav = set(
        re.findall(r"^\s+- [^:]+: (\S+\.md)$", (DOCS.parent / "mkdocs.yml").read_text(), re.M)
    )
    assert nav == {p.name for p in DOCS.glob("*.md")}
