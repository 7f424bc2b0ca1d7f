"""Every ```python example in docs/shm.md runs as it is."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

from flowplug.testing.leaks import leaked, snapshot

DOC = Path(__file__).resolve().parent.parent / "docs" / "shm.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index):
    before = snapshot()
    namespace: dict = {"__name__": f"shm_doc_example_{index}"}
    exec(compile(EXAMPLES[index], f"{DOC.name}[example {index}]", "exec"), namespace)
    namespace.clear()
    gc.collect()
    left = leaked(before)
    assert not left, f"left behind: {left}"
