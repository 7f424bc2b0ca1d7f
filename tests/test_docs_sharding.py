"""The examples of docs/sharding.md run as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "sharding.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(no_leaks, index):
    code = compile(BLOCKS[index], f"{DOC.name}[example {index}]", "exec")
    exec(code, {"__name__": f"sharding_example_{index}"})
