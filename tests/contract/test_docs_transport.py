"""The whole transport of docs/plugins.md, as written there, passes the shipped contract."""

import re
from pathlib import Path

import pytest

from flowplug.plugins import PluginInfo, get_registry
from flowplug.testing.contract import TransportContract

PLUGINS_MD = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def docs_transport() -> type:
    """Run the page's first python block (the transport) and return its class."""
    text = PLUGINS_MD.read_text()
    code = re.search(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE).group(1)
    namespace: dict = {"__name__": "docs_plugins_transport"}
    exec(compile(code, f"{PLUGINS_MD.name}, first python block", "exec"), namespace)
    return namespace["MpQueueTransport"]


def test_the_docs_transport_is_short():
    source = re.search(r"^```python\n(.*?)^```", PLUGINS_MD.read_text(), re.DOTALL | re.M)
    code = [line for line in source.group(1).splitlines() if line.strip()]
    assert len(code) <= 35, f"the minimal transport grew to {len(code)} lines"


class TestDocsTransport(TransportContract):
    @pytest.fixture
    def transport(self):
        # The registry is reloaded after each test (conftest), so register every time.
        get_registry().register(docs_transport(), origin=PluginInfo("docs", "docs", "0"))
        return "mpqueue"
