"""Run the shipped transport contract over every installed transport."""

import pytest

import flowplug as fp
from flowplug.testing.contract import TransportContract


class TestContract(TransportContract):
    @pytest.fixture(params=sorted(fp.available_transports()))
    def transport(self, request):
        return request.param
