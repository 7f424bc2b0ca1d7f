"""Run flowplug's shipped contract suite on the ``pipe`` transport.

This is all a plugin author writes to get the whole suite: subclass
``TransportContract`` and return the registered name from the ``transport`` fixture.
The suite adapts to the transport's capabilities (``crosses_processes``), not its name.
"""

import pytest

from flowplug.testing.contract import TransportContract


class TestPipeContract(TransportContract):
    @pytest.fixture
    def transport(self):
        return "pipe"
