"""Every ```python block in README.md and docs/*.md runs, so the docs cannot drift.

The blocks of one file run in order in one namespace, as a reader would type them. A block
preceded by the line ``<!-- docs: no-run -->`` is an illustration and is only compiled.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?P<marker><!-- docs: no-run -->\s*\n)?```python\n(?P<code>.*?)```", re.S)
PAGES = sorted(
    p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if BLOCK.search(p.read_text())
)


def blocks(page: Path):
    text = page.read_text()
    for m in BLOCK.finditer(text):
        line = text[: m.start("code")].count("\n") + 1
        yield line, m.group("code"), bool(m.group("marker"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page, no_leaks):
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code, no_run in blocks(page):
        compiled = compile(code, f"{page.name}:{line}", "exec")
        if not no_run:
            exec(compiled, namespace)
