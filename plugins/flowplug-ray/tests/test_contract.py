"""The shipped transport contract, unchanged, on transport "ray"."""

import pytest

from flowplug.testing.contract import TransportContract


class TestRayContract(TransportContract):
    @pytest.fixture
    def transport(self):
        return "ray"
